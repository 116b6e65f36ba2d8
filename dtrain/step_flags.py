"""Each step's flags, agreed across ranks without the host waiting for the GPU, and the trainer's books of
skipped steps kept from them (dtrain/loop.py; the skip itself: dtrain/zero_step.py)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dtrain.metrics import rank0_print


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


def negation(flag: bool | torch.Tensor) -> bool | torch.Tensor:
    """not flag, for a Python bool or a bool tensor on the device (never read on the host)."""
    return torch.logical_not(flag) if torch.is_tensor(flag) else not flag


class LateAgreement:
    """The ranks agree on each step's flags (step skipped, stop signal seen) without the host waiting for the
    GPU: the flags are all-reduced (max) on the GPU's stream and copied to pinned host memory there, and
    the result is read one step later, by when it has long arrived; meanwhile the host queues the next
    step behind the optimizer's kernels. A flag may itself be a tensor on the device (whether the ZeRO step
    skipped, dtrain/zero_step.py): the host never reads it before the agreement. A stop signal is therefore
    acted on one step after it arrives, or at once at a step that logs or saves, which collects its own
    flags. Off a GPU the all-reduce returns at once, and its result is still handed out a step late."""

    def __init__(self, device: torch.device):
        self.device, self.pending = device, None

    def exchange(self, flags: list) -> list[bool] | None:
        """Send this step's flags (Python bools, or bool tensors on the device, which are never read on the
        host here); return the previous step's, agreed (max over ranks), or None if none are pending."""
        previous = self.collect()
        local = torch.tensor([0.0 if torch.is_tensor(f) else float(f) for f in flags])
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        for i, f in enumerate(flags):
            if torch.is_tensor(f):
                local[i] = f.to(local.device, local.dtype)   # a copy on the device's stream, no wait
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        if self.device.type == "cuda":
            host = torch.empty(local.shape, dtype=local.dtype).pin_memory()
            host.copy_(local, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record()
        else:
            host, arrived = local, None
        self.pending = (host, arrived)
        return previous

    def collect(self) -> list[bool] | None:
        """The flags sent last, agreed (waiting for their all-reduce alone), or None if none are pending."""
        if self.pending is None:
            return None
        (host, arrived), self.pending = self.pending, None
        if arrived is not None:
            arrived.synchronize()
        return [bool(v) for v in host.tolist()]


class StepBook:
    """The skipped-step count the trainer saves (its `state["skipped_steps"]`), kept from each step's flags
    as the ranks agreed them: step N's arrive with step N+1's (send), or at once when step N logs or saves
    (settle), so that logs and checkpoints count exactly."""

    def __init__(self, device: torch.device, state: dict, max_consecutive: int):
        self.agreement, self.state, self.max_consecutive = LateAgreement(device), state, max_consecutive
        self.consecutive, self.too_many = 0, None

    def send(self, step: int, skipped: bool | torch.Tensor, signal: bool) -> bool:
        """Step `step`'s flags out (skipped may be a bool tensor on the device); the previous step's booked.
        Whether a stop signal was seen."""
        # skipped on one rank and applied on another: the ranks disagree
        agreed = self.agreement.exchange([skipped, negation(skipped), signal])
        return agreed is not None and self._book(step - 1, agreed)

    def settle(self, step: int) -> bool:
        """Wait for step `step`'s own flags and book them. Whether a stop signal was seen."""
        agreed = self.agreement.collect()
        return agreed is not None and self._book(step, agreed)

    def _book(self, step: int, agreed: list[bool]) -> bool:
        skipped, applied, signal = agreed
        if skipped and applied:
            raise TrainingStopped(f"step {step}: the ranks disagree on whether the step was skipped")
        self.consecutive = self.consecutive + 1 if skipped else 0
        if skipped:
            self.state["skipped_steps"] += 1
            rank0_print(f"step {step}: non-finite loss or gradient norm; step skipped "
                        f"({self.consecutive} in a row, {self.state['skipped_steps']} in total)")
            if self.consecutive >= self.max_consecutive and self.too_many is None:
                self.too_many = (f"step {step}: {self.consecutive} consecutive steps with a non-finite loss "
                                 f"(train.max_consecutive_nan={self.max_consecutive}); stopping")
        return signal

    def stop_if_too_many(self, last_saved) -> None:
        """Raise TrainingStopped once train.max_consecutive_nan skipped steps in a row have been booked (called
        after the step's log, so the log shows them)."""
        if self.too_many is not None:
            raise TrainingStopped(f"{self.too_many}. Last checkpoint: {last_saved or 'none'}; lower optim.lr or "
                                  f"check the data.")
