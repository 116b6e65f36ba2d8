"""Building a dataset folder: source documents -> token sequences -> tar shards + manifest.json.

Pipeline (all ordered, so the output is a pure function of inputs + options + tokenizer):
    main process: read raw documents file by file, in chunks of ~1 MB
    tokenizer processes: decode + encode a chunk -> one flat token array (each document + EOS)
    main process: chunks in input order -> train/val split (every val_every-th document) -> Packer
                  -> ShardWriter per split
Packing: "packed" concatenates documents, each followed by EOS, and cuts fixed seq_len sequences (the last
sequence of a split may be shorter; the loader pads it); "padded" gives each document its own sample(s)
(documents longer than seq_len are cut into several), the loader pads them.
Resume: after each chunk that completed a shard, build_state.json records the input cursor, the packers'
leftover tokens and the writers' checkpoints; a rerun with the same fingerprint continues from there (it
re-reads, but does not re-tokenize, the current input file up to the cursor).
"""
from __future__ import annotations

import collections
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.manifest import FORMAT, MANIFEST_NAME, VERSION, ManifestError, write_json_atomic
from data_pipeline.shard_io import ShardWriter, token_dtype
from data_pipeline.sources import (
    TXT_DOC_MODES,
    BadDocument,
    BadInputError,
    InputReport,
    decode_unit,
    expand_inputs,
    input_kind,
    iter_units,
)
from data_pipeline.tokenizer import Tokenizer

STATE_NAME = "build_state.json"
PACKING_MODES = ("packed", "padded")
CHUNK_BYTES, CHUNK_DOCS = 1 << 20, 4096  # unit of work sent to a tokenizer process
BAD_FILE = -1                            # the document number of a "bad file" event in a chunk


