"""Optional GPU kernels, with pure-PyTorch fallbacks. The one module that imports them.

    chunk_scan     mamba_ssm's Triton `mamba_chunk_scan_combined`   else  model.ssd.ssd_chunked
    causal_conv1d  causal-conv1d's CUDA `causal_conv1d_fn`          else  F.conv1d, left-padded
    rmsnorm_gated  mamba_ssm's Triton `rmsnorm_fn`                  else  the same math in torch
    add_norm       mamba_ssm's Triton `layer_norm_fn` (residual add + RMSNorm/LayerNorm in one pass, its
                   Block's fused_add_norm)                          else  the same math in torch
                   (both norms' backward kernels launched by model/norm_backward.py, more rows in flight)
    swiglu         silu(gate) * up through torch.compile (one kernel forward, one backward)  else  eager
    rotary         the attention's rotary embedding of q and k, the same way (model/attention.py)
    flip           the bidirectional mixer's time reversals, the same way (model/mamba2.py)
    fused_mixer    mamba_ssm's `mamba_split_conv1d_scan_combined`: conv + scan + gated norm + out_proj of
                   one Mamba-2 direction in one autograd function    else  the caller composes the above
                   (by default model/mixer_function.py's copy of it, whose backward does not recompute
                   the scan's chunk states)
    scan_out       in the fused mixer's forward without autograd: the scan's output from its chunk
                   states by model/chunk_scan_kernel.py         else  mamba_ssm's `_chunk_scan_fwd`
    scan_gate      without autograd, one norm group: that kernel also gates and weights the output, and
                   the norm's row scale is applied after out_proj (mixer_function.unscaled_forward;
                   model/mamba2.py sums the directions with it)  else  the fused mixer
    gelu_gemm      without autograd: the MLP's first matmul with the GELU (tanh) in cuBLASLt's epilogue
                   (torch._addmm_activation)                    else  the matmul, then the GELU
    sum_norm       where scan_gate runs in a Block: the directions' scaled sum, the residual add and the
                   next RMSNorm in one compiled pass (BiMamba2.forward_add_norm)  else  the sum, then add_norm
    state_pass     where scan_out runs: the states entering each chunk by model/state_pass_kernel.py (one
                   kernel, no fp32 chunk states in memory)  else  mamba_ssm's `_chunk_state_fwd` and
                   `_state_passing_fwd`
    scan_walk      where scan_gate runs and enough heads make it pay (walk_usable): the whole scan and its
                   gate in one kernel per direction, each program walking its head's chunks with the state on
                   chip (model/chunk_walk_kernel.py), the directions on two streams (model/mamba2.py)
                   else  the scan's launchers, state_pass and scan_gate's kernel
    walk_async     where scan_walk runs, on sm_90 with at most 32 channels a program: the same walk with its
                   products issued as asynchronous wgmma (Gluon, model/chunk_walk_async.py)  else  the Triton
                   walk
    flash_attn_func  flash-attn's kernel, or None

A kernel is used only on CUDA tensors and only when its package imports. The reference path can be
forced, for tests that run both paths on the same weights:
    with use_reference_kernels():            # every kernel
    with use_reference_kernels("conv"):      # just the conv (names: KERNEL_NAMES)
    DIFFUMAMBA_KERNELS=reference             # every kernel, for the whole process
    DIFFUMAMBA_KERNELS=reference:conv,norm   # some of them

mamba_ssm is often installed without its Mamba-1 CUDA extension: `import mamba_ssm` then fails inside
the package __init__ (No module named 'selective_scan_cuda') although the Triton modules we need are
fine. `import_skipping_package_init` loads them through stand-in parent packages that do not run
any __init__.py.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange

from model import mixer_function, norm_backward, ssd

KERNEL_NAMES = ("scan", "conv", "norm", "attn", "mixer", "add_norm", "swiglu", "rotary", "flip", "scan_out",
                "scan_gate", "gelu_gemm", "sum_norm", "state_pass", "scan_walk", "walk_async")
ENV_VAR = "DIFFUMAMBA_KERNELS"


# ---------------------------------------------------------------- importing without a package's __init__
def _stub_package(name: str, path: list[str]) -> types.ModuleType:
    """An empty package module whose submodules are found in `path`; no __init__.py is executed."""
    module = types.ModuleType(name, "Stand-in package: its __init__.py was not executed.")
    spec = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    spec.submodule_search_locations = list(path)
    module.__spec__, module.__path__, module.__package__ = spec, list(path), name
    return module


def import_skipping_package_init(module_name: str):
    """Import `module_name` (e.g. "mamba_ssm.ops.triton.ssd_combined"), executing no parent's __init__
    if the plain import fails.

    The plain import is tried first. If it raises (typically in the top package's __init__), every
    parent package is replaced in sys.modules by a stand-in pointing at the installed folders, found
    with importlib.util.find_spec (which locates a package without executing it), and the module is
    imported again. Raises ImportError when the package is not installed or the module itself fails.
    """
    try:
        return importlib.import_module(module_name)
    except Exception as plain_error:  # noqa: BLE001 - a broken __init__ can raise anything
        first_error = plain_error

    top = module_name.split(".")[0]
    # A failed import can leave half-imported parents behind; start from a clean slate.
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        if not getattr(sys.modules[name], "__stub_parent__", False):
            del sys.modules[name]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{top} is not installed") from first_error

    parts = module_name.split(".")
    path = list(spec.submodule_search_locations)
    for depth in range(1, len(parts)):
        name = ".".join(parts[:depth])
        if depth > 1:
            path = [os.path.join(p, parts[depth - 1]) for p in path]
            path = [p for p in path if os.path.isdir(p)]
        if name not in sys.modules:
            stub = _stub_package(name, path)
            stub.__stub_parent__ = True
            sys.modules[name] = stub
            if depth > 1:
                setattr(sys.modules[".".join(parts[:depth - 1])], parts[depth - 1], stub)
    try:
        return importlib.import_module(module_name)
    except Exception as second_error:
        raise ImportError(f"cannot import {module_name}: {second_error!r} "
                          f"(plain import failed with {first_error!r})") from second_error


def load_mamba_triton():
    """(mamba_chunk_scan_combined, rmsnorm_fn, mamba_split_conv1d_scan_combined, layer_norm_fn) from
    mamba_ssm's Triton modules; ImportError if absent. The third is None when mamba_ssm found no
    causal-conv1d to call."""
    ssd_combined = import_skipping_package_init("mamba_ssm.ops.triton.ssd_combined")
    layernorm_gated = import_skipping_package_init("mamba_ssm.ops.triton.layernorm_gated")
    layer_norm = import_skipping_package_init("mamba_ssm.ops.triton.layer_norm")
    has_conv = getattr(ssd_combined, "causal_conv1d_fwd_function", None) is not None
    fused = getattr(ssd_combined, "mamba_split_conv1d_scan_combined", None) if has_conv else None
    return ssd_combined.mamba_chunk_scan_combined, layernorm_gated.rmsnorm_fn, fused, layer_norm.layer_norm_fn


IMPORT_ERRORS: dict[str, str] = {}  # why a kernel is missing, for logs

try:
    (_mamba_chunk_scan_combined, _rmsnorm_fn, _mamba_split_conv1d_scan_combined,
     _layer_norm_fn) = load_mamba_triton()
except Exception as e:  # noqa: BLE001 - Triton itself can fail at import on machines without a GPU
    _mamba_chunk_scan_combined = _rmsnorm_fn = _mamba_split_conv1d_scan_combined = _layer_norm_fn = None
    IMPORT_ERRORS["mamba_ssm"] = repr(e)

try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_fn
except Exception as e:  # noqa: BLE001
    _causal_conv1d_fn = None
    IMPORT_ERRORS["causal_conv1d"] = repr(e)

try:
    from flash_attn import flash_attn_func
except Exception as e:  # noqa: BLE001
    flash_attn_func = None
    IMPORT_ERRORS["flash_attn"] = repr(e)

HAS_MAMBA_TRITON = _mamba_chunk_scan_combined is not None
if HAS_MAMBA_TRITON:   # the norms' backward launched with more rows in flight (model/norm_backward.py)
    try:
        norm_backward.install(*(import_skipping_package_init(f"mamba_ssm.ops.triton.{name}")
                                for name in ("layer_norm", "layernorm_gated", "ssd_combined")))
    except RuntimeError as e:   # another mamba_ssm: its own launch, with a note
        IMPORT_ERRORS["norm_backward"] = str(e)
_mixer_keeping_states = _mixer_without_grad = _unscaled_mixer = None
_mixer_without_grad_state_pass = _unscaled_mixer_state_pass = None
if _mamba_split_conv1d_scan_combined is not None:
    try:
        _ssd_combined = import_skipping_package_init("mamba_ssm.ops.triton.ssd_combined")
        _mixer_keeping_states = mixer_function.MixerFunction.build(_ssd_combined)
    except RuntimeError as e:   # another mamba_ssm: its own function, which recomputes the states
        IMPORT_ERRORS["mixer_function"] = str(e)
    if _mixer_keeping_states is not None:   # the same function, its scan output by model/chunk_scan_kernel.py
        try:
            from model import chunk_scan_kernel
            _mixer_without_grad = mixer_function.MixerFunction.build(
                mixer_function.with_chunk_scan_output(_ssd_combined, chunk_scan_kernel.chunk_scan_out))
            _unscaled_mixer = functools.partial(mixer_function.unscaled_forward, _ssd_combined,
                                                chunk_scan_kernel.chunk_scan_gated_out)
        except Exception as e:  # noqa: BLE001 - a Triton too old for the kernel: mamba_ssm's launcher stays
            IMPORT_ERRORS["chunk_scan_kernel"] = repr(e)
    if _mixer_without_grad is not None:   # and the states entering the chunks by model/state_pass_kernel.py
        try:
            from model import state_pass_kernel
            _ssd_state_pass = mixer_function.with_fused_chunk_states(_ssd_combined,
                                                                     state_pass_kernel.states_entering_chunks)
            _mixer_without_grad_state_pass = mixer_function.MixerFunction.build(
                mixer_function.with_chunk_scan_output(_ssd_state_pass, chunk_scan_kernel.chunk_scan_out))
            _unscaled_mixer_state_pass = functools.partial(mixer_function.unscaled_forward, _ssd_state_pass,
                                                           chunk_scan_kernel.chunk_scan_gated_out)
        except Exception as e:  # noqa: BLE001 - as above
            IMPORT_ERRORS["state_pass_kernel"] = repr(e)
_unscaled_mixer_walk = None
HAS_GLUON_WALK = False
if _unscaled_mixer is not None:   # the whole scan in one kernel (model/chunk_walk_kernel.py)
    try:
        from model import chunk_walk_async, chunk_walk_kernel

        def _walk(ssd, x, *args, **kwargs):
            return chunk_walk_kernel.chunk_walk_gated(ssd, x, *args, asynchronous=uses_kernel("walk_async", x),
                                                      **kwargs)
        _unscaled_mixer_walk = functools.partial(mixer_function.unscaled_forward, _ssd_combined, None,
                                                 walk=_walk)
        HAS_GLUON_WALK = chunk_walk_async.HAVE_GLUON
    except Exception as e:  # noqa: BLE001 - as above
        IMPORT_ERRORS["chunk_walk_kernel"] = repr(e)
HAS_CAUSAL_CONV1D = _causal_conv1d_fn is not None
HAS_FLASH_ATTN = flash_attn_func is not None
# torch.compile generates Triton kernels on a GPU: usable where Triton imports (it ships with CUDA torch)
HAS_TRITON = importlib.util.find_spec("triton") is not None
_AVAILABLE = {"scan": HAS_MAMBA_TRITON, "norm": HAS_MAMBA_TRITON, "conv": HAS_CAUSAL_CONV1D,
              "attn": HAS_FLASH_ATTN, "mixer": _mamba_split_conv1d_scan_combined is not None,
              "add_norm": _layer_norm_fn is not None, "swiglu": HAS_TRITON, "rotary": HAS_TRITON,
              "flip": HAS_TRITON, "scan_out": _mixer_without_grad is not None,
              "scan_gate": _unscaled_mixer is not None, "gelu_gemm": hasattr(torch, "_addmm_activation"),
              "sum_norm": HAS_TRITON, "state_pass": _mixer_without_grad_state_pass is not None,
              "scan_walk": _unscaled_mixer_walk is not None, "walk_async": HAS_GLUON_WALK}


# ---------------------------------------------------------------- choosing a path
_forced_reference: set[str] = set()


def reference_forced(name: str | None = None) -> bool:
    """Whether kernel `name` is forced onto the reference path (context manager or environment).
    Without a name: whether every kernel is (the whole reference path is forced)."""
    if name is None:
        return all(reference_forced(n) for n in KERNEL_NAMES)
    setting = os.environ.get(ENV_VAR, "").strip().lower()
    if setting == "reference":
        return True
    if setting.startswith("reference:") and name in setting.split(":", 1)[1].split(","):
        return True
    return name in _forced_reference


@contextlib.contextmanager
def use_reference_kernels(*names: str):
    """Run the pure-PyTorch path for the named kernels (all when none is named) inside the block."""
    unknown = set(names) - set(KERNEL_NAMES)
    if unknown:
        raise ValueError(f"unknown kernel name(s) {sorted(unknown)}; known: {KERNEL_NAMES}")
    saved = set(_forced_reference)
    _forced_reference.update(names or KERNEL_NAMES)
    try:
        yield
    finally:
        _forced_reference.clear()
        _forced_reference.update(saved)


# The fused mixer runs the conv, scan and norm kernels: forcing any of them to the reference forces it too;
# the scan's output kernel runs inside the fused mixer, and sum_norm in place of scan_gate's sum and add_norm.
_ALSO_NEEDS = {"mixer": ("scan", "conv", "norm"), "scan_out": ("mixer",), "scan_gate": ("scan_out",),
               "sum_norm": ("scan_gate", "add_norm"), "state_pass": ("scan_out",), "scan_walk": ("scan_gate",),
               "walk_async": ("scan_walk",)}


def _on(name: str, on_gpu: bool) -> bool:
    return (_AVAILABLE[name] and on_gpu and not reference_forced(name)
            and all(_on(n, on_gpu) for n in _ALSO_NEEDS.get(name, ())))


def uses_kernel(name: str, tensor: torch.Tensor) -> bool:
    """True when kernel `name` would run on `tensor`: installed, tensor on CUDA, not forced off."""
    return _on(name, tensor.is_cuda)


def describe(device: torch.device | str = "cuda") -> dict[str, str]:
    """Which implementation each kernel uses on `device`, e.g. for a startup log line."""
    on_gpu = torch.device(device).type == "cuda"
    return {name: "kernel" if _on(name, on_gpu) else "reference" for name in KERNEL_NAMES}


def summary(device: torch.device | str = "cuda") -> str:
    """One log line: the kernels `device` runs, those on the reference path, and why a package is missing
    or mamba_ssm's own function runs instead of ours (a cluster node without a package shows here)."""
    used = describe(device)
    kernels = [n for n in KERNEL_NAMES if used[n] == "kernel"]
    reference = [n for n in KERNEL_NAMES if used[n] == "reference"]
    line = f"kernels on {torch.device(device).type}: {', '.join(kernels) or 'none'}"
    if reference:
        line += f" | reference path: {', '.join(reference)}"
    if torch.device(device).type == "cuda" and IMPORT_ERRORS:
        line += " | " + "; ".join(f"{k}: {v[:160]}" for k, v in sorted(IMPORT_ERRORS.items()))
    return line


# ---------------------------------------------------------------- the scan
def chunk_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False):
    """Mamba-2 SSD scan. x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), D/dt_bias (h,).

    Returns y (b, l, h, p) in x's dtype. A, D and dt_bias are expected in fp32.
    """
    if uses_kernel("scan", x):
        return _mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                                          dt_softplus=dt_softplus)
    return ssd.ssd_chunked(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)


