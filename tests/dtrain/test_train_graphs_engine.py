"""train.cuda_graphs in the trainer's engine: the model's trunk gets model/train_graphs after
deepspeed.initialize, with the run's autocast dtype. On the CPU it trains eagerly, step for step as without.
With stand-in graphs (tests/model/graph_standins.py: the graph path, replays recomputed), the graphed
trunk's node, DeepSpeed's gradient hooks and its accumulation over micro-batches train step for step as
without graphs too (the GPU comparison is bench/gpu_validate.py's)."""
import json

import pytest
from conftest import run_probe

PROBE = r"""
import json
import sys
sys.path.insert(0, "tests/model")
from graph_standins import TrainingStandIn
out = {}
for graphs in ("false", "true", "stand-in"):
    torch.manual_seed(0)
    trainee = tiny_engine("train.precision=bf16", "train.grad_accum=2", *sys.argv[1:],
                          f"train.cuda_graphs={'false' if graphs == 'false' else 'true'}")
    module = trainee.engine.module
    if graphs == "stand-in":
        module.trunk_graphs = TrainingStandIn(module, module.trunk_graphs.autocast_dtype,
                                             module.trunk_graphs.hand_over)
    batches = masked_batches(4)
    norms = [float(train_step(trainee, batches, 2, False, NoMetrics())[1]) for _ in range(3)]
    tg = module.trunk_graphs
    hand_over = getattr(tg, "hand_over", None)
    out[graphs] = {"hand_over": hand_over.__name__ if hand_over is not None else None, "norms": norms, "weights": sum(p.double().sum().item() for p in module.parameters()),
                   "graphs": type(tg).__name__ if tg is not None else None,
                   "dtype": str(getattr(tg, "autocast_dtype", None)), "captured": getattr(tg, "captured", None) is not None}
if torch.distributed.get_rank() == 0:
    print("OUT" + json.dumps(out))
"""


@pytest.mark.parametrize("zero, nproc", [(["parallel.zero_stage=1", "parallel.overlap_comm=true"], 1),
                                         (["parallel.zero_stage=1", "parallel.overlap_comm=true"], 2),
                                         (["parallel.zero_stage=2"], 1)], ids=["zero1-overlap", "zero1-dp2", "zero2"])
def test_engine_enables_trunk_graphs_and_trains_as_without_on_the_cpu(tmp_path, zero, nproc):
    """ZeRO-1 (with overlap_comm, as the configs run: DeepSpeed's hooks on every parameter) gets the graphs'
    summed gradients at its accumulation boundary only, and reduces them over 2 ranks there; ZeRO-2, which
    reduces every micro-batch's, gets them after every backward."""
    out = json.loads(run_probe(PROBE, tmp_path, *zero, nproc=nproc, timeout=400).split("OUT", 1)[1])
    assert out["false"]["graphs"] is None
    hand_over = "is_gradient_accumulation_boundary" if zero[0].endswith("1") else None
    assert out["true"] == {**out["true"], "graphs": "TrainingGraphs", "dtype": "torch.bfloat16", "captured": False,
                           "hand_over": hand_over}
    assert out["stand-in"]["hand_over"] == hand_over
    assert out["true"]["norms"] == out["false"]["norms"] and out["true"]["weights"] == out["false"]["weights"]
    standin = out["stand-in"]
    assert standin["graphs"] == "TrainingStandIn" and standin["captured"]
    # the stand-in's backward recomputes the trunk: the order of fp32 sums differs, which bf16 roundings
    # amplify to ~3e-4; a micro-batch lost or counted twice would change the norms by tens of percent
    assert standin["norms"] == pytest.approx(out["false"]["norms"], rel=2e-3)
    assert standin["weights"] == pytest.approx(out["false"]["weights"], rel=1e-4)


PIPE_PROBE = r"""
import json
import sys
sys.path.insert(0, "tests/model")
from graph_standins import StageStandIn
out = {}
for graphs in ("false", "true", "stand-in"):
    torch.manual_seed(0)
    trainee = tiny_engine("train.precision=bf16", "train.grad_accum=3", "parallel.pipeline_stages=2",
                          "parallel.zero_stage=1", f"train.cuda_graphs={'false' if graphs == 'false' else 'true'}")
    pipe = trainee.engine.module
    g = pipe.block_graphs
    if graphs == "stand-in":
        g = pipe.block_graphs = StageStandIn(g.model.blocks, g.autocast_dtype, g.hand_over, g.max_slots)
    torch.manual_seed(100 + trainee.dp_rank)   # each data-parallel rank its own sequences, both stages the same
    batches = masked_batches(6 * trainee.dp_size)
    flat = lambda: torch.cat([p.detach().double().flatten() for p in pipe.parameters()])
    start = flat()
    norms = [float(train_step(trainee, batches, 3, False, NoMetrics())[1]) for _ in range(3)]
    moved = flat() - start
    if graphs == "false":
        plain_moved = moved
    # how far the weights ended from the run without graphs, relative to how far training moved them
    off = float((moved - plain_moved).norm() / plain_moved.norm())
    row = {"norms": norms, "off": off, "graphs": type(g).__name__ if g is not None else None,
           "slots": len(g.slots) if g is not None else 0, "max_slots": getattr(g, "max_slots", 0),
           "blocks": pipe.block_range[1] - pipe.block_range[0], "stage": trainee.stage, "dp_rank": trainee.dp_rank}
    rows = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rows, row)
    out[graphs] = sorted(rows, key=lambda r: (r["stage"], r["dp_rank"]))
if torch.distributed.get_rank() == 0:
    print("OUT" + json.dumps(out))
"""


@pytest.mark.parametrize("nproc", [2, 4], ids=["pp2", "pp2-dp2"])
def test_pipeline_stages_graph_their_blocks_and_train_as_without_on_the_cpu(tmp_path, nproc):
    """PP=2 (x DP=2: the stages' gradients all-reduced after the hand-over), 3 micro-batches a step: stage 0
    keeps two in flight (two graph slots), the last stage one; the stand-in graphs' summed gradients reach
    the parameters at the step's last backward only, and every rank trains step for step as without graphs
    (the pipeline's gradient norms, and the weights of each stage)."""
    out = json.loads(run_probe(PIPE_PROBE, tmp_path, nproc=nproc, timeout=400).split("OUT", 1)[1])
    dp = nproc // 2
    assert [r["graphs"] for r in out["false"]] == [None] * nproc
    assert [(r["graphs"], r["max_slots"], r["slots"]) for r in out["true"]] == \
        [("StageGraphs", 2, 0)] * dp + [("StageGraphs", 1, 0)] * dp
    assert all(r["norms"] == w["norms"] and r["off"] == 0 for r, w in zip(out["true"], out["false"]))
    standin = out["stand-in"]
    assert [(r["graphs"], r["slots"]) for r in standin] == [("StageStandIn", 2)] * dp + [("StageStandIn", 1)] * dp
    assert standin[0]["blocks"] + standin[-1]["blocks"] == 3      # the tiny config's three blocks, split
    for got, want in zip(standin, out["false"]):
        assert got["norms"] == pytest.approx(want["norms"], rel=2e-3)
        assert got["off"] < 0.05, got
