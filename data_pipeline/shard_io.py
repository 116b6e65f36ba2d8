"""Shard files: webdataset-compatible tars of token arrays, written resumably and read by random access.

Layout of `{split}-{n:06d}.tar`:
    __shard__              JSON: split, shard name, dtype, seq_len, tokenizer sha256 (webdataset skips it)
    0000012288.u16         one sample: the token ids of one sequence, little-endian uint16 (or .u32),
    0000012289.u16         ... keys are the sample's index in its split, so they are unique per split
Tars are byte-reproducible (fixed mtime/owner) so an interrupted build resumes into identical files.
Any webdataset pipeline reads the samples: `wds.WebDataset(url)` gives {"__key__", "u16": bytes}.
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import tarfile
from pathlib import Path

import numpy as np

META_MEMBER = "__shard__"
TAR_FORMAT = tarfile.USTAR_FORMAT


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def sample_ext(dtype: str) -> str:
    return {"uint16": "u16", "uint32": "u32"}[dtype]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    return info


class ShardWriter:
    """Writes one split's shards of `samples_per_shard` samples each.

    checkpoint() returns a small JSON-able state (finished shards + the byte offset reached in the open
    .partial file, flushed to disk); a new writer built from that state truncates the .partial file at
    that offset and continues, so nothing written before the checkpoint is redone.
    """

    def __init__(self, out_dir: Path, split: str, *, dtype: str, samples_per_shard: int, meta: dict,
                 state: dict | None = None):
        self.out_dir, self.split, self.dtype = Path(out_dir), split, dtype
        self.samples_per_shard, self.meta = samples_per_shard, meta
        self.np_dtype = np.dtype(dtype).newbyteorder("<")
        self.ext = sample_ext(dtype)
        state = state or {"shards": [], "next_key": 0, "open": None}
        self.shards: list[dict] = list(state["shards"])
        self.next_key: int = state["next_key"]
        self._file = self._tar = None
        self._open_samples = self._open_tokens = 0
        if state["open"] is not None:
            self._reopen(state["open"])
        first_stale = len(self.shards) + (state["open"] is not None)
        for index in range(first_stale, 10**6):  # files written after the checkpoint
            stale = [self.out_dir / self._name(index), self.out_dir / (self._name(index) + ".partial")]
            if not any(p.exists() for p in stale):
                break
            for p in stale:
                p.unlink(missing_ok=True)

    # ---- paths
    def _name(self, index: int) -> str:
        return f"{self.split}-{index:06d}.tar"

    def _partial(self) -> Path:
        return self.out_dir / (self._name(len(self.shards)) + ".partial")

    # ---- writing
    def _start(self) -> None:
        self._file = open(self._partial(), "wb")  # noqa: SIM115 (open across add() calls; closed in _finish)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=TAR_FORMAT)  # noqa: SIM115
        meta = dict(self.meta, split=self.split, shard=self._name(len(self.shards)), dtype=self.dtype)
        blob = json.dumps(meta, sort_keys=True).encode()
        self._tar.addfile(_tarinfo(META_MEMBER, len(blob)), io.BytesIO(blob))
        self._open_samples = self._open_tokens = 0

    def _reopen(self, open_state: dict) -> None:
        path, final = self._partial(), self.out_dir / self._name(len(self.shards))
        if not path.exists() and final.exists():  # finished after the checkpoint: same bytes up to the offset
            os.replace(final, path)
        if not path.is_file() or path.stat().st_size < open_state["offset"]:
            raise RuntimeError(f"cannot resume: {path} is missing or shorter than the checkpoint says; "
                               f"rebuild with --overwrite")
        self._file = open(path, "r+b")  # noqa: SIM115 (open across add() calls; closed in _finish)
        self._file.seek(open_state["offset"])
        self._file.truncate()  # drop what was written after the checkpoint: it will be written again
        # appends at the current position of the file
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=TAR_FORMAT)  # noqa: SIM115
        self._open_samples, self._open_tokens = open_state["samples"], open_state["tokens"]

    def add(self, tokens: np.ndarray) -> bool:
        """Append one sample; returns True when this completed a shard."""
        if self._tar is None:
            self._start()
        blob = np.ascontiguousarray(tokens, dtype=self.np_dtype).tobytes()
        self._tar.addfile(_tarinfo(f"{self.next_key:010d}.{self.ext}", len(blob)), io.BytesIO(blob))
        self.next_key += 1
        self._open_samples += 1
        self._open_tokens += len(tokens)
        if self._open_samples >= self.samples_per_shard:
            self._finish()
            return True
        return False

    def _finish(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        partial, final = self._partial(), self.out_dir / self._name(len(self.shards))
        self.shards.append({"name": final.name, "samples": self._open_samples, "tokens": self._open_tokens,
                            "bytes": partial.stat().st_size, "sha256": file_sha256(partial)})
        os.replace(partial, final)
        self._file = self._tar = None

    def close(self) -> None:
        """Finish the last (possibly short) shard."""
        if self._tar is not None and self._open_samples > 0:
            self._finish()

    def checkpoint(self) -> dict:
        open_state = None
        if self._tar is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            open_state = {"offset": self._tar.offset, "samples": self._open_samples,
                          "tokens": self._open_tokens}
        return {"shards": list(self.shards), "next_key": self.next_key, "open": open_state}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._tar = None


# ------------------------------------------------------------------------------------------- reading
class ShardCorrupt(ValueError):
    """The shard cannot be read as expected; the message names it."""


def scan_tar(buf) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, data offset, size) of each member of an uncompressed tar, and what stopped the scan early.

    A few lines instead of tarfile: reading only the headers we need is ~15x faster, and a damaged
    archive yields the intact members before the damage plus the reason.
    """
    members, pos, end = [], 0, len(buf)
    while pos + 512 <= end:
        header = buf[pos:pos + 512]
        if header.count(0) == 512:
            return members, None  # end-of-archive block
        try:
            checksum = int(header[148:156].split(b"\0")[0].strip() or b"0", 8)
            size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
        except ValueError:
            return members, f"garbled tar header at byte {pos}"
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
            return members, f"bad tar header checksum at byte {pos}"
        if header[156:157] not in (b"0", b"\0"):
            return members, f"unexpected member type {header[156:157]!r} at byte {pos}"
        if pos + 512 + size > end:
            return members, f"file ends inside member {len(members)} (truncated)"
        members.append((header[:100].split(b"\0")[0].decode("utf-8", "replace"), pos + 512, size))
        pos += 512 + (size + 511) // 512 * 512
    return members, "no end-of-archive marker (truncated)"


