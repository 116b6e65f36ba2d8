"""model.kernels: the loader of the optional GPU packages, the reference fallbacks and the dispatch."""
import functools
import importlib
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from model import kernels, ssd
from model.config import MambaConfig, ModelConfig
from model.mamba2 import BiMamba2

GPU_PACKAGES = ("mamba_ssm", "causal_conv1d", "flash_attn")

SCAN_MARKER = "fake mamba_chunk_scan_combined"
NORM_MARKER = "fake rmsnorm_fn"
FUSED_MARKER = "fake mamba_split_conv1d_scan_combined"
ADD_NORM_MARKER = "fake layer_norm_fn"


# ---------------------------------------------------------------- a fake mamba_ssm on disk
def write_fake_mamba_ssm(root, init_body: str, ops_init_body: str = "", with_conv: bool = False):
    """A package shaped like mamba_ssm: Triton modules importing siblings by absolute name. with_conv:
    ssd_combined found causal-conv1d (its fused split-conv-scan function is usable)."""
    files = {
        "mamba_ssm/__init__.py": init_body,
        "mamba_ssm/ops/__init__.py": ops_init_body,
        "mamba_ssm/ops/triton/__init__.py": "",
        "mamba_ssm/utils/__init__.py": "",
        "mamba_ssm/utils/torch.py": "custom_fwd = 'custom_fwd'\n",
        "mamba_ssm/ops/triton/layernorm_gated.py": f"def rmsnorm_fn(*args, **kwargs):\n    return {NORM_MARKER!r}\n",
        "mamba_ssm/ops/triton/layer_norm.py": (
            "from mamba_ssm.utils.torch import custom_fwd\n"
            f"def layer_norm_fn(*args, **kwargs):\n    return {ADD_NORM_MARKER!r}\n"),
        "mamba_ssm/ops/triton/ssd_combined.py": (
            "from mamba_ssm.utils.torch import custom_fwd\n"
            "from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn\n"
            f"def mamba_chunk_scan_combined(*args, **kwargs):\n    return {SCAN_MARKER!r}\n"
            f"causal_conv1d_fwd_function = {'object()' if with_conv else 'None'}\n"
            f"def mamba_split_conv1d_scan_combined(*args, **kwargs):\n    return {FUSED_MARKER!r}\n"),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def clean_mamba_ssm_modules(monkeypatch, tmp_path):
    """Put tmp_path first on sys.path and give the test a sys.modules without mamba_ssm; restore after."""
    saved = {n: m for n, m in sys.modules.items() if n == "mamba_ssm" or n.startswith("mamba_ssm.")}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        del sys.modules[name]
    sys.modules.update(saved)
    importlib.invalidate_caches()


def test_loader_skips_a_package_init_that_needs_selective_scan_cuda(clean_mamba_ssm_modules):
    write_fake_mamba_ssm(
        clean_mamba_ssm_modules,
        init_body="raise ModuleNotFoundError(\"No module named 'selective_scan_cuda'\", name='selective_scan_cuda')\n",
        ops_init_body="raise RuntimeError('mamba_ssm/ops/__init__.py must not run')\n")
    with pytest.raises(ModuleNotFoundError, match="selective_scan_cuda"):
        importlib.import_module("mamba_ssm")                  # the situation on our GPU machines

    scan, norm, fused, add_norm = kernels.load_mamba_triton()
    assert scan() == SCAN_MARKER and norm() == NORM_MARKER and add_norm() == ADD_NORM_MARKER
    assert fused is None                                      # this mamba_ssm found no causal-conv1d
    top = sys.modules["mamba_ssm"]
    assert getattr(top, "__stub_parent__", False) and not hasattr(top, "__file__")
    assert sys.modules["mamba_ssm.ops.triton.ssd_combined"].custom_fwd == "custom_fwd"  # siblings resolve


def test_loader_uses_the_plain_import_when_it_works(clean_mamba_ssm_modules):
    write_fake_mamba_ssm(clean_mamba_ssm_modules, init_body="RAN_INIT = True\n", with_conv=True)
    scan, norm, fused, add_norm = kernels.load_mamba_triton()
    assert scan() == SCAN_MARKER and norm() == NORM_MARKER and fused() == FUSED_MARKER
    assert add_norm() == ADD_NORM_MARKER
    assert sys.modules["mamba_ssm"].RAN_INIT is True


def test_loader_raises_import_error_when_not_installed():
    with pytest.raises(ImportError):
        kernels.import_skipping_package_init("no_such_package_here.ops.triton.ssd_combined")


# ---------------------------------------------------------------- nothing installed: reference path
@pytest.mark.skipif(any(importlib.util.find_spec(p) for p in GPU_PACKAGES),
                    reason="a GPU kernel package is installed here")
def test_without_kernel_packages_flags_are_false_and_reference_runs():
    assert not (kernels.HAS_MAMBA_TRITON or kernels.HAS_CAUSAL_CONV1D or kernels.HAS_FLASH_ATTN)
    assert kernels.flash_attn_func is None
    # only torch's own (cuBLASLt's GELU epilogue) and torch.compile's kernels remain, these where Triton is
    # installed (the dev extra installs it)
    compiled = {"swiglu", "rotary", "flip"} if importlib.util.find_spec("triton") else set()
    assert {name for name, path in kernels.describe("cuda").items() if path == "kernel"} == compiled | {"gelu_gemm"}
    assert set(kernels.IMPORT_ERRORS) == set(GPU_PACKAGES)


def test_cpu_tensors_use_the_reference_path():
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(2, 9, 4, 3, generator=g), torch.randn(2, 9, 4, generator=g)
    A, B, C = -torch.rand(4, generator=g), torch.randn(2, 9, 2, 5, generator=g), torch.randn(2, 9, 2, 5, generator=g)
    D, bias = torch.randn(4, generator=g), torch.randn(4, generator=g)
    got = kernels.chunk_scan(x, dt, A, B, C, 4, D=D, dt_bias=bias, dt_softplus=True)
    assert torch.equal(got, ssd.ssd_chunked(x, dt, A, B, C, 4, D=D, dt_bias=bias, dt_softplus=True))


def test_conv_reference_is_a_causal_depthwise_conv():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 11, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    want = torch.zeros_like(x)
    for t in range(11):
        for k in range(4):
            if t - 3 + k >= 0:
                want[:, :, t] += w[:, k] * x[:, :, t - 3 + k]
    want = F.silu(want + b[:, None])
    torch.testing.assert_close(kernels.causal_conv1d(x, w, b, "silu"), want)


def test_gated_rmsnorm_reference():
    g = torch.Generator().manual_seed(0)
    x, z, w = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g), torch.randn(12, generator=g)
    gated = (x * torch.sigmoid(z) * z).view(3, 2, 6)
    want = (gated / gated.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 12) * w
    torch.testing.assert_close(kernels.rmsnorm_gated(x, z, w, 1e-5, group_size=6), want)


