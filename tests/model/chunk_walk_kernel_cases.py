"""Runs model/chunk_walk_kernel.py under Triton's interpreter (TRITON_INTERPRET=1, set by the caller before
Triton is imported) on CPU tensors and prints, as JSON, each case's largest error against the scan computed
step by step in float64 (model/ssd.py's ssd_sequential), gated, summed and weighted in float64.
float32 and float16 only: the interpreter's bfloat16 is wrong on CPU tensors."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from model.chunk_walk_kernel import chunk_walk_gated
from model.ssd import ssd_sequential
from tests.model import ssd_emulation

# name: (batch, length, heads, headdim, groups, d_state, dtype, with D, dt scale, (CHUNK, BLOCK_P))
CASES = {
    "fp32, whole chunks, two channel blocks": (1, 128, 2, 32, 1, 16, torch.float32, True, 1.0, (32, 16)),
    "fp32, a part chunk, 2 groups": (2, 100, 4, 16, 2, 16, torch.float32, True, 1.0, (32, 16)),
    "fp32, steep decay, large and zero steps": (1, 96, 2, 16, 1, 16, torch.float32, True, 25.0, (16, 16)),
    "fp16, headdim and state below the tile": (1, 70, 2, 24, 1, 12, torch.float16, True, 1.0, (32, 16)),
    "fp16, no D, one block a head": (2, 64, 2, 16, 1, 32, torch.float16, False, 1.0, (64, 16)),
}


def inputs(b, l, h, p, g, n, dtype, with_d, dt_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen).to(dtype)
    dt_raw = (torch.randn(b, l, h, generator=gen) * dt_scale - 1.0)
    dt_raw[:, ::7] = -60.0                                              # softplus ~ 0: steps that add nothing
    A = -(0.5 + torch.rand(h, generator=gen))
    dt_bias = torch.randn(h, generator=gen) * 0.1
    B, C = (torch.randn(b, l, g, n, generator=gen).div(n ** 0.5).to(dtype) for _ in range(2))
    D = torch.randn(h, generator=gen) if with_d else None
    z = torch.randn(b, l, h, p, generator=gen).to(dtype)
    norm_weight = 1.0 + 0.1 * torch.randn(h * p, generator=gen)
    return x, dt_raw.to(dtype), dt_bias, A, B, C, D, z, norm_weight


def float64_gated(x, dt_raw, dt_bias, A, B, C, D, z, norm_weight):
    """(g * weight, sum over each head's channels of g^2), g = scan(...) * silu(z), all in float64."""
    y = ssd_sequential(x.double(), dt_raw.double(), A.double(), B.double(), C.double(),
                       None if D is None else D.double(), dt_bias.double(), dt_softplus=True)
    g = y * F.silu(z.double())
    return g * norm_weight.double().view(x.shape[2], x.shape[3]), (g * g).sum(-1)


def main() -> None:
    errors = {}
    for seed, (name, case) in enumerate(CASES.items()):
        *shape, dtype, with_d, dt_scale, (chunk, block_p) = case
        args = inputs(*shape, dtype, with_d, dt_scale, seed=seed)
        config = {"CHUNK": chunk, "BLOCK_P": block_p, "num_warps": 4, "num_stages": 2}
        out, sumsq = chunk_walk_gated(ssd_emulation.namespace(), *args, config=config)
        want, want_sumsq = float64_gated(*args)
        b, l, h, _ = out.shape
        head_sums = sumsq.double().view(b, l, h, -1).sum(-1)
        errors[name] = {"dtype": str(out.dtype), "shape": list(out.shape), "sumsq_shape": list(sumsq.shape),
                        "sumsq_dtype": str(sumsq.dtype), "finite": bool(out.isfinite().all()),
                        "rel_err": ((out.double() - want).abs().max() / want.abs().max()).item(),
                        "sumsq_rel_err": ((head_sums - want_sumsq).abs().max() / want_sumsq.abs().max()).item()}
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
