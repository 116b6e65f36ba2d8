"""CUDA graphs for the denoiser at inference: the trunk's kernels recorded once per input shape, replayed
with one launch.

At batch 1 and short L a forward pass is bound by the host, not the GPU: a 1.3B DiffuMamba takes 65-70 ms
per forward at every L up to 8K on an H200, the time to launch ~30 kernels per Mamba direction (mamba-ssm's
chunked scan alone is five Triton kernels). A CUDA graph records the trunk (embedding and blocks) once for
an input shape and replays all of its kernels with one launch. The head runs after it as usual: the
positions it selects change from call to call.

A graph reads the weights where they were at capture (updates in place are seen, re-allocated
parameters are not) and writes its outputs into the same buffers each replay, so this is for inference on
fixed weights (sampling, benchmarks); training has its own graphs of forward and backward
(model/train_graphs.py). Anything else (CPU tensors, autograd on) runs the model as it is.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

WARMUP_CALLS = 2   # before capture, on a side stream: Triton compiling / autotuning, torch.compile, allocator


def its_gpu(tensor: torch.Tensor):
    """Make the tensor's GPU the current device (nothing for a CPU tensor)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def warm_up_on_side_stream(fn, calls: int) -> None:
    """fn() `calls` times on a side stream before a capture (PyTorch's recipe): Triton compiling and
    autotuning, torch.compile and the allocator's first requests stay out of the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def out_of_memory_in(error: BaseException) -> BaseException | None:
    """The CUDA OOM behind `error`, if any: the error itself or one it was raised from or during. When an
    OOM interrupts a capture, the capture's end may fail too (torch.cuda.graph ends it on the way out), and
    that error is raised with the OOM as its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def release_generator(device: torch.device) -> None:
    """The random generator of a GPU out of capture mode. When a capture fails, PyTorch does not end the
    generator's part in it, and the next random draw on that GPU fails with "Offset increment outside graph
    capture". A clone of its state (the same seed and offset) is in no capture."""
    with torch.cuda.device(device):   # "cuda" without an index: the current GPU
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
    generator.graphsafe_set_state(generator.clone_state())


def capture_or_explain(capture, device: torch.device, what: str, instead: str):
    """capture() on `device`, or an error that names what to do instead. The GPU's random generator is
    released from a failed capture (release_generator), so the process goes on (a benchmark's next row, a
    smaller batch). No eager fallback: a failed capture's cause (most often memory) is the caller's to fix.
    An OOM stays an OOM (also one that the end of the capture reported as another error), naming the
    remedies."""
    try:
        return capture()
    except Exception as e:
        release_generator(device)
        oom = out_of_memory_in(e)
        if oom is not None:
            raise torch.cuda.OutOfMemoryError(
                f"capturing {what} CUDA graph ran out of GPU memory ({oom}); use a smaller batch, or "
                f"{instead}") from e
        raise RuntimeError(f"capturing {what} CUDA graph failed ({e!r}); {instead}") from e


class GraphedDenoiser:
    """model(input_ids, score_mask) with the trunk replayed from a CUDA graph per input shape (the last
    `max_shapes` shapes are kept; each holds its own memory pool of one forward's activations)."""

    def __init__(self, model: torch.nn.Module, max_shapes: int = 2):
        self.model, self.max_shapes = model, max_shapes
        self.cfg = getattr(model, "cfg", None)
        self.graphs: OrderedDict = OrderedDict()   # (shape, device) -> (static input, trunk outputs, graph)

    @staticmethod
    def on_gpu(input_ids: torch.Tensor) -> bool:
        return input_ids.is_cuda

    def usable(self, input_ids: torch.Tensor) -> bool:
        return self.on_gpu(input_ids) and not torch.is_grad_enabled()

    def __call__(self, input_ids: torch.Tensor, score_mask=None) -> torch.Tensor:
        if not self.usable(input_ids):
            return self.model(input_ids, score_mask)
        trunk_out = self._replay(input_ids)
        return self.model.head(*trunk_out, score_mask)     # before the next replay overwrites trunk_out

    def _replay(self, input_ids: torch.Tensor):
        key = (tuple(input_ids.shape), input_ids.device)
        entry = self.graphs.pop(key, None)
        if entry is None:
            entry = capture_or_explain(lambda: self.capture(input_ids), input_ids.device, "the denoiser's",
                                       "run without graphs (dtrain sample --no-cuda-graphs)")
        self.graphs[key] = entry                           # the most recently used shape last
        while len(self.graphs) > self.max_shapes:
            self.graphs.popitem(last=False)
        static_input, trunk_out, graph = entry
        static_input.copy_(input_ids)
        with its_gpu(input_ids):
            graph.replay()
        return trunk_out

    def capture(self, input_ids: torch.Tensor):
        """(static input, trunk outputs, graph) for this input's shape (PyTorch's whole-network recipe:
        warm-up calls on a side stream, then one call under torch.cuda.graph)."""
        static_input = input_ids.clone()
        with its_gpu(input_ids):                       # streams and the capture on the input's GPU
            warm_up_on_side_stream(lambda: self.model.trunk(static_input), WARMUP_CALLS)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                trunk_out = self.model.trunk(static_input)
        return static_input, trunk_out, graph
