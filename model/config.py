"""ModelConfig: the one description of a model, and the named presets.

The stack is a layer pattern string, one letter a block:
    M  bidirectional Mamba-2 block (forward scan + scan of the reversed sequence, summed) + MLP
    A  bidirectional attention block (non-causal self-attention with rotary embeddings) + MLP
A pure "M" string is DiffuMamba, "MMMMA"*4 style strings are the hybrid DiffuMamba-H, and a pure "A"
string is the transformer baseline DiffuTran.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

BLOCK_KINDS = {"M": "bidirectional Mamba-2", "A": "bidirectional attention"}
NORMS = ("rmsnorm", "layernorm")
MLP_KINDS = ("gelu", "swiglu")
DIRECTION_MODES = ("independent", "tied_projections")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


def reject_unknown_fields(cls, d: dict, section: str) -> None:
    """Raise ConfigError naming the keys of `d` that are not fields of dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {unknown}; known: {sorted(known)}")


@dataclass
class MambaConfig:
    d_state: int = 128
    headdim: int = 64
    expand: int = 2
    d_conv: int = 4
    chunk_size: int = 256
    ngroups: int = 1
    dt_min: float = 0.001
    dt_max: float = 0.1
    # "independent": two Mamba-2 layers with their own weights (DiffuMamba);
    # "tied_projections": the two directions share in_proj / out_proj (as in Caduceus).
    directions: str = "independent"
    # Run both directions as one set of kernel launches (the same function and weights, model/mamba2.py).
    # true halves the mixer's launches, which pays only where the host cannot keep up with the GPU (small
    # micro-batches without CUDA graphs); under CUDA graphs its copies cost more: 240M trains 15-19% faster
    # with false, 0.5B 12-16% (docs/benchmarks.md). null means false.
    fuse_directions: bool | None = False
    # GPU: the fused mixer keeps the states entering the scan's chunks for its backward instead of
    # recomputing them (model/mixer_function.py): 2% faster at 1.3B, and 2.1 GB more at micro-batch 8 x 2048.
    keep_scan_states: bool = True


@dataclass
class ModelConfig:
    vocab_size: int = 512            # includes [MASK]
    mask_token_id: int = 511
    d_model: int = 128
    layer_pattern: str = "MMA"
    mlp_ratio: float = 2.0           # MLP hidden = mlp_ratio * d_model (paper: 2x in Mamba models)
    mlp_kind: str = "gelu"
    n_heads: int = 4                 # attention blocks only
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    mamba: MambaConfig = field(default_factory=MambaConfig)
    init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.mamba, dict):
            self.mamba = MambaConfig(**self.mamba)
        self.validate()

    # ---- validation: fail at construction, naming the field ----
    def validate(self) -> None:
        def need(ok: bool, fld: str, msg: str):
            if not ok:
                raise ConfigError(f"model.{fld}: {msg}")

        need(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        need(0 <= self.mask_token_id < self.vocab_size, "mask_token_id",
             f"must be in [0, vocab_size={self.vocab_size}), got {self.mask_token_id}")
        need(self.d_model > 0, "d_model", f"must be positive, got {self.d_model}")
        need(len(self.layer_pattern) > 0, "layer_pattern", "must name at least one block")
        bad = sorted(set(self.layer_pattern) - set(BLOCK_KINDS))
        need(not bad, "layer_pattern",
             f"unknown block letter(s) {bad} in {self.layer_pattern!r}; known: {dict(BLOCK_KINDS)}")
        need(self.mlp_ratio > 0, "mlp_ratio", f"must be positive, got {self.mlp_ratio}")
        need(self.mlp_kind in MLP_KINDS, "mlp_kind", f"must be one of {MLP_KINDS}, got {self.mlp_kind!r}")
        need(self.norm in NORMS, "norm", f"must be one of {NORMS}, got {self.norm!r}")
        if "A" in self.layer_pattern:
            need(self.n_heads > 0 and self.d_model % self.n_heads == 0, "n_heads",
                 f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
            need((self.d_model // self.n_heads) % 2 == 0, "n_heads",
                 f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for rotary")
        if "M" in self.layer_pattern:
            m = self.mamba
            need(m.expand > 0, "mamba.expand", f"must be positive, got {m.expand}")
            need(m.headdim > 0 and self.d_inner % m.headdim == 0, "mamba.headdim",
                 f"expand*d_model={self.d_inner} must be divisible by headdim={m.headdim}")
            need(m.d_state > 0, "mamba.d_state", f"must be positive, got {m.d_state}")
            need(m.d_conv >= 1, "mamba.d_conv", f"must be >= 1, got {m.d_conv}")
            need(m.chunk_size > 0, "mamba.chunk_size", f"must be positive, got {m.chunk_size}")
            need(m.ngroups > 0 and self.mamba_nheads % m.ngroups == 0, "mamba.ngroups",
                 f"mamba heads={self.mamba_nheads} must be divisible by ngroups={m.ngroups}")
            need(m.directions in DIRECTION_MODES, "mamba.directions",
                 f"must be one of {DIRECTION_MODES}, got {m.directions!r}")
            need(0 < m.dt_min <= m.dt_max, "mamba.dt_min", f"need 0 < dt_min <= dt_max, got {m.dt_min}, {m.dt_max}")
            need(m.fuse_directions in (None, True, False), "mamba.fuse_directions",
                 f"must be true, false or null, got {m.fuse_directions!r}")

    # ---- derived sizes ----
    @property
    def n_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def d_inner(self) -> int:
        return self.mamba.expand * self.d_model

    @property
    def mamba_nheads(self) -> int:
        return self.d_inner // self.mamba.headdim

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_ratio * self.d_model)

    @property
    def family(self) -> str:
        kinds = set(self.layer_pattern)
        if kinds == {"M"}:
            return "diffumamba"
        if kinds == {"A"}:
            return "diffutran"
        return "diffumamba-h"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        reject_unknown_fields(cls, d, "model")
        d = dict(d)
        if isinstance(d.get("mamba"), dict):
            reject_unknown_fields(MambaConfig, d["mamba"], "model.mamba")
            d["mamba"] = MambaConfig(**d["mamba"])
        return cls(**d)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
