"""Checking a Triton kernel of model/ without a GPU: under Triton's interpreter here,

    interpreted(cases_module)   runs `python -m cases_module` under Triton's interpreter (TRITON_INTERPRET=1
                                must be set before Triton is imported, hence a process of its own) and
                                returns the JSON its last line prints
and by bench.kernel_resources' compile_for_h100, which compiles a kernel for an H100 (sm_90) down to the
binary as a launch at the 1.3B shapes specialises it: what the interpreter does not do (shared memory,
registers, layouts, the loop's pipelining).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the interpreted kernels' largest relative error from their float64 stand-ins, by input dtype
INTERPRETER_TOLERANCE = {"torch.float32": 1e-5, "torch.float16": 2e-3}


def interpreted(cases_module: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-m", cases_module], cwd=ROOT, env=env, check=False,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
