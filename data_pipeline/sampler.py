"""Which sample lands in which micro-batch: a pure function of (seed, epoch, rank, batch index).

Per epoch e, over the N samples of a split (shards with their sample counts from the manifest):
  1. shard order: a permutation of the shards drawn from (seed, e); their samples concatenated give
     the epoch stream (positions 0..N-1).
  2. sample shuffle: the stream is cut into windows of `window` consecutive positions and each window is
     permuted by its own draw from (seed, e, window). This is what a shuffle buffer of that size does,
     but every position can be computed directly, so resuming never replays the epoch.
  3. data-parallel split at sample granularity: each rank takes a contiguous slice of
     batches_per_epoch * micro_batch_size positions; batch i of rank r is positions
     r * per_rank + [i * B, (i + 1) * B).
     drop_remainder (training): batches_per_epoch = N // (dp_size * B); the last N mod (dp_size * B)
     positions of the shuffled epoch are not used in that epoch (a different set each epoch).
     Otherwise (evaluation): batches_per_epoch = ceil(N / (dp_size * B)) and the positions past N are
     padding rows, so every sample is scored exactly once.
Every rank yields the same number of batches whatever the shard sizes, so no rank waits on another.
Without shuffle, the stream is the shards in manifest order, unpermuted.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

_SHARD_STREAM, _WINDOW_STREAM = 0x5A4D, 0x5A4E


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]))


class EpochPlan:
    PAD = -1  # shard id of a padding row

    def __init__(self, shard_sizes: list[int], *, dp_size: int, micro_batch_size: int, seed: int,
                 shuffle: bool, window: int, drop_remainder: bool):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.total = int(self.sizes.sum())
        self.dp_size, self.micro_batch_size, self.seed = dp_size, micro_batch_size, seed
        self.shuffle, self.window = shuffle, max(1, window)
        per_step = dp_size * micro_batch_size
        self.batches_per_epoch = (self.total // per_step if drop_remainder
                                  else math.ceil(self.total / per_step))
        self.per_rank = self.batches_per_epoch * micro_batch_size
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window_cache: OrderedDict = OrderedDict()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, start position of each shard in the epoch stream)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = len(self.sizes)
            order = _rng(self.seed, _SHARD_STREAM, epoch).permutation(n) if self.shuffle else np.arange(n)
            starts = np.concatenate([[0], np.cumsum(self.sizes[order])[:-1]])
            self._epoch_cache = (epoch, order, starts)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _window_perm(self, epoch: int, w: int) -> np.ndarray:
        key = (epoch, w)
        if key not in self._window_cache:
            length = min(self.window, self.total - w * self.window)
            self._window_cache[key] = _rng(self.seed, _WINDOW_STREAM, epoch, w).permutation(length)
            if len(self._window_cache) > 4:
                self._window_cache.popitem(last=False)
        return self._window_cache[key]

    def stream_to_samples(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, index within shard) of epoch-stream positions; PAD for positions >= total."""
        positions = np.asarray(positions, dtype=np.int64)
        source = positions.copy()
        if self.shuffle:
            for i, p in enumerate(positions):
                if p < self.total:
                    w = int(p) // self.window
                    source[i] = w * self.window + self._window_perm(epoch, w)[p - w * self.window]
        order, starts = self._epoch(epoch)
        slot = np.searchsorted(starts, np.minimum(source, self.total - 1), side="right") - 1
        shard, local = order[slot], source - starts[slot]
        pad = positions >= self.total
        return np.where(pad, self.PAD, shard), np.where(pad, 0, local)

    def batch(self, epoch: int, rank: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, index within shard) of the rows of micro-batch `index` of `rank` in `epoch`."""
        start = rank * self.per_rank + index * self.micro_batch_size
        return self.stream_to_samples(epoch, np.arange(start, start + self.micro_batch_size))
