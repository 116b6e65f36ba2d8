"""A torch.profiler trace of a few training steps, to see where a step's time goes: compute kernels, NCCL
collectives, pipeline sends and receives, waits for data.

    dtrain train --config ... logging.profile_start=20 logging.profile_steps=2

traces steps 20 and 21 on every rank and writes, under <run.out_dir>/profile/:
    rank<R>_steps<A>-<B>.json.gz   Chrome trace (chrome://tracing, https://ui.perfetto.dev, TensorBoard's
                                   profiler plugin)
    rank<R>_steps<A>-<B>.txt       the operators and kernels that took the most time, as a table
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """before(step) / after(step) around each optimizer step; inactive when start is None."""

    def __init__(self, start: int | None, steps: int, out_dir: Path, rank: int, device: torch.device,
                 python_stacks: bool = False):
        self.start, self.stop_at = start, (start + steps - 1 if start is not None else None)
        self.python_stacks = python_stacks   # record every Python call too: a much larger trace
        self.out_dir, self.rank, self.device = Path(out_dir) / "profile", rank, device
        self.prof = None

    def before(self, step: int) -> None:
        if step != self.start:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=activities, record_shapes=False, with_stack=self.python_stacks)
        self.prof.start()

    def after(self, step: int) -> Path | None:
        """Stops and writes the trace after the last traced step; returns the trace file then."""
        if self.prof is None or step != self.stop_at:
            return None
        return self._write()

    def close(self) -> None:
        """The run ended inside the traced steps (a stop signal, an error): keep what was traced."""
        if self.prof is not None:
            self._write()

    def _write(self) -> Path:
        self.prof.stop()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"rank{self.rank}_steps{self.start}-{self.stop_at}"
        raw = stem.with_suffix(".json")
        self.prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        stem.with_suffix(".txt").write_text(self.prof.key_averages().table(sort_by=sort, row_limit=30) + "\n")
        self.prof = None
        return Path(f"{raw}.gz")
