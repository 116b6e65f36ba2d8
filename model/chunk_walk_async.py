"""model/chunk_walk_kernel.py's walk with its products issued asynchronously (Gluon, Hopper's wgmma).

Triton's `tl.dot` waits for every product before the next instruction and puts a block barrier after each, so
the walk's four products a chunk run one after another (docs/benchmarks.md, twenty-ninth run). Written with
explicit asynchronous warpgroup MMAs, a chunk issues three of them at once, none needing another:

    pair  = C B^T                   (CHUNK, CHUNK)   the chunk's pairs
    y     = C state                 (CHUNK, P)       the state entering the chunk
    state = exp2(a_end) state + B^T carried          the state leaving it, carried = exp2(a_end - key) x

then waits for the pairs alone, weights them, waits for y, adds the weighted pairs' product with x, and
finishes (gate, norm sums, weight) as the Triton walk does. The tiles of the next chunk are copied into shared
memory (cp.async, two buffers) while this one computes; the decays and keys are loaded a chunk ahead.

The math, the launch grid, the inputs and outputs are chunk_walk_kernel.py's, and so are its results, to the
bit on an H200. It runs where the walk has at most 32 channels a program (the 1.3B presets at batch 1), for
whole tiles of bf16 / fp16 on sm_90 (`usable`). There a call is 4.5-9% faster than the Triton walk, and the 1.3B
forward 1-2% at 8K-32K (docs/benchmarks.md, thirtieth run): the walk is held up less by the products' order
than by its loads (L2 at two thirds of its throughput: every program reads its chunk's B and C) and its
issue. Gluon compiles only for a GPU: bench.gpu_validate checks it against the Triton walk and float64; on a
CPU, tests compile it for sm_90 and read its loop's waits from the binary.
"""
from __future__ import annotations

import warnings

import torch
import triton

from model.chunk_scan_kernel import LOG2E

try:   # Gluon is experimental: Triton builds without it (or with another API) keep the Triton walk
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy as cp,
    )
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    # cp.async into shared memory: async_load since Triton 3.7, async_copy_global_to_shared before
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
    HAVE_GLUON = True
except (ImportError, AttributeError):   # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False


