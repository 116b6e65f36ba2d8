"""The states entering each chunk of the scan: mamba_ssm's `_chunk_state_fwd` then `_state_passing_fwd`
against model/state_pass_kernel.py's one kernel.

One direction of a 1.3B mixer layer (64 heads x 64, state 128, chunk 256, bf16 by default), dt and its
cumulative sum made by mamba_ssm's own `_chunk_cumsum_fwd` from random inputs (bench.scan_output's). Each
shape is timed with mamba_ssm's two launchers, ours under the autotuner and ours under each of its configs,
and each result compared with mamba_ssm's. Float64 rows check both against the plain-torch formula
(`states_entering_chunks_reference`) on short sequences.

    python -m bench.state_pass --out bench_results      # state_pass.md / .json / .png (needs a GPU)
    python -m bench.state_pass --shapes 1x32768 --extra-configs 64x32:8:2 64x64:8:2 --out x
                                                        # also launch configs outside the autotune list
"""
from __future__ import annotations

import functools

import torch

from bench import scan_output
from bench.scan_output import as_launch_config, rel_max, scan_inputs, timed_or_refused, timed_row
from model import kernels, mixer_function

CHUNK = 256
CHECK_SHAPES = [(1, 4096), (2, 1000)]   # batch x L of the float64 rows: whole chunks, and a part chunk


def state_inputs(launchers, batch, seqlen, dtype, device, seed):
    """(B, x, dt, dA_cumsum) as the mixer hands them to the states' launchers."""
    x, dt_raw, A, B, _, _, dt_bias = scan_inputs(batch, seqlen, dtype, device, seed)
    dA_cumsum, dt = launchers._chunk_cumsum_fwd(dt_raw, A, CHUNK, dt_bias=dt_bias, dt_softplus=True,
                                                dt_limit=mixer_function.NO_DT_LIMIT)
    return B, x, dt, dA_cumsum


def config_name(config) -> str:
    """A config of the autotune list (a triton.Config) or one as the launcher takes it (a dict), e.g.
    "64x64, 4w 3s"."""
    if not isinstance(config, dict):
        config = as_launch_config(config)
    return f"{config['BLOCK_P']}x{config['BLOCK_N']}, {config['num_warps']}w {config['num_stages']}s"


def parse_config(text: str) -> dict:
    """--extra-configs' form, BLOCK_PxBLOCK_N:warps:stages (e.g. 64x32:8:2) -> the launcher's config."""
    try:
        blocks, warps, stages = text.split(":")
        block_p, block_n = (int(v) for v in blocks.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--extra-configs: {text!r} is not BLOCK_PxBLOCK_N:warps:stages, e.g. 64x32:8:2") from None
    return {"BLOCK_P": block_p, "BLOCK_N": block_n, "num_warps": int(warps), "num_stages": int(stages)}


def measure(shapes, dtype, device, iters, extra_configs=()) -> list[dict]:
    from model.state_pass_kernel import (
        _autotuned_kernel,
        states_entering_chunks,
        states_entering_chunks_reference,
    )
    launchers = kernels.import_skipping_package_init("mamba_ssm.ops.triton.ssd_combined")

    def mamba(B, x, dt, dA_cumsum):
        return mixer_function.states_entering_chunks(launchers, B, x, dt, dA_cumsum, CHUNK, dtype)

    rows = []
    for seed, (batch, seqlen) in enumerate(CHECK_SHAPES):                   # accuracy, float64 reference
        args = state_inputs(launchers, batch, seqlen, dtype, device, seed)
        exact = states_entering_chunks_reference(*(a.double() for a in args), torch.float64)
        for who, got in (("mamba_ssm", mamba(*args)), ("ours", states_entering_chunks(*args, dtype))):
            rows.append({"shape": f"{batch}x{seqlen}", "launch": who, "config": "float64 check", "ms": None,
                         "rel_diff": rel_max(got, exact)})
    configs = [("autotuned", None)] + [(config_name(c), c) for c in map(as_launch_config, _autotuned_kernel.configs)]
    configs += [(f"{config_name(c)} (not in the list)", c) for c in extra_configs]
    for seed, (batch, seqlen) in enumerate(shapes):
        shape = f"{batch}x{seqlen}"
        args = state_inputs(launchers, batch, seqlen, dtype, device, 10 + seed)
        want = mamba(*args)
        rows.append(timed_row(shape, "mamba_ssm", "chunk states, then passing", functools.partial(mamba, *args),
                              want, iters, device))
        first = len(rows)
        for name, config in configs:   # a config may be too big for the card (fp32 inputs)
            rows.append(timed_or_refused(shape, "ours", name, functools.partial(
                states_entering_chunks, *args, dtype, config=config), want, iters, device))
        rows[first]["config"] = f"autotuned ({config_name(_autotuned_kernel.best_config)})"
    return rows


# bench.scan_output's table and bars, with this bench's names
markdown = functools.partial(scan_output.markdown, title="The states entering the scan's chunks",
                             checked_against="mamba_ssm's states")
plot = functools.partial(scan_output.plot, what="states entering the chunks")


def main(argv: list[str] | None = None) -> int:
    def add_args(ap):
        ap.add_argument("--extra-configs", nargs="+", type=parse_config, default=[],
                        help="more launch configs to time, BLOCK_PxBLOCK_N:warps:stages (e.g. 64x32:8:2)")
    return scan_output.kernel_bench_main("state_pass", __doc__, argv,
                                         lambda args, shapes, dtype, device: measure(shapes, dtype, device, args.iters,
                                                                                     args.extra_configs),
                                         markdown, plot, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
