"""Stand-ins for the mamba_ssm launchers that model/mixer_function.py calls, in float64 on CPU.

Each takes the launcher's own parameters (mamba_ssm 2.3 names and defaults, so a call that binds an
argument to the wrong name fails) and returns what the Triton launcher returns, in its layout:
    dt (b, L, H)          dA_cumsum, dt after softplus: (b, H, chunks, l)
    x (b, L, H, P)        B, C (b, L, G, N)        CB (b, chunks, G, l, s)
    states (b, chunks, H, P, N): chunk states, or the states entering each chunk after passing
The forward launchers are the SSD written out per chunk; every backward launcher is autograd of the one
term of the SSD it differentiates (the intra-chunk scan, the earlier states' contribution, the chunk
states, the passing), with dA_cumsum as a leaf where the launcher returns a gradient w.r.t. the cumsum
and as the cumsum of a per-step leaf where it returns one w.r.t. each step's dA. Which term each covers
is what mamba_ssm's `_mamba_chunk_scan_combined_bwd` composes; bench/gpu_validate.py compares the real
launchers' composition with mamba_ssm's own function on a GPU.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from einops import rearrange

INF = float("inf")


def per_head(t, nheads):
    """(b, L, G, N) -> (b, L, H, N): head h reads group h // (H / G)."""
    return t.repeat_interleave(nheads // t.shape[2], dim=2)


def decay(dA_cumsum):
    """exp(dA_cumsum[l] - dA_cumsum[s]) for s <= l, else 0: (b, H, c, l, s)."""
    diff = dA_cumsum[..., :, None] - dA_cumsum[..., None, :]
    causal = torch.ones(diff.shape[-2:], dtype=torch.bool).tril()
    return torch.where(causal, diff, -INF).exp()


def chunks(t, chunk_size):
    return rearrange(t, "b (c l) ... -> b c l ...", l=chunk_size)


# ---------------------------------------------------------------- the SSD's terms
def intra(x, dt, dA_cumsum, cb):
    """y_l = sum_{s <= l} CB[l, s] exp(dA_cs[l] - dA_cs[s]) dt_s x_s within each chunk: (b, L, H, P)."""
    chunk_size, nheads = dA_cumsum.shape[-1], x.shape[2]
    cb = cb.repeat_interleave(nheads // cb.shape[2], dim=2)                     # (b, c, H, l, s)
    weights = cb * rearrange(decay(dA_cumsum) * dt[..., None, :], "b h c l s -> b c h l s")
    y = torch.einsum("bchls,bcshp->bclhp", weights, chunks(x, chunk_size))
    return rearrange(y, "b c l h p -> b (c l) h p")


def from_states(C, dA_cumsum, states):
    """y_l = exp(dA_cs[l]) C_l . state entering the chunk: (b, L, H, P)."""
    chunk_size = dA_cumsum.shape[-1]
    C = chunks(per_head(C, states.shape[2]), chunk_size)                        # (b, c, l, H, N)
    y = torch.einsum("bclhn,bchpn->bclhp", C, states) * rearrange(dA_cumsum.exp(), "b h c l -> b c l h 1")
    return rearrange(y, "b c l h p -> b (c l) h p")


def chunk_states(B, x, dt, dA_cumsum):
    """each chunk's own state: sum_s exp(dA_cs[last] - dA_cs[s]) dt_s x_s B_s^T: (b, c, H, P, N)."""
    chunk_size = dA_cumsum.shape[-1]
    w = (dA_cumsum[..., -1:] - dA_cumsum).exp() * dt                            # (b, H, c, l)
    B = chunks(per_head(B, x.shape[2]), chunk_size)
    return torch.einsum("bhcl,bclhp,bclhn->bchpn", w, chunks(x, chunk_size), B)


def passing(states, dA_chunk_cumsum, initial=None):
    """states entering each chunk (b, c, H, D) and the final state: P_{c+1} = exp(a_c) P_c + S_c."""
    entering, current = [], torch.zeros_like(states[:, 0]) if initial is None else initial
    for c in range(states.shape[1]):
        entering.append(current)
        current = dA_chunk_cumsum[:, :, c, None].exp() * current + states[:, c]
    return torch.stack(entering, dim=1), current


def grads(value, wrt, dout):
    """autograd of sum(value * dout) w.r.t. the tensors in `wrt` (zeros where value does not depend on one)."""
    if not value.requires_grad:          # e.g. the states entering a single chunk: all zero
        return tuple(torch.zeros_like(t) for t in wrt)
    return torch.autograd.grad(value, wrt, dout, allow_unused=True, materialize_grads=True)


def steps_leaf(dA_cumsum):
    """(per-step dA as a leaf, its cumsum): gradients w.r.t. each step's dA."""
    step = torch.cat([dA_cumsum[..., :1], dA_cumsum.diff(dim=-1)], dim=-1).detach().requires_grad_()
    return step, step.cumsum(dim=-1)


def leaves(*tensors):
    return [t.detach().requires_grad_() if t is not None else None for t in tensors]


# ---------------------------------------------------------------- the launchers
def _chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF)):
    dt = dt + dt_bias if dt_bias is not None else dt
    dt = F.pad(F.softplus(dt) if dt_softplus else dt, (0, 0, 0, -dt.shape[1] % chunk_size))   # no steps past the end
    dt = rearrange(dt, "b (c l) h -> b h c l", l=chunk_size).contiguous()
    return (dt * A[:, None, None]).cumsum(dim=-1), dt


