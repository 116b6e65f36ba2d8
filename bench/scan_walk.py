"""The whole scan of one direction in one kernel (model/chunk_walk_kernel.py) against the kernels a forward
without autograd runs now: mamba_ssm's cumulative decay and C B^T, model/state_pass_kernel.py's states
entering each chunk, model/chunk_scan_kernel.py's gated output.

One direction of a 1.3B mixer layer (64 heads x 64, state 128, bf16 by default), from the same random x, dt
(before softplus), B, C, z as the mixer hands them over. Each shape is timed with the three kernels ("now")
and with the walk under its default config for the shape and each config asked for; each result, times its
norm row scale, is compared with the three kernels'. The default config is the model's, which counts both
directions' programs (BiMamba2 runs them side by side): one direction alone leaves half the card idle at
batch 1, so these rows time the kernel, not the forward (bench.inference does). Where the walk's asynchronous
form (model/chunk_walk_async.py: sm_90, at most 32 channels a program, whole chunks) takes a config, it is timed
too ("walk, asynchronous"). Float64 rows per dtype check them against model.ssd.ssd_chunked, gated and normed in
float64, on short sequences. The calls of a row are queued back to back, so its time is the GPU's, without the
host's launch (at 4K a call is short enough for the host to set it: docs/benchmarks.md, thirtieth run).

    python -m bench.scan_walk --out bench_results           # scan_walk.md / .json / .png (needs a GPU)
    python -m bench.scan_walk --shapes 1x32768 --extra-configs 64:16:4:3 --out x
                                                            # also other launch configs,
                                                            # CHUNK:BLOCK_P:warps:stages
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench import scan_output
from bench.scan_output import gate_inputs, kernel_bench_main, rel_max, scan_inputs, timed_or_refused
from model import kernels, mixer_function, ssd

SHAPES = ["1x32768", "2x32768", "8x2048"]   # batch x L: one direction at 32K, both directions' programs, a batch
EPS = 1e-5


def row_scaled(gated, sumsq, weight):
    """A gated output times its norm's row scale: the mixer's normed output (b * l, h * p)."""
    scale = torch.rsqrt(sumsq.sum(dim=-1, keepdim=True) / weight.numel() + EPS)
    return (gated.flatten(2).float() * scale).flatten(0, 1)


def three_kernels(launchers, raw, z, weight):
    """What a forward without autograd runs now: (gated, sums of squares)."""
    from model.chunk_scan_kernel import chunk_scan_gated_out
    x, dt, A, B, C, D, dt_bias = raw
    CB, dt_soft, dA_cumsum, states = mixer_function.output_inputs(launchers, x, dt, A, B, C, dt_bias, 256)
    return chunk_scan_gated_out(CB, x, dt_soft, dA_cumsum, C, states, D, z, weight)


def walk(launchers, raw, z, weight, config=None, asynchronous=False):
    from model.chunk_walk_kernel import chunk_walk_gated
    x, dt, A, B, C, D, dt_bias = raw
    return chunk_walk_gated(launchers, x, dt, dt_bias, A, B, C, D, z, weight, config=config,
                            asynchronous=asynchronous)


def asynchronous_form(raw, z, config) -> bool:
    """Whether the walk's asynchronous form (model/chunk_walk_async.py) takes these inputs and config."""
    from model import chunk_walk_async
    return chunk_walk_async.usable(raw[0], raw[3], raw[4], z, config)


def float64_normed(raw, z, weight):
    x, dt, A, B, C, D, dt_bias = (t.double() for t in raw)
    y = ssd.ssd_chunked(x, dt, A, B, C, 256, D=D, dt_bias=dt_bias, dt_softplus=True)
    g = (y * F.silu(z.double())).flatten(2)
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()).flatten(0, 1)


def config_name(config: dict) -> str:
    return f"chunk {config['CHUNK']}, P block {config['BLOCK_P']}, {config['num_warps']}w {config['num_stages']}s"


def parse_config(text: str) -> dict:
    from model.chunk_walk_kernel import parse_config as kernel_parse_config
    try:
        return kernel_parse_config(text)
    except ValueError as e:
        raise SystemExit(f"--extra-configs: {e}") from None


def measure(shapes, dtype, device, iters, extra_configs=()) -> list[dict]:
    from model import state_pass_kernel
    from model.chunk_walk_kernel import default_config
    launchers = mixer_function.with_fused_chunk_states(
        kernels.import_skipping_package_init("mamba_ssm.ops.triton.ssd_combined"),
        state_pass_kernel.states_entering_chunks)
    rows = []
    for seed, (batch, seqlen) in enumerate([(1, 4096), (2, 1000)]):          # accuracy, float64 reference
        raw = scan_inputs(batch, seqlen, dtype, device, seed)
        z, weight = gate_inputs(raw[0], device, 30 + seed)
        exact = float64_normed(raw, z, weight)
        forms = [("now", three_kernels(launchers, raw, z, weight)), ("walk", walk(launchers, raw, z, weight))]
        if asynchronous_form(raw, z, default_config(batch, 64, 64)):
            forms.append(("walk, asynchronous", walk(launchers, raw, z, weight, asynchronous=True)))
        for who, (gated, sumsq) in forms:
            rows.append({"shape": f"{batch}x{seqlen}", "launch": who, "config": "float64 check", "ms": None,
                         "rel_diff": rel_max(row_scaled(gated, sumsq, weight), exact)})
    configs = [(f"{config_name(c)} (asked for)", c) for c in extra_configs]
    for seed, (batch, seqlen) in enumerate(shapes):
        shape = f"{batch}x{seqlen}"
        raw = scan_inputs(batch, seqlen, dtype, device, 10 + seed)
        z, weight = gate_inputs(raw[0], device, 20 + seed)
        now = functools.partial(three_kernels, launchers, raw, z, weight)
        want = row_scaled(*now(), weight)
        rows.append(timed_or_refused(shape, "now", "", now, want, iters, device,
                                     check=lambda now=now, weight=weight: row_scaled(*now(), weight)))
        for name, config in [(f"{config_name(default_config(batch, 64, 64))} (default)", None)] + configs:
            for form in (False, True) if asynchronous_form(raw, z, config or default_config(batch, 64, 64)) else (False,):
                fn = functools.partial(walk, launchers, raw, z, weight, config, form)
                rows.append(timed_or_refused(shape, "walk, asynchronous" if form else "walk", name, fn, want, iters,
                                             device, check=lambda fn=fn, weight=weight: row_scaled(*fn(), weight)))
    return rows


def markdown(rows: list[dict], head: dict) -> str:
    return scan_output.markdown(rows, head, "The scan in one kernel",
                                "after the norm's row scale, the three kernels' result", baseline="now")


def plot(rows: list[dict], head: dict, path) -> None:
    scan_output.plot(rows, head, path, what="scan in one kernel", baseline="now")


def main(argv: list[str] | None = None) -> int:
    def add_args(ap):
        ap.add_argument("--extra-configs", nargs="+", type=parse_config, default=[],
                        help="more launch configs to time, CHUNK:BLOCK_P:warps:stages (e.g. 64:16:4:3)")
    return kernel_bench_main("scan_walk", __doc__, argv,
                             lambda args, shapes, dtype, device: measure(shapes, dtype, device, args.iters,
                                                                         args.extra_configs),
                             markdown, plot, add_args, SHAPES)


if __name__ == "__main__":
    raise SystemExit(main())
