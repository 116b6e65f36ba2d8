"""Analytic model FLOPs per token, for MFU (see docs/training.md for the derivation).

A matmul (m x k) @ (k x n) counts 2*m*k*n FLOPs; element-wise work (norms, activations, gates, rotary,
softmax, the SSM's exponentials) is left out, as in the PaLM / Megatron MFU convention. Training costs
3x the forward pass (backward = 2x forward); activation recomputation is not counted (MFU, not HFU).

The output head is counted at the positions where the computation needs logits (`head_fraction`): every
position for a plain forward pass (inference, sampling), but only the masked ones for training, since
under SUBS unmasked positions carry their token over with log p = 0 and the trainer runs the head on the
masked positions alone; their expected fraction is E[t] = (1 + eps) / 2 for t ~ U(eps, 1).
"""
from __future__ import annotations

from model.config import ModelConfig
from model.diffusion import DEFAULT_EPS

FULL_HEAD = 1.0   # head_fraction of a forward pass with logits at every position


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


def expected_masked_fraction(eps: float = DEFAULT_EPS) -> float:
    """E[t] for t ~ U(eps, 1): the expected fraction of real tokens that are [MASK] in a training batch,
    (1 + eps) / 2 (0.5005 at the default eps). Antithetic t over the global batch keeps each step's
    fraction at this mean on average (padding, never masked, lowers it per counted token)."""
    return (1.0 + eps) / 2.0


def head_flops(cfg: ModelConfig) -> float:
    """The output projection at one position (the embedding lookup itself is free)."""
    return 2 * cfg.d_model * cfg.vocab_size


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, head_fraction: float = FULL_HEAD) -> float:
    """Forward FLOPs per token; head_fraction: the fraction of positions the output head runs at,
    1.0 (default) = logits at every position (inference / sampling), expected_masked_fraction() for the
    training objective."""
    if not 0.0 <= head_fraction <= 1.0:
        raise ValueError(f"head_fraction must lie in [0, 1], got {head_fraction}")
    blocks = sum(block_flops(kind, cfg, seq_len) for kind in cfg.layer_pattern)
    return blocks + head_fraction * head_flops(cfg)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, head_fraction: float | None = None) -> float:
    """Training FLOPs per token = 3 x forward. head_fraction None (default) = expected_masked_fraction()
    at the default eps: the head at masked positions only, as the objective needs (pass
    expected_masked_fraction(eps) for another data.eps); FULL_HEAD = 1.0 counts the head everywhere."""
    if head_fraction is None:
        head_fraction = expected_masked_fraction()
    return 3 * forward_flops_per_token(cfg, seq_len, head_fraction)


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
