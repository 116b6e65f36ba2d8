"""Check the GPU kernel path of the bidirectional Mamba-2 mixer against the pure-PyTorch reference.

On the same weights and inputs, BiMamba2's output and the gradients of its input and of every
parameter are computed twice:
    kernel path     the model in bf16 or fp32 on the GPU, Triton scan + norm, causal-conv1d kernel
                    (or its F.conv1d fallback, forced), directions fused into one launch or not, and
                    with separate directions mamba_ssm's fused mixer (conv + scan + norm + out_proj in
                    one autograd function) or, forced, those pieces one by one;
    reference path  the same (rounded) weights in float64, every kernel forced to the reference.
The relative error ||a - b|| / ||b|| must stay under 2e-2 for bf16 and 5e-3 for fp32 (tf32 inside the
Triton kernels). For scale, the table also shows the error of the reference path run in the kernel
path's own dtype ("ref same dtype"): a kernel should be about as close as that. A few bf16 gradients
(dt_bias: a long sum with heavy cancellation) sit near 2e-2 even on the reference path, so a row also
passes when its error is within 1.25x of that same-dtype reference error.
Then model-level checks: the blocks' residual add + norm (mamba_ssm's Triton layer_norm_fn: RMSNorm and
LayerNorm, bf16 branch output + fp32 stream), the compiled SwiGLU and rotary embedding against float64
formulas, values and gradients; a whole DiffusionLM's loss and gradients on the kernel path (fp32) against the float64 reference
path; its logits at masked positions only against the same rows of the full logits; and the same model with
its trunk replayed from a CUDA graph (model/graphs.py) against the plain forward, and training with the
trunk's forward and backward replayed from CUDA graphs (model/train_graphs.py) against plain training. Last
it times forward
+ backward of the mixer at d_model 2048 on 32K tokens, for each path.

    python bench/gpu_validate.py --out gpu_validate.md               # on an H100
    python bench/gpu_validate.py --device cpu --out /tmp/smoke.md    # CPU smoke run: reference vs reference
    python bench/gpu_validate.py --pieces-only --skip-bench --out x.md   # the model-level checks alone

Exit status: 0 when every row passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import norm_backward as norm_bench
from bench.common import rel_err
from model import kernels, train_graphs
from model.attention import apply_rotary, rotary_tables, rotate
from model.blocks import AddNorm
from model.config import MambaConfig, ModelConfig
from model.diffusion import mask_batch
from model.graphs import GraphedDenoiser
from model.lm import DiffusionLM
from model.mamba2 import BiMamba2, Mamba2Mixer, add_time_reversed, reverse_time
from model.presets import get_preset

DEFAULT_SIZES = {
    "cuda": {"batch": 2, "seqlen": 1000, "d_model": 256, "d_state": 64, "headdim": 64, "chunk_size": 256,
             "bench_d_model": 2048, "bench_tokens": 32768, "bench_seqlen": 4096, "bench_iters": 5},
    "cpu": {"batch": 2, "seqlen": 50, "d_model": 32, "d_state": 16, "headdim": 16, "chunk_size": 16,
            "bench_d_model": 32, "bench_tokens": 128, "bench_seqlen": 64, "bench_iters": 1},
}
# precision -> (parameter and input dtype, autocast to bf16?)
PRECISIONS = {"bf16": (torch.bfloat16, False), "fp32": (torch.float32, False), "amp-bf16": (torch.float32, True)}
TOLERANCE = {"bf16": 2e-2, "fp32": 5e-3, "amp-bf16": 2e-2}
SAME_DTYPE_SLACK = 1.25    # a row also passes within this factor of the same-dtype reference's error


def make_cfg(d_model, directions="independent", ngroups=1, d_state=64, headdim=64, chunk_size=256):
    return ModelConfig(d_model=d_model, layer_pattern="M", mamba=MambaConfig(
        d_state=d_state, headdim=headdim, chunk_size=chunk_size, ngroups=ngroups, directions=directions))


def make_model(cfg, fused, device, seed=0):
    """A BiMamba2 with non-trivial norm weights, D and conv bias, so every parameter matters."""
    torch.manual_seed(seed)
    model = BiMamba2(cfg, fuse_directions=fused).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".D")):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def forward_backward(model, x, grad_out, autocast=False):
    """Output and {name: grad} for the input ("input") and every parameter, as float64 on the CPU."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.backward(grad_out.to(out.dtype))
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    missing = [n for n, g in grads.items() if g is None]
    if missing:
        raise RuntimeError(f"no gradient reached {missing}")
    as64 = lambda t: t.detach().double().cpu()
    return as64(out), {n: as64(g) for n, g in grads.items()}


