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

    def run(inp):
        hidden, residual = block(inp)
        return hidden + residual
    y = run(x)
    assert (run(later)[:, i] - y[:, i]).abs().max() > 1e-6, "position i must see tokens after it"
    assert (run(earlier)[:, i] - y[:, i]).abs().max() > 1e-6, "position i must see tokens before it"


def rms_norm64(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def layer_norm64(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) * torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps) * weight + bias


@pytest.mark.parametrize("kind", ["M", "A"])
def test_block_pair_is_the_plain_pre_norm_block(kind):
    """Block on (hidden, residual) = the textbook pre-norm block on x = hidden + residual:
    x1 = x + mixer(norm(x)), out = x1 + mlp(norm(x1)), written out here in float64 from the block's own
    mixer, MLP and norm weights; out = returned hidden + returned residual."""
    torch.manual_seed(1)
    cfg = get_preset("tiny-diffumamba-h")
    block = Block(kind, cfg).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(3, 19, cfg.d_model, dtype=torch.float64)
    residual = torch.randn(3, 19, cfg.d_model, dtype=torch.float64)
    x = hidden + residual
    eps = cfg.norm_eps
    x1 = x + block.mixer(rms_norm64(x, block.mixer_norm.weight, eps))
    want = x1 + block.mlp(rms_norm64(x1, block.mlp_norm.weight, eps))
    out_hidden, out_residual = block(hidden, residual)
    torch.testing.assert_close(out_hidden + out_residual, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_residual, x1, rtol=1e-12, atol=1e-12)
    first_hidden, first_residual = block(x)                  # block 0: no residual yet
    torch.testing.assert_close(first_hidden + first_residual, want, rtol=1e-12, atol=1e-12)


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
    out = (ids,)
    for layer in model.pipeline_layers():
        out = layer(*out)
        out = out if isinstance(out, tuple) else (out,)
    assert torch.allclose(out[0], model(ids))


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


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_norm_matches_its_formula(norm, dtype):
    """AddNorm(hidden, residual) = (norm(residual + hidden), residual + hidden) with the norm in fp32 and
    the output in hidden's dtype, the stream in fp32; against the formula written out in float64 (values
    and gradients of hidden, residual, weight and bias) on random inputs and weights."""
    from model.blocks import AddNorm
    torch.manual_seed(0)
    module = AddNorm(48, eps=1e-5, kind=norm)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    hidden = (3 * torch.randn(5, 7, 48)).to(dtype).requires_grad_(True)
    residual = (3 * torch.randn(5, 7, 48)).requires_grad_(True)
    out, stream = module(hidden, residual)
    assert out.dtype == dtype and stream.dtype == torch.float32
    h64, r64 = (t.detach().double().requires_grad_(True) for t in (hidden, residual))
    params64 = [p.detach().double().requires_grad_(True) for p in module.parameters()]
    x64 = h64 + r64
    want = rms_norm64(x64, params64[0], 1e-5) if norm == "rmsnorm" else layer_norm64(x64, *params64, 1e-5)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(stream.double(), x64, rtol=1e-6, atol=1e-6)
    g, g_stream = torch.randn_like(want).to(dtype), torch.randn(5, 7, 48)   # the same (rounded) gradients
    torch.autograd.backward([out, stream], [g, g_stream])
    torch.autograd.backward([want, x64], [g.double(), g_stream.double()])
    torch.testing.assert_close(hidden.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(residual.grad.double(), r64.grad, **tol)
    for p, p64 in zip(module.parameters(), params64):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-4)
