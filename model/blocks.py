"""Block = pre-norm mixer and MLP, each with a residual connection, written on the pair
(hidden, residual) as mamba_ssm's Block does:

    residual = residual + hidden          hidden: the previous block's MLP output (block 0: the embedding)
    hidden   = mixer(norm(residual))
    residual = residual + hidden
    hidden   = mlp(norm(residual))        -> (hidden, residual)

This is x + mixer(norm(x)), then + mlp(norm(.)), with each residual add moved into the following norm:
AddNorm does both in one pass (one fused kernel on a GPU, kernels.add_norm), keeps the residual stream
in fp32 and hands the next matmul its input already in the compute dtype. The head's norm adds the last
block's output.

A mixer with a `forward_add_norm(h, residual, norm)` computes norm(mixer(h), residual) itself, so that
it may fold its own last step into the norm's pass (BiMamba2 does without autograd).

The mixer is chosen by the block's letter in the layer pattern: "M" a bidirectional Mamba-2 mixer,
"A" bidirectional attention. Everything else is shared, so the families differ only in their pattern.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import kernels
from model.config import ModelConfig


class AddNorm(nn.Module):
    """(norm(residual + hidden), residual + hidden); RMSNorm (x / sqrt(mean(x^2) + eps) * weight) or
    LayerNorm, computed in fp32. The normalised output has hidden's dtype, the new residual is fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, kind: str = "rmsnorm"):
        super().__init__()
        self.eps, self.is_rms_norm = eps, kind == "rmsnorm"
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if self.is_rms_norm else nn.Parameter(torch.zeros(dim))

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.add_norm(hidden, residual, self.weight, self.bias, self.eps, self.is_rms_norm)


def make_norm(cfg: ModelConfig) -> AddNorm:
    return AddNorm(cfg.d_model, cfg.norm_eps, cfg.norm)


class MLP(nn.Module):
    """GELU MLP (d -> h -> d) or SwiGLU (silu(x W1) * x W3) W2, hidden h = mlp_ratio * d."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp_kind == "swiglu"
        hidden = cfg.mlp_hidden
        self.fc_in = nn.Linear(cfg.d_model, (2 if self.gated else 1) * hidden, bias=False)
        self.fc_out = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.fc_out(kernels.swiglu(self.fc_in(x)))
        if kernels.linear_gelu_usable(x):     # inference: the GELU in the matmul's epilogue
            return self.fc_out(kernels.linear_gelu(x, self.fc_in.weight))
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


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

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None):
        """(hidden, residual) -> (hidden, residual); see the module docstring."""
        h, residual = self.mixer_norm(hidden, residual)
        if hasattr(self.mixer, "forward_add_norm"):   # a mixer that may fuse its last step into the norm
            h, residual = self.mixer.forward_add_norm(h, residual, self.mlp_norm)
        else:
            h, residual = self.mlp_norm(self.mixer(h), residual)
        return self.mlp(h), residual
