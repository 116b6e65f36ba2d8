"""CUDA graphs for training: the trunk's forward and backward recorded once for the micro-batch's shape and
replayed with one launch each.

Why: a training step of the Mamba presets is bound by the host at the configs' micro-batches. mamba-ssm's
fused mixer spends 1.5-2 ms of host time per direction in its forward and 5-6 ms in its backward,
whatever the batch, and at 1.3B with 8 x 1,024 tokens a micro-batch the GPU waited on the host 47% of the
step (docs/benchmarks.md, fifth run). Two graph launches replace the trunk's thousands of kernel launches.

How: PyTorch's partial-network recipe (torch.cuda.make_graphed_callables), written out for three things
that recipe leaves to its caller:
  - gradient accumulation: the backward graph writes the parameters' gradients into static buffers.
    Where a parameter has no .grad yet, autograd's AccumulateGrad may adopt the tensor it is handed as
    .grad, and the next micro-batch's replay would overwrite it. Such a parameter gets a copy; one that
    has a .grad gets the buffer, which AccumulateGrad adds in place.
  - which calls replay: the first training shape is captured; other shapes, eval mode and no-grad calls
    run the trunk eagerly.
  - the trainer's own gradient hooks: DeepSpeed's ZeRO keeps every parameter's AccumulateGrad node alive,
    created on the default stream, and a gradient reaching such a node from the capture stream breaks the
    capture. The captured trunk runs on fresh leaf aliases of the parameters (same storage, their own
    autograd nodes); the replayed gradients reach the parameters' own nodes, and hooks, outside the graph.
The head runs eagerly after the trunk, as in inference (model/graphs.py): the masked positions it scores
change from batch to batch.

Limits: the graph reads the parameters where they were at capture. The optimizer updates them in place
(ZeRO 1-2 keep fp32 parameters in place); a parameter that moved stops the run with its name. ZeRO-3
(parameters gathered per call) and activation checkpointing (recomputation inside the backward graph)
are refused by the trainer's config check. A capture that fails stops the run at its first micro-batch
(graphs.capture_or_explain says why there is no eager fallback).
Memory: the graph keeps one micro-batch's activations and a copy of the trunk's gradients (fp32, 4 bytes
a parameter) for the whole run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from model.graphs import capture_or_explain, its_gpu, warm_up_on_side_stream

WARMUP_CALLS = 3   # forward + backward before capture, on a side stream: Triton autotuning, torch.compile
# the data loader's pinning thread allocates pinned memory meanwhile: forbidden during a capture in
# "global" mode, which checks every thread; "thread_local" checks this one
CAPTURE_MODE = "thread_local"


@dataclass
class Captured:
    """One shape's graphs and the static tensors they read and write."""
    input_ids: torch.Tensor                  # copied in before the forward replay
    outputs: tuple[torch.Tensor, ...]        # the trunk's (hidden, residual), rewritten by each replay
    grad_outputs: tuple[torch.Tensor, ...]   # the head's gradients for them, copied in before backward
    params: tuple[torch.nn.Parameter, ...]
    param_grads: tuple[torch.Tensor, ...]    # rewritten by each backward replay
    forward: object                          # torch.cuda.CUDAGraph (or a stand-in in tests)
    backward: object
    names: tuple[str, ...] = ()
    addresses: tuple[int, ...] = ()

    def check_parameters(self) -> None:
        for name, p, address in zip(self.names, self.params, self.addresses):
            if p.data_ptr() != address:
                raise RuntimeError(
                    f"parameter {name} moved in memory since the CUDA graph of the trunk was captured: the "
                    f"graph would read stale weights (train.cuda_graphs needs parameters updated in place)")


