"""mamba_ssm's RMSNorm backward kernels, launched with more rows in flight.

Both of mamba_ssm's norm backward kernels keep the weight gradient in registers: a program walks its block
of rows one after another, then writes one partial weight gradient; the partials are summed at the end.
mamba_ssm launches one such program per SM for the residual add + norm (`layer_norm.py`, the blocks'
norms) and gives the gated norm (`layernorm_gated.py`, the mixers' norm) at most 8 warps. One program
per SM keeps few rows in flight, and these memory-bound kernels stay well below the card's bandwidth
(bench/norm_backward.py measures it). The launchers below call the same Triton kernels with the same
arguments, only with ADD_NORM_PROGRAMS_PER_SM programs per SM, and GATED_NORM_PROGRAMS_PER_SM x
GATED_NORM_WARPS for the gated norm; the partial-gradient buffer grows to match. The arithmetic is
mamba_ssm's; the row partials are summed in a different grouping, so the weight gradient may differ in
the last bits.

`install(layer_norm, layernorm_gated, ssd_combined)` puts them in place of the modules' `_layer_norm_bwd`
(the modules' autograd functions, and the fused mixer's backward, look that name up when they run). The
paths the model never takes (dropout, a second input or weight, row scales) go to mamba_ssm's own
launcher. Written against mamba_ssm 2.3: `install` refuses a launcher whose signature differs.
"""
from __future__ import annotations

import contextlib
import inspect
import math

import torch

ADD_NORM_PROGRAMS_PER_SM = 2
GATED_NORM_PROGRAMS_PER_SM = 1
GATED_NORM_WARPS = 16

# the launchers' parameters as mamba_ssm 2.3 defines them (install() compares)
ADD_NORM_PARAMS = ("dy", "x", "weight", "bias", "eps", "mean", "rstd", "dresidual", "dy1", "weight1", "bias1",
                   "seeds", "dropout_p", "rowscale", "has_residual", "has_x1", "is_rms_norm", "x_dtype",
                   "recompute_output")
GATED_NORM_PARAMS = ("dy", "x", "weight", "bias", "eps", "mean", "rstd", "z", "group_size", "norm_before_gate",
                     "is_rms_norm", "recompute_output", "dz", "out")


def programs(rows: int, wanted: int) -> tuple[int, int]:
    """(programs, rows per program): `wanted` programs, but no more than there are rows."""
    count = max(1, min(rows, wanted))
    return count, math.ceil(rows / count)


