"""Checkpoints: DeepSpeed's sharded engine state + the trainer's own state, made visible atomically.

Layout under the checkpoint root:
    step00000100/                DeepSpeed files (model/optimizer shards, per-layer files under PP)
        trainer_rank00003.pt     per rank: step, tokens, data-loader state, RNG states
        config.yaml              the resolved run config
        tokenizer.model          a copy of the run's tokenizer (export needs no dataset)
        checksums.json           sha256 + size of every file above (`dckpt verify`)
        COMPLETE                 written last, once every rank has finished writing: JSON with the step,
                                 tokens, the parallel layout (dp_size, pipeline_stages, zero_stage) and the
                                 full model config
    latest                       the tag of the newest COMPLETE checkpoint (DeepSpeed's own format)

A universal checkpoint (`dckpt reshard`, DeepSpeed's layout-free format) has the same files, with the
optimizer and weights under zero/<parameter name>/ instead of the sharded files, and "universal": true in
COMPLETE. Any data-parallel size, pipeline depth and ZeRO stage resumes from it.

Protocol: every rank writes into the tag folder -> barrier -> the ranks hash the files between them into
checksums.json -> rank 0 writes COMPLETE, then replaces
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

from checkpoints_tools.manifest import hash_files, list_files, write_manifest
from dtrain.config import save_config

MARKER = "COMPLETE"
TOKENIZER = "tokenizer.model"
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


def read_marker(path: Path) -> dict:
    """The JSON summary in a checkpoint's COMPLETE marker ({} for an empty or older marker)."""
    try:
        return json.loads((Path(path) / MARKER).read_text() or "{}")
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{Path(path) / MARKER}: not valid JSON ({e})") from e


def is_universal(path: Path) -> bool:
    """A DeepSpeed universal checkpoint (written by `dckpt reshard`): loads under any parallel layout."""
    return (Path(path) / "zero" / "optimizer_state.pt").is_file()


