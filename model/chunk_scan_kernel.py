"""The SSD scan's output kernel: a drop-in for mamba_ssm's `_chunk_scan_fwd` (no z, no seq_idx).

For chunk c, head h, row m of the chunk (positions k of the same chunk, k <= m):

    y[m] = exp(dA[m]) * (C[m] . state_c)                       the state entering the chunk
         + sum_k CB[m, k] * exp(dA[m] - dA[k]) * dt[k] * x[k]   the chunk itself (causal)
         + D * x[m]

dA is the within-chunk cumulative sum of dt * A (fp32, non-increasing: A < 0, dt >= 0), CB = C B^T.
mamba_ssm's kernel computes the weight of every (m, k) pair with eight vector operations (a subtraction,
a clamp, a scale to base 2, the exponential, two products, the causal select and the cast). Here the
per-position parts are folded into two vectors first, in base 2:

    a[m] = log2(e) * dA[m]        b[k] = log2(e) * dA[k] - log2(dt[k])
    weight[m, k] = CB[m, k] * exp2(a[m] - b[k])

so a pair costs a subtraction, the exponential, a product and the cast, and the causal select. dt[k] = 0
gives b[k] = +inf and a weight of exactly 0, as the product does. b is computed once per key before the
launch: the kernel is bound by the instructions it issues, and a logarithm in fp32 is some 25 of them, which
each row block's threads would take again for every key (docs/benchmarks.md, twenty-first run).

One loop runs over every key block up to the diagonal, the causal select on each (it keeps every weight of a
block left of the diagonal). A loop over the past blocks without the select and a second over the diagonal
ones issued fewer instructions, but each loop filled its own pipeline of copies over one to six blocks; in
one pipeline the gated kernel is 2-4% faster on an H200 (docs/benchmarks.md, twenty-fifth run).

The launch order is what makes it faster (docs/benchmarks.md, sixteenth run): the heads of one chunk are
neighbours in the grid, so CB and C, which all heads of a group share, are read from memory once and then
from L2. mamba_ssm's grid runs every chunk of one head before the next head; at 32K tokens CB alone (32 MB
per sequence in fp32) has then left L2 before the next head reads it. In that order this kernel is no
faster than mamba_ssm's.

A launch config may give each program two neighbouring heads of a group (`HEADS: 2`): they share each
load of CB and C, the largest reads of a program. On an H100 that made 64 x 32 blocks 1-4% faster
(docs/benchmarks.md, eighteenth run). The autotuner keys on a size class (batch x chunks, to a power of
two up to 256) as well as the shapes: the best config differs by up to 12% between 4K and 32K tokens,
and a pick made on the first, short call was kept for every length.

`chunk_scan_gated_out` also does what the mixer's gated RMSNorm does before its row scale: y * silu(z) *
weight, and each head's sum of squares of y * silu(z). What that finish reads (z, the weight, and x[m] for
the D term) is loaded at the program's start: loaded at the end, the program waited on it, about a tenth of
ncu's stall samples (twenty-second run). The norm kernel, which would read y and z again
and write its output, is then not needed in a forward without autograd (model/mixer_function.py's
`unscaled_forward`).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

CONFIG_ENV = "DIFFUMAMBA_SCAN_OUT_CONFIG"   # one launch config for every call, e.g. 64x32:4:3 or 64x32:4:2:1:128

LOG2E = tl.constexpr(math.log2(math.e))   # a global a kernel may read; the launcher's key offsets use the same
# a product and a sum contracted into one fused multiply-add, as every measurement and GPU check of these
# kernels had it: Triton 3.9 warns that its default will change to no contraction in 3.10
FP_FUSION = True


def _configs():
    """The launch configs the autotuner tries: each the fastest, or within 2% of it, at one of 1 x 32K,
    2 x 32K and 8 x 2K tokens on an H100 (bench.scan_output, eighteenth run), and 64x32 with 2 stages: on an
    H200 the fastest without the gate at 1 x 32K and 8 x 2K, and, capped at 128 registers a thread, with the
    gate at 1 x 32K too (-9%; twentieth run). The cap lets four programs share an SM instead of three
    (bench.kernel_resources). ncu later found the kernel bound by the instructions it issued rather than by
    its loads' latency, and configs with still more programs an SM were slower (twenty-first run). Since the
    finish's inputs are loaded first, the gated kernel under the cap spilled 104 bytes a thread (80 with one
    loop), and was 7% faster than without the early loads and the spill (twenty-second run). With the key
    blocks in one loop, 64x32 with 3 stages and no cap is the fastest with the gate on an H200 (twenty-fifth
    run)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "HEADS": heads}, num_warps=w, num_stages=s, maxnreg=registers)
            for bm, bk, w, s, heads, registers in ((64, 32, 4, 3, 2, None), (64, 32, 4, 3, 1, None),
                                                   (128, 32, 4, 3, 1, None), (32, 32, 2, 4, 2, None),
                                                   (64, 32, 4, 2, 1, 128))]


