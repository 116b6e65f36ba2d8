"""Runs model/conv_kernel.py under Triton's interpreter (TRITON_INTERPRET=1, set by the caller before Triton is
imported) on CPU tensors and prints, as JSON, each case's largest error against F.conv1d in float64, left-padded
to be causal, then SiLU. float32 and float16 only: the interpreter's bfloat16 is wrong on CPU tensors."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from model.conv_kernel import causal_conv1d_fwd_function, causal_conv1d_silu

# name: (batch, length, channels, width, dtype, with bias, columns around the slice, (BLOCK_L, BLOCK_C))
CASES = {
    "fp32, a slice of wider rows, part blocks": (2, 45, 40, 4, torch.float32, True, (8, 5), (16, 32)),
    "fp32, contiguous, whole blocks, no bias": (1, 64, 64, 4, torch.float32, False, (0, 0), (16, 32)),
    "fp32, width 2, a single step": (3, 1, 24, 2, torch.float32, True, (3, 0), (16, 16)),
    "fp16, width 3, longer than a block": (1, 100, 48, 3, torch.float16, True, (16, 8), (32, 32)),
}


def float64_conv_silu(x, weight, bias):
    """(b, l, c) -> silu(causal depthwise conv), all in float64."""
    width = weight.shape[1]
    y = F.conv1d(F.pad(x.double().transpose(1, 2), (width - 1, 0)), weight.double().unsqueeze(1),
                 None if bias is None else bias.double(), groups=x.shape[2])
    return F.silu(y).transpose(1, 2)


def main() -> None:
    errors = {}
    for seed, (name, (b, l, c, width, dtype, with_bias, (before, after), (block_l, block_c))) in enumerate(CASES.items()):
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randn(b, l, before + c + after, generator=gen).to(dtype)
        x = rows[:, :, before:before + c]                       # strided, as xBC in the in_proj output
        weight = torch.randn(c, width, generator=gen).div(width ** 0.5).to(dtype)
        bias = torch.randn(c, generator=gen).to(dtype) if with_bias else None
        config = {"BLOCK_L": block_l, "BLOCK_C": block_c, "num_warps": 4}
        out = causal_conv1d_silu(x, weight, bias, config=config)
        want = float64_conv_silu(x, weight, bias)
        via_launcher = causal_conv1d_fwd_function(x.transpose(1, 2), weight, bias, None, None, None, True)
        errors[name] = {"dtype": str(out.dtype), "shape": list(out.shape), "contiguous": out.is_contiguous(),
                        "rel_err": ((out.double() - want).abs().max() / want.abs().max()).item(),
                        "launcher_shape": list(via_launcher.shape),
                        "launcher_rel_err": ((via_launcher.transpose(1, 2).double() - want).abs().max()
                                             / want.abs().max()).item()}
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
