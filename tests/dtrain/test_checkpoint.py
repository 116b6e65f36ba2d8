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
    """As DeepSpeed's universal load leaves them: one CPU step tensor shared by every parameter. A fused
    (or capturable) group needs float32 steps on its parameters' device (meta here, standing for cuda);
    a plain group keeps them on the CPU. Every parameter gets its own tensor of the same value."""
    shared = torch.tensor(24.0, dtype=torch.float64)
    fused_params = [torch.nn.Parameter(torch.empty(3, device="meta")) for _ in range(2)]
    plain_params = [torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.SGD(plain_params, lr=0.1)            # any Optimizer: groups and state are what matter
    opt.param_groups = [{"params": fused_params, "fused": True}, {"params": plain_params, "fused": None}]
    opt.state = {p: {"step": shared, "exp_avg": None} for p in fused_params + plain_params}
    place_adam_steps(opt)
    steps = [opt.state[p]["step"] for p in fused_params + plain_params]
    assert [(s.device.type, s.dtype) for s in steps] == [("meta", torch.float32)] * 2 + [("cpu", torch.float64)]
    assert len({id(s) for s in steps} | {id(shared)}) == 4 and steps[2].item() == 24.0
    steps[2].add_(1)                                       # an in-place Adam increment touches one parameter
    assert shared.item() == 24.0


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
    ckpts = tmp_path / "sig" / "checkpoints"
    tag = (ckpts / LATEST).read_text()
    assert (ckpts / tag / MARKER).is_file() and int(tag[4:]) >= 3