class ShardReader:
    """Random access to the samples of one shard: the file is memory-mapped and its headers indexed.

    Opening costs one pass over the headers (512 bytes per sample; the page cache does the rest). A
    damaged tar gives fewer readable samples than the manifest promises; read() raises ShardCorrupt for
    the missing ones. expect: the build facts ("tokenizer_sha256", "dtype", "seq_len") from the manifest.
    """

    def __init__(self, path: Path, entry: dict, expect: dict, verify_checksum: bool = False):
        self.path, self.expected_samples = Path(path), entry["samples"]
        self.np_dtype = np.dtype(expect["dtype"]).newbyteorder("<")
        self.itemsize, self.seq_len = self.np_dtype.itemsize, expect["seq_len"]
        if verify_checksum and file_sha256(self.path) != entry["sha256"]:
            raise ShardCorrupt(f"shard {self.path}: sha256 differs from the manifest "
                               f"(corrupt or replaced file)")
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: empty file
            raise ShardCorrupt(f"shard {self.path}: cannot be read ({e})") from None
        members, self.problem = scan_tar(self._map)
        if not members or members[0][0] != META_MEMBER:
            self.close()
            raise ShardCorrupt(f"shard {self.path}: no {META_MEMBER} header member (not a dshards shard, or "
                               f"damaged: {self.problem})")
        try:
            meta = json.loads(self._map[members[0][1]:members[0][1] + members[0][2]])
        except ValueError as e:
            self.close()
            raise ShardCorrupt(f"shard {self.path}: unreadable {META_MEMBER} ({e})") from None
        for key in ("tokenizer_sha256", "dtype", "seq_len"):
            if meta.get(key) != expect[key]:
                self.close()
                raise ShardCorrupt(f"shard {self.path}: built with {key}={meta.get(key)!r} but the manifest "
                                   f"says {expect[key]!r} (a shard from another build or tokenizer)")
        self.offsets = [(offset, size) for _, offset, size in members[1:]]
        if len(self.offsets) > self.expected_samples:
            self.close()
            raise ShardCorrupt(f"shard {self.path}: {len(self.offsets)} samples but the manifest says "
                               f"{self.expected_samples} (a different file?)")
        if len(self.offsets) < self.expected_samples:
            self.problem = (f"corrupt or truncated: {len(self.offsets)} of {self.expected_samples} samples "
                            f"readable ({self.problem})")

    def read(self, i: int, vocab_size: int) -> np.ndarray:
        """Tokens of sample i (validated: length in [1, seq_len], ids < vocab_size)."""
        if i >= len(self.offsets):
            raise ShardCorrupt(f"shard {self.path} sample {i}: {self.problem}")
        offset, size = self.offsets[i]
        if size == 0 or size % self.itemsize or size // self.itemsize > self.seq_len:
            raise ShardCorrupt(f"shard {self.path} sample {i}: bad size {size} bytes")
        tokens = np.frombuffer(self._map[offset:offset + size], dtype=self.np_dtype)
        if int(tokens.max()) >= vocab_size:
            raise ShardCorrupt(f"shard {self.path} sample {i}: token id {int(tokens.max())} >= vocab_size "
                               f"{vocab_size} (another tokenizer?)")
        return tokens

    def close(self) -> None:
        self._map.close()
