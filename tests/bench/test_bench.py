"""CPU smoke tests of the GPU benchmarks (bench/): every code path but the CUDA specifics.

The benchmarks' numbers are not checked here (speed is measured, never asserted): only that each one
produces its table and a JSON of finite numbers, records an out-of-memory row instead of crashing, does
the MFU arithmetic right, and reads the trainer's own progress line.
"""
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import common, inference, scaling, training
from model.config import ModelConfig
from model.flops import forward_flops_per_token, train_flops_per_token
from model.presets import get_preset

# the small dataset the dtrain tests build (seq_len 32, vocab 512): shared, built once
TEST_CACHE = Path(os.environ.get("DIFFUMAMBA_TEST_CACHE", Path.home() / ".cache" / "diffumamba-tests"))


def finite_numbers(row: dict) -> bool:
    return all(math.isfinite(v) for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool))


def table_header(md: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith("| "))
    return [c.strip() for c in line.strip("|").split("|")]


def check_header(head: dict, module: str) -> None:
    for key in ("card", "command", "date", "commit"):
        assert head[key], key
    assert head["command"].startswith(f"python -m {module}")


def test_inference_smoke_records_oom_and_ratios(tmp_path, monkeypatch):
    """Two presets, three lengths; the transformer 'runs out of memory' from L = 64: that row says OOM,
    the longer one is skipped, and the Mamba rows get a ratio only where the transformer has a number.
    L = 128 is over --max-batch-tokens and skipped."""
    real = inference.denoise

    def fake_oom(model, ids):
        if model.cfg.layer_pattern == "AAA" and ids.shape[1] >= 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (simulated)")
        return real(model, ids)

    monkeypatch.setattr(inference, "denoise", fake_oom)
    assert inference.main(["--smoke", "--out", str(tmp_path), "--presets", "tiny-diffumamba", "tiny-diffutran",
                           "--seq-lens", "32", "64", "128", "--batches", "1", "--max-batch-tokens", "100"]) == 0
    result = json.loads((tmp_path / "inference.json").read_text())
    check_header(result["header"], "bench.inference")
    rows = {(r["preset"], r["seq_len"]): r for r in result["rows"]}
    assert len(rows) == 6
    assert [rows["tiny-diffutran", L]["status"] for L in (32, 64, 128)] == ["ok", common.OOM, inference.SKIPPED]
    assert [rows["tiny-diffumamba", L]["status"] for L in (32, 64, 128)] == ["ok", "ok", inference.TOO_BIG]
    for r in result["rows"]:
        assert finite_numbers(r), r
        if r["status"] == "ok":
            assert r["tokens_per_s"] > 0 and r["forwards_per_s"] == pytest.approx(r["tokens_per_s"] / r["seq_len"])
    assert rows["tiny-diffutran", 32]["vs_diffutran"] == 1.0
    assert rows["tiny-diffumamba", 32]["vs_diffutran"] == pytest.approx(
        rows["tiny-diffumamba", 32]["tokens_per_s"] / rows["tiny-diffutran", 32]["tokens_per_s"])
    assert rows["tiny-diffumamba", 64]["vs_diffutran"] is None
    md = (tmp_path / "inference.md").read_text()
    assert table_header(md) == [c[0] for c in inference.COLUMNS]
    assert "| tiny-diffutran | 1 | 64 | OOM |" in md
    assert (tmp_path / "inference.png").is_file() or importlib.util.find_spec("matplotlib") is None


def test_inference_cuda_graphs_option_measures_through_the_graphed_denoiser(tmp_path, monkeypatch):
    from model.graphs import GraphedDenoiser
    called = []
    real = inference.denoise
    monkeypatch.setattr(inference, "denoise", lambda model, ids: called.append(type(model)) or real(model, ids))
    assert inference.main(["--smoke", "--cuda-graphs", "--out", str(tmp_path), "--presets", "tiny-diffumamba",
                           "--seq-lens", "32", "--batches", "1"]) == 0
    result = json.loads((tmp_path / "inference.json").read_text())
    assert result["header"]["cuda_graphs"].startswith("on") and result["rows"][0]["status"] == "ok"
    assert called and set(called) == {GraphedDenoiser}


def test_inference_rows_record_the_autotuner_picks_their_measurement_made(tmp_path, monkeypatch):
    """Each row keeps the picks that first appeared while it was measured (a pick made for an earlier row is
    that row's, and stays out of the later one)."""
    picks = {}

    def autotune_picks():
        picks[f"scan_out ({len(picks)},)"] = f"config {len(picks)}"   # every look finds one new pick
        return dict(picks)

    monkeypatch.setattr(inference, "autotune_picks", autotune_picks)
    assert inference.main(["--smoke", "--out", str(tmp_path), "--presets", "tiny-diffumamba", "--seq-lens", "32", "64",
                           "--batches", "1"]) == 0
    rows = json.loads((tmp_path / "inference.json").read_text())["rows"]
    assert [r["autotune_picks"] for r in rows] == [{"scan_out (1,)": "config 1"}, {"scan_out (3,)": "config 3"}]


