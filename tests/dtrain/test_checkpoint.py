"""Which checkpoint a resume picks, and a clean stop on SIGUSR1 (what Slurm sends before a time limit)."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, base_config, train_command

from dtrain.checkpoint import LATEST, MARKER, place_adam_steps, resolve


def make(root: Path, step: int, complete: bool) -> Path:
    p = root / f"step{step:08d}"
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (p / MARKER).write_text("{}")
    return p


def test_resolve_skips_incomplete(tmp_path):
    assert resolve("auto", tmp_path) is None and resolve(None, tmp_path) is None
    a = make(tmp_path, 4, True)
    b = make(tmp_path, 8, False)                      # torn write
    (tmp_path / LATEST).write_text(b.name)            # even if `latest` names it
    assert resolve("auto", tmp_path) == a
    (tmp_path / LATEST).unlink()
    assert resolve("auto", tmp_path) == a
    assert resolve(str(a), tmp_path) == a
    assert resolve(str(tmp_path), tmp_path) == a      # a checkpoint root: its newest complete checkpoint
    with pytest.raises(RuntimeError, match="incomplete"):
        resolve(str(b), tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve(str(tmp_path / "nope"), tmp_path)


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError):
                pass
    return kids


@pytest.mark.slow
def test_adam_steps_after_a_universal_load_are_per_parameter_and_where_adamw_wants_them():
    """As DeepSpeed's universal load leaves them: one CPU step tensor shared by every parameter, including
    parameters that are in no group at the moment (ZeRO-3's swapped-out partitions). A fused (or capturable)
    AdamW needs float32 steps on the parameters' device (meta here, standing for cuda); a plain one keeps
    them where they are. Every parameter gets its own tensor of the same value."""
    def optimizer(fused, params, swapped_out):
        opt = torch.optim.SGD(params, lr=0.1)              # any Optimizer: groups and state are what matter
        opt.param_groups = [{"params": params, "fused": fused}]
        opt.state = {p: {"step": shared, "exp_avg": None} for p in params + swapped_out}
        return opt

    shared = torch.tensor(24.0, dtype=torch.float64)
    on_gpu = [torch.nn.Parameter(torch.empty(3, device="meta")) for _ in range(3)]
    fused = optimizer(True, on_gpu[:1], on_gpu[1:])
    place_adam_steps(fused)
    steps = [fused.state[p]["step"] for p in on_gpu]
    assert [(s.device.type, s.dtype) for s in steps] == [("meta", torch.float32)] * 3

    on_cpu = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    plain = optimizer(None, on_cpu[:1], on_cpu[1:])
    place_adam_steps(plain)
    steps = [plain.state[p]["step"] for p in on_cpu]
    assert [(s.device.type, s.dtype) for s in steps] == [("cpu", torch.float64)] * 3
    assert len({id(s) for s in steps} | {id(shared)}) == 4 and all(s.item() == 24.0 for s in steps)
    steps[2].add_(1)                                       # an in-place Adam increment touches one parameter
    assert shared.item() == 24.0 and steps[1].item() == 24.0


def test_sigusr1_on_one_rank_checkpoints_and_exits_cleanly(tmp_path, dataset):
    cfg = base_config(tmp_path / "sig", dataset, train={"steps": 100000, "eval_interval": 0},
                      checkpoint={"interval": 0}, logging={"num_samples": 0})
    cmd, env = train_command(cfg, tmp_path, nproc=2)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            break
        assert time.time() < deadline, "".join(lines[-50:])
    workers = [p for p in _children(proc.pid)
               if b"LOCAL_RANK=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGUSR1)                # only rank 1 gets it: the ranks must still agree
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out[-4000:]
    assert "PREEMPTED" in out and "--resume auto" in out
    assert "kernels on cpu: none | reference path: scan, " in out      # the banner says which path runs
    ckpts = tmp_path / "sig" / "checkpoints"
    tag = (ckpts / LATEST).read_text()
    assert (ckpts / tag / MARKER).is_file() and int(tag[4:]) >= 3


# A library that replaces the process's SIGUSR1 action below Python (as one does during the first training
# step on a GPU: docs/benchmarks.md, tenth run), emulated with libc's signal(): Python still reports its own
# handler, but the signal no longer reaches it. The trainer installs its handler again at every step.
SWALLOWING_WRAPPER = r"""
import ctypes, os, signal, sys
from dtrain import cli, loop
plain_step, steps = loop.train_step, [0]
def step(*args, **kwargs):
    steps[0] += 1
    if steps[0] == 1:
        ctypes.CDLL(None).signal(signal.SIGUSR1, ctypes.c_void_p(1))   # SIG_IGN, set below Python
    if steps[0] == 3:
        os.kill(os.getpid(), signal.SIGUSR1)
    return plain_step(*args, **kwargs)
loop.train_step = step
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigusr1_reaches_the_trainer_after_a_library_replaced_its_action(tmp_path, dataset):
    cfg = base_config(tmp_path / "swallow", dataset, train={"steps": 30, "eval_interval": 0},
                      checkpoint={"interval": 0, "save_final": False}, logging={"num_samples": 0, "log_interval": 5})
    cmd, env = train_command(cfg, tmp_path, nproc=1)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(SWALLOWING_WRAPPER)
    proc = subprocess.run([cmd[0], str(wrapper), *cmd[cmd.index("dtrain.cli") + 1:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the signal came before step 3; its flag is agreed a step later (LateAgreement; step 3 does not log)
    assert "PREEMPTED: received SIGUSR1" in proc.stdout and "saved at step 4" in proc.stdout, proc.stdout[-3000:]
    assert "step 1: SIGUSR1's action was replaced below Python by SIG_IGN" in proc.stdout
