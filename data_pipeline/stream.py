"""MaskedBatchLoader: the training / evaluation stream of masked micro-batches of one data-parallel rank.

    loader = MaskedBatchLoader(cfg, split="train", dp_rank=r, dp_size=R, micro_batch_size=B,
                               grad_accum=G, mask_id=tok.mask_id, seed=seed)
    for batch in loader:   # input_ids, targets (B, L) long; t (B,) float32; loss_mask (B, L) float32

Micro-batch k of this rank (k counts micro-batches over the whole run) is fully determined by k:
    epoch, index = divmod(k, batches_per_epoch)       -> its rows, via sampler.EpochPlan
    step, micro  = divmod(k, grad_accum)               -> its mask, via model.diffusion.mask_batch with
    position of row j = (micro * dp_size + dp_rank) * B + j,  global_batch_size = B * grad_accum * dp_size
Loader worker w of W makes micro-batches k = w, w + W, ... and torch's DataLoader returns them round-robin,
i.e. in order of k. The state is k itself (plus counters): resuming at any k reads only the shards that
batch k needs (one header scan per shard opened, no replay), whatever the number of workers.
The split is by data-parallel rank, never by global rank: pipeline stages of one replica pass the same
dp_rank and see identical batches.

Bad data (docs/data.md): the dataset folder, manifest and tokenizer are checked at construction (clear
errors). A shard that is missing, has the wrong size, or turns out unreadable, and any sample that fails
validation, becomes an empty row (all padding, loss_mask 0: nothing to learn, batch shapes and counts
unchanged on every rank), counted in `bad_samples`; past cfg.max_bad_samples it raises BadDataError
naming the shard. max_bad_samples=0 (default) is strict: the first bad sample raises.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.manifest import ManifestError, load_manifest, split_entry
from data_pipeline.sampler import EpochPlan
from data_pipeline.shard_io import ShardCorrupt, ShardReader, file_sha256
from model.diffusion import mask_batch

STATE_VERSION = 1


class BadDataError(RuntimeError):
    """More bad samples than data.max_bad_samples allows; the message names the shard(s)."""


class _MicroBatches(IterableDataset):
    """Micro-batches k = k0 + worker, + num_workers, ... (in a loader worker, or in-process)."""

    def __init__(self, spec: dict, plan: EpochPlan):
        self.spec, self.plan = spec, plan
        self._readers: OrderedDict = OrderedDict()

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k, end = self.spec["k0"] + worker, self.spec["end"]
        try:
            while end is None or k < end:
                yield self.make(k)
                k += num_workers
        finally:
            for reader in self._readers.values():
                if isinstance(reader, ShardReader):
                    reader.close()
            self._readers.clear()

    def _reader(self, shard: int) -> ShardReader | str:
        """An open reader, or the reason the shard is unusable."""
        s = self.spec
        if shard in s["known_bad"]:
            return s["known_bad"][shard]
        if shard not in self._readers:
            entry = s["shards"][shard]
            try:
                self._readers[shard] = ShardReader(Path(s["root"]) / entry["name"], entry, s["expect"],
                                                   verify_checksum=s["verify_checksums"])
            except ShardCorrupt as e:
                self._readers[shard] = str(e)
            while len(self._readers) > s["open_shards"]:
                _, old = self._readers.popitem(last=False)
                if isinstance(old, ShardReader):
                    old.close()
        self._readers.move_to_end(shard)
        return self._readers[shard]

    def make(self, k: int) -> tuple[int, dict, list[str]]:
        s, plan = self.spec, self.plan
        bpe, B, L = plan.batches_per_epoch, s["micro_batch_size"], s["seq_len"]
        epoch, index = s["base_epoch"] + k // bpe, k % bpe
        step, micro = s["base_step"] + k // s["grad_accum"], k % s["grad_accum"]
        shard_ids, locals_ = plan.batch(epoch, s["dp_rank"], index)
        rows = np.full((B, L), s["pad_id"], dtype=np.int64)
        loss_mask = np.zeros((B, L), dtype=np.float32)
        bad: list[str] = []
        for j, (shard, i) in enumerate(zip(shard_ids.tolist(), locals_.tolist())):
            if shard == EpochPlan.PAD:
                continue  # evaluation padding past the end of the split
            reader = self._reader(shard)
            try:
                if isinstance(reader, str):
                    raise ShardCorrupt(reader)
                tokens = reader.read(i, s["vocab_size"])
            except ShardCorrupt as e:
                bad.append(str(e))
                continue
            rows[j, :len(tokens)] = tokens
            loss_mask[j, :len(tokens)] = 1.0
        positions = (micro * s["dp_size"] + s["dp_rank"]) * B + torch.arange(B)
        batch = mask_batch(torch.from_numpy(rows), seed=s["seed"], step=step, positions=positions,
                           global_batch_size=B * s["grad_accum"] * s["dp_size"], mask_id=s["mask_id"],
                           eps=s["eps"], loss_mask=torch.from_numpy(loss_mask))
        return k, batch, bad


def _open_dataset(cfg: DataConfig, split: str, mask_id: int) -> tuple[dict, list[dict]]:
    """The manifest and the non-empty shards of the split, after checking they fit this run."""
    root = Path(cfg.path)
    manifest = load_manifest(root)
    tok = manifest["tokenizer"]
    if cfg.seq_len != manifest["seq_len"]:
        raise ManifestError(f"data.seq_len: {cfg.seq_len} but the dataset {root} was built with seq_len "
                            f"{manifest['seq_len']}")
    tok_path = cfg.tokenizer_path
    if not tok_path.is_file():
        raise ManifestError(f"data.tokenizer: no tokenizer file at {tok_path}")
    tok_sha = file_sha256(tok_path)
    if tok_sha != tok["sha256"]:
        raise ManifestError(f"data.tokenizer: {tok_path} is not the tokenizer {root} was built with "
                            f"(sha256 {tok_sha[:12]} vs manifest {tok['sha256'][:12]})")
    if mask_id != tok["mask_id"]:
        raise ManifestError(f"MaskedBatchLoader: mask_id={mask_id} but the dataset's tokenizer has mask_id "
                            f"{tok['mask_id']}")
    shards = [e for e in split_entry(manifest, split, root)["shards"] if e["samples"] > 0]  # skip empty ones
    if not shards:
        raise ManifestError(f"data.path: split {split!r} of {root} has no samples")
    return manifest, shards


class MaskedBatchLoader:
    def __init__(self, cfg: DataConfig, *, split: str = "train", dp_rank: int, dp_size: int,
                 micro_batch_size: int, grad_accum: int, mask_id: int, seed: int):
        for name, value, low in (("dp_size", dp_size, 1), ("micro_batch_size", micro_batch_size, 1),
                                 ("grad_accum", grad_accum, 1), ("dp_rank", dp_rank, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"MaskedBatchLoader: {name} must be an int >= {low}, got {value!r}")
        if dp_rank >= dp_size:
            raise ValueError(f"MaskedBatchLoader: dp_rank={dp_rank} must be < dp_size={dp_size}")
        self.cfg, self.split = cfg, split
        self.dp_rank, self.dp_size, self.micro_batch_size = dp_rank, dp_size, micro_batch_size
        self.grad_accum, self.mask_id, self.seed = grad_accum, mask_id, seed
        manifest, shards = _open_dataset(cfg, split, mask_id)
        known_bad = self._check_files(Path(cfg.path), shards)
        train = split == "train"
        self.plan = EpochPlan([e["samples"] for e in shards], dp_size=dp_size,
                              micro_batch_size=micro_batch_size, seed=seed, shuffle=cfg.shuffle and train,
                              window=cfg.shuffle_buffer, drop_remainder=train)
        self.batches_per_epoch = self.plan.batches_per_epoch
        if self.batches_per_epoch == 0:
            raise ManifestError(f"data.path: split {split!r} has {self.plan.total} samples, fewer than one "
                                f"global micro-batch (dp_size * micro_batch_size = "
                                f"{dp_size * micro_batch_size})")
        self.dataset_id = hashlib.sha256(json.dumps([(e["name"], e["sha256"]) for e in shards]).encode()
                                         ).hexdigest()[:16]
        # shard readers kept open per worker: enough for the shards that two shuffle windows span
        shard_size = max(e["samples"] for e in shards)
        open_shards = min(len(shards), 64, 2 * -(-cfg.shuffle_buffer // shard_size) + 2)
        tok = manifest["tokenizer"]
        self._spec = {"root": cfg.path, "shards": shards, "known_bad": known_bad, "open_shards": open_shards,
                      "expect": {"tokenizer_sha256": tok["sha256"], "dtype": manifest["dtype"],
                                 "seq_len": manifest["seq_len"]},
                      "verify_checksums": cfg.verify_checksums, "seq_len": cfg.seq_len, "eps": cfg.eps,
                      "vocab_size": tok["vocab_size"], "pad_id": tok["pad_id"], "mask_id": mask_id,
                      "seed": seed, "dp_rank": dp_rank, "dp_size": dp_size,
                      "micro_batch_size": micro_batch_size, "grad_accum": grad_accum}
        self._k = 0                 # micro-batches yielded since the base
        self._base_epoch = self._base_step = 0
        self._base_consumed = 0     # rows yielded before the base (a resharded resume)
        self.bad_samples = 0

    def _check_files(self, root: Path, shards: list[dict]) -> dict[int, str]:
        """Missing / wrong-size shards (the same on every rank); an error past the bad-sample limit."""
        known_bad = {}
        for i, e in enumerate(shards):
            path = root / e["name"]
            if not path.is_file():
                known_bad[i] = f"shard {path}: missing"
            elif path.stat().st_size != e["bytes"]:
                known_bad[i] = (f"shard {path}: {path.stat().st_size} bytes but the manifest says "
                                f"{e['bytes']} (truncated or replaced)")
        lost = sum(shards[i]["samples"] for i in known_bad)
        if lost > self.cfg.max_bad_samples:
            raise BadDataError(f"{lost} sample(s) unreadable, more than data.max_bad_samples="
                               f"{self.cfg.max_bad_samples}: " + "; ".join(known_bad.values()))
        return known_bad

    # ------------------------------------------------------------------ iteration
    @property
    def epoch(self) -> int:
        """Epoch of the next micro-batch (= epochs completed, at an epoch boundary)."""
        return self._base_epoch + self._k // self.batches_per_epoch

    @property
    def samples_seen(self) -> int:
        """Rows this rank has yielded since the start of training (resumes included)."""
        return self._base_consumed + self._k * self.micro_batch_size

    @property
    def num_batches(self) -> int | None:
        """Micro-batches left to yield, None when running forever."""
        if self.cfg.epochs is None:
            return None
        return max(0, (self.cfg.epochs - self._base_epoch) * self.batches_per_epoch - self._k)

    def __iter__(self):
        end = self.num_batches
        end = None if end is None else self._k + end
        spec = dict(self._spec, k0=self._k, end=end, base_epoch=self._base_epoch, base_step=self._base_step)
        dataset = _MicroBatches(spec, self.plan)
        if self.cfg.num_workers == 0:
            source = iter(dataset)
        else:
            source = iter(DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                                     prefetch_factor=self.cfg.prefetch_factor,
                                     timeout=self.cfg.worker_timeout_s,
                                     pin_memory=self.cfg.pin_memory and torch.cuda.is_available()))
        for k, batch, bad in source:
            if k != self._k:  # the stream order is the contract: never silently out of order
                raise RuntimeError(f"data loader produced micro-batch {k}, expected {self._k}")
            if bad:
                self.bad_samples += len(bad)
                if self.bad_samples > self.cfg.max_bad_samples:
                    raise BadDataError(f"{self.bad_samples} bad sample(s) on dp_rank {self.dp_rank}, more "
                                       f"than data.max_bad_samples={self.cfg.max_bad_samples}; "
                                       f"latest: {bad[0]}")
            self._k += 1
            yield batch

    # ------------------------------------------------------------------ exact resume
    def _layout(self) -> dict:
        return {"dataset": self.dataset_id, "dp_size": self.dp_size,
                "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum, "seed": self.seed,
                "shuffle": self.plan.shuffle, "shuffle_buffer": self.cfg.shuffle_buffer}

    def state_dict(self) -> dict:
        """Small and identical on every rank (except bad_samples): rank 0's copy can restore all ranks."""
        return {"version": STATE_VERSION, "split": self.split, "k": self._k, "base_epoch": self._base_epoch,
                "base_step": self._base_step, "base_consumed": self._base_consumed,
                "batches_per_epoch": self.batches_per_epoch, "bad_samples": self.bad_samples,
                "dp_rank": self.dp_rank, "epoch": self.epoch, "samples_seen": self.samples_seen,
                **self._layout()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION or sd.get("split") != self.split:
            raise ValueError(f"data: cannot resume the {self.split!r} stream from a state of version "
                             f"{sd.get('version')} / split {sd.get('split')!r}")
        differs = {key: (sd[key], value) for key, value in self._layout().items() if sd[key] != value}
        if not differs:
            self._k, self._base_epoch, self._base_step = sd["k"], sd["base_epoch"], sd["base_step"]
            self._base_consumed = sd["base_consumed"]
        elif self.cfg.reshard_on_resume:
            # Another layout orders the samples differently: continue at the next epoch boundary, with the
            # optimizer step numbering (hence the masks) carried on.
            old_k, old_bpe, old_ga = sd["k"], sd["batches_per_epoch"], sd["grad_accum"]
            self._base_epoch = sd["base_epoch"] + -(-old_k // old_bpe)
            self._base_step = sd["base_step"] + -(-old_k // old_ga)
            self._k, self._base_consumed = 0, sd["samples_seen"]
        else:
            detail = ", ".join(f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in differs.items())
            raise ValueError(f"data: cannot resume the data stream exactly ({detail}); the sample order "
                             f"depends on these. Resume with the same settings, or set "
                             f"data.reshard_on_resume=true to continue from the next epoch boundary")
        self.bad_samples = sd["bad_samples"]
