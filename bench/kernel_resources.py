"""What each launch config of our Triton kernels asks of an H100 / H200 SM, without a GPU: registers per
thread, bytes spilled to the stack, shared memory per program, and from those how many programs (and warps)
fit on one SM at a time.

A kernel is held up by its loads' latency (only the other programs resident on the SM hide a program's
waits: the table says how many there are room for) or by the instructions it issues: ncu found the scan's
output kernel issue-bound until its loop lost a fp32 logarithm per key and its masks (docs/benchmarks.md,
twenty-first run), and the walk (model/chunk_walk_kernel.py) held to two programs an SM by its registers
and shared memory (twenty-seventh run). The last column counts each loop's instructions. Each config is
compiled for sm_90 down to the binary as a launch at the 1.3B shapes specialises it (`compile_for_h100`);
registers, spills and instructions come from the binary (cuobjdump, bundled with Triton).

    python -m bench.kernel_resources --out bench_results          # kernel_resources.md / .json / .png
    python -m bench.kernel_resources --extra-configs 64x32:4:2 64x64:4:2:2 --extra-state-configs 64x32:8:2 --out x
                                                                  # also configs outside the autotune lists
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from bench import common

# one SM of an H100 / H200 (sm_90): CUDA C programming guide, compute capability 9.0
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256            # registers are given to a warp in units of 256 (8 per thread)
SHARED_MEMORY_PER_SM = 228 * 1024
SHARED_MEMORY_H100 = 227 * 1024   # the most one program may have
SHARED_RESERVED = 1024         # the system's share of shared memory, per resident program
WARPS_PER_SM = 64
PROGRAMS_PER_SM = 32


def compile_for_h100(kernel, pointers: dict[str, str], constants: dict, warps: int, stages: int,
                     unit_strides=(), not_multiples_of_16=(), maxnreg: int | None = None):
    """kernel (a triton.jit function) compiled for sm_90 as a launch at the 1.3B shapes specialises it:
    pointers (name -> "*bf16" etc.), constants (its constexprs), unit_strides (arguments that are 1 there,
    fixed as constants), and every other argument an i32 that the launch sees divisible by 16 (pointers,
    strides, sizes such as headdim 64, state 128, chunk 256), but for not_multiples_of_16. Without that
    the loads do not vectorise, the loop does not pipeline them, and the shared memory counted is a third
    to a half of a real launch's. maxnreg: the most registers a thread may have (None: the compiler's choice)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if getattr(kernel, "is_gluon", lambda: False)():   # a Gluon kernel compiles from its own source class
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    constants = {**constants, **dict.fromkeys(unit_strides, 1)}
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in constants else pointers.get(p, "i32") for p in params}
    multiples_of_16 = [p for p in params if p not in constants and p not in not_multiples_of_16]
    source = ASTSource(fn=kernel, signature=signature, constexprs={(params.index(n),): v for n, v in constants.items()},
                       attrs={(params.index(p),): [["tt.divisibility", 16]] for p in multiples_of_16})
    from model.chunk_scan_kernel import FP_FUSION
    options = {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": FP_FUSION,
               **({"maxnreg": maxnreg} if maxnreg else {})}
    compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"], constants
    return compiled


def compile_scan_out(kwargs: dict, warps: int, stages: int, dtype: str = "bf16", gated: bool = False,
                     maxnreg: int | None = None):
    """model/chunk_scan_kernel.py's kernel at the 1.3B shapes (headdim 64, state 128), one launch config."""
    from model.chunk_scan_kernel import _chunk_scan_out_kernel

    pointers = {name: "*fp32" for name in ("cb_ptr", "b_ptr", "dA_ptr", "D_ptr", "norm_weight_ptr", "sumsq_ptr")}
    pointers |= {name: f"*{dtype}" for name in ("x_ptr", "out_ptr", "C_ptr", "states_ptr", "z_ptr")}
    # WHOLE: whole chunks, as at 32K tokens; APPROX_DIVISION: as compiled for a GPU
    constants = dict(HAS_D=True, D_HAS_HDIM=False, HAS_Z=gated, BLOCK_P=64, BLOCK_N=128, WHOLE=True,
                     APPROX_DIVISION=True, **kwargs)
    return compile_for_h100(_chunk_scan_out_kernel, pointers, constants, warps, stages,
                            unit_strides=("s_cb_k", "s_x_p", "s_o_p", "s_b_q", "s_dA_q", "s_C_n", "s_st_n", "s_D_h",
                                          "s_z_p", "s_ss_h"),
                            not_multiples_of_16=("batch", "tuning_size"), maxnreg=maxnreg)


