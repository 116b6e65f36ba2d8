"""Shared fixtures: a tiny dataset built once from the built-in corpus, a launcher for dtrain runs, and one
for probe scripts that drive the trainer's engine directly."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dtrain.engine import free_port

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("DIFFUMAMBA_TEST_CACHE", Path.home() / ".cache" / "diffumamba-tests"))
SEQ_LEN = 32

# a tiny hybrid (Mamba, Mamba, attention) model: every run of the dtrain tests trains this
TINY_MODEL = {"preset": "tiny-diffumamba-h", "d_model": 32, "layer_pattern": "MMA", "n_heads": 4,
              "mamba": {"d_state": 8, "headdim": 8, "chunk_size": 16}}


@pytest.fixture(scope="session")
def dataset() -> Path:
    from data_pipeline.corpus import build_default_dataset
    return Path(build_default_dataset(CACHE / "builtin", seq_len=SEQ_LEN, vocab_size=512, max_bytes=300_000,
                                      progress=False))


def base_config(out_dir: Path, dataset: Path, **sections) -> dict:
    cfg = {
        "run": {"name": out_dir.name, "out_dir": str(out_dir), "seed": 7},
        "model": dict(TINY_MODEL),
        "data": {"path": str(dataset), "seq_len": SEQ_LEN, "num_workers": 0},
        "train": {"steps": 8, "micro_batch_size": 4, "grad_accum": 2, "eval_interval": 4, "eval_iters": 2,
                  "precision": "fp32"},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"interval": 4, "keep": 3},
        "logging": {"log_interval": 1, "num_samples": 1, "sample_steps": 4},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def cpu_env(**extra: str) -> dict:
    """Environment of a process a test starts: DeepSpeed's CPU accelerator, no GPU, the repository
    importable, no rank inherited from a launcher."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **extra}
    env.pop("RANK", None)
    return env


def launcher(nproc: int) -> list[str]:
    """python, or torchrun on a free port for nproc > 1."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port())]


def train_command(cfg: dict, tmp: Path, *, nproc: int = 2, args: tuple = ()) -> tuple[list[str], dict]:
    """(command, environment) of `dtrain train` on CPU with gloo: torchrun for nproc > 1. Writes the config."""
    path = tmp / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [*launcher(nproc), "-m", "dtrain.cli", "train", "--config", str(path), *args]
    return cmd, cpu_env(OMP_NUM_THREADS="1")


def launch(cfg: dict, tmp: Path, *, nproc: int = 2, args: tuple = (), timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `dtrain train` in fresh processes and wait for it."""
    cmd, env = train_command(cfg, tmp, nproc=nproc, args=args)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if nproc > 1 and proc.returncode != 0 and "address already in use" in proc.stderr.lower():
        # free_port() releases the port before torchrun binds it: another process can take it in
        # between. Only that race is retried, once, on a new port; any other failure is reported.
        cmd[cmd.index("--master_port") + 1] = str(free_port())
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return proc


# What every engine probe starts with: dtrain's engine for configs/tiny_cpu.yaml (micro-batch 2 x 64 tokens,
# vocab 512) and masked micro-batches as the trainer hands them to train_step (bench/tiny_engine.py).
ENGINE_PROBE = r"""
import torch
from dtrain import engine as dengine
from bench.tiny_engine import tiny_engine, masked_batches
from bench.training import NoMetrics
from dtrain.loop import train_step

dengine.setup_distributed()
"""


# A probe that finished leaves as `dtrain` does (dtrain/engine.py exit_rank): without the interpreter's
# finalisation, where a native thread of torch.distributed / DeepSpeed now and then aborts a finished rank.
PROBE_EXIT = r"""
dengine.exit_rank(0)
"""


def run_probe(code: str, tmp: Path, *args: str, nproc: int = 1, timeout: int = 300) -> str:
    """Run ENGINE_PROBE + code in fresh processes (torchrun for nproc > 1) with `args`; their stdout."""
    script = tmp / "probe.py"
    script.write_text(ENGINE_PROBE + code + PROBE_EXIT)
    proc = subprocess.run([*launcher(nproc), str(script), *args], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def scalars(run_dir: Path) -> dict:
    """{tag: {step: value}} from the TensorBoard event files of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    out["_tensors"] = acc.Tags().get("tensors", [])
    return out


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def plain_model_config(cfg: dict, dataset: Path):
    """The ModelConfig a run config describes, derived here independently of dtrain.config: the preset,
    the run's model fields on top, and the vocabulary of the dataset's tokenizer."""
    from data_pipeline.tokenizer import Tokenizer
    from model.config import ModelConfig
    from model.presets import get_preset

    tok = Tokenizer.load(dataset / "tokenizer.model")
    m = dict(cfg["model"])
    base = get_preset(m.pop("preset")).to_dict()
    base.update({k: v for k, v in m.items() if k != "mamba"})
    base["mamba"].update(m["mamba"])
    base.update(vocab_size=tok.vocab_size, mask_token_id=tok.mask_id)
    return ModelConfig.from_dict(base)
