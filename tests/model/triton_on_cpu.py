"""Checking a Triton kernel of model/ without a GPU, the two ways the kernel tests use:

    interpreted(cases_module)   runs `python -m cases_module` under Triton's interpreter (TRITON_INTERPRET=1
                                must be set before Triton is imported, hence a process of its own) and
                                returns the JSON its last line prints
    compile_for_h100(...)       compiles a kernel for an H100 (sm_90) down to the binary, which the
                                interpreter does not do (shared memory, layouts, the loop's pipelining)
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_MEMORY_H100 = 227 * 1024
# the interpreted kernels' largest relative error from their float64 stand-ins, by input dtype
INTERPRETER_TOLERANCE = {"torch.float32": 1e-5, "torch.float16": 2e-3}


def interpreted(cases_module: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-m", cases_module], cwd=ROOT, env=env, check=False,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def compile_for_h100(kernel, pointers: dict[str, str], constants: dict, warps: int, stages: int,
                     unit_strides=(), not_multiples_of_16=()):
    """kernel (a triton.jit function) compiled for sm_90 as a launch at the 1.3B shapes specialises it:
    pointers (name -> "*bf16" etc.), constants (its constexprs), unit_strides (arguments that are 1 there,
    fixed as constants), and every other argument an i32 that the launch sees divisible by 16 (pointers,
    strides, sizes such as headdim 64, state 128, chunk 256), but for not_multiples_of_16. Without that
    the loads do not vectorise, the loop does not pipeline them, and the shared memory counted is a third
    to a half of a real launch's."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {**constants, **dict.fromkeys(unit_strides, 1)}
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in constants else pointers.get(p, "i32") for p in params}
    multiples_of_16 = [p for p in params if p not in constants and p not in not_multiples_of_16]
    source = ASTSource(fn=kernel, signature=signature, constexprs={(params.index(n),): v for n, v in constants.items()},
                       attrs={(params.index(p),): [["tt.divisibility", 16]] for p in multiples_of_16})
    compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"], constants
    return compiled
