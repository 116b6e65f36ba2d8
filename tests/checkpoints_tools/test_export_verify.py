"""`dckpt export`, `dckpt verify` and `dckpt inspect` on one trained run (DP=2, ZeRO-1, 4 steps)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from ckpt_testlib import REPO, base_config, build_dataset, check_ok, launch, model_cfg, scalars
from safetensors.torch import load_file

from checkpoints_tools.cli import main as dckpt_main
from checkpoints_tools.pretrained import load_pretrained

pytestmark = pytest.mark.slow


def dckpt(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = dckpt_main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    dataset = build_dataset()
    tmp = tmp_path_factory.mktemp("export")
    cfg = base_config(tmp / "orig", dataset, train={"steps": 4, "eval_interval": 4}, logging={"num_samples": 0})
    check_ok(launch(cfg, tmp))
    return {"cfg": cfg, "dataset": dataset, "tmp": tmp, "ckpt": tmp / "orig" / "checkpoints" / "step00000004",
            "eval": scalars(tmp / "orig")["eval/nelbo_per_token"][4]}


@pytest.fixture(scope="module")
def exported(run):
    out = run["tmp"] / "model-fp32"
    assert dckpt_main(["export", str(run["tmp"] / "orig" / "checkpoints"), str(out)]) == 0
    return out


def val_nelbo(model, cfg, dataset) -> float:
    """NELBO/token of `model` on the batches the run's evaluation read (2 ranks, eval_iters x grad_accum)."""
    from data_pipeline.config import DataConfig
    from data_pipeline.stream import MaskedBatchLoader
    from model.diffusion import diffusion_loss
    t, mask_id = cfg["train"], model.cfg.mask_token_id
    nelbo = tokens = 0.0
    with torch.no_grad():
        for r in range(2):
            ld = MaskedBatchLoader(DataConfig.from_dict(cfg["data"]), split="val", dp_rank=r, dp_size=2,
                                   micro_batch_size=t["micro_batch_size"], grad_accum=t["grad_accum"],
                                   mask_id=mask_id, seed=cfg["run"]["seed"])
            for _, batch in zip(range(t["eval_iters"] * t["grad_accum"]), ld):
                _, s = diffusion_loss(model(batch["input_ids"]), batch, mask_id)
                nelbo += s["nelbo_per_seq"].double().sum().item()
                tokens += s["tokens_per_seq"].double().sum().item()
    return nelbo / tokens


def test_export_reproduces_the_engine_evaluation(run, exported):
    """The exported model scores the validation batches exactly as the DeepSpeed engine did in the run."""
    assert sorted(p.name for p in exported.iterdir()) == ["checksums.json", "config.json", "model.safetensors",
                                                          "tokenizer.model"]
    model, meta = load_pretrained(exported)
    assert meta["source"]["step"] == 4 and meta["dtype"] == "fp32"
    assert model.cfg == model_cfg(run["cfg"], run["dataset"])
    assert val_nelbo(model, run["cfg"], run["dataset"]) == pytest.approx(run["eval"], rel=1e-6)
    assert (exported / "tokenizer.model").read_bytes() == (run["dataset"] / "tokenizer.model").read_bytes()


