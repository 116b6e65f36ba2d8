"""`dckpt inspect`: what a checkpoint folder holds, read from its files (no DeepSpeed, no process group).

    step, tokens, model family and size, the parallel layout it was saved with (DP, PP, ZeRO stage),
    files and sizes, whether it is complete, and the data loader's state.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from checkpoints_tools.manifest import MANIFEST

MARKER, LATEST, CONFIG, TOKENIZER = "COMPLETE", "latest", "config.yaml", "tokenizer.model"
_TAG = re.compile(r"^step(\d{8})$")
_ZERO_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoint root (-> its latest complete checkpoint, else the newest one)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a folder")
    if _TAG.match(path.name) or (path / MARKER).exists() or any(path.glob("*model_states.pt")):
        return path
    tags = sorted((p for p in path.iterdir() if p.is_dir() and _TAG.match(p.name)), key=lambda p: p.name)
    latest = path / LATEST
    if latest.is_file() and (path / latest.read_text().strip() / MARKER).is_file():
        return path / latest.read_text().strip()
    complete = [p for p in tags if (p / MARKER).is_file()]
    if complete or tags:
        return (complete or tags)[-1]
    raise FileNotFoundError(f"{path}: neither a checkpoint (no {MARKER}, no *model_states.pt) nor a checkpoint "
                            f"root (no step######## folders)")


def read_marker(path: Path) -> dict | None:
    f = path / MARKER
    if not f.is_file():
        return None
    text = f.read_text().strip()
    return json.loads(text) if text else {}


class IncompleteCheckpoint(RuntimeError):
    pass


def conversion_source(src: str | Path, out: str | Path, verb: str) -> tuple[Path, Path, dict]:
    """(checkpoint folder, new output folder, its COMPLETE marker) for a command that writes a new folder
    from a checkpoint: the input must be complete, and an existing output is never overwritten."""
    src, out = find_checkpoint(src), Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; {verb} never overwrites (choose a new folder)")
    marker = read_marker(src)
    if marker is None:
        raise IncompleteCheckpoint(f"{src}: incomplete (no {MARKER} marker): it was interrupted while being written")
    return src, out, marker


def read_config(path: Path) -> dict | None:
    import yaml
    f = path / CONFIG
    return yaml.safe_load(f.read_text()) if f.is_file() else None


def _load(f: Path) -> dict:
    return torch.load(f, map_location="cpu", weights_only=False, mmap=True)


def saved_layout(path: Path, marker: dict | None = None) -> dict:
    """dp_size, pipeline_stages, zero_stage: from COMPLETE when recorded there, else from DeepSpeed's files."""
    marker = marker if marker is not None else (read_marker(path) or {})
    if all(k in marker for k in ("dp_size", "pipeline_stages", "zero_stage")):
        return {k: marker[k] for k in ("dp_size", "pipeline_stages", "zero_stage", "precision") if k in marker}
    out: dict = {}
    pp = len({m.group(2) for f in path.iterdir() if (m := _ZERO_OPTIM.match(f.name))}) or None
    model_files = sorted(path.glob("mp_rank_*_model_states.pt")) or sorted(path.glob("zero_pp_rank_*_model_states.pt"))
    if model_files:
        state = _load(model_files[0])
        out["dp_size"] = state.get("dp_world_size")
        ds = state.get("ds_config") or {}
        out["zero_stage"] = (ds.get("zero_optimization") or {}).get("stage")
        # the trainer's two modes: bf16 is DeepSpeed's torch_autocast, fp32 has neither it nor "bf16"
        autocast = (ds.get("torch_autocast") or {}).get("enabled") or (ds.get("bf16") or {}).get("enabled")
        out["precision"] = "bf16" if autocast else "fp32"
    out["pipeline_stages"] = pp if any(path.glob("layer_*-model_states.pt")) else 1
    return out


def model_config(path: Path, vocab_size: int | None = None, mask_token_id: int | None = None):
    """The checkpoint's full ModelConfig: from COMPLETE, else config.yaml + the tokenizer's vocabulary."""
    from model.config import ModelConfig
    marker = read_marker(path) or {}
    if "model" in marker:
        return ModelConfig.from_dict(marker["model"])
    cfg = read_config(path)
    if cfg is None:
        raise FileNotFoundError(f"{path / CONFIG}: missing; cannot tell which model this checkpoint holds")
    if vocab_size is None or mask_token_id is None:
        tok = tokenizer_path(path, cfg)
        if tok is None:
            raise FileNotFoundError(f"{path}: the model's vocabulary comes from its tokenizer, and none was found "
                                    f"({path / TOKENIZER}, or data.tokenizer / data.path in {path / CONFIG}); "
                                    f"pass --tokenizer")
        from data_pipeline.tokenizer import Tokenizer
        t = Tokenizer.load(tok)
        vocab_size, mask_token_id = t.vocab_size, t.mask_id
    from dtrain.config import from_dict
    return from_dict(cfg).model_config(vocab_size, mask_token_id)


