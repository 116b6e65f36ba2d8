"""model/mixer_function: one Mamba-2 direction whose backward runs on the scan's kept chunk states.

Triton does not run here: the function runs on float64 stand-ins of mamba_ssm's launchers
(tests/model/ssd_emulation.py, bound by the launchers' parameter names). Its output and every gradient
are compared with autograd through the model's own reference path (conv, model.ssd's chunked scan, gated
norm, out_proj), so a kept piece handed to the wrong kernel, a gradient written to the wrong buffer or a
missing term shows. bench/gpu_validate.py compares it with mamba_ssm's own function on a GPU."""
import pytest
import torch

from model import mixer_function
from model.config import MambaConfig, ModelConfig
from model.mamba2 import Mamba2Mixer
from tests.model import ssd_emulation


def mixer(ngroups, seed=0):
    cfg = ModelConfig(d_model=12, layer_pattern="M", mamba=MambaConfig(
        d_state=3, headdim=4, expand=2, chunk_size=8, ngroups=ngroups))
    torch.manual_seed(seed)
    m = Mamba2Mixer(cfg).double()
    with torch.no_grad():               # every parameter off its initial value, so wiring mistakes show
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def fused_args(m, zxbcdt):
    return (zxbcdt, m.conv_weight, m.conv1d.bias, m.dt_bias, m.A, m.D, m.chunk_size, m.norm.weight, m.norm.eps,
            m.out_proj.weight, m.headdim, m.ngroups)


def output_and_grads(m, zxbcdt, run, dout):
    m.zero_grad(set_to_none=True)
    zxbcdt = zxbcdt.detach().requires_grad_()
    out = run(zxbcdt)
    out.backward(dout)
    return out.detach(), {"zxbcdt": zxbcdt.grad, **{n: p.grad for n, p in m.named_parameters() if n != "in_proj.weight"}}


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("chunks", [1, 3])
def test_matches_the_reference_path(ngroups, chunks):
    m = mixer(ngroups)
    fused = mixer_function.MixerFunction.build(ssd_emulation.namespace())
    g = torch.Generator().manual_seed(ngroups * 10 + chunks)
    zxbcdt = torch.randn(2, 8 * chunks, m.d_in_proj, generator=g, dtype=torch.float64)
    dout = torch.randn(2, 8 * chunks, m.d_model, generator=g, dtype=torch.float64)

    want_out, want = output_and_grads(m, zxbcdt, lambda t: m.out_proj(m.mix(t)), dout)
    got_out, got = output_and_grads(m, zxbcdt, lambda t: fused(*fused_args(m, t)), dout)
    torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-10)
    assert set(got) == set(want)
    for name in want:
        assert got[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10, msg=name)


def test_backward_does_not_recompute_the_states():
    calls = []

    def counted(name):
        fn = getattr(ssd_emulation, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        wrapper.__signature__ = __import__("inspect").signature(fn)
        return wrapper
    names = ("_chunk_cumsum_fwd", "_chunk_state_fwd", "_state_passing_fwd", "_bmm_chunk_fwd", "_chunk_scan_fwd")
    fused = mixer_function.MixerFunction.build(ssd_emulation.namespace(**{n: counted(n) for n in names}))
    m = mixer(1)
    zxbcdt = torch.randn(1, 16, m.d_in_proj, dtype=torch.float64, requires_grad=True)
    out = fused(*fused_args(m, zxbcdt))
    assert sorted(calls) == sorted(names)
    calls.clear()
    out.sum().backward()
    assert sorted(calls) == ["_bmm_chunk_fwd", "_chunk_cumsum_fwd"], "only the cheap pieces are recomputed"


def test_build_refuses_another_mamba_ssm():
    def renamed(dt, A, chunk_size, dt_bias=None, softplus=False, dt_limit=(0.0, float("inf"))):
        raise AssertionError
    with pytest.raises(RuntimeError, match="_chunk_cumsum_fwd is not the launcher"):
        mixer_function.MixerFunction.build(ssd_emulation.namespace(_chunk_cumsum_fwd=renamed))
    with pytest.raises(RuntimeError, match="_mamba_chunk_scan_combined_bwd"):
        mixer_function.MixerFunction.build(ssd_emulation.namespace(_mamba_chunk_scan_combined_bwd=lambda dout: None))
    with pytest.raises(RuntimeError, match="causal_conv1d_bwd_function"):
        mixer_function.MixerFunction.build(ssd_emulation.namespace(causal_conv1d_bwd_function=None))


def test_another_scan_output_launcher_is_used_in_the_forward_only():
    """with_chunk_scan_output swaps the last forward launcher (as model/kernels.py does with
    model/chunk_scan_kernel.py): the forward calls the new one, the backward neither, and the result is the
    reference path's."""
    calls = []

    def output(cb, x, dt, dA_cumsum, C, states, D):
        calls.append("output")
        return ssd_emulation._chunk_scan_fwd(cb, x, dt, dA_cumsum, C, states, D)[0]
    ssd = ssd_emulation.namespace(_chunk_scan_fwd=lambda *a, **k: calls.append("mamba_ssm's"))
    fused = mixer_function.MixerFunction.build(mixer_function.with_chunk_scan_output(ssd, output))
    m = mixer(2)
    g = torch.Generator().manual_seed(3)
    zxbcdt = torch.randn(2, 16, m.d_in_proj, generator=g, dtype=torch.float64)
    dout = torch.randn(2, 16, m.d_model, generator=g, dtype=torch.float64)
    want_out, want = output_and_grads(m, zxbcdt, lambda t: m.out_proj(m.mix(t)), dout)
    got_out, got = output_and_grads(m, zxbcdt, lambda t: fused(*fused_args(m, t)), dout)
    assert calls == ["output"]
    torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-10)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10, msg=name)


