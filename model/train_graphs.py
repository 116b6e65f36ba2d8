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
    run the trunk eagerly. Every training call counts towards the hand-over, and an eager one that is a
    step's last hands the graphed micro-batches' sums over with its own gradients (PendingSumsFn).
  - the trainer's own gradient hooks: DeepSpeed's ZeRO keeps every parameter's AccumulateGrad node alive,
    created on the default stream, and a gradient reaching such a node from the capture stream breaks the
    capture. The captured trunk runs on fresh leaf aliases (of the parameters' storage, or of their bf16
    copies), with autograd nodes of their own; the handed-over sums reach the parameters' own nodes, and
    hooks, outside the graph.
The head runs eagerly after the trunk, as in inference (model/graphs.py): the masked positions it scores
change from batch to batch.
Under pipeline parallelism a stage's run of blocks is graphed instead (StageGraphs, at the end): the stage
keeps several micro-batches in flight, each in its own slot (graphs, static buffers, memory pool), all adding
to the same gradient sums (Accumulation).

Limits: the graph reads the parameters where they were at capture. The optimizer updates them in place
(ZeRO 1-2 keep fp32 parameters in place); a parameter that moved stops the run with its name. ZeRO-3
(parameters gathered per call) and activation checkpointing (recomputation inside the backward graph)
are refused by the trainer's config check. A capture that fails stops the run at its first micro-batch
(graphs.capture_or_explain says why there is no eager fallback).
Memory: the graph keeps one micro-batch's activations, the gradient sums (4 bytes a parameter) and the
bf16 weight copies (2 bytes a matmul weight) for the whole run.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from model.graphs import capture_or_explain, its_gpu, warm_up_on_side_stream

WARMUP_CALLS = 3   # forward + backward before capture, on a side stream: Triton autotuning, torch.compile
# the data loader's pinning thread allocates pinned memory meanwhile: forbidden during a capture in
# "global" mode, which checks every thread; "thread_local" checks this one
CAPTURE_MODE = "thread_local"


@dataclass
class Accumulation:
    """What every captured slot shares: the parameters, what the graphs compute with (a parameter or its
    cast copy) and the sums each backward replay adds the gradients to."""
    params: tuple[torch.nn.Parameter, ...]
    inputs: tuple[torch.Tensor, ...]
    grad_sums: tuple[torch.Tensor, ...]
    names: tuple[str, ...] = ()
    addresses: tuple[int, ...] = ()
    handed_over: bool = True                 # the sums went to .grad: zero them, re-read the weights
    placeholder: torch.Tensor | None = None  # the autograd leaf of micro-batches that hand nothing over

    def __post_init__(self):
        self.placeholder = torch.zeros((), device=self.params[0].device, requires_grad=True)

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

    def hand_over(self) -> tuple[torch.Tensor, ...]:
        """The sums, as the parameters' gradients of a step's last backward. Copies: AccumulateGrad may
        adopt a tensor as .grad, and the sums are zeroed at the next step's first replay."""
        self.handed_over = True
        return tuple(s.clone() for s in self.grad_sums)


@dataclass
class Captured:
    """One slot: the graphs of one micro-batch in flight and the static tensors they read and write."""
    acc: Accumulation
    input: torch.Tensor                      # copied in before the forward replay: token ids, or a stream
    outputs: tuple[torch.Tensor, ...]        # rewritten by each forward replay
    grad_outputs: tuple[torch.Tensor, ...]   # copied in before the backward replay
    forward: object                          # torch.cuda.CUDAGraph (or a stand-in in tests)
    backward: object
    grad_input: torch.Tensor | None = None   # a float input's gradient, written by the backward replay
    in_flight: bool = False                  # its forward replayed, its backward still to come


