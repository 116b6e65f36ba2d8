"""`dckpt reshard`: a checkpoint saved under one DP / PP / ZeRO layout resumes under another.

How "the resumed run continues the original" is checked. A different data-parallel size legitimately
changes the data: the loader splits each epoch by rank, so the samples of a step depend on dp_size, and a
resharded resume (data.reshard_on_resume) continues at the next epoch boundary. So the comparison is with
a plain-PyTorch reference (ckpt_testlib.Reference) that trains steps 1-4 on the original layout's batches,
then steps 5-8 on exactly the batches the resumed layout reads (the data pipeline's own loaders, resumed
from the state the original run saved). Checked:
  * the reference reproduces the original run (its logged losses, steps 1-8 / 1-4), so it is a faithful
    continuation;
  * the universal checkpoint holds the reference's step-4 weights and Adam moments, and step count 4;
  * each resumed run logs the reference's losses for steps 5-8. Step 5's loss is computed with the
    restored weights before any update (a fixed batch right after the resume); steps 6-8 also need the
    Adam moments and step count (bias correction) to have carried over;
  * the resumed runs' own final checkpoints hold Adam step 8.
Tolerance: relative 2e-5 on losses, which only float summation order (flat ZeRO buffers, all-reduce vs one
process) may explain; a lost optimizer state or step count moves the losses by 1e-3 or more here.
"""
import json

import pytest
import torch
from ckpt_testlib import (
    Reference,
    adam_steps,
    base_config,
    build_dataset,
    check_ok,
    dckpt,
    launch,
    loader_state,
    loaders,
    scalars,
)

pytestmark = pytest.mark.slow
RTOL = 2e-5
QUIET = {"logging": {"num_samples": 0}}


@pytest.fixture(scope="module")
def dataset():
    return build_dataset()


def reference_losses(cfg, dataset, first: dict, then: dict, ckpt_dir, steps=8, split_at=4):
    """Reference losses of steps 1..steps: steps 1..split_at with layout `first`, the rest with `then`
    (dp_size, micro, ga), the second loader resumed from the state saved in ckpt_dir. Returns (losses, ref
    state after split_at)."""
    ref = Reference(cfg, dataset)
    its = loaders(cfg, dataset, **first)
    losses = {s: ref.train_step(its, first["ga"], steps) for s in range(1, split_at + 1)}
    at_split = ref.named_state()
    if then is not None:
        its = loaders(cfg, dataset, state=loader_state(ckpt_dir), **then)
        ga = then["ga"]
    else:
        ga = first["ga"]
    losses.update({s: ref.train_step(its, ga, steps) for s in range(split_at + 1, steps + 1)})
    return losses, at_split


@pytest.fixture(scope="module")
def zero2(dataset, tmp_path_factory):
    """DP=2 ZeRO-2, 8 steps (checkpoints at 4 and 8), and the step-4 checkpoint resharded."""
    tmp = tmp_path_factory.mktemp("zero2")
    cfg = base_config(tmp / "orig", dataset, parallel={"zero_stage": 2}, train={"eval_interval": 0},
                      **QUIET)
    check_ok(launch(cfg, tmp))
    ck = tmp / "orig" / "checkpoints" / "step00000004"
    before = json.loads((ck / "checksums.json").read_text())
    proc = dckpt("reshard", ck, tmp / "universal")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.reshard_on_resume=true" in proc.stdout   # the data-loader behaviour is spelled out
    assert json.loads((ck / "checksums.json").read_text()) == before
    assert dckpt("verify", ck).returncode == 0            # the input is untouched (no file changed or added)
    return {"cfg": cfg, "tmp": tmp, "ckpt": ck, "universal": tmp / "universal",
            "losses": scalars(tmp / "orig")["train/loss"]}


def test_universal_checkpoint_holds_the_reference_state(zero2, dataset):
    cfg, uc = zero2["cfg"], zero2["universal"] / "step00000004"
    layout = {"dp_size": 2, "micro": 4, "ga": 2}
    losses, at4 = reference_losses(cfg, dataset, layout, None, None)
    for s in range(1, 9):   # the reference is the original run, continued on its own data
        assert zero2["losses"][s] == pytest.approx(losses[s], rel=RTOL), (s, zero2["losses"], losses)
    for name, want in at4.items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            got = torch.load(uc / "zero" / name / f"{key}.pt", weights_only=False)["param"]
            scale = want[key].abs().max().item()
            assert torch.allclose(got, want[key], rtol=1e-4, atol=1e-5 * scale), (name, key)
        assert float(torch.load(uc / "zero" / name / "step.pt", weights_only=False)) == 4.0
    # pipeline names resolve to the same folders (a pipeline resume reads them)
    assert (uc / "zero" / "tied_modules.embed.tok.weight" / "fp32.pt").is_file()
    assert (uc / "zero" / "1.mixer.fwd.in_proj.weight").resolve() == (uc / "zero" / "blocks.0.mixer.fwd.in_proj.weight").resolve()
    marker = json.loads((uc / "COMPLETE").read_text())
    assert marker["universal"] and marker["step"] == 4 and marker["source_layout"]["dp_size"] == 2
    assert marker["tokens"] == 4 * 16 * 32
    assert (zero2["universal"] / "latest").read_text() == "step00000004"