def tokenizer_path(path: Path, cfg: dict | None = None) -> Path | None:
    """The tokenizer stored in the checkpoint, else the one its run config points to (if it exists)."""
    if (path / TOKENIZER).is_file():
        return path / TOKENIZER
    cfg = cfg if cfg is not None else read_config(path)
    data = (cfg or {}).get("data") or {}
    for cand in (data.get("tokenizer"), data.get("path") and str(Path(data["path"]) / TOKENIZER)):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(path: str | Path) -> dict:
    """Everything `dckpt inspect` prints, as a dict."""
    path = find_checkpoint(path)
    marker = read_marker(path)
    info: dict = {"path": str(path), "complete": marker is not None,
                  "universal": (path / "zero" / "optimizer_state.pt").is_file(),
                  "has_checksums": (path / MANIFEST).is_file()}
    trainer_files = sorted(path.glob("trainer_rank*.pt"))
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in trainer_files]
    src = marker or (states[0] if states else {})
    info["step"] = src.get("step")
    info["tokens"] = src.get("tokens")
    info["skipped_steps"] = src.get("skipped_steps")
    info["layout"] = saved_layout(path, marker or {}) if not info["universal"] else (marker or {}).get("source_layout", {})
    if marker and "world_size" in marker:
        info["world_size"] = marker["world_size"]
    try:
        cfg = model_config(path)
        from model.lm import DiffusionLM, count_parameters
        with torch.device("meta"):
            n = count_parameters(DiffusionLM(cfg))
        info["model"] = {"family": cfg.family, "layer_pattern": cfg.layer_pattern, "d_model": cfg.d_model,
                         "vocab_size": cfg.vocab_size, "parameters": n, "tie_embeddings": cfg.tie_embeddings}
    except (FileNotFoundError, ValueError) as e:
        info["model"] = {"error": str(e)}
    loaders = [s["loader"] for s in states if s.get("loader") is not None]
    if loaders:
        ld = loaders[0]
        info["data"] = {k: ld.get(k) for k in ("dataset", "dp_size", "micro_batch_size", "grad_accum", "epoch",
                                               "samples_seen", "batches_per_epoch", "seed", "shuffle")}
        info["data"]["bad_samples"] = sum(s.get("bad_samples", 0) for s in loaders)
    files = sorted((p for p in path.rglob("*") if p.is_file() and not p.is_symlink()), key=lambda p: str(p))
    info["files"] = [{"name": str(p.relative_to(path)), "bytes": p.stat().st_size} for p in files]
    info["total_bytes"] = sum(f["bytes"] for f in info["files"])
    return info


def render(info: dict, max_files: int = 40) -> str:
    lay = info.get("layout") or {}
    m = info.get("model") or {}
    status = "complete" if info["complete"] else "INCOMPLETE (no COMPLETE marker: interrupted while being written)"
    if info["universal"]:
        status += " | universal (loads under any DP/PP/ZeRO layout)"
    status += " | checksums.json" if info["has_checksums"] else " | no checksums.json"
    lines = [f"checkpoint   {info['path']}", f"status       {status}",
             f"step         {info.get('step')}   tokens seen {info.get('tokens')}   skipped steps "
             + str(info.get("skipped_steps"))]
    if "error" in m:
        lines.append(f"model        unknown: {m['error']}")
    elif m:
        lines.append(f"model        {m['family']} {m['layer_pattern']} d_model={m['d_model']} vocab={m['vocab_size']} "
                     f"| {m['parameters'] / 1e6:.2f}M parameters{' (tied embeddings)' if m['tie_embeddings'] else ''}")
    what = "converted from" if info["universal"] else "saved with"
    lines.append(f"layout       {what} DP={lay.get('dp_size', '?')} x PP={lay.get('pipeline_stages', '?')} | "
                 f"ZeRO-{lay.get('zero_stage', '?')} | {lay.get('precision', '?')}")
    d = info.get("data")
    if d:
        lines.append(f"data         epoch {d['epoch']} | {d['samples_seen']} samples read per rank | dataset {d['dataset']} | "
                     f"dp_size {d['dp_size']} x micro-batch {d['micro_batch_size']} x grad_accum {d['grad_accum']} | "
                     f"bad samples {d['bad_samples']}")
        lines.append("             exact resume needs this dp_size, micro-batch and grad_accum; another layout "
                     "needs data.reshard_on_resume=true (continues at the next epoch boundary)")
    else:
        lines.append("data         no data-loader state")
    lines.append(f"files        {len(info['files'])} files, {_human(info['total_bytes'])}")
    for f in info["files"][:max_files]:
        lines.append(f"  {_human(f['bytes']):>10}  {f['name']}")
    if len(info["files"]) > max_files:
        lines.append(f"  ... {len(info['files']) - max_files} more (--all to list them)")
    return "\n".join(lines)
