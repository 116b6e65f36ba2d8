"""Named model sizes for each family: tiny (CPU tests), 240M, 0.5B and 1.3B.

A preset is just a named ModelConfig. Sizes count every parameter once, the (tied) token embedding of
the preset vocabulary included; the trainer replaces vocab_size / mask_token_id with the tokenizer's, which
moves the count by (vocab difference) x d_model. Mamba models use a 2x MLP (DiffuMamba paper); the
transformer baseline uses the usual 4x. Hybrids put one attention block after every four Mamba blocks.
"""
from __future__ import annotations

import copy

from model.config import MambaConfig, ModelConfig

PRESET_VOCAB = 32768
FAMILIES = ("diffumamba", "diffumamba-h", "diffutran")


def _cfg(d_model: int, pattern: str, *, n_heads: int, mlp_ratio: float, vocab: int = PRESET_VOCAB,
         mamba: MambaConfig | None = None) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, mask_token_id=vocab - 1, d_model=d_model, layer_pattern=pattern,
                       n_heads=n_heads, mlp_ratio=mlp_ratio, mamba=mamba or MambaConfig())


_TINY_MAMBA = MambaConfig(d_state=16, headdim=16, chunk_size=16)

PRESETS: dict[str, ModelConfig] = {
    # tiny: a few hundred thousand parameters, trains on a CPU in seconds
    "tiny-diffumamba": _cfg(64, "MMM", n_heads=4, mlp_ratio=2, vocab=512, mamba=_TINY_MAMBA),
    "tiny-diffumamba-h": _cfg(64, "MMA", n_heads=4, mlp_ratio=2, vocab=512, mamba=_TINY_MAMBA),
    "tiny-diffutran": _cfg(64, "AAA", n_heads=4, mlp_ratio=4, vocab=512),
    # 240M
    "240m-diffumamba": _cfg(1024, "M" * 12, n_heads=16, mlp_ratio=2),
    "240m-diffumamba-h": _cfg(1024, "MMMMA" * 2 + "MMA", n_heads=16, mlp_ratio=2),
    "240m-diffutran": _cfg(1024, "A" * 16, n_heads=16, mlp_ratio=4),
    # 0.5B
    "0.5b-diffumamba": _cfg(1536, "M" * 12, n_heads=12, mlp_ratio=2),
    "0.5b-diffumamba-h": _cfg(1536, "MMMMA" * 2 + "MMA", n_heads=12, mlp_ratio=2),
    "0.5b-diffutran": _cfg(1536, "A" * 16, n_heads=12, mlp_ratio=4),
    # 1.3B
    "1.3b-diffumamba": _cfg(2048, "M" * 18, n_heads=16, mlp_ratio=2),
    "1.3b-diffumamba-h": _cfg(2048, "MMMMA" * 4, n_heads=16, mlp_ratio=2),
    "1.3b-diffutran": _cfg(2048, "A" * 24, n_heads=16, mlp_ratio=4),
}

# the size each name promises, in parameters (tiny presets promise nothing)
NOMINAL_SIZE = {"240m": 240e6, "0.5b": 0.5e9, "1.3b": 1.3e9}


def get_preset(name: str) -> ModelConfig:
    from model.config import ConfigError
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])  # callers may change fields


def config_from_fields(fields: dict, vocab_size: int | None = None, mask_token_id: int | None = None) -> ModelConfig:
    """ModelConfig from a config's model section, {"preset": name, **field overrides} (mamba fields merge
    into the preset's); vocab_size / mask_token_id, when given, replace the preset's (the tokenizer's)."""
    d = dict(fields)
    preset = d.pop("preset", None)
    base = get_preset(preset).to_dict() if preset is not None else {}
    mamba = {**base.get("mamba", {}), **d.pop("mamba", {})}
    merged = {**base, **d}
    if vocab_size is not None:
        merged.update(vocab_size=vocab_size, mask_token_id=mask_token_id)
    if mamba:
        merged["mamba"] = mamba
    return ModelConfig.from_dict(merged)


def nominal_size(name: str) -> float | None:
    return NOMINAL_SIZE.get(name.split("-")[0])
