"""Multi-process training on CPU (2 ranks, gloo): ZeRO-1/2/3 and 2-stage pipeline parallelism.

Each test launches `dtrain train` in fresh processes and reads back what the run wrote: TensorBoard
scalars, checkpoints, exit codes. Reference numbers come from plain PyTorch in this process.
"""
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, base_config, check_ok, cpu_env, launch, plain_model_config, scalars

from dtrain.checkpoint import consolidated_model_state

pytestmark = pytest.mark.slow

TB_TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/skipped_steps", "perf/tokens_per_s",
           "perf/step_time_s", "perf/data_wait_s", "perf/mfu", "eval/ppl_bound", "eval/nelbo_per_token"]


def evaluate_cli(checkpoint) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dtrain.cli", "eval", "--checkpoint", str(checkpoint)], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = "\n" + proc.stdout
    return json.loads(out[out.rindex("\n{") + 1:])   # the JSON block printed last


def losses(tb: dict) -> list[float]:
    return [tb["train/loss"][s] for s in sorted(tb["train/loss"])]


def learned(tb: dict) -> bool:
    """The loss went down: the validation NELBO (fixed batches and masks, so not noisy like the 1/t-weighted
    training loss of a 16-sequence batch) falls between evaluations and ends below the first training loss."""
    ev = [tb["eval/nelbo_per_token"][s] for s in sorted(tb["eval/nelbo_per_token"])]
    return len(ev) >= 2 and ev[-1] < ev[0] < tb["train/loss"][1]


def test_zero1_checkpoint_resume_and_interrupted_write(tmp_path, dataset):
    """ZeRO-1: trains; logs every scalar; a NaN step is skipped; a checkpoint killed mid-write is ignored by
    --resume auto, and the resumed process reproduces the uninterrupted run's losses exactly."""
    ref_cfg = base_config(tmp_path / "ref", dataset, debug={"nan_at_steps": [2]},
                          logging={"peak_flops_per_gpu": 1e11})
    check_ok(ref := launch(ref_cfg, tmp_path))
    tb = scalars(tmp_path / "ref")
    for tag in TB_TAGS:
        assert tag in tb, f"{tag} missing from TensorBoard; have {sorted(tb)}"
    assert any(t.startswith("train/loss_t/") for t in tb), sorted(tb)
    assert any("samples" in t for t in tb["_tensors"]), tb["_tensors"]
    assert sorted(tb["train/loss"]) == list(range(1, 9))
    assert not math.isfinite(tb["train/loss"][2]) and tb["train/skipped_steps"][2] == 1  # NaN step skipped
    assert tb["train/skipped_steps"][8] == 1 and "skipped" in ref.stdout
    # the first step, slow on a fresh GPU node, is announced and timed (once, by rank 0)
    assert re.findall(r"step (\d+): the first step (runs now|took \d+\.\d s)", ref.stdout) == [
        ("1", "runs now"), ("1", re.search(r"took \d+\.\d s", ref.stdout)[0])], ref.stdout
    assert learned(tb), (losses(tb), tb["eval/nelbo_per_token"])
    ckpts = tmp_path / "ref" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000008"
    assert all((ckpts / f"step0000000{s}" / "COMPLETE").is_file() for s in (4, 8))
    assert (tmp_path / "ref" / "config.yaml").is_file() and (ckpts / "step00000008" / "config.yaml").is_file()
    assert len(list((ckpts / "step00000008").glob("trainer_rank*.pt"))) == 2   # per-rank loader state
    check_consolidated(ckpts / "step00000008", ref_cfg, dataset, tb["eval/nelbo_per_token"][8], dp_size=2)
    # `dtrain eval` in one process on the 2-rank checkpoint = plain PyTorch on the consolidated weights
    ev = evaluate_cli(ckpts)
    assert ev["checkpoint"].endswith("step00000008")
    model = plain_model(ref_cfg, dataset)
    model.load_state_dict(consolidated_model_state(ckpts / "step00000008", model.cfg))
    t = ref_cfg["train"]
    want = plain_nelbo(model, ref_cfg, split="val", dp_size=1, micro_batches=t["eval_iters"] * t["grad_accum"])
    assert ev["eval/nelbo_per_token"] == pytest.approx(want, rel=1e-5)

    # same run, killed while writing the step-8 checkpoint (after DeepSpeed's shards, before COMPLETE)
    crash_cfg = base_config(tmp_path / "crash", dataset, debug={"nan_at_steps": [2], "crash_in_checkpoint_at_step": 8})
    crash = launch(crash_cfg, tmp_path)
    assert crash.returncode != 0
    ck = tmp_path / "crash" / "checkpoints"
    assert (ck / "step00000008").is_dir() and not (ck / "step00000008" / "COMPLETE").exists()
    assert (ck / "latest").read_text() == "step00000004"
    (ck / "latest").write_text("step00000008")   # even a `latest` naming the torn folder must not be trusted

    res_cfg = base_config(tmp_path / "resumed", dataset, debug={"nan_at_steps": [2]},
                          checkpoint={"dir": str(ck)})
    check_ok(res := launch(res_cfg, tmp_path, args=("--resume", "auto")))
    assert "step00000004" in res.stdout and "resumed from" in res.stdout
    assert "step 5: the first step runs now" in res.stdout and "step 1: the first" not in res.stdout
    got = scalars(tmp_path / "resumed")["train/loss"]
    assert sorted(got) == [5, 6, 7, 8]
    for s in (5, 6, 7, 8):
        assert got[s] == tb["train/loss"][s], (s, got[s], tb["train/loss"][s])