def _configs_for_the_group(configs, named_args, **_):
    """Two heads per program only where a group's heads pair up."""
    return [c for c in configs if named_args["heads_per_group"] % c.kwargs["HEADS"] == 0]


def dot_block(n: int) -> int:
    """The block a dimension of n fills in a tl.dot: the next power of two, at least 16."""
    return max(triton.next_power_of_2(n), 16)


def size_class(batch: int, nchunks: int) -> int:
    """The autotuner's size key: batch x chunks as a power of two, at most 256 (8 x 32K tokens and up tune
    as one)."""
    return min(triton.next_power_of_2(batch * nchunks), 256)


@triton.jit(do_not_specialize=["tuning_size"])
def _chunk_scan_out_kernel(
    cb_ptr, x_ptr, out_ptr, b_ptr, dA_ptr, C_ptr, states_ptr, D_ptr, z_ptr, norm_weight_ptr, sumsq_ptr,
    chunk_size, hdim, dstate, batch, seqlen, heads_per_group, tuning_size,
    s_cb_b, s_cb_c, s_cb_g, s_cb_m, s_cb_k,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_o_b, s_o_l, s_o_h, s_o_p,
    s_b_b, s_b_c, s_b_h, s_b_q,
    s_dA_b, s_dA_c, s_dA_h, s_dA_q,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_D_h,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_ss_b, s_ss_l, s_ss_h,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    WHOLE: tl.constexpr, APPROX_DIVISION: tl.constexpr,
):
    # heads first: the heads of a chunk run together (module docstring); HEADS (1 or 2) neighbouring heads
    # of one group per program share each load of CB and C
    head = tl.program_id(0) * HEADS
    pid_m = tl.program_id(1)
    pid_bc = tl.program_id(2)
    pid_c = pid_bc // batch
    pid_b = pid_bc - pid_c * batch
    pid_g = head // heads_per_group
    chunk_len = min(chunk_size, seqlen - pid_c * chunk_size)
    m_start = pid_m * BLOCK_M

    cb_ptr += pid_b * s_cb_b + pid_c * s_cb_c + pid_g * s_cb_g
    x_ptr += pid_b * s_x_b + pid_c * chunk_size * s_x_l + head * s_x_h
    out_ptr += pid_b * s_o_b + pid_c * chunk_size * s_o_l + head * s_o_h
    b_ptr += pid_b * s_b_b + pid_c * s_b_c + head * s_b_h
    dA_ptr += pid_b * s_dA_b + pid_c * s_dA_c + head * s_dA_h
    C_ptr += pid_b * s_C_b + pid_c * chunk_size * s_C_l + pid_g * s_C_g
    states_ptr += pid_b * s_st_b + pid_c * s_st_c + head * s_st_h
    z_ptr += pid_b * s_z_b + pid_c * chunk_size * s_z_l + head * s_z_h
    sumsq_ptr += pid_b * s_ss_b + pid_c * chunk_size * s_ss_l + head * s_ss_h

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < chunk_len

    # the finish's reads first: issued at the end, the program waited for them (ncu; the loop hides them)
    fin0 = _finish_inputs(head, x_ptr, D_ptr, z_ptr, norm_weight_ptr, offs_m, offs_p, row_ok, hdim, s_x_l, s_x_p,
                          s_D_h, s_z_l, s_z_p, HAS_D, D_HAS_HDIM, HAS_Z)
    # the state entering the chunk: exp(dA[m]) * C[m] @ state^T
    C = tl.load(C_ptr + offs_m[:, None] * s_C_l + offs_n[None, :] * s_C_n,
                mask=row_ok[:, None] & (offs_n[None, :] < dstate), other=0.0)
    acc0, a0 = _state_part(C, states_ptr, dA_ptr, offs_m, offs_n, offs_p, row_ok, dstate, hdim,
                           s_st_p, s_st_n, s_dA_q)
    acc1, a1 = acc0, a0                 # one head: a stand-in the sums below leave alone
    if HEADS == 2:
        acc1, a1 = _state_part(C, states_ptr + s_st_h, dA_ptr + s_dA_h, offs_m, offs_n, offs_p, row_ok, dstate,
                               hdim, s_st_p, s_st_n, s_dA_q)

    # the chunk's own positions, up to the row block's last
    acc0, acc1 = _add_key_blocks(acc0, acc1, a0, a1, min(m_start + BLOCK_M, chunk_len), cb_ptr, x_ptr, b_ptr,
                                 offs_m, offs_p, chunk_len, hdim, s_cb_m, s_cb_k, s_x_l, s_x_h, s_x_p, s_b_h, s_b_q,
                                 HEADS, BLOCK_K, WHOLE)

    _finish(acc0, fin0, out_ptr, sumsq_ptr, offs_m, offs_p, row_ok, hdim, s_o_l, s_o_p, s_ss_l, HAS_D, HAS_Z,
            APPROX_DIVISION)
    if HEADS == 2:   # the second head's inputs at its finish: loaded first too, they would add to 232 registers
        fin1 = _finish_inputs(head + 1, x_ptr + s_x_h, D_ptr, z_ptr + s_z_h, norm_weight_ptr, offs_m, offs_p, row_ok,
                              hdim, s_x_l, s_x_p, s_D_h, s_z_l, s_z_p, HAS_D, D_HAS_HDIM, HAS_Z)
        _finish(acc1, fin1, out_ptr + s_o_h, sumsq_ptr + s_ss_h, offs_m, offs_p, row_ok, hdim, s_o_l, s_o_p, s_ss_l,
                HAS_D, HAS_Z, APPROX_DIVISION)