# ---------------------------------------------------------------- depthwise causal conv
def causal_conv1d_reference(x, weight, bias=None, activation=None):
    """out[:, d, t] = act(bias[d] + sum_k weight[d, k] * x[:, d, t - (width-1) + k]), zeros before t=0."""
    width = weight.shape[1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d(x, weight, bias=None, activation=None):
    """Depthwise causal conv. x (b, d, l), weight (d, width), bias (d,), activation None or "silu"."""
    width = weight.shape[1]
    if uses_kernel("conv", x) and 2 <= width <= 4:
        dim = x.shape[1]
        if x.stride(2) != 1:
            # The kernel takes channel-first (stride(2) == 1) or dense channel-last with dim % 8 == 0.
            channel_last_ok = dim % 8 == 0 and x.transpose(1, 2).is_contiguous()
            if not channel_last_ok:
                x = x.transpose(1, 2).contiguous().transpose(1, 2) if dim % 8 == 0 else x.contiguous()
        bias = bias.to(weight.dtype) if bias is not None else None  # the kernel wants them equal
        return _causal_conv1d_fn(x, weight, bias, activation=activation)
    return causal_conv1d_reference(x, weight, bias, activation)


# ---------------------------------------------------------------- gated RMSNorm
def rmsnorm_gated_reference(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False):
    """norm_before_gate=False: RMSNorm(x * silu(z)) * weight, the norm taken over groups of group_size."""
    dtype = x.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x = x.to(compute)
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.to(compute))
    group_size = group_size or x.shape[-1]
    x = rearrange(x, "... (g d) -> ... g d", d=group_size)
    x = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    out = rearrange(x, "... g d -> ... (g d)") * weight.to(compute)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(compute))
    return out.to(dtype)