def test_inference_profile_traces_each_row_and_tables_the_gpu_breakdown(tmp_path, monkeypatch):
    """--profile traces 2 more forward passes per row under inference_profiles/<preset>_b<B>_L<L>/; on the
    CPU there is no GPU kernel to break down (the row says so). With a GPU breakdown (faked here) a second
    table shows ms per kind, and gemm / floor = gemm ms over the matmul floor."""
    calls = []
    real = inference.denoise
    monkeypatch.setattr(inference, "denoise", lambda model, ids: calls.append(ids.shape) or real(model, ids))
    assert inference.main(["--smoke", "--profile", "--out", str(tmp_path), "--presets", "tiny-diffumamba",
                           "--seq-lens", "32", "--batches", "1", "--matmul-peak-tflops", "1"]) == 0
    row = json.loads((tmp_path / "inference.json").read_text())["rows"][0]
    trace = tmp_path / "inference_profiles" / "tiny-diffumamba_b1_L32" / "profile" / "rank0_steps1-2.json.gz"
    assert trace.is_file() and "no GPU kernel events" in row["profile"]
    assert len(calls) == 1 + 2 + 2      # first call, 2 timed (--smoke), 2 traced

    from bench import trace_breakdown
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": t, "dur": d, "pid": 0, "tid": 7}
              for n, t, d in [("nvjet_gemm", 0, 3000), ("_chunk_scan_fwd_kernel", 3000, 1000)]]
    monkeypatch.setattr(trace_breakdown, "load_events", lambda path: events)
    assert inference.main(["--smoke", "--profile", "--out", str(tmp_path), "--presets", "tiny-diffumamba",
                           "--seq-lens", "32", "--batches", "1", "--matmul-peak-tflops", "1"]) == 0
    row = json.loads((tmp_path / "inference.json").read_text())["rows"][0]
    assert (row["ms_gemm"], row["ms_ssm_scan"], row["gpu_idle_pct"]) == pytest.approx((1.5, 0.5, 0.0))
    flops = forward_flops_per_token(get_preset("tiny-diffumamba"), 32) * 32
    assert row["gemm_vs_floor"] == pytest.approx(1.5 / (flops / 1e12 * 1e3))
    md = (tmp_path / "inference.md").read_text()
    assert "GPU time of a traced forward pass" in md and (tmp_path / "inference_profiles" / row["profile"]).is_file()