def compile_state_pass(kwargs: dict, warps: int, stages: int, dtype: str = "bf16"):
    """model/state_pass_kernel.py's kernel at the 1.3B shapes (chunk 256: whole tiles), one launch config."""
    from model.state_pass_kernel import _states_entering_kernel

    pointers = {"x_ptr": f"*{dtype}", "B_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "dt_ptr": "*fp32",
                "dA_ptr": "*fp32"}
    return compile_for_h100(_states_entering_kernel, pointers, dict(BLOCK_Q=256, WHOLE=True, **kwargs), warps, stages,
                            unit_strides=("s_x_p", "s_B_n", "s_o_n", "s_dt_q", "s_dA_q"),
                            not_multiples_of_16=("nchunks", "heads_per_group", "tuning_size"))


def compile_walk(config: dict, dtype: str = "bf16"):
    """model/chunk_walk_kernel.py's kernel at the 1.3B shapes (headdim 64, state 128, whole chunks), one launch
    config as chunk_walk_kernel.default_config gives it."""
    from model.chunk_walk_kernel import _walk_kernel

    constants = {"HAS_D": True, "BLOCK_N": 128, "WHOLE": True, "APPROX_DIVISION": True, "CHUNK": config["CHUNK"],
                 "BLOCK_P": config["BLOCK_P"]}
    return compile_for_h100(_walk_kernel, _walk_pointers(dtype), constants, config["num_warps"], config["num_stages"],
                            unit_strides=("s_x_p", "s_B_n", "s_C_n", "s_z_p", "s_o_p"),
                            not_multiples_of_16=WALK_NOT_MULTIPLES_OF_16)


def compile_walk_async(config: dict, dtype: str = "bf16"):
    """model/chunk_walk_async.py's kernel at the 1.3B shapes, one launch config (CHUNK, BLOCK_P)."""
    from model.chunk_walk_async import _walk_async_kernel

    constants = {"HAS_D": True, "BLOCK_N": 128, "CHUNK": config["CHUNK"], "BLOCK_P": config["BLOCK_P"]}
    return compile_for_h100(_walk_async_kernel, _walk_pointers(dtype), constants, 4, 1,
                            not_multiples_of_16=WALK_NOT_MULTIPLES_OF_16)


# both walks' arguments: the same pointers, and these integers not multiples of 16 at the 1.3B shapes
WALK_NOT_MULTIPLES_OF_16 = ("heads_per_group", "s_ss_h", "s_ss_l")


def _walk_pointers(dtype: str) -> dict[str, str]:
    """The walks' pointer arguments, typed: fp32 decays, keys, D, norm weight and sums; `dtype` for the rest."""
    pointers = {name: "*fp32" for name in ("key_ptr", "dA_ptr", "D_ptr", "weight_ptr", "sumsq_ptr")}
    return pointers | {name: f"*{dtype}" for name in ("x_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr")}


def _cuobjdump(compiled, flag: str) -> str:
    """cuobjdump (bundled with Triton) run on a compiled kernel's binary with `flag`: its output."""
    import triton
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return subprocess.run([str(cuobjdump), flag, str(cubin)], capture_output=True, text=True, check=True).stdout


def registers_and_spills(compiled) -> tuple[int, int]:
    """(registers per thread, bytes of stack per thread) of a compiled kernel, from its binary."""
    out = _cuobjdump(compiled, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-300:]}")
    return int(found.group(1)), int(found.group(2))