# ---------------------------------------------------------------- forcing the reference path
def test_use_reference_kernels_and_environment(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert not kernels.reference_forced("scan") and not kernels.reference_forced()
    with kernels.use_reference_kernels("conv"):
        assert kernels.reference_forced("conv") and not kernels.reference_forced("scan")
        assert not kernels.reference_forced()                 # not the whole reference path
        with kernels.use_reference_kernels():
            assert all(kernels.reference_forced(n) for n in kernels.KERNEL_NAMES) and kernels.reference_forced()
        assert not kernels.reference_forced("scan")
    assert not kernels.reference_forced("conv")
    with pytest.raises(ValueError), kernels.use_reference_kernels("nope"):
        pass
    monkeypatch.setenv(kernels.ENV_VAR, "reference:conv,norm")
    assert kernels.reference_forced("norm") and not kernels.reference_forced("scan")
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.reference_forced()


# ---------------------------------------------------------------- the calls the GPU kernels receive
def fake_kernels(monkeypatch, calls):
    """Stand-ins with the real kernels' signatures that check their documented input constraints,
    then compute the reference. Lets the kernel branch of the dispatch run on CPU."""
    def scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
             return_varlen_states=False):
        b, l, h, _ = x.shape
        assert dt.shape == (b, l, h) and A.shape == (h,) and B.shape[:2] == (b, l) and B.shape == C.shape
        assert h % B.shape[2] == 0 and D.shape == (h,) and dt_bias.shape == (h,) and z is None
        assert A.dtype == D.dtype == dt_bias.dtype == torch.float32 and dt_softplus
        calls.append(("scan", h))
        return ssd.ssd_chunked(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)

    def conv(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
             final_states_out=None, activation=None):
        dim, width = weight.shape
        assert x.shape[1] == dim and 2 <= width <= 4 and bias.dtype == weight.dtype
        assert x.stride(2) == 1 or x.stride(1) == 1
        if x.stride(2) != 1:                                   # channel-last requirements
            assert dim % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0
        calls.append(("conv", dim))
        return kernels.causal_conv1d_reference(x, weight, bias, activation)

    def norm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        assert bias is None and z.shape == x.shape and weight.shape == (x.shape[-1],)
        assert x.shape[-1] % group_size == 0 and not norm_before_gate
        calls.append(("norm", x.shape[-1]))
        return kernels.rmsnorm_gated_reference(x, z, weight, eps, group_size, norm_before_gate)

    monkeypatch.setattr(kernels, "_mamba_chunk_scan_combined", scan)
    monkeypatch.setattr(kernels, "_causal_conv1d_fn", conv)
    monkeypatch.setattr(kernels, "_rmsnorm_fn", norm)
    monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: name in ("scan", "conv", "norm"))


