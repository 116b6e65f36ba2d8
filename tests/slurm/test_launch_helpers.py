"""The launchers' helpers, without a cluster: global batch on any node count, run completion, misuse."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from slurmjob import REPO

from dtrain.submit import keep_global_batch, training_finished
from model.config import ConfigError

CFG_1P3B = str(REPO / "configs/1p3b_diffumamba.yaml")   # global batch 512 = micro 16 x accum 4 x 8 GPUs


@pytest.mark.parametrize("world, expected", [(8, []), (16, ["train.grad_accum=2"]), (32, ["train.grad_accum=1"]),
                                             (64, ["train.micro_batch_size=8", "train.grad_accum=1"]),
                                             (128, ["train.micro_batch_size=4", "train.grad_accum=1"])])
def test_keep_global_batch(world, expected):
    assert keep_global_batch(CFG_1P3B, [], world) == expected
    pipelined = ["parallel.pipeline_stages=2"]
    assert keep_global_batch(CFG_1P3B, pipelined, 2 * world) == expected   # same DP size


def test_keep_global_batch_refuses_what_does_not_divide():
    with pytest.raises(ConfigError, match="not a multiple"):
        keep_global_batch(CFG_1P3B, [], 24)
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size 16 x 64"):   # the user's micro-batch
        keep_global_batch(CFG_1P3B, ["train.micro_batch_size=16"], 64)


def test_keep_global_batch_leaves_an_explicit_grad_accum_alone():
    assert keep_global_batch(CFG_1P3B, ["train.grad_accum=2", "train.global_batch_size=null"], 24) == []


def test_keep_global_batch_validates_the_overrides():
    with pytest.raises(ConfigError, match="no_such_field"):
        keep_global_batch(CFG_1P3B, ["train.no_such_field=1"], 8)


def test_training_finished(tmp_path):
    cfg = str(REPO / "configs/tiny_cpu.yaml")
    ov = [f"run.out_dir={tmp_path}", "train.steps=20"]
    assert not training_finished(cfg, ov)
    ckpt = tmp_path / "checkpoints"
    for step in (10, 20):
        (ckpt / f"step{step:08d}").mkdir(parents=True)
    (ckpt / "step00000010" / "COMPLETE").touch()
    assert not training_finished(cfg, ov)
    (ckpt / "step00000020" / "COMPLETE").touch()   # only complete checkpoints count
    assert training_finished(cfg, ov)


@pytest.mark.parametrize("script", ["slurm/pretrain_1p3b.sh", "slurm/common.sh"])
def test_scripts_refuse_to_run_outside_slurm(script):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(REPO / script)], env=env, text=True, capture_output=True,
                         timeout=30, check=False)
    assert out.returncode != 0
    assert "sbatch" in out.stderr


def test_submit_command_line_refuses_a_missing_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dtrain.submit", "submit", "--config", "nope.yaml",
                          "--cluster", "debug"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                         text=True, capture_output=True, timeout=60, check=False)
    assert out.returncode == 2 and "config file not found" in out.stderr


def test_keep_global_batch_command_prints_words_the_launcher_splits():
    """slurm/common.sh adds the printed words to its overrides one by one (`overrides+=($extra)`)."""
    out = subprocess.run([sys.executable, "-m", "dtrain.submit", "keep-global-batch", CFG_1P3B, "64"], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, text=True, capture_output=True, timeout=60,
                         check=True).stdout
    words = subprocess.run(["bash", "-c", 'extra=$1; o=(x); o+=($extra); printf "%s\\n" "${o[@]}"', "_", out.strip()],
                           text=True, capture_output=True, check=True).stdout.split("\n")
    assert words[:3] == ["x", "train.micro_batch_size=8", "train.grad_accum=1"]
