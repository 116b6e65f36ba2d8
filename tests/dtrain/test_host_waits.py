"""A training step never waits for the device with the fused AdamW (dtrain/zero_step.py), and DeepSpeed's own
step waits only at the optimizer step, not once per micro-batch."""
import json
import re

from conftest import run_probe

# Counts the aten ops of train_step that need a tensor's value on the host (on a GPU the host then waits
# for the device and cannot queue the next micro-batch ahead of it), with the trainer's engine (ZeRO-2,
# bf16 autocast) on the CPU.
RECORDER = r"""
import json
from bench.zero_step_check import HostReads
from deepspeed.accelerator import get_accelerator

class Recorder(HostReads):
    # the aten ops that read a device value on the host, and DeepSpeed's device synchronizations (a no-op
    # on the CPU, a wait on a GPU)
    def __enter__(self):
        accelerator, synchronize = get_accelerator(), get_accelerator().synchronize
        def counted(*args, **kwargs):
            self.seen["accelerator.synchronize"] += 1
            return synchronize(*args, **kwargs)
        accelerator.synchronize, self.restore = counted, lambda: setattr(accelerator, "synchronize", synchronize)
        return super().__enter__()
    def __exit__(self, *exc):
        self.restore()
        return super().__exit__(*exc)

"""

PROBE = RECORDER + r"""
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


# With torch's fused AdamW (the default) the ZeRO step decides a skip on the device (dtrain/zero_step.py): the
# whole training step then never needs a value on the host. DeepSpeed's stock step (optim.fused=false) reads
# the gradient norm three times, which is what the probe must be able to see.
NO_WAIT_PROBE = RECORDER + r"""
counts = {}
for zero in (1, 2):
    for fused in ("true", "false"):
        trainee = tiny_engine("train.grad_accum=2", "train.precision=bf16", f"parallel.zero_stage={zero}",
                              f"optim.fused={fused}")
        batches = masked_batches(global_batch_size=2)
        train_step(trainee, batches, 2, False, NoMetrics())
        with Recorder() as recorder:
            train_step(trainee, batches, 2, False, NoMetrics())
        counts[f"zero{zero}-fused-{fused}"] = dict(recorder.seen)
print("COUNTS" + json.dumps(counts))
"""


def test_with_fused_adamw_a_training_step_never_waits_for_the_device(tmp_path):
    counts = json.loads(run_probe(NO_WAIT_PROBE, tmp_path).split("COUNTS", 1)[1])
    assert counts["zero1-fused-true"] == {} and counts["zero2-fused-true"] == {}, counts
    for zero in (1, 2):   # DeepSpeed's own step: is_invalid_grad_norm, once in step() and once per group
        assert sum(counts[f"zero{zero}-fused-false"].values()) >= 3, counts


# The loop's own work around a step (metrics, the flags' agreement across ranks) must not wait either: the
# steps of a loop wait exactly as often as train_step alone does. (The grad norm and the losses are read on
# the host at a log step, not here.)
LOOP_PROBE = RECORDER + r"""
from pathlib import Path
from dtrain.step_flags import LateAgreement
from dtrain.metrics import Metrics
trainee = tiny_engine("train.grad_accum=2", "train.precision=bf16", "parallel.zero_stage=1")
batches = masked_batches(global_batch_size=2)
metrics = Metrics(out_dir=str(Path.cwd()), enabled_tb=False, t_buckets=4, tokens_per_step=256, flops_per_token=1.0,
                  peak_flops_total=None, total_steps=10, device=torch.device("cpu"))
agreement = LateAgreement(torch.device("cpu"))
train_step(trainee, batches, 2, False, NoMetrics())
with Recorder() as alone:
    train_step(trainee, batches, 2, False, NoMetrics())
with Recorder() as looped:
    for _ in range(3):
        bad, norm = train_step(trainee, batches, 2, False, metrics)
        agreement.exchange([bad, False])
        metrics.add_step(grad_norm=norm, data_wait=0.0)
logged = metrics.log(3, lr=1e-3, total_skipped=0)
print("COUNTS" + json.dumps({"alone": dict(alone.seen), "looped": dict(looped.seen),
                             "logged": sorted(logged)}))
"""


def test_the_loops_bookkeeping_adds_no_waits(tmp_path):
    counts = json.loads(run_probe(LOOP_PROBE, tmp_path).split("COUNTS", 1)[1])
    assert counts["looped"] == {k: 3 * v for k, v in counts["alone"].items()}, counts
    assert "train/grad_norm" in counts["logged"] and "train/loss" in counts["logged"]


AGREEMENT_PROBE = r"""
import json
import torch.distributed as dist
from dtrain.step_flags import LateAgreement
agreement, rank = LateAgreement(torch.device("cpu")), dist.get_rank()
# step 1: rank 1 skipped it; step 2: rank 0 saw a stop signal; step 3: nothing
got = [agreement.exchange([rank == 1 and step == 1, rank == 0 and step == 2]) for step in (1, 2, 3)]
got += [agreement.collect(), agreement.collect()]
# one write, no newline needed: the two ranks' lines can interleave in torchrun's output
code = ",".join("N" if g is None else "".join("T" if f else "F" for f in g) for g in got)
print(f"RANK{rank}:{code}#", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_late_agreement_hands_out_each_steps_flags_agreed_one_step_later(tmp_path):
    out = run_probe(AGREEMENT_PROBE, tmp_path, nproc=2)
    got = dict(re.findall(r"RANK(\d):([NTF,]+)#", out))
    # None, then step 1's flags (rank 1 skipped), step 2's (rank 0's signal), step 3's; then nothing pending
    assert got == {"0": "N,TF,FT,FF,N", "1": "N,TF,FT,FF,N"}, out
