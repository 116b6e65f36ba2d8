"""The mixer's causal depthwise conv and its SiLU without autograd: model/conv_kernel.py's Triton kernel
against causal-conv1d's channel-last forward, as the 1.3B mixer runs them.

x is the xBC slice of a random in_proj output (b, L, 8512: channels 4096-8447, width 4, bf16 weights and
bias): a channel-last tensor whose rows are 8512 apart. Each launch is timed over --iters calls queued back
to back (median), and reported with its bandwidth (bytes of x read once and of the output written, over
the time). Two float64 rows check both against F.conv1d on a short sequence; each timed row's difference
is from causal-conv1d's result.

    python -m bench.conv_silu --out bench_results              # conv_silu.md / .json / .png (needs a GPU)
    python -m bench.conv_silu --shapes 1x32768 --extra-configs 64:128:4 32:256:8 --out x
                                                               # also other configs, BLOCK_L:BLOCK_C:warps
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench import scan_output
from bench.scan_output import kernel_bench_main, rel_max, timed_row
from model import conv_kernel, kernels, mixer_function

SHAPES = ["1x4096", "1x32768", "8x2048"]
D_IN_PROJ, X_START, CHANNELS, WIDTH = 8512, 4096, 4352, 4   # 1.3B: [z 4096 | xBC 4352 | dt 64]


def conv_inputs(batch, seqlen, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    zxbcdt = torch.randn(batch, seqlen, D_IN_PROJ, generator=gen).to(device, dtype)
    weight = (torch.randn(CHANNELS, WIDTH, generator=gen) / WIDTH ** 0.5).to(device, dtype)
    bias = (0.1 * torch.randn(CHANNELS, generator=gen)).to(device, dtype)
    return zxbcdt[..., X_START:X_START + CHANNELS], weight, bias


def float64_conv_silu(x, weight, bias):
    y = F.conv1d(F.pad(x.double().transpose(1, 2), (WIDTH - 1, 0)), weight.double().unsqueeze(1), bias.double(),
                 groups=x.shape[2])
    return F.silu(y).transpose(1, 2)


def config_name(config: dict) -> str:
    return f"{config['BLOCK_L']}x{config['BLOCK_C']}, {config['num_warps']}w"


def parse_config(text: str) -> dict:
    try:
        block_l, block_c, warps = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"--extra-configs: {text!r} is not BLOCK_L:BLOCK_C:warps, e.g. 32:128:4") from None
    return {"BLOCK_L": block_l, "BLOCK_C": block_c, "num_warps": warps}


def measure(shapes, dtype, device, iters, extra_configs=()) -> list[dict]:
    launchers = kernels.import_skipping_package_init("mamba_ssm.ops.triton.ssd_combined")
    library = functools.partial(mixer_function.conv_silu, launchers)
    ours = functools.partial(mixer_function.conv_silu, launchers, conv_fwd=conv_kernel.causal_conv1d_fwd_function)
    rows = []
    x, weight, bias = conv_inputs(2, 1000, dtype, device, seed=0)      # accuracy, float64 reference
    exact = float64_conv_silu(x, weight, bias)
    for who, fn in (("causal-conv1d", library), ("ours", ours)):
        rows.append({"shape": "2x1000", "launch": who, "config": "float64 check", "ms": None,
                     "rel_diff": rel_max(fn(x, weight, bias), exact)})
    configs = [(f"{config_name(conv_kernel.CONFIG)} (default)", None)]
    configs += [(f"{config_name(c)} (asked for)", c) for c in extra_configs]
    for seed, (batch, seqlen) in enumerate(shapes):
        shape = f"{batch}x{seqlen}"
        x, weight, bias = conv_inputs(batch, seqlen, dtype, device, 10 + seed)
        moved = 2 * x.numel() * x.element_size()                         # x read once, the output written
        want = library(x, weight, bias)
        launches = [("causal-conv1d", "", functools.partial(library, x, weight, bias))]
        launches += [("ours", name, functools.partial(conv_kernel.causal_conv1d_silu, x, weight, bias, config))
                     for name, config in configs]
        for who, name, fn in launches:
            row = timed_row(shape, who, name, fn, want, iters, device)
            bandwidth = f"{moved / row['ms'] / 1e9:.2f} TB/s"
            row["config"] = f"{name}, {bandwidth}" if name else bandwidth
            rows.append(row)
    return rows


def markdown(rows: list[dict], head: dict) -> str:
    return scan_output.markdown(rows, head, "The conv and its SiLU", "causal-conv1d's result",
                                baseline="causal-conv1d")


def plot(rows: list[dict], head: dict, path) -> None:
    scan_output.plot(rows, head, path, what="conv and SiLU", baseline="causal-conv1d")


def main(argv: list[str] | None = None) -> int:
    def add_args(ap):
        ap.add_argument("--extra-configs", nargs="+", type=parse_config, default=[],
                        help="more launch configs to time, BLOCK_L:BLOCK_C:warps (e.g. 64:128:4)")
    return kernel_bench_main("conv_silu", __doc__, argv,
                             lambda args, shapes, dtype, device: measure(shapes, dtype, device, args.iters,
                                                                         args.extra_configs),
                             markdown, plot, add_args, SHAPES)


if __name__ == "__main__":
    raise SystemExit(main())
