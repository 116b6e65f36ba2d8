"""model/graphs.GraphedDenoiser. CUDA graphs themselves run only on a GPU (bench/gpu_validate.py compares a
graphed model's logits with the plain model's there); here: the eager fallback, and the per-shape cache
and static-buffer plumbing with the capture replaced by a stand-in graph whose replay recomputes the
trunk from the static input into the captured outputs, as a CUDA graph's replay rewrites them."""
import pytest
import torch
from graph_standins import OnGraphPath

from model import graphs
from model.graphs import GraphedDenoiser
from model.lm import DiffusionLM
from model.presets import get_preset
from model.sampler import sample


def tiny_model():
    torch.manual_seed(0)
    return DiffusionLM(get_preset("tiny-diffumamba-h")).eval()


def masked_ids(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 511, (batch, length), generator=g)
    mask = torch.rand(batch, length, generator=g) < 0.5
    ids[mask] = 511
    return ids, mask


class StandInGraph:
    def __init__(self, model, static_input, outputs):
        self.model, self.static_input, self.outputs = model, static_input, outputs

    def replay(self):
        for out, new in zip(self.outputs, self.model.trunk(self.static_input)):
            out.copy_(new)


class StandInCuda(OnGraphPath, GraphedDenoiser):
    """Takes the graph path on the CPU; counts captures."""

    def capture(self, input_ids):
        self.captures += 1
        static_input = input_ids.clone()
        outputs = self.model.trunk(static_input)
        return static_input, outputs, StandInGraph(self.model, static_input, outputs)


@torch.no_grad()
def test_cpu_runs_the_model_as_it_is():
    model = tiny_model()
    ids, mask = masked_ids(2, 24, seed=1)
    graphed = GraphedDenoiser(model)
    assert torch.equal(graphed(ids, mask), model(ids, mask)) and torch.equal(graphed(ids), model(ids))
    assert not graphed.graphs


@torch.no_grad()
def test_replays_per_shape_with_fresh_inputs_and_keeps_the_last_shapes():
    model = tiny_model()
    graphed = StandInCuda(model, max_shapes=2)
    for seed in (1, 2):                              # same shape, other tokens: one capture, fresh results
        ids, mask = masked_ids(2, 24, seed)
        assert torch.equal(graphed(ids, mask), model(ids, mask))
    assert graphed.captures == 1
    for shape in ((2, 32), (1, 24)):
        ids, mask = masked_ids(*shape, seed=3)
        assert torch.equal(graphed(ids, mask), model(ids, mask))
    assert graphed.captures == 3
    assert [key[0] for key in graphed.graphs] == [(2, 32), (1, 24)]     # (2, 24) dropped, the oldest
    ids, mask = masked_ids(2, 24, seed=4)
    assert torch.equal(graphed(ids), model(ids)) and graphed.captures == 4


def test_autograd_on_runs_the_model_as_it_is():
    model = tiny_model()
    graphed = StandInCuda(model)
    ids, _ = masked_ids(1, 16, seed=5)
    graphed(ids).sum().backward()
    assert graphed.captures == 0 and model.head.proj.weight.grad is not None


@torch.no_grad()
def test_a_failed_capture_stops_with_what_to_do_instead_and_an_oom_stays_an_oom(monkeypatch):
    """No eager fallback, and the GPU's random generator released from each failed capture (model/graphs.py;
    on a GPU: bench/graph_checks.py's denoiser_capture_checks draws after one)."""
    model = tiny_model()
    released = []
    monkeypatch.setattr(graphs, "release_generator", released.append)

    class Failing(StandInCuda):
        error = RuntimeError("operation not permitted when stream is capturing")

        def capture(self, input_ids):
            self.captures += 1
            raise self.error

    graphed = Failing(model)
    ids, mask = masked_ids(2, 16, seed=6)
    with pytest.raises(RuntimeError, match="denoiser's CUDA graph failed.*not permitted.*--no-cuda-graphs"):
        graphed(ids, mask)
    graphed.error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.cuda.OutOfMemoryError, match="Tried to allocate 2.00 GiB.*smaller batch"):
        graphed(ids, mask)
    # an OOM inside the capture, reported by the capture's end as another error: still an OOM, with remedies
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        finally:
            raise RuntimeError("operation failed due to a previous error during capture")
    except RuntimeError as during_capture:
        graphed.error = during_capture
    with pytest.raises(torch.cuda.OutOfMemoryError, match="ran out of GPU memory.*4.00 GiB.*smaller batch.*"
                                                          "--no-cuda-graphs"):
        graphed(ids, mask)
    assert graphed.captures == 3 and released == [ids.device] * 3, "the input's GPU's generator released"


def test_sampler_option_gives_the_same_samples():
    model = tiny_model()
    kwargs = {"batch_size": 2, "seq_len": 16, "steps": 8, "mask_id": model.cfg.mask_token_id, "seed": 3}
    assert torch.equal(sample(model, cuda_graphs=True, **kwargs), sample(model, **kwargs))