def rmsnorm_gated(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False):
    """Gated RMSNorm as in mamba_ssm's RMSNormGated; x, z (..., d), weight (d,). Returns x's dtype."""
    if uses_kernel("norm", x):
        return _rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size,
                           norm_before_gate=norm_before_gate)
    return rmsnorm_gated_reference(x, z, weight, eps, group_size, norm_before_gate)


# ---------------------------------------------------------------- one fused Mamba-2 direction
def fused_mixer_usable(zxbcdt: torch.Tensor, conv_channels: int, conv_width: int) -> bool:
    """Whether Mamba2Mixer may hand its in_proj output to fused_mixer: the kernel is there and on, and
    the shapes suit causal-conv1d's channel-last path (channels a multiple of 8, width 2 to 4)."""
    return uses_kernel("mixer", zxbcdt) and conv_channels % 8 == 0 and 2 <= conv_width <= 4


def fused_mixer(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, norm_weight, norm_eps, out_weight,
                headdim, ngroups, keep_scan_states=True):
    """out_proj(RMSNorm(SSD(silu(conv(xBC))) * silu(z))) from zxbcdt = in_proj(u) = [z, xBC, dt], one
    direction, the same function as Mamba2Mixer's pieces (norm over groups, gate before the norm).
    One autograd function: its backward recomputes the conv and the norm output instead of keeping
    them, and writes the gradients of z, xBC and dt into one buffer (no concatenation).
    keep_scan_states: keep the scan's chunk states etc. for the backward (model/mixer_function.py),
    instead of mamba_ssm's recomputing them."""
    if keep_scan_states and _mixer_keeping_states is not None:
        fn = _mixer_keeping_states
        if _scan_output_kernel_on(zxbcdt):
            fn = _mixer_without_grad_state_pass if _forward_only_kernel_on("state_pass", zxbcdt) \
                else _mixer_without_grad
        return fn(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, norm_weight, norm_eps, out_weight,
                  headdim, ngroups)
    return _mamba_split_conv1d_scan_combined(
        zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, activation="silu",
        rmsnorm_weight=norm_weight, rmsnorm_eps=norm_eps, outproj_weight=out_weight, outproj_bias=None,
        headdim=headdim, ngroups=ngroups, norm_before_gate=False)