@pytest.mark.parametrize("directions", ["independent", "tied_projections"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("d_state", [4, 3])                     # conv channels 72 (% 8 == 0) and 70
def test_kernel_branch_receives_valid_arguments(monkeypatch, directions, fuse, d_state):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, layer_pattern="M", mamba=MambaConfig(
        d_state=d_state, headdim=8, chunk_size=8, ngroups=2, directions=directions))
    bi = BiMamba2(cfg, fuse_directions=fuse).to(torch.bfloat16)
    x = torch.randn(2, 13, 32, dtype=torch.bfloat16)
    want = bi(x)
    calls = []
    fake_kernels(monkeypatch, calls)
    got = bi(x)
    got.float().sum().backward()
    assert torch.equal(got, want)
    heads = cfg.mamba_nheads
    if fuse:
        assert calls == [("conv", 2 * bi.fwd.conv_dim), ("scan", 2 * heads), ("norm", 2 * cfg.d_inner)]
    else:
        assert calls == [("conv", bi.fwd.conv_dim), ("scan", heads), ("norm", cfg.d_inner)] * 2


def split_conv1d_scan_contract(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                               seq_idx=None, dt_limit=(0.0, float("inf")), return_final_states=False,
                               activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                               outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True):
    """mamba_ssm's mamba_split_conv1d_scan_combined as its docstring and mamba_split_conv1d_scan_ref define
    it, written out step by step (sequential recurrence, explicit conv taps), for the cases we call."""
    assert activation == "silu" and not norm_before_gate and outproj_bias is None and D.dim() == 1
    nheads = D.shape[0]
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    b, length, _ = zxbcdt.shape
    z, xBC, dt = zxbcdt.split([dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    width = conv1d_weight.shape[1]
    padded = F.pad(xBC.transpose(1, 2), (width - 1, 0))
    conv = sum(padded[..., k:k + length] * conv1d_weight[:, k:k + 1] for k in range(width)) + conv1d_bias[:, None]
    x, B, C = F.silu(conv).transpose(1, 2).split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(b, length, nheads, headdim)
    group = torch.arange(nheads) // (nheads // ngroups)
    B, C = B.reshape(b, length, ngroups, dstate)[:, :, group], C.reshape(b, length, ngroups, dstate)[:, :, group]
    dt = F.softplus(dt + dt_bias)                                          # (b, l, h)
    state, ys = torch.zeros(b, nheads, headdim, dstate, dtype=x.dtype), []
    for t in range(length):
        decay = torch.exp(dt[:, t, :, None, None] * A[:, None, None])
        state = decay * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(b, length, dim) * F.silu(z)         # gate, then the norm
    y = y.reshape(b, length, ngroups, dim // ngroups)
    y = (y * torch.rsqrt(y.square().mean(-1, keepdim=True) + rmsnorm_eps)).reshape(b, length, dim)
    return (y * rmsnorm_weight) @ outproj_weight.T


@pytest.mark.parametrize("keep_scan_states", [True, False])
@pytest.mark.parametrize("directions,fuse,d_state,expect_fused", [
    ("independent", False, 4, True),          # the 1.3B case: one fused call per direction
    ("independent", False, 3, False),         # 70 conv channels: causal-conv1d's channel-last path refuses
    ("independent", True, 4, False),          # directions fused: their own kernel calls
    ("tied_projections", False, 4, False)])   # shared projections: out_proj after the sum
def test_fused_mixer_receives_the_mixers_arguments(monkeypatch, directions, fuse, d_state, expect_fused,
                                                   keep_scan_states):
    """Mamba2Mixer's arguments reach mamba_ssm's function, or with keep_scan_states model/mixer_function's
    (its signature is kernels.fused_mixer's), and give the mixer's pieces' result."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, layer_pattern="M", mamba=MambaConfig(
        d_state=d_state, headdim=8, chunk_size=8, ngroups=2, directions=directions,
        keep_scan_states=keep_scan_states))
    bi = BiMamba2(cfg, fuse_directions=fuse).double()
    with torch.no_grad():                     # non-trivial norm weights and D, so a swapped argument shows
        for name, p in bi.named_parameters():
            if name.endswith(("norm.weight", ".D")):
                p.mul_(1 + 0.3 * torch.randn_like(p))
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    want = bi(x)                                                           # the pieces, on the CPU
    calls = []

    def fused(*args, **kwargs):
        calls.append("mamba_ssm")
        return split_conv1d_scan_contract(*args, **kwargs)

    def kept(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, norm_weight, norm_eps, out_weight, headdim,
             ngroups):
        calls.append("kept states")
        return split_conv1d_scan_contract(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, activation="silu",
                                          rmsnorm_weight=norm_weight, rmsnorm_eps=norm_eps, outproj_weight=out_weight,
                                          headdim=headdim, ngroups=ngroups, norm_before_gate=False)

    monkeypatch.setattr(kernels, "_mamba_split_conv1d_scan_combined", fused)
    monkeypatch.setattr(kernels, "_mixer_keeping_states", kept)
    monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: name == "mixer")
    got = bi(x)
    assert calls == ([("kept states" if keep_scan_states else "mamba_ssm")] * 2 if expect_fused else [])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_summary_names_the_paths_and_why_a_kernel_is_missing(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    available = dict.fromkeys(kernels.KERNEL_NAMES, True)
    available["attn"] = False
    monkeypatch.setattr(kernels, "_AVAILABLE", available)
    monkeypatch.setattr(kernels, "IMPORT_ERRORS", {"flash_attn": "ModuleNotFoundError('flash_attn')"})
    line = kernels.summary("cuda")
    assert line.startswith("kernels on cuda: scan, conv, ") and "| reference path: attn |" in line
    assert line.endswith("flash_attn: ModuleNotFoundError('flash_attn')")
    assert kernels.summary("cpu") == f"kernels on cpu: none | reference path: {', '.join(kernels.KERNEL_NAMES)}"


def test_forcing_a_piece_of_the_fused_mixer_forces_the_mixer(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_AVAILABLE", dict.fromkeys(kernels.KERNEL_NAMES, True))
    assert kernels.describe("cuda")["mixer"] == "kernel" and kernels.describe("cpu")["mixer"] == "reference"
    for piece in ("scan", "conv", "norm"):
        with kernels.use_reference_kernels(piece):
            assert kernels.describe("cuda")["mixer"] == "reference"
    monkeypatch.setitem(kernels._AVAILABLE, "conv", False)                # causal-conv1d not installed
    assert kernels.describe("cuda")["mixer"] == "reference"


def test_the_state_pass_kernel_runs_where_the_scan_output_kernel_does(monkeypatch):
    """fused_mixer and fused_mixer_unscaled hand a forward without autograd to the functions whose chunk
    states come from model/state_pass_kernel.py where state_pass and scan_out run; forcing either to the
    reference keeps mamba_ssm's two launchers."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_AVAILABLE", dict.fromkeys(kernels.KERNEL_NAMES, True))
    monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: kernels._on(name, True))
    calls = []
    for name in ("_mixer_keeping_states", "_mixer_without_grad", "_mixer_without_grad_state_pass",
                 "_unscaled_mixer", "_unscaled_mixer_state_pass"):
        monkeypatch.setattr(kernels, name, functools.partial(lambda n, *args: calls.append(n), name))

    def which():
        calls.clear()
        kernels.fused_mixer(torch.zeros(1), *(None,) * 11)
        kernels.fused_mixer_unscaled(torch.zeros(1), *(None,) * 4, torch.zeros(32), *(None,) * 5)  # 32 heads
        return calls
    with torch.no_grad():
        assert which() == ["_mixer_without_grad_state_pass", "_unscaled_mixer_state_pass"]
        with kernels.use_reference_kernels("state_pass"):
            assert which() == ["_mixer_without_grad", "_unscaled_mixer"]
        monkeypatch.setenv(kernels.ENV_VAR, "reference:gelu_gemm,state_pass")
        assert which() == ["_mixer_without_grad", "_unscaled_mixer"]
        monkeypatch.delenv(kernels.ENV_VAR)
        with kernels.use_reference_kernels("scan_out"):
            assert which()[0] == "_mixer_keeping_states" and kernels.describe("cuda")["state_pass"] == "reference"
    assert which()[0] == "_mixer_keeping_states", "a training forward"


def test_the_walk_runs_where_it_pays(monkeypatch):
    """fused_mixer_unscaled hands the scan to model/chunk_walk_kernel.py's walk where enough heads make it pay
    (64 heads at batch 1, 32 at batch 8; BiMamba2 then runs the directions on two streams), else to the three
    launches; forcing scan_walk, or scan_gate which it replaces, to the reference keeps them."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_AVAILABLE", dict.fromkeys(kernels.KERNEL_NAMES, True))
    monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: kernels._on(name, True))
    calls = []
    for name in ("_unscaled_mixer", "_unscaled_mixer_state_pass", "_unscaled_mixer_walk"):
        monkeypatch.setattr(kernels, name, functools.partial(lambda n, *args: calls.append(n), name))

    def which(batch, heads):
        calls.clear()
        kernels.fused_mixer_unscaled(torch.zeros(batch, 1), *(None,) * 4, torch.zeros(heads), *(None,) * 5)
        return calls[0]
    with torch.no_grad():
        assert which(1, 64) == which(8, 32) == "_unscaled_mixer_walk"
        assert kernels.walk_usable(torch.zeros(1), 64) and not kernels.walk_usable(torch.zeros(1), 32)
        assert kernels.walk_usable(torch.zeros(8, 1), 32), "the batch is the tensor's"
        assert which(1, 32) == which(1, 48) == "_unscaled_mixer_state_pass"
        for off in ("scan_walk", "scan_gate"):
            with kernels.use_reference_kernels(off):
                assert which(1, 64) != "_unscaled_mixer_walk" and kernels.describe("cuda")["scan_walk"] == "reference"
    assert not kernels.walk_usable(torch.zeros(1), 64), "a forward with autograd"


def test_the_scan_output_kernel_runs_in_forwards_without_autograd_only(monkeypatch):
    """kernels.fused_mixer hands a forward without autograd (inference, sampling, evaluation) to the mixer
    whose scan output is model/chunk_scan_kernel.py's, and a training forward to mamba_ssm's launcher; forcing
    scan_out, or the mixer, to the reference keeps mamba_ssm's."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_AVAILABLE", dict.fromkeys(kernels.KERNEL_NAMES, True))
    monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: kernels._on(name, True))
    calls = []
    monkeypatch.setattr(kernels, "_mixer_keeping_states", lambda *args: calls.append("mamba_ssm's output"))
    for ours in ("_mixer_without_grad", "_mixer_without_grad_state_pass"):   # the states from either
        monkeypatch.setattr(kernels, ours, lambda *args: calls.append("our output"))
    args = (torch.zeros(1),) + (None,) * 11

    def which(keep_scan_states=True):
        calls.clear()
        kernels.fused_mixer(*args, keep_scan_states=keep_scan_states)
        return calls[0] if calls else None
    assert which() == "mamba_ssm's output"
    with torch.no_grad():
        assert which() == "our output"
        with kernels.use_reference_kernels("scan_out"):
            assert which() == "mamba_ssm's output"
        with kernels.use_reference_kernels("mixer"):
            assert which() == "mamba_ssm's output" and kernels.describe("cuda")["scan_out"] == "reference"
    with torch.inference_mode():
        assert which() == "our output"
    monkeypatch.setattr(kernels, "_mamba_split_conv1d_scan_combined", lambda *a, **k: calls.append("recomputing"))
    with torch.no_grad():
        assert which(keep_scan_states=False) == "recomputing"


def test_the_unscaled_mixer_runs_without_autograd_and_with_one_norm_group_only(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_AVAILABLE", dict.fromkeys(kernels.KERNEL_NAMES, True))
    monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: kernels._on(name, True))
    t = torch.zeros(1)
    assert not kernels.unscaled_mixer_usable(t, 64, 4, 1), "a training forward keeps the fused mixer"
    with torch.no_grad():
        assert kernels.unscaled_mixer_usable(t, 64, 4, 1)
        assert not kernels.unscaled_mixer_usable(t, 64, 4, 2), "two norm groups: no scale per row"
        assert not kernels.unscaled_mixer_usable(t, 60, 4, 1) and not kernels.unscaled_mixer_usable(t, 64, 5, 1)
        for off in ("scan_gate", "scan_out", "mixer", "norm"):
            with kernels.use_reference_kernels(off):
                assert not kernels.unscaled_mixer_usable(t, 64, 4, 1), off
    with torch.inference_mode():
        assert kernels.unscaled_mixer_usable(t, 64, 4, 1)


def test_bimamba_without_autograd_scales_the_unscaled_directions_in_their_sum(monkeypatch):
    """Where the unscaled mixer runs, BiMamba2 sums fwd * r_f + flip(bwd * r_b) with each direction's norm
    scale: the same output as the training path (float64 stand-ins of the launchers)."""
    from model import mixer_function
    from tests.model import ssd_emulation
    from tests.model.test_mixer_function import gated_out_float64

    torch.manual_seed(0)
    bi = BiMamba2(ModelConfig(d_model=32, layer_pattern="M", mamba=MambaConfig(
        d_state=4, headdim=8, chunk_size=8)), fuse_directions=False).double()
    with torch.no_grad():
        for p in bi.parameters():
            p.add_(0.3 * torch.randn_like(p))
    calls = []

    def unscaled(*args):
        calls.append(args[0].shape)
        return mixer_function.unscaled_forward(ssd_emulation.namespace(), gated_out_float64, *args)
    monkeypatch.setattr(kernels, "_unscaled_mixer", unscaled)
    monkeypatch.setattr(kernels, "unscaled_mixer_usable", lambda *args: not torch.is_grad_enabled())
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    want = bi(x)
    assert not calls, "a forward with autograd runs the mixers"
    with torch.no_grad():
        got = bi(x)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("first_block", [False, True])
def test_a_block_without_autograd_sums_the_directions_in_its_next_norm(monkeypatch, first_block):
    """Where the directions come unscaled and sum_norm is on, Block hands its mlp_norm to the mixer, which
    sums the scaled directions, adds the residual and normalises in one function (one compiled pass on a
    GPU): the same (hidden, residual) as the training path (float64 stand-ins of the launchers)."""
    from model import mamba2, mixer_function
    from model.blocks import Block
    from tests.model import ssd_emulation
    from tests.model.test_mixer_function import gated_out_float64

    torch.manual_seed(1)
    block = Block("M", ModelConfig(d_model=32, layer_pattern="M", mamba=MambaConfig(
        d_state=4, headdim=8, chunk_size=8, fuse_directions=False))).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    monkeypatch.setattr(kernels, "_unscaled_mixer", functools.partial(
        mixer_function.unscaled_forward, ssd_emulation.namespace(), gated_out_float64))
    monkeypatch.setattr(kernels, "unscaled_mixer_usable", lambda *args: not torch.is_grad_enabled())
    monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: name == "sum_norm")
    calls = []

    def fused(*args):
        calls.append(len(args))
        return mamba2._plus_reversed_row_scaled_add_norm(*args)
    monkeypatch.setattr(mamba2, "add_time_reversed_row_scaled_add_norm", fused)
    hidden = torch.randn(2, 24, 32, dtype=torch.float64)
    residual = None if first_block else torch.randn(2, 24, 32, dtype=torch.float64)
    want = block(hidden, residual)
    assert not calls, "a forward with autograd runs the mixer, then add_norm"
    with torch.no_grad():
        got = block(hidden, residual)
        assert len(calls) == 1
        monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: False)   # sum_norm off
        unfused = block(hidden, residual)
    assert len(calls) == 1
    for g, u, w in zip(got, unfused, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(u, w, rtol=1e-10, atol=1e-10)


def test_the_mlp_runs_its_gelu_in_the_matmul_without_autograd_only(monkeypatch):
    """MLP: gelu(fc_in(x)) (tanh) by kernels.linear_gelu where linear_gelu_usable, the module path
    elsewhere; linear_gelu_usable needs a forward without autograd and the kernel on."""
    from model.blocks import MLP
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_AVAILABLE", dict.fromkeys(kernels.KERNEL_NAMES, True))
    monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: kernels._on(name, True))
    t = torch.zeros(1)
    assert not kernels.linear_gelu_usable(t)
    with torch.no_grad():
        assert kernels.linear_gelu_usable(t)
        with kernels.use_reference_kernels("gelu_gemm"):
            assert not kernels.linear_gelu_usable(t)

    from model.presets import get_preset
    mlp = MLP(get_preset("tiny-diffumamba")).double()
    x = torch.randn(3, 5, mlp.fc_in.in_features, dtype=torch.float64)
    want = F.gelu(x @ mlp.fc_in.weight.T, approximate="tanh") @ mlp.fc_out.weight.T
    calls = []

    def tanh_gelu(x, weight):
        calls.append(weight)
        return F.gelu(F.linear(x, weight), approximate="tanh")
    monkeypatch.setattr(kernels, "linear_gelu", tanh_gelu)
    torch.testing.assert_close(mlp(x), want)
    assert not calls
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want)
    assert len(calls) == 1 and calls[0] is mlp.fc_in.weight


