"""slurm/pretrain_1p3b.sh on a real two-node Slurm cluster, with the real trainer on CPU (gloo)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from slurmjob import REPO, assert_state, job_info, sbatch, tiny_overrides, wait_log, wait_state

SCRIPT = str(REPO / "slurm" / "pretrain_1p3b.sh")
STEPS = 16
# What the tests change from the script's #SBATCH defaults: two nodes, a time limit far from the
# --signal lead time (600 s), and one CPU process per node with gloo.
SBATCH = ["--nodes=2", "--time=30"]


def launcher_env(job_env: dict, out: Path, **extra: str) -> dict:
    return {**job_env, "DTRAIN_CONFIG": "configs/tiny_cpu.yaml", "DTRAIN_NPROC_PER_NODE": "1",
            "DTRAIN_BACKEND": "gloo", "DTRAIN_OUTPUT": str(out),
            "DTRAIN_OVERRIDES": " ".join(tiny_overrides(STEPS)), **extra}


def submit(job_env: dict, workdir: Path, **extra: str) -> tuple[str, dict, Path]:
    """sbatch the launcher from workdir; returns (job id, its env, its log %x-%j.out)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = launcher_env(job_env, workdir / "out", **extra)
    job_id = sbatch(env, workdir, *SBATCH, SCRIPT)
    return job_id, env, workdir / f"dtrain-1p3b-{job_id}.out"


def final_line(text: str) -> tuple[str, str]:
    """The last step's log line ("step N/N | loss ...") and the summary ("done: N steps, T tokens")."""
    step = re.findall(rf"^.*step {STEPS}/{STEPS} \| loss \S+", text, re.MULTILINE)
    done = re.findall(r"done: \d+ steps, \d+ tokens", text)
    assert step and done, f"no final step / done line in:\n{text[-3000:]}"
    return step[-1].split("step ", 1)[1], done[-1]


@pytest.fixture(scope="module")
def uninterrupted(job_env, tmp_path_factory):
    """One uninterrupted two-node run: the reference for the interrupted one."""
    job_id, env, log = submit(job_env, tmp_path_factory.mktemp("uninterrupted"),
                              DTRAIN_ACTIVATE='echo "site setup on $(hostname)"')
    info = wait_state(env, job_id, log, timeout=180)
    return job_id, info, log, log.parent / "out"


def test_two_nodes_train_one_model(uninterrupted, slurm_cluster):
    job_id, info, log, out = uninterrupted
    assert_state(info, "COMPLETED", log)
    text = log.read_text()
    # one torchrun per node, one rendezvous, one world of two ranks
    n1, n2 = slurm_cluster.node_names
    assert re.search(rf"\[dtrain-slurm \S+ {n1}\] node 0/2", text), text
    assert re.search(rf"\[dtrain-slurm \S+ {n2}\] node 1/2", text), text
    assert "world 2 = 2 data-parallel" in text
    assert f"0: site setup on {n1}" in text and f"1: site setup on {n2}" in text   # DTRAIN_ACTIVATE, per node
    assert re.search(r"step 1/\d+ \| loss \d+\.\d+", text), "no loss logged"
    assert final_line(text)[1] == f"done: {STEPS} steps, {STEPS * 32 * 128} tokens"
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step{STEPS:08d}"
    assert (ckpt / f"step{STEPS:08d}" / "COMPLETE").is_file()
    # per-job log dir: the launch record and each node's per-rank logs
    logdir = log.parent / "logs" / f"dtrain-1p3b-{job_id}"
    assert (logdir / "launch-restart0.txt").is_file()
    for node in (n1, n2):
        assert list((logdir / "restart0" / node).rglob("stdout.log")), f"no rank logs for {node}"


