"""manifest.json: what a dataset folder holds; the loader validates everything it reads against it.

{
  "format": "diffumamba-tokens", "version": 1,
  "seq_len": 1024, "packing": "packed" | "padded", "dtype": "uint16" | "uint32",
  "tokenizer": {"file": "tokenizer.model", "sha256", "vocab_size", "mask_id", "bos_id", "eos_id", "pad_id"},
  "splits": {"train": {"samples", "tokens", "documents", "shards": [{"name", "samples", "tokens", "bytes",
             "sha256"}, ...]}, "val": {...}},
  "val_every": 100,               # document d went to val when d % val_every == 0 (0: no val split)
  "report": {...},                # what the build skipped (bad files / documents)
  "fingerprint": {...},           # inputs and options; a rebuild with the same fingerprint is a no-op
}
`tokens` counts real tokens (EOS separators included, padding excluded).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT, VERSION = "diffumamba-tokens", 1
SPLITS = ("train", "val")


class ManifestError(ValueError):
    """The dataset folder or its manifest is unusable; the message names the file."""


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        hint = " (an interrupted build? rerun `dshards build` to finish it)" if (
            Path(dataset_dir) / "build_state.json").exists() else ""
        raise ManifestError(f"data.path: no {MANIFEST_NAME} in {dataset_dir}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ManifestError(f"{path}: not a {FORMAT} v{VERSION} manifest "
                            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    for key in ("seq_len", "packing", "dtype", "tokenizer", "splits"):
        if key not in manifest:
            raise ManifestError(f"{path}: missing key {key!r}")
    return manifest


def split_entry(manifest: dict, split: str, dataset_dir) -> dict:
    splits = manifest["splits"]
    if split not in splits:
        raise ManifestError(f"split {split!r} not in {Path(dataset_dir) / MANIFEST_NAME}; "
                            f"has {sorted(splits)}")
    return splits[split]
