"""The framework-free model folder: config.json + model.safetensors (+ tokenizer.model).

This is what `export` writes and what `dtrain sample` / evaluation load; it needs neither DeepSpeed nor
the training config. Plain PyTorch loading, for users:

    cfg = ModelConfig.from_dict(json.load(open(f"{folder}/config.json"))["model"])
    model = DiffusionLM(cfg); model.load_state_dict(safetensors.torch.load_file(f"{folder}/model.safetensors"))
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.lm import DiffusionLM

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.model"


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the tied head weight (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        sd.pop("head.proj.weight", None)
    return sd


def save_pretrained(model: DiffusionLM, folder: str | Path, *, tokenizer_path: str | Path | None = None,
                    dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
          for k, v in unique_state_dict(model).items()}
    save_file(sd, str(folder / WEIGHTS_FILE))
    meta = {"model": model.cfg.to_dict(), **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, folder / TOKENIZER_FILE)
    return folder


def load_pretrained(folder: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[DiffusionLM, dict]:
    """Returns (model in eval mode, the config.json contents)."""
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; a model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    cfg = ModelConfig.from_dict(meta["model"])
    model = DiffusionLM(cfg)
    sd = load_file(str(folder / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "head.proj.weight")]
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE}: does not match {CONFIG_FILE}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), meta