def test_signal_checkpoints_requeues_and_resumes(job_env, tmp_path, uninterrupted):
    job_id, env, log = submit(job_env, tmp_path)
    wait_log(env, job_id, log, r"step 1/\d+ \| loss", timeout=120)
    # What Slurm does at --signal=B:USR1@600 before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True, timeout=30)
    info = wait_state(env, job_id, log, timeout=180)
    assert_state(info, "COMPLETED", log)
    assert info["Restarts"] == "1", f"expected one requeue, got Restarts={info['Restarts']}"
    text = log.read_text()
    first, second = text.split("requeueing job", 1)
    saved = re.search(r"PREEMPTED: received SIGUSR1; checkpoint \S+/(step(\d+)) saved at step (\d+)", first)
    assert saved, f"no checkpoint on SIGUSR1 before the requeue:\n{first[-3000:]}"
    tag, step = saved.group(1), int(saved.group(3))
    assert 1 <= step < STEPS
    assert re.search(rf"resumed from \S+/{tag} at step {step}", second), second[-3000:]
    assert f"step {step + 1}/{STEPS} | loss" in second and f"step {step}/{STEPS} | loss" not in second
    # the same end as the uninterrupted run: same step count and tokens, and the same last loss
    assert final_line(second) == final_line(uninterrupted[2].read_text())


@pytest.mark.parametrize("setting, message", [
    ({"DTRAIN_CONFIG": "configs/no_such_config.yaml"}, "config file not found"),
    ({"DTRAIN_DATA": "/nonexistent/dataset"}, "data path not found: /nonexistent/dataset"),
    ({"DTRAIN_MASTER_ADDR": "no-such-host.invalid"}, "master address no-such-host.invalid does not resolve"),
    ({"DTRAIN_OVERRIDES": "train.no_such_field=1"}, "unknown field(s) ['no_such_field']"),
])
def test_preflight_fails_fast(job_env, tmp_path, setting, message):
    t0 = time.monotonic()
    job_id, env, log = submit(job_env, tmp_path, **setting)
    info = wait_state(env, job_id, log, timeout=60)
    assert_state(info, "FAILED", log)
    assert message in log.read_text(), log.read_text()
    assert "node 0/2" not in log.read_text(), "the nodes were started despite the failed check"
    assert time.monotonic() - t0 < 30


def test_unreachable_master_fails_within_timeout(job_env, tmp_path, slurm_cluster):
    # An address in the cluster's subnet that no node has: resolvable, but nobody answers.
    job_id, env, log = submit(job_env, tmp_path, DTRAIN_MASTER_ADDR=f"{slurm_cluster.subnet}.200",
                              DTRAIN_STORE_TIMEOUT="5", DTRAIN_RDZV_TIMEOUT="10")
    info = wait_state(env, job_id, log, timeout=60)
    assert_state(info, "FAILED", log)
    assert "RendezvousConnectionError" in log.read_text()


def test_dead_node_fails_the_job(job_env, tmp_path, slurm_cluster):
    job_id, env, log = submit(job_env, tmp_path, DTRAIN_OVERRIDES=" ".join(tiny_overrides(1000)))
    wait_log(env, job_id, log, r"step 1/\d+ \| loss", timeout=120)
    node = slurm_cluster.node_names[1]
    # The second node's launcher and trainer die at once, as with a crashed node.
    killed = []
    for pid in subprocess.run(["ip", "netns", "pids", node], text=True, capture_output=True,
                              check=False).stdout.split():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "torch.distributed.run" in cmd or "dtrain.cli" in cmd:
            os.kill(int(pid), signal.SIGKILL)
            killed.append(pid)
    assert killed, f"no trainer processes found on {node}"
    t0 = time.monotonic()
    info = wait_state(env, job_id, log, timeout=60)
    assert_state(info, "FAILED", log)
    assert time.monotonic() - t0 < 30, "the surviving node did not stop promptly"
    assert re.search(rf"srun: error: {node}: task 1: Killed", log.read_text()), log.read_text()[-3000:]
    assert job_info(env, job_id).get("Restarts") == "0"