def _chunk_state_fwd(B, x, dt, dA_cumsum, seq_idx=None, states=None, states_in_fp32=True):
    return chunk_states(B, x, dt, dA_cumsum)


def _state_passing_fwd(states, dA_chunk_cumsum, initial_states=None, seq_idx=None, chunk_size=None,
                       out_dtype=None):
    return passing(states, dA_chunk_cumsum, initial_states)


def _bmm_chunk_fwd(a, b, chunk_size, seq_idx=None, causal=False, output_dtype=None):
    return torch.einsum("bclgn,bcsgn->bcgls", chunks(a, chunk_size), chunks(b, chunk_size))


def _chunk_scan_fwd(cb, x, dt, dA_cumsum, C, states, D=None, z=None, seq_idx=None):
    out = intra(x, dt, dA_cumsum, cb) + from_states(C, dA_cumsum, states)
    return out + x * D[:, None], None


@torch.enable_grad()   # a backward runs with autograd off
def _chunk_scan_bwd_dstates(C, dA_cumsum, dout, seq_idx=None, dtype=None):
    b, c, h, p, n = dout.shape[0], dA_cumsum.shape[2], dout.shape[2], dout.shape[3], C.shape[-1]
    states = torch.zeros(b, c, h, p, n, dtype=dout.dtype, requires_grad=True)
    return grads(from_states(C, dA_cumsum, states), [states], dout)[0]


@torch.enable_grad()   # a backward runs with autograd off
def _state_passing_bwd(states, dA_chunk_cumsum, dout, dfinal_states=None, seq_idx=None, has_initial_states=None,
                       dstates_dtype=None, states_dtype=None, chunk_size=None):
    assert dfinal_states is None and not has_initial_states
    # each chunk's own state from the entering ones (the last chunk's only feeds the final state)
    own = torch.cat([states[:, 1:] - dA_chunk_cumsum[:, :, :-1].transpose(1, 2)[..., None].exp() * states[:, :-1],
                     torch.zeros_like(states[:, :1])], dim=1)
    own, a = leaves(own, dA_chunk_cumsum)
    entering, _ = passing(own, a)
    dstates, ddA_chunk_cumsum = grads(entering, [own, a], dout)
    return dstates, ddA_chunk_cumsum, None, states


@torch.enable_grad()   # a backward runs with autograd off
def _chunk_scan_chunk_state_bwd_dx(x, dt, dA_cumsum, B, CB, dout, dstates, D=None, seq_idx=None, dx=None):
    xl, dtl, Dl = leaves(x, dt, D)
    value = (intra(xl, dtl, dA_cumsum, CB) * dout).sum() + (chunk_states(B, xl, dtl, dA_cumsum) * dstates).sum()
    value = value + (xl * Dl[:, None] * dout).sum()
    gx, gdt, gD = torch.autograd.grad(value, [xl, dtl, Dl])
    if dx is not None:
        dx.copy_(gx)
    return (gx if dx is None else dx), gdt, gD


@torch.enable_grad()   # a backward runs with autograd off
def _chunk_state_bwd_db(x, dt, dA_cumsum, dstates, seq_idx=None, B=None, ngroups=1):
    (Bl,), (step, cumsum) = leaves(B), steps_leaf(dA_cumsum)
    return grads(chunk_states(Bl, x, dt, cumsum), [Bl, step], dstates)


@torch.enable_grad()   # a backward runs with autograd off
def _chunk_scan_bwd_dC(prev_states, dA_cumsum, dout, seq_idx=None, C=None, ngroups=1):
    Cl, cs = leaves(C, dA_cumsum)
    return grads(from_states(Cl, cs, prev_states), [Cl, cs], dout)