@pytest.mark.parametrize("nproc, parallel, fused", [
    (1, {"zero_stage": 2}, False), (2, {"zero_stage": 1, "pipeline_stages": 2}, False), (1, {"zero_stage": 3}, False),
    (2, {"zero_stage": 1, "pipeline_stages": 2}, True)], ids=["dp1-zero2", "pp2-zero1", "dp1-zero3", "pp2-zero1-fused"])
def test_resume_on_another_layout_continues_the_run(zero2, dataset, nproc, parallel, fused):
    """DP=2 ZeRO-2 -> DP=1 (ZeRO-2 or ZeRO-3) or PP=2 (ZeRO-1); the same global batch of 16 (grad_accum 4).
    `fused`: torch's fused AdamW, the default, through the universal load (False: the foreach one). On a GPU
    the fused one needs each Adam step as a float32 tensor on its parameter's device; here everything is on
    the CPU, so the move itself is covered by tests/dtrain/test_checkpoint.py."""
    tmp = zero2["tmp"]
    name = "res-" + "-".join(f"{k}{v}" for k, v in parallel.items()) + ("-fused" if fused else "")
    cfg = base_config(tmp / name, dataset, parallel=parallel, train={"eval_interval": 0, "grad_accum": 4},
                      data={"reshard_on_resume": True}, optim={"fused": fused}, **QUIET)
    proc = launch(cfg, tmp, nproc=nproc, args=("--resume", str(zero2["universal"])))
    check_ok(proc)
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    got = scalars(tmp / name)["train/loss"]
    assert sorted(got) == [5, 6, 7, 8]
    want, _ = reference_losses(zero2["cfg"], dataset, {"dp_size": 2, "micro": 4, "ga": 2},
                               {"dp_size": 1, "micro": 4, "ga": 4}, zero2["ckpt"])
    for s in (5, 6, 7, 8):
        assert got[s] == pytest.approx(want[s], rel=RTOL), (s, got, want)
    final = tmp / name / "checkpoints" / "step00000008"
    if parallel["zero_stage"] < 3:
        assert adam_steps(final) == {8.0}
    assert json.loads((final / "COMPLETE").read_text())["tokens"] == 8 * 16 * 32


def test_pipeline_checkpoint_resumes_data_parallel(dataset, tmp_path):
    """PP=2 (ZeRO-1) -> reshard step 4 -> DP=2 ZeRO-1 (global batch 8 both times)."""
    cfg = base_config(tmp_path / "pp", dataset, parallel={"zero_stage": 1, "pipeline_stages": 2},
                      train={"eval_interval": 0}, **QUIET)
    check_ok(launch(cfg, tmp_path))
    ck = tmp_path / "pp" / "checkpoints" / "step00000004"
    assert dckpt("reshard", ck, tmp_path / "uc").returncode == 0
    res = base_config(tmp_path / "dp", dataset, parallel={"zero_stage": 1}, train={"eval_interval": 0, "grad_accum": 1},
                      data={"reshard_on_resume": True}, **QUIET)
    check_ok(launch(res, tmp_path, args=("--resume", str(tmp_path / "uc" / "step00000004"))))
    got = scalars(tmp_path / "dp")["train/loss"]
    want, _ = reference_losses(cfg, dataset, {"dp_size": 1, "micro": 4, "ga": 2}, {"dp_size": 2, "micro": 4, "ga": 1}, ck)
    orig = scalars(tmp_path / "pp")["train/loss"]
    for s in (1, 2, 3, 4):
        assert orig[s] == pytest.approx(want[s], rel=RTOL), (s, orig, want)
    for s in (5, 6, 7, 8):
        assert got[s] == pytest.approx(want[s], rel=RTOL), (s, got, want)
    assert adam_steps(tmp_path / "dp" / "checkpoints" / "step00000008") == {8.0}


def test_reshard_refuses_existing_output_and_incomplete_input(zero2, tmp_path):
    (tmp_path / "taken").mkdir()
    proc = dckpt("reshard", zero2["ckpt"], tmp_path / "taken")
    assert proc.returncode == 2 and "already exists" in proc.stderr and not any((tmp_path / "taken").iterdir())
    torn = tmp_path / "step00000004"
    torn.mkdir()
    for f in zero2["ckpt"].iterdir():
        if f.name != "COMPLETE":
            (torn / f.name).symlink_to(f)
    proc = dckpt("reshard", torn, tmp_path / "out")
    assert proc.returncode == 2 and "incomplete" in proc.stderr and not (tmp_path / "out").exists()