def test_inference_resume_measures_only_missing_rows(tmp_path, monkeypatch):
    """--resume keeps the rows of an earlier (interrupted or partial) run and measures only the missing ones."""
    args = ["--smoke", "--out", str(tmp_path), "--presets", "tiny-diffumamba", "--batches", "1"]
    assert inference.main([*args, "--seq-lens", "32"]) == 0
    first = json.loads((tmp_path / "inference.json").read_text())["rows"]
    real = inference.denoise

    def only_new(model, ids):
        assert ids.shape[1] == 64, "a row of the earlier run was measured again"
        return real(model, ids)

    monkeypatch.setattr(inference, "denoise", only_new)
    assert inference.main([*args, "--seq-lens", "32", "64", "--resume"]) == 0
    result = json.loads((tmp_path / "inference.json").read_text())
    def measured(r):   # the matmul-floor columns follow the peak in the header of the latest run
        return {k: v for k, v in r.items() if k not in ("floor_ms", "vs_floor")}

    assert measured(result["rows"][0]) == measured(first[0]) and [r["seq_len"] for r in result["rows"]] == [32, 64]
    peak = result["header"]["matmul_peak_flops"]
    for r in result["rows"]:
        fpt = forward_flops_per_token(get_preset("tiny-diffumamba"), r["seq_len"])   # hand-checked in tests/dtrain
        assert r["floor_ms"] == pytest.approx(fpt * r["seq_len"] / peak * 1e3)
        assert r["vs_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
    assert "1 rows from the run of" in result["header"]["resumed"]
    # a run split by --presets: the transformer's rows join the Mamba ones, and the ratios use both
    monkeypatch.setattr(inference, "denoise", real)
    args[args.index("tiny-diffumamba")] = "tiny-diffutran"
    assert inference.main([*args, "--seq-lens", "32", "--resume"]) == 0
    rows = {(r["preset"], r["seq_len"]): r for r in json.loads((tmp_path / "inference.json").read_text())["rows"]}
    assert sorted(rows) == [("tiny-diffumamba", 32), ("tiny-diffumamba", 64), ("tiny-diffutran", 32)]
    assert rows["tiny-diffumamba", 32]["vs_diffutran"] == pytest.approx(
        rows["tiny-diffumamba", 32]["tokens_per_s"] / rows["tiny-diffutran", 32]["tokens_per_s"])
    assert rows["tiny-diffumamba", 64]["vs_diffutran"] is None


def test_inference_set_overrides_the_model_and_its_floor(tmp_path, monkeypatch):
    """--set model.mamba.chunk_size=8 builds the preset with chunk 8 (the other fields the preset's), counts
    the floor of that model, labels its rows, and keeps them apart from the plain preset's on --resume."""
    real, seen = inference.denoise, []
    monkeypatch.setattr(inference, "denoise", lambda model, ids: seen.append(model.cfg) or real(model, ids))
    args = ["--smoke", "--out", str(tmp_path), "--presets", "tiny-diffumamba", "--batches", "1", "--seq-lens", "32"]
    assert inference.main(args) == 0
    assert inference.main([*args, "--resume", "--set", "model.mamba.chunk_size=8"]) == 0
    preset = get_preset("tiny-diffumamba")
    assert {c.mamba.chunk_size for c in seen} == {preset.mamba.chunk_size, 8}
    assert all(c.replace(mamba=preset.mamba) == preset for c in seen)
    result = json.loads((tmp_path / "inference.json").read_text())
    rows = {r["overrides"]: r for r in result["rows"]}
    assert sorted(rows) == ["", "model.mamba.chunk_size=8"]
    # the floor of each row, counted by hand: only the intra-chunk SSD terms depend on the chunk length q
    cfg, L, peak = preset, 32, result["header"]["matmul_peak_flops"]
    heads, di, n = cfg.mamba_nheads, cfg.d_inner, cfg.mamba.d_state
    assert heads == di // cfg.mamba.headdim
    for q, r in ((preset.mamba.chunk_size, rows[""]), (8, rows["model.mamba.chunk_size=8"])):
        direction = (2 * cfg.d_model * (2 * di + 2 * n + heads) + 2 * 4 * (di + 2 * n)
                     + 2 * q * n + 2 * q * di + 4 * n * di + 2 * di * cfg.d_model)
        per_token = 3 * (2 * direction + 2 * 2 * cfg.d_model * cfg.mlp_hidden) + 2 * cfg.d_model * cfg.vocab_size
        assert r["floor_ms"] == pytest.approx(per_token * L / peak * 1e3)
    # a value with a space survives the row's text form
    spaced = {**rows["model.mamba.chunk_size=8"], "overrides": "'model.mamba.chunk_size= 8'"}
    inference.add_floor([spaced], peak)
    assert spaced["floor_ms"] == pytest.approx(rows["model.mamba.chunk_size=8"]["floor_ms"])
    md = (tmp_path / "inference.md").read_text()
    assert table_header(md)[:2] == ["preset", "--set"] and "| tiny-diffumamba | model.mamba.chunk_size=8 |" in md
    with pytest.raises(inference.ConfigError, match="train.micro_batch_size"):
        inference.main([*args, "--set", "train.micro_batch_size=2"])
    with pytest.raises(inference.ConfigError, match="chunk_sise"):
        inference.main([*args, "--set", "model.mamba.chunk_sise=8"])


def test_guarded_frees_and_reraises_other_errors():
    cpu = torch.device("cpu")
    assert common.guarded(lambda: 7, cpu) == 7

    def boom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert common.guarded(boom, cpu) is common.OOM
    with pytest.raises(ValueError):
        common.guarded(lambda: (_ for _ in ()).throw(ValueError("not memory")), cpu)


def test_micro_batch_search_halves_on_oom():
    tried = []

    def attempt(mb):
        tried.append(mb)
        return common.OOM if mb > 4 else {"tokens_per_s": float(mb)}
    assert training.largest_fitting(attempt, 32) == (4, {"tokens_per_s": 4.0}, ["32:OOM", "16:OOM", "8:OOM", "4:ok"])
    assert training.largest_fitting(lambda mb: common.OOM, 2) == (None, None, ["2:OOM", "1:OOM"])
    assert [training.power_of_two_at_most(x) for x in (1, 2, 3, 64, 65, 0)] == [1, 2, 2, 64, 64, 1]
    assert training.config_path("1.3b-diffumamba-h").name == "1p3b_diffumamba_h.yaml"
    assert all(training.config_path(p).is_file() for p in training.PRESETS)


def test_mfu_against_a_hand_count():
    """One non-causal attention block + GELU MLP + tied head, d = 64, V = 512, L = 64:
    attention 2*64*192 + 2*64*64 (QKV, out) + 2*64*64 (QK^T) + 2*64*64 (AV) = 49,152
    MLP (h = 256) 2*64*256 + 2*256*64 = 65,536; head 2*64*512 = 65,536 -> forward 180,224, training 540,672."""
    cfg = ModelConfig(vocab_size=512, mask_token_id=511, d_model=64, layer_pattern="A", n_heads=4, mlp_ratio=4)
    assert train_flops_per_token(cfg, 64, head_fraction=1.0) == 3 * 180_224 == 540_672
    # training counts the head at the expected masked fraction (1 + eps) / 2 = 0.5005 only
    assert train_flops_per_token(cfg, 64) == pytest.approx(3 * (114_688 + 0.5005 * 65_536))
    # 1,000 tokens/s on a 1 GFLOP/s device: 540,672 FLOP/s achieved -> 54.0672 %
    assert common.mfu(1000.0, 540_672, 1e9) == pytest.approx(0.540672)
    assert common.mfu(1000.0, 540_672, None) is None


def run_module(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:   # the trainer runs' own logs say why a torchrun launch failed
        out = Path(args[args.index("--out") + 1]) if "--out" in args else None
        logs = sorted(out.glob("*_logs/*.log")) if out else []
        tails = "".join(f"\n--- {log}\n{log.read_text()[-4000:]}" for log in logs)
        raise AssertionError(f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}{tails}")
    return proc


def test_training_smoke_through_the_deepspeed_engine(tmp_path):
    """The trainer's engine on a tiny preset, with OOMs injected above 128 tokens per micro-batch: the
    search halves (rebuilding the engine) and lands on 2 and 1 sequences at L 64 and 128; at L 256 nothing
    fits (an OOM row) and L 512 is skipped."""
    proc = run_module("bench.training", "--smoke", "--out", str(tmp_path), "--presets", "tiny-diffumamba-h",
                      "--seq-lens", "64", "128", "256", "512", "--profile")
    result = json.loads((tmp_path / "training.json").read_text())
    head, rows = result["header"], result["rows"]
    check_header(head, "bench.training")
    assert head["matmul_peak_flops"] > 0 and "TFLOP/s measured" in head["matmul_peak"]
    assert [(r["seq_len"], r.get("micro_batch"), r.get("attempts"), r["status"]) for r in rows] == [
        (64, 2, "4:OOM 2:ok", "ok"), (128, 1, "2:OOM 1:ok", "ok"), (256, None, "1:OOM", common.OOM),
        (512, None, None, "skipped (OOM at a shorter L)")]
    for r in rows[:2]:
        assert r["status"] == "ok" and finite_numbers(r), r
        assert r["tokens_per_s"] == pytest.approx(r["micro_batch"] * r["seq_len"] / (r["step_ms"] / 1e3))
        assert r["train_flops_per_token"] == train_flops_per_token(
            training.run_config(r["preset"], r["seq_len"], 1, "config").model_config(512, 511), r["seq_len"])
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["train_flops_per_token"] / head["matmul_peak_flops"])
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * r["train_flops_per_token"] / 1e12)
        # --profile traced 2 more steps; a CPU trace has no GPU kernel to break down
        trace = tmp_path / "training_profiles" / f"tiny-diffumamba-h_L{r['seq_len']}" / "profile" / "rank0_steps1-2.json.gz"
        assert trace.is_file() and "no GPU kernel events" in r["profile"]
    md = (tmp_path / "training.md").read_text()
    assert table_header(md) == [c[0] for c in training.COLUMNS]
    assert md in proc.stdout