class GraphedTrunkFn(torch.autograd.Function):
    """The replayed trunk as one autograd node: inputs (captured, hand_over, x, *leaves). leaves: the
    trunk's parameters when this micro-batch's backward hands the sums over; else one placeholder leaf, which links
    the outputs to autograd without the parameters, so that the backward calls none of their AccumulateGrad
    nodes (nor DeepSpeed's hooks on them: 350 calls of host time per micro-batch at 1.3B). x's gradient
    comes back when x is a float tensor that needs one (a pipeline stage's input)."""

    @staticmethod
    def forward(ctx, captured: Captured, hand_over: bool, x: torch.Tensor, *leaves):
        captured.acc.start_accumulating()
        captured.input.copy_(x)
        with its_gpu(x):
            captured.forward.replay()
        captured.in_flight = True
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
        c.in_flight = False
        grad_x = c.grad_input.clone() if c.grad_input is not None and ctx.needs_input_grad[2] else None
        if not ctx.hand_over:
            return None, None, grad_x, None
        return (None, None, grad_x, *c.acc.hand_over())


class PendingSumsFn(torch.autograd.Function):
    """Identity on an eager trunk's first output, whose backward also hands the graphs' sums over to the
    parameters: a step whose last micro-batch has another shape (and runs eagerly) still applies its graphed
    micro-batches' gradients. Autograd adds them to the eager gradients before each parameter's
    AccumulateGrad runs, so its hooks fire once, with the step's whole gradient."""

    @staticmethod
    def forward(ctx, acc: Accumulation, out: torch.Tensor, *params):
        ctx.acc = acc
        return out.clone()   # not a view: callers may write into the trunk's output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return (None, grad_out, *ctx.acc.hand_over())


