"""The streaming loader: data-parallel split, shuffling, epochs, exact resume."""
import pickle
import random
from collections import Counter

import pytest
import torch
from data_pipeline_testlib import make_loader, read_all_samples, rows_of

pytestmark = pytest.mark.timeout(120)


def collect(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(dataset):
    everything = Counter(read_all_samples(dataset, "train"))
    n, dp, micro = sum(everything.values()), 2, 4
    per_rank = n // (dp * micro)  # batches per rank per epoch; the remainder is dropped (documented)
    seen, counts = Counter(), []
    for rank in range(dp):
        loader = make_loader(dataset, dp_rank=rank, dp_size=dp, micro_batch_size=micro, num_workers=2)
        batches = collect(loader)
        counts.append(len(batches))
        seen.update(row for b in batches for row in rows_of(b))
    assert counts == [per_rank, per_rank]
    assert sum(seen.values()) == dp * per_rank * micro
    assert all(seen[row] <= everything[row] for row in seen)  # nothing repeated, nothing foreign
    assert sum((everything - seen).values()) == n % (dp * micro)


def test_evaluation_split_scores_every_sample_exactly_once(dataset):
    everything = Counter(read_all_samples(dataset, "val"))
    dp, micro = 3, 2
    seen, counts = Counter(), []
    for rank in range(dp):
        batches = collect(make_loader(dataset, split="val", dp_rank=rank, dp_size=dp, micro_batch_size=micro))
        counts.append(len(batches))
        seen.update(row for b in batches for row in rows_of(b) if row)
    assert len(set(counts)) == 1  # equal batch counts: no rank waits on another
    assert seen == everything


def test_epochs_reshuffle_and_the_seed_decides(dataset):
    def rows(seed, epochs=2):
        loader = make_loader(dataset, micro_batch_size=4, epochs=epochs, seed=seed, num_workers=0)
        return [row for b in collect(loader) for row in rows_of(b)], loader

    a, loader = rows(seed=1)
    per_epoch = loader.batches_per_epoch * 4
    assert len(a) == 2 * per_epoch and loader.epoch == 2 and loader.samples_seen == 2 * per_epoch
    first, second = a[:per_epoch], a[per_epoch:]
    assert first != second and len(set(first) & set(second)) > 0.9 * per_epoch
    assert rows(seed=1)[0] == a
    assert rows(seed=2)[0][:per_epoch] != first
    plain = make_loader(dataset, shuffle=False, num_workers=0)
    in_order = [row for b in collect(plain) for row in rows_of(b)]
    assert in_order == read_all_samples(dataset, "train")[:len(in_order)]


def test_resume_at_random_steps_equals_the_uninterrupted_stream(dataset):
    kw = {"dp_rank": 1, "dp_size": 2, "micro_batch_size": 8, "grad_accum": 2, "epochs": None, "seed": 3}
    total = 60  # crosses several epoch boundaries
    reference = collect(make_loader(dataset, num_workers=2, **kw), total)
    assert make_loader(dataset, **kw).batches_per_epoch < total // 2
    rng = random.Random(0)
    for k, workers in zip(sorted(rng.sample(range(1, total), 4)), (2, 1, 2, 0)):
        first = make_loader(dataset, num_workers=2, **kw)
        head = collect(first, k)
        state = pickle.loads(pickle.dumps(first.state_dict()))
        resumed = make_loader(dataset, num_workers=workers, **kw)
        resumed.load_state_dict(state)
        assert resumed.samples_seen == k * 8
        tail = collect(resumed, total - k)
        assert_same_batches(head + tail, reference)


def test_breaking_out_and_iterating_again_continues_the_stream(dataset):
    reference = collect(make_loader(dataset, num_workers=2, epochs=None), 12)
    loader = make_loader(dataset, num_workers=2, epochs=None)
    parts = collect(loader, 5) + collect(loader, 4) + collect(loader, 3)
    assert_same_batches(parts, reference)


def test_pipeline_stages_of_one_replica_get_identical_batches(dataset):
    stage_a = collect(make_loader(dataset, dp_rank=1, dp_size=2, num_workers=2), 6)
    stage_b = collect(make_loader(dataset, dp_rank=1, dp_size=2, num_workers=1), 6)
    assert_same_batches(stage_a, stage_b)


def test_layout_change_on_resume_fails_clearly_or_restarts_at_next_epoch(dataset):
    old = make_loader(dataset, dp_size=2, micro_batch_size=4, grad_accum=2, epochs=None, num_workers=0)
    collect(old, 10)  # mid-epoch, at an optimizer step boundary (step 5)
    state = old.state_dict()
    with pytest.raises(ValueError, match="dp_size: checkpoint 2 vs now 4"):
        make_loader(dataset, dp_size=4, micro_batch_size=4, grad_accum=2, epochs=None).load_state_dict(state)
    new = make_loader(dataset, dp_size=4, micro_batch_size=4, grad_accum=1, epochs=None, num_workers=0,
                      reshard_on_resume=True)
    new.load_state_dict(state)
    assert new.epoch == 1 and new.samples_seen == 40
    fresh = make_loader(dataset, dp_size=4, micro_batch_size=4, grad_accum=1, epochs=None, num_workers=0)
    epoch1 = collect(fresh, fresh.batches_per_epoch + 2)[-2:]  # the first batches of epoch 1, new layout
    got = collect(new, 2)
    for a, b in zip(got, epoch1):
        assert torch.equal(a["targets"], b["targets"])
    # the optimizer-step numbering continues (step 5, 6), so the masks are those of steps 5 and 6
    from model.diffusion import mask_batch
    for step, batch in zip((5, 6), got):
        again = mask_batch(batch["targets"], seed=7, step=step, positions=torch.arange(4),
                           global_batch_size=16, mask_id=new.mask_id, loss_mask=batch["loss_mask"])
        assert torch.equal(again["input_ids"], batch["input_ids"])


def test_finite_epochs_stop_on_every_rank_together(dataset):
    counts = [len(collect(make_loader(dataset, dp_rank=r, dp_size=3, micro_batch_size=3, epochs=2)))
              for r in range(3)]
    loader = make_loader(dataset, dp_size=3, micro_batch_size=3, epochs=2)
    assert counts == [2 * loader.batches_per_epoch] * 3 and loader.num_batches == counts[0]
