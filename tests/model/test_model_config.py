import pytest

from model.config import ConfigError, MambaConfig, ModelConfig


@pytest.mark.parametrize("changes, field", [
    ({"layer_pattern": "MMX"}, "model.layer_pattern"),
    ({"layer_pattern": ""}, "model.layer_pattern"),
    ({"d_model": 100, "n_heads": 3, "layer_pattern": "A"}, "model.n_heads"),
    ({"d_model": 80, "mamba": MambaConfig(headdim=64)}, "model.mamba.headdim"),
    ({"mask_token_id": 512}, "model.mask_token_id"),
    ({"norm": "batchnorm"}, "model.norm"),
    ({"mlp_kind": "relu"}, "model.mlp_kind"),
    ({"mamba": MambaConfig(directions="both")}, "model.mamba.directions"),
    ({"mamba": MambaConfig(fuse_directions="yes")}, "model.mamba.fuse_directions"),
])
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig(**changes)


def test_headdim_constraint_only_applies_when_mamba_blocks_present():
    ModelConfig(d_model=80, layer_pattern="AA", n_heads=4, mamba=MambaConfig(headdim=64))


def test_round_trip_and_unknown_fields():
    cfg = ModelConfig(d_model=64, layer_pattern="MA", mamba=MambaConfig(headdim=16, d_state=8))
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "d_modle": 3})
    with pytest.raises(ConfigError, match=r"model\.mamba: unknown"):
        ModelConfig.from_dict({**cfg.to_dict(), "mamba": {"dstate": 3}})


def test_family_from_pattern():
    assert ModelConfig(layer_pattern="MMM").family == "diffumamba"
    assert ModelConfig(layer_pattern="AAA").family == "diffutran"
    assert ModelConfig(layer_pattern="MMMMA" * 2).family == "diffumamba-h"