if HAVE_GLUON:
    @gluon.jit
    def _copy_tiles(C_s, B_s, x_s, z_s, C_src, B_src, x_src, z_src, row, s_C_l, s_B_l, s_x_l, s_z_l):
        """Start copying a chunk's C, B, x and z tiles (rows from `row`) into shared memory, as one group."""
        _async_load(C_s, C_src + row * s_C_l)
        _async_load(B_s, B_src + row * s_B_l)
        _async_load(x_s, x_src + row * s_x_l)
        _async_load(z_s, z_src + row * s_z_l)
        cp.commit_group()

    @gluon.jit
    def _vectors(dA_ptr, key_ptr, start, rows_q, cols_q, rows_p, CHUNK: gl.constexpr):
        """A chunk's decays a = log2(e) dA by row (in the pairs' and y's layouts), keys by column and by row,
        and a at its end."""
        a_q = gl.load(dA_ptr + start + rows_q) * LOG2E
        a_p = gl.load(dA_ptr + start + rows_p) * LOG2E
        key_q = gl.load(key_ptr + start + cols_q)
        key_p = gl.load(key_ptr + start + rows_p)
        a_end = gl.load(dA_ptr + start + CHUNK - 1) * LOG2E
        return a_q, a_p, key_q, key_p, a_end

    @gluon.jit
    def _gated(y, x, z, D, HAS_D: gl.constexpr):
        """(y + D x) z in fp32: the gate's product, before its sigmoid."""
        if HAS_D:
            y += x.to(gl.float32) * D
        return y * z.to(gl.float32)

    @gluon.jit
    def _finish(yz, z, weight, rows, cols, out_ptr, sumsq_ptr, s_o_l, s_ss_l):
        """g = yz sigmoid(z); the sum of g^2 over the block's channels, and g times the norm's weight, stored."""
        g = gl.fdiv(yz, 1.0 + gl.exp2(-(z.to(gl.float32) * LOG2E)))
        gl.store(sumsq_ptr + rows * s_ss_l, gl.sum(g * g, axis=1))
        g = g * weight[None, :]
        gl.store(out_ptr + rows[:, None] * s_o_l + cols[None, :], g.to(out_ptr.dtype.element_ty))

    @gluon.jit
    def _walk_async_kernel(
        x_ptr, key_ptr, dA_ptr, B_ptr, C_ptr, D_ptr, z_ptr, weight_ptr, out_ptr, sumsq_ptr,
        seqlen, hdim, heads_per_group,
        s_x_b, s_x_l, s_x_h,
        s_a_b, s_a_h,
        s_B_b, s_B_l, s_B_g,
        s_C_b, s_C_l, s_C_g,
        s_z_b, s_z_l, s_z_h,
        s_o_b, s_o_l, s_o_h,
        s_ss_b, s_ss_l, s_ss_h,
        HAS_D: gl.constexpr, CHUNK: gl.constexpr, BLOCK_P: gl.constexpr, BLOCK_N: gl.constexpr,
    ):
        dtype: gl.constexpr = x_ptr.dtype.element_ty
        # one warpgroup; each accumulator's layout is the wgmma that writes it, by its width
        acc_p: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_P, 16])
        acc_q: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, CHUNK, 16])
        pairs_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_p, k_width=2)
        # copies of 16 bytes a thread along a row
        rows_n: gl.constexpr = gl.BlockedLayout([1, 8], [256 // BLOCK_N, BLOCK_N // 8], [4, 1], [1, 0])
        rows_p8: gl.constexpr = gl.BlockedLayout([1, 8], [256 // BLOCK_P, BLOCK_P // 8], [4, 1], [1, 0])
        tile_qn: gl.constexpr = gl.NVMMASharedLayout.get_default_for([CHUNK, BLOCK_N], dtype)
        tile_qp: gl.constexpr = gl.NVMMASharedLayout.get_default_for([CHUNK, BLOCK_P], dtype)
        tile_np: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_P], dtype)

        pid_p = gl.program_id(0)
        head = gl.program_id(1)
        pid_b = gl.program_id(2)
        group = head // heads_per_group
        x_ptr += pid_b * s_x_b + head * s_x_h
        key_ptr += pid_b * s_a_b + head * s_a_h
        dA_ptr += pid_b * s_a_b + head * s_a_h
        B_ptr += pid_b * s_B_b + group * s_B_g
        C_ptr += pid_b * s_C_b + group * s_C_g
        z_ptr += pid_b * s_z_b + head * s_z_h
        out_ptr += pid_b * s_o_b + head * s_o_h
        sumsq_ptr += pid_b * s_ss_b + (head * gl.num_programs(0) + pid_p) * s_ss_h
        p0 = pid_p * BLOCK_P

        # where each tile's copy reads, for the chunk at row 0 (a chunk's copy adds its first row's offset)
        r_n = gl.arange(0, CHUNK, gl.SliceLayout(1, rows_n))
        c_n = gl.arange(0, BLOCK_N, gl.SliceLayout(0, rows_n))
        r_p = gl.arange(0, CHUNK, gl.SliceLayout(1, rows_p8))
        c_p = p0 + gl.arange(0, BLOCK_P, gl.SliceLayout(0, rows_p8))
        C_src = C_ptr + r_n[:, None] * s_C_l + c_n[None, :]
        B_src = B_ptr + r_n[:, None] * s_B_l + c_n[None, :]
        x_src = x_ptr + r_p[:, None] * s_x_l + c_p[None, :]
        z_src = z_ptr + r_p[:, None] * s_z_l + c_p[None, :]
        C_s = gl.allocate_shared_memory(dtype, [2, CHUNK, BLOCK_N], tile_qn)
        B_s = gl.allocate_shared_memory(dtype, [2, CHUNK, BLOCK_N], tile_qn)
        x_s = gl.allocate_shared_memory(dtype, [2, CHUNK, BLOCK_P], tile_qp)
        z_s = gl.allocate_shared_memory(dtype, [2, CHUNK, BLOCK_P], tile_qp)
        state_s = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_P], tile_np)
        carried_s = gl.allocate_shared_memory(dtype, [CHUNK, BLOCK_P], tile_qp)

        rows_q = gl.arange(0, CHUNK, gl.SliceLayout(1, acc_q))
        cols_q = gl.arange(0, CHUNK, gl.SliceLayout(0, acc_q))
        rows_p = gl.arange(0, CHUNK, gl.SliceLayout(1, acc_p))
        cols_p = p0 + gl.arange(0, BLOCK_P, gl.SliceLayout(0, acc_p))
        weight = gl.load(weight_ptr + head * hdim + cols_p).to(gl.float32)
        D = 0.0
        if HAS_D:
            D = gl.load(D_ptr + head).to(gl.float32)

        nchunks = seqlen // CHUNK
        _copy_tiles(C_s.index(0), B_s.index(0), x_s.index(0), z_s.index(0), C_src, B_src, x_src, z_src, 0,
                    s_C_l, s_B_l, s_x_l, s_z_l)
        a_q, a_p, key_q, key_p, a_end = _vectors(dA_ptr, key_ptr, 0, rows_q, cols_q, rows_p, CHUNK)
        state = gl.zeros([BLOCK_N, BLOCK_P], gl.float32, acc_p)
        for chunk in range(nchunks):
            start = chunk * CHUNK
            buf = chunk % 2
            # the next chunk's tiles and vectors (past the last chunk: the last's again, never used)
            following = gl.minimum(chunk + 1, nchunks - 1) * CHUNK
            _copy_tiles(C_s.index(1 - buf), B_s.index(1 - buf), x_s.index(1 - buf), z_s.index(1 - buf),
                        C_src, B_src, x_src, z_src, following, s_C_l, s_B_l, s_x_l, s_z_l)
            ahead = _vectors(dA_ptr, key_ptr, following, rows_q, cols_q, rows_p, CHUNK)
            cp.wait_group(1)    # this chunk's tiles have landed
            C_t = C_s.index(buf)
            B_t = B_s.index(buf)
            x_t = x_s.index(buf)
            x = x_t.load(acc_p)
            z = z_s.index(buf).load(acc_p)

            # the state's update reads x weighted by each key's decay to the chunk's end, the state's part of
            # y reads the state: both through shared memory, as a wgmma's operands. The state is scaled before
            # any product is issued: registers an in-flight wgmma's accumulator will use, written while others
            # run, make ptxas wait for all of them first
            state_s.store(state.to(dtype))
            state = state * gl.exp2(a_end)
            carried_s.store((x.to(gl.float32) * gl.exp2(a_end - key_p)[:, None]).to(dtype))
            fence_async_shared()
            pairs = warpgroup_mma(C_t, B_t.permute((1, 0)), gl.zeros([CHUNK, CHUNK], gl.float32, acc_q),
                                  use_acc=False, is_async=True)
            y = warpgroup_mma(C_t, state_s, gl.zeros([CHUNK, BLOCK_P], gl.float32, acc_p), use_acc=False,
                              is_async=True)
            state = warpgroup_mma(B_t.permute((1, 0)), carried_s, state, is_async=True)

            # the pairs' weights exp2(a[m] - key[k]) for k <= m (selected before the exponential)
            pairs = warpgroup_mma_wait(2, deps=[pairs])
            exponent = gl.where(rows_q[:, None] >= cols_q[None, :], a_q[:, None] - key_q[None, :], -float("inf"))
            pairs = gl.convert_layout((pairs * gl.exp2(exponent)).to(dtype), pairs_operand)
            y = warpgroup_mma_wait(1, deps=[y])
            y = warpgroup_mma(pairs, x_t, y * gl.exp2(a_p)[:, None], is_async=True)
            state, y = warpgroup_mma_wait(0, deps=[state, y])

            _finish(_gated(y, x, z, D, HAS_D), z, weight, start + rows_p, cols_p, out_ptr, sumsq_ptr, s_o_l,
                    s_ss_l)
            a_q, a_p, key_q, key_p, a_end = ahead
        cp.wait_group(0)


