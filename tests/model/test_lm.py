import pytest
import torch

from model.blocks import Block
from model.diffusion import mask_batch
from model.lm import DiffusionLM
from model.presets import get_preset


@pytest.mark.parametrize("kind", ["M", "A"])
def test_block_is_bidirectional(kind):
    torch.manual_seed(0)
    cfg = get_preset("tiny-diffumamba-h")
    block = Block(kind, cfg).double()
    x = torch.randn(2, 37, cfg.d_model, dtype=torch.float64)
    i = 17
    later, earlier = x.clone(), x.clone()
    later[:, 30] += 1.0
    earlier[:, 3] += 1.0
    y = block(x)
    assert (block(later)[:, i] - y[:, i]).abs().max() > 1e-6, "position i must see tokens after it"
    assert (block(earlier)[:, i] - y[:, i]).abs().max() > 1e-6, "position i must see tokens before it"


@pytest.mark.parametrize("preset", ["tiny-diffumamba", "tiny-diffumamba-h", "tiny-diffutran"])
def test_gradients_reach_every_parameter(preset):
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = DiffusionLM(cfg)
    x0 = torch.randint(0, cfg.vocab_size - 1, (4, 40))
    batch = mask_batch(x0, seed=0, step=0, positions=torch.arange(4), global_batch_size=4,
                       mask_id=cfg.mask_token_id)
    loss, _ = model.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"


def test_tied_and_untied_embeddings():
    cfg = get_preset("tiny-diffutran")
    tied = DiffusionLM(cfg)
    assert tied.head.proj.weight is tied.embed.tok.weight
    untied = DiffusionLM(cfg.replace(tie_embeddings=False))
    assert untied.head.proj.weight is not untied.embed.tok.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == cfg.vocab_size * cfg.d_model


def test_pipeline_layers_compose_to_forward():
    torch.manual_seed(0)
    model = DiffusionLM(get_preset("tiny-diffumamba-h"))
    ids = torch.randint(0, 500, (2, 20))
    h = ids
    for layer in model.pipeline_layers():
        h = layer(h)
    assert torch.allclose(h, model(ids))


def test_tiny_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    cfg = get_preset("tiny-diffumamba-h")
    model = DiffusionLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0 = torch.randint(0, 20, (8, 32))
    losses = []
    for step in range(30):
        batch = mask_batch(x0, seed=0, step=step, positions=torch.arange(8), global_batch_size=8,
                           mask_id=cfg.mask_token_id)
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_its_formula(dtype):
    """RMSNorm = x / sqrt(mean(x^2) + eps) * weight in fp32, cast back to the input dtype; checked against
    the formula written out in float64 (values and gradients) on random inputs and weights."""
    from model.blocks import RMSNorm
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = (3 * torch.randn(5, 7, 48)).to(dtype).requires_grad_(True)
    got = norm(x)
    assert got.dtype == dtype
    x64, w64 = x.detach().double().requires_grad_(True), norm.weight.detach().double().requires_grad_(True)
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    torch.testing.assert_close(got.double(), want, **tol)
    g = torch.randn_like(want).to(dtype)   # the same (rounded) output gradient for both
    got.backward(g)
    want.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
