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
+ backward of the mixer at d_model 2048 on 32K tokens, for each path. The model-level checks are in
bench/model_checks.py, bench/graph_checks.py and bench/inference_checks.py.

    python bench/gpu_validate.py --out gpu_validate.md               # on an H100
    python bench/gpu_validate.py --device cpu --out /tmp/smoke.md    # CPU smoke run: reference vs reference
    python bench/gpu_validate.py --pieces-only --skip-bench --out x.md   # the model-level checks alone
    python bench/gpu_validate.py --pieces-only --skip-bench --model-checks pieces model --out x.md   # some
    python bench/gpu_validate.py --inference-only --out x.md   # the kernels of forwards without autograd

Exit status: 0 when every row passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import rel_err
from bench.inference_checks import bimamba, inference_checks
from bench.model_checks import (
    MIXER_CASES,
    MODEL_CHECK_GROUPS,
    mixer_function_checks,
    report_checks,
    run_model_checks,
)
from model import kernels
from model.config import MambaConfig, ModelConfig

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
    master = bimamba(cfg, fused, device)
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
        model = bimamba(cfg, fused, device).to(dtype)
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
    p.add_argument("--inference-only", action="store_true",
                   help="only the kernels of forwards without autograd (bench/inference_checks.py): no backward "
                        "kernels to autotune, about a minute")
    p.add_argument("--mixer-cases", nargs="+", choices=sorted(MIXER_CASES), default=sorted(MIXER_CASES))
    p.add_argument("--pieces-only", action="store_true",
                   help="only the model-level checks (every kernel once, a whole model): minutes less than the "
                        "mixer matrix, whose Triton autotuning takes about 40 s a row")
    p.add_argument("--model-checks", nargs="+", choices=list(MODEL_CHECK_GROUPS), default=list(MODEL_CHECK_GROUPS),
                   help="the groups of model-level checks to run (all by default); on a fresh machine all of them "
                        "take over 8 minutes, most of it Triton autotuning mamba_ssm's backward kernels")
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
    if args.inference_only:
        all_pass = report_checks(inference_checks(device, torch.Generator().manual_seed(3)), lines)
        args.skip_bench = True
    elif args.mixer_function_only:
        all_pass = report_checks(mixer_function_checks(device, torch.Generator().manual_seed(2), args.mixer_cases),
                                 lines)
        args.skip_bench = True
    else:
        all_pass = True if args.pieces_only else run_validation(args, device, lines)
        all_pass &= run_model_checks(device, lines, args.model_checks)
    if not args.skip_bench:
        run_timing(args, device, lines)
    lines.append(f"**{'PASS' if all_pass else 'FAIL'}**")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{'PASS' if all_pass else 'FAIL'}; table written to {args.out}")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