def _forward_only_kernel_on(name: str, tensor: torch.Tensor) -> bool:
    """Whether kernel `name`, one that has no backward (scan_out, scan_gate, gelu_gemm), runs on `tensor`: in
    a forward without autograd (inference, sampling, evaluation) and where uses_kernel says so. Training
    keeps the kernels whose backward was validated with them (bench/model_checks.py)."""
    return not torch.is_grad_enabled() and uses_kernel(name, tensor)


def _scan_output_kernel_on(zxbcdt: torch.Tensor) -> bool:
    """Whether the fused mixer computes the scan's output with model/chunk_scan_kernel.py."""
    return _forward_only_kernel_on("scan_out", zxbcdt)


def unscaled_mixer_usable(tensor: torch.Tensor, conv_channels: int, conv_width: int, ngroups: int) -> bool:
    """Whether a BiMamba2 may run its directions through fused_mixer_unscaled and scale their sum itself:
    a forward without autograd, the kernel on, the fused mixer's shapes, one norm group."""
    return (ngroups == 1 and _forward_only_kernel_on("scan_gate", tensor)
            and fused_mixer_usable(tensor, conv_channels, conv_width))


def fused_mixer_unscaled(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, norm_weight, out_weight,
                         headdim, ngroups, walk: bool | None = None):
    """fused_mixer's output before the norm's row scale, and the sums of squares that give it:
    (out (b, l, d_model), sumsq (b, l, heads or more columns) fp32);
    fused_mixer = out * rsqrt(sumsq.sum(-1) / d_inner + eps).
    Only where unscaled_mixer_usable (model/mixer_function.py: unscaled_forward). walk: whether the scan runs
    as the walk (None: walk_usable decides; a caller that ran the two directions by it passes its answer)."""
    fn = _unscaled_mixer_state_pass if _forward_only_kernel_on("state_pass", zxbcdt) else _unscaled_mixer
    if walk_usable(zxbcdt, D.shape[0]) if walk is None else walk:
        fn = _unscaled_mixer_walk
    return fn(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, norm_weight, out_weight, headdim, ngroups)


