"""The scan's output kernel: mamba_ssm's `_chunk_scan_fwd` against model/chunk_scan_kernel.py's.

One direction of a 1.3B mixer layer (64 heads x 64, state 128, chunk 256, bf16 by default), its inputs
(CB, dt, dA_cumsum, the states entering each chunk) made by mamba_ssm's own forward launchers from random
x, dt, B, C. Each shape is timed with mamba_ssm's kernel, ours under the autotuner and ours under each of
its configs, and each result compared with mamba_ssm's. A float64 row per dtype checks both against
model.ssd.ssd_chunked on a short sequence. More rows per shape time what a forward without autograd
runs in their place with the gated norm: mamba_ssm's kernel followed by mamba_ssm's gated RMSNorm kernel,
against `chunk_scan_gated_out` (the gate, the sums of squares and the norm weight in our kernel; its
result times the row scale compared with the norm's output) under the autotuner and each config. A row
"ours, CB in bf16" times our kernel on C B^T rounded to bf16 (half the bytes of the input every head
reads; with a float64 check row too).
The calls of a row are queued back to back, so its time is the GPU's, without the host's launch.

    python -m bench.scan_output --out bench_results      # scan_output.md / .json / .png (needs a GPU)
    python -m bench.scan_output --shapes 1x32768 --extra-configs 128x64:8:3 64x32:4:3:2 64x32:4:2:1:128 --out x
                                                         # also launch configs outside the autotune list
                                                         # (then heads per program, then the most registers
                                                         # per thread)
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from bench import common
from model import kernels, mixer_function, ssd

SHAPES = ["1x32768", "2x32768", "8x2048", "1x4096"]   # batch x L: inference, both directions, training


def scan_inputs(batch, seqlen, dtype, device, seed, heads=64, headdim=64, d_state=128):
    """(x, dt, A, B, C, D, dt_bias) as a 1.3B mixer hands them to the scan (dt before softplus)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    x, dt = randn(batch, seqlen, heads, headdim).to(dtype), randn(batch, seqlen, heads) - 2.0
    B, C = (randn(batch, seqlen, 1, d_state) / d_state ** 0.5).to(dtype), randn(batch, seqlen, 1, d_state).to(dtype)
    A = -torch.exp(torch.rand(heads, generator=gen) * 2.7).to(device)     # -1 .. -15, as A_log's initialisation
    return x, dt, A, B, C, randn(heads), (0.1 * torch.rand(heads, generator=gen)).to(device)


def output_inputs(launchers, x, dt, A, B, C, D, dt_bias, chunk_size=256):
    """The arguments of `_chunk_scan_fwd`, from the scan's own launchers as the mixer calls them:
    (CB, x, dt, dA_cumsum, C, states entering each chunk, D)."""
    CB, dt, dA_cumsum, states = mixer_function.output_inputs(launchers, x, dt, A, B, C, dt_bias, chunk_size)
    return CB, x, dt, dA_cumsum, C, states, D


