"""A training step waits for the device only at the optimizer step, not once per micro-batch."""
import json
import os
import subprocess
import sys

from conftest import REPO

# Counts the aten ops of train_step that need a tensor's value on the host (on a GPU the host then waits
# for the device and cannot queue the next micro-batch ahead of it), with the trainer's engine (ZeRO-2,
# bf16 autocast) on the CPU.
PROBE = r"""
import collections, itertools, json, torch
from torch.utils._python_dispatch import TorchDispatchMode
from dtrain import engine as dengine
from dtrain.config import load_config
from dtrain.loop import to_device, train_step
from model.diffusion import mask_batch
SYNCING = {"nonzero", "_local_scalar_dense", "is_nonzero", "masked_select", "equal"}

class NoMetrics:
    def add_stats(self, stats):
        pass

class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))

dengine.setup_distributed()
counts = {}
for ga in (1, 4):
    cfg = load_config("configs/tiny_cpu.yaml", ["data.seq_len=64", "train.micro_batch_size=2", f"train.grad_accum={ga}",
                                                "train.global_batch_size=null", "train.precision=bf16",
                                                "parallel.zero_stage=2"])
    model_cfg = cfg.model_config(512, 511)
    trainee = dengine.build(cfg, model_cfg, torch.device("cpu"))
    x0 = torch.randint(0, 511, (2, 64))
    batches = itertools.cycle([to_device(mask_batch(x0, seed=0, step=s, positions=torch.arange(2), global_batch_size=2,
                                                    mask_id=511), torch.device("cpu"), 511) for s in range(3)])
    train_step(trainee, batches, ga, False, NoMetrics())
    with Recorder() as recorder:
        train_step(trainee, batches, ga, False, NoMetrics())
    counts[ga] = dict(recorder.seen)
print("COUNTS" + json.dumps(counts))
"""


def test_a_training_step_waits_for_the_device_only_at_the_optimizer_step():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads(proc.stdout.split("COUNTS", 1)[1])
    assert counts["4"] == counts["1"], counts          # nothing per micro-batch: 4 micro-batches wait as 1 does
    assert not {"nonzero", "masked_select"} & set(counts["4"]), counts