def test_training_grad_accum_and_overrides(monkeypatch):
    """--grad-accum N: every timed step runs N micro-batches and tokens/s counts them all; --set reaches the
    model config."""
    cfg = training.run_config("1.3b-diffumamba-h", 2048, 16, "off", 4, ["model.mamba.chunk_size=128"])
    assert (cfg.train.grad_accum, cfg.train.micro_batch_size, cfg.train.activation_checkpointing) == (4, 16, False)
    assert cfg.model_config(512, 511).mamba.chunk_size == 128
    # the 1.3B configs replay CUDA graphs, which recomputation cannot run in: --activation-checkpointing on
    # turns them off, off and config keep the config's choice
    assert training.run_config("1.3b-diffumamba-h", 2048, 16, "config").train.cuda_graphs
    assert training.run_config("1.3b-diffumamba-h", 2048, 16, "off").train.cuda_graphs
    on = training.run_config("1.3b-diffumamba-h", 2048, 16, "on")
    assert on.train.activation_checkpointing and not on.train.cuda_graphs
    seen = []
    monkeypatch.setattr(training, "train_step", lambda trainee, batches, ga, poison, metrics: seen.append(ga))
    trial = training.Trial("tiny-diffumamba", torch.device("cpu"), "config", grad_accum=4)
    trial.trainee, trial.leftover_gib, trial.built_for = object(), None, (64, 2)   # train_step is replaced
    got = trial.measure(64, 2, warmup=1, iters=2, inject_oom_tokens=None)
    assert seen == [4, 4, 4]
    assert got["tokens_per_s"] == pytest.approx(2 * 4 * 64 / (got["step_ms"] / 1e3))


def test_training_builds_an_engine_for_every_shape(monkeypatch):
    """An engine (and its CUDA graphs' memory) is never carried to another L or micro-batch, where it would
    make the search halve below what fits; the same shape measured again keeps its engine."""
    monkeypatch.setattr(training, "train_step", lambda *args: None)
    trial = training.Trial("tiny-diffumamba", torch.device("cpu"), "config")
    built = []

    def fake_build(seq_len, micro_batch):
        built.append((seq_len, micro_batch))
        trial.trainee, trial.leftover_gib, trial.built_for = object(), None, (seq_len, micro_batch)
    monkeypatch.setattr(trial, "build", fake_build)
    for shape in [(64, 4), (64, 4), (128, 4), (128, 2), (64, 4)]:
        trial.measure(*shape, warmup=0, iters=1, inject_oom_tokens=None)
    assert built == [(64, 4), (128, 4), (128, 2), (64, 4)]


