"""The norm backward kernels at the training shapes: mamba_ssm's launch against model/norm_backward.py's.

Two kernels, as the 1.3B presets run them per micro-batch of `rows` tokens:
    add_norm  the blocks' residual add + RMSNorm, d_model columns: fp32 stream and upstream stream gradient,
              bf16 output gradient, bf16 input gradient and fp32 stream gradient written;
    gated     the mixers' RMSNorm(y * silu(z)), d_inner columns, bf16, output recomputed (as the fused
              mixer's backward asks).
Each launch setting (programs per SM; warps for the gated norm) is timed, with the bytes it must move as
GB/s, and its results compared with mamba_ssm's launch (the weight gradient's partial sums are grouped
differently, so it may differ in the last bits).

    python -m bench.norm_backward --out bench_results      # norm_backward.md / .json / .png (needs a GPU)
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common
from model import kernels, norm_backward

ADD_NORM_SETTINGS = [(1, None), (2, None), (4, None), (8, None)]              # (programs per SM, warps)
GATED_SETTINGS = [(1, 8), (2, 8), (1, 16), (2, 16), (4, 16)]


def add_norm_case(rows: int, d: int, device, gen) -> tuple[tuple, dict, int]:
    """(args, kwargs, bytes moved) of one add_norm backward at the training dtypes."""
    x = torch.randn(rows, d, generator=gen).to(device)
    dy = torch.randn(rows, d, generator=gen).to(device, torch.bfloat16)
    dres = torch.randn(rows, d, generator=gen).to(device)
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(device)
    rstd = torch.rsqrt(x.square().mean(-1) + 1e-5)
    moved = rows * d * (4 + 2 + 4 + 2 + 4)       # read x, dy, dresidual; write dx (bf16), dresidual_in (fp32)
    return ((dy, x, w, None, 1e-5, None, rstd, dres),
            {"has_residual": True, "is_rms_norm": True, "x_dtype": torch.bfloat16}, moved)


def gated_case(rows: int, d: int, device, gen) -> tuple[tuple, dict, int]:
    x, z, dy = (torch.randn(rows, d, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(device)
    rstd = torch.rsqrt((x.float() * F.silu(z.float())).square().mean(-1) + 1e-5)
    moved = rows * d * 2 * 6                      # read x, z, dy; write dx, dz, the recomputed output
    return ((dy, x, w, None, 1e-5, None, rstd),
            {"z": z, "group_size": d, "norm_before_gate": False, "is_rms_norm": True, "recompute_output": True},
            moved)


def calls(fn, args, kwargs, n: int) -> None:
    for _ in range(n):
        fn(*args, **kwargs)


def max_rel_diff(got, want) -> float:
    """Largest ||a - b|| / ||b|| over the tensors two launches return."""
    return max((common.rel_err(a.double(), b.double()) for a, b in zip(got, want) if isinstance(a, torch.Tensor)),
               default=0.0)


def setting(kind: str, per_sm: int, warps: int | None):
    """Set model/norm_backward's launch constants for `kind`; returns the previous values."""
    names = (("ADD_NORM_PROGRAMS_PER_SM",) if kind == "add_norm"
             else ("GATED_NORM_PROGRAMS_PER_SM", "GATED_NORM_WARPS"))
    old = tuple(getattr(norm_backward, n) for n in names)
    for n, v in zip(names, (per_sm, warps)):
        setattr(norm_backward, n, v)
    return names, old


def measure(rows_list: list[int], d_model: int, d_inner: int, device, iters: int) -> list[dict]:
    modules = [kernels.import_skipping_package_init(f"mamba_ssm.ops.triton.{m}")
               for m in ("layer_norm", "layernorm_gated")]
    gen = torch.Generator().manual_seed(0)
    out = []
    for kind, module, make, d, settings in (("add_norm", modules[0], add_norm_case, d_model, ADD_NORM_SETTINGS),
                                             ("gated", modules[1], gated_case, d_inner, GATED_SETTINGS)):
        ours = module._layer_norm_bwd
        for rows in rows_list:
            args, kwargs, moved = make(rows, d, device, gen)
            want = ours.original(*args, **kwargs)
            launches = [("mamba_ssm", None, None, ours.original)] + [("ours", s, w, ours) for s, w in settings]
            for who, per_sm, warps, fn in launches:
                names, old = setting(kind, per_sm, warps) if who == "ours" else ((), ())
                try:
                    got = fn(*args, **kwargs)
                    # back-to-back windows of `iters` calls, as a backward pass runs them
                    sec = common.median(common.time_calls(functools.partial(calls, fn, args, kwargs, iters),
                                                          device, 1, 5)) / iters
                finally:
                    for n, v in zip(names, old):
                        setattr(norm_backward, n, v)
                out.append({"kernel": kind, "rows": rows, "cols": d, "launch": who,
                            "programs_per_sm": per_sm, "warps": warps, "ms": sec * 1e3,
                            "gb_per_s": moved / sec / 1e9, "rel_diff": max_rel_diff(got, want)})
    return out


def markdown(rows: list[dict], head: dict) -> str:
    lines = [f"## Norm backward launches — {head['card']}", ""] + [f"- {ln}" for ln in common.header_lines(head)]
    lines += ["", "| kernel | rows x cols | launch | programs per SM | warps | ms | GB/s | vs mamba_ssm | rel. diff |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {(r["kernel"], r["rows"]): r["ms"] for r in rows if r["launch"] == "mamba_ssm"}
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['rows']:,} x {r['cols']:,} | {r['launch']} | "
                     f"{common.fmt(r['programs_per_sm'], 'd')} | {common.fmt(r['warps'], 'd')} | {r['ms']:.3f} | "
                     f"{r['gb_per_s']:,.0f} | {base[r['kernel'], r['rows']] / r['ms']:.2f}x | {r['rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], head: dict, path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [f"{r['kernel']} {r['rows'] // 1024}K {r['launch']}"
              + (f" {r['programs_per_sm']}/SM" + (f" {r['warps']}w" if r["warps"] else "") if r["launch"] == "ours"
                 else "") for r in rows]
    ax.bar(range(len(rows)), [r["gb_per_s"] for r in rows],
           color=["C1" if r["launch"] == "mamba_ssm" else "C0" for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=75, fontsize=7)
    ax.set_ylabel("GB/s moved")
    common.save_figure(fig, head, "norm backward launches", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.norm_backward", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16384, 32768], help="tokens per micro-batch")
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--d-inner", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=30, help="calls per timed window (5 windows)")
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    args = ap.parse_args(argv)
    if not (torch.cuda.is_available() and kernels.HAS_MAMBA_TRITON):
        print("bench.norm_backward needs a GPU and mamba_ssm's Triton kernels "
              f"({kernels.IMPORT_ERRORS.get('mamba_ssm', 'no GPU')})")
        return 2
    if "norm_backward" in kernels.IMPORT_ERRORS:
        print(f"model/norm_backward.py is not installed: {kernels.IMPORT_ERRORS['norm_backward']}")
        return 2
    device = torch.device("cuda")
    rows = measure(args.rows, args.d_model, args.d_inner, device, args.iters)
    head = common.header(device, "bench.norm_backward")
    common.save_and_print(args.out, "norm_backward", head, rows, markdown(rows, head), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
