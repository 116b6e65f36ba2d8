"""Bidirectional (non-causal) self-attention with rotary position embeddings.

flash-attn when it is importable and the input is on CUDA in half precision; otherwise PyTorch's
scaled_dot_product_attention, which itself dispatches to FlashAttention-2 kernels on Hopper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import kernels
from model.config import ModelConfig


def rotary_tables(seq_len: int, head_dim: int, theta: float, device, dtype=torch.float32):
    """cos/sin of shape (L, head_dim/2): position p, frequency theta^(-2i/head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = (first half, second half) of the head dim; x: (B, L, H, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rotate_queries_and_keys(q, k, cos, sin):
    """apply_rotary to q and k in fp32, returned in their dtype. On a GPU one compiled kernel each way
    (kernels.CompiledOnGPU), instead of about ten element-wise passes per tensor over (B, L, H, Dh)."""
    return apply_rotary(q.float(), cos, sin).to(q.dtype), apply_rotary(k.float(), cos, sin).to(k.dtype)


rotate = kernels.CompiledOnGPU("rotary", rotate_queries_and_keys)


class BidirectionalAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope_theta = cfg.rope_theta
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).unbind(dim=2)
        cos, sin = rotary_tables(L, self.head_dim, self.rope_theta, x.device, torch.float32)
        q, k = rotate(q, k, cos, sin)
        if kernels.flash_attn_usable(q) and q.dtype in (torch.float16, torch.bfloat16):  # bf16 under autocast too
            y = kernels.flash_attn_func(q, k, v, causal=False)      # (B, L, H, Dh)
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=False).transpose(1, 2)
        return self.out_proj(y.reshape(B, L, D))
