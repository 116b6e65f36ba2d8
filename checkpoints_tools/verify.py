"""`dckpt verify`: is a checkpoint or an exported model folder whole and unaltered?

With checksums.json (written by the trainer, `dckpt reshard` and `dckpt export`): every listed file must
exist with its size and sha256, and no file may have been added. Without it (older checkpoints): the
COMPLETE marker, the files the recorded layout implies, and that every file loads.
Returns a list of problems, one line each naming the file; `dckpt verify` exits 1 when there are any.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoints_tools.manifest import MANIFEST, check_manifest
from checkpoints_tools.pretrained import CONFIG_FILE, WEIGHTS_FILE
from checkpoints_tools.summary import _TAG, LATEST, MARKER, read_marker, saved_layout


def is_export(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() or (path / WEIGHTS_FILE).is_file()


def targets(path: Path) -> list[Path]:
    """The folders to verify: an export, a checkpoint, or every checkpoint of a checkpoint root."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    if is_export(path) or _TAG.match(path.name) or (path / MARKER).exists() or any(path.glob("*model_states.pt")):
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and _TAG.match(p.name))
    if not found:
        raise FileNotFoundError(f"{path}: not a checkpoint, an export, or a folder of checkpoints")
    return found


def _loadable(path: Path) -> list[str]:
    problems = []
    for f in sorted(path.rglob("*.pt")):
        if f.is_symlink():
            continue
        try:
            torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # noqa: BLE001  (any failure to read is the finding)
            problems.append(f"{f}: cannot be loaded ({type(e).__name__}: {str(e)[:120]})")
    return problems


def _checkpoint_files(path: Path) -> list[str]:
    """Without a manifest: the files the checkpoint's layout implies."""
    problems = []
    marker = read_marker(path)
    if marker is None:
        return [f"{path / MARKER}: missing (the checkpoint was interrupted while being written)"]
    if (path / "zero" / "optimizer_state.pt").is_file():
        return problems + _loadable(path)
    world = marker.get("world_size")
    ranks = sorted(path.glob("trainer_rank*.pt"))
    if world is not None and len(ranks) != world:
        problems.append(f"{path}: {len(ranks)} trainer_rank*.pt files, expected {world} (one per rank)")
    layout = saved_layout(path, marker)
    if not any(path.glob("*model_states.pt")):
        problems.append(f"{path}: no DeepSpeed *_model_states.pt file")
    optim = list(path.glob("*zero_pp_rank_*_optim_states.pt"))
    dp, pp = layout.get("dp_size"), layout.get("pipeline_stages") or 1
    if dp and len(optim) != dp * pp:
        problems.append(f"{path}: {len(optim)} *_optim_states.pt files, expected {dp * pp} (DP={dp} x PP={pp})")
    if not (path / "config.yaml").is_file():
        problems.append(f"{path / 'config.yaml'}: missing")
    return problems + _loadable(path)


def _export_files(path: Path) -> list[str]:
    from checkpoints_tools.pretrained import load_pretrained
    try:
        load_pretrained(path)
    except Exception as e:  # noqa: BLE001  (any failure to load is the finding)
        return [f"{path}: does not load ({type(e).__name__}: {str(e)[:200]})"]
    return []


def verify(path: str | Path, quick: bool = False, progress: bool = False) -> dict[Path, list[str]]:
    """{folder: problems} for each folder verified (quick: sizes only, no sha256)."""
    results = {}
    for folder in targets(Path(path)):
        export = is_export(folder)
        if (folder / MANIFEST).is_file():
            problems = check_manifest(folder, progress=progress, sizes_only=quick,
                                      allowed_extra=() if export else (MARKER,))
            if not export and not (folder / MARKER).is_file():
                problems.append(f"{folder / MARKER}: missing (the checkpoint was interrupted while being written)")
            elif not export:
                try:
                    json.loads((folder / MARKER).read_text() or "{}")
                except json.JSONDecodeError:
                    problems.append(f"{folder / MARKER}: not valid JSON")
        else:
            problems = _export_files(folder) if export else _checkpoint_files(folder)
            problems.insert(0, f"note: {folder / MANIFEST} absent; checked completeness and loadability only")
        results[folder] = problems
    root = Path(path)
    if (root / LATEST).is_file() and not (root / root.joinpath(LATEST).read_text().strip()).is_dir():
        results.setdefault(root, []).append(f"{root / LATEST}: names {root.joinpath(LATEST).read_text().strip()}, "
                                            f"which does not exist")
    return results


def failed(results: dict[Path, list[str]]) -> bool:
    return any(p for problems in results.values() for p in problems if not p.startswith("note:"))
