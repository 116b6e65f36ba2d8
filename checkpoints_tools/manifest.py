"""checksums.json: the sha256 and size of every file of a checkpoint or export folder.

Written last-but-one (before the COMPLETE marker of a checkpoint) by the trainer, `dckpt reshard` and
`dckpt export`; `dckpt verify` checks a folder against it. Paths are relative to the folder, with `/`.
Symbolic links (the parameter aliases of a universal checkpoint) are recorded by their target, not hashed
twice.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from data_pipeline.shard_io import file_sha256

MANIFEST = "checksums.json"
VERSION = 1


def list_files(folder: Path) -> tuple[list[str], dict[str, str]]:
    """(regular files, {link: target}) under folder, relative paths, the manifest itself left out."""
    files, links = [], {}
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                links[(rel_root / d).as_posix()] = os.readlink(Path(root) / d)
                dirs.remove(d)
        for n in names:
            rel = (rel_root / n).as_posix()
            if (Path(root) / n).is_symlink():
                links[rel] = os.readlink(Path(root) / n)
            elif rel != MANIFEST and not n.endswith(".tmp"):
                files.append(rel)
    return sorted(files), links


def hash_files(folder: Path, rels: Iterable[str], progress: bool = False) -> dict[str, dict]:
    rels = list(rels)
    if progress:
        from tqdm import tqdm
        rels = tqdm(rels, desc="checksums", unit="file")
    return {r: {"bytes": (folder / r).stat().st_size, "sha256": file_sha256(folder / r)} for r in rels}


def write_manifest(folder: Path, entries: dict[str, dict], links: dict[str, str] | None = None) -> Path:
    folder = Path(folder)
    body = {"version": VERSION, "files": dict(sorted(entries.items())), "links": dict(sorted((links or {}).items()))}
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def build_manifest(folder: str | Path, progress: bool = False, skip: Iterable[str] = ()) -> Path:
    """Hash every file of `folder` (except `skip`) and write checksums.json."""
    folder = Path(folder)
    files, links = list_files(folder)
    skip = set(skip)
    return write_manifest(folder, hash_files(folder, [f for f in files if f not in skip], progress), links)


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if body.get("version") != VERSION or not isinstance(body.get("files"), dict):
        raise ValueError(f"{path}: not a checksums manifest of version {VERSION}")
    return body


def check_manifest(folder: str | Path, progress: bool = False, sizes_only: bool = False,
                   allowed_extra: Iterable[str] = ()) -> list[str]:
    """Problems found against checksums.json, one line each naming the file (empty: all good)."""
    folder = Path(folder)
    body = read_manifest(folder)
    if body is None:
        return [f"{folder / MANIFEST}: missing"]
    problems = []
    items = list(body["files"].items())
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="verify", unit="file")
    for rel, want in items:
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{path}: {size} bytes, expected {want['bytes']} (truncated or replaced)")
        elif not sizes_only and file_sha256(path) != want["sha256"]:
            problems.append(f"{path}: sha256 differs from {MANIFEST} (altered)")
    for link, target in body.get("links", {}).items():
        path = folder / link
        if not path.is_symlink() or os.readlink(path) != target:
            problems.append(f"{path}: expected a link to {target}")
        elif not path.exists():
            problems.append(f"{path}: link to {target} is broken")
    files, _ = list_files(folder)
    extra = sorted(set(files) - set(body["files"]) - set(allowed_extra))
    problems += [f"{folder / rel}: not listed in {MANIFEST} (added after it was written)" for rel in extra]
    return problems
