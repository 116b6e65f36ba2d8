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
