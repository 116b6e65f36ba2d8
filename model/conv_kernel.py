"""The Mamba-2 mixer's causal depthwise conv and its SiLU, without autograd, in one Triton kernel:

    out[t, c] = silu(bias[c] + sum_{k < W} weight[c, k] x[t - (W - 1) + k, c])      (x = 0 before the start)

over x (b, l, channels) laid out channel-last, as the in_proj output's xBC slice is. causal-conv1d's
channel-last forward reads that slice and writes its result at about 2.9 TB/s on an H200 (0.2 ms a call for
570 MB at 1.3B, 32K tokens; docs/benchmarks.md, twenty-ninth run). Here each program owns BLOCK_L steps x
BLOCK_C channels and reads its W shifted windows of x directly: the W - 1 rows they share come from the L1
and L2 caches, so memory sees each element of x about once.

In fp32 from the inputs' dtype, rounded once to x's dtype at the end, as causal-conv1d computes it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CONFIG = {"BLOCK_L": 32, "BLOCK_C": 128, "num_warps": 4}   # bench.conv_silu, H200


@triton.jit
def _conv_silu_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr,
    seqlen, channels,
    s_x_b, s_x_l, s_x_c, s_o_b, s_o_l, s_o_c,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_ptr += tl.program_id(2) * s_x_b
    out_ptr += tl.program_id(2) * s_o_b
    col_ok = cols < channels
    acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(WIDTH):
        src = rows - (WIDTH - 1 - k)                  # tap k reads W - 1 - k steps back
        ok = (src >= 0) & (src < seqlen)
        x = tl.load(x_ptr + src[:, None] * s_x_l + cols[None, :] * s_x_c, mask=ok[:, None] & col_ok[None, :],
                    other=0.0)
        w = tl.load(weight_ptr + cols * WIDTH + k, mask=col_ok, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    out = acc / (1.0 + tl.exp(-acc))                  # silu
    tl.store(out_ptr + rows[:, None] * s_o_l + cols[None, :] * s_o_c, out.to(out_ptr.dtype.element_ty),
             mask=(rows < seqlen)[:, None] & col_ok[None, :])


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       config: dict | None = None) -> torch.Tensor:
    """silu(causal depthwise conv) of x (b, l, channels), any strides (channel stride 1 reads fastest);
    weight (channels, width), bias (channels,) or None. Returns (b, l, channels), contiguous, in x's dtype."""
    batch, seqlen, channels = x.shape
    assert weight.dim() == 2 and weight.shape[0] == channels, "weight (channels, width)"
    assert bias is None or bias.shape == (channels,), "bias (channels,)"
    weight = weight.contiguous()
    config = config or CONFIG
    out = torch.empty(batch, seqlen, channels, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(seqlen, config["BLOCK_L"]), triton.cdiv(channels, config["BLOCK_C"]), batch)
    _conv_silu_kernel[grid](
        x, weight, weight if bias is None else bias, out, seqlen, channels, *x.stride(), *out.stride(),
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, BLOCK_L=config["BLOCK_L"], BLOCK_C=config["BLOCK_C"],
        num_warps=config["num_warps"],
    )
    return out


def causal_conv1d_fwd_function(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation):
    """causal-conv1d's `causal_conv1d_fwd_function` for the cases the mixer's forward without autograd uses:
    x (b, channels, l) a view of channel-last memory, no seq_idx or states, SiLU on. Returns (b, channels, l),
    a view of channel-last memory."""
    if seq_idx is not None or initial_states is not None or final_states_out is not None or not silu_activation:
        raise NotImplementedError("model/conv_kernel.py: only the conv and its SiLU, without states")
    return causal_conv1d_silu(x.transpose(1, 2), weight, bias).transpose(1, 2)
