import pytest
import torch

from model.lm import DiffusionLM, count_parameters
from model.presets import PRESETS, get_preset, nominal_size


def _independent_count(cfg) -> int:
    """Parameter count from the architecture's formulas (Mamba-2 as in mamba_ssm, bias-free linears)."""
    D, V = cfg.d_model, cfg.vocab_size
    m = cfg.mamba
    di, H, GN = cfg.d_inner, cfg.mamba_nheads, m.ngroups * m.d_state
    mamba_layer = D * (2 * di + 2 * GN + H) + (di + 2 * GN) * (m.d_conv + 1) + 3 * H + di + di * D
    mixer = {"M": 2 * mamba_layer, "A": 4 * D * D}
    mlp = (3 if cfg.mlp_kind == "swiglu" else 2) * D * cfg.mlp_hidden
    blocks = sum(mixer[k] + mlp + 2 * D for k in cfg.layer_pattern)
    return blocks + V * D * (1 if cfg.tie_embeddings else 2) + D


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("tiny")])
def test_named_sizes_within_5_percent(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    n = count_parameters(model)
    assert n == _independent_count(cfg)
    assert abs(n / nominal_size(name) - 1) <= 0.05, f"{name}: {n / 1e6:.1f}M"
    assert count_parameters(model, include_embedding=False) == n - cfg.vocab_size * cfg.d_model


def test_get_preset_returns_a_copy():
    a = get_preset("tiny-diffumamba")
    a.mamba.d_state = 99
    assert get_preset("tiny-diffumamba").mamba.d_state != 99
