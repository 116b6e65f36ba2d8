"""CUDA graphs for training: the trunk's forward and backward recorded once for the micro-batch's shape and
replayed with one launch each.

Why: a training step of the Mamba presets is bound by the host at the configs' micro-batches. mamba-ssm's
fused mixer spends 1.5-2 ms of host time per direction in its forward and 5-6 ms in its backward,
whatever the batch, and at 1.3B with 8 x 1,024 tokens a micro-batch the GPU waited on the host 47% of the
step (docs/benchmarks.md, fifth run). Two graph launches replace the trunk's thousands of kernel launches.

How: PyTorch's partial-network recipe (torch.cuda.make_graphed_callables), written out for what that
recipe leaves to its caller:
  - gradient accumulation inside the graph: the backward graph adds each parameter's gradient to its
    own sum (Megatron's gradient-accumulation buffers). The sums reach the parameters' .grad only when
    the caller's `hand_over()` says so: on the last micro-batch of an optimizer step (the trainer passes
    DeepSpeed's gradient-accumulation boundary), on every backward when there is no such callable. In
    between, no gradient leaves the graph, and the parameters are not even in the autograd graph: no
    AccumulateGrad add, copy or hook per micro-batch.
  - the matmul weights in the autocast dtype: under bf16 autocast every nn.Linear weight is cast to bf16
    for its matmul, and its bf16 gradient cast back to fp32 before it is added up. The graphs compute with
    a bf16 copy of each such weight instead, refreshed once per optimizer step (at the first forward after a
    hand-over), and the backward adds the bf16 gradient straight into the fp32 sum: the same numbers
    (autocast's cast, the same GEMMs, fp32 sums), one cast per step instead of one per micro-batch, and one
    pass over each gradient instead of three.
  - which calls replay: the first training shape is captured; other shapes, eval mode and no-grad calls
    run the trunk eagerly.
  - the trainer's own gradient hooks: DeepSpeed's ZeRO keeps every parameter's AccumulateGrad node alive,
    created on the default stream, and a gradient reaching such a node from the capture stream breaks the
    capture. The captured trunk runs on fresh leaf aliases (of the parameters' storage, or of their bf16
    copies), with autograd nodes of their own; the handed-over sums reach the parameters' own nodes, and
    hooks, outside the graph.
The head runs eagerly after the trunk, as in inference (model/graphs.py): the masked positions it scores
change from batch to batch.

Limits: the graph reads the parameters where they were at capture. The optimizer updates them in place
(ZeRO 1-2 keep fp32 parameters in place); a parameter that moved stops the run with its name. ZeRO-3
(parameters gathered per call) and activation checkpointing (recomputation inside the backward graph)
are refused by the trainer's config check. A capture that fails stops the run at its first micro-batch
(graphs.capture_or_explain says why there is no eager fallback).
Memory: the graph keeps one micro-batch's activations, the gradient sums (4 bytes a parameter) and the
bf16 weight copies (2 bytes a matmul weight) for the whole run.
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
    inputs: tuple[torch.Tensor, ...]         # what the graphs compute with: a parameter or its cast copy
    grad_sums: tuple[torch.Tensor, ...]      # the backward replay adds each parameter's gradient here
    forward: object                          # torch.cuda.CUDAGraph (or a stand-in in tests)
    backward: object
    names: tuple[str, ...] = ()
    addresses: tuple[int, ...] = ()
    handed_over: bool = True                 # the sums went to .grad: zero them, re-read the weights
    placeholder: torch.Tensor | None = None  # the autograd leaf of micro-batches that hand nothing over

    def __post_init__(self):
        self.placeholder = torch.zeros((), device=self.input_ids.device, requires_grad=True)

    def check_parameters(self) -> None:
        for name, p, address in zip(self.names, self.params, self.addresses):
            if p.data_ptr() != address:
                raise RuntimeError(
                    f"parameter {name} moved in memory since the CUDA graph of the trunk was captured: the "
                    f"graph would read stale weights (train.cuda_graphs needs parameters updated in place)")

    def start_accumulating(self) -> None:
        """After a hand-over (and before the first replay): zero the sums and refresh the cast copies
        from the parameters, which the optimizer has updated since."""
        if not self.handed_over:
            return
        copies = [(c, p) for c, p in zip(self.inputs, self.params) if c is not p]
        with torch.no_grad():
            if copies:
                torch._foreach_copy_([c for c, _ in copies], [p for _, p in copies])
            torch._foreach_zero_(list(self.grad_sums))
        self.handed_over = False


class GraphedTrunkFn(torch.autograd.Function):
    """The replayed trunk as one autograd node: inputs (captured, hand_over, input_ids, *leaves). leaves: the
    trunk's parameters when this micro-batch's backward hands the sums over; else one placeholder leaf, which links
    the outputs to autograd without the parameters, so that the backward calls none of their AccumulateGrad
    nodes (nor DeepSpeed's hooks on them: 350 calls of host time per micro-batch at 1.3B)."""

    @staticmethod
    def forward(ctx, captured: Captured, hand_over: bool, input_ids: torch.Tensor, *leaves):
        captured.start_accumulating()
        captured.input_ids.copy_(input_ids)
        with its_gpu(input_ids):
            captured.forward.replay()
        ctx.captured, ctx.hand_over = captured, hand_over
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
        if not ctx.hand_over:
            return None, None, None, None
        # copies: AccumulateGrad may adopt a tensor as .grad, and the sums are zeroed for the next step
        sums = tuple(s.clone() for s in c.grad_sums)
        c.handed_over = True
        return (None, None, None, *sums)


class TrainingGraphs:
    """model.trunk(input_ids) for training, replayed from CUDA graphs (see the module docstring).

    autocast_dtype: the dtype of the training's autocast (bf16), recorded into the graphs; None for none.
    hand_over: () -> bool, asked at each micro-batch's forward: whether its backward hands the summed
    gradients to the parameters (the last micro-batch of an optimizer step; DeepSpeed's
    is_gradient_accumulation_boundary() says the same at the forward and the backward); None: every
    backward does."""

    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None = None, hand_over=None):
        self.model, self.autocast_dtype, self.hand_over = model, autocast_dtype, hand_over
        self.captured: Captured | None = None    # the first training shape's; other shapes run eagerly
        self.call_trunk = EagerTrunk(model)       # for torch.func.functional_call on parameter aliases

    @staticmethod
    def on_gpu(input_ids: torch.Tensor) -> bool:
        return input_ids.is_cuda

    def hand_over_now(self) -> bool:
        return self.hand_over is None or bool(self.hand_over())

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
        c = self.captured
        c.check_parameters()
        hand_over = self.hand_over_now()
        return GraphedTrunkFn.apply(c, hand_over, input_ids, *(c.params if hand_over else (c.placeholder,)))

    def trunk_parameters(self) -> tuple[tuple[str, torch.nn.Parameter], ...]:
        """(name, parameter) of the embedding and the blocks that train, each once (tied weights too)."""
        seen, out = set(), []
        for prefix, module in (("embed", self.model.embed), ("blocks", self.model.blocks)):
            for name, p in module.named_parameters(prefix=prefix):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return tuple(out)

    def cast_weights(self) -> set[int]:
        """ids of the trunk's nn.Linear weights: autocast casts them to its dtype for every matmul."""
        if self.autocast_dtype is None:
            return set()
        return {id(m.weight) for part in (self.model.embed, self.model.blocks) for m in part.modules()
                if isinstance(m, torch.nn.Linear)}

    def graph_inputs(self, named) -> tuple[torch.Tensor, ...]:
        """Per parameter, what the graphs compute with: a new copy in the autocast dtype for a matmul
        weight (filled by Captured.start_accumulating), else the parameter itself."""
        cast = self.cast_weights()
        return tuple(torch.empty_like(p, dtype=self.autocast_dtype) if id(p) in cast else p for _, p in named)

    def trunk_on_aliases(self, named, input_ids: torch.Tensor, inputs=None):
        """The trunk on fresh leaf aliases of `inputs` (default: the named parameters), views of the same
        storage with autograd nodes of their own: (outputs, aliases). Tied weights follow their alias."""
        inputs = tuple(p for _, p in named) if inputs is None else inputs
        aliases = tuple(t.detach().requires_grad_(True) for t in inputs)
        by_name = {f"model.{name}": a for (name, _), a in zip(named, aliases)}
        return torch.func.functional_call(self.call_trunk, by_name, (input_ids,), tie_weights=True), aliases

    def add_gradients(self, outs, aliases, grad_outs, grad_sums) -> None:
        """The backward graph's work: each alias's gradient for grad_outs, added to its sum (a cast copy's
        gradient is cast up in the same pass)."""
        grads = torch.autograd.grad(outs, aliases, grad_outs, allow_unused=True)
        used = [(s, g) for s, g in zip(grad_sums, grads) if g is not None]
        if used:
            torch._foreach_add_([s for s, _ in used], [g for _, g in used])

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
        c = Captured(input_ids.clone(), (), (), params, self.graph_inputs(named),
                     tuple(torch.zeros_like(p) for p in params), None, None,
                     tuple(n for n, _ in named), tuple(p.data_ptr() for p in params))
        c.start_accumulating()

        def forward_and_backward():
            outs, aliases = self.trunk_on_aliases(named, c.input_ids, c.inputs)
            self.add_gradients(outs, aliases, [torch.ones_like(o) for o in outs], c.grad_sums)

        with its_gpu(input_ids), self.autocast():
            warm_up_on_side_stream(forward_and_backward, WARMUP_CALLS)
            pool = torch.cuda.graph_pool_handle()
            c.forward = torch.cuda.CUDAGraph()
            with torch.cuda.graph(c.forward, pool=pool, capture_error_mode=CAPTURE_MODE):
                outs, aliases = self.trunk_on_aliases(named, c.input_ids, c.inputs)
            c.outputs, c.grad_outputs = tuple(outs), tuple(torch.empty_like(o) for o in outs)
            c.backward = torch.cuda.CUDAGraph()
            with torch.cuda.graph(c.backward, pool=pool, capture_error_mode=CAPTURE_MODE):
                self.add_gradients(outs, aliases, c.grad_outputs, c.grad_sums)
        c.handed_over = True   # the warm-ups' sums are thrown away: the first replay starts from zero
        return c


class EagerTrunk(torch.nn.Module):
    """model.eager_trunk as a module's forward, which torch.func.functional_call needs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        return self.model.eager_trunk(input_ids)


def enable(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None, hand_over=None) -> TrainingGraphs:
    """Make model.trunk replay CUDA graphs while training (the trainer's train.cuda_graphs); hand_over: see
    TrainingGraphs."""
    model.trunk_graphs = TrainingGraphs(model, autocast_dtype, hand_over)
    return model.trunk_graphs
