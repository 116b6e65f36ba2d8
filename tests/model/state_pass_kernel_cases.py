"""Runs model/state_pass_kernel.py under Triton's interpreter (TRITON_INTERPRET=1, set by the caller before
Triton is imported) on CPU tensors and prints, as JSON, each case's largest error against the float64
stand-ins of mamba_ssm's `_chunk_state_fwd` then `_state_passing_fwd` (tests/model/ssd_emulation.py),
relative to the states' scale. float32 and float16 only: the interpreter's bfloat16 is wrong on CPU tensors."""
from __future__ import annotations

import functools
import json
import math

import torch
import torch.nn.functional as F
from einops import rearrange

from model.state_pass_kernel import states_entering_chunks
from tests.model import ssd_emulation

# name: (batch, length, heads, headdim, groups, d_state, chunk, dtype, out dtype, decay scale, (BLOCK_P, BLOCK_N))
CASES = {
    "fp32, 3 chunks and a part, 2 groups": (2, 200, 4, 16, 2, 16, 64, torch.float32, torch.float32, 1.0, (16, 16)),
    "fp32, several state tiles per head": (1, 192, 2, 32, 1, 32, 64, torch.float32, torch.float32, 1.0, (16, 16)),
    "fp16, headdim and state below the tile": (1, 150, 2, 24, 1, 12, 32, torch.float16, torch.float16, 1.0, (32, 16)),
    "fp16 in, fp32 out": (2, 128, 2, 16, 1, 16, 32, torch.float16, torch.float32, 1.0, (16, 16)),
    "fp32, one chunk: nothing passed": (1, 50, 2, 16, 1, 16, 64, torch.float32, torch.float32, 1.0, (16, 16)),
    "fp32, steep decay and zero steps": (1, 256, 2, 16, 1, 16, 64, torch.float32, torch.float32, 60.0, (16, 16)),
}


def inputs(b, l, h, p, g, n, q, dtype, decay, seed):
    gen = torch.Generator().manual_seed(seed)
    c = math.ceil(l / q)
    x = torch.randn(b, l, h, p, generator=gen).to(dtype)
    B = torch.randn(b, l, g, n, generator=gen).div(n ** 0.5).to(dtype)
    dt = F.softplus(torch.randn(b, h, c, q, generator=gen) - 1.0)
    dt[..., ::7] = 0.0                                                    # steps that add nothing
    A = -decay * (0.5 + torch.rand(h, generator=gen))
    return B, x, dt, (dt * A[None, :, None, None]).cumsum(dim=-1)


def float64_states(B, x, dt, dA_cumsum):
    """The stand-ins' chunk states passed along the chunks, on whole chunks (zeros after the last position)."""
    pad = (0, 0, 0, 0, 0, dt.shape[2] * dt.shape[3] - x.shape[1])
    local = ssd_emulation._chunk_state_fwd(F.pad(B, pad).double(), F.pad(x, pad).double(), dt.double(),
                                           dA_cumsum.double())
    entering, _ = ssd_emulation._state_passing_fwd(rearrange(local, "... p n -> ... (p n)"),
                                                   dA_cumsum.double()[:, :, :, -1])
    return rearrange(entering, "... (p n) -> ... p n", n=B.shape[-1])


def through_output_inputs(seed=11, b=2, l=100, h=4, p=16, g=2, n=16, q=32):
    """mixer_function.output_inputs with the kernel (with_fused_chunk_states) against the float64 stand-ins'
    two launchers: the states it hands the scan's output kernel, and that the other pieces are the same."""
    from model import mixer_function
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt_raw = torch.randn(b, l, h, generator=gen) - 1.0
    A, dt_bias = -(0.5 + torch.rand(h, generator=gen)), torch.randn(h, generator=gen) * 0.1
    B, C = (torch.randn(b, l, g, n, generator=gen).div(n ** 0.5) for _ in range(2))
    pad = (0, 0, 0, 0, 0, -l % q)
    args = [F.pad(x, pad), F.pad(dt_raw, (0, 0, 0, -l % q)), A, F.pad(B, pad), F.pad(C, pad), dt_bias, q]
    ssd = ssd_emulation.namespace()
    kernel = functools.partial(states_entering_chunks, config={"BLOCK_P": 16, "BLOCK_N": 16})  # no autotuner here
    got = mixer_function.output_inputs(mixer_function.with_fused_chunk_states(ssd, kernel), *args)
    want = mixer_function.output_inputs(ssd, *(a.double() if torch.is_tensor(a) else a for a in args))
    return {"dtype": "torch.float32", "out_dtype": str(got[3].dtype), "shape": list(got[3].shape),
            "want_shape": list(want[3].shape), "finite": bool(got[3].isfinite().all()),
            "first_is_zero": bool((got[3][:, 0] == 0).all()),
            "rel_err": ((got[3].double() - want[3]).abs().max() / want[3].abs().max()).item(),
            "other_pieces_rel_err": max(((a.double() - w).abs().max() / w.abs().max()).item()
                                        for a, w in zip(got[:3], want[:3]))}


def main() -> None:
    errors = {"mixer_function.output_inputs": through_output_inputs()}
    for seed, (name, case) in enumerate(CASES.items()):
        *shape, dtype, out_dtype, decay, (block_p, block_n) = case
        args = inputs(*shape, dtype, decay, seed=seed)
        got = states_entering_chunks(*args, out_dtype, config={"BLOCK_P": block_p, "BLOCK_N": block_n})
        want = float64_states(*args)
        errors[name] = {"dtype": str(dtype), "out_dtype": str(got.dtype), "shape": list(got.shape),
                        "want_shape": list(want.shape), "finite": bool(got.isfinite().all()),
                        "first_is_zero": bool((got[:, 0] == 0).all()),
                        "rel_err": ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()}
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