def rel_max(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def with_bf16_cb(args):
    """The output kernel's arguments with C B^T in bf16 instead of fp32: half the bytes of its largest input,
    which every head of a chunk reads (a candidate for forwards without autograd; not used by the model)."""
    return (args[0].to(torch.bfloat16),) + tuple(args[1:])


def mamba_output(launchers, args):
    return launchers._chunk_scan_fwd(*args)[0]


def gate_inputs(x, device, seed, d_in_proj=8512):
    """z as the mixer hands it over, a view of its in_proj output (b, l, h, p), and the norm's weight."""
    gen = torch.Generator().manual_seed(seed)
    b, l, h, p = x.shape
    zxbcdt = torch.randn(b, l, d_in_proj, generator=gen).to(device, x.dtype)
    weight = (0.5 + torch.rand(h * p, generator=gen)).to(device)
    return zxbcdt[..., :h * p].unflatten(-1, (h, p)), weight


def mamba_gated_norm(launchers, norm_module, args, z, weight, eps=1e-5):
    """mamba_ssm's output kernel, then its gated RMSNorm kernel (one group), as the training path runs them."""
    y = mamba_output(launchers, args)
    return norm_module._layer_norm_fwd(y.flatten(0, 1).flatten(1), weight, None, eps, z=z.flatten(0, 1).flatten(1),
                                       group_size=weight.numel(), norm_before_gate=False, is_rms_norm=True)[0]


def ours_gated_norm(args, z, weight, config=None, eps=1e-5):
    """chunk_scan_gated_out's result (under `config`, None: the autotuner's) times its row scale: what
    mamba_gated_norm returns."""
    from model.chunk_scan_kernel import chunk_scan_gated_out
    gated, sumsq = chunk_scan_gated_out(*args, z, weight, config=config)
    scale = torch.rsqrt(sumsq.sum(dim=-1, keepdim=True) / weight.numel() + eps)
    return (gated.flatten(2) * scale).flatten(0, 1)


def config_name(config: dict) -> str:
    """A launch config as chunk_scan_out takes it, e.g. "64x32, 4w 3s", "64x32, 4w 3s, 2 heads" or
    "64x32, 4w 2s, <= 128 registers"."""
    heads = f", {config['HEADS']} heads" if config.get("HEADS", 1) > 1 else ""
    registers = f", <= {config['maxnreg']} registers" if config.get("maxnreg") else ""
    return f"{config['BLOCK_M']}x{config['BLOCK_K']}, {config['num_warps']}w {config['num_stages']}s{heads}{registers}"


def as_launch_config(config) -> dict:
    """A triton.Config of an autotune list as its launcher's `config` (chunk_scan_out's, states_entering_chunks')."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
            **({"maxnreg": config.maxnreg} if config.maxnreg else {})}


def parse_config(text: str) -> dict:
    """--extra-configs' form: model/chunk_scan_kernel.py's parse_config, refusals as a usage error."""
    from model.chunk_scan_kernel import parse_config as kernel_parse_config
    try:
        return kernel_parse_config(text)
    except ValueError as e:
        raise SystemExit(f"--extra-configs: {e}") from None


def timed_row(shape, launch, config, fn, want, iters, device, check=None) -> dict:
    """fn's median time over `iters` calls, and how far check() (fn() when None) is from `want`."""
    got = (check or fn)()
    ms = common.median(common.time_calls(fn, device, 3, iters, back_to_back=True)) * 1e3
    return {"shape": shape, "launch": launch, "config": config, "ms": ms, "rel_diff": rel_max(got, want)}


def timed_or_refused(shape, launch, config, fn, want, iters, device, check=None) -> dict:
    """timed_row, or a row without a time that names why a config cannot run on this card (too much shared
    memory or too many registers for it)."""
    from triton.runtime.errors import OutOfResources
    try:
        return timed_row(shape, launch, config, fn, want, iters, device, check)
    except OutOfResources as e:
        return {"shape": shape, "launch": launch, "config": f"{config}: {e}"[:120], "ms": None, "rel_diff": float("nan")}


def measure(shapes, dtype, device, iters, extra_configs=()) -> list[dict]:
    from model.chunk_scan_kernel import _autotuned_kernel, chunk_scan_gated_out, chunk_scan_out
    launchers = kernels.import_skipping_package_init("mamba_ssm.ops.triton.ssd_combined")
    norm_module = kernels.import_skipping_package_init("mamba_ssm.ops.triton.layernorm_gated")
    rows = []
    for seed, (batch, seqlen) in enumerate([(1, 4096), (2, 1000)]):          # accuracy, float64 reference
        raw = scan_inputs(batch, seqlen, dtype, device, seed)
        exact = ssd.ssd_chunked(*(t.double() for t in raw[:5]), 256, D=raw[5].double(), dt_bias=raw[6].double(),
                                dt_softplus=True)
        args = output_inputs(launchers, *raw)
        for who, got in (("mamba_ssm", mamba_output(launchers, args)), ("ours", chunk_scan_out(*args)),
                         ("ours, CB in bf16", chunk_scan_out(*with_bf16_cb(args)))):
            rows.append({"shape": f"{batch}x{seqlen}", "launch": who, "config": "float64 check", "ms": None,
                         "rel_diff": rel_max(got, exact)})
    configs = [("autotuned", None)] + [(config_name(c), c) for c in map(as_launch_config, _autotuned_kernel.configs)]
    configs += [(f"{config_name(c)} (not in the list)", c) for c in extra_configs]
    for seed, (batch, seqlen) in enumerate(shapes):
        shape = f"{batch}x{seqlen}"
        args = output_inputs(launchers, *scan_inputs(batch, seqlen, dtype, device, 10 + seed))
        launches = [("mamba_ssm", "", functools.partial(mamba_output, launchers, args))] + [
            ("ours", name, functools.partial(chunk_scan_out, *args, config=config)) for name, config in configs] + [
            ("ours, CB in bf16", "autotuned", functools.partial(chunk_scan_out, *with_bf16_cb(args)))]
        want = launches[0][2]()
        for who, name, fn in launches:
            rows.append(timed_or_refused(shape, who, name, fn, want, iters, device))
            if (who, name) == ("ours", "autotuned"):   # the pick for these inputs, before another call tunes
                rows[-1]["config"] = f"autotuned ({config_name(as_launch_config(_autotuned_kernel.best_config))})"
        z, weight = gate_inputs(args[1], device, 20 + seed)
        want = mamba_gated_norm(launchers, norm_module, args, z, weight)
        rows.append(timed_row(shape, "mamba_ssm + gated norm", "", functools.partial(
            mamba_gated_norm, launchers, norm_module, args, z, weight), want, iters, device))
        for name, config in configs:
            rows.append(timed_or_refused(shape, "ours, gated", name,
                                         functools.partial(chunk_scan_gated_out, *args, z, weight, config=config), want,
                                         iters, device, check=functools.partial(ours_gated_norm, args, z, weight, config)))
    return rows


def markdown(rows: list[dict], head: dict, title: str = "The scan's output kernel",
             checked_against: str = "mamba_ssm's output", baseline: str = "mamba_ssm") -> str:
    """The rows as a table, each time also as a speed-up over the `baseline` launch's row of its shape."""
    lines = [f"## {title} — {head['card']}", ""] + [f"- {ln}" for ln in common.header_lines(head)]
    lines += ["- rel. diff: largest difference over the largest value of what it is checked against: "
              + f"{checked_against}, float64 in the check rows", "",
              f"| batch x L | launch | config | ms | vs {baseline} | rel. diff |", "| --- | --- | --- | --- | --- | --- |"]
    base = {r["shape"]: r["ms"] for r in rows if r["launch"] == baseline and r["ms"]}
    for r in rows:
        ms, speed = (f"{r['ms']:.3f}", f"{base[r['shape']] / r['ms']:.2f}x") if r["ms"] else ("-", "-")
        lines.append(f"| {r['shape']} | {r['launch']} | {r['config']} | {ms} | {speed} | {r['rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], head: dict, path, what: str = "scan output kernel", baseline: str = "mamba_ssm") -> None:
    plt = common.pyplot()
    if plt is None:
        return
    timed = [r for r in rows if r["ms"]]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(timed)), [r["ms"] for r in timed],
           color=["C1" if r["launch"] == baseline else "C0" for r in timed])
    ax.set_xticks(range(len(timed)), [f"{r['shape']} {r['launch']} {r['config'].split(' (')[0]}" for r in timed],
                  rotation=75, fontsize=7)
    ax.set_ylabel("ms per call")
    common.save_figure(fig, head, what, path)


