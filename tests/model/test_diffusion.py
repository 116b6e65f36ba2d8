import math

import torch

from model.diffusion import antithetic_t, diffusion_loss, mask_batch, subs_log_probs


def test_loss_on_hand_checkable_case():
    # vocab: 0, 1, 2 and [MASK]=3. One sequence of 3 tokens, t = 0.5, positions 0 and 2 masked.
    logits = torch.tensor([[[1.0, 2.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 3.0, 5.0]]])
    batch = {"input_ids": torch.tensor([[3, 1, 3]]), "targets": torch.tensor([[1, 1, 2]]),
             "t": torch.tensor([0.5]), "loss_mask": torch.ones(1, 3)}
    # -log softmax over the three real tokens ([MASK] gets no mass), by hand:
    nll0 = -(2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.0)))
    nll2 = -(3.0 - math.log(2 * math.exp(0.5) + math.exp(3.0)))
    expected = (nll0 + nll2) / 0.5 / 3  # 1/t weight, averaged over the 3 real tokens
    loss, stats = diffusion_loss(logits, batch, mask_id=3)
    assert abs(loss.item() - expected) < 1e-6
    assert abs(stats["nelbo_per_seq"].item() - (nll0 + nll2) / 0.5) < 1e-5


def test_padding_is_neither_masked_nor_counted():
    x0 = torch.randint(0, 5, (4, 12))
    loss_mask = torch.ones(4, 12)
    loss_mask[:, 8:] = 0
    b = mask_batch(x0, seed=3, step=0, positions=torch.arange(4), global_batch_size=4, mask_id=5,
                   loss_mask=loss_mask)
    assert (b["input_ids"][:, 8:] == x0[:, 8:]).all()
    _loss, stats = diffusion_loss(torch.randn(4, 12, 6), b, mask_id=5)
    assert torch.equal(stats["tokens_per_seq"], torch.full((4,), 8.0))


def test_subs_invariants():
    torch.manual_seed(0)
    V, mask_id = 7, 6
    x_t = torch.randint(0, V, (2, 10))
    logp = subs_log_probs(torch.randn(2, 10, V), x_t, mask_id)
    probs = logp.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(2, 10), atol=1e-6)
    assert (probs[..., mask_id] == 0).all()  # no mass on [MASK]
    unmasked = x_t != mask_id
    carried = probs.gather(-1, x_t.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(carried[unmasked], torch.ones_like(carried[unmasked]))  # carried over exactly


def test_antithetic_t_covers_eps_to_one():
    eps, n = 1e-3, 64
    for u in [0.25, 0.37, 0.5]:
        t = antithetic_t(u, torch.arange(n), n, eps)
        assert t.min() >= eps and t.max() <= 1.0
        strata = torch.floor((t.double() - eps) / (1 - eps) * n).long()
        assert sorted(strata.tolist()) == list(range(n))  # exactly one sample per stratum
    # the ends of (eps, 1] are reached
    assert abs(antithetic_t(0.0, torch.arange(n), n, eps).min().item() - eps) < 1e-6
    assert abs(antithetic_t(1 - 1e-9, torch.arange(n), n, eps).max().item() - 1.0) < 1e-6


def test_masking_is_pure_and_matches_t():
    x0 = torch.randint(0, 50, (16, 4096))
    kw = {"seed": 7, "step": 11, "global_batch_size": 32, "mask_id": 50}
    a = mask_batch(x0, positions=torch.arange(16) + 16, **kw)
    b = mask_batch(x0.clone(), positions=torch.arange(16) + 16, **kw)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["t"], b["t"])
    # the same row at the same global position is masked the same way in a differently shaped batch
    c = mask_batch(x0[3:4], positions=torch.tensor([19]), **kw)
    assert torch.equal(c["input_ids"][0], a["input_ids"][3])
    ratio = (a["input_ids"] == 50).float().mean(1)
    assert torch.allclose(ratio, a["t"], atol=4 / math.sqrt(4096))
    assert not torch.equal(mask_batch(x0, positions=torch.arange(16) + 16, **{**kw, "step": 12})["input_ids"],
                           a["input_ids"])
