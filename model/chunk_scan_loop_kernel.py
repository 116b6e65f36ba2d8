"""The scan's output kernel, one program per row block of a chunk looping over a group's heads.

Same result as model/chunk_scan_kernel.py's kernel (see its docstring for the sums). That kernel gives each
program one head and walks the keys in blocks; its loop is at most eight steps long, so its loads are
hardly pipelined, and each head's program reads the chunk's CB and C again from L2. Here a program takes
one row block of one chunk and HEAD_LOOP heads of one group:

    CB[rows, all keys], C[rows]                    loaded once, kept for every head of the loop
    for each head:                                 a loop the compiler pipelines: the next head's x, state
        weight = CB * exp2(a[m] - b[k])  (causal)  and gate are in flight while this one computes
        y = exp2(a[m]) * C @ state^T + weight @ x[keys]

The keys span the whole chunk in one tile (KEYS), masked past the row block's last row: the exponentials
of the masked part are wasted work, the bytes are not (masked loads read nothing).
"""
from __future__ import annotations

import triton
import triton.language as tl

from model.chunk_scan_kernel import LOG2E, _finish


@triton.jit(do_not_specialize=["tuning_size"])
def _chunk_scan_loop_kernel(
    cb_ptr, x_ptr, out_ptr, dt_ptr, dA_ptr, C_ptr, states_ptr, D_ptr, z_ptr, norm_weight_ptr, sumsq_ptr,
    chunk_size, hdim, dstate, batch, seqlen, heads_per_group, tuning_size,
    s_cb_b, s_cb_c, s_cb_g, s_cb_m, s_cb_k,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_o_b, s_o_l, s_o_h, s_o_p,
    s_dt_b, s_dt_c, s_dt_h, s_dt_q,
    s_dA_b, s_dA_c, s_dA_h, s_dA_q,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_D_h,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_ss_b, s_ss_l, s_ss_h,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HEAD_LOOP: tl.constexpr,
    BLOCK_M: tl.constexpr, KEYS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    first_head = tl.program_id(0) * HEAD_LOOP
    pid_m = tl.program_id(1)
    pid_bc = tl.program_id(2)
    pid_c = pid_bc // batch
    pid_b = pid_bc - pid_c * batch
    pid_g = first_head // heads_per_group
    chunk_len = min(chunk_size, seqlen - pid_c * chunk_size)
    m_start = pid_m * BLOCK_M

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, KEYS)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < chunk_len
    key_ok = offs_k < min(chunk_len, m_start + BLOCK_M)      # no row of the block reads a later key
    causal = (offs_m[:, None] >= offs_k[None, :]) & key_ok[None, :]

    # what every head of the group shares: its rows of CB (causal part only) and of C
    cb_ptr += pid_b * s_cb_b + pid_c * s_cb_c + pid_g * s_cb_g
    cb = tl.load(cb_ptr + offs_m[:, None] * s_cb_m + offs_k[None, :] * s_cb_k, mask=causal & row_ok[:, None],
                 other=0.0).to(tl.float32)
    C_ptr += pid_b * s_C_b + pid_c * chunk_size * s_C_l + pid_g * s_C_g
    C = tl.load(C_ptr + offs_m[:, None] * s_C_l + offs_n[None, :] * s_C_n,
                mask=row_ok[:, None] & (offs_n[None, :] < dstate), other=0.0)

    x_ptr += pid_b * s_x_b + pid_c * chunk_size * s_x_l
    out_ptr += pid_b * s_o_b + pid_c * chunk_size * s_o_l
    dt_ptr += pid_b * s_dt_b + pid_c * s_dt_c
    dA_ptr += pid_b * s_dA_b + pid_c * s_dA_c
    states_ptr += pid_b * s_st_b + pid_c * s_st_c
    z_ptr += pid_b * s_z_b + pid_c * chunk_size * s_z_l
    sumsq_ptr += pid_b * s_ss_b + pid_c * chunk_size * s_ss_l
    for i in range(HEAD_LOOP):
        head = first_head + i
        a_m = tl.load(dA_ptr + head * s_dA_h + offs_m * s_dA_q, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
        dt_k = tl.load(dt_ptr + head * s_dt_h + offs_k * s_dt_q, mask=key_ok, other=0.0).to(tl.float32)
        b_k = tl.load(dA_ptr + head * s_dA_h + offs_k * s_dA_q, mask=key_ok, other=0.0).to(tl.float32) * LOG2E \
            - tl.log2(dt_k)
        # above the diagonal the exponent may be large and positive: select before the exponential
        exponent = tl.where(causal, a_m[:, None] - b_k[None, :], -float("inf"))
        weight = (cb * tl.exp2(exponent)).to(x_ptr.dtype.element_ty)
        x = tl.load(x_ptr + head * s_x_h + offs_k[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                    mask=key_ok[:, None] & (offs_p[None, :] < hdim), other=0.0)
        state = tl.load(states_ptr + head * s_st_h + offs_n[:, None] * s_st_n + offs_p[None, :] * s_st_p,
                        mask=(offs_n[:, None] < dstate) & (offs_p[None, :] < hdim), other=0.0)
        acc = tl.dot(C, state.to(C.dtype)) * tl.exp2(a_m)[:, None]
        acc = tl.dot(weight, x, acc)
        _finish(acc, head, x_ptr + head * s_x_h, out_ptr + head * s_o_h, D_ptr, z_ptr + head * s_z_h,
                norm_weight_ptr, sumsq_ptr + head * s_ss_h, offs_m, offs_p, row_ok, hdim, s_x_l, s_x_p, s_o_l, s_o_p,
                s_D_h, s_z_l, s_z_p, s_ss_l, HAS_D, D_HAS_HDIM, HAS_Z)
