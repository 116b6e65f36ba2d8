"""Training metrics: accumulated per log interval, reduced across ranks, written to TensorBoard + console.

Every rank accumulates what it saw (under pipeline parallelism only the last stage sees losses); one
all-reduce per log interval sums them, so the numbers are global whatever the parallel layout. The same
all-reduce carries every rank's peak device memory in its own slot, so the log shows the fullest rank
(pipeline stages and their CUDA graph pools differ), and a line lists them all whenever it changes.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def t_bucket_edges(n: int) -> list[float]:
    return [i / n for i in range(n + 1)]


def device_memory_gib(device) -> tuple[float, float] | None:
    """(peak allocated, peak reserved) GiB of a CUDA device since the start; None elsewhere. Reserved
    includes what the caching allocator holds for CUDA graph pools, the real limit of a graphed run."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30


def memory_line(per_rank: list[tuple[float, float]]) -> str:
    """The console's per-rank memory report: 'peak memory per rank (GiB allocated/reserved): 0: a/r, ...'."""
    return "peak memory per rank (GiB allocated/reserved): " + ", ".join(
        f"{rank}: {a:.1f}/{r:.1f}" for rank, (a, r) in enumerate(per_rank))


class Metrics:
    def __init__(self, *, out_dir: str, enabled_tb: bool, t_buckets: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops_total: float | None, total_steps: int, device,
                 memory_reader=device_memory_gib):
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.memory_reader = memory_reader
        self.memory_printed = None   # the last per-rank line printed: printed again only when it changes
        self.nb = t_buckets
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self.total_steps = total_steps
        self.device = device
        self.writer = None
        if self.rank == 0 and enabled_tb:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        self.start = time.time()
        self.start_step = 0   # the step this process started at (after a resume)
        self._reset()

    def _reset(self):
        # [nelbo per t bucket] + [tokens per t bucket]
        self.buckets = torch.zeros(2 * self.nb, dtype=torch.float64, device=self.device)
        self.grad_norms: list[torch.Tensor | float] = []   # read on the host at log(), not per step
        self.steps = 0
        self.data_wait = 0.0
        self.t0 = time.time()

    # ---- accumulation (every rank) ----
    def add_stats(self, stats: dict, keep: bool | torch.Tensor = True) -> None:
        """Per-sequence stats of one micro-batch from diffusion_loss, summed on the device (the host would
        wait for the GPU to read them). keep: False, or a bool tensor on the device that is False, for a
        step that was skipped, whose stats count as nothing (selected, not multiplied: they may be NaN)."""
        if keep is False:
            return
        nelbo = stats["nelbo_per_seq"].detach().to(self.device, torch.float64)
        tokens = stats["tokens_per_seq"].detach().to(self.device, torch.float64)
        if torch.is_tensor(keep):
            keep = keep.to(self.device)
            nelbo, tokens = (torch.where(keep, x, torch.zeros_like(x)) for x in (nelbo, tokens))
        idx = (stats["t"].detach().to(self.device, torch.float64) * self.nb).long().clamp(0, self.nb - 1)
        self.buckets[:self.nb].index_add_(0, idx, nelbo)
        self.buckets[self.nb:].index_add_(0, idx, tokens)

    def add_step(self, *, grad_norm: torch.Tensor | float | None, data_wait: float) -> None:
        """One step's gradient norm (a skipped step's reads NaN or inf and is left out at the log) and the
        host's wait for its batches."""
        self.steps += 1
        self.data_wait += data_wait
        if grad_norm is not None:
            self.grad_norms.append(grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else grad_norm)

    # ---- reduction + output ----
    def log(self, step: int, *, lr: float, total_skipped: int) -> dict:
        memory = self.memory_reader(self.device)
        slots = torch.zeros(2 * self.world, dtype=torch.float64)   # this rank's (allocated, reserved), others 0
        if memory is not None:
            slots[2 * self.rank:2 * self.rank + 2] = torch.tensor(memory, dtype=torch.float64)
        local = torch.cat([self.buckets.cpu(), torch.tensor([self.data_wait], dtype=torch.float64), slots])
        summed = _all_reduce_sum(local, self.device)
        nelbo, tokens = summed[:self.nb], summed[self.nb:2 * self.nb]
        data_wait, per_rank = summed[2 * self.nb], summed[2 * self.nb + 1:].view(-1, 2)
        elapsed = time.time() - self.t0
        out = {
            "train/loss": float(nelbo.sum() / tokens.sum().clamp_min(1.0)) if tokens.sum() > 0 else float("nan"),
            "train/lr": lr,
            "train/skipped_steps": float(total_skipped),
            "perf/step_time_s": elapsed / max(self.steps, 1),
            "perf/data_wait_s": float(data_wait) / self.world / max(self.steps, 1),
            "perf/tokens_per_s": self.tokens_per_step * self.steps / max(elapsed, 1e-9),
        }
        norms = [float(n) for n in self.grad_norms]
        norms = [n for n in norms if math.isfinite(n)]
        if norms:
            out["train/grad_norm"] = sum(norms) / len(norms)
        for b in range(self.nb):
            if tokens[b] > 0:
                lo, hi = b / self.nb, (b + 1) / self.nb
                out[f"train/loss_t/{lo:.1f}-{hi:.1f}"] = float(nelbo[b] / tokens[b])
        if self.peak:
            out["perf/mfu"] = out["perf/tokens_per_s"] * self.flops_per_token / self.peak
        if memory is not None:   # the fullest rank's
            out["perf/gpu_mem_gib"] = float(per_rank[:, 0].max())
            out["perf/gpu_reserved_gib"] = float(per_rank[:, 1].max())
        self.write(step, out)
        if self.rank == 0:
            self.console(step, out)
            line = memory_line(per_rank.tolist()) if memory is not None else None
            if line != self.memory_printed:
                print(line, flush=True)
                self.memory_printed = line
        self._reset()
        return out

    def write(self, step: int, scalars: dict) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def text(self, step: int, tag: str, texts: list[str]) -> None:
        if self.writer is not None:
            body = "\n\n".join(f"**{i}.** {t}" for i, t in enumerate(texts))
            self.writer.add_text(tag, body, step)
            self.writer.flush()

    def console(self, step: int, m: dict) -> None:
        elapsed = time.time() - self.start
        parts = [f"step {step}/{self.total_steps}", f"loss {m['train/loss']:.4f}", f"lr {m['train/lr']:.2e}"]
        if "train/grad_norm" in m:
            parts.append(f"gnorm {m['train/grad_norm']:.3f}")
        parts.append(f"tok/s {m['perf/tokens_per_s']:.0f}")
        if "perf/mfu" in m:
            parts.append(f"mfu {100 * m['perf/mfu']:.2f}%")
        if "perf/gpu_reserved_gib" in m:
            parts.append(f"mem {m['perf/gpu_mem_gib']:.1f}/{m['perf/gpu_reserved_gib']:.1f} GiB")
        if m["train/skipped_steps"]:
            parts.append(f"skipped {int(m['train/skipped_steps'])}")
        parts.append(f"elapsed {_hms(elapsed)}")
        if step > self.start_step:
            parts.append(f"eta {_hms(elapsed / (step - self.start_step) * (self.total_steps - step))}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _all_reduce_sum(t: torch.Tensor, device) -> torch.Tensor:
    # gloo reduces CPU tensors, nccl CUDA tensors; float64 keeps the sums exact enough
    x = t.to(device)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.cpu()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def rank0_print(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)
        sys.stdout.flush()