@torch.enable_grad()   # a backward runs with autograd off
def _chunk_scan_bwd_dcb(x, dt, dA_cumsum, dout, seq_idx=None, CB=None, ngroups=1):
    b, c, l = dA_cumsum.shape[0], dA_cumsum.shape[2], dA_cumsum.shape[3]
    cb = torch.zeros(b, c, ngroups, l, l, dtype=dout.dtype, requires_grad=True)
    return grads(intra(x, dt, dA_cumsum, cb), [cb], dout)[0]


def _bmm_chunk_bwd(a, dout, residual=None, out=None):
    """out[s] = sum_l dout[l, s] a[l] (+ residual): the gradient of CB = a b^T w.r.t. b."""
    got = rearrange(torch.einsum("bcgls,bclgn->bcsgn", dout, chunks(a, dout.shape[-1])), "b c s g n -> b (c s) g n")
    got = got + residual if residual is not None else got
    if out is not None:
        out.copy_(got)
    return got if out is None else out


@torch.enable_grad()   # a backward runs with autograd off
def _chunk_scan_bwd_ddAcs_stable(x, dt, dA_cumsum, dout, cb):
    step, cumsum = steps_leaf(dA_cumsum)
    return grads(intra(x, dt, cumsum, cb), [step], dout)[0]


@torch.enable_grad()   # a backward runs with autograd off
def _chunk_cumsum_bwd(ddA, ddt_out, dt, A, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF), ddt=None):
    dtl, Al, biasl = leaves(dt, A, dt_bias)
    _, dt_soft = _chunk_cumsum_fwd(dtl, Al, ddA.shape[-1], biasl, dt_softplus)
    step = dt_soft * Al[:, None, None]
    got, dA, dbias = torch.autograd.grad((step * ddA).sum() + (dt_soft * ddt_out).sum(), [dtl, Al, biasl])
    if ddt is not None:
        ddt.copy_(got)
    return (got if ddt is None else ddt), dA, dbias


def gated_rms_norm(x, weight, z, eps, group_size):
    """RMSNorm(x * silu(z)) over groups, times weight; and 1 / rms per row and group."""
    xz = rearrange(x * F.silu(z), "m (g d) -> m g d", d=group_size)
    rstd = xz.square().mean(dim=-1).add(eps).rsqrt()
    return rearrange(xz * rstd[..., None], "m g d -> m (g d)") * weight, rstd


def _layer_norm_fwd(x, weight, bias, eps, z=None, out=None, group_size=None, norm_before_gate=True,
                    is_rms_norm=False):
    assert is_rms_norm and not norm_before_gate and bias is None
    y, rstd = gated_rms_norm(x, weight, z, eps, group_size)
    if out is not None:
        out.copy_(y)
    return (y if out is None else out), None, rstd


@torch.enable_grad()   # a backward runs with autograd off
def _layer_norm_bwd(dy, x, weight, bias, eps, mean, rstd, z=None, group_size=None, norm_before_gate=True,
                    is_rms_norm=False, recompute_output=False, dz=None, out=None):
    xl, wl, zl = leaves(x, weight, z)
    y, _ = gated_rms_norm(xl, wl, zl, eps, group_size)
    dx, dw, gz = torch.autograd.grad(y, [xl, wl, zl], dy)
    if dz is not None:
        dz.copy_(gz)
    if out is not None:
        out.copy_(y.detach())
    return (dx, dw, None, gz if dz is None else dz) + ((y.detach() if out is None else out,) if recompute_output else ())


def causal_conv1d_fwd_function(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation):
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(y) if silu_activation else y


@torch.enable_grad()   # a backward runs with autograd off
def causal_conv1d_bwd_function(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
                               return_dinitial_states, silu_activation):
    xl, wl, bl = leaves(x, weight, bias)
    gx, gw, gb = grads(causal_conv1d_fwd_function(xl, wl, bl, None, None, None, silu_activation), [xl, wl, bl], dout)
    if dx is not None:
        dx.copy_(gx)
    return (gx if dx is None else dx), gw, gb, None


def _mamba_chunk_scan_combined_bwd(dout, x, dt, A, B, C, out, chunk_size, D=None, z=None, dt_bias=None,
                                   initial_states=None, dfinal_states=None, seq_idx=None, dt_softplus=False,
                                   dt_limit=(0.0, INF), dx=None, ddt=None, dB=None, dC=None, dz=None,
                                   recompute_output=False):
    raise AssertionError("model/mixer_function.py must not call mamba_ssm's combined backward")


def namespace(**replaced):
    """A stand-in for mamba_ssm.ops.triton.ssd_combined: the launchers above, `replaced` swapped in."""
    names = {k: v for k, v in globals().items() if k.startswith(("_chunk", "_state", "_bmm", "_layer", "_mamba",
                                                                  "causal_conv1d"))}
    return types.SimpleNamespace(__name__="ssd_emulation", ensure_stride=lambda t: t, **{**names, **replaced})