class TrainingGraphs:
    """model.trunk(input_ids) for training, replayed from CUDA graphs (see the module docstring).

    autocast_dtype: the dtype of the training's autocast (bf16), recorded into the graphs; None for none.
    hand_over: () -> bool, asked at each micro-batch's forward: whether its backward hands the summed
    gradients to the parameters (the last micro-batch of an optimizer step; DeepSpeed's
    is_gradient_accumulation_boundary() says the same at the forward and the backward); None: every
    backward does."""
    what = "the trunk's training"
    max_slots = 1   # micro-batches in flight: one (forward, backward, forward, ...)

    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None = None, hand_over=None):
        self.model, self.autocast_dtype, self.hand_over = model, autocast_dtype, hand_over
        self.slots: list[Captured] = []           # the first training shape's; other shapes run eagerly
        self.acc: Accumulation | None = None      # shared by the slots
        self.call_trunk = EagerTrunk(model)       # for torch.func.functional_call on parameter aliases

    @property
    def captured(self) -> Captured | None:
        return self.slots[0] if self.slots else None

    @staticmethod
    def on_gpu(x: torch.Tensor) -> bool:
        return x.is_cuda

    def parts(self) -> tuple[tuple[str, torch.nn.Module], ...]:
        """The graphed modules, by attribute name of the model."""
        return ("embed", self.model.embed), ("blocks", self.model.blocks)

    def is_training(self) -> bool:
        return self.model.training

    def hand_over_now(self) -> bool:
        return self.hand_over is None or bool(self.hand_over())

    def usable(self, x: torch.Tensor) -> bool:
        c = self.captured
        same_shape = c is None or (c.input.shape == x.shape and c.input.dtype == x.dtype
                                   and c.input.device == x.device)
        return self.on_gpu(x) and torch.is_grad_enabled() and self.is_training() and same_shape

    def __call__(self, x: torch.Tensor):
        # asked of every training micro-batch, graphed or not, so that a counting hand_over stays on the step
        hand_over = torch.is_grad_enabled() and self.is_training() and self.hand_over_now()
        if not self.usable(x):
            outs = self.model.eager_trunk(x)
            if hand_over and self.acc is not None and not self.acc.handed_over:
                # the step's last micro-batch runs eagerly: it carries the graphed micro-batches' sums over
                outs = (PendingSumsFn.apply(self.acc, outs[0], *self.acc.params), *outs[1:])
            return outs
        c = self.free_slot(x)
        c.acc.check_parameters()
        return GraphedTrunkFn.apply(c, hand_over, x, *(c.acc.params if hand_over else (c.acc.placeholder,)))

    def free_slot(self, x: torch.Tensor) -> Captured:
        """A slot whose micro-batch has had its backward; a new capture while all are in flight, up to
        max_slots. With one slot, a forward whose backward never ran (its outputs dropped) is replaced."""
        free = [c for c in self.slots if not c.in_flight]
        if free:
            return free[0]
        if len(self.slots) < self.max_slots:
            self.slots.append(capture_or_explain(lambda: self.capture(x), x.device, self.what,
                                                 "train with train.cuda_graphs=false"))
            return self.slots[-1]
        if self.max_slots == 1:
            return self.slots[0]
        raise RuntimeError(f"{self.what} CUDA graphs: {self.max_slots + 1} micro-batches in flight, at most "
                           f"{self.max_slots} expected (the pipeline schedule's)")

    def trunk_parameters(self) -> tuple[tuple[str, torch.nn.Parameter], ...]:
        """(name, parameter) of the graphed modules' parameters that train, each once (tied weights too)."""
        seen, out = set(), []
        for prefix, module in self.parts():
            for name, p in module.named_parameters(prefix=prefix):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return tuple(out)

    def cast_weights(self) -> set[int]:
        """ids of the graphed nn.Linear weights: autocast casts them to its dtype for every matmul."""
        if self.autocast_dtype is None:
            return set()
        return {id(m.weight) for _, part in self.parts() for m in part.modules() if isinstance(m, torch.nn.Linear)}

    def graph_inputs(self, named) -> tuple[torch.Tensor, ...]:
        """Per parameter, what the graphs compute with: a new copy in the autocast dtype for a matmul
        weight (filled by Accumulation.start_accumulating), else the parameter itself."""
        cast = self.cast_weights()
        return tuple(torch.empty_like(p, dtype=self.autocast_dtype) if id(p) in cast else p for _, p in named)

    def accumulation(self) -> Accumulation:
        """The slots' shared state, made at the first capture."""
        if self.acc is None:
            named = self.trunk_parameters()
            params = tuple(p for _, p in named)
            self.acc = Accumulation(params, self.graph_inputs(named), tuple(torch.zeros_like(p) for p in params),
                                    tuple(n for n, _ in named), tuple(p.data_ptr() for p in params))
        return self.acc

    def trunk_on_aliases(self, named, x: torch.Tensor, inputs=None):
        """The trunk on fresh leaf aliases of `inputs` (default: the named parameters), views of the same
        storage with autograd nodes of their own: (outputs, aliases). Tied weights follow their alias."""
        inputs = tuple(p for _, p in named) if inputs is None else inputs
        aliases = tuple(t.detach().requires_grad_(True) for t in inputs)
        by_name = {f"model.{name}": a for (name, _), a in zip(named, aliases)}
        return torch.func.functional_call(self.call_trunk, by_name, (x,), tie_weights=True), aliases

    @staticmethod
    def input_leaf(c: Captured) -> torch.Tensor:
        """What the graphs read the input through: a leaf that takes a gradient when the slot returns one."""
        return c.input if c.grad_input is None else c.input.detach().requires_grad_(True)

    def add_gradients(self, outs, aliases, grad_outs, grad_sums, x=None, grad_x=None) -> None:
        """The backward graph's work: each alias's gradient for grad_outs, added to its sum (a cast copy's
        gradient is cast up in the same pass); x's gradient written to grad_x when both are given."""
        wrt = tuple(aliases) + ((x,) if grad_x is not None else ())
        grads = torch.autograd.grad(outs, wrt, grad_outs, allow_unused=True)
        if grad_x is not None:
            *grads, g = grads
            grad_x.copy_(g) if g is not None else grad_x.zero_()
        used = [(s, g) for s, g in zip(grad_sums, grads) if g is not None]
        if used:
            torch._foreach_add_([s for s, _ in used], [g for _, g in used])

    def autocast(self, device_type: str = "cuda"):
        # without the autocast cache: its bf16 weight copies would be freed under the graph's feet
        if self.autocast_dtype is None:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self.autocast_dtype, cache_enabled=False)

    def new_slot(self, x: torch.Tensor) -> Captured:
        """A slot for inputs like x, graphs to be recorded; the shared sums ready for its first replay."""
        acc = self.accumulation()
        acc.start_accumulating()   # the cast copies are read by the warm-ups
        grad_input = torch.empty_like(x) if x.is_floating_point() else None
        return Captured(acc, x.clone(), (), (), None, None, grad_input)

    def capture(self, x: torch.Tensor) -> Captured:
        """Warm-up forward + backward calls on a side stream, then one of each under torch.cuda.graph, the
        backward as torch.autograd.grad of the captured outputs (the recipe of make_graphed_callables).
        Each slot has its own memory pool: slots in flight at once hold their activations at once."""
        c = self.new_slot(x)
        named = tuple(zip(c.acc.names, c.acc.params))

        def forward():
            leaf = self.input_leaf(c)
            outs, aliases = self.trunk_on_aliases(named, leaf, c.acc.inputs)
            return outs, aliases, leaf

        def warm_up():   # the gradients are dropped: another slot's micro-batch may be adding to the sums
            outs, aliases, leaf = forward()
            wrt = aliases + ((leaf,) if c.grad_input is not None else ())
            torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)

        with its_gpu(x), self.autocast():
            warm_up_on_side_stream(warm_up, WARMUP_CALLS)
            pool = torch.cuda.graph_pool_handle()
            c.forward = torch.cuda.CUDAGraph()
            with torch.cuda.graph(c.forward, pool=pool, capture_error_mode=CAPTURE_MODE):
                outs, aliases, leaf = forward()
            c.outputs, c.grad_outputs = tuple(outs), tuple(torch.empty_like(o) for o in outs)
            c.backward = torch.cuda.CUDAGraph()
            with torch.cuda.graph(c.backward, pool=pool, capture_error_mode=CAPTURE_MODE):
                self.add_gradients(outs, aliases, c.grad_outputs, c.acc.grad_sums, leaf, c.grad_input)
        return c