def kernel_bench_main(name: str, doc: str, argv, measure_rows, markdown, plot, add_args=None, shapes=SHAPES) -> int:
    """The command of a bench that times one direction's scan kernels at --shapes (this one and
    bench.state_pass): OUT/name.md / .json / .png, or exit status 2 without a GPU and mamba_ssm.
    measure_rows(args, shapes, dtype, device) -> rows; add_args(ap): the bench's own options."""
    ap = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=shapes, help="batch x L, e.g. 1x32768")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per row (the median is kept)")
    if add_args is not None:
        add_args(ap)
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    ap.add_argument("--plot-only", action="store_true", help=f"redraw OUT/{name}.png from its JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        return common.replot(args.out, name, plot)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    if not (torch.cuda.is_available() and kernels.HAS_MAMBA_TRITON):
        print(f"bench.{name} needs a GPU and mamba_ssm's Triton kernels "
              f"({kernels.IMPORT_ERRORS.get('mamba_ssm', 'no GPU')})")
        return 2
    device = torch.device("cuda")
    rows = measure_rows(args, shapes, torch.bfloat16 if args.dtype == "bf16" else torch.float32, device)
    head = common.header(device, f"bench.{name}", dtype=args.dtype)
    common.save_and_print(args.out, name, head, rows, markdown(rows, head), plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    def add_args(ap):
        ap.add_argument("--extra-configs", nargs="+", type=parse_config, default=[],
                        help="more launch configs to time, BLOCK_MxBLOCK_K:warps:stages[:heads per program"
                             "[:registers per thread]] (e.g. 128x64:8:3, 64x32:4:3:2, 64x32:4:2:1:128)")
    return kernel_bench_main("scan_output", __doc__, argv,
                             lambda args, shapes, dtype, device: measure(shapes, dtype, device, args.iters,
                                                                         args.extra_configs),
                             markdown, plot, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