def validate_one(cfg, precision, forced, fused, device, batch, seqlen):
    """Rows (tensor, max_abs, rel, rel of the same-dtype reference, pass) for one configuration."""
    dtype, autocast = PRECISIONS[precision]
    master = make_model(cfg, fused, device)
    model = copy.deepcopy(master).to(dtype)                         # kernel path, A_log/D/dt_bias stay fp32
    reference = copy.deepcopy(model).double()                       # same rounded weights, float64
    reference.fuse_directions = False                               # also checks the fused wiring
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, seqlen, cfg.d_model, generator=gen).to(device)
    grad_out = torch.randn(batch, seqlen, cfg.d_model, generator=gen).to(device)

    # The compiled time reversals are checked once, in piece_checks: compiling them for every shape and
    # dtype of this matrix took about 45 s a row.
    with kernels.use_reference_kernels(*forced, "flip"):
        used = kernels.describe(device)
        out, grads = forward_backward(model, x.to(dtype), grad_out.to(dtype), autocast)
    with kernels.use_reference_kernels():
        out_same, grads_same = forward_backward(copy.deepcopy(model), x.to(dtype), grad_out.to(dtype),
                                                autocast)
        out_ref, grads_ref = forward_backward(reference, x.double(), grad_out.double())

    tol = TOLERANCE[precision]
    rows = []
    for name, a, b, s in [("output", out, out_ref, out_same)] + [
            (f"grad {n}", grads[n], grads_ref[n], grads_same[n]) for n in grads_ref]:
        r, r_same = rel_err(a, b), rel_err(s, b)
        rows.append((name, (a - b).abs().max().item(), r, r_same, r <= tol or r <= SAME_DTYPE_SLACK * r_same))
    return used, rows


