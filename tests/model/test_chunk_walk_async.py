"""model/chunk_walk_async.py on the CPU, where its kernel cannot run: which inputs it takes, and its fall back
to the Triton walk where the installed Triton cannot build it. Its loop's structure is read from an sm_90
binary in tests/bench/test_kernel_resources.py; its results are checked on a GPU (bench.gpu_validate)."""
import pytest
import torch

from model import chunk_walk_async

CONFIG = {"CHUNK": 64, "BLOCK_P": 32, "num_warps": 4, "num_stages": 3}


def inputs(seqlen=128, heads=2, hdim=64, dstate=128):
    zxbcdt = torch.zeros(1, seqlen, 2 * heads * hdim + 2 * dstate, dtype=torch.bfloat16)
    z = zxbcdt[..., :heads * hdim].unflatten(-1, (heads, hdim))
    x = zxbcdt[..., heads * hdim:2 * heads * hdim].unflatten(-1, (heads, hdim))
    B = zxbcdt[..., 2 * heads * hdim:2 * heads * hdim + dstate].unflatten(-1, (1, dstate))
    C = zxbcdt[..., 2 * heads * hdim + dstate:].unflatten(-1, (1, dstate))
    return x, B, C, z


def test_it_takes_no_cpu_tensors():
    assert not chunk_walk_async.usable(*inputs(), CONFIG)


def test_it_takes_whole_chunks_of_64_and_at_most_32_channels_a_program(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    if not chunk_walk_async.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    assert chunk_walk_async.usable(*inputs(), CONFIG)
    assert not chunk_walk_async.usable(*inputs(seqlen=100), CONFIG), "a part chunk"
    assert not chunk_walk_async.usable(*inputs(), {**CONFIG, "BLOCK_P": 64}), "64 channels spill"
    assert not chunk_walk_async.usable(*inputs(), {**CONFIG, "CHUNK": 128})
    assert not chunk_walk_async.usable(*(t.float() for t in inputs()), CONFIG), "fp32"
    x, B, C, z = inputs()
    assert not chunk_walk_async.usable(x, B, C, z.contiguous().transpose(2, 3), CONFIG), "channels not contiguous"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert not chunk_walk_async.usable(*inputs(), CONFIG), "not an sm_90 GPU"


class Kernel:
    """A stand-in for the Gluon kernel: each launch raises `error` (or runs) and is counted."""

    def __init__(self, error=None):
        self.error, self.launches = error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            if self.error:
                raise self.error
        return launch


def launch_args():
    x, B, C, z = inputs()
    key = dA = torch.zeros(1, 2, 2, 64)
    return (x, key, dA, B, C, None, z, torch.ones(128), torch.empty_like(x), torch.empty(1, 128, 4)), CONFIG


def test_a_triton_that_cannot_build_it_warns_once_and_the_triton_walk_runs(monkeypatch):
    monkeypatch.setattr(chunk_walk_async, "_state", {"compiled": False, "failed": None})
    kernel = Kernel(RuntimeError("line 1\nasync_copy_global_to_shared has been removed"))
    monkeypatch.setattr(chunk_walk_async, "_walk_async_kernel", kernel, raising=False)
    args, config = launch_args()
    with pytest.warns(UserWarning, match="does not build with Triton .*has been removed.*the Triton walk runs"):
        assert chunk_walk_async.launch(*args, config) is False
    assert chunk_walk_async.launch(*args, config) is False
    assert kernel.launches == 1, "not tried again"


def test_after_a_launch_has_built_an_error_is_raised(monkeypatch):
    monkeypatch.setattr(chunk_walk_async, "_state", {"compiled": False, "failed": None})
    kernel = Kernel()
    monkeypatch.setattr(chunk_walk_async, "_walk_async_kernel", kernel, raising=False)
    args, config = launch_args()
    assert chunk_walk_async.launch(*args, config) is True
    kernel.error = RuntimeError("an illegal memory access")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        chunk_walk_async.launch(*args, config)
