"""train.cuda_graphs in the trainer's engine: the model's trunk gets model/train_graphs after
deepspeed.initialize, with the run's autocast dtype. On the CPU it trains eagerly, step for step as without
(the GPU comparison is bench/gpu_validate.py's)."""
import json

from conftest import run_probe

PROBE = r"""
import json
from model.train_graphs import TrainingGraphs
out = {}
for graphs in ("false", "true"):
    torch.manual_seed(0)
    trainee = tiny_engine("train.precision=bf16", "train.grad_accum=2", f"train.cuda_graphs={graphs}")
    module = trainee.engine.module
    batches = masked_batches(4)
    norms = [train_step(trainee, batches, 2, False, NoMetrics())[1] for _ in range(3)]
    tg = module.trunk_graphs
    out[graphs] = {"norms": norms, "weights": sum(p.double().sum().item() for p in module.parameters()),
                   "graphs": type(tg).__name__ if tg is not None else None,
                   "dtype": str(getattr(tg, "autocast_dtype", None)), "captured": getattr(tg, "captured", None) is not None}
print("OUT" + json.dumps(out))
"""


def test_engine_enables_trunk_graphs_and_trains_as_without_on_the_cpu(tmp_path):
    out = json.loads(run_probe(PROBE, tmp_path).split("OUT", 1)[1])
    assert out["false"]["graphs"] is None
    assert out["true"] == {**out["true"], "graphs": "TrainingGraphs", "dtype": "torch.bfloat16", "captured": False}
    assert out["true"]["norms"] == out["false"]["norms"] and out["true"]["weights"] == out["false"]["weights"]