def sass_instructions(compiled) -> list[tuple[int, str]]:
    """(address, text) of every instruction in a compiled kernel's SASS (cuobjdump -sass), in order."""
    return [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", _cuobjdump(compiled, "-sass"))]


def _opcode(text: str) -> str:
    return re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", text).group(1)


def loop_bodies(instructions) -> list[range]:
    """The index ranges of each loop body, in program order: a loop is a branch back to an earlier address,
    its body the instructions from there to the branch. Not loops: a branch back into the middle of a loop
    from past its end (a barrier wait's retry path, placed after the kernel's exit, as TMA copies have), and
    the retry itself, a wait on the barrier and the branch back to it, which issues only while a copy is in
    flight."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    branches = []
    for i, (address, text) in enumerate(instructions):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
            branches.append(range(index[int(target.group(1), 16)], i + 1))
    return [body for body in branches
            if not any(other.start < body.start < other.stop < body.stop for other in branches)
            and not (len(body) <= 3 and any("PHASECHK" in instructions[i][1] for i in body))]


def loop_opcodes(compiled) -> list[collections.Counter]:
    """The opcodes of each loop body, in program order. An iteration issues these once per warp, so their
    count is the loop's cost in issue slots."""
    return _loop_opcodes(sass_instructions(compiled))


def _loop_opcodes(instructions) -> list[collections.Counter]:
    return [collections.Counter(_opcode(instructions[i][1]) for i in body) for body in loop_bodies(instructions)]


def _outside_loops(instructions) -> int:
    """The instructions a warp issues once per program: all but the loops' bodies, the padding (NOP) and
    the closing branch to itself."""
    in_loops = {i for body in loop_bodies(instructions) for i in body}
    return sum(1 for i, (address, text) in enumerate(instructions)
               if i not in in_loops and _opcode(text) != "NOP" and not text.startswith(f"BRA {hex(address)}"))


def resident_programs(registers: int, shared: int, warps: int) -> dict:
    """How many programs of `warps` warps, each thread with `registers` registers and the program with
    `shared` bytes of shared memory, fit on one SM at a time, and what limits that."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    limits = {"registers": REGISTERS_PER_SM // (per_warp * warps),
              "shared memory": SHARED_MEMORY_PER_SM // (shared + SHARED_RESERVED),
              "warps": WARPS_PER_SM // warps, "programs": PROGRAMS_PER_SM}
    programs = min(limits.values())
    return {"programs_per_sm": programs, "warps_per_sm": programs * warps,
            "limited_by": " and ".join(k for k, v in limits.items() if v == programs)}


def config_rows(extra_scan_out_configs=(), extra_state_configs=()) -> list[dict]:
    """One row per kernel, launch config and gate: the autotune lists' configs and the extra ones, bf16."""
    from bench import state_pass
    from bench.scan_output import as_launch_config, config_name
    from model import chunk_scan_kernel, state_pass_kernel

    rows = []
    scan_out = [(c, "list") for c in map(as_launch_config, chunk_scan_kernel._autotuned_kernel.configs)]
    for config, source in scan_out + [(c, "extra") for c in extra_scan_out_configs]:
        kwargs = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages", "maxnreg")}
        for gated in (False, True):
            compiled = compile_scan_out(kwargs, config["num_warps"], config["num_stages"], gated=gated,
                                        maxnreg=config.get("maxnreg"))
            rows.append(usage_row("scan_out, gated" if gated else "scan_out", config_name(config), source, compiled,
                                  config["num_warps"]))
    listed = [(c, "list") for c in map(as_launch_config, state_pass_kernel._autotuned_kernel.configs)]
    for config, source in listed + [(c, "extra") for c in extra_state_configs]:
        kwargs = {k: config[k] for k in ("BLOCK_P", "BLOCK_N")}
        rows.append(usage_row("state_pass", state_pass.config_name(config), source,
                              compile_state_pass(kwargs, config["num_warps"], config["num_stages"]),
                              config["num_warps"]))
    from bench.scan_walk import config_name as walk_config_name
    from model.chunk_walk_kernel import default_config
    for config in {walk_config_name(c): c for c in (default_config(b, 32, 64) for b in (1, 2, 4))}.values():
        rows.append(usage_row("scan_walk", walk_config_name(config), "model", compile_walk(config),
                              config["num_warps"]))
        if config["BLOCK_P"] <= 32:   # where the walk's asynchronous form runs instead (chunk_walk_async.usable)
            rows.append(usage_row("walk_async", f"chunk {config['CHUNK']}, P block {config['BLOCK_P']}, 4w", "model",
                                  compile_walk_async(config), 4))
    return rows


def usage_row(kernel: str, config: str, source: str, compiled, warps: int) -> dict:
    registers, spilled = registers_and_spills(compiled)
    shared = compiled.metadata.shared
    instructions = sass_instructions(compiled)   # disassembled once for both counts
    loops = " / ".join(str(sum(opcodes.values())) for opcodes in _loop_opcodes(instructions))
    return {"kernel": kernel, "config": config, "source": source, "registers": registers, "stack_bytes": spilled,
            "shared_KiB": shared / 1024, **resident_programs(registers, shared, warps), "loop_instructions": loops,
            "other_instructions": _outside_loops(instructions)}


COLUMNS = [("kernel", "kernel", ""), ("config", "config", ""), ("in", "source", ""), ("registers", "registers", "d"),
           ("stack (bytes)", "stack_bytes", "d"), ("shared (KiB)", "shared_KiB", ".1f"),
           ("programs / SM", "programs_per_sm", "d"), ("warps / SM", "warps_per_sm", "d"),
           ("limited by", "limited_by", ""), ("loop instructions", "loop_instructions", ""),
           ("other instructions", "other_instructions", "d")]
NOTES = [("bf16, the 1.3B shapes (64 heads x 64, state 128, chunk 256); sm_90: 65,536 registers, 228 KiB of shared "
          "memory (1 KiB of it reserved per program), 64 warps and 32 programs per SM"),
         "stack: bytes per thread the compiler spilled from registers (0: none)",
         ("loop instructions: SASS instructions of each loop's body, what one iteration issues per warp (scan_out: "
          "the key blocks up to the row block's diagonal, in one loop; whole chunks, as at 32K tokens); other "
          "instructions: those outside the loops, which each warp issues once per program"),
         ("in: list = the autotuner's list, extra = --extra-configs or --extra-state-configs, model = the walk's "
          "configs for a head's channels in four, two and one blocks (chunk_walk_kernel.default_config); its loop is "
          "the walk over 64-step chunks")]


def plot(rows: list[dict], head: dict, path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(rows)), [r["warps_per_sm"] for r in rows],
           color=["C1" if r["stack_bytes"] else "C0" for r in rows])
    ax.set_xticks(range(len(rows)), [f"{r['kernel']} {r['config']}" for r in rows], rotation=75, fontsize=7)
    ax.set_ylabel("resident warps per SM (of 64)")
    ax.set_title("orange: spills registers", fontsize=8)
    common.save_figure(fig, head, "resident warps per SM", path)


