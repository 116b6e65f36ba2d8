"""DeepSpeed's ZeRO-1/2 optimizer step, reshaped in two places: the gradient norm from a few fp32 kernels
(grad_norms_in_fp32), and the skip of a bad step decided on the device, so the host never waits for it.

A step whose global gradient norm is not finite must not reach the weights. DeepSpeedZeroOptimizer.step()
decides that on the host: `is_invalid_grad_norm(norm)` turns the device tensor into a Python bool, three
times a step (once in step(), once per parameter group in unscale_and_clip_grads). Each time the host
waits until the GPU has finished the whole backward; the GPU then idles while the host launches the rest of
the step and the start of the next (docs/benchmarks.md measures the gap).

Here the verdict stays on the device, as torch.amp.GradScaler keeps its own:
- during step() those calls record `bad = norm is not finite or norm < 0` (DeepSpeed's rule; its norm
  helpers report inf/NaN as -1) and answer "valid", so the host runs the step through;
- the inner fused AdamW reads `found_inf = bad` and, on a bad step, leaves weights, moments and its step
  count untouched on the device, as DeepSpeed's own skip leaves them (the clip factor of a bad step is NaN
  and multiplies gradients nobody reads);
- afterwards `zero_optimizer.skipped` holds the verdict (a bool tensor on the device); the step's global
  gradient norm reads inf, as for a step DeepSpeed skips (its combine_grad_norm_groups marks an invalid
  norm so), and the trainer's log leaves it out.
DeepSpeed's own bookkeeping then counts every step as applied (was_step_applied(), skipped_steps); the
trainer reads `skipped` instead and agrees on it across ranks a step later (dtrain/step_flags.py).

Only where torch's fused Adam/AdamW runs the update and nothing else does (no CPU offload, no fp16 loss
scaler with its own skip); anywhere else DeepSpeed's step stays as it is and `skipped` is None.
"""
from __future__ import annotations

import torch


def judges_on_device(zero_optimizer) -> bool:
    """Whether `zero_optimizer` is one this module can change: DeepSpeed's ZeRO-1/2 optimizer, updating its
    own partition on the device with torch's fused Adam/AdamW (the kernels that honour found_inf)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    inner = getattr(zero_optimizer, "optimizer", None)
    return (isinstance(zero_optimizer, DeepSpeedZeroOptimizer)
            and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(inner.defaults.get("fused"))
            and not zero_optimizer.cpu_offload and zero_optimizer.torch_autocast_gradscaler is None
            and not getattr(zero_optimizer, "zenflow", False))


def skip_on_device(zero_optimizer) -> bool:
    """Make `zero_optimizer.step()` decide its skip on the device (module docstring). False, and nothing
    changed, where judges_on_device() says no."""
    if not judges_on_device(zero_optimizer):
        return False
    from deepspeed.runtime.zero import stage_1_and_2
    inner, stock_step, stock_check = zero_optimizer.optimizer, zero_optimizer.step, stage_1_and_2.is_invalid_grad_norm

    def recorded(norm) -> bool:
        if not torch.is_tensor(norm):   # a host number: nothing to wait for
            return stock_check(norm)
        bad = (~torch.isfinite(norm) | (norm < 0)).any().to(torch.float32)
        inner.found_inf = bad if inner.found_inf is None else torch.maximum(inner.found_inf, bad)
        return False

    def step(closure=None):
        inner.found_inf = None
        stage_1_and_2.is_invalid_grad_norm = recorded   # read by name inside DeepSpeed's step
        try:
            stock_step(closure)
        finally:
            stage_1_and_2.is_invalid_grad_norm = stock_check
            found, inner.found_inf = inner.found_inf, None
        # None: no norm was judged (gradient norms off), so DeepSpeed's step was its own
        zero_optimizer.skipped = None if found is None else found.bool()

    zero_optimizer.step, zero_optimizer.skipped = step, None
    return True


def grad_norms_in_fp32(zero_optimizer) -> bool:
    """Let DeepSpeed's ZeRO-1/2 optimizer take the gradient norm with a few fp32 kernels and host calls.

    Its get_grad_norm_direct(gradients, params) takes each gradient's norm in turn, each after a float64
    copy of the gradient: a float64 copy of all gradients each step (10 ms of a 700 ms step at 1.3B on an
    H200, one process), and three small operations per parameter on the host (about 50 ms at 1.3B, 346
    parameters, during which the GPU waits). Here the gradients it would count (DeepSpeed's own rules: no
    alignment padding, no pipeline-replicated copy, model-parallel ones or rank 0's) get their norms from
    one fp32 multi-tensor kernel (torch._foreach_norm, fp32 accumulation), combined in float64 into this
    rank's norm; DeepSpeed's function gets that one number as a one-element "gradient" and all-reduces,
    takes the root and masks NaN as before. False when the optimizer has no such method (another
    DeepSpeed optimizer: left as it is)."""
    direct = getattr(zero_optimizer, "get_grad_norm_direct", None)
    if direct is None:
        return False
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter

    def counted(p) -> bool:   # DeepSpeed's get_grad_norm_direct's rules
        if getattr(p, PIPE_REPLICATED, False):
            return False
        return is_model_parallel_parameter(p) or zero_optimizer.model_parallel_rank == 0

    def get_grad_norm_direct(gradients, params, norm_type=2):
        gradients = list(gradients)
        if float(norm_type) != 2.0 or not gradients:
            return direct(gradients, params, norm_type)
        real = (g for g in gradients if not getattr(g, "_zero_padding", False))   # DeepSpeed's alignment
        pairs = [(g.detach(), p) for g, p in zip(real, params) if counted(p)]
        if not pairs:
            return direct([], [], norm_type)
        norms = torch._foreach_norm([g for g, _ in pairs], 2.0, dtype=torch.float32)
        rank_norm = torch.linalg.vector_norm(torch.stack(norms).double()).reshape(1)
        return direct([rank_norm], [pairs[0][1]], norm_type)    # a counted parameter: DeepSpeed counts it

    zero_optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True