def test_export_loads_in_plain_pytorch_without_deepspeed(run, exported, tmp_path):
    """A fresh interpreter where `import deepspeed` fails loads the folder with safetensors + the model code,
    as docs/checkpoints.md shows, and computes the same logits."""
    code = f"""
import sys, json, torch
sys.modules["deepspeed"] = None          # any import of DeepSpeed now raises
from safetensors.torch import load_file
from model.config import ModelConfig
from model.lm import DiffusionLM
folder = {str(exported)!r}
cfg = ModelConfig.from_dict(json.load(open(folder + "/config.json"))["model"])
model = DiffusionLM(cfg)
model.load_state_dict(load_file(folder + "/model.safetensors"), strict=False)
torch.manual_seed(0)
ids = torch.randint(0, cfg.vocab_size, (2, 32))
with torch.no_grad():
    torch.save({{"ids": ids, "logits": model.eval()(ids)}}, {str(tmp_path / "out.pt")!r})
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    model, _ = load_pretrained(exported)
    with torch.no_grad():
        assert torch.equal(got["logits"], model(got["ids"]))


def test_bf16_export_and_universal_export(run, exported, tmp_path, capsys):
    rc, _, err = dckpt(capsys, "export", run["ckpt"], tmp_path / "bf16", "--dtype", "bf16")
    assert rc == 0, err
    sd = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    full = load_file(str(exported / "model.safetensors"))
    assert all(torch.equal(sd[k], full[k].bfloat16()) for k in full)
    # a universal checkpoint exports to the same weights
    assert dckpt(capsys, "reshard", run["ckpt"], tmp_path / "uc")[0] == 0
    assert dckpt(capsys, "export", tmp_path / "uc", tmp_path / "from-uc")[0] == 0
    again = load_file(str(tmp_path / "from-uc" / "model.safetensors"))
    assert sorted(again) == sorted(full) and all(torch.equal(again[k], full[k]) for k in full)
    rc, _, err = dckpt(capsys, "export", run["ckpt"], tmp_path / "bf16")
    assert rc == 2 and "already exists" in err


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_verify_catches_truncated_and_altered_files(run, exported, tmp_path, capsys):
    for good in (run["ckpt"], exported, run["tmp"] / "orig" / "checkpoints"):
        rc, out, err = dckpt(capsys, "verify", good)
        assert rc == 0 and "OK" in out, err
    # export: model.safetensors truncated
    bad = _copy(exported, tmp_path / "trunc")
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(bad / "model.safetensors") - 100)
    rc, out, err = dckpt(capsys, "verify", bad)
    assert rc == 1 and f"{bad / 'model.safetensors'}:" in err and "truncated" in err
    # checkpoint: one byte of an optimizer shard flipped (same size: only the checksum can tell)
    bad = _copy(run["ckpt"], tmp_path / "altered" / "step00000004")
    shard = bad / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    rc, out, err = dckpt(capsys, "verify", bad)
    assert rc == 1 and f"{shard}: sha256 differs" in err
    assert dckpt(capsys, "verify", bad, "--quick")[0] == 0   # sizes only: a flipped byte passes
    # without checksums.json: completeness and loadability
    bare = _copy(run["ckpt"], tmp_path / "bare" / "step00000004")
    (bare / "checksums.json").unlink()
    assert dckpt(capsys, "verify", bare)[0] == 0
    victim = bare / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:200])
    rc, out, err = dckpt(capsys, "verify", bare)
    assert rc == 1 and f"{victim}: cannot be loaded" in err
    (bare / "COMPLETE").unlink()
    rc, out, err = dckpt(capsys, "verify", bare)
    assert rc == 1 and "COMPLETE: missing" in err


def test_inspect_reports_step_layout_model_and_data(run, capsys):
    rc, out, err = dckpt(capsys, "inspect", run["tmp"] / "orig" / "checkpoints", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["path"].endswith("step00000004") and info["complete"] and not info["universal"]
    assert info["step"] == 4 and info["tokens"] == 4 * (4 * 2 * 2) * 32   # steps x global batch x seq_len
    assert info["layout"] == {"dp_size": 2, "pipeline_stages": 1, "zero_stage": 1, "precision": "fp32"}
    m = model_cfg(run["cfg"], run["dataset"])
    from model.lm import DiffusionLM
    assert info["model"]["family"] == m.family and info["model"]["layer_pattern"] == "MMA"
    assert info["model"]["parameters"] == sum(p.numel() for p in DiffusionLM(m).parameters())
    on_disk = {p.name: p.stat().st_size for p in run["ckpt"].iterdir()}
    assert {f["name"]: f["bytes"] for f in info["files"]} == on_disk
    assert info["data"]["dp_size"] == 2 and info["data"]["samples_seen"] == 4 * 2 * 4   # per rank: steps x grad_accum x micro-batch
    rc, out, _ = dckpt(capsys, "inspect", run["ckpt"])
    assert "DP=2 x PP=1 | ZeRO-1 | fp32" in out and "complete" in out and "reshard_on_resume" in out