def gated_out_float64(cb, x, dt, dA_cumsum, C, states, D, z, norm_weight):
    """chunk_scan_gated_out's result from the float64 stand-in of mamba_ssm's output launcher."""
    y, _ = ssd_emulation._chunk_scan_fwd(cb, x, dt, dA_cumsum, C, states, D=D)
    gated = y * torch.nn.functional.silu(z)
    return gated * norm_weight.view(z.shape[2], z.shape[3]), gated.square().sum(dim=-1)


@pytest.mark.parametrize("chunks", [1, 3])
def test_unscaled_forward_times_the_row_scale_is_the_mixers_output(chunks):
    """out_proj before the gated norm's row scale, and the per-head sums that give the scale: scaled, the
    mixer's output (the reference path); a row scale taken from the wrong sums, or a weight on both sides
    of out_proj, fails."""
    m = mixer(1, seed=chunks)
    g = torch.Generator().manual_seed(chunks)
    zxbcdt = torch.randn(2, 8 * chunks, m.d_in_proj, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out, sumsq = mixer_function.unscaled_forward(ssd_emulation.namespace(), gated_out_float64, zxbcdt,
                                                     *fused_args(m, zxbcdt)[1:8], m.out_proj.weight, m.headdim,
                                                     m.ngroups)
        want = m.out_proj(m.mix(zxbcdt))
    assert sumsq.shape == (2, 8 * chunks, m.nheads)
    scale = torch.rsqrt(sumsq.sum(dim=-1, keepdim=True) / m.d_inner + m.norm.eps)
    torch.testing.assert_close(out * scale, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, want), "the row scale matters here"


def test_unscaled_forward_refuses_more_than_one_norm_group():
    m = mixer(2)
    zxbcdt = torch.randn(1, 8, m.d_in_proj, dtype=torch.float64)
    with pytest.raises(AssertionError, match="one per row"):
        mixer_function.unscaled_forward(ssd_emulation.namespace(), gated_out_float64, zxbcdt,
                                        *fused_args(m, zxbcdt)[1:8], m.out_proj.weight, m.headdim, m.ngroups)


def walk_float64(ssd, x, dt_raw, dt_bias, A, B, C, D, z, norm_weight):
    """chunk_walk_gated's result in float64 (model.ssd's step-by-step scan), its sums in two blocks a head."""
    from model.ssd import ssd_sequential
    y = ssd_sequential(x, dt_raw, A, B, C, D, dt_bias, dt_softplus=True)
    gated = y * torch.nn.functional.silu(z)
    sums = gated.square().unflatten(-1, (2, -1)).sum(dim=-1).flatten(2)
    return gated * norm_weight.view(z.shape[2], z.shape[3]), sums


def test_unscaled_forward_with_the_walk_times_the_row_scale_is_the_mixers_output():
    """With `walk` (model/chunk_walk_kernel.py's one-kernel scan) the scan's raw inputs go to it and the
    launchers' pieces are not computed; its sums, in blocks of a head's channels, give the same row scale."""
    m = mixer(1, seed=5)
    g = torch.Generator().manual_seed(5)
    zxbcdt = torch.randn(2, 24, m.d_in_proj, generator=g, dtype=torch.float64)
    calls = []

    def unused(*args):
        raise AssertionError("the scan's pieces were computed although the walk ran")

    def walk(ssd, *args):
        calls.append(ssd)
        return walk_float64(ssd, *args)
    launchers = ssd_emulation.namespace(_bmm_chunk_fwd=unused, _chunk_state_fwd=unused)
    with torch.no_grad():
        out, sumsq = mixer_function.unscaled_forward(launchers, unused, zxbcdt, *fused_args(m, zxbcdt)[1:8],
                                                     m.out_proj.weight, m.headdim, m.ngroups, walk=walk)
        want = m.out_proj(m.mix(zxbcdt))
    assert calls == [launchers], "the walk gets the launchers (for the cumulative decay at its own chunk)"
    assert sumsq.shape == (2, 24, 2 * m.nheads)
    scale = torch.rsqrt(sumsq.sum(dim=-1, keepdim=True) / m.d_inner + m.norm.eps)
    torch.testing.assert_close(out * scale, want, rtol=1e-10, atol=1e-10)
