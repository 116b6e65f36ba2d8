"""One tiny Triton kernel compiled before the trainer installs its stop handlers (dtrain/signals.py).

Triton's libtriton links LLVM, which installs its own actions for SIGTERM and SIGUSR1 (among others) the
first time a compilation needs them, once per process: on an H100 that replaced the trainer's handlers
during the first compiling step (docs/benchmarks.md, eleventh run), and a SIGUSR1 arriving before the step
ended was lost (LLVM treats it as an "info" signal and returns). Compiling one kernel first moves that
registration ahead of the trainer's, so no later compilation (the first step, an evaluation's first
batch, a new shape) takes the signals mid-step. Imported only where Triton and a GPU are.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _store_one(out_ptr):
    tl.store(out_ptr, 1)


def compile_one_kernel(device: torch.device) -> None:
    """Compile (never load from Triton's cache: a cached kernel compiles nothing) and run a one-store kernel."""
    before = os.environ.get("TRITON_ALWAYS_COMPILE")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    try:
        out = torch.zeros(1, dtype=torch.int32, device=device)
        _store_one[(1,)](out, enable_fp_fusion=True)   # stated: Triton 3.9 warns where it is not
        torch.cuda.synchronize(device)
    finally:
        if before is None:
            os.environ.pop("TRITON_ALWAYS_COMPILE", None)
        else:
            os.environ["TRITON_ALWAYS_COMPILE"] = before
