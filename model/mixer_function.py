"""One Mamba-2 direction in one autograd function that keeps the scan's chunk states for its backward.

mamba_ssm's `mamba_split_conv1d_scan_combined` saves little: its backward recomputes the conv, and then
`_mamba_chunk_scan_combined_bwd` runs most of the forward scan again before its backward kernels can run:
    dA_cumsum, dt   cumulative sum of A * softplus(dt + dt_bias), and softplus(dt + dt_bias)   (cheap)
    CB              C_l . B_s for every pair of positions in a chunk                           (cheap)
    states          the state entering each chunk: every chunk's own state (`_chunk_state_fwd`),
                    passed along the chunks (`_state_passing_fwd`)            (2% of a 1.3B step)
MixerFunction runs the same forward with the same kernels and keeps the states as the forward's scan
reads them (in the inputs' dtype: batch x chunks x heads x headdim x d_state, 67 MB per direction in
bf16 at micro-batch 8, L = 2048, d_model 2048); its backward recomputes the cheap pieces and runs
mamba_ssm's backward kernels in mamba_ssm's order. The conv output is still recomputed: keeping it would
cost twice the memory for a kernel half as long.

The forward is mamba_ssm's to the bit (`with_chunk_scan_output` swaps in another launcher for the scan's
output, and `with_fused_chunk_states` one for the states entering the chunks: model/kernels.py does so for
forwards without autograd; `unscaled_forward` is the forward without autograd whose output kernel also
gates, and whose norm scale the caller applies after out_proj).
The backward reads the kept states where mamba_ssm's recomputes them in fp32 only in one place, the gradient
of each chunk's decay (`_state_passing_bwd`); everywhere else mamba_ssm's backward too rounds them to the
inputs' dtype first. In fp32 the two are the same.
Only this mixer's path is covered (gated RMSNorm, out_proj without bias, no extra non-SSM channels, no
initial states or seq_idx); `MixerFunction.build` refuses a mamba_ssm whose functions this was not
written against. `ssd` below is mamba_ssm.ops.triton.ssd_combined, whose module namespace holds every
launcher used; tests hand in stand-ins with the same names.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from einops import rearrange

from model.norm_backward import launcher_parameters

NO_DT_LIMIT = (0.0, float("inf"))
# the launchers used, with the parameters of mamba_ssm 2.3 (build() compares)
LAUNCHERS = {
    "_chunk_cumsum_fwd": ("dt", "A", "chunk_size", "dt_bias", "dt_softplus", "dt_limit"),
    "_chunk_state_fwd": ("B", "x", "dt", "dA_cumsum", "seq_idx", "states", "states_in_fp32"),
    "_state_passing_fwd": ("states", "dA_chunk_cumsum", "initial_states", "seq_idx", "chunk_size", "out_dtype"),
    "_bmm_chunk_fwd": ("a", "b", "chunk_size", "seq_idx", "causal", "output_dtype"),
    "_chunk_scan_fwd": ("cb", "x", "dt", "dA_cumsum", "C", "states", "D", "z", "seq_idx"),
    "_chunk_scan_bwd_dstates": ("C", "dA_cumsum", "dout", "seq_idx", "dtype"),
    "_state_passing_bwd": ("states", "dA_chunk_cumsum", "dout", "dfinal_states", "seq_idx", "has_initial_states",
                           "dstates_dtype", "states_dtype", "chunk_size"),
    "_chunk_scan_chunk_state_bwd_dx": ("x", "dt", "dA_cumsum", "B", "CB", "dout", "dstates", "D", "seq_idx", "dx"),
    "_chunk_state_bwd_db": ("x", "dt", "dA_cumsum", "dstates", "seq_idx", "B", "ngroups"),
    "_chunk_scan_bwd_dC": ("prev_states", "dA_cumsum", "dout", "seq_idx", "C", "ngroups"),
    "_chunk_scan_bwd_dcb": ("x", "dt", "dA_cumsum", "dout", "seq_idx", "CB", "ngroups"),
    "_bmm_chunk_bwd": ("a", "dout", "residual", "out"),
    "_chunk_scan_bwd_ddAcs_stable": ("x", "dt", "dA_cumsum", "dout", "cb"),
    "_chunk_cumsum_bwd": ("ddA", "ddt_out", "dt", "A", "dt_bias", "dt_softplus", "dt_limit", "ddt"),
    "_layer_norm_fwd": ("x", "weight", "bias", "eps", "z", "out", "group_size", "norm_before_gate", "is_rms_norm"),
    "_layer_norm_bwd": ("dy", "x", "weight", "bias", "eps", "mean", "rstd", "z", "group_size", "norm_before_gate",
                        "is_rms_norm", "recompute_output", "dz", "out"),
}
# mamba_ssm's backward whose order of kernels scan_backward follows
COMBINED_BWD_PARAMS = ("dout", "x", "dt", "A", "B", "C", "out", "chunk_size", "D", "z", "dt_bias", "initial_states",
                       "dfinal_states", "seq_idx", "dt_softplus", "dt_limit", "dx", "ddt", "dB", "dC", "dz",
                       "recompute_output")


def with_chunk_scan_output(ssd, chunk_scan_out):
    """`ssd` with its `_chunk_scan_fwd` (the scan's output from the chunk states, the last forward launcher)
    replaced by chunk_scan_out(cb, x, dt, dA_cumsum, C, states, D) -> y; every other launcher unchanged."""
    def _chunk_scan_fwd(cb, x, dt, dA_cumsum, C, states, D=None, z=None, seq_idx=None):
        assert z is None and seq_idx is None, "the mixer passes neither"
        return chunk_scan_out(cb, x, dt, dA_cumsum, C, states, D), None
    return _with(ssd, chunk_scan_out, _chunk_scan_fwd=_chunk_scan_fwd)


def with_fused_chunk_states(ssd, states_entering_chunks):
    """`ssd` with the states entering each chunk from one launcher,
    states_entering_chunks(B, x, dt, dA_cumsum, out_dtype) -> (b, chunks, H, P, N), in place of
    `_chunk_state_fwd` then `_state_passing_fwd` (model/state_pass_kernel.py); every launcher unchanged."""
    return _with(ssd, states_entering_chunks, states_entering_chunks=states_entering_chunks)


def _with(ssd, launcher, **replaced):
    """A copy of `ssd`'s namespace with `replaced`, named after `launcher`'s module."""
    name = f"{getattr(ssd, '__name__', ssd)} with {getattr(launcher, '__module__', launcher)}"
    return types.SimpleNamespace(**{**vars(ssd), "__name__": name, **replaced})


def conv_silu(ssd, xBC, conv_weight, conv_bias):
    """(b, l, channels) -> silu(causal depthwise conv), same layout."""
    x_t = rearrange(ssd.ensure_stride(xBC), "b s d -> b d s")
    return rearrange(ssd.causal_conv1d_fwd_function(x_t, conv_weight, conv_bias, None, None, None, True),
                     "b d s -> b s d")


def split_xBC(xBC, nheads, ngroups, dstate):
    """(b, l, d_inner + 2 G N) -> x (b, l, H, P), B and C (b, l, G, N): views."""
    x, B, C = torch.split(xBC, [xBC.shape[-1] - 2 * ngroups * dstate, ngroups * dstate, ngroups * dstate], dim=-1)
    return (rearrange(x, "b l (h p) -> b l h p", h=nheads), rearrange(B, "b l (g n) -> b l g n", g=ngroups),
            rearrange(C, "b l (g n) -> b l g n", g=ngroups))


def split_inputs(ssd, zxbcdt, conv_weight, conv_bias, nheads, headdim, ngroups):
    """zxbcdt = [z, xBC, dt] -> (sizes of the three, z, xBC, dt, (x, B, C) from silu(conv(xBC)))."""
    d_inner = nheads * headdim
    dstate = (conv_weight.shape[0] - d_inner) // ngroups // 2
    sizes = [d_inner, d_inner + 2 * ngroups * dstate, nheads]
    assert zxbcdt.shape[-1] == sum(sizes), "zxbcdt is not [z, xBC, dt]"
    z, xBC, dt_raw = torch.split(zxbcdt, sizes, dim=-1)
    return sizes, z, xBC, dt_raw, split_xBC(conv_silu(ssd, xBC, conv_weight, conv_bias), nheads, ngroups, dstate)


def chunk_pieces(ssd, x, dt_raw, A, B, C, dt_bias, chunk_size):
    """(dA_cumsum, softplus(dt + dt_bias), CB), as mamba_ssm computes them (fp32)."""
    dA_cumsum, dt = ssd._chunk_cumsum_fwd(dt_raw, A, chunk_size, dt_bias=dt_bias, dt_softplus=True,
                                          dt_limit=NO_DT_LIMIT)
    return dA_cumsum, dt, ssd._bmm_chunk_fwd(C, B, chunk_size, output_dtype=torch.float32)


def output_inputs(ssd, x, dt_raw, A, B, C, dt_bias, chunk_size):
    """What the scan's output launcher `_chunk_scan_fwd` reads besides x, C and D: (CB, dt, dA_cumsum, the
    states entering each chunk (b, chunks, H, P, N) in C's dtype)."""
    dA_cumsum, dt, CB = chunk_pieces(ssd, x, dt_raw, A, B, C, dt_bias, chunk_size)
    return CB, dt, dA_cumsum, states_entering_chunks(ssd, B, x, dt, dA_cumsum, chunk_size, C.dtype)


def states_entering_chunks(ssd, B, x, dt, dA_cumsum, chunk_size, out_dtype):
    """The state entering each chunk (b, chunks, H, P, N) in out_dtype: each chunk's own state in fp32
    (`_chunk_state_fwd`) passed along the chunks (`_state_passing_fwd`), or `ssd`'s one launcher for both
    (with_fused_chunk_states)."""
    fused = getattr(ssd, "states_entering_chunks", None)
    if fused is not None:
        return fused(B, x, dt, dA_cumsum, out_dtype)
    states = ssd._chunk_state_fwd(B, x, dt, dA_cumsum, states_in_fp32=True)
    states, _ = ssd._state_passing_fwd(rearrange(states, "... p n -> ... (p n)"), dA_cumsum[:, :, :, -1],
                                       chunk_size=chunk_size, out_dtype=out_dtype)
    return rearrange(states, "... (p n) -> ... p n", n=B.shape[-1])


def scan_forward(ssd, x, dt_raw, A, B, C, D, dt_bias, chunk_size):
    """mamba_ssm's `_mamba_chunk_scan_combined_fwd` (no z, no initial states) -> y (b, l, H, P) and the
    states entering each chunk (b, chunks, H, P, N), in C's dtype."""
    CB, dt, dA_cumsum, states = output_inputs(ssd, x, dt_raw, A, B, C, dt_bias, chunk_size)
    y, _ = ssd._chunk_scan_fwd(CB, x, dt, dA_cumsum, C, states, D=D)
    return y, states


def unscaled_forward(ssd, gated_out, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, norm_weight,
                     out_weight, headdim, ngroups, walk=None):
    """MixerFunction's forward, without autograd and for one norm group, with the norm's row scale left out:
    (out_proj(g * norm_weight), sum over each head's channels of g^2 (b, l, H) fp32), g = SSD(...) * silu(z).
    The mixer's output is the first times rsqrt(the second summed over heads / d_inner + eps): a scale per
    row, which commutes with out_proj, so the caller applies it to d_model channels instead of d_inner.
    `gated_out` is model/chunk_scan_kernel.py's chunk_scan_gated_out (the gate, the sums and the weight in
    the scan's output kernel): the norm kernel and its pass over y and z are gone.
    `walk`, when given, is model/chunk_walk_kernel.py's chunk_walk_gated: the whole scan and the gate in one
    kernel from x, dt, B, C, in place of the scan's launchers and `gated_out` (its sums are then per block of
    a head's channels, (b, l, H * blocks): their sum over the last dim is the same)."""
    assert ngroups == 1, "with more norm groups the scale is not one per row"
    nheads = D.shape[0]
    _, z, _, dt_raw, (x, B, C) = split_inputs(ssd, zxbcdt, conv_weight, conv_bias, nheads, headdim, ngroups)
    z = rearrange(z, "b l (h p) -> b l h p", h=nheads)
    if walk is not None:
        gated, sumsq = walk(ssd, x, dt_raw, dt_bias, A, B, C, D, z, norm_weight.contiguous())
    else:
        CB, dt, dA_cumsum, states = output_inputs(ssd, x, dt_raw, A, B, C, dt_bias, chunk_size)
        gated, sumsq = gated_out(CB, x, dt, dA_cumsum, C, states, D, z, norm_weight.contiguous())
    return F.linear(rearrange(gated, "b l h p -> b l (h p)"), out_weight), sumsq


def scan_backward(ssd, dout, x, dt_raw, A, B, C, D, dt_bias, chunk_size, states, dx, ddt_raw, dB, dC):
    """mamba_ssm's `_mamba_chunk_scan_combined_bwd` (no z, no initial or final states) on the kept states
    instead of recomputed ones. Writes dx, ddt_raw, dB, dC (given buffers); returns (dA, dD, ddt_bias)."""
    dA_cumsum, dt, CB = chunk_pieces(ssd, x, dt_raw, A, B, C, dt_bias, chunk_size)
    dstate, ngroups = B.shape[-1], B.shape[2]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    # fp32, as mamba_ssm's (it asks for its recomputed fp32 states' dtype)
    dstates = ssd._chunk_scan_bwd_dstates(C, dA_cumsum, dout, dtype=torch.float32)
    # dstates[c]: gradient of chunk c's own state; states[c]: the state entering chunk c, now in x's dtype
    dstates, ddA_chunk_cumsum, _, states = ssd._state_passing_bwd(
        rearrange(states, "... p n -> ... (p n)"), dA_cumsum[:, :, :, -1],
        rearrange(dstates, "... p n -> ... (p n)"), has_initial_states=False,
        dstates_dtype=x.dtype, states_dtype=x.dtype, chunk_size=chunk_size)
    states = rearrange(states, "... (p n) -> ... p n", n=dstate)
    dstates = rearrange(dstates, "... (p n) -> ... p n", n=dstate)
    _, ddt, dD = ssd._chunk_scan_chunk_state_bwd_dx(x, dt, dA_cumsum, B, CB, dout, dstates, D=D, dx=dx)
    dB_states, ddA_next = ssd._chunk_state_bwd_db(x, dt, dA_cumsum, dstates, B=B, ngroups=ngroups)
    dC_states, ddA_cumsum_prev = ssd._chunk_scan_bwd_dC(states.to(x.dtype), dA_cumsum, dout, C=C, ngroups=ngroups)
    dCB = ssd._chunk_scan_bwd_dcb(x, dt, dA_cumsum, dout, ngroups=ngroups).to(CB.dtype)
    ssd._bmm_chunk_bwd(C, dCB, residual=dB_states, out=dB)
    ssd._bmm_chunk_bwd(B, rearrange(dCB, "... l s -> ... s l"), residual=dC_states, out=dC)
    # gradient w.r.t. each step's dA = A * dt: the earlier-states part comes as a gradient of the cumsum
    ddA_cumsum_prev[..., -1] += ddA_chunk_cumsum
    ddA = ssd._chunk_scan_bwd_ddAcs_stable(x, dt, dA_cumsum, dout, CB)
    ddA += ddA_next + ddA_cumsum_prev.flip([-1]).cumsum(dim=-1).flip([-1])
    _, dA, ddt_bias = ssd._chunk_cumsum_bwd(ddA, ddt, dt_raw, A, dt_bias=dt_bias, dt_softplus=True,
                                            dt_limit=NO_DT_LIMIT, ddt=ddt_raw)
    return dA, dD, ddt_bias


class MixerFunction(torch.autograd.Function):
    """out_proj(RMSNorm(SSD(silu(conv(xBC))) * silu(z))) from zxbcdt = [z, xBC, dt], as
    mamba_split_conv1d_scan_combined computes it for Mamba2Mixer (norm_before_gate=False)."""

    @staticmethod
    def forward(ctx, ssd, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, norm_weight, norm_eps,
                out_weight, headdim, ngroups):
        sizes, z, _, dt_raw, (x, B, C) = split_inputs(ssd, zxbcdt, conv_weight, conv_bias, D.shape[0], headdim,
                                                      ngroups)
        d_inner = sizes[0]
        y, states = scan_forward(ssd, x, dt_raw, A, B, C, D, dt_bias, chunk_size)
        normed, _, rstd = ssd._layer_norm_fwd(
            rearrange(y, "b s h p -> (b s) (h p)"), norm_weight.contiguous(), None, norm_eps,
            rearrange(z, "b s d -> (b s) d"), group_size=d_inner // ngroups, norm_before_gate=False,
            is_rms_norm=True)
        normed = rearrange(normed, "(b s) d -> b s d", b=zxbcdt.shape[0])
        if torch.is_autocast_enabled():     # as mamba_ssm: out_proj in the autocast dtype, weight cast once
            dtype = torch.get_autocast_dtype(zxbcdt.device.type)
            normed, out_weight = normed.to(dtype), out_weight.to(dtype)
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, y, A, D, dt_bias, norm_weight.contiguous(), rstd,
                              out_weight, states)
        ctx.ssd, ctx.chunk_size, ctx.norm_eps, ctx.headdim, ctx.ngroups = ssd, chunk_size, norm_eps, headdim, ngroups
        return F.linear(normed, out_weight)

    @staticmethod
    def backward(ctx, dout):
        (zxbcdt, conv_weight, conv_bias, y, A, D, dt_bias, norm_weight, rstd, out_weight,
         states) = ctx.saved_tensors
        ssd, ngroups = ctx.ssd, ctx.ngroups
        sizes, z, xBC, dt_raw, (x, B, C) = split_inputs(ssd, zxbcdt, conv_weight, conv_bias, D.shape[0],
                                                        ctx.headdim, ngroups)
        d_inner = sizes[0]
        # the gradients of z, xBC and dt land in one buffer shaped like zxbcdt
        dzxbcdt = torch.empty_like(zxbcdt)
        dz, dxBC_given, ddt_raw = torch.split(dzxbcdt, sizes, dim=-1)
        dxBC = torch.empty_like(xBC)
        dx, dB, dC = split_xBC(dxBC, D.shape[0], ngroups, B.shape[-1])

        batch = dout.shape[0]
        normed = torch.empty(*y.shape[:2], d_inner, device=y.device, dtype=y.dtype)   # recomputed for out_proj
        dnormed = F.linear(dout, out_weight.t())
        dy, dnorm_weight, _, dz, _ = ssd._layer_norm_bwd(
            rearrange(dnormed, "b s d -> (b s) d"), rearrange(y, "b s h p -> (b s) (h p)"), norm_weight, None,
            ctx.norm_eps, None, rstd, rearrange(z, "b s d -> (b s) d"), group_size=d_inner // ngroups,
            norm_before_gate=False, is_rms_norm=True, recompute_output=True,
            dz=rearrange(dz, "b l d -> (b l) d"), out=rearrange(normed, "b s d -> (b s) d"))
        dy = rearrange(dy, "(b s) (h p) -> b s h p", b=batch, p=ctx.headdim)
        dA, dD, ddt_bias = scan_backward(ssd, dy, x, dt_raw, A, B, C, D, dt_bias, ctx.chunk_size, states,
                                         dx, ddt_raw, dB, dC)
        dout_weight = torch.einsum("bso,bsd->od", dout, normed)
        dxBC_update, dconv_weight, dconv_bias, *_ = ssd.causal_conv1d_bwd_function(
            rearrange(ssd.ensure_stride(xBC), "b s d -> b d s"), conv_weight, conv_bias,
            rearrange(ssd.ensure_stride(dxBC), "b s d -> b d s"), None, None, None,
            rearrange(ssd.ensure_stride(dxBC_given), "b s d -> b d s"), False, True)
        dxBC_update = rearrange(dxBC_update, "b d s -> b s d")
        if dxBC_given.stride() != dxBC_update.stride():
            dxBC_given.copy_(dxBC_update)
        return (None, dzxbcdt, dconv_weight, dconv_bias, ddt_bias, dA, dD, None, dnorm_weight, None, dout_weight,
                None, None)

    @staticmethod
    def build(ssd):
        """fused_mixer(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, norm_weight, norm_eps,
        out_weight, headdim, ngroups) on `ssd`'s launchers. RuntimeError, naming the first difference,
        when `ssd` is not the mamba_ssm this was written against."""
        combined_bwd = getattr(ssd, "_mamba_chunk_scan_combined_bwd", None)
        if combined_bwd is None or launcher_parameters(combined_bwd) != COMBINED_BWD_PARAMS:
            raise RuntimeError(f"{getattr(ssd, '__name__', ssd)}: _mamba_chunk_scan_combined_bwd is not the one "
                               "model/mixer_function.py follows")
        for name, expected in LAUNCHERS.items():
            fn = getattr(ssd, name, None)   # _layer_norm_bwd: model/norm_backward's launcher wraps mamba_ssm's
            if fn is None or launcher_parameters(fn) != expected:
                raise RuntimeError(f"{getattr(ssd, '__name__', ssd)}.{name} is not the launcher "
                                   "model/mixer_function.py was written for")
        for name in ("causal_conv1d_fwd_function", "causal_conv1d_bwd_function", "ensure_stride"):
            if getattr(ssd, name, None) is None:
                raise RuntimeError(f"{getattr(ssd, '__name__', ssd)} has no {name}")

        def fused_mixer(*args):
            return MixerFunction.apply(ssd, *args)
        return fused_mixer
