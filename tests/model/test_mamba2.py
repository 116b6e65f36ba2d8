"""Mamba2Mixer and BiMamba2 on CPU (reference path), against a plainly written mixer."""
import copy

import pytest
import torch
import torch.nn.functional as F

from model.config import MambaConfig, ModelConfig
from model.mamba2 import BiMamba2, Mamba2Mixer


def tiny_cfg(directions="independent", ngroups=1, d_model=32, chunk_size=8):
    return ModelConfig(d_model=d_model, layer_pattern="M", mamba=MambaConfig(
        d_state=4, headdim=8, chunk_size=chunk_size, ngroups=ngroups, directions=directions))


def randomize(module, seed=0):
    """Move every parameter off its init (norm weight 1, D 1, ...) so wiring mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def plain_mixer_inner(m: Mamba2Mixer, zxbcdt):
    """in_proj output -> normed SSM output, token by token, from the mixer's weights (float64)."""
    batch, seqlen, _ = zxbcdt.shape
    H, P, G, N, di = m.nheads, m.headdim, m.ngroups, m.d_state, m.d_inner
    z, xBC, dt = zxbcdt[..., :di], zxbcdt[..., di:di + m.conv_dim], zxbcdt[..., di + m.conv_dim:]
    w, bias = m.conv1d.weight[:, 0, :], m.conv1d.bias         # (channels, width)
    width = w.shape[1]
    conv = torch.zeros_like(xBC)
    for t in range(seqlen):                                    # out_t = sum_k w[k] * in_{t - width + 1 + k}
        acc = bias.expand(batch, -1).clone()
        for k in range(width):
            s = t - width + 1 + k
            if s >= 0:
                acc = acc + w[:, k] * xBC[:, s]
        conv[:, t] = F.silu(acc)
    x = conv[..., :di].reshape(batch, seqlen, H, P)
    B = conv[..., di:di + G * N].reshape(batch, seqlen, G, N)
    C = conv[..., di + G * N:].reshape(batch, seqlen, G, N)
    A = -torch.exp(m.A_log)
    y = torch.zeros(batch, seqlen, H, P, dtype=zxbcdt.dtype)
    for b in range(batch):
        for h in range(H):
            g = h // (H // G)
            S = torch.zeros(P, N, dtype=zxbcdt.dtype)
            for t in range(seqlen):
                step = F.softplus(dt[b, t, h] + m.dt_bias[h])
                S = torch.exp(step * A[h]) * S + step * torch.outer(x[b, t, h], B[b, t, g])
                y[b, t, h] = S @ C[b, t, g] + m.D[h] * x[b, t, h]
    gated = y.reshape(batch, seqlen, di) * F.silu(z)
    groups = gated.reshape(batch, seqlen, G, di // G)
    normed = groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + m.norm.eps)
    return normed.reshape(batch, seqlen, di) * m.norm.weight


def plain_mixer(m: Mamba2Mixer, u):
    return plain_mixer_inner(m, u @ m.in_proj.weight.T) @ m.out_proj.weight.T


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mixer_matches_plain_computation(ngroups):
    torch.manual_seed(0)
    m = randomize(Mamba2Mixer(tiny_cfg(ngroups=ngroups))).double()
    u = torch.randn(2, 19, 32, dtype=torch.float64)           # 19: not a multiple of the chunk size 8
    want = plain_mixer(m, u)
    assert ((m(u) - want).norm() / want.norm()).item() < 1e-10


