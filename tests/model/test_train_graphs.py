"""model/train_graphs: the trunk replayed from CUDA graphs while training. The graphs themselves run only on
a GPU (bench/gpu_validate.py compares graphed and plain training steps there); here the capture is
replaced by stand-in graphs (graph_standins.py) whose replays recompute into the captured static buffers,
as a CUDA graph's replay rewrites them, so the autograd node, gradient accumulation over micro-batches,
the calls that run eagerly, a failed capture and the parameter check run as they do on a GPU."""
import pytest
import torch
from graph_standins import TrainingStandIn

from bench.gpu_validate import hook_accumulate_grad_nodes
from model import train_graphs
from model.lm import DiffusionLM
from model.presets import get_preset


def tiny(tied: bool = True) -> DiffusionLM:
    torch.manual_seed(0)
    return DiffusionLM(get_preset("tiny-diffumamba-h").replace(tie_embeddings=tied)).train()


def batch(seed: int, shape=(2, 24)) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 511, shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.5
    return {"input_ids": torch.where(mask, torch.tensor(511), ids), "targets": ids,
            "t": torch.rand(shape[0], generator=g).clamp_min(0.1), "loss_mask": torch.ones(shape)}


def accumulate(model, batches) -> tuple[list[float], dict]:
    """Losses of each micro-batch and the summed gradients, as a step with grad accumulation makes them."""
    model.zero_grad(set_to_none=True)
    losses = []
    for b in batches:
        loss, _ = model.loss(b)
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("hooked", [True, False])
def test_graphed_steps_accumulate_the_same_gradients_as_eager(tied, hooked):
    """Three micro-batches a step, two steps: the same losses and summed gradients as the plain model, with
    and without hooks on the AccumulateGrad nodes (DeepSpeed's)."""
    eager, graphed = tiny(tied), tiny(tied)
    graphed.trunk_graphs = graphs = TrainingStandIn(graphed)
    nodes = hook_accumulate_grad_nodes(graphed, lambda *_: None) if hooked else []
    for step in range(2):
        micro = [batch(10 * step + i) for i in range(3)]
        want_losses, want_grads = accumulate(eager, micro)
        got_losses, got_grads = accumulate(graphed, micro)
        assert got_losses == pytest.approx(want_losses, rel=1e-6)
        assert want_grads.keys() == got_grads.keys()
        for name, g in want_grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert graphs.captures == 1 and len(nodes) == (len(list(graphed.parameters())) if hooked else 0)


def test_a_parameter_without_grad_is_handed_a_copy_never_the_static_buffer():
    """AccumulateGrad may adopt the tensor it is handed as .grad when no other reference holds it than it
    expects (two with a hook): the graph's static buffer adopted so would be overwritten by the next replay,
    losing micro-batches. So a parameter without .grad is handed a copy; one with .grad, which is added to
    in place, the buffer itself. (Untied: a tied embedding's gradient is the sum with the head's.)"""
    model = tiny(tied=False)
    graphs = model.trunk_graphs = TrainingStandIn(model)
    handed = {}
    for name, p in graphs.trunk_parameters():
        p.register_hook(lambda g, name=name: handed.setdefault(name, []).append(g.data_ptr()))
    accumulate(model, [batch(11), batch(12)])
    static = {name: g.data_ptr() for name, g in zip(graphs.captured.names, graphs.captured.param_grads)}
    for name, ptrs in handed.items():
        assert ptrs[0] != static[name] and ptrs[1] == static[name], name


def test_other_shapes_eval_and_no_grad_run_eagerly():
    model = tiny()
    graphs = model.trunk_graphs = TrainingStandIn(model)
    accumulate(model, [batch(1)])
    ids = batch(2, shape=(1, 16))["input_ids"]
    with torch.no_grad():
        want = model.eager_trunk(ids)
        assert all(torch.equal(a, b) for a, b in zip(model.trunk(ids), want))          # no grad
        model.eval()
        same_shape = batch(3)["input_ids"]
        assert all(torch.equal(a, b) for a, b in zip(model.trunk(same_shape), model.eager_trunk(same_shape)))
    model.train()
    out = model.trunk(ids)                                                               # other shape
    assert out[0].grad_fn is not None and "GraphedTrunk" not in type(out[0].grad_fn).__name__
    assert graphs.captures == 1


def test_cpu_tensors_never_capture():
    model = tiny()
    graphs = train_graphs.enable(model)
    loss, _ = model.loss(batch(4))
    loss.backward()
    assert graphs.captured is None


def test_a_parameter_that_moved_stops_with_its_name():
    model = tiny()
    model.trunk_graphs = TrainingStandIn(model)
    accumulate(model, [batch(5)])
    with torch.no_grad():
        model.blocks[1].mlp.fc_in.weight.data = model.blocks[1].mlp.fc_in.weight.data.clone()
    with pytest.raises(RuntimeError, match=r"parameter blocks\.1\.mlp\.fc_in\.weight moved in memory"):
        model.loss(batch(6))


def test_a_capture_that_fails_stops_with_the_setting_to_turn_off():
    class Failing(TrainingStandIn):
        def capture(self, input_ids):
            raise RuntimeError("operation not permitted when stream is capturing")

    model = tiny()
    model.trunk_graphs = Failing(model)
    with pytest.raises(RuntimeError, match="trunk's training CUDA graph failed.*train.cuda_graphs=false") as err:
        model.loss(batch(7))
    assert "not permitted" in str(err.value)
    assert model.trunk_graphs.captured is None


@pytest.mark.parametrize("tied", [True, False])
def test_the_captured_trunk_runs_on_parameter_aliases_that_never_reach_the_parameters(tied):
    """DeepSpeed keeps hooks on the parameters' AccumulateGrad nodes, made on the default stream: a captured
    backward must not reach them. The aliases give the same outputs and gradients, from the same storage."""
    model = tiny(tied)
    graphs = train_graphs.enable(model)
    named = graphs.trunk_parameters()
    ids = batch(8)["input_ids"]
    outs, aliases = graphs.trunk_on_aliases(named, ids)
    assert all(a is not p and a.data_ptr() == p.data_ptr() for a, (_, p) in zip(aliases, named))
    grad_outs = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, aliases, grad_outs, allow_unused=True, retain_graph=True)
    torch.autograd.backward(outs, grad_outs)
    assert all(p.grad is None for p in model.parameters())           # nothing reached a parameter
    want_outs = model.eager_trunk(ids)
    for o, w in zip(outs, want_outs):
        torch.testing.assert_close(o, w, rtol=0, atol=0)
    want = torch.autograd.grad(want_outs, [p for _, p in named], grad_outs, allow_unused=True)
    for (name, _), g, w in zip(named, got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=name)
