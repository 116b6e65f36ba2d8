"""Linear layers for mixed-precision training of fp32 weights, as Megatron-LM trains them.

Under autocast a plain nn.Linear (fp32 weight, bf16 matmuls) costs, per micro-batch and weight:
    forward   a bf16 copy of the weight (autocast's cache lasts one forward pass)
    backward  the weight gradient as a bf16 GEMM output, then cast to fp32 (ToCopyBackward)
              before AccumulateGrad adds it into the fp32 .grad
On an H100 at 1.3B (L 2048, 4 micro-batches a step) the copies and casts were 26 ms of a 1,816 ms step
(docs/benchmarks.md). Linear here, while autocast is on and its weight is fp32:
    forward   y = x_lp @ W_lp^T, W_lp the weight in autocast's dtype; inside
              `low_precision_weight_cache()` W_lp is made once and reused by every micro-batch
    backward  dx = dy @ W_lp              (low precision, as autocast)
              dW = dy^T @ x_lp            one GEMM with fp32 accumulation and an fp32 output: the
                                          weight gradient is never rounded to bf16 (autocast rounds it)
Outside autocast, for a weight that is not fp32, or with no gradient to take, it is plain F.linear.
`with kernels.use_reference_kernels("linear")` (or DIFFUMAMBA_KERNELS=reference:linear) forces
the plain path, for comparisons.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from model import kernels

# id(weight) -> (weight, its low-precision copy), while a low_precision_weight_cache() block runs
_weight_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


@contextlib.contextmanager
def low_precision_weight_cache():
    """Reuse each weight's low-precision copy across the forward passes inside the block. The caller
    promises that no weight changes inside it: the trainer opens one per optimizer step, around its
    micro-batches (the optimizer writes the weights after the last micro-batch's backward)."""
    global _weight_cache
    saved, _weight_cache = _weight_cache, {}
    try:
        yield
    finally:
        _weight_cache = saved


def _low_precision(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a CUDA graph capture records the cast itself: a cached copy made outside it would go stale
    capturing = weight.is_cuda and torch.cuda.is_current_stream_capturing()
    if _weight_cache is None or capturing:
        return weight.detach().to(dtype)
    hit = _weight_cache.get(id(weight))
    if hit is not None and hit[0] is weight and hit[1].dtype == dtype:
        return hit[1]
    copy = weight.detach().to(dtype)
    _weight_cache[id(weight)] = (weight, copy)   # holding weight keeps its id from being reused
    return copy


def matmul_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for low-precision a, b with fp32 accumulation and an fp32 result (one cuBLAS GEMM on a
    GPU; the same numbers through an fp32 matmul of the exactly-converted inputs elsewhere)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class _LowPrecisionLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype):
        x_lp, w_lp = x.to(dtype), _low_precision(weight, dtype)
        ctx.save_for_backward(x_lp, w_lp)
        ctx.x_dtype = x.dtype
        return F.linear(x_lp, w_lp)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_lp, w_lp = ctx.saved_tensors
        dy = dy.to(w_lp.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ w_lp).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = matmul_fp32_out(dy.reshape(-1, dy.shape[-1]).t(), x_lp.reshape(-1, x_lp.shape[-1]))
        return dx, dw, None


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The low-precision dtype autocast runs matmuls of x's device in, None when autocast is off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    dtype = autocast_dtype(x)
    if (dtype is None or bias is not None or weight.dtype != torch.float32 or dtype == torch.float32
            or not (torch.is_grad_enabled() and weight.requires_grad) or not kernels.uses_kernel("linear", x)):
        return F.linear(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):   # the function picks its dtypes itself
        return _LowPrecisionLinear.apply(x, weight, dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose autocast path is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