@pytest.mark.parametrize("directions", ["independent", "tied_projections"])
@pytest.mark.parametrize("fuse", [True, False])
def test_bimamba_is_forward_plus_flipped_backward(directions, fuse):
    torch.manual_seed(0)
    bi = randomize(BiMamba2(tiny_cfg(directions), fuse_directions=fuse)).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    if directions == "independent":
        want = plain_mixer(bi.fwd, x) + plain_mixer(bi.bwd, x.flip(1)).flip(1)
    else:                                                      # shared in_proj / out_proj
        zxbcdt = x @ bi.in_proj.weight.T
        inner = plain_mixer_inner(bi.fwd, zxbcdt) + plain_mixer_inner(bi.bwd, zxbcdt.flip(1)).flip(1)
        want = inner @ bi.out_proj.weight.T
    assert ((bi(x) - want).norm() / want.norm()).item() < 1e-10


def test_single_direction_is_causal():
    torch.manual_seed(0)
    m = randomize(Mamba2Mixer(tiny_cfg())).double()
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    j = 17                                                     # inside a chunk, not at its start
    changed = x.clone()
    changed[:, j] += 1.0
    y, y2 = m(x), m(changed)
    assert torch.equal(y[:, :j], y2[:, :j]), "a later token leaked into earlier outputs"
    assert (y[:, j:] - y2[:, j:]).abs().amax(dim=(0, 2)).min() > 1e-8, "the change must reach later outputs"


@pytest.mark.parametrize("directions", ["independent", "tied_projections"])
@pytest.mark.parametrize("fuse", [True, False])
def test_bimamba_sees_both_sides(directions, fuse):
    torch.manual_seed(0)
    bi = randomize(BiMamba2(tiny_cfg(directions), fuse_directions=fuse)).double()
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    y = bi(x)
    for i, j in [(5, 20), (20, 5), (0, 28), (28, 0)]:
        changed = x.clone()
        changed[:, j] += 1.0
        assert (bi(changed)[:, i] - y[:, i]).abs().max() > 1e-6, f"position {i} does not see token {j}"


def test_swapping_directions_and_flipping_input_flips_output():
    torch.manual_seed(0)
    bi = randomize(BiMamba2(tiny_cfg("independent"))).double()
    swapped = copy.deepcopy(bi)
    swapped.fwd.load_state_dict(bi.bwd.state_dict())
    swapped.bwd.load_state_dict(bi.fwd.state_dict())
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    torch.testing.assert_close(swapped(x.flip(1)), bi(x).flip(1), rtol=1e-10, atol=1e-12)


def test_config_chooses_fused_directions():
    """mamba.fuse_directions: separate directions unless the config says true (null, as false), at every
    d_model; an explicit argument wins over the config."""
    def fused(d_model, setting, argument=None):
        cfg = ModelConfig(d_model=d_model, layer_pattern="M", mamba=MambaConfig(
            d_state=4, headdim=8, chunk_size=8, fuse_directions=setting))
        return BiMamba2(cfg, fuse_directions=argument).fuse_directions
    assert [fused(32, False), fused(2048, False), fused(32, None), fused(1024, None)] == [False] * 4
    assert [fused(32, True), fused(2048, True), fused(2048, True, argument=False), fused(32, False, argument=True)] \
        == [True, True, False, True]
    assert MambaConfig().fuse_directions is False


@pytest.mark.parametrize("directions", ["independent", "tied_projections"])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_fused_directions_equal_separate(directions, ngroups):
    torch.manual_seed(0)
    fused = randomize(BiMamba2(tiny_cfg(directions, ngroups), fuse_directions=True)).double()
    separate = copy.deepcopy(fused)
    separate.fuse_directions = False
    x = torch.randn(2, 23, 32, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 23, 32, dtype=torch.float64)
    results = []
    for model in (fused, separate):
        out = model(x)
        grads = torch.autograd.grad(out, [x, *model.parameters()], grad_out)
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("directions", ["independent", "tied_projections"])
@pytest.mark.parametrize("fuse", [True, False])
def test_gradients_reach_every_parameter(directions, fuse):
    torch.manual_seed(0)
    bi = BiMamba2(tiny_cfg(directions), fuse_directions=fuse)
    x = torch.randn(2, 11, 32)
    bi(x).pow(2).mean().backward()
    for name, p in bi.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
    n_mixers = sum(isinstance(mod, Mamba2Mixer) for mod in bi.modules())
    shared = {"in_proj.weight", "out_proj.weight"}
    names = {n for n, _ in bi.named_parameters()}
    assert n_mixers == 2
    assert shared <= names if directions == "tied_projections" else not (shared & names)


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=256, layer_pattern="M", mamba=MambaConfig(d_state=8, headdim=8))
    m = Mamba2Mixer(cfg)
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= cfg.mamba.dt_min * 0.999 and dt.max() <= cfg.mamba.dt_max * 1.001
    assert dt.log().std() > 0.5                                 # log-uniform over two decades
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16 and A.max() - A.min() > 5
    assert torch.equal(m.D, torch.ones(cfg.mamba_nheads))
    assert torch.equal(m.norm.weight, torch.ones(cfg.d_inner))


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.bfloat16(),
                                  lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)])
