"""The bidirectional Mamba-2 mixer of DiffuMamba.

Mamba2Mixer is one direction, the "simple" Mamba-2 block of mamba_ssm's `Mamba2`:
    z, xBC, dt = in_proj(u)                              gate, SSM input + B + C, step sizes
    xBC        = silu(causal depthwise conv1d(xBC))
    x, B, C    = xBC
    y          = SSD(x, dt = softplus(dt + dt_bias), A = -exp(A_log), B, C) + D * x
    out        = out_proj(RMSNorm(y * silu(z)))         norm over groups of d_inner / ngroups
BiMamba2 runs one mixer over the sequence and one over the reversed sequence and sums them:
    out = fwd(x) + flip(bwd(flip(x)))
so every position sees the whole sequence, as a masked-diffusion denoiser needs.

On a GPU with mamba-ssm and causal-conv1d, a direction's conv, scan, gated norm and out_proj run as one
fused autograd function (kernels.fused_mixer, the same function; its backward recomputes the conv and
the norm instead of storing them, -23% training memory at 1.3B, and by default keeps the scan's chunk
states, model/mixer_function.py); elsewhere, and when the directions are fused, the pieces run. In a
forward without autograd the scan's output kernel also gates, and the norm's scale per row is applied
where the two directions are summed, after out_proj (a row scale commutes with it); in a Block that sum
also takes the residual add and the next norm (forward_add_norm).

A_log, D and dt_bias stay fp32 when the module is cast to bf16 (exp(A_log) and softplus(dt) lose too
much in bf16); the scan itself runs in fp32 in the reference and inside the Triton kernel.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from model import kernels
from model.config import ModelConfig

FP32_PARAMETERS = ("A_log", "D", "dt_bias")
# mamba_ssm's Triton kernels and causal-conv1d compute offsets in 32 bits: a (batch, L, channels) input of
# 2^31 elements or more makes them read out of bounds (an illegal memory access at batch 8 x 32K tokens,
# d_model 2048). BiMamba2 splits such a batch into pieces below the limit; sequences are independent.
KERNEL_MAX_ELEMENTS = 2 ** 31 - 1


class GatedRMSNorm(nn.Module):
    """RMSNorm(x * silu(z)) * weight, normalised over groups of `group_size` channels (mamba_ssm's
    RMSNormGated with norm_before_gate=False)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.group_size = eps, group_size or dim

    def forward(self, x, z):
        return kernels.rmsnorm_gated(x, z, self.weight, self.eps, self.group_size, norm_before_gate=False)


