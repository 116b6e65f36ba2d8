"""Submitting to the test cluster and waiting on jobs, with bounded waits that say what they saw."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}


def sbatch(env: dict, cwd: Path, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, text=True,
                         capture_output=True, timeout=30, check=False)
    assert out.returncode == 0, f"sbatch {' '.join(args)} failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_info(env: dict, job_id: str) -> dict:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, text=True,
                         capture_output=True, timeout=30, check=False).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _explain(env: dict, job_id: str, log: Path) -> str:
    info = job_info(env, job_id)
    state = {k: info.get(k) for k in ("JobState", "Reason", "Restarts", "ExitCode", "NodeList")}
    squeue = subprocess.run(["squeue", "-a"], env=env, text=True, capture_output=True, check=False).stdout
    return f"job {job_id}: {state}\nsqueue:\n{squeue}\n--- tail of {log} ---\n{tail(log)}"


def wait_state(env: dict, job_id: str, log: Path, timeout: float) -> dict:
    """Wait until the job reaches a final state; returns its scontrol fields."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in FINAL:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout:.0f}s\n{_explain(env, job_id, log)}")


def wait_log(env: dict, job_id: str, log: Path, pattern: str, timeout: float) -> re.Match:
    """Wait until the log matches `pattern` (fails early if the job ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            m = re.search(pattern, log.read_text(errors="replace"), re.MULTILINE)
            if m:
                return m
        if job_info(env, job_id).get("JobState") in FINAL:
            break
        time.sleep(0.3)
    raise AssertionError(f"no /{pattern}/ in the log of job {job_id} within {timeout:.0f}s\n"
                         f"{_explain(env, job_id, log)}")


def assert_state(info: dict, state: str, log: Path) -> None:
    assert info.get("JobState") == state, (
        f"job {info.get('JobId')} ended {info.get('JobState')} (expected {state}), "
        f"exit code {info.get('ExitCode')}\n--- tail of {log} ---\n{tail(log)}")


def tiny_overrides(steps: int) -> list[str]:
    """configs/tiny_cpu.yaml made quick: no eval, no samples, a log line every step; the built-in
    corpus where `dtrain train --config configs/tiny_cpu.yaml` keeps it (built once, then cached)."""
    return [f"train.steps={steps}", "train.eval_interval=0", "logging.num_samples=0",
            "logging.tensorboard=false", "logging.log_interval=1", "checkpoint.interval=0",
            f"data.default_root={REPO / '.cache' / 'builtin_data'}"]
