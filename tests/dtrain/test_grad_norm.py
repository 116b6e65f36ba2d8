"""The gradient norm the trainer logs and clips by (DeepSpeed ZeRO-1, 2 processes on gloo) equals the norm of
the data-parallel mean gradient computed independently: a plain copy of the model on the same micro-batches,
torch.autograd, the mean over ranks, the norm in float64. And it is taken without a float64 copy of any
gradient or a norm per parameter (dtrain.zero_step.grad_norms_in_fp32), which made DeepSpeed's own version
slow on the GPU and on the host."""
import json

import torch
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
# casts of gradients (a parameter's shape, more than one element) to float64: DeepSpeed's own norm makes
# one of every gradient
FLOAT64 = 7    # the ScalarType code the profiler records for the dtype argument
shapes = {p.shape for p in plain.parameters() if p.numel() > 1}
casts = [e.input_shapes[0] for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
         and torch.Size(e.input_shapes[0]) in shapes and e.concrete_inputs[1] == FLOAT64]
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


class RecordingZeroOptimizer:
    """What grad_norms_in_fp32 needs of DeepSpeed's ZeRO optimizer, its own norm recording its arguments."""
    model_parallel_rank = 0

    def __init__(self):
        self.calls = []

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        self.calls.append(([g.clone() for g in gradients], list(params), norm_type))
        return torch.tensor(0.0)


def test_deepspeed_norm_gets_one_number_per_rank_with_its_own_rules():
    """DeepSpeed's per-parameter loop (a cast and a norm of each gradient, ~50 ms of host time a step at
    1.3B) gets one one-element "gradient": the float64 norm of the gradients it would count, by its rules:
    alignment padding left out, pipeline-replicated parameters left out, model-parallel ones on every
    model-parallel rank, the others on rank 0 only."""
    from deepspeed.runtime.constants import PIPE_REPLICATED

    from dtrain.zero_step import grad_norms_in_fp32
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 3, 4, 6)]
    grads = [torch.randn(n) for n in (5, 3, 4, 6)]
    padding = torch.randn(2)
    padding._zero_padding = True
    setattr(params[1], PIPE_REPLICATED, True)          # counted once, by another stage
    params[2].model_parallel = True                    # deepspeed's is_model_parallel_parameter
    opt = RecordingZeroOptimizer()
    assert grad_norms_in_fp32(opt)
    opt.get_grad_norm_direct([grads[0], grads[1], padding, grads[2], grads[3]], params)
    (got, got_params, norm_type), = opt.calls
    want = torch.cat([grads[0], grads[2], grads[3]]).double().norm()
    assert len(got) == 1 and got[0].shape == (1,) and got[0].dtype == torch.float64
    assert abs(got[0].item() - want.item()) <= 1e-6 * want.item() and norm_type == 2
    assert got_params == [params[0]]
    opt.model_parallel_rank = 1                        # only the model-parallel gradient counts here
    opt.get_grad_norm_direct([grads[0], grads[1], padding, grads[2], grads[3]], params)
    assert abs(opt.calls[-1][0][0].item() - grads[2].double().norm().item()) <= 1e-6 * grads[2].norm().item()
    assert opt.calls[-1][1] == [params[2]]
    opt.get_grad_norm_direct([grads[0]], params[:1], norm_type=float("inf"))   # other norms: DeepSpeed's own
    assert opt.calls[-1][0][0].shape == grads[0].shape
