"""Analytic model FLOPs per token, for MFU (see docs/training.md for the derivation).

A matmul (m x k) @ (k x n) counts 2*m*k*n FLOPs; element-wise work (norms, activations, gates, rotary,
softmax, the SSM's exponentials) is left out, as in the PaLM / Megatron MFU convention. Training costs
3x the forward pass (backward = 2x forward); activation recomputation is not counted (MFU, not HFU).
"""
from __future__ import annotations

from model.config import ModelConfig


def mlp_flops(cfg: ModelConfig) -> float:
    d, h = cfg.d_model, cfg.mlp_hidden
    return 2 * d * (2 * h if cfg.mlp_kind == "swiglu" else h) + 2 * h * d


def attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Non-causal attention: every query attends to all seq_len keys."""
    d = cfg.d_model
    proj = 2 * d * 3 * d + 2 * d * d          # fused QKV + output projection
    scores = 2 * seq_len * d                  # q . k for all keys, summed over heads
    mix = 2 * seq_len * d                     # softmax(QK^T) @ V
    return proj + scores + mix


def mamba2_direction_flops(cfg: ModelConfig, seq_len: int) -> float:
    """One Mamba-2 scan direction: in_proj -> depthwise conv -> chunked SSD -> out_proj."""
    m = cfg.mamba
    d, di, n, g = cfg.d_model, cfg.d_inner, m.d_state, m.ngroups
    nheads = cfg.mamba_nheads
    q = min(m.chunk_size, seq_len)            # chunk length actually used
    in_proj = 2 * d * (2 * di + 2 * g * n + nheads)   # z, x, B, C, dt
    conv = 2 * m.d_conv * (di + 2 * g * n)            # depthwise over x, B, C
    ssd = (2 * q * n * g                      # intra-chunk C B^T (per group)
           + 2 * q * di                       # intra-chunk (C B^T * L) @ x over all heads
           + 2 * n * di                       # chunk states B^T x
           + 2 * n * di)                      # inter-chunk output C @ state
    out_proj = 2 * di * d
    return in_proj + conv + ssd + out_proj


def block_flops(kind: str, cfg: ModelConfig, seq_len: int) -> float:
    if kind == "M":
        mixer = 2 * mamba2_direction_flops(cfg, seq_len)   # forward scan + scan of the reversed sequence
    elif kind == "A":
        mixer = attention_flops(cfg, seq_len)
    else:
        raise ValueError(f"unknown block kind {kind!r}")
    return mixer + mlp_flops(cfg)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    blocks = sum(block_flops(kind, cfg, seq_len) for kind in cfg.layer_pattern)
    head = 2 * cfg.d_model * cfg.vocab_size   # the embedding lookup itself is free
    return blocks + head


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(cfg, seq_len)


# dense bf16 peak FLOP/s per device (no sparsity), matched against torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "V100": 125e12,
}


def peak_flops(device_name: str | None) -> float | None:
    """Peak bf16 FLOP/s for a known GPU name, None when unknown (e.g. CPU)."""
    if not device_name:
        return None
    for key, value in PEAK_BF16_FLOPS.items():  # more specific names come first
        if key in device_name:
            return value
    return None
