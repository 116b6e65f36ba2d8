"""The state entering each chunk of the SSD scan, in one kernel: mamba_ssm's `_chunk_state_fwd` (each
chunk's own state, in fp32) followed by `_state_passing_fwd` (the states passed along the chunks).

For head h, chunk c of length Q, positions k of the chunk, last position e:

    local_c  = sum_k x[k]^T (exp(dA[e] - dA[k]) * dt[k] * B[k])      (P x N)   the chunk's own state
    state_0  = 0
    state_c+1 = exp(dA[e]) * state_c + local_c                                   passed along the chunks

dA is the within-chunk cumulative sum of dt * A (fp32). The two launchers write every chunk's local state
in fp32 and read it back (at 32K tokens and 64 heads of 64 x 128, 268 MB each way per direction and layer)
before the passed states are written in the inputs' dtype. Here each program keeps one head's state tile in
registers and walks the chunks in order, so only x, B and the passed states cross memory: about 40% of
the two launchers' bytes. The price is parallelism: one program per head, batch row and state tile
(128 programs at batch 1 for the 1.3B presets' 64 heads of 64 x 128 with 64 x 64 tiles), each looping
over every chunk; the loads of the next chunk overlap the current chunk's product (the loop's stages).

The arithmetic is mamba_ssm's: B times its scale rounded to the inputs' dtype before the product, fp32
accumulation and fp32 passing, the passed states rounded to `out_dtype` as they are stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

from model.chunk_scan_kernel import FP_FUSION, dot_block, size_class  # as the output kernel's launches


def _configs():
    """Tile shapes (P x N), warps, stages. On an H200 (bench.state_pass, docs/benchmarks.md) 64 x 64 with 4
    warps and 3 stages is the fastest at 1 x 32K, 1 x 128K and, since the loop runs without masks, 8 x 2048;
    64 x 128 (the whole state, x read by one program) was the fastest there with masks; 64 x 32 and 32 x 32
    give more programs where there are few heads. A stage holds the x and B tiles of a whole chunk (64 KB at
    64 x 64 in bf16, chunk 256): fp32 inputs fit only 32 x 32."""
    return [triton.Config({"BLOCK_P": p, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for p, n, w, s in ((64, 64, 4, 3), (64, 128, 8, 2), (64, 32, 4, 3), (32, 32, 4, 2))]


@triton.jit(do_not_specialize=["tuning_size"])
def _states_entering_kernel(
    x_ptr, B_ptr, dt_ptr, dA_ptr, out_ptr,
    chunk_size, hdim, dstate, nchunks, heads_per_group, tuning_size,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_dt_b, s_dt_c, s_dt_h, s_dt_q,
    s_dA_b, s_dA_c, s_dA_h, s_dA_q,
    s_o_b, s_o_c, s_o_h, s_o_p, s_o_n,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, WHOLE: tl.constexpr,
):
    num_n = tl.cdiv(dstate, BLOCK_N)
    pid_p = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    pid_b = tl.program_id(1)
    head = tl.program_id(2)

    x_ptr += pid_b * s_x_b + head * s_x_h
    B_ptr += pid_b * s_B_b + (head // heads_per_group) * s_B_g
    dt_ptr += pid_b * s_dt_b + head * s_dt_h
    dA_ptr += pid_b * s_dA_b + head * s_dA_h
    out_ptr += pid_b * s_o_b + head * s_o_h

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, BLOCK_Q)
    p_ok, n_ok, q_ok = offs_p < hdim, offs_n < dstate, offs_q < chunk_size
    out_ptrs = out_ptr + offs_p[:, None] * s_o_p + offs_n[None, :] * s_o_n
    out_mask = p_ok[:, None] & n_ok[None, :]

    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    tl.store(out_ptrs, state.to(out_ptr.dtype.element_ty), mask=out_mask)      # nothing enters chunk 0
    # every chunk but the last is whole: only the last may be a part chunk, and no state leaves it
    if WHOLE:   # tiles fill the chunk, the head and the state: no masks, offsets computed once
        x_offs = offs_q[None, :] * s_x_l + offs_p[:, None] * s_x_p
        B_offs = offs_q[:, None] * s_B_l + offs_n[None, :] * s_B_n
        out_offs = offs_p[:, None] * s_o_p + offs_n[None, :] * s_o_n
        for c in range(nchunks - 1):
            x = tl.load(x_ptr + x_offs)                                          # (P, Q)
            b = tl.load(B_ptr + B_offs)                                          # (Q, N)
            dA_k = tl.load(dA_ptr + offs_q * s_dA_q)
            dt_k = tl.load(dt_ptr + offs_q * s_dt_q)
            dA_last = tl.load(dA_ptr + (chunk_size - 1) * s_dA_q)
            state = _pass_chunk(state, x, b, dA_k, dt_k, dA_last)
            out_ptr += s_o_c
            tl.store(out_ptr + out_offs, state.to(out_ptr.dtype.element_ty))
            x_ptr += chunk_size * s_x_l
            B_ptr += chunk_size * s_B_l
            dA_ptr += s_dA_c
            dt_ptr += s_dt_c
    else:
        for c in range(nchunks - 1):
            rows = c * chunk_size + offs_q
            x = tl.load(x_ptr + rows[None, :] * s_x_l + offs_p[:, None] * s_x_p,
                        mask=p_ok[:, None] & q_ok[None, :], other=0.0)            # (P, Q)
            b = tl.load(B_ptr + rows[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                        mask=q_ok[:, None] & n_ok[None, :], other=0.0)            # (Q, N)
            dA_k = tl.load(dA_ptr + c * s_dA_c + offs_q * s_dA_q, mask=q_ok, other=0.0)
            dt_k = tl.load(dt_ptr + c * s_dt_c + offs_q * s_dt_q, mask=q_ok, other=0.0)
            dA_last = tl.load(dA_ptr + c * s_dA_c + (chunk_size - 1) * s_dA_q)
            state = _pass_chunk(state, x, b, dA_k, dt_k, dA_last)
            tl.store(out_ptrs + (c + 1) * s_o_c, state.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _pass_chunk(state, x, b, dA_k, dt_k, dA_last):
    """The state leaving a chunk from the one entering it: exp(dA[e]) * state + x^T (scale * B), with
    scale[k] = exp(dA[e] - dA[k]) * dt[k] and B times it rounded to x's dtype before the product."""
    dA_last = dA_last.to(tl.float32)
    scale = tl.exp(tl.minimum(dA_last - dA_k.to(tl.float32), 0.0)) * dt_k.to(tl.float32)
    b = (b.to(tl.float32) * scale[:, None]).to(x.dtype)
    return state * tl.exp(dA_last) + tl.dot(x, b)