def test_skipped_steps_are_booked_a_step_late_and_exactly_at_log_and_checkpoint_steps(tmp_path, dataset):
    """The host learns a step's verdict one step later (dtrain/zero_step.py, dtrain/step_flags.py), except at a
    log or checkpoint step, which waits for it so that logs and checkpoints count exactly; a run of bad steps that
    ends between log steps still stops the run, a step late."""
    cfg = base_config(tmp_path / "late", dataset, train={"steps": 6, "eval_interval": 0, "max_consecutive_nan": 2},
                      logging={"log_interval": 3, "num_samples": 0}, checkpoint={"interval": 3},
                      debug={"nan_at_steps": [2, 4, 5]})
    proc = launch(cfg, tmp_path)
    assert proc.returncode != 0, proc.stdout[-4000:]
    skips = re.findall(r"step (\d+): non-finite loss or gradient norm; step skipped \((\d+) in a row, (\d+) in total\)",
                       proc.stdout)
    assert skips == [("2", "1", "1"), ("4", "1", "2"), ("5", "2", "3")], proc.stdout
    assert "step 5: 2 consecutive steps with a non-finite loss (train.max_consecutive_nan=2)" in proc.stderr
    tb = scalars(tmp_path / "late")
    # logged at step 3 with step 2 in it; at step 6, the last log before the stop, with steps 4 and 5
    assert tb["train/skipped_steps"] == {3: 1.0, 6: 3.0}, tb["train/skipped_steps"]
    ckpts = tmp_path / "late" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000003"]   # the stop comes before step 6's
    saved = torch.load(ckpts / "step00000003" / "trainer_rank00000.pt", weights_only=False)
    assert (saved["step"], saved["skipped_steps"]) == (3, 1), saved


@pytest.mark.parametrize("zero, extra", [(2, {"precision": "bf16"}), (3, {"activation_checkpointing": True})],
                         ids=["zero2-bf16", "zero3-actckpt"])
def test_zero_stages_train(tmp_path, dataset, zero, extra):
    """ZeRO-2 (bf16) and ZeRO-3 (activation checkpointing) train; a NaN step leaves the weights untouched;
    only the last checkpoint.keep checkpoints stay."""
    cfg = base_config(tmp_path / f"z{zero}", dataset, parallel={"zero_stage": zero}, train=extra,
                      checkpoint={"interval": 1, "keep": 7}, debug={"nan_at_steps": [3]})
    check_ok(launch(cfg, tmp_path))
    tb = scalars(tmp_path / f"z{zero}")
    assert learned(tb), (losses(tb), tb["eval/nelbo_per_token"])
    ckpts = tmp_path / f"z{zero}" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*")) == [f"step0000000{s}" for s in range(2, 9)]
    model_cfg = plain_model(cfg, dataset).cfg
    w2, w3, w4 = (consolidated_model_state(ckpts / f"step0000000{s}", model_cfg) for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)          # step 3 was skipped
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)      # step 4 was not
    if extra.get("precision") != "bf16":   # bf16 evaluation differs from the fp32 reference by rounding
        check_consolidated(ckpts / "step00000008", cfg, dataset, tb["eval/nelbo_per_token"][8], dp_size=2)


def plain_model(cfg: dict, dataset):
    """DiffusionLM built in plain PyTorch from the run's model section, with the run seed."""
    from model.lm import DiffusionLM

    model_cfg = plain_model_config(cfg, dataset)
    torch.manual_seed(cfg["run"]["seed"])
    return DiffusionLM(model_cfg)


def plain_nelbo(model, cfg: dict, *, split: str, dp_size: int, micro_batches: int) -> float:
    """NELBO per token of `model` on the first micro-batches of every data-parallel rank's stream."""
    from data_pipeline.config import DataConfig
    from data_pipeline.stream import MaskedBatchLoader
    from model.diffusion import diffusion_loss

    t, mask_id = cfg["train"], model.cfg.mask_token_id
    nelbo = tokens = 0.0
    with torch.no_grad():
        for r in range(dp_size):
            loader = MaskedBatchLoader(DataConfig.from_dict(cfg["data"]), split=split, dp_rank=r, dp_size=dp_size,
                                       micro_batch_size=t["micro_batch_size"], grad_accum=t["grad_accum"],
                                       mask_id=mask_id, seed=cfg["run"]["seed"])
            for _, batch in zip(range(micro_batches), loader):
                _, stats = diffusion_loss(model(batch["input_ids"]), batch, mask_id)
                nelbo += stats["nelbo_per_seq"].double().sum().item()
                tokens += stats["tokens_per_seq"].double().sum().item()
    return nelbo / tokens