def walk_usable(tensor: torch.Tensor, nheads: int) -> bool:
    """Whether fused_mixer_unscaled runs the scan of `nheads` heads over the batch of `tensor` (b, l, ...) as one
    walk kernel (model/chunk_walk_kernel.py), both directions at once: the kernel on, a forward without
    autograd, and enough programs for it to pay (chunk_walk_kernel.pays)."""
    if not _forward_only_kernel_on("scan_walk", tensor):
        return False
    from model import chunk_walk_kernel
    return chunk_walk_kernel.pays(tensor.shape[0], nheads)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """A second CUDA stream of `device`, the same one every call (a CUDA graph captures work on it too)."""
    device = torch.device(device)
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def linear_gelu_usable(x: torch.Tensor) -> bool:
    """Whether linear_gelu may run on x: a forward without autograd on a GPU, the kernel on."""
    return _forward_only_kernel_on("gelu_gemm", x)


def linear_gelu(x, weight):
    """gelu(x @ weight.T, approximate="tanh") with the GELU in cuBLASLt's epilogue (its tanh form): one pass
    less over the MLP's widest activation. Forward only, where linear_gelu_usable."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    zero_bias = torch.zeros(weight.shape[0], device=x.device, dtype=dtype)
    out = torch._addmm_activation(zero_bias, rows, weight.to(dtype).t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


def flash_attn_usable(tensor: torch.Tensor) -> bool:
    """Whether an attention block may call flash_attn_func on this tensor."""
    return uses_kernel("attn", tensor)


# ---------------------------------------------------------------- residual add + norm
def add_norm_reference(hidden, residual, weight, bias, eps, is_rms_norm):
    """stream = residual + hidden (just hidden when residual is None), kept in fp32 (fp64 for a float64
    model); out = RMSNorm or LayerNorm of the stream, computed in that precision, in hidden's dtype."""
    stream_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    stream = hidden.to(stream_dtype) if residual is None else residual.to(stream_dtype) + hidden
    shape, w = (stream.shape[-1],), weight.to(stream_dtype)
    if is_rms_norm:
        out = F.rms_norm(stream, shape, w, eps)
    else:
        out = F.layer_norm(stream, shape, w, None if bias is None else bias.to(stream_dtype), eps)
    return out.to(hidden.dtype), stream