def main(argv: list[str] | None = None) -> int:
    from bench.scan_output import parse_config
    from bench.state_pass import parse_config as parse_state_config

    ap = argparse.ArgumentParser(prog="python -m bench.kernel_resources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--extra-configs", nargs="+", type=parse_config, default=[],
                    help="more launch configs of the scan's output kernel, "
                         "BLOCK_MxBLOCK_K:warps:stages[:heads[:registers per thread]]")
    ap.add_argument("--extra-state-configs", nargs="+", type=parse_state_config, default=[],
                    help="more launch configs of state_pass, BLOCK_PxBLOCK_N:warps:stages")
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    ap.add_argument("--plot-only", action="store_true", help="redraw OUT/kernel_resources.png from its JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        return common.replot(args.out, "kernel_resources", plot)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # the default the kernels are launched with
    head = common.header(torch.device("cpu"), "bench.kernel_resources", target="sm_90 (H100 / H200), compiled here")
    rows = config_rows(args.extra_configs, args.extra_state_configs)
    text = [f"## Resources per launch config, sm_90 — compiled on {head['card']}", "",
            *[f"- {line}" for line in common.header_lines(head)], "", common.markdown_table(COLUMNS, rows), "",
            *[f"- {n}" for n in NOTES]]
    common.save_and_print(args.out, "kernel_resources", head, rows, "\n".join(text) + "\n", plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
