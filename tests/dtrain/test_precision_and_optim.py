"""bf16 under DeepSpeed keeps Mamba's A_log / D / dt_bias (and the master weights) in fp32 while the
matmuls run in bf16; weight decay skips norms, biases and the SSM parameters; the lr schedule."""
import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, TINY_MODEL, cpu_env

from dtrain.config import OptimSection
from dtrain.optim import lr_at, param_groups
from model.config import ModelConfig
from model.lm import DiffusionLM
from model.presets import get_preset

PROBE = r"""
import json, torch
from dtrain.config import from_dict
from dtrain.engine import build, fp32_param_report, setup_distributed
cfg = from_dict({"model": MODEL, "data": {"path": "unused", "seq_len": 32},
                 "train": {"precision": "bf16", "micro_batch_size": 2, "grad_accum": 1},
                 "parallel": {"zero_stage": 2}})
device = setup_distributed()
engine = build(cfg, cfg.model_config(vocab_size=64, mask_token_id=63), device).engine
seen = {}
engine.module.blocks[0].mlp.fc_in.register_forward_hook(lambda m, i, o: seen.update(matmul=str(o.dtype)))
engine(torch.randint(0, 63, (2, 32)))
print("PROBE" + json.dumps({"fp32_params": {k: str(v) for k, v in fp32_param_report(engine.module).items()},
                            "all_param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
                            "matmul": seen["matmul"]}))
"""


@pytest.mark.slow
def test_bf16_keeps_ssm_parameters_fp32_after_deepspeed_initialize():
    code = PROBE.replace("MODEL", repr(TINY_MODEL))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True, check=False,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("PROBE", 1)[1])
    names = {k.rsplit(".", 1)[-1] for k in out["fp32_params"]}
    assert names == {"A_log", "D", "dt_bias"}, out
    assert set(out["fp32_params"].values()) == {"torch.float32"}
    assert out["all_param_dtypes"] == ["torch.float32"]     # fp32 weights = master weights
    assert out["matmul"] == "torch.bfloat16"                # compute in bf16


def test_no_weight_decay_on_norms_biases_and_ssm_parameters():
    cfg = ModelConfig.from_dict({**get_preset("tiny-diffumamba-h").to_dict(), "d_model": 32,
                                 "mamba": {**get_preset("tiny-diffumamba-h").to_dict()["mamba"], "headdim": 8}})
    model = DiffusionLM(cfg)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    name_of = {id(p): n for n, p in model.named_parameters()}
    plain = {name_of[id(p)] for p in groups["no_decay"]["params"]}
    decay = {name_of[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    for leaf in ("A_log", "D", "dt_bias"):
        assert any(n.endswith("." + leaf) for n in plain) and not any(n.endswith("." + leaf) for n in decay)
    assert all("norm" not in n and not n.endswith("bias") for n in decay)
    assert "embed.tok.weight" in decay and any(n.endswith("mlp.fc_in.weight") for n in decay)
    assert len(plain | decay) == len(list(model.parameters()))   # tied embedding counted once


def test_lr_schedule_warmup_then_cosine_to_min():
    o = OptimSection(lr=1e-4, min_lr=1e-6, warmup_steps=10, schedule="cosine")
    assert lr_at(0, o, 110) == pytest.approx(1e-5)
    assert lr_at(9, o, 110) == pytest.approx(1e-4)
    assert lr_at(60, o, 110) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, o, 110) == pytest.approx(1e-6)
    assert lr_at(500, o, 110) == pytest.approx(1e-6)


def test_pipeline_recomputes_checkpointed_blocks_under_the_forward_autocast(monkeypatch):
    """bf16 autocast + activation checkpointing in the pipeline: the recomputation must run in bf16 like
    the forward, so the gradients equal those of the un-checkpointed block exactly. DeepSpeed's default
    checkpoint function recomputes in fp32, and its gradients differ."""
    import torch

    from dtrain import pipeline
    from model.blocks import Block

    cfg = get_preset("tiny-diffumamba-h")
    torch.manual_seed(0)
    block = Block("M", cfg)
    x = torch.randn(2, 2, 16, cfg.d_model)     # a block's inputs: the pair (hidden, residual)

    def grads(run):
        block.zero_grad()
        pair = [t.clone().requires_grad_(True) for t in x]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden, residual = run(block, *pair)
        (hidden.float() + residual).square().sum().backward()
        return [t.grad.clone() for t in pair] + [p.grad.clone() for p in block.parameters()]

    plain = grads(lambda b, *pair: b(*pair))
    checkpointed = grads(lambda b, *pair: pipeline.checkpoint_keeping_autocast(b, *pair))
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)
    from deepspeed.runtime.activation_checkpointing import checkpointing
    deepspeed_default = grads(lambda b, *pair: checkpointing.checkpoint(b, *pair))   # recomputes in fp32
    assert any(not torch.equal(a, b) for a, b in zip(plain, deepspeed_default))

    seen = {}

    class Captured(Exception):
        pass

    def fake_pipeline_module(**kwargs):
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(pipeline, "pipeline_module_class", lambda: fake_pipeline_module)
    with pytest.raises(Captured):
        pipeline.build_pipeline_module(cfg, num_stages=2, partition_method="parameters", seed=0,
                                       activation_checkpointing=True, loss_fn=pipeline.PipeLoss(cfg.mask_token_id))
    assert seen["activation_checkpoint_func"] is pipeline.checkpoint_keeping_autocast
    assert seen["activation_checkpoint_interval"] == 1
