import torch

from model.lm import DiffusionLM
from model.presets import get_preset
from model.sampler import sample


def _model():
    torch.manual_seed(0)
    return DiffusionLM(get_preset("tiny-diffumamba-h")).eval()


def test_no_mask_left_and_reproducible():
    model = _model()
    mask_id = model.cfg.mask_token_id
    a, stats = sample(model, batch_size=3, seq_len=24, steps=16, mask_id=mask_id, seed=5, return_stats=True)
    b = sample(model, batch_size=3, seq_len=24, steps=16, mask_id=mask_id, seed=5)
    c = sample(model, batch_size=3, seq_len=24, steps=16, mask_id=mask_id, seed=6)
    assert a.shape == (3, 24)
    assert not (a == mask_id).any()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert 1 <= stats["network_evaluations"] <= 17


def test_prefix_is_respected():
    model = _model()
    prefix = torch.tensor([5, 6, 7, 8, 9])
    out = sample(model, batch_size=2, seq_len=16, steps=8, mask_id=model.cfg.mask_token_id, prefix=prefix)
    assert torch.equal(out[:, :5], prefix.expand(2, -1))


def test_cache_skips_network_when_nothing_changes():
    # With many more steps than tokens most steps unmask nothing, so the cached prediction is reused.
    model = _model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    _, stats = sample(model, batch_size=1, seq_len=4, steps=200, mask_id=model.cfg.mask_token_id,
                      return_stats=True)
    assert len(calls) == stats["network_evaluations"] <= 5 + 1


def test_one_reverse_step_follows_the_posterior(monkeypatch):
    """Fixed p_theta = (0.1, 0.2, 0.3, 0.4) over 4 tokens ([MASK] = 4 gets no mass, whatever its logit), one
    step from t = 1 to s = 0.4: a position is unmasked with probability 1 - s = 0.6 into token v with
    probability p(v), else stays masked and the final noise removal picks the argmax, token 3. Expected
    frequencies, by hand: 0.06, 0.12, 0.18, 0.24 + 0.4 = 0.64. The network is asked for masked positions only,
    and the posterior rows are formed in blocks (a small block size here)."""
    from model import sampler
    monkeypatch.setattr(sampler, "ROWS_PER_BLOCK", 777)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    seen = []

    def logits_fn(x_t, score_mask):
        assert torch.equal(score_mask, x_t == 4)
        seen.append(int(score_mask.sum()))
        logits = torch.cat([p.log(), torch.tensor([5.0])])   # a large [MASK] logit must not matter
        return logits.expand(seen[-1], -1)

    n = 20_000
    x, stats = sampler.sample_with(logits_fn, device="cpu", batch_size=2, seq_len=n // 2, steps=1, mask_id=4,
                                   seed=3, eps=0.4, return_stats=True)
    freq = torch.bincount(x.flatten(), minlength=5).double() / n
    want = torch.tensor([0.06, 0.12, 0.18, 0.64, 0.0], dtype=torch.float64)
    assert (freq - want).abs().max() < 0.015, freq   # 4 standard deviations at n = 20,000
    assert stats["network_evaluations"] == 2 and seen[0] == n and 0 < seen[1] < n