class GraphedTrunkFn(torch.autograd.Function):
    """The replayed trunk as one autograd node: inputs (captured, input_ids, *params)."""

    @staticmethod
    def forward(ctx, captured: Captured, input_ids: torch.Tensor, *params):
        captured.input_ids.copy_(input_ids)
        with its_gpu(input_ids):
            captured.forward.replay()
        ctx.captured = captured
        return tuple(o.detach() for o in captured.outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        c = ctx.captured
        for static, grad in zip(c.grad_outputs, grads):
            if grad is None:
                static.zero_()
            else:
                static.copy_(grad)
        with its_gpu(c.grad_outputs[0]):
            c.backward.replay()
        # a copy where AccumulateGrad could adopt the tensor as .grad: never the buffer the next replay rewrites
        param_grads = tuple(g.clone() if p.grad is None else g for p, g in zip(c.params, c.param_grads))
        return (None, None, *param_grads)


class TrainingGraphs:
    """model.trunk(input_ids) for training, replayed from CUDA graphs (see the module docstring).

    autocast_dtype: the dtype of the training's autocast (bf16), recorded into the graphs; None for none."""

    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None = None):
        self.model, self.autocast_dtype = model, autocast_dtype
        self.captured: Captured | None = None    # the first training shape's; other shapes run eagerly
        self.call_trunk = EagerTrunk(model)       # for torch.func.functional_call on parameter aliases

    @staticmethod
    def on_gpu(input_ids: torch.Tensor) -> bool:
        return input_ids.is_cuda

    def usable(self, input_ids: torch.Tensor) -> bool:
        c = self.captured
        same_shape = c is None or (c.input_ids.shape == input_ids.shape and c.input_ids.device == input_ids.device)
        return self.on_gpu(input_ids) and torch.is_grad_enabled() and self.model.training and same_shape

    def __call__(self, input_ids: torch.Tensor):
        if not self.usable(input_ids):
            return self.model.eager_trunk(input_ids)
        if self.captured is None:
            self.captured = capture_or_explain(lambda: self.capture(input_ids), "the trunk's training",
                                               "train with train.cuda_graphs=false")
        self.captured.check_parameters()
        return GraphedTrunkFn.apply(self.captured, input_ids, *self.captured.params)

    def trunk_parameters(self) -> tuple[tuple[str, torch.nn.Parameter], ...]:
        """(name, parameter) of the embedding and the blocks that train, each once (tied weights too)."""
        seen, out = set(), []
        for prefix, module in (("embed", self.model.embed), ("blocks", self.model.blocks)):
            for name, p in module.named_parameters(prefix=prefix):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return tuple(out)

    def trunk_on_aliases(self, named, input_ids: torch.Tensor):
        """The trunk on fresh leaf aliases of the named parameters (views of the same storage, with autograd
        nodes of their own): (outputs, aliases). Tied weights follow their alias."""
        aliases = tuple(p.detach().requires_grad_(True) for _, p in named)
        by_name = {f"model.{name}": a for (name, _), a in zip(named, aliases)}
        return torch.func.functional_call(self.call_trunk, by_name, (input_ids,), tie_weights=True), aliases

    def autocast(self, device_type: str = "cuda"):
        # without the autocast cache: its bf16 weight copies would be freed under the graph's feet
        if self.autocast_dtype is None:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self.autocast_dtype, cache_enabled=False)

    def capture(self, input_ids: torch.Tensor) -> Captured:
        """Warm-up forward + backward calls on a side stream, then one of each under torch.cuda.graph, the
        backward as torch.autograd.grad of the captured outputs (the recipe of make_graphed_callables)."""
        named = self.trunk_parameters()
        params = tuple(p for _, p in named)
        static_ids = input_ids.clone()
        def forward_and_backward():
            outs, aliases = self.trunk_on_aliases(named, static_ids)
            torch.autograd.grad(outs, aliases, [torch.ones_like(o) for o in outs], allow_unused=True)

        with its_gpu(input_ids), self.autocast():
            warm_up_on_side_stream(forward_and_backward, WARMUP_CALLS)
            pool = torch.cuda.graph_pool_handle()
            forward = torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward, pool=pool, capture_error_mode=CAPTURE_MODE):
                outs, aliases = self.trunk_on_aliases(named, static_ids)
            grad_outs = tuple(torch.empty_like(o) for o in outs)
            backward = torch.cuda.CUDAGraph()
            with torch.cuda.graph(backward, pool=pool, capture_error_mode=CAPTURE_MODE):
                grads = torch.autograd.grad(outs, aliases, grad_outs, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
        return Captured(static_ids, tuple(outs), grad_outs, params, grads, forward, backward,
                        tuple(n for n, _ in named), tuple(p.data_ptr() for p in params))


class EagerTrunk(torch.nn.Module):
    """model.eager_trunk as a module's forward, which torch.func.functional_call needs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        return self.model.eager_trunk(input_ids)


def enable(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> TrainingGraphs:
    """Make model.trunk replay CUDA graphs while training (the trainer's train.cuda_graphs)."""
    model.trunk_graphs = TrainingGraphs(model, autocast_dtype)
    return model.trunk_graphs

