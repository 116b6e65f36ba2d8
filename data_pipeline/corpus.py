"""The built-in default corpus: English documentation that ships with every Python install.

Contents, in a fixed order: the docstrings (module, class, function; at least 8 words) of every standard
library source file, files sorted by path, docstrings in source order, test directories excluded;
then the reference-manual topics of `pydoc_data.topics` (the text behind `help("if")`), sorted by name.
The sources are parsed with `ast`, never imported, so collecting has no side effects. Blank lines inside
a docstring are folded so that blank lines separate documents (the text input convention of dshards).
The text is identical for a given Python version (about 2 MB on CPython 3.11).
"""
from __future__ import annotations

import ast
import fcntl
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"}
MIN_WORDS = 8
FILE_BYTES = 512 * 1024  # several files, so a build can use several tokenizer processes


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Module / class / function docstrings in source order."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(tree):
        yield from _docstrings(child)


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    if not files:
        raise FileNotFoundError(f"default corpus: no Python standard library sources under {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def iter_default_documents() -> Iterator[str]:
    for path in _stdlib_sources():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # e.g. deliberately broken files used by the stdlib's own tools
        for doc in _docstrings(tree):
            if len(doc.split()) >= MIN_WORDS:
                yield doc
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        yield topics[name]


def _fold(doc: str) -> str:
    lines = [line.rstrip() for line in doc.strip().splitlines()]
    return "\n".join(line for line in lines if line)


def write_default_corpus(out_dir: str | Path, max_bytes: int | None = None) -> list[Path]:
    """Write the corpus as text files (documents separated by blank lines); returns the files in order.

    Idempotent: an existing complete corpus written with the same max_bytes is reused.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "corpus_done.json"
    if done.exists():
        info = json.loads(done.read_text())
        if info.get("max_bytes") == max_bytes:
            return [out_dir / name for name in info["files"]]
    for old in out_dir.glob("stdlib_docs_*.txt"):
        old.unlink()
    files, buf, buf_bytes, total = [], [], 0, 0
    for doc in iter_default_documents():
        blob = _fold(doc).encode("utf-8") + b"\n\n"
        if max_bytes is not None and total + len(blob) > max_bytes:
            break
        buf.append(blob)
        buf_bytes, total = buf_bytes + len(blob), total + len(blob)
        if buf_bytes >= FILE_BYTES:
            files.append(_write(out_dir, len(files), buf))
            buf, buf_bytes = [], 0
    if buf:
        files.append(_write(out_dir, len(files), buf))
    done.write_text(json.dumps({"max_bytes": max_bytes, "files": [f.name for f in files], "bytes": total}))
    return files


def _write(out_dir: Path, index: int, blobs: list[bytes]) -> Path:
    path = out_dir / f"stdlib_docs_{index:03d}.txt"
    path.write_bytes(b"".join(blobs))
    return path


def build_default_dataset(out_dir: str | Path, seq_len: int = 512, vocab_size: int = 4096, *,
                          max_bytes: int | None = None, num_procs: int | None = None,
                          progress: bool = True) -> Path:
    """Corpus + tokenizer + shards under out_dir, each step cached; returns the dataset folder.

    out_dir/corpus/                 the text files
    out_dir/tokenizer_v{V}.model    BPE tokenizer with vocab_size V ([MASK] included)
    out_dir/data_v{V}_L{L}/         the dataset (manifest.json, tokenizer.model, train/val shards)
    A second call with the same arguments only checks the manifest and returns.
    """
    from data_pipeline.build import build_shards
    from data_pipeline.tokenizer import Tokenizer

    out_dir = Path(out_dir)
    suffix = "" if max_bytes is None else f"_b{max_bytes}"
    dataset = out_dir / f"data_v{vocab_size}_L{seq_len}{suffix}"
    if (dataset / "manifest.json").exists():
        return dataset  # cached
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent callers (test sessions, ranks) build it once
        if (dataset / "manifest.json").exists():
            return dataset
        files = write_default_corpus(out_dir / f"corpus{suffix}", max_bytes=max_bytes)
        tok_prefix = out_dir / f"tokenizer_v{vocab_size}{suffix}"
        if not Path(f"{tok_prefix}.model").exists():
            Tokenizer.train(files, tok_prefix, vocab_size, model_type="bpe", num_threads=num_procs)
        build_shards([str(f) for f in files], dataset, f"{tok_prefix}.model", seq_len, val_fraction=0.02,
                     samples_per_shard=1024, num_procs=num_procs, progress=progress)
    return dataset