def run_validation(args, device, lines):
    configs = []   # (directions, groups, precision, kernels forced to the reference, directions fused)
    for precision in ("bf16", "fp32"):
        for forced in ((), ("conv",), ("mixer",)):
            for fused in (True, False):
                if not (forced == ("mixer",) and fused):    # fused directions never use the fused mixer
                    configs.append(("independent", 1, precision, forced, fused))
    configs += [("independent", 1, "amp-bf16", (), True),
                ("independent", 1, "amp-bf16", (), False),
                ("tied_projections", 1, "bf16", (), True),
                ("tied_projections", 1, "fp32", (), False),
                ("independent", 2, "bf16", (), True),
                ("independent", 2, "bf16", (), False)]
    all_pass = True
    lines.append(f"## Kernel path vs float64 reference (batch {args.batch}, seqlen {args.seqlen}, "
                 f"d_model {args.d_model}, d_state {args.d_state}, headdim {args.headdim}, "
                 f"chunk {args.chunk_size})\n")
    lines.append("| directions | groups | precision | conv | fused | scan/norm | mixer | tensor | max abs | rel | "
                 "ref same dtype | tol | ok |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for directions, ngroups, precision, forced, fused in configs:
        cfg = make_cfg(args.d_model, directions, ngroups, args.d_state, args.headdim, args.chunk_size)
        used, rows = validate_one(cfg, precision, forced, fused, device, args.batch, args.seqlen)
        # the fused mixer runs only for separate, independent directions with conv channels % 8 == 0
        mixer = used["mixer"] if not fused and directions == "independent" else "n/a"
        worst = max(rows, key=lambda r: r[2] / TOLERANCE[precision])
        ok = all(r[4] for r in rows)
        all_pass &= ok
        print(f"{directions:16s} g={ngroups} {precision:8s} conv={used['conv']:9s} fused={fused!s:5s} "
              f"scan={used['scan']:9s} mixer={mixer:9s}: worst {worst[0]} rel {worst[2]:.2e} "
              f"(same-dtype ref {worst[3]:.2e}) {'ok' if ok else 'FAIL'}", flush=True)
        for name, max_abs, rel, rel_same, passed in rows:
            lines.append(f"| {directions} | {ngroups} | {precision} | {used['conv']} | {fused} | "
                         f"{used['scan']}/{used['norm']} | {mixer} | {name} | {max_abs:.2e} | {rel:.2e} | "
                         f"{rel_same:.2e} | {TOLERANCE[precision]:.0e} | {'ok' if passed else 'FAIL'} |")
    lines.append("")
    return all_pass


def outputs_and_grads(fn, inputs, params=()):
    """fn(*inputs) -> tuple of outputs; the outputs and the gradients of inputs and params for fixed random
    output gradients (drawn in float64 and rounded to each output's dtype, so both paths get the same)."""
    leaves = [t.detach().requires_grad_(True) for t in inputs] + list(params)
    outs = fn(*leaves[:len(inputs)])
    gen = torch.Generator(device="cpu").manual_seed(7)
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    for p in params:
        p.grad = None
    torch.autograd.backward(outs, grads)
    return list(outs), [t.grad for t in leaves]


def add_norm_float64(hidden, residual, weights, eps, kind):
    """(norm(hidden + residual), hidden + residual), the formula written out."""
    x = hidden + residual
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weights[0]
    return (y + weights[1] if kind == "layernorm" else y), hidden + residual


def rotate_with(fn, cos, sin, q, k):
    return fn(q, k, cos, sin)


def rotate_float64(q, k, cos, sin):
    return apply_rotary(q, cos.double(), sin.double()), apply_rotary(k, cos.double(), sin.double())


def flips_float64(forward_out, backward_out):
    """The mixer's time reversals written out with an index: (x reversed, forward_out + backward_out
    reversed)."""
    rev = torch.arange(forward_out.shape[1] - 1, -1, -1, device=forward_out.device)
    return forward_out[:, rev], forward_out + backward_out[:, rev]


def compared(what, kernel, device, dtype, tol, names, got, want) -> list:
    """Check rows "<what> (kernel: <path used>): <name>" pairing the kernel path's outputs and gradients
    (got) with the float64 formula's (want)."""
    used = kernels.describe(device)[kernel]
    return [(f"{what} (kernel: {used}): {name}", dtype, a, b, tol) for name, a, b in zip(names, got, want)]


def piece_checks(device, gen) -> list:
    """AddNorm, SwiGLU, rotary and the time reversals on the kernel path vs float64 formulas (values and
    gradients)."""
    d = 2048 if device.type == "cuda" else 64
    checks = []
    for kind in ("rmsnorm", "layernorm"):
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            norm = AddNorm(d, kind=kind).to(device)
            with torch.no_grad():
                for p in norm.parameters():
                    p.copy_(1 + 0.2 * torch.randn(d, generator=gen))
            hidden = (3 * torch.randn(4, 512, d, generator=gen)).to(device, dtype)
            residual = (3 * torch.randn(4, 512, d, generator=gen)).to(device)
            got, got_grads = outputs_and_grads(norm, [hidden, residual], list(norm.parameters()))
            w = [p.detach().double().requires_grad_(True) for p in norm.parameters()]
            formula = functools.partial(add_norm_float64, weights=w, eps=norm.eps, kind=kind)
            want, want_grads = outputs_and_grads(formula, [hidden.double(), residual.double()], w)
            checks += compared(f"AddNorm {kind}", "add_norm", device, dtype, tol,
                               ["output", "stream", "grad hidden", "grad residual", "grad weight", "grad bias"],
                               got + got_grads, want + want_grads)
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        h = torch.randn(4, 512, 2 * d, generator=gen).to(device, dtype)

        def swiglu64(x):
            gate, up = x.chunk(2, dim=-1)
            return (gate * torch.sigmoid(gate) * up,)
        got, got_grads = outputs_and_grads(lambda x: (kernels.swiglu(x),), [h])
        want, want_grads = outputs_and_grads(swiglu64, [h.double()])
        checks += compared("SwiGLU", "swiglu", device, dtype, tol, ["output", "grad h"], got + got_grads,
                           want + want_grads)
        # rotary embedding of q and k, strided views of one qkv projection as in the attention block
        heads, head_dim = (16, 128) if device.type == "cuda" else (4, 16)
        q, k, _ = torch.randn(2, 512, 3, heads, head_dim, generator=gen).to(device, dtype).unbind(2)
        cos, sin = rotary_tables(512, head_dim, 10000.0, device)
        got, got_grads = outputs_and_grads(functools.partial(rotate_with, rotate, cos, sin), [q, k])
        want, want_grads = outputs_and_grads(functools.partial(rotate_with, rotate_float64, cos, sin),
                                             [q.double(), k.double()])
        checks += compared("rotary q, k", "rotary", device, dtype, tol, ["q", "k", "grad q", "grad k"],
                           got + got_grads, want + want_grads)
        # the bidirectional mixer's time reversals (model/mamba2.py), as BiMamba2 uses them
        a, b = torch.randn(2, 2, 1000, d, generator=gen).to(device, dtype).unbind(0)
        got, got_grads = outputs_and_grads(lambda f, g: (reverse_time(f), add_time_reversed(f, g)), [a, b])
        want, want_grads = outputs_and_grads(flips_float64, [a.double(), b.double()])
        checks += compared("time reversals", "flip", device, dtype, tol,
                           ["reversed", "sum with reversed", "grad first", "grad second"], got + got_grads,
                           want + want_grads)
    return checks


def norm_launch_checks(device, rows: int = 4096) -> list:
    """model/norm_backward's launches of mamba_ssm's norm backward kernels against mamba_ssm's own launch, at
    the 1.3B presets' widths and the training dtypes (on a GPU with the launchers installed)."""
    if device.type != "cuda" or not kernels.HAS_MAMBA_TRITON or "norm_backward" in kernels.IMPORT_ERRORS:
        return []
    gen, checks = torch.Generator().manual_seed(5), []
    for kind, module, make, d, names in (
            ("add_norm", "layer_norm", norm_bench.add_norm_case, 2048, ["dx", "dw", "db", "dresidual_in"]),
            ("gated", "layernorm_gated", norm_bench.gated_case, 4096, ["dx", "dw", "db", "dz", "out"])):
        launch = kernels.import_skipping_package_init(f"mamba_ssm.ops.triton.{module}")._layer_norm_bwd
        args, kwargs, _ = make(rows, d, device, gen)
        for name, got, want in zip(names, launch(*args, **kwargs), launch.original(*args, **kwargs)):
            if got is not None:
                checks.append((f"norm backward, our launch vs mamba_ssm's ({kind}, {rows} x {d}): {name}",
                               got.dtype, got, want, 1e-5))
    return checks


MIXER_CASES = {"fp32": (torch.float32, 1e-5, 2000), "bf16": (torch.bfloat16, 1e-2, 2048)}   # 2000: a part chunk


def mixer_function_checks(device, gen, cases=tuple(MIXER_CASES)) -> list:
    """model/mixer_function (the chunk states kept for the backward) against mamba_ssm's own
    mamba_split_conv1d_scan_combined and against float64 (the reference path), one 1.3B mixer direction,
    fp32 at L = 2000 (a part chunk) and bf16 autocast at 2048. Against mamba_ssm: equal up to the order of
    atomic adds in fp32; in bf16 the kept states are bf16 where mamba_ssm recomputes them in fp32 for the
    decay gradient. Against float64: no further from it than mamba_ssm's function (25% slack)."""
    if device.type != "cuda" or kernels._mixer_keeping_states is None:
        return []
    torch.manual_seed(6)
    mixer = Mamba2Mixer(get_preset("1.3b-diffumamba-h")).to(device)
    reference = copy.deepcopy(mixer).double()
    names = ["output", "grad zxbcdt", "grad conv weight", "grad conv bias", "grad dt_bias", "grad A_log",
             "grad D", "grad norm weight", "grad out_proj weight"]

    def params(m):
        return [m.conv1d.weight, m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm.weight, m.out_proj.weight]

    def run(m, z, keep, autocast):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return (kernels.fused_mixer(z, m.conv_weight, m.conv1d.bias, m.dt_bias, m.A, m.D, m.chunk_size,
                                        m.norm.weight, m.norm.eps, m.out_proj.weight, m.headdim, m.ngroups, keep),)

    def output_and_grads(fn, m, z):
        outs, grads = outputs_and_grads(fn, [z], params(m))
        return [t.detach().clone() for t in outs + grads]
    checks = []
    for dtype, tol, seqlen in (MIXER_CASES[c] for c in cases):
        zxbcdt = torch.randn(2, seqlen, mixer.d_in_proj, generator=gen).to(device, dtype)
        got, want = (output_and_grads(functools.partial(run, mixer, keep=keep, autocast=dtype == torch.bfloat16),
                                      mixer, zxbcdt) for keep in (True, False))
        with kernels.use_reference_kernels():   # conv, model.ssd's chunked scan, gated norm, out_proj
            exact = output_and_grads(lambda t: (reference.out_proj(reference.mix(t)),), reference, zxbcdt.double())
        for name, a, b, c in zip(names, got, want, exact):
            what = f"fused mixer, states kept (1.3B, L {seqlen}): {name}"
            checks.append((f"{what} vs mamba_ssm's function", dtype, a, b, tol))
            checks.append((f"{what} vs float64", dtype, a, c, max(1.25 * rel_err(b.double(), c), 1e-6)))
    return checks


def hook_accumulate_grad_nodes(model, hook) -> list:
    """As DeepSpeed's ZeRO does: `hook` on every parameter's AccumulateGrad node, the nodes kept alive
    (returned)."""
    nodes = []
    for p in model.parameters():
        node = p.expand_as(p).grad_fn.next_functions[0][0]
        node.register_hook(hook)
        nodes.append(node)
    return nodes


def training_graph_checks(device, gen, micro_batches: int = 3) -> list:
    """Training with the trunk replayed from CUDA graphs (model/train_graphs.py) against the same training
    without: the losses of `micro_batches` micro-batches (bf16 autocast, fp32 weights, as the trainer runs)
    and the gradients they accumulate, which a graph's static buffers must not disturb; the graphs' summed
    gradients handed over after every backward, and only after the last (the trainer's ZeRO-1 way), also
    when the last micro-batch has another shape and runs eagerly (it then carries the graphed ones' sums)."""
    preset = "240m-diffumamba-h" if device.type == "cuda" else "tiny-diffumamba-h"
    torch.manual_seed(5)
    plain = DiffusionLM(get_preset(preset).replace(layer_pattern="MA")).to(device).train()
    seq_len = 1024 if device.type == "cuda" else 32

    def masked(step, length):
        return {k: v.to(device) for k, v in mask_batch(
            torch.randint(0, plain.cfg.vocab_size - 1, (2, length), generator=gen), seed=0, step=step,
            positions=torch.arange(2), global_batch_size=2, mask_id=plain.cfg.mask_token_id).items()}
    batches = [masked(i, seq_len) for i in range(micro_batches)]
    odd_last = batches[:-1] + [masked(micro_batches, seq_len // 2)]

    def train(model, batches):
        losses = []
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            for b in batches:
                loss = model.loss(b)[0]
                loss.backward()
                losses.append(loss.detach().float())
        return torch.stack(losses), torch.cat([p.grad.flatten() for p in model.parameters()])

    same_shape, odd_shape = train(plain, batches), train(plain, odd_last)
    checks = []
    for mode, hand_over, run, (want_losses, want_grads) in (
            ("every backward", None, batches, same_shape),
            ("last micro-batch", train_graphs.every_nth_call(micro_batches), batches, same_shape),
            ("last micro-batch, which has another shape and runs eagerly", train_graphs.every_nth_call(micro_batches),
             odd_last, odd_shape)):
        graphed = copy.deepcopy(plain)
        graphed.zero_grad(set_to_none=True)
        graphs = train_graphs.enable(graphed, torch.bfloat16, hand_over)
        # made on the default stream, so a capture that reached them would fail; each must see every hand-over
        hooked = [0]   # with the sums handed over at the last micro-batch only, the hooks run only then
        _kept_nodes = hook_accumulate_grad_nodes(graphed, lambda *_, n=hooked: n.__setitem__(0, n[0] + 1))
        losses, grads = train(graphed, run)
        # every micro-batch's gradient reaches the head's parameters (a tied embedding too); the trunk-only
        # ones get theirs once, at the hand-over, when the graphs hand over at the last micro-batch only
        trunk_only = {id(p) for _, p in graphs.trunk_parameters()} - {id(p) for p in graphed.head.parameters()}
        once = hand_over is not None and graphs.captured is not None
        hook_calls = sum(1 if once and id(p) in trunk_only else micro_batches for p in graphed.parameters())
        state = "on" if graphs.captured is not None else "off (CPU)"
        what = f"training, trunk from CUDA graphs vs plain (graphs: {state}, sums handed over: {mode})"
        checks += [(f"{what}: losses of {micro_batches} micro-batches", torch.float32, losses, want_losses, 1e-3),
                   (f"{what}: accumulated gradients", torch.float32, grads, want_grads, 1e-2),
                   (f"{what}: gradient hooks on the parameters' kept AccumulateGrad nodes, calls", torch.float32,
                    torch.tensor([float(hooked[0])]), torch.tensor([float(hook_calls)]), 1e-6)]
        if device.type == "cuda":   # the graph path, not the eager one, is what the rows above compared
            checks.append((f"training CUDA graphs captured ({mode})", torch.float32,
                           torch.tensor([float(graphs.captured is not None)]), torch.tensor([1.0]), 1e-6))
    return checks


def stage_graph_checks(device, gen) -> list:
    """A pipeline stage's blocks replayed from CUDA graphs (model/train_graphs.StageGraphs) against the same
    blocks run eagerly, three micro-batches in 1F1B order with two in flight (two graph slots): the losses,
    the stage input's gradients (sent to the previous stage) and the summed gradients, handed over at the
    third backward (bf16 autocast, fp32 weights, as the trainer runs)."""
    from dtrain.pipeline import PipeBlock  # the trainer's pipeline layer: a stream in, a stream out
    cfg = get_preset("240m-diffumamba-h" if device.type == "cuda" else "tiny-diffumamba-h").replace(layer_pattern="MA")
    torch.manual_seed(6)
    plain = torch.nn.ModuleList(PipeBlock(kind, cfg) for kind in cfg.layer_pattern).to(device).train()
    plain[-1].ends_stage = True
    seq_len = 1024 if device.type == "cuda" else 32
    xs = [torch.randn(2, seq_len, cfg.d_model, generator=gen).to(device) for _ in range(3)]
    weight = torch.randn(2, seq_len, cfg.d_model, generator=gen).to(device)
    order = [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]

    def train(run_stage, blocks):
        leaves = [x.clone().requires_grad_(True) for x in xs]
        losses = {}
        for kind, i in order:
            if kind == "F":
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    losses[i] = (run_stage(leaves[i]).float() * weight).mean()
            else:
                losses[i].backward()
        return (torch.stack([losses[i].detach() for i in range(3)]), torch.cat([x.grad.flatten() for x in leaves]),
                torch.cat([p.grad.flatten() for p in blocks.parameters()]))

    def eager(x):
        for block in plain:
            x = block(x)
        return x

    want = train(eager, plain)
    graphed_blocks = copy.deepcopy(plain)
    graphed_blocks.zero_grad(set_to_none=True)
    graphs = train_graphs.StageGraphs(list(graphed_blocks), torch.bfloat16, train_graphs.every_nth_call(3),
                                      max_slots=2)
    got = train(graphs, graphed_blocks)
    state = f"on, {len(graphs.slots)} slots" if graphs.slots else "off (CPU)"
    what = f"pipeline stage, blocks from CUDA graphs vs plain (graphs: {state}, 1F1B, 2 in flight)"
    checks = [(f"{what}: losses of 3 micro-batches", torch.float32, got[0], want[0], 1e-3),
              (f"{what}: the stage input's gradients", torch.float32, got[1], want[1], 1e-2),
              (f"{what}: accumulated gradients", torch.float32, got[2], want[2], 1e-2)]
    if device.type == "cuda":
        checks.append(("pipeline stage CUDA graph slots captured", torch.float32,
                       torch.tensor([float(len(graphs.slots))]), torch.tensor([2.0]), 1e-6))
    return checks


def signal_checks(device) -> list:
    """The trainer's stop handlers and Triton's LLVM, which installs its own SIGTERM / SIGUSR1 actions once
    per process at its first compilation (dtrain/signals.py): after signals.compile_first and
    StopFlag.install, as the trainer starts, another compilation must leave the trainer's actions in place,
    and SIGUSR1 then SIGTERM sent to this process must reach the flag. A Triton that registered again at
    every compilation would fail the first row."""
    import signal

    from dtrain import signals
    flag = signals.StopFlag(report=lambda *_: None)
    saved = {sig: signal.getsignal(sig) for sig in flag.SIGNALS}
    try:
        signals.compile_first(device)
        flag.install()
        ours = {sig: signals.current_action(sig) for sig in flag.SIGNALS}
        signals.compile_first(device)                 # a second compilation (never from the cache)
        kept = all(signals.current_action(sig) == ours[sig] for sig in flag.SIGNALS)
        caught = 0
        for i, sig in enumerate((signal.SIGUSR1, signal.SIGTERM)):
            if caught < i:                            # SIGTERM only once SIGUSR1 got through: a lost one ends us
                break
            flag.signal_name = None
            os.kill(os.getpid(), sig)
            for _ in range(200):                      # Python runs the handler at a bytecode boundary
                if flag.signal_name:
                    break
                time.sleep(0.001)
            caught += flag.signal_name == sig.name
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    what = f"stop signals ({'after Triton compilations' if device.type == 'cuda' else 'CPU: no compilation'})"
    return [(f"{what}: the trainer's actions kept, signals", torch.float32, torch.tensor([float(kept)]),
             torch.tensor([1.0]), 1e-6),
            (f"{what}: SIGUSR1 and SIGTERM caught by the trainer's handler", torch.float32,
             torch.tensor([float(caught)]), torch.tensor([2.0]), 1e-6)]


def run_model_checks(device, lines) -> bool:
    """The blocks' pieces against float64 formulas, a whole model's loss and gradients against the float64
    reference path, and DiffusionLM's logits at masked positions only (score_mask, the training path)
    against the same rows of its full logits, on the kernel path."""
    gen = torch.Generator(device="cpu").manual_seed(2)
    checks = piece_checks(device, gen) + norm_launch_checks(device) + mixer_function_checks(device, gen)

    # the whole model, fp32 on the kernel path (tf32 inside the Triton kernels) vs float64 reference path
    torch.manual_seed(4)
    small = get_preset("tiny-diffumamba-h").replace(d_model=256, layer_pattern="MAM", vocab_size=1024,
                                                    mask_token_id=1023)
    model = DiffusionLM(small).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen).to(device))
    x0 = torch.randint(0, 1023, (2, 512), generator=gen)
    batch = {k: v.to(device) for k, v in mask_batch(x0, seed=0, step=0, positions=torch.arange(2),
                                                    global_batch_size=2, mask_id=1023).items()}
    reference = copy.deepcopy(model).double()
    loss = model.loss(batch)[0]
    loss.backward()
    with kernels.use_reference_kernels():
        loss_ref = reference.loss(batch)[0]
        loss_ref.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    grads_ref = torch.cat([p.grad.flatten() for p in reference.parameters()])
    checks.append(("DiffusionLM (pattern MAM, d 256) loss: fp32 kernel path vs float64 reference",
                   torch.float32, loss.reshape(1), loss_ref.reshape(1), 5e-3))
    checks.append(("DiffusionLM (pattern MAM, d 256) all gradients: fp32 kernel path vs float64 reference",
                   torch.float32, grads, grads_ref, 5e-3))

    preset = "240m-diffumamba-h" if device.type == "cuda" else "tiny-diffumamba-h"
    torch.manual_seed(3)
    model = DiffusionLM(get_preset(preset).replace(layer_pattern="MA")).to(device, torch.bfloat16).eval()
    ids = torch.randint(0, model.cfg.vocab_size - 1, (2, 1024 if device.type == "cuda" else 32), generator=gen)
    score_mask = torch.rand(ids.shape, generator=gen) < 0.5
    ids[score_mask] = model.cfg.mask_token_id
    ids, score_mask = ids.to(device), score_mask.to(device)
    with torch.no_grad():
        full, selected = model(ids), model(ids, score_mask)
    checks.append((f"logits at masked positions vs full logits ({preset}, pattern MA)", torch.bfloat16,
                   selected, full[score_mask], 1e-2))
    # the trunk replayed from a CUDA graph: the same kernels, so the same logits; a second input of the same
    # shape checks that a replay reads the new tokens
    graphed = GraphedDenoiser(model)
    with torch.no_grad():
        for seed in (0, 1):
            other = ids.clone()
            other[~score_mask] = torch.randint(0, model.cfg.vocab_size - 1, other.shape, generator=gen,
                                               device="cpu").to(device)[~score_mask]
            plain, replayed = model(other, score_mask), graphed(other, score_mask)
            state = "on" if graphed.on_gpu(other) else "off (CPU)"
            checks.append((f"CUDA-graph replay vs plain forward, input {seed + 1} (graphs: {state})",
                           torch.bfloat16, replayed, plain, 1e-6))
    if device.type == "cuda":   # the replays, not plain forwards, are what the rows above compared
        checks.append(("CUDA graph captured", torch.float32, torch.tensor([float(len(graphed.graphs))]),
                       torch.tensor([1.0]), 1e-6))

    checks += training_graph_checks(device, gen) + stage_graph_checks(device, gen) + signal_checks(device)
    return report_checks(checks, lines)


def report_checks(checks, lines) -> bool:
    """Print and append the table of (what, dtype, got, want, tol) checks; whether all pass."""
    lines.append("## Model pieces on the kernel path\n")
    lines.append("| check | dtype | max abs | rel | tol | ok |")
    lines.append("|---|---|---|---|---|---|")
    all_pass = True
    for what, dtype, got, want, tol in checks:
        got, want = got.double().cpu(), want.double().cpu()
        rel = rel_err(got, want)
        ok = got.shape == want.shape and rel <= tol
        all_pass &= ok
        row = (f"| {what} | {str(dtype)[6:]} | {(got - want).abs().max().item():.2e} | {rel:.2e} | {tol:.0e} | "
               f"{'ok' if ok else 'FAIL'} |")
        print(row, flush=True)
        lines.append(row)
    lines.append("")
    return all_pass


def time_fwd_bwd(model, x, iters, device):
    grad_out = torch.randn_like(x)
    for _ in range(2):                                              # warm-up: Triton autotuning, allocator
        model(x).backward(grad_out)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        model(x).backward(grad_out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / iters * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return ms, peak


def run_timing(args, device, lines):
    cfg = make_cfg(args.bench_d_model, "independent", 1, args.d_state, args.headdim, args.chunk_size)
    batch = max(1, args.bench_tokens // args.bench_seqlen)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32    # bf16 matmuls crawl on CPUs
    lines.append(f"## BiMamba2 forward + backward, {str(dtype)[6:]}, d_model {args.bench_d_model}, "
                 f"{batch} x {args.bench_seqlen} tokens ({device.type})\n")
    lines.append("| path | ms / iter | tokens / s | peak GiB |")
    lines.append("|---|---|---|---|")
    paths = [("kernels, directions fused", True, ()), ("kernels, directions separate", False, ()),
             ("kernels, directions separate, mixer pieces (fused mixer off)", False, ("mixer",)),
             ("kernels, conv fallback, fused", True, ("conv",)), ("reference (pure PyTorch)", False, None)]
    for label, fused, forced in paths:
        model = make_model(cfg, fused, device).to(dtype)
        x = torch.randn(batch, args.bench_seqlen, cfg.d_model, device=device, dtype=dtype, requires_grad=True)
        context = (kernels.use_reference_kernels() if forced is None else
                   kernels.use_reference_kernels(*forced) if forced else contextlib.nullcontext())
        try:
            with context:
                ms, peak = time_fwd_bwd(model, x, args.bench_iters, device)
            tok_s = batch * args.bench_seqlen / ms * 1e3
            row = f"| {label} | {ms:.1f} | {tok_s:,.0f} | {peak:.1f} |"
        except torch.cuda.OutOfMemoryError:
            row = f"| {label} | out of memory | | |"
        print(row, flush=True)
        lines.append(row)
        del model, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines.append("")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="file the markdown table is written to")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    for name, help_text in [("batch", None), ("seqlen", "default not a multiple of the chunk: tests the tail"),
                            ("d-model", None), ("d-state", None), ("headdim", None), ("chunk-size", None),
                            ("bench-d-model", None), ("bench-tokens", None), ("bench-seqlen", None),
                            ("bench-iters", None)]:
        p.add_argument(f"--{name}", type=int, help=help_text)
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--mixer-function-only", action="store_true",
                   help="only model/mixer_function against mamba_ssm's function and float64 (Triton's autotuning "
                        "of its kernels takes minutes on a fresh machine)")
    p.add_argument("--mixer-cases", nargs="+", choices=sorted(MIXER_CASES), default=sorted(MIXER_CASES))
    p.add_argument("--pieces-only", action="store_true",
                   help="only the model-level checks (every kernel once, a whole model): minutes less than the "
                        "mixer matrix, whose Triton autotuning takes about 40 s a row")
    args = p.parse_args(argv)
    for name, value in DEFAULT_SIZES[args.device].items():   # the CPU smoke run is small
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --device cpu for the smoke run")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False                   # fp32 matmuls outside Triton stay fp32

    lines = ["# BiMamba2: GPU kernels vs reference\n",
             f"- device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
             f"- torch {torch.__version__}; kernels on {device.type}: {kernels.describe(device)}",
             f"- import errors: {kernels.IMPORT_ERRORS or 'none'}\n"]
    print("\n".join(lines), flush=True)
    if args.mixer_function_only:
        all_pass = report_checks(mixer_function_checks(device, torch.Generator().manual_seed(2), args.mixer_cases),
                                 lines)
        args.skip_bench = True
    else:
        all_pass = True if args.pieces_only else run_validation(args, device, lines)
        all_pass &= run_model_checks(device, lines)
    if not args.skip_bench:
        run_timing(args, device, lines)
    lines.append(f"**{'PASS' if all_pass else 'FAIL'}**")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{'PASS' if all_pass else 'FAIL'}; table written to {args.out}")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