# ---------------------------------------------------------------- the GPU validation script, CPU smoke run
def load_gpu_validate():
    path = __file__.rsplit("/tests/", 1)[0] + "/bench/gpu_validate.py"
    spec = importlib.util.spec_from_file_location("gpu_validate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_validate_smoke_run_on_cpu(tmp_path, monkeypatch):
    gpu_validate = load_gpu_validate()
    out = tmp_path / "table.md"
    assert gpu_validate.main(["--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "grad bwd.A_log" in text and "reference (pure PyTorch)" in text and text.rstrip().endswith("**PASS**")
    # an impossible tolerance must fail the run
    monkeypatch.setattr(gpu_validate, "TOLERANCE", dict.fromkeys(gpu_validate.TOLERANCE, 1e-12))
    monkeypatch.setattr(gpu_validate, "SAME_DTYPE_SLACK", 0.0)
    assert gpu_validate.main(["--device", "cpu", "--out", str(out), "--skip-bench"]) == 1
    assert "FAIL" in out.read_text()


def test_gpu_validate_runs_the_model_check_groups_named(tmp_path):
    gpu_validate = load_gpu_validate()
    out = tmp_path / "table.md"
    args = ["--device", "cpu", "--out", str(out), "--pieces-only", "--skip-bench", "--model-checks"]
    assert gpu_validate.main(args + ["signals"]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "check |" not in line]
    assert rows and all(row.startswith("| stop signals") for row in rows)
    assert gpu_validate.main(args + ["signals", "pieces"]) == 0
    text = out.read_text()
    assert text.count("| check |") == 1, "one table"
    assert text.index("| SwiGLU") < text.index("| stop signals"), "the groups' own order"


# ---------------------------------------------------------------- add + norm and SwiGLU dispatch
def test_add_norm_hands_the_kernel_mamba_ssms_prenorm_contract(monkeypatch):
    """On the kernel path AddNorm calls layer_norm_fn(hidden, weight, bias, residual=..., eps=...,
    prenorm=True, residual_in_fp32=True, is_rms_norm=...) and returns its (output, new residual) pair."""
    from model.blocks import AddNorm
    calls = []

    def fake_layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                           is_rms_norm=False):
        calls.append({"residual": residual is not None, "eps": eps, "prenorm": prenorm,
                      "residual_in_fp32": residual_in_fp32, "is_rms_norm": is_rms_norm, "bias": bias is not None})
        return kernels.add_norm_reference(x, residual, weight, bias, eps, is_rms_norm)

    monkeypatch.setattr(kernels, "_layer_norm_fn", fake_layer_norm_fn)
    monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: name == "add_norm")
    hidden, residual = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for kind in ("rmsnorm", "layernorm"):
        norm = AddNorm(16, eps=1e-3, kind=kind)
        _, stream = norm(hidden, residual)
        torch.testing.assert_close(stream, hidden + residual)
        assert calls[-1] == {"residual": True, "eps": 1e-3, "prenorm": True, "residual_in_fp32": True,
                             "is_rms_norm": kind == "rmsnorm", "bias": kind == "layernorm"}
    norm(hidden.double())                                       # float64 models stay on the reference
    assert len(calls) == 2


def test_compiled_pieces_fall_back_to_eager_when_compiling_fails(monkeypatch):
    monkeypatch.setattr(kernels, "uses_kernel", lambda name, tensor: kernels._AVAILABLE[name])
    monkeypatch.setitem(kernels._AVAILABLE, "swiglu", True)
    monkeypatch.setattr(kernels, "IMPORT_ERRORS", {})
    compiled_calls = []

    def fake_compile(fn, **kwargs):
        def run(h):
            compiled_calls.append(h.shape)
            return fn(h)
        return run
    monkeypatch.setattr(torch, "compile", fake_compile)
    piece = kernels.CompiledOnGPU("swiglu", kernels.swiglu_reference)
    h = torch.randn(3, 8)
    want = F.silu(h[:, :4]) * h[:, 4:]
    torch.testing.assert_close(piece(h), want)
    assert compiled_calls == [h.shape]

    def broken(h):
        raise RuntimeError("no C compiler")
    piece.compiled = broken
    with pytest.warns(UserWarning, match="torch.compile failed"):
        torch.testing.assert_close(piece(h), want)
    assert not kernels._AVAILABLE["swiglu"] and "no C compiler" in kernels.IMPORT_ERRORS["swiglu"]
    torch.testing.assert_close(piece(h), want)                  # eager from now on, no second warning
    assert compiled_calls == [h.shape]
