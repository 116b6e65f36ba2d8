"""model/train_graphs: the trunk replayed from CUDA graphs while training. The graphs themselves run only on
a GPU (bench/gpu_validate.py compares graphed and plain training steps there); here the capture is
replaced by stand-in graphs (graph_standins.py) whose replays recompute into the captured static buffers,
as a CUDA graph's replay rewrites them, so the autograd node, gradient accumulation over micro-batches,
the calls that run eagerly, a failed capture and the parameter check run as they do on a GPU."""

import pytest
import torch
from graph_standins import TrainingStandIn

from bench.graph_checks import hook_accumulate_grad_nodes
from model import graphs as graphs_module
from model import train_graphs
from model.lm import DiffusionLM
from model.presets import get_preset
from model.train_graphs import every_nth_call


def tiny(tied: bool = True) -> DiffusionLM:
    torch.manual_seed(0)
    return DiffusionLM(get_preset("tiny-diffumamba-h").replace(tie_embeddings=tied)).train()


def batch(seed: int, shape=(2, 24)) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 511, shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.5
    return {"input_ids": torch.where(mask, torch.tensor(511), ids), "targets": ids,
            "t": torch.rand(shape[0], generator=g).clamp_min(0.1), "loss_mask": torch.ones(shape)}


def accumulate(model, batches, dtype=None, before_each=lambda i: None) -> tuple[list[float], dict]:
    """Losses of each micro-batch and the summed gradients, as a step with grad accumulation makes them
    (under CPU autocast to `dtype` when given); before_each(i) is called before the i-th micro-batch."""
    losses = []
    for i, b in enumerate(batches):
        before_each(i)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss, _ = model.loss(b)
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def optimizer_step(model, lr=0.05) -> None:
    """Plain SGD, in place (as ZeRO 1-2 update), gradients then dropped (as DeepSpeed does)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
    model.zero_grad(set_to_none=True)


class AutocastCastsInGraph(TrainingStandIn):
    """The graphs on the parameters themselves, autocast casting the matmul weights on every call: the
    reference for the bf16 copies (the same numbers, up to the order of fp32 sums)."""

    def graph_inputs(self, named):
        return tuple(p for _, p in named)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("hooked", [True, False])
@pytest.mark.parametrize("hand_over", ["every backward", "last micro-batch"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_graphed_steps_accumulate_the_same_gradients_as_eager(tied, hooked, hand_over, dtype):
    """Three micro-batches a step, three steps with an optimizer update between them: the same losses and
    summed gradients as the plain model, with and without hooks on the AccumulateGrad nodes (DeepSpeed's),
    with the sums handed over after every backward or only at the step's last one. Under bf16 autocast the
    graphs compute with bf16 copies of the matmul weights, re-read every step; the reference is then the
    graph path with autocast's own casts (eager differs from any split backward by bf16 roundings of
    gradients summed in another order, about 1% of a tensor's largest value)."""
    reference, graphed = tiny(tied), tiny(tied)
    if dtype is not None:
        reference.trunk_graphs = AutocastCastsInGraph(reference, dtype)
    graphs = graphed.trunk_graphs = TrainingStandIn(graphed, dtype,
                                                    None if hand_over == "every backward" else every_nth_call(3))
    nodes = hook_accumulate_grad_nodes(graphed, lambda *_: None) if hooked else []
    for step in range(3):
        micro = [batch(10 * step + i) for i in range(3)]
        want_losses, want_grads = accumulate(reference, micro, dtype)
        got_losses, got_grads = accumulate(graphed, micro, dtype)
        assert got_losses == pytest.approx(want_losses, rel=1e-6)
        assert want_grads.keys() == got_grads.keys()
        # the tied embedding's sum runs in another order when the trunk's share comes at the hand-over
        for name, g in want_grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)
        optimizer_step(reference)
        optimizer_step(graphed)
    assert graphs.captures == 1 and len(nodes) == (len(list(graphed.parameters())) if hooked else 0)