@triton.jit
def _state_part(C, states_ptr, dA_ptr, offs_m, offs_n, offs_p, row_ok, dstate, hdim, s_st_p, s_st_n, s_dA_q):
    """One head's exp(dA[m]) * C[m] @ state^T, and a[m] = log2(e) * dA[m]."""
    a_m = tl.load(dA_ptr + offs_m * s_dA_q, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
    state = tl.load(states_ptr + offs_n[:, None] * s_st_n + offs_p[None, :] * s_st_p,
                    mask=(offs_n[:, None] < dstate) & (offs_p[None, :] < hdim), other=0.0)
    return tl.dot(C, state.to(C.dtype)) * tl.exp2(a_m)[:, None], a_m


@triton.jit
def _add_key_blocks(acc0, acc1, a0, a1, k_stop, cb_ptr, x_ptr, b_ptr, offs_m, offs_p, chunk_len,
                    hdim, s_cb_m, s_cb_k, s_x_l, s_x_h, s_x_p, s_b_h, s_b_q,
                    HEADS: tl.constexpr, BLOCK_K: tl.constexpr, WHOLE: tl.constexpr):
    """Each of the program's heads' sums over the key blocks from the chunk's first to k_stop, each CB tile
    loaded once.
    WHOLE: every row and key of every block lies in the chunk: no masks."""
    for k0 in range(0, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        cb_ptrs = cb_ptr + offs_m[:, None] * s_cb_m + offs_k[None, :] * s_cb_k
        if WHOLE:
            cb = tl.load(cb_ptrs).to(tl.float32)
        else:
            cb = tl.load(cb_ptrs, mask=(offs_m[:, None] < chunk_len) & (offs_k[None, :] < chunk_len),
                         other=0.0).to(tl.float32)
        acc0 = _add_key_block(acc0, cb, x_ptr, b_ptr, offs_m, offs_k, offs_p, a0, chunk_len, hdim,
                              s_x_l, s_x_p, s_b_q, WHOLE)
        if HEADS == 2:
            acc1 = _add_key_block(acc1, cb, x_ptr + s_x_h, b_ptr + s_b_h, offs_m, offs_k, offs_p,
                                  a1, chunk_len, hdim, s_x_l, s_x_p, s_b_q, WHOLE)
    return acc0, acc1


@triton.jit
def _add_key_block(acc, cb, x_ptr, b_ptr, offs_m, offs_k, offs_p, a_m, chunk_len, hdim,
                   s_x_l, s_x_p, s_b_q, WHOLE: tl.constexpr):
    """One head's sum over one block of keys: acc += (CB * exp2(a[m] - b[k])) @ x[k], for k <= m."""
    x_ptrs = x_ptr + offs_k[:, None] * s_x_l + offs_p[None, :] * s_x_p
    if WHOLE:   # the masks' compares and selects were a third of the loop's instructions
        b_k = tl.load(b_ptr + offs_k * s_b_q)
        x = tl.load(x_ptrs)
    else:
        key_ok = offs_k < chunk_len
        b_k = tl.load(b_ptr + offs_k * s_b_q, mask=key_ok, other=float("inf"))   # past the chunk: weight 0
        x = tl.load(x_ptrs, mask=key_ok[:, None] & (offs_p[None, :] < hdim), other=0.0)
    exponent = a_m[:, None] - b_k[None, :]
    # above the diagonal the exponent may be large and positive: select before the exponential
    exponent = tl.where(offs_m[:, None] >= offs_k[None, :], exponent, -float("inf"))
    weight = (cb * tl.exp2(exponent)).to(x_ptr.dtype.element_ty)
    return acc + tl.dot(weight, x)


@triton.jit
def _finish_inputs(head, x_ptr, D_ptr, z_ptr, norm_weight_ptr, offs_m, offs_p, row_ok, hdim, s_x_l, s_x_p, s_D_h,
                   s_z_l, s_z_p, HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr):
    """What one head's finish reads, as loaded: (x[m], D, z, the norm's weight); zeros where unused."""
    out_mask = row_ok[:, None] & (offs_p[None, :] < hdim)
    x_m, D, z, weight = 0.0, 0.0, 0.0, 0.0
    if HAS_D:
        if D_HAS_HDIM:
            D = tl.load(D_ptr + head * s_D_h + offs_p, mask=offs_p < hdim, other=0.0).to(tl.float32)[None, :]
        else:
            D = tl.load(D_ptr + head * s_D_h).to(tl.float32)
        x_m = tl.load(x_ptr + offs_m[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=out_mask, other=0.0)
    if HAS_Z:
        z = tl.load(z_ptr + offs_m[:, None] * s_z_l + offs_p[None, :] * s_z_p, mask=out_mask, other=0.0)
        weight = tl.load(norm_weight_ptr + head * hdim + offs_p, mask=offs_p < hdim, other=0.0)
    return x_m, D, z, weight


@triton.jit
def _divide(a, b, APPROX: tl.constexpr):
    """a / b in fp32. Triton's division is PTX's div.full: it scales both by 1/4 where |b| > 2^126, then
    multiplies a by the approximate reciprocal of b. APPROX takes div.approx.ftz: the same reciprocal and
    product without the range check (three instructions fewer a value, the gated kernel 0.5-1% faster on an
    H200, docs/benchmarks.md, twenty-fourth run). The two agree where |b| <= 2^126; past it (the gate's z below
    -87) it gives 0 for a value under 1e-38 |a|. PTX is compiled code only: Triton's interpreter divides."""
    if APPROX:
        quotient = tl.inline_asm_elementwise("div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)
    else:
        quotient = a / b
    return quotient


@triton.jit
def _finish(acc, inputs, out_ptr, sumsq_ptr, offs_m, offs_p, row_ok, hdim, s_o_l, s_o_p, s_ss_l,
            HAS_D: tl.constexpr, HAS_Z: tl.constexpr, APPROX_DIVISION: tl.constexpr):
    """One head's D * x term, the gate (chunk_scan_gated_out) and the store; inputs from _finish_inputs."""
    x_m, D, z, weight = inputs
    if HAS_D:
        acc += x_m.to(tl.float32) * D
    if HAS_Z:   # the gate, the norm's sum of squares per head, and its weight (the row scale is the caller's)
        z = z.to(tl.float32)
        acc = _divide(acc * z, 1.0 + tl.exp2(-(z * LOG2E)), APPROX_DIVISION)
        tl.store(sumsq_ptr + offs_m * s_ss_l, tl.sum(acc * acc, axis=1), mask=row_ok)
        acc = acc * weight.to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * s_o_l + offs_p[None, :] * s_o_p, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_p[None, :] < hdim))


# tuning_size: size_class(batch, chunks), read by the autotuner only
_autotuned_kernel = triton.autotune(configs=_configs(), key=["chunk_size", "hdim", "dstate", "HAS_Z", "tuning_size"],
                                    prune_configs_by={"early_config_prune": _configs_for_the_group}
                                    )(_chunk_scan_out_kernel)


def chunk_scan_out(cb, x, dt, dA_cumsum, C, states, D=None, config: dict | None = None):
    """Same arguments and result as mamba_ssm's `_chunk_scan_fwd(cb, x, dt, dA_cumsum, C, states, D)`:
    cb (b, chunks, g, Q, Q) fp32, x (b, l, h, p), dt and dA_cumsum (b, h, chunks, Q) fp32, C (b, l, g, n),
    states (b, chunks, h, p, n), D (h,) or (h, p). Returns y (b, l, h, p) in x's dtype.
    config: one launch config instead of the autotuner's pick, e.g. {"BLOCK_M": 64, "BLOCK_K": 32,
    "num_warps": 4, "num_stages": 3} (BLOCK_K must divide BLOCK_M); "HEADS": 2 has each program compute two
    neighbouring heads of a group, which share each load of CB and C. Without one, $DIFFUMAMBA_SCAN_OUT_CONFIG
    (parse_config's form) or the autotuner decides."""
    return _launch(cb, x, dt, dA_cumsum, C, states, D, None, None, config)[0]


def chunk_scan_gated_out(cb, x, dt, dA_cumsum, C, states, D, z, norm_weight, config: dict | None = None):
    """The scan's output gated and weighted as the mixer's RMSNorm(y * silu(z)) * weight needs it, with the
    norm's row scale left out: (g * weight (b, l, h, p) in x's dtype, sum over p of g^2 (b, l, h) fp32),
    where g = y * silu(z) in fp32 and y is chunk_scan_out's. z (b, l, h, p), norm_weight (h * p,).
    The norm of a group of heads is rsqrt(mean of g^2 over the group + eps): a scale per row that the
    caller applies after out_proj, which it commutes with (one group)."""
    assert z.shape == x.shape and norm_weight.shape == (x.shape[2] * x.shape[3],) and norm_weight.is_contiguous()
    return _launch(cb, x, dt, dA_cumsum, C, states, D, z, norm_weight, config)


def parse_config(text: str) -> dict:
    """"BLOCK_MxBLOCK_K:warps:stages[:heads[:registers]]" (e.g. "128x64:8:3", "64x32:4:3:2", "64x32:4:2:1:128")
    -> a launch config; heads: heads per program, 1 or 2; registers: the most each thread may have
    (`maxnreg`: fewer registers let more programs share an SM, at the risk of spills). ValueError naming
    what is wrong."""
    try:
        blocks, warps, stages, *rest = text.split(":")
        block_m, block_k = (int(v) for v in blocks.lower().split("x"))
        config = {"BLOCK_M": block_m, "BLOCK_K": block_k, "num_warps": int(warps), "num_stages": int(stages),
                  "HEADS": int(rest[0]) if rest else 1}
        if len(rest) == 2:
            config["maxnreg"] = int(rest[1])
    except ValueError:
        config = None
    if config is None or len(rest) > 2 or config["HEADS"] not in (1, 2):
        raise ValueError(f"{text!r} is not BLOCK_MxBLOCK_K:warps:stages[:heads 1 or 2[:registers]], e.g. 128x64:8:3 "
                         "or 64x32:4:2:1:128")
    if not 24 <= config.get("maxnreg", 24) <= 255:
        raise ValueError(f"{text!r}: registers per thread lie in 24..255")
    if block_m % block_k:
        raise ValueError(f"{text!r}: BLOCK_K must divide BLOCK_M")
    return config


def config_from_env(config: dict | None, env_name: str, parse) -> dict | None:
    """The launch config given, else $env_name's as `parse` reads it (its ValueError naming the variable),
    else None."""
    if config is None and os.environ.get(env_name):
        try:
            return parse(os.environ[env_name])
        except ValueError as e:
            raise ValueError(f"{env_name}: {e}") from None
    return config


def chosen_config(config: dict | None) -> dict | None:
    """The launch config a call uses: the one given, else $DIFFUMAMBA_SCAN_OUT_CONFIG's (a config measured
    for a card, e.g. with bench.scan_output), else None: the autotuner picks from its list."""
    config = config_from_env(config, CONFIG_ENV, parse_config)
    return None if config is None else {"HEADS": 1, **config}


def interpreted() -> bool:
    """Whether the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 when Triton was imported), which
    executes no inline PTX."""
    return not isinstance(_chunk_scan_out_kernel, triton.runtime.JITFunction)


def whole_blocks(seqlen: int, chunk_size: int, hdim: int, config: dict | None) -> bool:
    """Whether every block a program reads lies wholly in its chunk and head: whole chunks, row blocks that
    divide a chunk (without a config, every row block of the autotune list), and a head's channels filling
    their block (a power of two, at least 16). Then the kernel's loop runs without masks."""
    block_ms = [c.kwargs["BLOCK_M"] for c in _autotuned_kernel.configs] if config is None else [config["BLOCK_M"]]
    return (seqlen % chunk_size == 0 and all(chunk_size % block_m == 0 for block_m in block_ms)
            and hdim == dot_block(hdim))


def key_offsets(dA_cumsum, dt):
    """Each key's part of the decay exponent, b[k] = log2(e) * dA[k] - log2(dt[k]) (module docstring), once per
    key before the launch: in the kernel every row block's threads took the logarithm again, a slow sequence
    of instructions, and it held up the loop (docs/benchmarks.md). log2(e) * dA is rounded to fp32 as the
    kernels round a[m]: on the diagonal the two then cancel exactly."""
    return dA_cumsum * LOG2E.value - torch.log2(dt)


def _launch(cb, x, dt, dA_cumsum, C, states, D, z, norm_weight, config):
    batch, seqlen, nheads, hdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    ngroups, dstate = C.shape[2], C.shape[3]
    assert cb.shape == (batch, nchunks, ngroups, chunk_size, chunk_size)
    assert states.shape == (batch, nchunks, nheads, hdim, dstate)
    assert dA_cumsum.shape == dt.shape == (batch, nheads, nchunks, chunk_size)
    assert batch * nchunks < 65536, f"batch x chunks = {batch * nchunks}: over the grid's limit of 65535"
    out = torch.empty_like(x)
    config = chosen_config(config)
    if config is not None:
        assert config["HEADS"] in (1, 2) and (nheads // ngroups) % config["HEADS"] == 0, \
            f"HEADS={config['HEADS']}: 1 or 2, and it must divide the {nheads // ngroups} heads of a group"
    sumsq = None if z is None else torch.empty(batch, seqlen, nheads, device=x.device, dtype=torch.float32)
    grid = lambda meta: (nheads // meta["HEADS"], triton.cdiv(chunk_size, meta["BLOCK_M"]), batch * nchunks)
    kernel = _autotuned_kernel if config is None else _chunk_scan_out_kernel
    key_offset = key_offsets(dA_cumsum, dt)
    kernel[grid](   # without a gate, z and the sums point at x and dt: never read or written (HAS_Z)
        cb, x, out, key_offset, dA_cumsum, C, states, D, x if z is None else z, norm_weight, dt if z is None else sumsq,
        chunk_size, hdim, dstate, batch, seqlen, nheads // ngroups, size_class(batch, nchunks),
        *cb.stride(), *x.stride(), *out.stride(),
        key_offset.stride(0), key_offset.stride(2), key_offset.stride(1), key_offset.stride(3),
        dA_cumsum.stride(0), dA_cumsum.stride(2), dA_cumsum.stride(1), dA_cumsum.stride(3),
        *C.stride(), *states.stride(),
        D.stride(0) if D is not None else 0,
        *(z.stride() if z is not None else (0, 0, 0, 0)),
        *(sumsq.stride() if z is not None else (0, 0, 0)),
        HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
        BLOCK_P=dot_block(hdim), BLOCK_N=dot_block(dstate),
        WHOLE=whole_blocks(seqlen, chunk_size, hdim, config), APPROX_DIVISION=not interpreted(),
        enable_fp_fusion=FP_FUSION, **(config or {}),
    )
    return out, sumsq
