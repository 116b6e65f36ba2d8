"""DataConfig: everything the training data stream needs, validated at construction.

A dataset is a folder built by `dshards build` (see docs/data.md): manifest.json, a copy of the tokenizer
(tokenizer.model) and webdataset tar shards for the "train" and "val" splits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from model.config import ConfigError, reject_unknown_fields
from model.diffusion import DEFAULT_EPS


@dataclass
class DataConfig:
    path: str = ""                      # dataset folder holding manifest.json and the shards
    tokenizer: str | None = None        # .model file; None = the copy inside the dataset folder
    seq_len: int = 1024                 # must equal the seq_len the shards were built with
    num_workers: int = 2                # loader worker processes per data-parallel rank (0 = in-process)
    shuffle: bool = True                # shuffle shards and samples (train); val is always read in order
    shuffle_buffer: int = 8192          # samples permuted together (memory of the equivalent shuffle buffer)
    epochs: int | None = None           # None = forever
    eps: float = DEFAULT_EPS            # t ~ U(eps, 1]
    max_bad_samples: int = 0            # unreadable samples tolerated (replaced by empty rows); 0 = strict
    verify_checksums: bool = False      # sha256 each shard against the manifest when a worker opens it
    prefetch_factor: int = 4            # batches each worker prepares ahead
    pin_memory: bool = True             # only takes effect when CUDA is available
    worker_timeout_s: float = 300.0     # a silent worker is an error after this long, never a hang (0 = off)
    reshard_on_resume: bool = False     # resuming with another dp/batch layout restarts at the next epoch

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, fld: str, msg: str):
            if not ok:
                raise ConfigError(f"data.{fld}: {msg}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(isinstance(self.path, (str, Path)) and str(self.path) != "", "path",
             "must name the dataset folder (the one holding manifest.json)")
        need(self.tokenizer is None or str(self.tokenizer).endswith(".model"), "tokenizer",
             f"must be a sentencepiece .model file or None, got {self.tokenizer!r}")
        need(is_int(self.seq_len) and self.seq_len >= 2, "seq_len",
             f"must be an int >= 2, got {self.seq_len!r}")
        need(is_int(self.num_workers) and self.num_workers >= 0, "num_workers",
             f"must be an int >= 0, got {self.num_workers!r}")
        need(isinstance(self.shuffle, bool), "shuffle", f"must be true or false, got {self.shuffle!r}")
        need(is_int(self.shuffle_buffer) and self.shuffle_buffer >= 1, "shuffle_buffer",
             f"must be an int >= 1, got {self.shuffle_buffer!r}")
        need(self.epochs is None or (is_int(self.epochs) and self.epochs >= 1), "epochs",
             f"must be None (forever) or an int >= 1, got {self.epochs!r}")
        need(isinstance(self.eps, (int, float)) and 0 < self.eps < 1, "eps",
             f"must be in (0, 1), got {self.eps!r}")
        need(is_int(self.max_bad_samples) and self.max_bad_samples >= 0, "max_bad_samples",
             f"must be an int >= 0 (0 = strict), got {self.max_bad_samples!r}")
        need(isinstance(self.verify_checksums, bool), "verify_checksums",
             f"must be true or false, got {self.verify_checksums!r}")
        need(is_int(self.prefetch_factor) and self.prefetch_factor >= 1, "prefetch_factor",
             f"must be an int >= 1, got {self.prefetch_factor!r}")
        need(isinstance(self.pin_memory, bool), "pin_memory",
             f"must be true or false, got {self.pin_memory!r}")
        need(isinstance(self.worker_timeout_s, (int, float)) and self.worker_timeout_s >= 0,
             "worker_timeout_s", f"must be >= 0, got {self.worker_timeout_s!r}")
        need(isinstance(self.reshard_on_resume, bool), "reshard_on_resume",
             f"must be true or false, got {self.reshard_on_resume!r}")

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer to use: the configured one, else the copy stored with the dataset."""
        return Path(self.tokenizer) if self.tokenizer else Path(self.path) / "tokenizer.model"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(d["path"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        reject_unknown_fields(cls, d, "data")
        return cls(**d)

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)
