"""The 0.5B / 1.3B configs reduce the gradients once per optimizer step, whatever grad_accum is.

DeepSpeed's ZeRO-2 reduces (and partitions) the gradients in every micro-batch's backward: grad_accum
reductions per step, where ZeRO-1 reduces once, at the last micro-batch. Checked with the configs' own
`parallel` section on a tiny model, 2 processes (gloo): the collective bytes of one step at grad_accum 4
must equal those at grad_accum 1; ZeRO-2 is shown to break that.
"""
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

PROBE = r"""
import collections, itertools, json, sys, torch, torch.distributed as tdist
from dtrain import engine as dengine
from dtrain.config import load_config
from dtrain.loop import to_device, train_step
from model.diffusion import mask_batch

class NoMetrics:
    def add_stats(self, stats):
        pass

sent = collections.Counter()
for name in ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_gather_into_tensor"):
    def counted(*args, _fn=getattr(tdist, name), **kwargs):
        tensor = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
        sent["bytes"] += tensor.numel() * tensor.element_size()
        return _fn(*args, **kwargs)
    setattr(tdist, name, counted)

dengine.setup_distributed()
parallel = json.loads(sys.argv[1])
out = {}
for ga in (1, 4):
    cfg = load_config("configs/tiny_cpu.yaml", ["data.seq_len=64", "train.micro_batch_size=2", f"train.grad_accum={ga}",
                                                "train.global_batch_size=null"]
                      + [f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in parallel.items()])
    trainee = dengine.build(cfg, cfg.model_config(512, 511), torch.device("cpu"))
    x0 = torch.randint(0, 511, (2, 64))
    batches = itertools.cycle([to_device(mask_batch(x0, seed=0, step=s, positions=torch.arange(2), global_batch_size=4,
                                                    mask_id=511), torch.device("cpu"), 511) for s in range(3)])
    train_step(trainee, batches, ga, False, NoMetrics())
    sent.clear()
    train_step(trainee, batches, ga, False, NoMetrics())
    out[ga] = sent["bytes"]
    trainee.engine.destroy()
if tdist.get_rank() == 0:
    print("BYTES" + json.dumps(out))
"""


def step_bytes(parallel: dict, tmp_path) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           json.dumps(parallel)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("BYTES", 1)[1].splitlines()[0])


@pytest.mark.slow
def test_large_configs_reduce_gradients_once_per_step(tmp_path):
    sections = {name: yaml.safe_load((REPO / "configs" / name).read_text())["parallel"]
                for name in [f"{size}_{fam}.yaml" for size in ("0p5b", "1p3b")
                             for fam in ("diffumamba", "diffumamba_h", "diffutran")]}
    parallel = sections["1p3b_diffumamba_h.yaml"]
    assert all(s == parallel for s in sections.values()), sections
    got = step_bytes({k: v for k, v in parallel.items() if k in ("zero_stage", "overlap_comm")}, tmp_path)
    assert got["4"] == got["1"] > 0, got
    zero2 = step_bytes({"zero_stage": 2}, tmp_path)
    assert zero2["4"] > 2 * zero2["1"], zero2         # what ZeRO-2 would cost: a reduction per micro-batch
