"""Block = norm -> mixer -> residual -> norm -> MLP -> residual (pre-norm).

The mixer is chosen by the block's letter in the layer pattern: "M" a bidirectional Mamba-2 mixer,
"A" bidirectional attention. Everything else is shared, so the families differ only in their pattern.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (one fused op where torch has a kernel for
        it, instead of six passes over the activations)."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class MLP(nn.Module):
    """GELU MLP (d -> h -> d) or SwiGLU (silu(x W1) * x W3) W2, hidden h = mlp_ratio * d."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp_kind == "swiglu"
        hidden = cfg.mlp_hidden
        self.fc_in = nn.Linear(cfg.d_model, (2 if self.gated else 1) * hidden, bias=False)
        self.fc_out = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc_out(h)


def make_mixer(kind: str, cfg: ModelConfig) -> nn.Module:
    if kind == "M":
        from model.mamba2 import BiMamba2
        return BiMamba2(cfg)
    if kind == "A":
        from model.attention import BidirectionalAttention
        return BidirectionalAttention(cfg)
    raise ValueError(f"unknown block kind {kind!r}")


class Block(nn.Module):
    def __init__(self, kind: str, cfg: ModelConfig):
        super().__init__()
        self.kind = kind
        self.mixer_norm = make_norm(cfg)
        self.mixer = make_mixer(kind, cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))