def usable(x, B, C, z, config: dict) -> bool:
    """Whether the asynchronous walk runs these inputs: Gluon present, an sm_90 GPU, bf16 / fp16, whole tiles
    (chunk_walk_kernel.whole_tiles) of the measured chunk of 64 steps (a wgmma's rows come in blocks of 64;
    longer chunks need more shared memory than an SM has), at most 32 channels a program, unit strides along the channels and the state, and rows whose copies stay 16-byte
    aligned. With 64 channels one warpgroup's accumulators spill (296 bytes a thread) and 120 KB of shared
    memory leave one program an SM: 14-16% slower than the Triton walk where it fits two (docs/benchmarks.md)."""
    from model.chunk_walk_kernel import whole_tiles
    if not HAVE_GLUON or not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] != 9:
        return False
    hdim, dstate = x.shape[3], C.shape[3]
    if x.dtype not in (torch.bfloat16, torch.float16) or config["CHUNK"] != 64 or config["BLOCK_P"] > 32:
        return False
    if not whole_tiles(x.shape[1], hdim, dstate, config) or dstate > 256:
        return False
    tensors = (x, B, C, z)
    if any(t.stride(-1) != 1 or t.dtype != x.dtype for t in tensors):
        return False
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


_state = {"compiled": False, "failed": None}   # whether a launch has compiled, or why the first one did not


def launch(x, key, dA_cumsum, B, C, D, z, norm_weight, out, sumsq, config: dict) -> bool:
    """The kernel over chunk_walk_kernel.chunk_walk_gated's prepared inputs (key offsets, dA at the chunk).
    Gluon's API changes between Triton releases: where this Triton cannot build the kernel, the first launch
    warns once and returns False, and the caller runs the Triton walk from then on."""
    if _state["failed"] is not None:
        return False
    batch, seqlen, nheads, hdim = x.shape
    ngroups, dstate = C.shape[2], C.shape[3]
    try:
        _walk_async_kernel[(hdim // config["BLOCK_P"], nheads, batch)](
            x, key, dA_cumsum, B, C, D, z, norm_weight, out, sumsq,
            seqlen, hdim, nheads // ngroups,
            x.stride(0), x.stride(1), x.stride(2), dA_cumsum.stride(0), dA_cumsum.stride(1),
            B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
            z.stride(0), z.stride(1), z.stride(2), out.stride(0), out.stride(1), out.stride(2), *sumsq.stride(),
            HAS_D=D is not None, CHUNK=config["CHUNK"], BLOCK_P=config["BLOCK_P"], BLOCK_N=dstate, num_warps=4,
        )
    except Exception as e:
        if _state["compiled"]:
            raise
        _state["failed"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(f"the walk's asynchronous kernel (model/chunk_walk_async.py) does not build with Triton "
                      f"{triton.__version__} ({_state['failed']}); the Triton walk runs instead", stacklevel=2)
        return False
    _state["compiled"] = True
    return True
