"""The Mamba-2 selective state space scan (SSD), in plain PyTorch.

Per head h, with a scalar decay A_h < 0, a state S of shape (headdim, d_state) and inputs at step t:
    dt_t = softplus(dt_raw_t + dt_bias_h)                      (when dt_softplus)
    S_t  = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T         x_t: (headdim,), B_t: (d_state,)
    y_t  = S_t C_t + D_h * x_t                                  C_t: (d_state,)
B and C are shared by the nheads/ngroups heads of a group (head h reads group h // (nheads/ngroups)).

Two implementations of the same function:
    ssd_sequential  the recurrence above, one step at a time. Slow; the ground truth for tests.
    ssd_chunked     the state space duality form (Dao & Gu 2024, Listing 1 / mamba_ssm ssd_minimal):
                    inside a chunk of Q steps the scan is a masked (Q x Q) attention-like product,
                    between chunks a short recurrence carries the state. This is the CPU path and the
                    reference the GPU Triton kernel (mamba_chunk_scan_combined) is tested against.
Both compute in float32 (float64 if given float64) and return the dtype of x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _discretize(dt, A, dt_bias, dt_softplus, dtype):
    """dt (b, l, h) -> step sizes dt (b, l, h) and log-decays dt * A, both in `dtype`."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt, dt * A.to(dtype)


def ssd_sequential(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False,
                   initial_state=None, return_final_state=False):
    """The recurrence, step by step.

    x: (b, l, h, p)  dt: (b, l, h)  A: (h,)  B, C: (b, l, g, n)  D: (h,) or None  dt_bias: (h,) or None
    initial_state: (b, h, p, n) or None.  Returns y (b, l, h, p) [, final state (b, h, p, n)].
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    dtype = _compute_dtype(x)
    dt, dA = _discretize(dt, A, dt_bias, dt_softplus, dtype)
    heads_per_group = nheads // ngroups
    B = B.to(dtype).repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    C = C.to(dtype).repeat_interleave(heads_per_group, dim=2)
    xs = x.to(dtype)
    state = (torch.zeros(batch, nheads, headdim, d_state, dtype=dtype, device=x.device)
             if initial_state is None else initial_state.to(dtype))
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dA[:, t])[:, :, None, None]                                  # (b, h, 1, 1)
        inject = (dt[:, t, :, None] * xs[:, t])[..., None] * B[:, t, :, None, :]       # (b, h, p, n)
        state = decay * state + inject
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * xs
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y


def segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, and -inf above the diagonal.

    exp(segsum(log_decays)) is the (Q x Q) matrix of decays from step j to step i. Summing the masked
    increments (instead of subtracting two cumsums) keeps it exact for long chunks.
    """
    T = a.size(-1)
    a = a[..., None].expand(*a.shape, T)                                      # a[..., i, j] = a_i
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, -torch.inf)


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False,
                initial_state=None, return_final_state=False):
    """The chunked SSD scan; same arguments and result as `ssd_sequential`, any sequence length.

    The sequence is zero-padded to a multiple of chunk_size. Padded steps have dt = 0 (no input, no
    decay) and come after every real step, so they change neither the outputs nor the final state.
    """
    seqlen, ngroups = x.shape[1], B.shape[2]
    out_dtype, dtype = x.dtype, _compute_dtype(x)
    # The scan runs in fp32 even under autocast: the cumulative decays lose too much in bf16.
    with torch.autocast(device_type=x.device.type, enabled=False):
        dt, dA = _discretize(dt, A, dt_bias, dt_softplus, dtype)
        x_dt = x.to(dtype) * dt[..., None]                   # dt-scaled input: the "B x dt" term
        B, C = B.to(dtype), C.to(dtype)

        pad = (-seqlen) % chunk_size
        if pad:
            x_dt, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x_dt, B, C))
            dA = F.pad(dA, (0, 0, 0, pad))

        # Heads split as (group, head-in-group) so B and C are never copied per head.
        # Names: c chunk, l/s step within a chunk (target/source), g group, r head in group, p headdim,
        # n d_state.
        x_dt = rearrange(x_dt, "b (c l) (g r) p -> b c l g r p", l=chunk_size, g=ngroups)
        B = rearrange(B, "b (c l) g n -> b c l g n", l=chunk_size)
        C = rearrange(C, "b (c l) g n -> b c l g n", l=chunk_size)
        dA = rearrange(dA, "b (c l) (g r) -> b g r c l", l=chunk_size, g=ngroups)
        dA_cumsum = torch.cumsum(dA, dim=-1)                 # log-decay from chunk start to step l

        # 1. within each chunk: y_l = sum_{s <= l} (C_l . B_s) * decay(s -> l) * dt_s x_s
        decay_within = torch.exp(segsum(dA))                 # (b g r c l s)
        CB = torch.einsum("bclgn,bcsgn->bgcls", C, B)
        y_diag = torch.einsum("bgrcls,bcsgrp->bclgrp", CB[:, :, None] * decay_within, x_dt)

        # 2. the state each chunk leaves behind, from its own inputs only
        decay_to_end = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)                       # (b g r c l)
        chunk_states = torch.einsum("bclgn,bgrcl,bclgrp->bcgrpn", B, decay_to_end, x_dt)

        # 3. carry states across chunks: state entering chunk c = sum_{c' < c} decay(c' -> c) * own state of c'
        if initial_state is None:
            initial_state = torch.zeros_like(chunk_states[:, :1])
        else:
            initial_state = rearrange(initial_state.to(dtype), "b (g r) p n -> b 1 g r p n", g=ngroups)
        chunk_states = torch.cat([initial_state, chunk_states], dim=1)                   # (b c+1 g r p n)
        decay_chunks = torch.exp(segsum(F.pad(dA_cumsum[..., -1], (1, 0))))             # (b g r c+1 c+1)
        states = torch.einsum("bgrzc,bcgrpn->bzgrpn", decay_chunks, chunk_states)
        states, final_state = states[:, :-1], states[:, -1]

        # 4. what the carried-in state contributes inside each chunk: y_l += decay(start -> l) * C_l . state
        y_off = torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", C, states, torch.exp(dA_cumsum))

        y = rearrange(y_diag + y_off, "b c l g r p -> b (c l) (g r) p")[:, :seqlen]
        if D is not None:
            y = y + D.to(dtype)[:, None] * x.to(dtype)
    y = y.to(out_dtype)
    if return_final_state:
        return y, rearrange(final_state, "b g r p n -> b (g r) p n")
    return y