def check_consolidated(ckpt_dir, cfg: dict, dataset, logged_eval: float, dp_size: int) -> None:
    """The fp32 weights gathered from a (sharded) checkpoint give the evaluation the run logged."""
    model = plain_model(cfg, dataset)
    model.load_state_dict(consolidated_model_state(ckpt_dir, model.cfg))
    t = cfg["train"]
    got = plain_nelbo(model, cfg, split="val", dp_size=dp_size, micro_batches=t["eval_iters"] * t["grad_accum"])
    assert got == pytest.approx(logged_eval, rel=1e-5)


def test_pipeline_two_stages(tmp_path, dataset):
    """PP=2 + ZeRO-1: same first-batch loss as plain PyTorch, trains, and stops after 2 NaN steps in a row."""
    cfg = base_config(tmp_path / "pp", dataset, parallel={"pipeline_stages": 2, "zero_stage": 1},
                      train={"max_consecutive_nan": 2, "eval_interval": 3}, debug={"nan_at_steps": [7, 8]},
                      checkpoint={"interval": 3})
    proc = launch(cfg, tmp_path)
    assert proc.returncode != 0, proc.stderr[-4000:]   # workers exit 2; torchrun reports 1
    assert "consecutive" in proc.stderr and "train.max_consecutive_nan=2" in proc.stderr
    tb = scalars(tmp_path / "pp")
    assert learned(tb), (losses(tb), tb["eval/nelbo_per_token"])
    ref = plain_nelbo(plain_model(cfg, dataset), cfg, split="train", dp_size=1,
                      micro_batches=cfg["train"]["grad_accum"])
    assert tb["train/loss"][1] == pytest.approx(ref, rel=1e-5), (tb["train/loss"][1], ref)
    assert tb["train/skipped_steps"][8] == 2
    ck = tmp_path / "pp" / "checkpoints" / "step00000006"
    check_consolidated(ck, cfg, dataset, tb["eval/nelbo_per_token"][6], dp_size=1)
    # the tied embedding: one copy per end stage, trained, and still identical
    first, last = (torch.load(ck / f"layer_{i:02d}-model_states.pt")["tok.weight"] for i in (0, 5))
    assert torch.equal(first, last)
    assert not torch.equal(first, plain_model(cfg, dataset).embed.tok.weight)


@pytest.mark.parametrize("layout", [{"zero_stage": 1}, {"zero_stage": 2}, {"zero_stage": 1, "pipeline_stages": 2}],
                         ids=["zero1", "zero2", "pp2"])
def test_zero_overlap_comm_trains_to_the_same_losses(tmp_path, dataset, layout):
    """parallel.overlap_comm / reduce_bucket_size / contiguous_gradients reach DeepSpeed and leave the numbers
    alone: with the reduction overlapped, in small buckets and without the bucket copy (the large configs'
    ZeRO-1 DP, ZeRO-2, and ZeRO-1 under a 2-stage pipeline) a run logs the losses of the default run (fp32,
    2 ranks)."""
    runs = {}
    for name, parallel in (("default", {}), ("overlap", {"overlap_comm": True, "reduce_bucket_size": 20000,
                                                         "contiguous_gradients": False})):
        cfg = base_config(tmp_path / name, dataset, parallel={**layout, **parallel},
                          train={"steps": 4, "eval_interval": 0}, checkpoint={"interval": 0, "save_final": False},
                          logging={"num_samples": 0})
        check_ok(launch(cfg, tmp_path))
        runs[name] = losses(scalars(tmp_path / name))
    assert len(runs["default"]) == 4
    assert runs["overlap"] == pytest.approx(runs["default"], rel=1e-5)


def test_a_run_saved_with_the_bucket_copy_resumes_without_it(tmp_path, dataset):
    """The 0.5B / 1.3B configs turned DeepSpeed's gradient bucket copy off (parallel.contiguous_gradients:
    false): a ZeRO-1 run checkpointed with it resumes without it and logs the uninterrupted run's losses."""
    runs = {}
    for name, parallel, args in (("saved", {}, ()),
                                 ("resumed", {"contiguous_gradients": False},
                                  ("--resume", str(tmp_path / "saved" / "checkpoints" / "step00000002")))):
        cfg = base_config(tmp_path / name, dataset, parallel={"zero_stage": 1, "overlap_comm": True, **parallel},
                          train={"steps": 4, "eval_interval": 0}, checkpoint={"interval": 2},
                          logging={"num_samples": 0})
        check_ok(proc := launch(cfg, tmp_path, args=args))
        runs[name] = scalars(tmp_path / name)["train/loss"]
    assert "resumed from" in proc.stdout
    assert sorted(runs["resumed"]) == [3, 4]
    assert [runs["resumed"][s] for s in (3, 4)] == pytest.approx([runs["saved"][s] for s in (3, 4)], rel=1e-6)