def universal_checkpoint_info(pipeline: bool, tie_embeddings: bool) -> dict:
    """How the parameters are laid out, for DeepSpeed's universal checkpoint conversion (ds_to_universal).

    No tensor parallelism: every rank holds whole parameters, so all of them are "TP-replicated". Under
    pipeline parallelism with tied embeddings, the first and last stages each hold a copy of the token
    embedding (same name, same values, same Adam state); the conversion must take it from the first stage
    only, or the second stage's fragments (cut at other ZeRO partition boundaries) overwrite the first's.
    """
    from deepspeed.checkpoint import constants as c
    info = {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.TP_REPLICATED_PARAMETER_PATTERNS: [r".*"]}
    if pipeline and tie_embeddings:
        from dtrain.pipeline import TIED_KEY
        info[c.PIPELINE_REPLICATED_PARAMETER_PATTERNS] = [rf"tied_modules\.{TIED_KEY}\."]
    return info


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
    def __init__(self, root: str | Path, keep: int, layout: dict | None = None, model: dict | None = None,
                 tokenizer_path: str | Path | None = None, checksums: bool = True):
        self.root = Path(root)
        self.keep = keep
        self.rank = dist.get_rank()
        self.layout = layout or {}        # dp_size, pipeline_stages, zero_stage, precision: recorded in COMPLETE
        self.model = model                # the full ModelConfig dict (vocab_size included)
        self.tokenizer_path = tokenizer_path
        self.checksums = checksums

    def _write_checksums(self, path: Path) -> None:
        """checksums.json: the files are split between the ranks, which hash their share in parallel."""
        files = [list_files(path)] if self.rank == 0 else [None]
        dist.broadcast_object_list(files, src=0)
        rels, links = files[0]
        mine = hash_files(path, rels[self.rank::dist.get_world_size()])
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if self.rank == 0:
            write_manifest(path, {k: v for part in gathered for k, v in part.items()}, links)

    def save(self, engine, step: int, trainer_state: dict, config: dict, crash_mid_write: bool = False) -> Path:
        tag = tag_for(step)
        path = self.root / tag
        if self.rank == 0 and path.exists():   # a leftover of an interrupted write of this same step
            shutil.rmtree(path)
        dist.barrier()
        # the parameter layout for ds_to_universal is declared on the module (engine.build)
        client = {"trainer": {k: v for k, v in trainer_state.items() if k in ("step", "tokens", "skipped_steps")},
                  "config": config}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
        if crash_mid_write:   # fault injection for tests: die with the shards written, marker not
            os._exit(3)
        tmp = path / f"trainer_rank{self.rank:05d}.pt.tmp"
        torch.save(trainer_state, tmp)
        os.replace(tmp, path / f"trainer_rank{self.rank:05d}.pt")
        dist.barrier()   # every rank's files are on disk
        if self.rank == 0:
            save_config(config, path / "config.yaml")
            if self.tokenizer_path is not None and Path(self.tokenizer_path).is_file():
                shutil.copyfile(self.tokenizer_path, path / TOKENIZER)
        if self.checksums:
            dist.barrier()
            self._write_checksums(path)
        if self.rank == 0:
            summary = {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str))}
            marker = {**summary, "world_size": dist.get_world_size(), **self.layout}
            if self.model is not None:
                marker["model"] = self.model
            (path / MARKER).write_text(json.dumps(marker) + "\n")
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
        if is_universal(path):
            return self._load_universal(engine, path)
        saved_world = read_marker(path).get("world_size")
        if saved_world != dist.get_world_size():
            raise RuntimeError(f"checkpoint {path} was written by {saved_world} ranks, this run has "
                               f"{dist.get_world_size()}: resume with the same number of processes (and pipeline "
                               f"stages), or convert it with `dckpt reshard` to resume under another layout")
        own = path / f"trainer_rank{self.rank:05d}.pt"
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        return torch.load(own, map_location="cpu", weights_only=False)

    def _load_universal(self, engine, path: Path) -> dict:
        """Universal checkpoint: DeepSpeed re-partitions weights and Adam state for this layout (the engine
        was built with checkpoint.load_universal). Each rank takes the trainer state saved by the rank of
        its number, or rank 0's when the saving run had fewer ranks: step and tokens are the same on every
        rank, and so is the data loader's state (a change of data-parallel size is handled by the loader
        itself, see data.reshard_on_resume)."""
        if not engine.load_universal_checkpoint():
            raise RuntimeError(f"{path} is a universal checkpoint but the engine was not built to load one")
        # DeepSpeed's ZeRO-3 universal load copies the first parameter group's settings onto every group:
        # keep this run's weight decay per group (the learning rate is set before every step anyway)
        decay = [g["weight_decay"] for g in engine.optimizer.param_groups]
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load universal checkpoint {path}")
        for g, wd in zip(engine.optimizer.param_groups, decay):
            g["weight_decay"] = wd
        place_adam_steps(getattr(engine.optimizer, "optimizer", engine.optimizer))
        states = sorted(path.glob("trainer_rank*.pt"))
        if not states:
            raise FileNotFoundError(f"{path}: no trainer_rank*.pt (step, tokens, data-loader state)")
        own = path / f"trainer_rank{self.rank:05d}.pt"
        state = torch.load(own if own.is_file() else states[0], map_location="cpu", weights_only=False)
        if state.get("loader") is None:   # a pipeline stage that read no data: take a data stage's state
            for f in states:
                other = torch.load(f, map_location="cpu", weights_only=False)
                if other.get("loader") is not None:
                    state["loader"] = other["loader"]
                    break
        return state


def place_adam_steps(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its own Adam `step` tensor, where torch's AdamW wants it. DeepSpeed's universal
    load hands every group the same tensor, which torch's Adam increments in place once per parameter (the
    bias correction would run ahead), and leaves it on the CPU, where the fused AdamW refuses it ("state_steps
    is on cpu, different from other tensors on cuda"): fused and capturable AdamW keep it as float32 on the
    parameter's device, as torch's own Optimizer.load_state_dict puts it.
    Every state is visited, not only those of the groups' current params: ZeRO-3 swaps its flat partitions
    in and out of param_groups around each step, so most states belong to no group at load time."""
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for p, state in optimizer.state.items():
        if torch.is_tensor(state.get("step")):
            step = state["step"].detach().clone()
            state["step"] = step.to(device=p.device, dtype=torch.float32) if on_device else step


def read_trainer_config(path: str | Path) -> dict:
    """The resolved run config stored in a checkpoint folder (for `dtrain eval`)."""
    import yaml
    return yaml.safe_load((Path(path) / "config.yaml").read_text())


def consolidated_model_state(path: str | Path, model_cfg) -> dict[str, Any]:
    """A DiffusionLM state_dict (fp32) from any checkpoint: ZeRO-1/2/3 or pipeline-parallel."""
    path = Path(path)
    if is_universal(path):   # zero/<DiffusionLM parameter name>/fp32.pt (dckpt reshard names them so)
        sd = {}
        for d in sorted((path / "zero").iterdir()):
            if d.is_dir() and not d.is_symlink() and (d / "fp32.pt").is_file():
                sd[d.name] = torch.load(d / "fp32.pt", map_location="cpu", weights_only=False)["param"].float()
        if model_cfg.tie_embeddings:
            sd["head.proj.weight"] = sd["embed.tok.weight"]
        return sd
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