def gated_warps(block_n: int, most: int) -> int:
    """mamba_ssm's heuristic (a warp per 256 columns, at least 1) with `most` as the cap instead of 8."""
    return min(max(block_n // 256, 1), most)


def current_device(x: torch.Tensor):
    """x's GPU as the current one while launching (as mamba_ssm does); nothing to do off a GPU."""
    return torch.cuda.device(x.device.index) if x.is_cuda else contextlib.nullcontext()


def sm_count_of(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def make_add_norm_backward(module):
    """A launcher for `module._layer_norm_bwd_kernel` (mamba_ssm.ops.triton.layer_norm) with
    ADD_NORM_PROGRAMS_PER_SM programs per SM; other cases go to the module's own launcher."""
    original = module._layer_norm_bwd
    kernel, triton = module._layer_norm_bwd_kernel, module.triton

    def add_norm_backward(dy, x, weight, bias, eps, mean, rstd, dresidual=None, dy1=None, weight1=None,
                          bias1=None, seeds=None, dropout_p=0.0, rowscale=None, has_residual=False, has_x1=False,
                          is_rms_norm=False, x_dtype=None, recompute_output=False):
        unusual = (dy1 is not None or weight1 is not None or bias1 is not None or seeds is not None
                   or dropout_p > 0.0 or rowscale is not None or has_x1)
        if unusual:
            return original(dy, x, weight, bias, eps, mean, rstd, dresidual, dy1, weight1, bias1, seeds,
                            dropout_p, rowscale, has_residual, has_x1, is_rms_norm, x_dtype, recompute_output)
        M, N = x.shape
        assert x.stride(-1) == 1 and dy.stride(-1) == 1 and dy.shape == (M, N)
        assert weight.shape == (N,) and weight.stride(-1) == 1
        assert dresidual is None or (dresidual.stride(-1) == 1 and dresidual.shape == (M, N))
        assert bias is None or (bias.stride(-1) == 1 and bias.shape == (N,))
        dx = torch.empty_like(x) if x_dtype is None else torch.empty(M, N, dtype=x_dtype, device=x.device)
        # a separate residual gradient only when dx cannot carry it (another dtype than the stream's)
        dresidual_in = torch.empty_like(x) if has_residual and dx.dtype != x.dtype else None
        y = torch.empty(M, N, dtype=dy.dtype, device=dy.device) if recompute_output else None
        block_n = min(65536 // x.element_size(), triton.next_power_of_2(N))
        if N > block_n:
            raise RuntimeError("This layer norm doesn't support feature dim >= 64KB.")
        count, rows_per_program = programs(M, sm_count_of(x.device) * ADD_NORM_PROGRAMS_PER_SM)
        _dw = torch.empty((count, N), dtype=torch.float32, device=weight.device)
        _db = torch.empty((count, N), dtype=torch.float32, device=bias.device) if bias is not None else None
        with current_device(x):
            kernel[(count,)](
                x, weight, bias, y, dy, dx, _dw, _db, dresidual, None, None, None, None, None, dresidual_in,
                None, None, mean, rstd,
                x.stride(0), 0 if not recompute_output else y.stride(0), dy.stride(0), dx.stride(0),
                dresidual.stride(0) if dresidual is not None else 0, 0, 0,
                dresidual_in.stride(0) if dresidual_in is not None else 0,
                M, N, eps, 0.0, rows_per_program, is_rms_norm, block_n,
                dresidual is not None, dresidual_in is not None, bias is not None, False)
        dw = _dw.sum(0).to(weight.dtype)
        db = _db.sum(0).to(bias.dtype) if bias is not None else None
        if has_residual and dx.dtype == x.dtype:
            dresidual_in = dx
        grads = (dx, dw, db, dresidual_in, None, None, None)
        return grads + (y,) if recompute_output else grads

    add_norm_backward.original = original
    return add_norm_backward


def make_gated_norm_backward(module):
    """A launcher for `module._layer_norm_bwd_kernel` (mamba_ssm.ops.triton.layernorm_gated) with
    GATED_NORM_PROGRAMS_PER_SM x GATED_NORM_WARPS."""
    original = module._layer_norm_bwd
    kernel, triton = module._layer_norm_bwd_kernel, module.triton

    def gated_norm_backward(dy, x, weight, bias, eps, mean, rstd, z=None, group_size=None, norm_before_gate=True,
                            is_rms_norm=False, recompute_output=False, dz=None, out=None):
        M, N = x.shape
        group_size = group_size or N
        assert N % group_size == 0
        ngroups = N // group_size
        assert x.stride(-1) == 1 and dy.stride(-1) == 1 and dy.shape == (M, N)
        assert z is None or (z.stride(-1) == 1 and z.shape == (M, N))
        assert weight.shape == (N,) and weight.stride(-1) == 1
        assert bias is None or (bias.stride(-1) == 1 and bias.shape == (N,))
        dx = torch.empty_like(x)
        if dz is not None:
            assert z is not None and dz.shape == z.shape and dz.stride(-1) == 1
        else:
            dz = torch.empty_like(z) if z is not None else None
        if recompute_output:
            out = torch.empty_like(x) if out is None else out
            assert out.shape == x.shape
        block_n = min(65536 // x.element_size(), triton.next_power_of_2(group_size))
        if group_size > block_n:
            raise RuntimeError("This layer norm doesn't support feature dim >= 64KB.")
        num_warps = gated_warps(block_n, GATED_NORM_WARPS)
        # mamba_ssm: 4 warps per SM at least, so a small group (1 warp) still fills the SMs
        per_sm = GATED_NORM_PROGRAMS_PER_SM * math.ceil(4 / num_warps)
        count, rows_per_program = programs(M, math.ceil(sm_count_of(x.device) * per_sm / ngroups))
        _dw = torch.empty((count, N), dtype=torch.float32, device=weight.device)
        _db = torch.empty((count, N), dtype=torch.float32, device=bias.device) if bias is not None else None
        with current_device(x):
            kernel[(count, ngroups)](
                x, weight, bias, z, out if recompute_output else None, dy, dx, _dw, _db, dz, mean, rstd,
                x.stride(0), z.stride(0) if z is not None else 0, 0 if not recompute_output else out.stride(0),
                dy.stride(0), dx.stride(0), dz.stride(0) if dz is not None else 0, _dw.stride(0),
                _db.stride(0) if _db is not None else 0, M, group_size, eps, rows_per_program,
                BLOCK_N=block_n, NORM_BEFORE_GATE=norm_before_gate, IS_RMS_NORM=is_rms_norm,
                num_warps=num_warps)
        dw = _dw.sum(0).to(weight.dtype)
        db = _db.sum(0).to(bias.dtype) if bias is not None else None
        return (dx, dw, db, dz) if not recompute_output else (dx, dw, db, dz, out)

    gated_norm_backward.original = original
    return gated_norm_backward


def launcher_parameters(fn) -> tuple[str, ...]:
    """The parameter names of a mamba_ssm launcher (of mamba_ssm's own where ours wraps it): what
    this module and model/mixer_function.py compare with the mamba_ssm they were written against."""
    return tuple(inspect.signature(getattr(fn, "original", fn)).parameters)


def install(layer_norm, layernorm_gated, ssd_combined) -> None:
    """Swap the three modules' `_layer_norm_bwd` for the launchers above (idempotent). Raises RuntimeError,
    changing nothing, when a launcher's signature is not the one these were written against."""
    for module, expected in ((layer_norm, ADD_NORM_PARAMS), (layernorm_gated, GATED_NORM_PARAMS)):
        current = getattr(module, "_layer_norm_bwd", None)
        if current is None or not hasattr(module, "_layer_norm_bwd_kernel"):
            raise RuntimeError(f"{module.__name__} has no _layer_norm_bwd / _layer_norm_bwd_kernel to launch")
        if launcher_parameters(current) != expected:
            found = inspect.signature(getattr(current, "original", current))
            raise RuntimeError(f"{module.__name__}._layer_norm_bwd{found} is not the launcher "
                               f"model/norm_backward.py was written for")
    if not hasattr(layer_norm._layer_norm_bwd, "original"):
        layer_norm._layer_norm_bwd = make_add_norm_backward(layer_norm)
    if not hasattr(layernorm_gated._layer_norm_bwd, "original"):
        layernorm_gated._layer_norm_bwd = make_gated_norm_backward(layernorm_gated)
    if getattr(ssd_combined, "_layer_norm_bwd", None) is not None:   # imported by name for the fused mixer
        ssd_combined._layer_norm_bwd = layernorm_gated._layer_norm_bwd


def uninstall(layer_norm, layernorm_gated, ssd_combined) -> None:
    """Put mamba_ssm's own launchers back (for A/B measurements)."""
    for module in (layer_norm, layernorm_gated):
        module._layer_norm_bwd = getattr(module._layer_norm_bwd, "original", module._layer_norm_bwd)
    if getattr(ssd_combined, "_layer_norm_bwd", None) is not None:
        ssd_combined._layer_norm_bwd = layernorm_gated._layer_norm_bwd