class Mamba2Mixer(nn.Module):
    """One direction of the Mamba-2 mixer. `projections=False` leaves out in_proj / out_proj, for
    directions that share them (BiMamba2 with tied projections); use `mix` then."""

    def __init__(self, cfg: ModelConfig, projections: bool = True):
        super().__init__()
        m = cfg.mamba
        self.d_model, self.d_inner = cfg.d_model, cfg.d_inner
        self.nheads, self.headdim = cfg.mamba_nheads, m.headdim
        self.ngroups, self.d_state, self.chunk_size = m.ngroups, m.d_state, m.chunk_size
        self.keep_scan_states = m.keep_scan_states
        self.dt_min, self.dt_max = m.dt_min, m.dt_max
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state          # channels of x, B, C
        self.d_in_proj = self.d_inner + self.conv_dim + self.nheads             # z, xBC, dt

        if projections:
            self.in_proj = nn.Linear(self.d_model, self.d_in_proj, bias=False)
            self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=m.d_conv, groups=self.conv_dim,
                                padding=m.d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, eps=cfg.norm_eps, group_size=self.d_inner // self.ngroups)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """mamba_ssm's initialisation of the SSM parameters (call again after a global weight init):
        dt log-uniform in [dt_min, dt_max] stored as softplus^-1(dt) in dt_bias, A uniform in [1, 16]
        stored as log, D = 1."""
        dt = torch.exp(torch.rand(self.nheads) * (math.log(self.dt_max) - math.log(self.dt_min))
                       + math.log(self.dt_min)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))       # inverse of softplus
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D.fill_(1.0)

    def _apply(self, fn, recurse=True):
        # .to(bf16) / .half() must not round A_log, D, dt_bias: put back the fp32 values after the cast.
        before = {name: getattr(self, name).detach() for name in FP32_PARAMETERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            p = getattr(self, name)
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float() if old.is_meta else old.to(device=p.device, dtype=torch.float32)
                if p.grad is not None:
                    p.grad = p.grad.float()
        return self

    # ---- pieces, shared with BiMamba2's fused path
    @property
    def A(self) -> torch.Tensor:
        """-exp(A_log) in fp32 (fp64 in a float64 model)."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    @property
    def conv_weight(self) -> torch.Tensor:
        return rearrange(self.conv1d.weight, "d 1 w -> d w")

    def split_projection(self, zxbcdt):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def conv(self, xBC):
        """(b, l, conv_dim) -> silu(causal depthwise conv), same shape."""
        out = kernels.causal_conv1d(xBC.transpose(1, 2), self.conv_weight, self.conv1d.bias, "silu")
        return out.transpose(1, 2)

    def mix(self, zxbcdt):
        """in_proj output (b, l, d_in_proj) -> normalised SSM output (b, l, d_inner), before out_proj."""
        z, xBC, dt = self.split_projection(zxbcdt)
        x, B, C = torch.split(self.conv(xBC), [self.d_inner, self.ngroups * self.d_state,
                                               self.ngroups * self.d_state], dim=-1)
        y = kernels.chunk_scan(
            rearrange(x, "b l (h p) -> b l h p", p=self.headdim), dt, self.A,
            rearrange(B, "b l (g n) -> b l g n", g=self.ngroups),
            rearrange(C, "b l (g n) -> b l g n", g=self.ngroups),
            self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        return self.norm(rearrange(y, "b l h p -> b l (h p)"), z)

    def forward(self, u):
        """u (b, l, d_model) -> (b, l, d_model); causal: position i sees positions <= i."""
        zxbcdt = self.in_proj(u)
        if kernels.fused_mixer_usable(zxbcdt, self.conv_dim, self.conv1d.kernel_size[0]):
            # the same function in one autograd node: less activation memory, fewer copies (kernels.py)
            return kernels.fused_mixer(zxbcdt, self.conv_weight, self.conv1d.bias, self.dt_bias, self.A, self.D,
                                       self.chunk_size, self.norm.weight, self.norm.eps, self.out_proj.weight,
                                       self.headdim, self.ngroups, self.keep_scan_states)
        return self.out_proj(self.mix(zxbcdt))

    def forward_unscaled(self, u, walk: bool | None = None):
        """Without autograd, where kernels.unscaled_mixer_usable: forward(u) before the gated norm's row
        scale, and the sums of squares that give it (kernels.fused_mixer_unscaled; walk: whether its scan
        runs as the walk, kernels.walk_usable's answer when the caller has it)."""
        return kernels.fused_mixer_unscaled(self.in_proj(u), self.conv_weight, self.conv1d.bias, self.dt_bias,
                                            self.A, self.D, self.chunk_size, self.norm.weight, self.out_proj.weight,
                                            self.headdim, self.ngroups, walk=walk)


def _reversed(x):
    """x (b, l, ...) with the sequence reversed."""
    return x.flip(1)


def _plus_reversed(forward_out, backward_out):
    """forward_out + backward_out with its sequence reversed back."""
    return forward_out + backward_out.flip(1)


def _plus_reversed_row_scaled(forward_out, forward_sumsq, backward_out, backward_sumsq, d_inner: int, eps: float):
    """_plus_reversed of two unscaled mixer outputs, each first times its gated norm's row scale
    rsqrt(mean of g^2 over d_inner + eps), from the sums of squares per head, or per block of a head's
    channels (b, l, heads or more columns)."""
    def scaled(out, sumsq):   # in fp32 (fp64 for a float64 model)
        return out.to(sumsq.dtype) * torch.rsqrt(sumsq.sum(dim=-1, keepdim=True) / d_inner + eps)
    return (scaled(forward_out, forward_sumsq) + scaled(backward_out, backward_sumsq).flip(1)).to(forward_out.dtype)


def _plus_reversed_row_scaled_add_norm(forward_out, forward_sumsq, backward_out, backward_sumsq, residual,
                                       norm_weight, d_inner: int, mixer_eps: float, eps: float):
    """The block's next add + RMSNorm (kernels.add_norm_reference) of _plus_reversed_row_scaled's sum:
    (RMSNorm(residual + sum) * norm_weight in the outputs' dtype, residual + sum in fp32)."""
    hidden = _plus_reversed_row_scaled(forward_out, forward_sumsq, backward_out, backward_sumsq, d_inner, mixer_eps)
    return kernels.add_norm_reference(hidden, residual, norm_weight, None, eps, True)


# On a GPU each is one compiled kernel (and its backward one more): torch's flip kernel does not vectorise
# (12 ms a step at 1.3B, L = 2048, micro-batch 16, for half the bytes of a copy), and the sum is fused in.
reverse_time = kernels.CompiledOnGPU("flip", _reversed)
add_time_reversed = kernels.CompiledOnGPU("flip", _plus_reversed)
add_time_reversed_row_scaled = kernels.CompiledOnGPU("scan_gate", _plus_reversed_row_scaled)
add_time_reversed_row_scaled_add_norm = kernels.CompiledOnGPU("sum_norm", _plus_reversed_row_scaled_add_norm)


def _pair_up(first, second, sizes, dim):
    """Split both tensors into `sizes` along `dim` and concatenate the pieces pairwise:
    [a1, b1, a2, b2, ...]. Lays two directions' channels out so that x, B, C of both stay contiguous."""
    pieces = zip(torch.split(first, sizes, dim=dim), torch.split(second, sizes, dim=dim))
    return torch.cat([t for pair in pieces for t in pair], dim=dim)


class BiMamba2(nn.Module):
    """fwd(x) + flip(bwd(flip(x))). cfg.mamba.directions: "independent" (two full Mamba-2 layers) or
    "tied_projections" (shared in_proj / out_proj, own conv, dt, A, D and norm, as in Caduceus).

    fuse_directions=True runs the two directions as one: their conv channels, scan heads and norm
    groups are concatenated (the backward half on the time-reversed sequence), so each kernel is
    launched once for both. It computes exactly the same function as fuse_directions=False. It pays
    only where launches are the limit: under CUDA graphs the concatenations cost more than they save
    (240M trains 15-19% faster with the directions separate). None (the argument) takes cfg.mamba.fuse_directions.
    """

    def __init__(self, cfg: ModelConfig, fuse_directions: bool | None = None):
        super().__init__()
        self.tied = cfg.mamba.directions == "tied_projections"
        if fuse_directions is None:
            fuse_directions = cfg.mamba.fuse_directions
        self.fuse_directions = bool(fuse_directions)
        self.fwd = Mamba2Mixer(cfg, projections=not self.tied)
        self.bwd = Mamba2Mixer(cfg, projections=not self.tied)
        if self.tied:
            self.in_proj = nn.Linear(cfg.d_model, self.fwd.d_in_proj, bias=False)
            self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)

    def forward(self, x):
        """x (b, l, d_model) -> (b, l, d_model)."""
        rows = self._rows_per_piece(x)
        if x.shape[0] > rows:
            return torch.cat([self._forward(part) for part in x.split(rows)], dim=0)
        return self._forward(x)

    def forward_add_norm(self, x, residual, norm):
        """norm(self(x), residual): the mixer and the block's AddNorm after it (model/blocks.py). Where the
        directions come unscaled (below) and the norm is an RMSNorm, their sum, the residual add and the norm
        run as one compiled pass (kernel "sum_norm"): one pass less over the block's output."""
        f = self.fwd
        if (norm.is_rms_norm and x.shape[0] <= self._rows_per_piece(x) and self._directions_unscaled(x)
                and kernels.uses_kernel("sum_norm", x)):
            return add_time_reversed_row_scaled_add_norm(*self._unscaled_directions(x), residual, norm.weight,
                                                         f.d_inner, f.norm.eps, norm.eps)
        return norm(self(x), residual)

    def _rows_per_piece(self, x):
        channels = self.fwd.d_in_proj * (2 if self.fuse_directions else 1)   # widest tensor per token
        return max(1, KERNEL_MAX_ELEMENTS // (x.shape[1] * channels))

    def _directions_unscaled(self, x):
        """Whether both directions run as fused_mixer_unscaled: inference, independent directions."""
        f = self.fwd
        return (not self.fuse_directions and not self.tied
                and kernels.unscaled_mixer_usable(x, f.conv_dim, f.conv1d.kernel_size[0], f.ngroups))

    def _unscaled_directions(self, x):
        """(forward out, its sums of squares, backward out, its sums): each direction before its norm's row
        scale, the backward one on the reversed sequence and not yet reversed back."""
        if not kernels.walk_usable(x, self.fwd.nheads):   # on a GPU, without autograd, where it pays
            return (*self.fwd.forward_unscaled(x, walk=False), *self.bwd.forward_unscaled(reverse_time(x), walk=False))
        # the walk's programs each run their chunks one after another: the directions side by side, on two
        # streams, give the card twice the programs (model/chunk_walk_kernel.py). No record_stream: x outlives
        # the join below, and the backward results, read on the main stream after it, go back to the side
        # stream's pool, whose next fork comes after their readers. Inside a CUDA-graph capture record_stream
        # keeps every such block from reuse until the capture ends (4 GiB a layer at batch 8 x 64K: out of memory).
        main, side = torch.cuda.current_stream(x.device), kernels.side_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            backward = self.bwd.forward_unscaled(reverse_time(x), walk=True)
        forward = self.fwd.forward_unscaled(x, walk=True)
        main.wait_stream(side)
        return (*forward, *backward)

    def _forward(self, x):
        if self.fuse_directions:
            return self._forward_fused(x)
        if self.tied:
            zxbcdt = self.in_proj(x)
            y = add_time_reversed(self.fwd.mix(zxbcdt), self.bwd.mix(reverse_time(zxbcdt)))
            return self.out_proj(y)            # out_proj is linear: one matmul for both directions
        f = self.fwd
        if self._directions_unscaled(x):
            # inference: the norms' row scales applied in the sum of the directions (mixer_function.py)
            return add_time_reversed_row_scaled(*self._unscaled_directions(x), f.d_inner, f.norm.eps)
        return add_time_reversed(self.fwd(x), self.bwd(reverse_time(x)))

    def _forward_fused(self, x):
        f, b = self.fwd, self.bwd
        di, gn, P = f.d_inner, f.ngroups * f.d_state, f.headdim
        if self.tied:
            zxbcdt_f = self.in_proj(x)
            zxbcdt_b = reverse_time(zxbcdt_f)
        else:
            zxbcdt_f, zxbcdt_b = f.in_proj(x), b.in_proj(reverse_time(x))
        z_f, xBC_f, dt_f = f.split_projection(zxbcdt_f)
        z_b, xBC_b, dt_b = b.split_projection(zxbcdt_b)

        # Conv is depthwise, so both directions' channels go through one conv, laid out
        # [x_f, x_b, B_f, B_b, C_f, C_b] so that the scan inputs below are views.
        xBC = _pair_up(xBC_f, xBC_b, [di, gn, gn], dim=-1)
        weight = _pair_up(f.conv_weight, b.conv_weight, [di, gn, gn], dim=0)
        bias = _pair_up(f.conv1d.bias, b.conv1d.bias, [di, gn, gn], dim=0)
        xBC = kernels.causal_conv1d(xBC.transpose(1, 2), weight, bias, "silu").transpose(1, 2)
        xs, Bs, Cs = torch.split(xBC, [2 * di, 2 * gn, 2 * gn], dim=-1)

        # The backward direction as H extra heads with their own groups: head j reads group
        # j // (H / G), so heads H.. read groups G.. , the backward B and C.
        y = kernels.chunk_scan(
            rearrange(xs, "b l (h p) -> b l h p", p=P),
            torch.cat([dt_f, dt_b], dim=-1),
            torch.cat([f.A, b.A]),
            rearrange(Bs, "b l (g n) -> b l g n", n=f.d_state),
            rearrange(Cs, "b l (g n) -> b l g n", n=f.d_state),
            f.chunk_size, D=torch.cat([f.D, b.D]), dt_bias=torch.cat([f.dt_bias, b.dt_bias]),
            dt_softplus=True)
        y = kernels.rmsnorm_gated(rearrange(y, "b l h p -> b l (h p)"), torch.cat([z_f, z_b], dim=-1),
                                  torch.cat([f.norm.weight, b.norm.weight]), f.norm.eps,
                                  f.norm.group_size, norm_before_gate=False)
        y_f, y_b = y.split(di, dim=-1)
        if self.tied:
            return self.out_proj(add_time_reversed(y_f, y_b))
        return add_time_reversed(f.out_proj(y_f), b.out_proj(y_b))