@pytest.mark.parametrize("odd_position", [0, 1, 2])
@pytest.mark.parametrize("hand_over", ["deepspeed boundary", "every third call"])
def test_a_micro_batch_of_another_shape_keeps_each_steps_gradients_in_that_step(odd_position, hand_over):
    """One micro-batch of each 3-micro-batch step has another shape and runs eagerly: first, in the middle,
    or last, where it is the step's hand-over micro-batch. Every step's summed gradients are still exactly
    that step's (a hand-over missed at an eager last micro-batch once left the graphed ones' sums to a later
    step, and a call-counting hand_over that skipped eager calls drifted off the step's end for good)."""
    reference, graphed = tiny(), tiny()
    position = [0]   # DeepSpeed's boundary is the engine's own count of micro-batches, whoever runs them
    boundary = (lambda: position[0] == 2) if hand_over == "deepspeed boundary" else every_nth_call(3)
    graphs = graphed.trunk_graphs = TrainingStandIn(graphed, None, boundary)
    for step in range(3):
        micro = [batch(10 * step + i, shape=(1, 16) if i == odd_position else (2, 24)) for i in range(3)]
        _, want_grads = accumulate(reference, micro)
        _, got_grads = accumulate(graphed, micro, before_each=lambda i: position.__setitem__(0, i))
        assert want_grads.keys() == got_grads.keys()
        for name, g in want_grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(),
                                       msg=f"step {step}: {name}")
        optimizer_step(reference)
        optimizer_step(graphed)
    assert graphs.captures == 1


def test_between_hand_overs_no_gradient_reaches_the_trunk():
    """With hand_over at the third micro-batch, the trunk's parameters are not in the first two's autograd
    graphs: no gradient, no hook call (DeepSpeed's ZeRO-1 acts at the accumulation boundary only); the third
    hands over the sum of all three, a copy of the graph's sums, to every parameter's hook once."""
    model = tiny(tied=False)
    graphs = model.trunk_graphs = TrainingStandIn(model, torch.bfloat16, every_nth_call(3))
    handed = {}
    for name, p in graphs.trunk_parameters():
        p.register_hook(lambda g, name=name: handed.setdefault(name, []).append(g if g is None else g.data_ptr()))
    micro = [batch(11), batch(12), batch(13)]
    accumulate(model, micro[:2], torch.bfloat16)
    assert handed == {}
    assert all(p.grad is None for _, p in graphs.trunk_parameters())
    assert model.head.norm.weight.grad is not None          # the head, run eagerly, accumulates as usual
    accumulate(model, micro[2:], torch.bfloat16)
    sums = {s.data_ptr() for s in graphs.acc.grad_sums}
    assert handed.keys() == {name for name, _ in graphs.trunk_parameters()}
    assert all(len(ptrs) == 1 and ptrs[0] is not None and ptrs[0] not in sums for ptrs in handed.values())


def test_the_graphs_compute_with_autocast_copies_of_the_matmul_weights_only():
    """The blocks' nn.Linear weights get bf16 copies; the rest (norms, conv, A_log, D, dt_bias) and the
    embedding, which a lookup reads in fp32 (tied: it is also the head's matmul weight, outside the
    graph), are the parameters themselves."""
    model = tiny()
    graphs = TrainingStandIn(model, torch.bfloat16)
    named = graphs.trunk_parameters()
    linear = {id(m.weight) for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)}
    for (name, p), t in zip(named, graphs.graph_inputs(named)):
        if id(p) in linear:
            assert t is not p and t.dtype == torch.bfloat16 and t.shape == p.shape, name
        else:
            assert t is p, name
    assert any(id(p) in linear for _, p in named) and any(id(p) not in linear for _, p in named)
    assert all(t is p for (_, p), t in zip(named, TrainingStandIn(model).graph_inputs(named)))   # no autocast


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


def test_a_capture_that_fails_stops_with_the_setting_to_turn_off(monkeypatch):
    released = []
    monkeypatch.setattr(graphs_module, "release_generator", released.append)

    class Failing(TrainingStandIn):
        def capture(self, input_ids):
            raise RuntimeError("operation not permitted when stream is capturing")

    model = tiny()
    model.trunk_graphs = Failing(model)
    with pytest.raises(RuntimeError, match="trunk's training CUDA graph failed.*train.cuda_graphs=false") as err:
        model.loss(batch(7))
    assert "not permitted" in str(err.value)
    assert model.trunk_graphs.captured is None and released == [batch(7)["input_ids"].device], \
        "the micro-batch's GPU's generator released"


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