def every_nth_call(n: int):
    """A hand_over callable that says yes on every n-th call: the last micro-batch of each n-micro-batch step."""
    calls = itertools.count(1)
    return lambda: next(calls) % n == 0


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


class BlockRun(torch.nn.Module):
    """Consecutive blocks as one module: a stream in, the last block's stream out, as a tuple. Holds the
    blocks without owning them (they stay where they are registered)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def eager_trunk(self, stream):
        for block in self.blocks:
            stream = block(stream)
        return stream if isinstance(stream, tuple) else (stream,)


class StageGraphs(TrainingGraphs):
    """A pipeline stage's run of blocks (stream -> stream), replayed from CUDA graphs while training.

    A pipeline keeps several micro-batches in flight on a stage (1F1B: up to the number of stages from this
    one to the last): each gets its own slot, graphs and activations, captured when the schedule first
    needs it; every slot adds to the same gradient sums, handed over at the step's last backward. The
    backward replay also returns the gradient of the stage's input, which the previous stage needs."""
    what = "the pipeline stage's training"

    def __init__(self, blocks, autocast_dtype: torch.dtype | None = None, hand_over=None, max_slots: int = 1):
        super().__init__(BlockRun(blocks), autocast_dtype, hand_over)
        self.max_slots = max_slots

    def parts(self):
        return (("blocks", self.model.blocks),)

    def is_training(self) -> bool:
        return self.model.blocks[0].training   # BlockRun itself is nobody's child: its own flag never changes

    def __call__(self, stream):
        out = super().__call__(stream)
        return out[0] if len(out) == 1 else out