FREES_ENGINE = r"""
import gc, itertools, weakref, torch
from bench import training
from dtrain import engine as dengine
from dtrain.loop import train_step
dengine.setup_distributed()
trial = training.Trial("tiny-diffumamba-h", torch.device("cpu"), "config")
trial.build(64, 2)
alive = weakref.ref(trial.trainee.engine.module)
train_step(trial.trainee, itertools.cycle(trial.batches(2, 64)), 1, False, training.NoMetrics())
trial.build(64, 1)                       # a rebuild (after an OOM) closes the old engine first
gc.collect()
print("FREED" if alive() is None else "LEAKED")
"""


def test_a_rebuilt_trial_frees_the_old_engine():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", FREES_ENGINE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("FREED"), proc.stdout[-2000:]


def test_training_profile_of_a_1p3b_row_is_written_under_its_own_name(tmp_path, monkeypatch):
    """Trial.profile names the breakdown after the row's folder; a preset name with a dot (1.3b) must not
    lose its tail (all 1.3B rows once overwrote one "1.md")."""
    from bench import trace_breakdown
    events = [{"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "ts": 0, "dur": 300, "pid": 0, "tid": 7}]
    monkeypatch.setattr(training, "train_step", lambda *args: None)
    monkeypatch.setattr(trace_breakdown, "load_events", lambda path: events)
    trial = training.Trial("tiny-diffumamba", torch.device("cpu"), "config")
    rows = [trial.profile(tmp_path / f"1.3b-diffumamba-h_L{L}", None, None) for L in (1024, 2048)]
    assert [r["profile"] for r in rows] == ["1.3b-diffumamba-h_L1024.md", "1.3b-diffumamba-h_L2048.md"]
    assert all((tmp_path / r["profile"]).is_file() and r["ms_gemm"] == pytest.approx(0.15) for r in rows)


def test_training_profile_columns_are_the_breakdowns_ms_per_step():
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": t, "dur": d, "pid": 0, "tid": 7}
              for n, t, d in [("nvjet_gemm", 0, 300), ("_chunk_scan_bwd_dx_kernel", 300, 100),
                              ("multi_tensor_apply_kernel", 500, 100)]]
    from bench import trace_breakdown
    got = common.profile_columns(trace_breakdown.breakdown(events, steps=2))
    assert got["gpu_idle_pct"] == pytest.approx(100 * 100 / 600)      # 500..600 free of a 600 us window
    assert (got["ms_gemm"], got["ms_ssm_scan"], got["ms_optimizer"]) == pytest.approx((0.15, 0.05, 0.05))
    assert got["ms_attention"] == 0 and set(got) == {"gpu_idle_pct"} | {f"ms_{k}" for k in trace_breakdown.SINGLE_PROCESS_KINDS}


def test_scaling_refuses_layouts_wider_than_gpus(tmp_path):
    """--gpus 1 runs the trainer's own 1-GPU baseline alone; a layout needing more processes stops before
    any run, naming it."""
    assert scaling.DEFAULT_LAYOUTS[1] == ["1"]
    with pytest.raises(SystemExit, match="--layouts dp2: more processes than --gpus 1"):
        scaling.main(["--gpus", "1", "--layouts", "1", "dp2", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_parser_reads_the_trainers_console_line(capsys):
    """Lines printed by dtrain's own Metrics.console, with and without the MFU and memory fields, and its
    per-rank memory line."""
    from dtrain.metrics import Metrics, memory_line
    stub = SimpleNamespace(start=0.0, total_steps=12, start_step=0)
    base = {"train/loss": 6.36, "train/lr": 1e-3, "train/grad_norm": 0.6, "perf/tokens_per_s": 9021.4,
            "train/skipped_steps": 0.0}
    Metrics.console(stub, 3, base)
    Metrics.console(stub, 6, {**base, "perf/tokens_per_s": 12000.0, "perf/mfu": 0.4137, "train/skipped_steps": 1.0,
                              "perf/gpu_mem_gib": 61.25, "perf/gpu_reserved_gib": 74.9})
    print(memory_line([(60.0, 70.04), (61.25, 74.9)]))
    print(memory_line([(60.0, 72.0), (61.25, 74.9)]))            # a later, fuller line wins
    text = "some other output\n" + capsys.readouterr().out
    assert "| mem 61.2/74.9 GiB |" in text
    assert scaling.parse_memory(text) == [(60.0, 72.0), (61.2, 74.9)]     # as printed, to 0.1 GiB
    assert scaling.parse_memory("step 3/12 | loss 6.36") is None
    lines = scaling.parse_log(text)
    assert [(ln["step"], ln["steps"], ln["tokens_per_s"]) for ln in lines] == [(3, 12, 9021.0), (6, 12, 12000.0)]
    assert lines[0]["mfu"] is None and lines[1]["mfu"] == pytest.approx(0.4137)
    # tokens/s after the warm-up interval; two intervals of 3 and 1 steps: 4 steps / (3/100 + 1/50)
    assert scaling.steady_tokens_per_s([{"step": 3, "tokens_per_s": 1.0}, {"step": 6, "tokens_per_s": 100.0},
                                        {"step": 7, "tokens_per_s": 50.0}]) == pytest.approx(4 / (3 / 100 + 1 / 50))
    assert scaling.steady_tokens_per_s(lines[:1]) is None
    # the spread of the measured intervals (first dropped): (100 - 50) / 75
    assert scaling.interval_spread([{"step": 3, "tokens_per_s": 1.0}, {"step": 6, "tokens_per_s": 100.0},
                                    {"step": 7, "tokens_per_s": 50.0}]) == pytest.approx(50 / 75)
    assert scaling.interval_spread(lines) is None                    # one measured interval


@pytest.mark.parametrize("layout", list(scaling.LAYOUTS))
@pytest.mark.parametrize("config_name", ["240m_diffumamba_h", "1p3b_diffumamba"])
def test_scaling_runs_a_graphed_config_in_every_layout(tmp_path, layout, config_name):
    """The Mamba configs replay CUDA graphs, in every layout (a pipeline graphs each stage's blocks); an
    explicit override still wins."""
    from dtrain.config import load_config
    args = SimpleNamespace(out=tmp_path, steps=4, profile_steps=0, log_interval=1, micro_batch=None,
                           grad_accum=None, seq_len=None, data=None, data_root=tmp_path, data_vocab=4096,
                           data_max_bytes=None, override=[])
    config = REPO / "configs" / f"{config_name}.yaml"
    assert load_config(config).train.cuda_graphs
    assert load_config(config, scaling.overrides(args, layout)).train.cuda_graphs
    args.override = ["train.cuda_graphs=false"]
    assert not load_config(config, scaling.overrides(args, layout)).train.cuda_graphs


def test_scaling_global_batch_keeps_the_sequences_per_step_in_every_layout(tmp_path):
    """--global-batch N: grad_accum = N / (micro-batch x DP) per layout, and the trainer's config agrees (its
    global_batch_size is N); N that the micro-batch x DP does not divide stops the run."""
    from dtrain.config import load_config
    config = REPO / "configs" / "1p3b_diffumamba_h.yaml"
    args = SimpleNamespace(out=tmp_path, steps=4, profile_steps=0, log_interval=1, micro_batch=None,
                           grad_accum=None, seq_len=None, data=None, data_root=tmp_path, data_vocab=4096,
                           data_max_bytes=None, override=[], config=config, global_batch=128)
    assert load_config(config).train.micro_batch_size == 16
    for layout, want in (("1", 8), ("dp2", 4), ("pp2", 8), ("dp4", 2), ("pp2dp2", 4)):
        train = load_config(config, scaling.overrides(args, layout)).train
        processes, stages = scaling.LAYOUTS[layout]
        assert (train.micro_batch_size, train.grad_accum) == (16, want) == scaling.batch_shape(args, layout)
        assert train.global_batch_size == 128 == 16 * want * processes // stages, layout
    args.global_batch = None                                   # the config's shape per data-parallel rank
    assert all(scaling.batch_shape(args, layout) == (16, 4) for layout in scaling.LAYOUTS)
    args.global_batch = 40
    with pytest.raises(SystemExit, match="not a multiple"):
        scaling.overrides(args, "dp2")


@pytest.mark.slow
def test_scaling_smoke_one_process_and_a_two_stage_pipeline(tmp_path):
    """`dtrain train` under torchrun with gloo: the 1-process baseline and PP=2 on two processes, each with
    one traced step after the 4 measured ones."""
    run_module("bench.scaling", "--smoke", "--layouts", "1", "pp2", "--out", str(tmp_path), "--seq-len", "32",
               "--data-root", str(TEST_CACHE / "builtin"), "--profile-steps", "1", timeout=240)
    result = json.loads((tmp_path / "scaling.json").read_text())
    check_header(result["header"], "bench.scaling")
    rows = result["rows"]
    assert [(r["layout"], r["gpus"], r["dp"], r["pp"], r["status"]) for r in rows] == [
        ("1 GPU", 1, 1, 1, "ok"), ("PP=2", 2, 1, 2, "ok")]
    for r in rows:
        assert finite_numbers(r) and r["tokens_per_s"] > 0 and r["log_lines"] == 4, r
        log = (tmp_path / "scaling_logs" / f"{r['key']}.log").read_text()
        assert "step 5/5" in log                                  # the traced step ran, not measured
        assert r["tokens_per_s"] == pytest.approx(scaling.steady_tokens_per_s(scaling.parse_log(log)[:4]))
        traces = sorted((tmp_path / "scaling_runs" / r["key"] / "profile").glob("rank*_steps5-5.json.gz"))
        assert len(traces) == r["gpus"] and "no GPU kernel events" in r["profile"]   # a CPU trace
    assert rows[0]["efficiency"] == 1.0
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["tokens_per_s"] / 2 / rows[0]["tokens_per_s"])
    assert table_header((tmp_path / "scaling.md").read_text()) == [c[0] for c in scaling.COLUMNS]


def test_scaling_profile_summary_averages_the_ranks_traces(tmp_path):
    """Two ranks' traces of 2 steps: rank 0 computes 600 us and waits 400 us in a p2p receive, rank 1
    computes 800 us with an all-reduce of 300 us, 100 us of it under compute."""
    def kernel(name, start, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": dur, "pid": 0, "tid": 7}
    traces = {"rank0_steps21-22.json.gz": [kernel("sm90_xmma_gemm", 0, 600),
                                            kernel("ncclDevKernel_SendRecv", 600, 400)],
              "rank1_steps21-22.json.gz": [kernel("_chunk_scan_fwd_kernel", 0, 800),
                                            kernel("ncclDevKernel_AllReduce_Sum_f32", 700, 300)]}
    folder = tmp_path / "scaling_runs" / "pp2dp2" / "profile"
    folder.mkdir(parents=True)
    for name, events in traces.items():
        with gzip.open(folder / name, "wt") as f:
            json.dump({"traceEvents": events}, f)
    got = scaling.profile_summary(SimpleNamespace(out=tmp_path), "pp2dp2")
    # windows 1000 us and 1000 us over 2 steps; compute 60% and 80%; exposed NCCL 40% and 20%
    assert got["gpu_step_ms"] == pytest.approx(0.5) and got["compute_pct"] == pytest.approx(70.0)
    assert got["idle_pct"] == pytest.approx(0.0) and got["nccl_exposed_pct"] == pytest.approx(30.0)
    assert got["p2p_ms"] == pytest.approx(0.4 / 2 / 2) and got["collective_ms"] == pytest.approx(0.3 / 2 / 2)
    md = (tmp_path / got["profile"]).read_text()
    assert md.startswith("# PP=2 x DP=2") and "rank1_steps21-22.json.gz" in md
    assert "no trace" in scaling.profile_summary(SimpleNamespace(out=tmp_path), "dp4")["profile"]


@pytest.mark.parametrize("pp", [1, 2])
def test_layout_resume_phases_load_the_default_graphed_config(tmp_path, pp):
    """layout_resume's default config replays CUDA graphs: every phase turns them off (the same in each, so
    the losses of A, B and C compare), and its PP=2 phase loads."""
    from bench import layout_resume
    from dtrain.config import load_config
    config = REPO / "configs" / "1p3b_diffumamba_h.yaml"
    assert load_config(config).train.cuda_graphs
    args = SimpleNamespace(out=tmp_path, steps=8, micro_batch=8, seq_len=None, data=None, data_root=tmp_path,
                           data_vocab=4096, data_max_bytes=None, override=[])
    cfg = load_config(config, layout_resume.overrides(args, "B", 2 // pp, pp, 2 * pp))
    assert cfg.parallel.pipeline_stages == pp and not cfg.train.cuda_graphs


@pytest.mark.slow
def test_layout_resume_smoke_resumes_exactly_and_on_another_layout(tmp_path):
    """DP=2 trains 8 steps; its step-4 checkpoint resumes on DP=2 (losses equal A's: fp32 on the CPU) and,
    through `dckpt reshard`, as PP=2 (same learning rates, A's Adam step count carried over)."""
    run_module("bench.layout_resume", "--smoke", "--out", str(tmp_path), "--seq-len", "32",
               "--data-root", str(TEST_CACHE / "builtin"), timeout=300)
    result = json.loads((tmp_path / "layout_resume.json").read_text())
    check_header(result["header"], "bench.layout_resume")
    rows = {r["phase"]: r for r in result["rows"]}
    assert [r["status"] for r in rows.values()] == ["ok"] * 4
    assert rows["B"]["steps"] == rows["C"]["steps"] == "5..8" and rows["A"]["steps"] == "1..8"
    for s in range(5, 9):   # B repeats A's steps 5..8 (read back from the logs, not from the benchmark)
        assert rows["B"]["losses"][str(s)] == pytest.approx(rows["A"]["losses"][str(s)], rel=1e-5)
    c_log = (tmp_path / "layout_resume_logs" / "C.log").read_text()
    assert "at step 4" in c_log and rows["C"]["max_rel_lr_diff"] == 0.0
    assert (tmp_path / "layout_resume_runs" / "universal" / "latest").is_file()


def test_matmul_peak_bursts_and_sustained_windows(tmp_path, monkeypatch):
    """bench.matmul_peak on the CPU: 5 bursts timed as bench.common.matmul_peak times them (20 calls after 5),
    10 sustained windows of 2 calls (smoke); with every timed call taking 1 ms, 2 * 64^3 FLOPs a matmul make
    0.524 GFLOP/s a burst call and twice that a window call (2 matmuls a timed call)."""
    from bench import common, matmul_peak
    timed = []

    def one_ms_each(fn, device, warmup, iters):
        timed.append((warmup, iters))
        fn()
        return [1e-3] * iters

    monkeypatch.setattr(common, "time_calls", one_ms_each)
    assert matmul_peak.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "matmul_peak.json").read_text())
    bursts = [r for r in result["rows"] if r["phase"].startswith("burst")]
    windows = [r for r in result["rows"] if r["phase"].startswith("sustained")]
    assert len(bursts) == 5 and len(windows) == 10 and timed == [(5, 20)] * 5 + [(0, 10)]
    assert all(r["tflops"] == pytest.approx(2 * 64 ** 3 / 1e-3 / 1e12) for r in bursts)
    assert all(r["tflops"] == pytest.approx(2 * 2 * 64 ** 3 / 1e-3 / 1e12) for r in windows)
    text = (tmp_path / "matmul_peak.md").read_text()
    assert "| burst after 0 s idle | 1 | 0.0005243 |" in text and "median 0.001049" in text


def test_preempt_check_smoke_checkpoints_on_each_signal(tmp_path):
    """bench.preempt_check on the CPU: SIGUSR1 and SIGTERM after step 2, each run checkpoints within 2 steps.
    The config sets a global batch for 8 GPUs, as the shipped ones do: the drill's one process must run."""
    from bench import preempt_check
    config = tmp_path / "eight_gpus.yaml"
    config.write_text((REPO / "configs" / "tiny_cpu.yaml").read_text().replace(
        "  grad_accum: 1\n", "  grad_accum: 1\n  global_batch_size: 128\n"))
    run_module("bench.preempt_check", "--smoke", "--config", str(config), "--out", str(tmp_path), "--after-step", "2",
               "--data-root", str(TEST_CACHE / "builtin"), "data.seq_len=32", timeout=240)
    rows = json.loads((tmp_path / "preempt_check.json").read_text())["rows"]
    assert [(r["signal"], r["sent_after"], r["exit"], r["ok"]) for r in rows] == [
        ("SIGUSR1", 2, 0, "yes"), ("SIGTERM", 2, 0, "yes")], rows
    assert all(2 < r["saved_at"] <= 4 for r in rows)
    assert not any((tmp_path / "preempt_check_runs").iterdir()), "the runs' checkpoints are deleted once checked"
    assert (tmp_path / "preempt_check_logs" / "USR1.log").is_file()
    # a signal that never reached the trainer, a late checkpoint, an incomplete one: each a failure that says so
    usr1 = preempt_check.signal.SIGUSR1
    lost = preempt_check.check({"sent_after": 2, "exit": 0}, "step 2/9\nstep 9/9\n", usr1, 2)
    assert lost["ok"] == "no" and "did not reach" in lost["problem"]
    early = preempt_check.check({"sent_after": None, "exit": 2}, "loading\nconfig error: train.steps: bad\n", usr1, 2)
    assert early["ok"] == "no" and "config error: train.steps: bad" in early["problem"]
    saved = tmp_path / "checkpoints" / "step00000009"
    saved.mkdir(parents=True)
    (saved / preempt_check.MARKER).write_text("")
    line = f"PREEMPTED: received SIGUSR1; checkpoint {saved} saved at step 9; exiting"
    assert "more than 2 steps" in preempt_check.check({"sent_after": 2, "exit": 0}, line, usr1, 2)["problem"]
    (saved / preempt_check.MARKER).unlink()
    line = f"PREEMPTED: received SIGUSR1; checkpoint {saved} saved at step 3; exiting"
    assert "no COMPLETE marker" in preempt_check.check({"sent_after": 2, "exit": 0}, line, usr1, 2)["problem"]


def test_matmul_peak_is_the_median_of_its_bursts(monkeypatch):
    """common.matmul_peak with bursts: the median of the bursts' times (each burst's own median comes from
    _time_mm), every burst's rate kept for the header, which states the range."""
    times = iter([1.0e-3, 1.2e-3, 0.9e-3, 1.1e-3, 1.05e-3])
    monkeypatch.setattr(common, "_time_mm", lambda device, n, warmup, iters: next(times))
    mm = common.matmul_peak(torch.device("cpu"), n=100, bursts=5, rest_s=0.0)
    assert mm["ms"] == pytest.approx(1.05) and mm["flops"] == pytest.approx(2e6 / 1.05e-3)
    assert mm["burst_tflops"] == pytest.approx([2e6 / t / 1e12 for t in (1.0e-3, 1.2e-3, 0.9e-3, 1.1e-3, 1.05e-3)])
    text = common.matmul_peak_text(mm)
    assert text.startswith("0.0019 TFLOP/s measured") and "5 bursts: 0.001667-0.002222" in text, text