def add_norm(hidden, residual, weight, bias=None, eps=1e-5, is_rms_norm=True):
    """(norm(residual + hidden) in hidden's dtype, residual + hidden in fp32); residual may be None.
    hidden (..., d) is a branch output (bf16 under autocast), residual the fp32 residual stream.
    On a GPU one Triton kernel reads both once and writes both results (and one kernel does the
    backward), instead of an add, a norm and a cast for the next matmul, each a pass over the stream."""
    if uses_kernel("add_norm", hidden) and hidden.dtype != torch.float64:
        return _layer_norm_fn(hidden, weight, bias, residual=residual, eps=eps, prenorm=True,
                              residual_in_fp32=True, is_rms_norm=is_rms_norm)
    return add_norm_reference(hidden, residual, weight, bias, eps, is_rms_norm)


# ---------------------------------------------------------------- element-wise chains, compiled
class CompiledOnGPU:
    """fn(*tensors) through torch.compile when the first tensor is on a GPU and kernel `name` is on, the
    eager fn elsewhere. A chain of element-wise ops becomes one kernel forward and one backward (eager runs
    one kernel per op and keeps the intermediates for the backward). If compiling fails, the eager fn runs
    for the rest of the process, with a warning (and `name` in IMPORT_ERRORS, so describe() shows it)."""

    def __init__(self, name: str, fn):
        self.name, self.fn, self.compiled = name, fn, None

    def __call__(self, *tensors):
        if uses_kernel(self.name, tensors[0]):
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=None)
            try:
                return self.compiled(*tensors)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - a compiler failure must not stop training
                _AVAILABLE[self.name] = False
                IMPORT_ERRORS[self.name] = f"torch.compile failed: {e!r}"[:500]
                warnings.warn(f"{self.name}: torch.compile failed, running the eager path instead ({e!r})"[:500])
        return self.fn(*tensors)


def swiglu_reference(h):
    """h = [gate, up] along the last dim -> silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


# silu(gate) * up: the backward writes the gradient of h directly (eager also concatenates the halves)
swiglu = CompiledOnGPU("swiglu", swiglu_reference)
