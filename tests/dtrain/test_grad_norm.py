"""The gradient norm the trainer logs and clips by (DeepSpeed ZeRO-1, 2 processes on gloo) equals the norm of
the data-parallel mean gradient computed independently: a plain copy of the model on the same micro-batches,
torch.autograd, the mean over ranks, the norm in float64. And it is taken without a float64 copy of any
gradient (dtrain.engine.grad_norms_in_fp32), which is what made DeepSpeed's own version slow."""
import json

from conftest import run_probe

PROBE = r"""
import copy, json
import torch.distributed as tdist
from torch.profiler import ProfilerActivity, profile
from model.diffusion import diffusion_loss_selected

torch.manual_seed(0)
trainee = tiny_engine("train.grad_accum=1", "train.global_batch_size=null")
engine = trainee.engine
plain = copy.deepcopy(engine.module)                    # the same weights, outside DeepSpeed
rank = tdist.get_rank()
batches = masked_batches(global_batch_size=4)
for _ in range(rank + 1):                               # each rank its own micro-batch
    batch = next(batches)

# the independent norm: this rank's gradient, the mean over ranks, float64
loss, _ = diffusion_loss_selected(plain(batch["input_ids"], score_mask=batch["scored_index"]), batch, 511,
                                  batch["scored_index"])
loss.backward()
grads = torch.cat([p.grad.flatten() for p in plain.parameters()]).double()
tdist.all_reduce(grads)
expected = (grads / tdist.get_world_size()).norm().item()

with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    logits = engine(batch["input_ids"], score_mask=batch["scored_index"])
    engine.backward(diffusion_loss_selected(logits, batch, 511, batch["scored_index"])[0])
    engine.step()
# casts of more than one element to float64: DeepSpeed's own norm makes one of every gradient
FLOAT64 = 7    # the ScalarType code the profiler records for the dtype argument
casts = [e.input_shapes[0] for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
         and torch.Size(e.input_shapes[0]).numel() > 1 and e.concrete_inputs[1] == FLOAT64]
if rank == 0:
    print("NORM" + json.dumps({"got": float(engine.get_global_grad_norm()), "expected": expected,
                               "patched": not hasattr(engine.optimizer.get_grad_norm_direct, "__self__"),
                               "float64_copies": casts}))
"""


def test_logged_grad_norm_is_the_norm_of_the_mean_gradient(tmp_path):
    out = run_probe(PROBE, tmp_path, nproc=2, timeout=400)
    got = json.loads(out.split("NORM", 1)[1].splitlines()[0])
    assert got["patched"], got
    assert abs(got["got"] - got["expected"]) <= 1e-5 * got["expected"], got
    assert got["float64_copies"] == [], got
