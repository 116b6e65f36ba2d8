"""Checkpoints: DeepSpeed's sharded engine state + the trainer's own state, made visible atomically.

Layout under the checkpoint root:
    step00000100/                DeepSpeed files (model/optimizer shards, per-layer files under PP)
        trainer_rank00003.pt     per rank: step, tokens, data-loader state, RNG states
        config.yaml              the resolved run config
        COMPLETE                 written last, once every rank has finished writing
    latest                       the tag of the newest COMPLETE checkpoint (DeepSpeed's own format)

Protocol: every rank writes into the tag folder -> barrier -> rank 0 writes COMPLETE, then replaces
`latest` through a temporary file and os.replace (atomic on POSIX). A crash mid-write leaves a folder
without COMPLETE, which resume ignores; `latest` still names the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dtrain.config import save_config

MARKER = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))


def resolve(resume: str | None, root: Path) -> Path | None:
    """The checkpoint folder to resume from: None (fresh start), "auto" (latest complete) or a path."""
    if resume is None or resume == "none":
        return None
    if resume == "auto":
        latest = root / LATEST
        if latest.is_file():
            path = root / latest.read_text().strip()
            if is_complete(path):
                return path
        done = complete_checkpoints(root)  # `latest` missing or stale: newest complete one
        return done[-1] if done else None
    path = Path(resume)
    if path.is_dir() and not _TAG.match(path.name):   # a checkpoint root: its latest complete checkpoint
        found = resolve("auto", path)
        if found is None:
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint in this folder")
        return found
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
    if not is_complete(path):
        raise RuntimeError(f"--resume {resume}: checkpoint {path} is incomplete (no {MARKER} marker); "
                           f"it was interrupted while being written")
    return path


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep
        self.rank = dist.get_rank()

    def save(self, engine, step: int, trainer_state: dict, config: dict, crash_mid_write: bool = False) -> Path:
        tag = tag_for(step)
        path = self.root / tag
        if self.rank == 0 and path.exists():   # a leftover of an interrupted write of this same step
            shutil.rmtree(path)
        dist.barrier()
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )
        client = {"trainer": {k: v for k, v in trainer_state.items() if k in ("step", "tokens", "skipped_steps")},
                  "config": config,
                  # lets deepspeed.checkpoint.ds_to_universal convert it (no tensor parallelism to describe)
                  UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
        if crash_mid_write:   # fault injection for tests: die with the shards written, marker not
            os._exit(3)
        tmp = path / f"trainer_rank{self.rank:05d}.pt.tmp"
        torch.save(trainer_state, tmp)
        os.replace(tmp, path / f"trainer_rank{self.rank:05d}.pt")
        dist.barrier()   # every rank's files are on disk
        if self.rank == 0:
            save_config(config, path / "config.yaml")
            summary = {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str))}
            (path / MARKER).write_text(json.dumps({**summary, "world_size": dist.get_world_size()}) + "\n")
            tmp_latest = self.root / f".{LATEST}.tmp"
            tmp_latest.write_text(tag)
            os.replace(tmp_latest, self.root / LATEST)
            self._prune()
        dist.barrier()
        return path

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        done = complete_checkpoints(self.root)
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine, path: Path) -> dict:
        """Restore the engine from `path`; return this rank's trainer state."""
        saved_world = json.loads((path / MARKER).read_text()).get("world_size")
        if saved_world != dist.get_world_size():
            raise RuntimeError(f"checkpoint {path} was written by {saved_world} ranks, this run has "
                               f"{dist.get_world_size()}: resume with the same number of processes (and pipeline "
                               f"stages)")
        own = path / f"trainer_rank{self.rank:05d}.pt"
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        return torch.load(own, map_location="cpu", weights_only=False)


def read_trainer_config(path: str | Path) -> dict:
    """The resolved run config stored in a checkpoint folder (for `dtrain eval`)."""
    import yaml
    return yaml.safe_load((Path(path) / "config.yaml").read_text())


def consolidated_model_state(path: str | Path, model_cfg) -> dict[str, Any]:
    """A DiffusionLM state_dict (fp32) from any checkpoint: ZeRO-1/2/3 or pipeline-parallel."""
    path = Path(path)
    layer_files = sorted(path.glob("layer_*-model_states.pt"))
    if layer_files:
        from dtrain.pipeline import pipeline_to_model_state
        states = {}
        for f in layer_files:
            idx = int(f.name.split("_")[1].split("-")[0])
            states.setdefault(idx, torch.load(f, map_location="cpu", weights_only=False))
        return {k: v.float() for k, v in pipeline_to_model_state(states, model_cfg).items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    if model_cfg.tie_embeddings and "head.proj.weight" not in sd:
        sd["head.proj.weight"] = sd["embed.tok.weight"]
    return sd
