"""Run-config parsing and validation: every error names its field."""
import pytest

from dtrain.config import apply_overrides, from_dict, load_config
from dtrain.engine import check_batch
from model.config import ConfigError

BASE = {"run": {"out_dir": "runs/x"}, "model": {"preset": "tiny-diffumamba-h"},
        "data": {"path": "data/x", "seq_len": 32}, "train": {"micro_batch_size": 4, "grad_accum": 2}}


def cfg_with(*overrides):
    return from_dict(apply_overrides(BASE, list(overrides)))


def test_overrides_are_typed_and_applied():
    cfg = cfg_with("optim.lr=3e-4", "model.d_model=32", "train.steps=7", "parallel.zero_stage=2",
                   "model.mamba.d_state=8", "optim.betas=[0.9,0.99]")
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)   # YAML reads 3e-4 as a string
    assert cfg.train.steps == 7 and cfg.parallel.zero_stage == 2 and cfg.optim.betas == [0.9, 0.99]
    mc = cfg.model_config(vocab_size=300, mask_token_id=299)
    assert (mc.d_model, mc.vocab_size, mc.mask_token_id, mc.mamba.d_state) == (32, 300, 299, 8)
    assert mc.layer_pattern == "MMA"   # the preset's, untouched by the overrides


@pytest.mark.parametrize("override, field", [
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("train.steps=1.5", "train.steps"),
    ("train.global_batch_size=lots", "train.global_batch_size"),
    ("train.precision=fp8", "train.precision"),
    ("optim.bogus=1", "optim"),
    ("bogus.x=1", "bogus"),
    ("parallel.zero_stage=5", "parallel.zero_stage"),
    ("parallel.zero_stage=0", "parallel.zero_stage"),
    ("train.activation_checkpointing=maybe", "train.activation_checkpointing"),
    ("model.vocab_size=100", "model.vocab_size"),
    ("model.mask_token_id=3", "model.mask_token_id"),
    ("parallel.overlap_comm=sometimes", "parallel.overlap_comm"),
    ("parallel.contiguous_gradients=sometimes", "parallel.contiguous_gradients"),
    ("parallel.reduce_bucket_size=0", "parallel.reduce_bucket_size"),
    ("logging.profile_steps=0", "logging.profile_steps"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg_with(override)


def test_pipeline_refuses_zero_2_and_3():
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage"):
        cfg_with("parallel.pipeline_stages=2", "parallel.zero_stage=2")


def test_model_field_errors_come_from_model_config():
    with pytest.raises(ConfigError, match=r"model\.d_modle|unknown field"):
        cfg_with("model.d_modle=32").model_config(300, 299)
    with pytest.raises(ConfigError, match=r"model\.preset"):
        cfg_with("model.preset=huge").model_config(300, 299)


def test_data_fields_are_checked_by_the_data_config():
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        cfg_with("data.seq_len=1").data_config()
    with pytest.raises(ConfigError, match="data"):
        cfg_with("data.sequence_length=3").data_config()


def test_global_batch_mismatch():
    cfg = cfg_with("train.global_batch_size=16")
    assert check_batch(cfg, world_size=2) == 2          # 4 x 2 x 2 = 16
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: 16 .* = 24"):
        check_batch(cfg, world_size=3)
    pp = cfg_with("train.global_batch_size=8", "parallel.pipeline_stages=2")
    assert check_batch(pp, world_size=2) == 1
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_stages"):
        check_batch(pp, world_size=3)


def test_load_config_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.steps"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_are_valid():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        cfg = load_config(f)
        cfg.model_config(vocab_size=32768, mask_token_id=32767)


def test_zero_communication_settings_reach_deepspeed_only_when_set():
    from dtrain.engine import deepspeed_config
    assert deepspeed_config(cfg_with(), dp_size=2)["zero_optimization"] == {"stage": 1}   # DeepSpeed's defaults
    ds = deepspeed_config(cfg_with("parallel.overlap_comm=true", "parallel.reduce_bucket_size=50000000",
                                   "parallel.contiguous_gradients=false"), dp_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 50_000_000,
                                       "contiguous_gradients": False}


@pytest.mark.parametrize("overrides, message", [
    (["train.activation_checkpointing=true"], "activation_checkpointing"),
    (["parallel.zero_stage=3"], "zero_stage 1 or 2"),
])
def test_cuda_graphs_refuse_what_a_recorded_trunk_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=rf"train\.cuda_graphs: .*{message}.*add train\.cuda_graphs=false"):
        cfg_with("train.cuda_graphs=true", *overrides)
    cfg_with(*overrides)                                   # fine without graphs


def test_cuda_graphs_take_pipelines():
    """Each stage graphs its own blocks (dtrain/pipeline.enable_block_graphs)."""
    cfg = cfg_with("train.cuda_graphs=true", "parallel.pipeline_stages=2", "parallel.zero_stage=1")
    assert cfg.train.cuda_graphs and cfg.parallel.pipeline_stages == 2