# tuning_size: size_class(batch, chunks), read by the autotuner only
_autotuned_kernel = triton.autotune(configs=_configs(), key=["chunk_size", "hdim", "dstate", "tuning_size"]
                                    )(_states_entering_kernel)


def whole_tiles(chunk_size: int, hdim: int, dstate: int, config: dict | None) -> bool:
    """Whether every tile the loop reads and writes lies wholly in its chunk, head and state: a chunk of a
    power of two (at least 16) long, and headdim and d_state multiples of the tile (without a config, of
    every tile of the autotune list). Then the loop runs without masks (7% fewer instructions at the 1.3B
    shapes, `bench.kernel_resources`)."""
    tiles = ([(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_N"]) for c in _autotuned_kernel.configs] if config is None
             else [(config["BLOCK_P"], config["BLOCK_N"])])
    return (chunk_size == dot_block(chunk_size)
            and all(hdim % p == 0 and dstate % n == 0 for p, n in tiles))


def states_entering_chunks(B, x, dt, dA_cumsum, out_dtype, config: dict | None = None):
    """The state entering each chunk, (b, chunks, h, p, n) in out_dtype: what mamba_ssm's
    `_state_passing_fwd(_chunk_state_fwd(B, x, dt, dA_cumsum, states_in_fp32=True)` with (p n) flattened,
    `dA_cumsum[..., -1], out_dtype=out_dtype)[0]` returns, reshaped. B (b, l, g, n), x (b, l, h, p), dt and
    dA_cumsum (b, h, chunks, Q) fp32. config: one launch config instead of the autotuner's pick, e.g.
    {"BLOCK_P": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}."""
    batch, seqlen, nheads, hdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    assert dA_cumsum.shape == dt.shape == (batch, nheads, nchunks, chunk_size)
    assert B.shape[:2] == (batch, seqlen) and nheads % ngroups == 0 and nchunks == triton.cdiv(seqlen, chunk_size)
    assert batch < 65536, f"batch {batch}: over the grid's limit of 65535"
    out = torch.empty(batch, nchunks, nheads, hdim, dstate, device=x.device, dtype=out_dtype)
    grid = lambda meta: (triton.cdiv(hdim, meta["BLOCK_P"]) * triton.cdiv(dstate, meta["BLOCK_N"]), batch, nheads)
    kernel = _autotuned_kernel if config is None else _states_entering_kernel
    kernel[grid](
        x, B, dt, dA_cumsum, out,
        chunk_size, hdim, dstate, nchunks, nheads // ngroups, size_class(batch, nchunks),
        *x.stride(), *B.stride(),
        dt.stride(0), dt.stride(2), dt.stride(1), dt.stride(3),
        dA_cumsum.stride(0), dA_cumsum.stride(2), dA_cumsum.stride(1), dA_cumsum.stride(3),
        *out.stride(),
        BLOCK_Q=dot_block(chunk_size), WHOLE=whole_tiles(chunk_size, hdim, dstate, config),
        enable_fp_fusion=FP_FUSION,
        **(config or {}),
    )
    return out


def states_entering_chunks_reference(B, x, dt, dA_cumsum, out_dtype):
    """The same in plain torch (float64 for float64 inputs, else fp32 throughout): the formula of the module
    docstring, for checks on a GPU (bench.state_pass)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    _, seqlen, nheads, _ = x.shape
    _, _, nchunks, chunk_size = dt.shape
    pad = (0, 0, 0, 0, 0, nchunks * chunk_size - seqlen)
    xs = rearrange(F.pad(x, pad).to(compute), "b (c q) h p -> b c q h p", q=chunk_size)
    Bs = rearrange(F.pad(B, pad).to(compute), "b (c q) g n -> b c q g n", q=chunk_size)
    Bs = Bs.repeat_interleave(nheads // B.shape[2], dim=3)
    dA, dt = dA_cumsum.to(compute), dt.to(compute)
    weight = torch.exp(torch.clamp(dA[..., -1:] - dA, max=0.0)) * dt                   # (b, h, c, q)
    local = torch.einsum("bhcq,bcqhp,bcqhn->bchpn", weight, xs, Bs)
    entering = torch.zeros_like(local)
    for c in range(1, nchunks):
        entering[:, c] = torch.exp(dA[:, :, c - 1, -1])[..., None, None] * entering[:, c - 1] + local[:, c - 1]
    return entering.to(out_dtype)
