"""model/linear.py: the autocast path of Linear against float64 and against plain autocast."""
import contextlib

import torch
import torch.nn.functional as F

from model import kernels
from model import linear as lin
from model.lm import DiffusionLM
from model.presets import get_preset

BF16 = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def fresh(out_features=48, in_features=40, shape=(3, 7)):
    layer = lin.Linear(in_features, out_features, bias=False)
    x = torch.randn(*shape, in_features, requires_grad=True)
    return layer, x, torch.randn(*shape, out_features)


def grads(layer, x, dy, *, reference=False):
    layer.weight.grad = x.grad = None
    forced = kernels.use_reference_kernels("linear") if reference else contextlib.nullcontext()
    with forced, autocast():
        y = layer(x)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad.clone(), layer.weight.grad.clone()


def test_matches_float64_on_the_rounded_inputs_and_beats_plain_autocast():
    torch.manual_seed(0)
    layer, x, dy = fresh()
    y, dx, dw = grads(layer, x, dy)
    y_ref, dx_ref, dw_ref = grads(layer, x, dy, reference=True)
    assert y.dtype == BF16 and dx.dtype == torch.float32 and dw.dtype == torch.float32
    # forward and input gradient: the same bf16 matmuls as autocast's
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-2, atol=1e-2)
    # weight gradient: fp32 accumulation of the bf16-rounded operands, never rounded to bf16 itself
    x64 = x.detach().to(BF16).double().reshape(-1, x.shape[-1])
    dy64 = dy.to(BF16).double().reshape(-1, dy.shape[-1])
    exact = dy64.t() @ x64
    ours = (dw.double() - exact).abs().max() / exact.abs().max()
    autocasts = (dw_ref.double() - exact).abs().max() / exact.abs().max()
    assert ours < 1e-6, ours
    assert autocasts > 10 * ours          # autocast hands back a bf16-rounded gradient


def test_plain_linear_outside_autocast_and_without_grad():
    torch.manual_seed(1)
    layer, x, dy = fresh()
    x64, w64 = x.detach().double(), layer.weight.detach().double()
    torch.testing.assert_close(layer(x).double(), x64 @ w64.t(), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), autocast():
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x.to(BF16), layer.weight.to(BF16)), rtol=0, atol=0)
    layer.double()
    torch.testing.assert_close(layer(x64), x64 @ w64.t())      # a float64 layer: plain F.linear


def test_weight_cache_reuses_one_copy_per_block_and_forgets_it_after():
    torch.manual_seed(2)
    layer, x, dy = fresh()
    casts = []
    real = lin._low_precision

    def counting(weight, dtype):
        out = real(weight, dtype)
        casts.append(out)
        return out

    lin._low_precision = counting
    try:
        with lin.low_precision_weight_cache():
            for _ in range(3):
                grads_before = None if layer.weight.grad is None else layer.weight.grad.clone()
                with autocast():
                    layer(x).backward(dy.to(BF16))
                assert grads_before is None or not torch.equal(grads_before, layer.weight.grad)
            assert len({id(c) for c in casts}) == 1          # one bf16 copy for three forwards
            assert len(lin._weight_cache) == 1
        assert lin._weight_cache is None
        with torch.no_grad():
            layer.weight.mul_(-1)                             # an optimizer step between two blocks
        with lin.low_precision_weight_cache(), autocast():
            y = layer(x)
    finally:
        lin._low_precision = real
    torch.testing.assert_close(y, F.linear(x.detach().to(BF16), layer.weight.detach().to(BF16)), rtol=0, atol=0)


def test_accumulated_gradients_equal_the_sum_of_exact_ones():
    """Three micro-batches inside one cache block: .grad = the sum of the float64 gradients."""
    torch.manual_seed(3)
    layer = lin.Linear(32, 24, bias=False)
    xs, dys = [torch.randn(5, 32) for _ in range(3)], [torch.randn(5, 24) for _ in range(3)]
    with lin.low_precision_weight_cache():
        for x, dy in zip(xs, dys):
            with autocast():
                y = layer(x)
            y.backward(dy.to(BF16))
    exact = sum(dy.to(BF16).double().t() @ x.to(BF16).double() for x, dy in zip(xs, dys))
    torch.testing.assert_close(layer.weight.grad.double(), exact, rtol=1e-6, atol=1e-6)


def test_a_model_trains_the_same_through_either_path():
    """Whole model under CPU autocast: loss equal, gradients as close as bf16 rounding of autocast's allows."""
    cfg = get_preset("tiny-diffumamba-h")
    cfg.layer_pattern = "MA"
    torch.manual_seed(4)
    model = DiffusionLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))

    def run(reference):
        model.zero_grad(set_to_none=True)
        forced = kernels.use_reference_kernels("linear") if reference else contextlib.nullcontext()
        with forced, autocast():
            loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, got = run(False)
    loss_ref, want = run(True)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=3e-2, atol=3e-3, msg=name)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 11 and all(type(m) is lin.Linear for m in linears)   # M: 4 + 2, A: 2 + 2, head
