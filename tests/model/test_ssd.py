"""The chunked SSD scan against the recurrence, written out plainly here (float64)."""
import pytest
import torch
import torch.nn.functional as F

from model.ssd import ssd_chunked, ssd_sequential


def plain_recurrence(x, dt, A, B, C, D=None, dt_bias=None, initial_state=None):
    """Per batch, head and step: S = exp(dt*A) S + dt x B^T; y = S C + D x (dt through softplus)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    ys = []
    finals = []
    for b in range(batch):
        heads_y, heads_s = [], []
        for h in range(nheads):
            g = h // (nheads // ngroups)
            S = torch.zeros(headdim, d_state, dtype=x.dtype) if initial_state is None else initial_state[b, h]
            y_h = []
            for t in range(seqlen):
                step = F.softplus(dt[b, t, h] + (0 if dt_bias is None else dt_bias[h]))
                S = torch.exp(step * A[h]) * S + step * torch.outer(x[b, t, h], B[b, t, g])
                y_t = S @ C[b, t, g]
                if D is not None:
                    y_t = y_t + D[h] * x[b, t, h]
                y_h.append(y_t)
            heads_y.append(torch.stack(y_h))          # (l, p)
            heads_s.append(S)
        ys.append(torch.stack(heads_y, dim=1))        # (l, h, p)
        finals.append(torch.stack(heads_s))
    return torch.stack(ys), torch.stack(finals)


def random_inputs(batch, seqlen, nheads, headdim, ngroups, d_state, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    return {
        "x": r(batch, seqlen, nheads, headdim),
        "dt": r(batch, seqlen, nheads) - 1.0,
        "A": -torch.exp(r(nheads)),                   # decays of very different speeds
        "B": r(batch, seqlen, ngroups, d_state),
        "C": r(batch, seqlen, ngroups, d_state),
        "D": r(nheads),
        "dt_bias": 0.5 * r(nheads),
    }


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_sequential_matches_plain_recurrence():
    inp = random_inputs(2, 9, 4, 3, 2, 5)
    s0 = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    want_y, want_s = plain_recurrence(**inp, initial_state=s0)
    y, s = ssd_sequential(**inp, dt_softplus=True, initial_state=s0, return_final_state=True)
    assert rel(y, want_y) < 1e-12 and rel(s, want_s) < 1e-12


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("seqlen", [1, 7, 16, 37])
@pytest.mark.parametrize("ngroups", [1, 2, 4])
def test_chunked_matches_recurrence(chunk_size, seqlen, ngroups):
    inp = random_inputs(2, seqlen, 4, 3, ngroups, 5, seed=seqlen * 100 + chunk_size + ngroups)
    want_y, want_s = plain_recurrence(**inp)
    y, s = ssd_chunked(**inp, chunk_size=chunk_size, dt_softplus=True, return_final_state=True)
    assert y.shape == want_y.shape and y.dtype == torch.float64
    assert rel(y, want_y) < 1e-6
    assert rel(s, want_s) < 1e-6


def test_chunked_with_initial_state_and_without_D():
    inp = random_inputs(1, 21, 2, 4, 1, 3)
    inp["D"] = None
    s0 = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    want_y, want_s = plain_recurrence(**inp, initial_state=s0)
    y, s = ssd_chunked(**inp, chunk_size=8, dt_softplus=True, initial_state=s0, return_final_state=True)
    assert rel(y, want_y) < 1e-6 and rel(s, want_s) < 1e-6


def test_chunked_gradients_match_recurrence():
    inp = random_inputs(2, 13, 4, 2, 2, 3)
    s0 = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
    leaves["initial_state"] = s0.clone().requires_grad_(True)
    grad_out = torch.randn(2, 13, 4, 2, dtype=torch.float64)

    y, _ = plain_recurrence(**leaves)
    want = torch.autograd.grad((y * grad_out).sum(), list(leaves.values()))
    y = ssd_chunked(**leaves, chunk_size=4, dt_softplus=True)
    got = torch.autograd.grad((y * grad_out).sum(), list(leaves.values()))
    for name, a, b in zip(leaves, got, want):
        assert rel(a, b) < 1e-6, name


def test_chunked_gradcheck():
    inp = random_inputs(1, 5, 2, 2, 1, 2)
    leaves = [inp[k].clone().requires_grad_(True) for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
    fn = lambda x, dt, A, B, C, D, bias: ssd_chunked(x, dt, A, B, C, 2, D=D, dt_bias=bias,
                                                     dt_softplus=True)
    assert torch.autograd.gradcheck(fn, leaves)


def test_low_precision_inputs_are_scanned_in_fp32():
    inp = random_inputs(1, 40, 2, 4, 1, 8)
    want, _ = plain_recurrence(**inp)
    low = {k: v.to(torch.bfloat16) if k in ("x", "dt", "B", "C") else v.float() for k, v in inp.items()}
    y = ssd_chunked(**low, chunk_size=16, dt_softplus=True)
    assert y.dtype == torch.bfloat16
    assert rel(y.double(), want) < 3e-2                     # bf16 inputs: ~1e-2 from rounding alone
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = ssd_chunked(**{k: v.float() for k, v in inp.items()}, chunk_size=16, dt_softplus=True)
    assert y32.dtype == torch.float32
    assert rel(y32.double(), want) < 1e-5                   # autocast must not push the scan to bf16
