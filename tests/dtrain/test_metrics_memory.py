"""Every rank's peak device memory reaches the log: the fullest rank in TensorBoard and the console line,
each rank's in a line printed whenever it changes (pipeline stages differ; a graph pool can fill one)."""
import json
import re

from conftest import run_probe

# Rank r reports (allocated, reserved) = (10 + r, 20 + 3 r) GiB at the first log, one GiB more reserved on
# rank 0 at the second, the same again at the third.
PROBE = r"""
import json
import torch.distributed as dist
from pathlib import Path
from dtrain.metrics import Metrics
rank, readings = dist.get_rank(), iter([0.0, 1.0, 1.0])
def reader(device):
    return 10.0 + rank, 20.0 + 3 * rank + (next(readings) if rank == 0 else 0.0)
metrics = Metrics(out_dir=str(Path.cwd()), enabled_tb=False, t_buckets=2, tokens_per_step=8, flops_per_token=1.0,
                  peak_flops_total=None, total_steps=3, device=torch.device("cpu"), memory_reader=reader)
logged = []
for step in (1, 2, 3):
    metrics.add_step(grad_norm=None, data_wait=0.0)
    out = metrics.log(step, lr=1e-3, total_skipped=0)
    logged.append([out["perf/gpu_mem_gib"], out["perf/gpu_reserved_gib"]])
print(f"LOGGED{rank}:" + json.dumps(logged) + "#", flush=True)
"""


def test_the_log_carries_every_ranks_peak_memory(tmp_path):
    out = run_probe(PROBE, tmp_path, nproc=2)
    logged = {int(r): json.loads(v) for r, v in re.findall(r"LOGGED(\d):(\[.*?\])#", out)}
    # the maxima over ranks: allocated 11 (rank 1); reserved max(20, 23) = 23, then max(21, 23) = 23
    assert logged == {0: [[11.0, 23.0]] * 3, 1: [[11.0, 23.0]] * 3}, out
    lines = re.findall(r"peak memory per rank \(GiB allocated/reserved\): (.*)", out)
    assert lines == ["0: 10.0/20.0, 1: 11.0/23.0", "0: 10.0/21.0, 1: 11.0/23.0"], out   # not again at step 3
    assert len(re.findall(r"\| mem 11\.0/23\.0 GiB", out)) == 3, out
