"""`dtrain submit` (submitit) on the real two-node Slurm test cluster: train, preempt, requeue, resume."""
from __future__ import annotations

import re
import subprocess
import sys

from slurmjob import REPO, assert_state, tiny_overrides, wait_log, wait_state

STEPS = 16


def test_submitit_trains_requeues_and_resumes(job_env, tmp_path, slurm_cluster):
    cmd = [sys.executable, "-m", "dtrain.submit", "submit", "--config", str(REPO / "configs/tiny_cpu.yaml"),
           "--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1",
           "--timeout-min", "30", "--folder", str(tmp_path / "submitit/%j"),
           f"run.out_dir={tmp_path / 'out'}", *tiny_overrides(STEPS)]
    out = subprocess.run(cmd, env=job_env, cwd=tmp_path, text=True, capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"dtrain submit: job (\d+)", out.stdout).group(1)
    folder = tmp_path / "submitit" / job_id
    rank0, rank1 = folder / f"{job_id}_0_log.out", folder / f"{job_id}_1_log.out"

    wait_log(job_env, job_id, rank0, r"step 1/\d+ \| loss", timeout=120)
    # submitit's pre-timeout signal, as Slurm sends it to every process of the job (--signal=USR2@...)
    subprocess.run(["scancel", "--signal=USR2", job_id], env=job_env, check=True, timeout=30)
    info = wait_state(job_env, job_id, rank0, timeout=180)
    assert_state(info, "COMPLETED", rank0)
    assert info["Restarts"] == "1", f"expected one requeue, got Restarts={info['Restarts']}"

    text = rank0.read_text()
    n1, n2 = slurm_cluster.node_names
    assert f"hostname={n1}, local_rank=0(1), node=0(2), global_rank=0(2)" in text
    assert f"hostname={n2}, local_rank=0(1), node=1(2), global_rank=1(2)" in rank1.read_text()
    assert "world 2 = 2 data-parallel" in text
    saved = re.search(r"PREEMPTED: received SIGUSR1; checkpoint \S+/(step\d+) saved at step (\d+)", text)
    assert saved, text[-3000:]
    assert "Requeued job" in text
    assert re.search(rf"resumed from \S+/{saved.group(1)} at step {saved.group(2)}", text), text[-3000:]
    assert f"done: {STEPS} steps, {STEPS * 32 * 128} tokens" in text
    assert (tmp_path / "out" / "checkpoints" / f"step{STEPS:08d}" / "COMPLETE").is_file()
