"""Helpers for the checkpoint-tool tests: the dtrain test launcher, and a plain-PyTorch reference trainer.

The reference trainer is the independent computation the resumed runs are checked against: one process,
no DeepSpeed, torch's AdamW on the same global batches (every data-parallel rank's micro-batches, read
with the data pipeline), gradients averaged over the micro-batches as DeepSpeed does (loss / grad_accum
per micro-batch, mean over data-parallel ranks), clipped at the global norm, the learning rate from the
step number. Its weights, Adam moments and per-step losses are what a correct run must reproduce, up to
float summation order.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("dtrain_test_conftest", REPO / "tests" / "dtrain" / "conftest.py")
dtrain_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dtrain_conftest)

base_config, launch, check_ok, scalars = (dtrain_conftest.base_config, dtrain_conftest.launch,
                                         dtrain_conftest.check_ok, dtrain_conftest.scalars)
CACHE, SEQ_LEN = dtrain_conftest.CACHE, dtrain_conftest.SEQ_LEN


def build_dataset() -> Path:
    from data_pipeline.corpus import build_default_dataset
    return Path(build_default_dataset(CACHE / "builtin", seq_len=SEQ_LEN, vocab_size=512, max_bytes=300_000,
                                      progress=False))


def dckpt(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The `dckpt` command in a fresh process."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "checkpoints_tools.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


model_cfg = dtrain_conftest.plain_model_config


def loaders(cfg: dict, dataset: Path, *, dp_size: int, micro: int, ga: int, state: dict | None = None,
            split: str = "train") -> list:
    """One MaskedBatchLoader per data-parallel rank; `state` (a saved loader state) resumes them."""
    from data_pipeline.config import DataConfig
    from data_pipeline.stream import MaskedBatchLoader
    data = DataConfig.from_dict({**cfg["data"], "reshard_on_resume": True})
    mask_id = model_cfg(cfg, dataset).mask_token_id
    out = []
    for r in range(dp_size):
        ld = MaskedBatchLoader(data, split=split, dp_rank=r, dp_size=dp_size, micro_batch_size=micro,
                               grad_accum=ga, mask_id=mask_id, seed=cfg["run"]["seed"])
        if state is not None:
            ld.load_state_dict(state)
        out.append(iter(ld))
    return out


class Reference:
    """Plain-PyTorch training of the run's model (see the module docstring)."""

    def __init__(self, cfg: dict, dataset: Path):
        from dtrain.config import OptimSection
        from dtrain.optim import param_groups
        from model.lm import DiffusionLM
        self.cfg, self.mcfg = cfg, model_cfg(cfg, dataset)
        torch.manual_seed(cfg["run"]["seed"])
        self.model = DiffusionLM(self.mcfg)
        o = OptimSection(**cfg["optim"])
        self.optim_cfg = o
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                     eps=o.eps, foreach=False)
        self.step = 0

    def train_step(self, rank_iters: list, ga: int, total_steps: int) -> float:
        """One optimizer step on ga micro-batches of every rank; returns the logged loss (NELBO/token)."""
        from dtrain.optim import lr_at
        from model.diffusion import diffusion_loss
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.optim_cfg, total_steps)
        self.opt.zero_grad(set_to_none=True)
        nelbo = tokens = 0.0
        dp = len(rank_iters)
        for it in rank_iters:
            for _ in range(ga):
                batch = next(it)
                loss, stats = diffusion_loss(self.model(batch["input_ids"]), batch, self.mcfg.mask_token_id)
                (loss / (ga * dp)).backward()
                nelbo += stats["nelbo_per_seq"].double().sum().item()
                tokens += stats["tokens_per_seq"].double().sum().item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["train"].get("grad_clip", 1.0))
        self.opt.step()
        self.step += 1
        return nelbo / tokens

    def named_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{parameter name: {fp32, exp_avg, exp_avg_sq}} (DiffusionLM names)."""
        out = {}
        for name, p in self.model.named_parameters():
            st = self.opt.state[p]
            out[name] = {"fp32": p.detach().clone(), "exp_avg": st["exp_avg"].clone(),
                         "exp_avg_sq": st["exp_avg_sq"].clone(), "step": float(st["step"])}
        return out


def loader_state(ckpt_dir: Path) -> dict:
    """The data-loader state saved by rank 0 of a checkpoint (read with torch, not the tools)."""
    for f in sorted(Path(ckpt_dir).glob("trainer_rank*.pt")):
        st = torch.load(f, map_location="cpu", weights_only=False)
        if st.get("loader") is not None:
            return st["loader"]
    raise AssertionError(f"no loader state in {ckpt_dir}")


def adam_steps(ckpt_dir: Path) -> set[float]:
    """The Adam step counters stored in a DeepSpeed ZeRO-1/2 checkpoint's optimizer files."""
    steps = set()
    for f in Path(ckpt_dir).glob("*optim_states.pt"):
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        inner = sd.get("base_optimizer_state", sd.get("optimizer_state_dict"))
        steps |= {float(s["step"]) for s in inner["state"].values()}
    return steps