def test_ssm_parameters_stay_fp32_under_low_precision_casts(cast):
    torch.manual_seed(0)
    bi = BiMamba2(tiny_cfg())
    before = {n: p.detach().clone() for n, p in bi.named_parameters()}
    cast(bi)
    for name, p in bi.named_parameters():
        if name.split(".")[-1] in ("A_log", "D", "dt_bias"):
            assert p.dtype == torch.float32 and torch.equal(p, before[name]), name   # not even rounded
        else:
            assert p.dtype in (torch.bfloat16, torch.float16), name
    bi.double()                                                # widening is allowed
    assert bi.fwd.A_log.dtype == torch.float64


@pytest.mark.parametrize("fuse", [True, False])
def test_bf16_forward_runs_on_cpu(fuse):
    torch.manual_seed(0)
    bi = BiMamba2(tiny_cfg(), fuse_directions=fuse)
    x = torch.randn(2, 21, 32)
    want = bi(x)
    bi.to(torch.bfloat16)
    y = bi(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert ((y.float() - want).norm() / want.norm()).item() < 5e-2
    y.float().sum().backward()
    assert bi.fwd.A_log.grad.dtype == torch.float32


@pytest.mark.parametrize("seqlen", [1, 3, 8, 17])
def test_any_sequence_length(seqlen):
    torch.manual_seed(0)
    bi = BiMamba2(tiny_cfg(chunk_size=8))
    assert bi(torch.randn(1, seqlen, 32)).shape == (1, seqlen, 32)


@pytest.mark.parametrize("fuse", [True, False])
def test_batches_past_the_kernels_32_bit_limit_are_split(monkeypatch, fuse):
    """A batch whose widest mixer tensor would pass KERNEL_MAX_ELEMENTS runs in pieces below it, with the
    same result as the whole batch (checked against the plain per-sequence computation, float64)."""
    from model import mamba2
    torch.manual_seed(0)
    bi = randomize(BiMamba2(tiny_cfg(), fuse_directions=fuse)).double()
    x = torch.randn(5, 13, 32, dtype=torch.float64)
    want = torch.cat([plain_mixer(bi.fwd, s) + plain_mixer(bi.bwd, s.flip(1)).flip(1) for s in x.split(1)])
    per_seq = 13 * bi.fwd.d_in_proj * (2 if fuse else 1)
    pieces = []
    real = bi._forward
    monkeypatch.setattr(bi, "_forward", lambda part: pieces.append(part.shape[0]) or real(part))
    monkeypatch.setattr(mamba2, "KERNEL_MAX_ELEMENTS", 2 * per_seq + 1)   # two sequences fit
    got = bi(x)
    assert pieces == [2, 2, 1]
    assert ((got - want).norm() / want.norm()).item() < 1e-10
    pieces.clear()
    monkeypatch.setattr(mamba2, "KERNEL_MAX_ELEMENTS", 2 ** 31 - 1)
    bi(x)
    assert pieces == [5]
