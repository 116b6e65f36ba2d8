"""The model-level rows of bench/gpu_validate.py, each a (what, dtype, got, want, tol) check: the blocks'
pieces (residual add + norm, SwiGLU, rotary, time reversals) and the mixer function against float64
formulas, the norm backward's launch against mamba_ssm's, a whole DiffusionLM on the kernel path against the
float64 reference path, its logits at masked positions, a CUDA-graph replay against the plain forward, the
training graphs (bench/graph_checks.py) and the trainer's stop signals."""
from __future__ import annotations

import copy
import functools
import os
import time

import torch

from bench import norm_backward as norm_bench
from bench.common import rel_err
from bench.graph_checks import denoiser_capture_checks, stage_graph_checks, training_graph_checks
from bench.inference_checks import inference_checks
from model import kernels
from model.attention import apply_rotary, rotary_tables, rotate
from model.blocks import AddNorm
from model.diffusion import mask_batch
from model.graphs import GraphedDenoiser
from model.lm import DiffusionLM
from model.mamba2 import Mamba2Mixer, add_time_reversed, reverse_time
from model.presets import get_preset


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
        # without autograd the scan's output comes from model/chunk_scan_kernel.py (kernels.fused_mixer)
        with torch.no_grad():
            no_grad = run(mixer, zxbcdt, keep=True, autocast=dtype == torch.bfloat16)[0]
        what = f"fused mixer without autograd (1.3B, L {seqlen}, scan output: {kernels.describe(device)['scan_out']})"
        checks.append((f"{what}: output vs mamba_ssm's function", dtype, no_grad, want[0],
                       tol if dtype == torch.bfloat16 else 1e-3))   # fp32: tf32 products in both, other order
        checks.append((f"{what}: output vs float64", dtype, no_grad, exact[0],
                       max(1.25 * rel_err(want[0].double(), exact[0]), 1e-6)))
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


def whole_model_checks(device, gen) -> list:
    """A whole model's loss and gradients against the float64 reference path, DiffusionLM's logits at
    masked positions only (score_mask, the training path) against the same rows of its full logits, and
    its trunk replayed from a CUDA graph against the plain forward, on the kernel path."""
    checks = []
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

    return checks


# the groups of run_model_checks, in their order: name -> checks(device, gen)
MODEL_CHECK_GROUPS = {
    "pieces": lambda device, gen: piece_checks(device, gen) + norm_launch_checks(device),
    "mixer_function": mixer_function_checks,
    "inference": inference_checks,
    "model": lambda device, gen: whole_model_checks(device, gen) + denoiser_capture_checks(device, gen),
    "training_graphs": lambda device, gen: training_graph_checks(device, gen) + stage_graph_checks(device, gen),
    "signals": lambda device, gen: signal_checks(device),
}


def run_model_checks(device, lines, groups=tuple(MODEL_CHECK_GROUPS)) -> bool:
    """The named groups of MODEL_CHECK_GROUPS (all by default), each on a generator of its own seed, its rows
    printed as soon as it is done: a run cut short keeps the finished groups' rows."""
    all_pass, first = True, True
    for index, name in enumerate(MODEL_CHECK_GROUPS):
        if name in groups:
            checks = MODEL_CHECK_GROUPS[name](device, torch.Generator(device="cpu").manual_seed(2 + index))
            if not first:
                lines.pop()        # the blank line that ended the table: more rows follow
            all_pass &= report_checks(checks, lines, header=first)
            first = False
    return all_pass


def report_checks(checks, lines, header=True) -> bool:
    """Print and append the table of (what, dtype, got, want, tol) checks, then a blank line (header=False:
    rows that continue the table `lines` ends with); whether all pass."""
    if header:
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