# ------------------------------------------------------------------------------------ tokenizer processes
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def encode_chunk(items: list[tuple[bytes, str, str]]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(tokens of all good documents, each followed by EOS; tokens per item, 0 when skipped; the reason
    each bad item was skipped). One flat array per chunk keeps inter-process traffic cheap."""
    flat, lengths, errors = [], np.zeros(len(items), dtype=np.int64), {}
    eos = [_worker_tokenizer.eos_id]
    for i, (raw, kind, text_field) in enumerate(items):
        try:
            text = decode_unit(raw, kind, text_field)
        except BadDocument as e:
            errors[i] = str(e)
            continue
        if text:
            ids = _worker_tokenizer.encode(text) + eos
            flat.extend(ids)
            lengths[i] = len(ids)
    return np.asarray(flat, dtype=np.uint32), lengths, errors


def _ordered_map(fn, chunks, pool, max_pending: int):
    """pool.imap with bounded read-ahead (imap itself would read all input into memory)."""
    if pool is None:
        for meta, payload in chunks:
            yield meta, fn(payload)
        return
    pending = collections.deque()
    for meta, payload in chunks:
        pending.append((meta, pool.apply_async(fn, (payload,))))
        if len(pending) >= max_pending:
            m, res = pending.popleft()
            yield m, res.get()
    while pending:
        m, res = pending.popleft()
        yield m, res.get()


# ------------------------------------------------------------------------------------ packing
class Packer:
    def __init__(self, seq_len: int, packed: bool, carry: list[int] | None = None):
        self.seq_len, self.packed = seq_len, packed
        self.carry = np.asarray(carry or [], dtype=np.uint32)

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> list[np.ndarray]:
        """Sequences completed by these documents (tokens: their concatenation, EOS included)."""
        L = self.seq_len
        if self.packed:
            stream = np.concatenate([self.carry, tokens])
            n_full = len(stream) // L
            self.carry = stream[n_full * L:]
            return list(stream[:n_full * L].reshape(n_full, L))
        out = []
        for doc in np.split(tokens, np.cumsum(doc_lengths)[:-1]):
            out += [doc[i:i + L] for i in range(0, len(doc), L)]
        return out

    def flush(self) -> list[np.ndarray]:
        out = [self.carry] if len(self.carry) else []
        self.carry = np.asarray([], dtype=np.uint32)
        return out


# ------------------------------------------------------------------------------------ the build
def _clean(out_dir: Path) -> None:
    for pattern in ("train-*.tar", "val-*.tar", "*.tar.partial", MANIFEST_NAME, STATE_NAME):
        for p in out_dir.glob(pattern):
            p.unlink()


def _chunks(paths, cursor, strict, txt_docs, text_field, progress):
    """(metadata [(doc number, file, unit, line)], work items) chunks from the cursor onwards."""
    file0, unit0, doc = cursor
    meta, items, size = [], [], 0
    for file_idx in range(file0, len(paths)):
        path, kind = paths[file_idx], input_kind(paths[file_idx])
        file_report, last_pos = InputReport(strict), 0
        for unit, line_no, raw, pos in iter_units(path, txt_docs=txt_docs, report=file_report,
                                                  start_unit=unit0 if file_idx == file0 else 0):
            meta.append((doc, file_idx, unit, line_no))
            items.append((raw, kind, text_field))
            doc, size = doc + 1, size + len(raw)
            progress.update(pos - last_pos)
            last_pos = pos
            if size >= CHUNK_BYTES or len(items) >= CHUNK_DOCS:
                yield meta, items
                meta, items, size = [], [], 0
        for problem in file_report.bad_files:  # an in-order event, so a resumed build counts it once
            meta.append((BAD_FILE, file_idx, problem[len(str(path)) + 2:], None))
            items.append((b"", "text", text_field))
        progress.update(max(0, path.stat().st_size - last_pos) if path.exists() else 0)
    if items:
        yield meta, items


def _resume_or_start(out_dir: Path, fingerprint: dict, overwrite: bool) -> dict | None:
    """The finished manifest (nothing to do), a build state to resume from, or None (start afresh)."""
    manifest_path, state_path = out_dir / MANIFEST_NAME, out_dir / STATE_NAME
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint and not overwrite:
            return manifest
        if not overwrite:
            raise ManifestError(f"{manifest_path}: the dataset there was built from other inputs or options; "
                                f"pass --overwrite to replace it")
        _clean(out_dir)
    elif state_path.exists():
        state = json.loads(state_path.read_text())
        if state["fingerprint"] == fingerprint and not overwrite:
            done = len(state["writers"]["train"]["shards"])
            print(f"resuming the build in {out_dir}: {done} train shard(s) were done")
            return state
        if not overwrite:
            raise ManifestError(f"{state_path}: an interrupted build with other inputs or options is here; "
                                f"pass --overwrite to start over")
        _clean(out_dir)
    return None


def build_shards(inputs: list[str], out_dir: str | Path, tokenizer: str | Path, seq_len: int, *,
                 packing: str = "packed", val_fraction: float = 0.01, samples_per_shard: int = 8192,
                 num_procs: int | None = None, text_field: str = "text", txt_docs: str = "paragraph",
                 strict: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Build (or finish, or confirm up to date) a dataset folder; returns its manifest."""
    if packing not in PACKING_MODES:
        raise ValueError(f"packing: must be one of {PACKING_MODES}, got {packing!r}")
    if txt_docs not in TXT_DOC_MODES:
        raise ValueError(f"txt_docs: must be one of {TXT_DOC_MODES}, got {txt_docs!r}")
    if seq_len < 2 or samples_per_shard < 1 or not 0 <= val_fraction < 1:
        raise ValueError(f"need seq_len >= 2, samples_per_shard >= 1, 0 <= val_fraction < 1; got {seq_len}, "
                         f"{samples_per_shard}, {val_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(tokenizer)
    report = InputReport(strict)
    paths = expand_inputs(list(inputs), strict=strict, report=report)
    val_every = round(1 / val_fraction) if val_fraction > 0 else 0
    fingerprint = {"inputs": [[str(p), p.stat().st_size] for p in paths], "tokenizer_sha256": tok.sha256,
                   "seq_len": seq_len, "packing": packing, "val_every": val_every,
                   "samples_per_shard": samples_per_shard, "text_field": text_field, "txt_docs": txt_docs}
    state = _resume_or_start(out_dir, fingerprint, overwrite)
    if state is not None and "format" in state:
        return state  # up to date
    if tok.path.resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(tok.path, out_dir / "tokenizer.model")

    if state is not None:
        report = InputReport.from_dict(state["report"], strict)
    cursor = tuple(state["cursor"]) if state else (0, 0, 0)
    docs = dict(state["documents"]) if state else {"train": 0, "val": 0}
    packers = {s: Packer(seq_len, packing == "packed", state["carry"][s] if state else None) for s in docs}
    shard_meta = {"tokenizer_sha256": tok.sha256, "seq_len": seq_len}
    writers = {s: ShardWriter(out_dir, s, dtype=token_dtype(tok.vocab_size), meta=shard_meta,
                              samples_per_shard=samples_per_shard,
                              state=state["writers"][s] if state else None) for s in docs}
    state_path = out_dir / STATE_NAME

    def save_state(cursor):
        write_json_atomic(state_path, {
            "fingerprint": fingerprint, "cursor": list(cursor), "documents": docs, "report": report.to_dict(),
            "carry": {s: p.carry.tolist() for s, p in packers.items()},
            "writers": {s: w.checkpoint() for s, w in writers.items()}})

    sizes = [p.stat().st_size for p in paths]
    # no more processes than there are chunks of work (a small corpus on a big node needs few)
    num_procs = max(1, min(num_procs or os.cpu_count() or 1, -(-sum(sizes[cursor[0]:]) // CHUNK_BYTES)))
    pool = (multiprocessing.get_context().Pool(num_procs, _init_worker, (str(tok.path),))
            if num_procs > 1 else None)  # started before tqdm's monitor thread exists
    if pool is None:
        _init_worker(str(tok.path))
    bar = tqdm(total=sum(sizes), initial=sum(sizes[:cursor[0]]), unit="B", unit_scale=True,
               desc=f"dshards {out_dir.name}", disable=not progress)
    try:
        chunks = _chunks(paths, cursor, strict, txt_docs, text_field, bar)
        for metas, (tokens, lengths, errors) in _ordered_map(encode_chunk, chunks, pool, 2 * num_procs):
            is_val = np.zeros(len(metas), dtype=bool)
            for i, (doc, file_idx, unit, line_no) in enumerate(metas):  # reports, in input order
                if doc == BAD_FILE:
                    report.bad_file(paths[file_idx], unit)
                    cursor = (file_idx + 1, 0, cursor[2])
                    continue
                cursor = (file_idx, unit + 1, doc + 1)
                if i in errors:
                    report.bad_document(f"{paths[file_idx]}:{line_no}", errors[i])
                elif lengths[i] == 0:
                    report.empty_documents += 1
                else:
                    is_val[i] = bool(val_every) and doc % val_every == 0
            good = lengths > 0
            token_is_val = np.repeat(is_val, lengths)
            completed = False
            for split, doc_sel, tok_sel in (("train", good & ~is_val, ~token_is_val),
                                            ("val", is_val, token_is_val)):
                docs[split] += int(doc_sel.sum())
                for seq in packers[split].add(tokens[tok_sel], lengths[doc_sel]):
                    completed |= writers[split].add(seq)
            if completed:  # checkpoint at a chunk boundary, right after a shard was published
                save_state(cursor)
                bar.set_postfix(shards=sum(len(w.shards) for w in writers.values()), refresh=False)
        for split in docs:
            for seq in packers[split].flush():
                writers[split].add(seq)
            writers[split].close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    if docs["train"] == 0:
        raise BadInputError(f"no usable documents in {inputs} ({report.summary()})")
    splits = {s: {"samples": sum(e["samples"] for e in w.shards), "documents": docs[s],
                  "tokens": sum(e["tokens"] for e in w.shards), "shards": w.shards}
              for s, w in writers.items()}
    manifest = {"format": FORMAT, "version": VERSION, "seq_len": seq_len, "packing": packing,
                "dtype": token_dtype(tok.vocab_size),
                "tokenizer": {"file": "tokenizer.model", "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                              "mask_id": tok.mask_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                              "pad_id": tok.pad_id},
                "splits": splits, "val_every": val_every, "report": report.to_dict(),
                "fingerprint": fingerprint}
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    state_path.unlink(missing_ok=True)
    return manifest
