"""Text samples under pipeline parallelism (2 stages on CPU, gloo): dtrain/pipe_sampling.py.

A 2-stage run logs samples at its evaluations; they must be exactly what the single-process sampler
(model.sampler.sample) draws from the run's checkpointed weights with the same generator seed, and the
sampling must leave training untouched: the same run without samples logs the same losses. The sample
batch (3 sequences) differs from the training micro-batch (4), so the engine's activation shapes change
for sampling and back for training.
"""
import re

import pytest
import torch
from conftest import SEQ_LEN, base_config, check_ok, launch, plain_model_config, scalars

from dtrain.checkpoint import consolidated_model_state

pytestmark = pytest.mark.slow

EVAL_STEPS = (3, 6)
SAMPLES = {"num_samples": 3, "sample_steps": 8}


def pp_config(out_dir, dataset, logging):
    return base_config(out_dir, dataset, parallel={"pipeline_stages": 2, "zero_stage": 1},
                       train={"steps": 6, "eval_interval": 3, "eval_iters": 1},
                       checkpoint={"interval": 3, "keep": 2}, logging=logging)


def logged_samples(run_dir, tag: str = "samples") -> dict[int, list[str]]:
    """{step: [text, ...]} of the text summary `tag`, read back with TensorBoard's event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    [name] = [t for t in acc.Tags()["tensors"] if t.split("/")[0] == tag]
    out = {}
    for e in acc.Tensors(name):
        body = e.tensor_proto.string_val[0].decode("utf-8")
        parts = re.split(r"(?:^|\n\n)\*\*(\d+)\.\*\* ", body)   # "**0.** text\n\n**1.** text" (Metrics.text)
        assert parts[0] == "" and parts[1::2] == [str(i) for i in range(len(parts) // 2)], body
        out[e.step] = parts[2::2]
    return out


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("pp_samples")
    cfg = pp_config(tmp / "pp_samples", dataset, SAMPLES)
    check_ok(launch(cfg, tmp))
    return cfg, tmp / "pp_samples"


def test_pipeline_samples_match_single_process(pp_run, dataset):
    from data_pipeline.tokenizer import Tokenizer
    from model.lm import DiffusionLM
    from model.sampler import sample

    cfg, run_dir = pp_run
    logged = logged_samples(run_dir)
    assert sorted(logged) == list(EVAL_STEPS), sorted(logged)
    tok = Tokenizer.load(dataset / "tokenizer.model")
    model = DiffusionLM(plain_model_config(cfg, dataset)).eval()
    mask_id = model.cfg.mask_token_id
    for step in EVAL_STEPS:
        texts = logged[step]
        assert len(texts) == SAMPLES["num_samples"] and all(t.strip() for t in texts), texts
        # the weights the run sampled from: its checkpoint of that step, gathered into a plain DiffusionLM
        model.load_state_dict(consolidated_model_state(run_dir / "checkpoints" / f"step{step:08d}", model.cfg))
        ids = sample(model, batch_size=SAMPLES["num_samples"], seq_len=SEQ_LEN, steps=SAMPLES["sample_steps"],
                     mask_id=mask_id, generator=torch.Generator().manual_seed(cfg["run"]["seed"] + step))
        assert not (ids == mask_id).any()
        assert texts == [tok.decode(row.tolist()) for row in ids], (step, texts)
    assert logged[EVAL_STEPS[0]] != logged[EVAL_STEPS[1]]   # other weights, other seed: other samples


def test_pipeline_samples_leave_training_unchanged(pp_run, dataset, tmp_path):
    _, run_dir = pp_run
    ref_cfg = pp_config(tmp_path / "pp_nosamples", dataset, {"num_samples": 0})
    check_ok(launch(ref_cfg, tmp_path))
    got, ref = scalars(run_dir), scalars(tmp_path / "pp_nosamples")
    assert not any(t.startswith("samples") for t in ref["_tensors"]), ref["_tensors"]
    assert sorted(got["train/loss"]) == list(range(1, 7))
    for tag in ("train/loss", "train/grad_norm", "eval/nelbo_per_token"):
        assert got[tag] == ref[tag], (tag, got[tag], ref[tag])
