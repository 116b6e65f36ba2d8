"""The whole SSD scan of one Mamba-2 direction in one kernel, without autograd: each program walks its head's
chunks in order and carries the state on chip.

A forward without autograd otherwise runs the scan as three launches (mamba_ssm's cumulative decay and C B^T,
model/state_pass_kernel.py's states entering each chunk, model/chunk_scan_kernel.py's gated output), with the
states going through memory between the last two. Here one program owns a block of BLOCK_P channels of one
head and runs, for each chunk of CHUNK steps (the kernel's own chunk, a quarter of the model's: the pairs of
a chunk cost CHUNK^2 / 2):

    a     = log2(e) * cumsum(dt * A) within the chunk          (non-increasing: A < 0, dt >= 0)
    y[m]  = exp2(a[m]) * C[m] . state                                           the state entering the chunk
          + sum_{k <= m} (C[m] . B[k]) exp2(a[m] - a[k]) dt[k] x[k]             the chunk's own steps
          + D x[m]
    state = exp2(a[end]) * state + sum_k exp2(a[end] - a[k]) dt[k] x[k] B[k]^T   for the next chunk

then gates and weights y as chunk_scan_gated_out does: g = y * silu(z), the sum of g^2 over the program's
channels, g * norm_weight. Only the inputs, the output and the sums touch memory. dt and a come from
mamba_ssm's `_chunk_cumsum_fwd` at the kernel's chunk, with each key's part of the exponent folded into one
number as chunk_scan_kernel.py does: exp2(a[m] - key[k]) = exp(dA[m] - dA[k]) dt[k], key = a - log2(dt).

A program's chunks run one after another, so its speed is its latency per chunk: about 2 us on an H200, and
200-255 registers a thread and 88-112 KB of shared memory leave room for two programs an SM
(bench.kernel_resources; docs/benchmarks.md, twenty-seventh and twenty-ninth runs). The parallelism is
batch x heads x (P / BLOCK_P) programs, and BiMamba2 runs its two directions' kernels side by side on two
streams (model/mamba2.py) to double it. Splitting a head's channels (BLOCK_P < P) makes more programs, but each
split computes the chunk's C B^T and pair weights again. The walk is used where batch x heads x 2 directions
reaches 128 (`pays`; at 1.3B and batch 1 each head is then split in two); below, each head would be split in
four, and the three launches are faster.

The state is rounded to the inputs' dtype for its product with C, and each weight for its product with x,
as mamba_ssm's kernels round the states and the weights; both accumulate in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from model import chunk_walk_async
from model.chunk_scan_kernel import (
    FP_FUSION,
    LOG2E,
    _divide,
    config_from_env,
    dot_block,
    interpreted,
    key_offsets,
)
from model.mixer_function import NO_DT_LIMIT

CONFIG_ENV = "DIFFUMAMBA_SCAN_WALK_CONFIG"   # one launch config for every call: CHUNK:BLOCK_P:warps:stages
MIN_PROGRAMS = 128      # batch x heads x directions at which the walk pays (bench.inference, twenty-seventh run)


def pays(batch: int, nheads: int, directions: int = 2) -> bool:
    """Whether the walk beats the three launches for `directions` scans of batch x nheads heads run at once:
    with fewer programs each head's channels are split in four, and the splits' repeated work costs more than
    the launches save (240M and 0.5B at batch 1: 2% slower at 32K)."""
    return batch * nheads * directions >= MIN_PROGRAMS


def default_config(batch: int, nheads: int, hdim: int, directions: int = 2) -> dict:
    """The launch config for a shape: a head's channels in one block where the programs of the directions
    that run at once fill the card's program slots (two an SM) twice, else split in two or four (bench.scan_walk,
    H200: 4 warps; 3 stages where the block is split, 2 where it is whole)."""
    programs = batch * nheads * directions
    block_p = max(16, min(64 if programs >= 256 else 32 if programs >= 128 else 16, dot_block(hdim)))
    return {"CHUNK": 64, "BLOCK_P": block_p, "num_warps": 4, "num_stages": 2 if block_p >= 64 else 3}


@triton.jit
def _walk_kernel(
    x_ptr, key_ptr, dA_ptr, B_ptr, C_ptr, D_ptr, z_ptr, weight_ptr, out_ptr, sumsq_ptr,
    seqlen, hdim, dstate, heads_per_group,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_a_b, s_a_h,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_o_b, s_o_l, s_o_h, s_o_p,
    s_ss_b, s_ss_l, s_ss_h,
    HAS_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    WHOLE: tl.constexpr, APPROX_DIVISION: tl.constexpr,
):
    pid_p = tl.program_id(0)
    head = tl.program_id(1)
    pid_b = tl.program_id(2)
    group = head // heads_per_group
    x_ptr += pid_b * s_x_b + head * s_x_h
    key_ptr += pid_b * s_a_b + head * s_a_h     # key and dA: (b, h, chunks x CHUNK), zero steps past the end
    dA_ptr += pid_b * s_a_b + head * s_a_h
    B_ptr += pid_b * s_B_b + group * s_B_g
    C_ptr += pid_b * s_C_b + group * s_C_g
    z_ptr += pid_b * s_z_b + head * s_z_h
    out_ptr += pid_b * s_o_b + head * s_o_h
    sumsq_ptr += pid_b * s_ss_b + (head * tl.num_programs(0) + pid_p) * s_ss_h

    offs_q = tl.arange(0, CHUNK)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_ok = offs_p < hdim
    D = 0.0
    if HAS_D:
        D = tl.load(D_ptr + head).to(tl.float32)
    weight = tl.load(weight_ptr + head * hdim + offs_p, mask=p_ok, other=0.0).to(tl.float32)

    # what only the decays and the finish read is loaded a chunk ahead, by hand: the loop's pipeline prefetches
    # only what feeds its products, and the program waited on these loads every chunk (docs/benchmarks.md)
    last_start = (seqlen - 1) // CHUNK * CHUNK
    ahead = _ahead(key_ptr, dA_ptr, z_ptr, 0, last_start, offs_q, offs_p, seqlen, hdim, s_z_l, s_z_p, CHUNK, WHOLE)
    # the state as (state, channels): its update trans(B) @ carried and its product C @ state are then both
    # warpgroup MMAs; as (channels, state) the update ran as synchronous MMAs (2.5% slower, docs/benchmarks.md)
    state = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
    for start in range(0, seqlen, CHUNK):
        a, a_end, key, z = ahead
        ahead = _ahead(key_ptr, dA_ptr, z_ptr, start + CHUNK, last_start, offs_q, offs_p, seqlen, hdim, s_z_l,
                       s_z_p, CHUNK, WHOLE)
        rows = start + offs_q
        row_ok = rows < seqlen
        C = _tile(C_ptr, rows, offs_n, s_C_l, s_C_n, row_ok, dstate, WHOLE)

        # the state entering the chunk, then the chunk's own steps: the weight of key k in row m is
        # exp2(a[m] - key[k]) = exp(dA[m] - dA[k]) dt[k], for k <= m (selected before the exponential, whose
        # argument is positive above the diagonal; dt = 0 gives key = +inf, a weight of 0)
        y = tl.dot(C, state.to(C.dtype)) * tl.exp2(a)[:, None]
        state = state * tl.exp2(a_end)
        B = _tile(B_ptr, rows, offs_n, s_B_l, s_B_n, row_ok, dstate, WHOLE)
        x = _tile(x_ptr, rows, offs_p, s_x_l, s_x_p, row_ok, hdim, WHOLE)
        pair = tl.dot(C, tl.trans(B))
        pair *= tl.exp2(tl.where(offs_q[:, None] >= offs_q[None, :], a[:, None] - key[None, :], -float("inf")))
        y = tl.dot(pair.to(x.dtype), x, y)
        # the state leaving the chunk: exp2(a_end - key[k]) = exp(dA[end] - dA[k]) dt[k]
        carried = (x * tl.exp2(a_end - key)[:, None]).to(x.dtype)
        state = tl.dot(tl.trans(B), carried, state)
        if HAS_D:
            y += x.to(tl.float32) * D
        # the gate, the norm's sum of squares over the block's channels, its weight
        z = z.to(tl.float32)
        y = _divide(y * z, 1.0 + tl.exp2(-(z * LOG2E)), APPROX_DIVISION)
        tl.store(sumsq_ptr + rows * s_ss_l, tl.sum(y * y, axis=1), mask=row_ok)
        y = y * weight[None, :]
        tl.store(out_ptr + rows[:, None] * s_o_l + offs_p[None, :] * s_o_p, y.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & p_ok[None, :])


@triton.jit
def _tile(ptr, rows, cols, s_row, s_col, row_ok, ncols, WHOLE: tl.constexpr):
    """The rows x cols tile (masked unless WHOLE: whole chunks and power-of-two widths)."""
    ptrs = ptr + rows[:, None] * s_row + cols[None, :] * s_col
    if WHOLE:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < ncols), other=0.0)


@triton.jit
def _ahead(key_ptr, dA_ptr, z_ptr, start, last_start, offs_q, offs_p, seqlen, hdim, s_z_l, s_z_p,
           CHUNK: tl.constexpr, WHOLE: tl.constexpr):
    """(a, a at the chunk's end, key, z) of the chunk at `start`, a = log2(e) dA; past the last chunk, the last
    chunk's again (never used). key and dA fill whole chunks (zero steps past the end): no masks."""
    start = min(start, last_start)
    rows = start + offs_q
    a = tl.load(dA_ptr + rows) * LOG2E
    a_end = tl.load(dA_ptr + start + CHUNK - 1) * LOG2E
    key = tl.load(key_ptr + rows)
    z = _tile(z_ptr, rows, offs_p, s_z_l, s_z_p, rows < seqlen, hdim, WHOLE)
    return a, a_end, key, z


def parse_config(text: str) -> dict:
    """"CHUNK:BLOCK_P:warps:stages" (e.g. "64:32:4:3") -> a launch config; ValueError naming what is wrong."""
    try:
        chunk, block_p, warps, stages = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"{text!r} is not CHUNK:BLOCK_P:warps:stages, e.g. 64:32:4:3") from None
    for name, value in (("CHUNK", chunk), ("BLOCK_P", block_p)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{text!r}: {name} must be a power of two, at least 16")
    return {"CHUNK": chunk, "BLOCK_P": block_p, "num_warps": warps, "num_stages": stages}


def chosen_config(config: dict | None, batch: int, nheads: int, hdim: int) -> dict:
    """The config given, else $DIFFUMAMBA_SCAN_WALK_CONFIG's, else default_config's for the shape."""
    return config_from_env(config, CONFIG_ENV, parse_config) or default_config(batch, nheads, hdim)


def whole_tiles(seqlen: int, hdim: int, dstate: int, config: dict) -> bool:
    """Whether every tile lies wholly inside the tensors, so the loop runs without masks: whole chunks and a
    head and state that fill their blocks."""
    return seqlen % config["CHUNK"] == 0 and hdim % config["BLOCK_P"] == 0 and dstate == dot_block(dstate)


def chunk_walk_gated(ssd, x, dt_raw, dt_bias, A, B, C, D, z, norm_weight, config: dict | None = None,
                     asynchronous: bool = False):
    """The scan of one Mamba-2 direction, gated and weighted as model/chunk_scan_kernel.py's
    chunk_scan_gated_out returns it, from the scan's raw inputs:
    x (b, l, h, p), dt_raw (b, l, h) before dt_bias and softplus, dt_bias and A (h,) with A < 0,
    B and C (b, l, g, n), D (h,) or None, z (b, l, h, p), norm_weight (h * p,).
    Returns (g * norm_weight (b, l, h, p) in x's dtype, sums of g^2 (b, l, h * blocks) fp32), g = y * silu(z):
    the sums are per block of a head's channels (`blocks` of them), and a head's or a row's sum is theirs.
    `ssd`: mamba_ssm's launchers (or stand-ins), whose `_chunk_cumsum_fwd` gives dt and its cumulative decay
    at the kernel's chunk. config: a launch config, e.g. {"CHUNK": 64, "BLOCK_P": 32, "num_warps": 4,
    "num_stages": 3}; without one, $DIFFUMAMBA_SCAN_WALK_CONFIG (parse_config's form) or default_config.
    asynchronous: run model/chunk_walk_async.py's kernel (the same walk, its products issued asynchronously)
    where it takes the inputs and config (chunk_walk_async.usable)."""
    batch, seqlen, nheads, hdim = x.shape
    ngroups, dstate = C.shape[2], C.shape[3]
    assert dt_raw.shape == (batch, seqlen, nheads) and A.shape == dt_bias.shape == (nheads,)
    assert B.shape == C.shape == (batch, seqlen, ngroups, dstate) and nheads % ngroups == 0
    assert z.shape == x.shape and norm_weight.shape == (nheads * hdim,) and norm_weight.is_contiguous()
    assert D is None or D.shape == (nheads,), "D per head (h,)"
    config = chosen_config(config, batch, nheads, hdim)
    dA_cumsum, dt = ssd._chunk_cumsum_fwd(dt_raw, A, config["CHUNK"], dt_bias=dt_bias, dt_softplus=True,
                                          dt_limit=NO_DT_LIMIT)
    assert dA_cumsum.is_contiguous(), "dA_cumsum (b, h, chunks, CHUNK)"
    key = key_offsets(dA_cumsum, dt)
    blocks = triton.cdiv(hdim, config["BLOCK_P"])
    out = torch.empty_like(x)
    sumsq = torch.empty(batch, seqlen, nheads * blocks, device=x.device, dtype=torch.float32)
    if (asynchronous and chunk_walk_async.usable(x, B, C, z, config)
            and chunk_walk_async.launch(x, key, dA_cumsum, B, C, D, z, norm_weight, out, sumsq, config)):
        return out, sumsq
    _walk_kernel[(blocks, nheads, batch)](
        x, key, dA_cumsum, B, C, D, z, norm_weight, out, sumsq,
        seqlen, hdim, dstate, nheads // ngroups,
        *x.stride(), dA_cumsum.stride(0), dA_cumsum.stride(1), *B.stride(), *C.stride(), *z.stride(),
        *out.stride(), *sumsq.stride(),
        HAS_D=D is not None, BLOCK_N=dot_block(dstate),
        WHOLE=whole_tiles(seqlen, hdim, dstate, config), APPROX_DIVISION=not interpreted(),
        enable_fp_fusion=FP_FUSION, **config,
    )
    return out, sumsq
