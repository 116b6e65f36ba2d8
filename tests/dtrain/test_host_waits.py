"""A training step waits for the device only at the optimizer step, not once per micro-batch."""
import json

from conftest import run_probe

# Counts the aten ops of train_step that need a tensor's value on the host (on a GPU the host then waits
# for the device and cannot queue the next micro-batch ahead of it), with the trainer's engine (ZeRO-2,
# bf16 autocast) on the CPU.
PROBE = r"""
import collections, json
from torch.utils._python_dispatch import TorchDispatchMode
SYNCING = {"nonzero", "_local_scalar_dense", "is_nonzero", "masked_select", "equal"}

class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))

counts = {}
for ga in (1, 4):
    trainee = tiny_engine(f"train.grad_accum={ga}", "train.precision=bf16", "parallel.zero_stage=2")
    batches = masked_batches(global_batch_size=2)
    train_step(trainee, batches, ga, False, NoMetrics())
    with Recorder() as recorder:
        train_step(trainee, batches, ga, False, NoMetrics())
    counts[ga] = dict(recorder.seen)
print("COUNTS" + json.dumps(counts))
"""


def test_a_training_step_waits_for_the_device_only_at_the_optimizer_step(tmp_path):
    counts = json.loads(run_probe(PROBE, tmp_path).split("COUNTS", 1)[1])
    assert counts["4"] == counts["1"], counts          # nothing per micro-batch: 4 micro-batches wait as 1 does
    assert not {"nonzero", "masked_select"} & set(counts["4"]), counts
