"""Runs model/chunk_scan_kernel.py under Triton's interpreter (TRITON_INTERPRET=1, set by the caller before
Triton is imported) on CPU tensors and prints, as JSON, each case's largest error against the float64
stand-in of mamba_ssm's `_chunk_scan_fwd` (tests/model/ssd_emulation.py) relative to the output's scale.
The interpreter's bfloat16 is wrong on torch's CPU tensors, so the cases are float32 and float16; a GPU
checks bfloat16 (bench/model_checks.py)."""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from model.chunk_scan_kernel import chunk_scan_gated_out, chunk_scan_out
from tests.model import ssd_emulation

# name: (batch, length, heads, headdim, groups, d_state, chunk, dtype, D per channel, decay scale,
#        (BLOCK_M, BLOCK_K[, HEADS]))
CASES = {
    "fp32, 3 chunks, 2 groups": (2, 192, 4, 16, 2, 16, 64, torch.float32, False, 1.0, (32, 16)),
    "fp32, a part chunk": (1, 133, 2, 16, 1, 32, 64, torch.float32, False, 1.0, (16, 16)),
    "fp32, one key block per row block": (1, 128, 2, 32, 1, 16, 64, torch.float32, False, 1.0, (32, 32)),
    "fp16, D per channel": (2, 160, 4, 16, 1, 16, 64, torch.float16, True, 1.0, (32, 16)),
    "fp32, steep decay and zero steps": (1, 128, 2, 16, 1, 16, 64, torch.float32, False, 60.0, (64, 16)),
    # two heads per program (config HEADS 2): each head's own decay, x, state, D and output
    "fp32, two heads per program, 2 groups, a part chunk": (2, 150, 4, 16, 2, 16, 64, torch.float32, False, 1.0,
                                                            (32, 16, 2)),
    "fp16, two heads per program, D per channel": (1, 128, 4, 16, 1, 16, 64, torch.float16, True, 1.0, (64, 32, 2)),
}
# the same with the gate, the norm's sums of squares and its weight (chunk_scan_gated_out)
GATED_CASES = {
    "gated, fp32, a part chunk, 2 groups": (2, 133, 4, 16, 2, 16, 64, torch.float32, False, 1.0, (32, 16)),
    "gated, fp16, D per channel, headdim below the block": (1, 160, 2, 24, 1, 16, 64, torch.float16, True, 1.0,
                                                            (32, 32)),
    "gated, fp32, two heads per program": (1, 133, 4, 16, 1, 16, 64, torch.float32, False, 1.0, (32, 16, 2)),
    "gated, fp16, whole chunks: no masks": (2, 128, 4, 16, 1, 32, 64, torch.float16, True, 1.0, (32, 16, 2)),
}


def inputs(b, l, h, p, g, n, q, dtype, d_per_channel, decay, seed):
    gen = torch.Generator().manual_seed(seed)
    c = math.ceil(l / q)
    x = torch.randn(b, l, h, p, generator=gen).to(dtype)
    B, C = (torch.randn(b, l, g, n, generator=gen).div(n ** 0.5).to(dtype) for _ in range(2))
    dt = F.softplus(torch.randn(b, h, c, q, generator=gen) - 1.0)
    dt[..., ::7] = 0.0                                                    # steps that add nothing
    A = -decay * (0.5 + torch.rand(h, generator=gen))
    dA_cumsum = (dt * A[None, :, None, None]).cumsum(dim=-1)
    pad = (0, 0, 0, 0, 0, c * q - l)
    cb = ssd_emulation._bmm_chunk_fwd(F.pad(C, pad).float(), F.pad(B, pad).float(), q)
    states = torch.randn(b, c, h, p, n, generator=gen).to(dtype)
    D = torch.randn(h, p, generator=gen) if d_per_channel else torch.randn(h, generator=gen)
    return cb, x, dt, dA_cumsum, C, states, D


def float64_output(cb, x, dt, dA_cumsum, C, states, D):
    """The stand-in on whole chunks (zeros after the last position, which no earlier row reads)."""
    l, q = x.shape[1], dt.shape[-1]
    pad = (0, 0, 0, 0, 0, dt.shape[2] * q - l)
    y, _ = ssd_emulation._chunk_scan_fwd(cb.double(), F.pad(x, pad).double(), dt.double(), dA_cumsum.double(),
                                         F.pad(C, pad).double(), states.double(), torch.zeros(x.shape[2]).double())
    skip = D.double() if D.dim() == 2 else D.double()[:, None]
    return y[:, :l] + x.double() * skip


def gate_inputs(x, seed):
    """z (the gate, shaped like x) and the norm's weight (heads * headdim,), fp32."""
    gen = torch.Generator().manual_seed(seed + 100)
    b, l, h, p = x.shape
    return 2 * torch.randn(b, l, h, p, generator=gen).to(x.dtype), 0.5 + torch.rand(h * p, generator=gen)


def launch_config(blocks):
    return dict(zip(("BLOCK_M", "BLOCK_K", "HEADS"), blocks))


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def main() -> None:
    errors = {}
    for seed, (name, case) in enumerate(CASES.items()):
        *shape, blocks = case
        args = inputs(*shape, seed=seed)
        got = chunk_scan_out(*args, config=launch_config(blocks))
        want = float64_output(*args)
        errors[name] = {"dtype": str(got.dtype), "shape": list(got.shape), "finite": bool(got.isfinite().all()),
                        "rel_err": rel_err(got, want)}
    for seed, (name, case) in enumerate(GATED_CASES.items()):
        *shape, blocks = case
        args = inputs(*shape, seed=seed)
        z, weight = gate_inputs(args[1], seed)
        got, sumsq = chunk_scan_gated_out(*args, z, weight, config=launch_config(blocks))
        gated = float64_output(*args) * F.silu(z.double())          # y * silu(z), y from the stand-in
        want = gated * weight.double().view(shape[2], shape[3])
        want_sumsq = gated.square().sum(dim=-1)
        errors[name] = {"dtype": str(got.dtype), "shape": list(got.shape), "finite": bool(got.isfinite().all()),
                        "rel_err": rel_err(got, want), "sumsq_shape": list(sumsq.shape),
                        "sumsq_dtype": str(sumsq.dtype), "sumsq_rel_err": rel_err(sumsq, want_sumsq)}
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
