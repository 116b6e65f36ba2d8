"""Random-ratio masking in the pipeline: global-batch positions, determinism across processes, statistics."""
import math
import subprocess
import sys

import pytest
import torch
from data_pipeline_testlib import REPO_ROOT, make_loader

from model.diffusion import DEFAULT_EPS, mask_batch

pytestmark = pytest.mark.timeout(120)

DP, MICRO, ACCUM = 2, 3, 2


def test_each_micro_batch_is_masked_at_its_global_batch_positions(dataset):
    mask_id = make_loader(dataset).mask_id
    for rank in range(DP):
        loader = make_loader(dataset, dp_rank=rank, dp_size=DP, micro_batch_size=MICRO, grad_accum=ACCUM,
                             seed=11, epochs=None)
        for k, batch in zip(range(7), loader):
            step, micro = divmod(k, ACCUM)
            positions = torch.tensor([(micro * DP + rank) * MICRO + j for j in range(MICRO)])
            expected = mask_batch(batch["targets"], seed=11, step=step, positions=positions,
                                  global_batch_size=MICRO * ACCUM * DP, mask_id=mask_id, eps=DEFAULT_EPS,
                                  loss_mask=batch["loss_mask"])
            for key in ("input_ids", "t", "loss_mask"):
                assert torch.equal(batch[key], expected[key]), (rank, k, key)
            assert batch["input_ids"].dtype == batch["targets"].dtype == torch.long
            assert batch["t"].dtype == batch["loss_mask"].dtype == torch.float32


def test_t_is_stratified_over_the_global_batch_of_each_step(dataset):
    n = MICRO * ACCUM * DP
    ts = {}
    for rank in range(DP):
        loader = make_loader(dataset, dp_rank=rank, dp_size=DP, micro_batch_size=MICRO, grad_accum=ACCUM,
                             seed=5, epochs=None, num_workers=0)
        for k, batch in zip(range(2 * ACCUM), loader):
            ts.setdefault(k // ACCUM, []).extend(batch["t"].tolist())
    for step_ts in ts.values():
        u = [(t - DEFAULT_EPS) / (1 - DEFAULT_EPS) * n for t in step_ts]
        strata = sorted(math.floor(x + 1e-4) for x in u)
        assert strata == list(range(n))  # one t per stratum [i/n, (i+1)/n) of the whole optimizer step


SCRIPT = """
import sys, torch
sys.path.insert(0, {testdir!r})
torch.set_num_threads(1)
from data_pipeline_testlib import make_loader
loader = make_loader({dataset!r}, dp_rank=1, dp_size=2, micro_batch_size=3, grad_accum=2, seed=9, epochs=None,
                     num_workers={workers})
loader.load_state_dict(torch.load({state!r}))
torch.save(next(iter(loader)), {out!r})
"""


def test_a_fresh_process_regenerates_the_same_masked_batch(dataset, tmp_path):
    kw = {"dp_rank": 1, "dp_size": 2, "micro_batch_size": 3, "grad_accum": 2, "seed": 9, "epochs": None}
    loader = make_loader(dataset, num_workers=2, **kw)
    it = iter(loader)
    for _ in range(5):
        next(it)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = next(it)
    del it
    script = SCRIPT.format(testdir=str(REPO_ROOT / "tests" / "data_pipeline"), dataset=str(dataset),
                           state=str(tmp_path / "state.pt"), out=str(tmp_path / "batch.pt"), workers=1)
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True, timeout=60)
    again = torch.load(tmp_path / "batch.pt")
    for key in expected:
        assert torch.equal(expected[key], again[key]), key


def test_mask_ratio_follows_t(dataset):
    loader = make_loader(dataset, micro_batch_size=8, grad_accum=1, seed=21, epochs=None, num_workers=0)
    mask_id = loader.mask_id
    fractions, ts, deviations = [], [], []
    for _, batch in zip(range(60), loader):
        real = batch["loss_mask"] > 0
        masked = batch["input_ids"] == mask_id
        assert not (masked & ~real).any()  # padding is never masked
        assert torch.equal(batch["input_ids"][~masked], batch["targets"][~masked])  # the rest is x_0
        assert (batch["targets"] != mask_id).all()
        for row in range(8):
            n = int(real[row].sum())
            frac = float(masked[row].sum()) / n
            t = float(batch["t"][row])
            fractions.append(frac)
            ts.append(t)
            deviations.append((frac - t) / math.sqrt(max(t * (1 - t), 1e-3) / n))
    n_rows = len(ts)
    # per row, the masked count is Binomial(n, t): standardized deviations have mean ~0 and variance ~1
    mean = sum(deviations) / n_rows
    var = sum(d * d for d in deviations) / n_rows
    assert abs(mean) < 4 / math.sqrt(n_rows) and 0.6 < var < 1.5
    corr = torch.corrcoef(torch.tensor([fractions, ts]))[0, 1]
    assert corr > 0.95
    assert min(ts) >= DEFAULT_EPS and max(ts) <= 1.0
