"""Scaling benchmark: ZeRO-1 data parallelism and pipeline parallelism vs one GPU, through `dtrain train`.

    python -m bench.scaling --gpus 1 --out bench_results    # the trainer's own tokens/s on one GPU
    python -m bench.scaling --gpus 2 --out bench_results    # 1 GPU, ZeRO-1 DP=2, PP=2
    python -m bench.scaling --gpus 4 --out bench_results    # 1 GPU, ZeRO-1 DP=4, PP=2 x DP=2
    python -m bench.scaling --smoke --out /tmp/bench        # CPU: tiny model, 2 gloo processes

Each layout is a real training run, `torchrun --nproc_per_node N -m dtrain.cli train --config CONFIG ...`,
of the same config (micro-batch and grad_accum per data-parallel rank unchanged, so the global batch
grows with DP; --global-batch N instead keeps N sequences a step in every layout, as the trainer does on any
GPU count), on the built-in corpus unless --data names a dataset. Throughput comes from the trainer's
console line (`step 12/12 | ... | tok/s 9021 | ...`, dtrain/metrics.py), all ranks together; the first
log interval (warm-up) is dropped. Efficiency = tokens/s per GPU of the layout / tokens/s of 1 GPU.
Writes scaling.{json,md,png} and each run's log under scaling_logs/.

--profile-steps K runs K more steps after the measured ones and traces them on every rank
(logging.profile_start); the tokens/s still come from the first --steps steps. Each layout's traces go
through bench.trace_breakdown: scaling_profiles/<layout>.md, and the mean over ranks of GPU compute,
idle and exposed-NCCL time per step in the table, which is where a layout's lost efficiency went.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import common, trace_breakdown

# name: (processes, pipeline stages); data-parallel size = processes / stages
LAYOUTS = {"1": (1, 1), "dp2": (2, 1), "pp2": (2, 2), "dp4": (4, 1), "pp2dp2": (4, 2)}
DEFAULT_LAYOUTS = {1: ["1"], 2: ["1", "dp2", "pp2"], 4: ["1", "dp4", "pp2dp2"]}
LOG_LINE = re.compile(r"step (\d+)/(\d+) \|[^\n]*?\| tok/s (\d+(?:\.\d+)?)(?:[^\n]*?\| mfu (\d+(?:\.\d+)?)%)?")
# dtrain.metrics.memory_line, printed after a log line whenever it changed: "0: 61.2/74.9, 1: ..."
MEMORY_LINE = re.compile(r"peak memory per rank \(GiB allocated/reserved\): ([^\n]*)")
RANK_MEMORY = re.compile(r"(\d+): (\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)")


def describe(layout: str) -> str:
    n, pp = LAYOUTS[layout]
    if n == 1:
        return "1 GPU"
    return f"PP={pp} x DP={n // pp}" if pp > 1 and n // pp > 1 else (f"PP={pp}" if pp > 1 else f"ZeRO-1 DP={n}")


def parse_log(text: str) -> list[dict]:
    """The trainer's progress lines: step, total steps, tokens/s of the interval (all ranks), MFU if logged."""
    return [{"step": int(m[1]), "steps": int(m[2]), "tokens_per_s": float(m[3]),
             "mfu": float(m[4]) / 100 if m[4] else None} for m in LOG_LINE.finditer(text)]


def parse_memory(text: str) -> list[tuple[float, float]] | None:
    """Every rank's (peak allocated, peak reserved) GiB, rank order, from the run's last memory line; None
    when the run printed none (CPU runs)."""
    found = MEMORY_LINE.findall(text)
    return [(float(a), float(r)) for _, a, r in RANK_MEMORY.findall(found[-1])] if found else None


def measured_lines(lines: list[dict], steps: int) -> list[dict]:
    """The progress lines of the measured steps (traced steps after them run slower)."""
    return [ln for ln in lines if ln["step"] <= steps]


def steady_tokens_per_s(lines: list[dict]) -> float | None:
    """Tokens/s over every log interval but the first: total steps / total time, as each interval's time is
    (its steps) x (tokens per step) / (its rate) and tokens per step is the same for all."""
    prev, steps, time_units = None, 0, 0.0
    for ln in lines:
        if prev is not None and ln["step"] > prev:
            steps += ln["step"] - prev
            time_units += (ln["step"] - prev) / ln["tokens_per_s"]
        prev = ln["step"]
    return steps / time_units if time_units else None


def gpu_description() -> tuple[str, dict]:
    """'NVIDIA H100 80GB HBM3' and the kernels in use, asked of a child process: this one stays off the
    GPUs (a CUDA context here would take memory from the first rank)."""
    code = ("import json, torch; from model import kernels; "
            "print(json.dumps([torch.cuda.get_device_name(0), kernels.describe('cuda')]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=common.REPO, capture_output=True, text=True, check=True)
    name, kernels = json.loads(out.stdout.strip().splitlines()[-1])
    return name, kernels


def overrides(args, layout: str) -> list[str]:
    """dtrain overrides of one layout's run: its own name, folder and pipeline depth, then shared_overrides."""
    _, pp = LAYOUTS[layout]
    layout_overrides = [f"run.name=scaling_{layout}", f"run.out_dir={args.out / 'scaling_runs' / layout}",
                        f"parallel.pipeline_stages={pp}", *shared_overrides(args)]
    return layout_overrides + global_batch_overrides(args, layout, layout_overrides)


def batch_shape(args, layout: str) -> tuple[int, int]:
    """(micro-batch, grad_accum) per data-parallel rank of one layout's run, as its overrides make them."""
    from dtrain.config import load_config
    train = load_config(args.config, overrides(args, layout)).train
    return train.micro_batch_size, train.grad_accum


def global_batch_overrides(args, layout: str, layout_overrides: list[str]) -> list[str]:
    """--global-batch N: N sequences a step on this layout's ranks, by the trainer's own rule on any GPU count
    (dtrain.submit.keep_global_batch: grad_accum = N / (micro-batch x data-parallel size)). A pipeline then
    has N / micro-batch micro-batches in flight a step, and its bubble, (stages - 1) / (micro-batches +
    stages - 1) of the step, shrinks as the global batch grows."""
    if not getattr(args, "global_batch", None):
        return []
    from dtrain.submit import keep_global_batch
    from model.config import ConfigError
    batch = [f"train.global_batch_size={args.global_batch}"]
    try:
        return batch + keep_global_batch(args.config, layout_overrides + batch, LAYOUTS[layout][0])
    except ConfigError as e:
        sys.exit(f"--global-batch {args.global_batch} ({layout}): {e}")


def shared_overrides(args) -> list[str]:
    """The same in every run: no evaluation, checkpoints, samples or TensorBoard; ZeRO-1; batch and data."""
    over = [f"train.steps={args.steps + args.profile_steps}", f"logging.log_interval={args.log_interval}",
            "train.eval_interval=0",
            "train.global_batch_size=null", "checkpoint.interval=0", "checkpoint.save_final=false",
            "logging.tensorboard=false", "logging.num_samples=0", "parallel.zero_stage=1"]
    over += [f"train.{k}={v}" for k, v in (("micro_batch_size", args.micro_batch), ("grad_accum", args.grad_accum))
             if v is not None]
    if args.profile_steps:
        over += [f"logging.profile_start={args.steps + 1}", f"logging.profile_steps={args.profile_steps}"]
    if args.seq_len is not None:
        over.append(f"data.seq_len={args.seq_len}")
    if args.data:
        over += [f"data.path={args.data}", "data.build_default=false"]
    else:
        over += common.builtin_data_overrides(args)
    return over + list(args.override)


def launch(args, layout: str, log_path: Path) -> tuple[int | str, str]:
    """Run one layout under torchrun; (exit status, its output). The output is also written to log_path."""
    n, _ = LAYOUTS[layout]
    print(f"{describe(layout)}:", flush=True)
    return common.torchrun(n, ["train", "--config", str(args.config), *overrides(args, layout)], log_path,
                           timeout=args.timeout, cpu=args.smoke)


def result_row(layout: str, rc, text: str, wall_s: float, steps: int) -> dict:
    n, pp = LAYOUTS[layout]
    lines = measured_lines(parse_log(text), steps)
    tps = steady_tokens_per_s(lines)
    row = {"layout": describe(layout), "key": layout, "gpus": n, "dp": n // pp, "pp": pp, "wall_s": wall_s,
           "log_lines": len(lines)}
    if rc != 0 or tps is None:
        tail = common.log_tail(text)
        why = rc if isinstance(rc, str) else f"exit {rc}"
        row["status"] = f"failed ({why}): {tail}" if rc != 0 else "failed: fewer than 2 progress lines"
        return row
    mfus = [ln["mfu"] for ln in lines[1:] if ln["mfu"] is not None]
    memory = parse_memory(text)
    if memory:
        row.update(peak_reserved_gib=max(r for _, r in memory),
                   reserved_per_rank=" / ".join(f"{r:.1f}" for _, r in memory))
    row.update(status="ok", tokens_per_s=tps, tokens_per_s_per_gpu=tps / n,
               mfu_trainer=sum(mfus) / len(mfus) if mfus else None, interval_spread=interval_spread(lines))
    return row


def interval_spread(lines: list[dict]) -> float | None:
    """(fastest - slowest) / mean tokens/s of the measured log intervals (all but the first); None with
    fewer than two. Efficiencies that differ by less than this are not told apart by the run."""
    rates = [ln["tokens_per_s"] for ln in lines[1:]]
    return (max(rates) - min(rates)) / (sum(rates) / len(rates)) if len(rates) > 1 else None


def profile_summary(args, layout: str) -> dict:
    """Break down the layout's traces (scaling_profiles/<layout>.md); the per-step means over ranks."""
    folder = args.out / "scaling_runs" / layout / "profile"
    files = sorted(folder.glob("*.json.gz")) if folder.is_dir() else []
    if not files:
        return {"profile": f"no trace in {folder}"}
    try:
        results = trace_breakdown.breakdown_files(files)
    except ValueError as e:                 # a CPU run (--smoke) traces no GPU kernel
        return {"profile": str(e)}
    path = args.out / "scaling_profiles" / f"{layout}.md"
    trace_breakdown.write_markdown(path, f"{describe(layout)}: GPU time of the traced steps", results)
    mean = lambda key, part: sum(r[part][key] for _, r in results) / len(results)
    return {"profile": str(path.relative_to(args.out)), "gpu_step_ms": mean("window", "per_step_ms"),
            "compute_pct": mean("compute_busy", "pct"), "idle_pct": mean("idle", "pct"),
            "nccl_exposed_pct": mean("nccl_exposed", "pct"), "p2p_ms": mean("nccl_p2p", "per_step_ms"),
            "collective_ms": mean("nccl_collective", "per_step_ms")}


def add_efficiency(rows: list[dict]) -> None:
    base = next((r.get("tokens_per_s_per_gpu") for r in rows if r["gpus"] == 1), None)
    for r in rows:
        r["efficiency"] = r["tokens_per_s_per_gpu"] / base if base and r.get("tokens_per_s_per_gpu") else None


COLUMNS = [("layout", "layout", ""), ("GPUs", "gpus", "d"), ("DP", "dp", "d"), ("PP", "pp", "d"),
           ("micro-batch x grad_accum", "batch", ""), ("status", "status", ""),
           ("tokens/s (all GPUs)", "tokens_per_s", ",.0f"),
           ("tokens/s/GPU", "tokens_per_s_per_gpu", ",.0f"), ("efficiency vs 1 GPU", "efficiency", ".1%"),
           ("interval spread", "interval_spread", ".1%"), ("MFU (trainer, data-sheet peak)", "mfu_trainer", ".1%"),
           ("peak reserved per rank (GiB)", "reserved_per_rank", ""),
           ("run wall (s)", "wall_s", ".0f")]
# with --profile-steps: the traced steps' GPU time, mean over ranks (bench/trace_breakdown.py)
PROFILE_COLUMNS = [("layout", "layout", ""), ("GPU window / step (ms)", "gpu_step_ms", ",.0f"),
                   ("compute busy", "compute_pct", ".1f"), ("idle", "idle_pct", ".1f"),
                   ("NCCL exposed", "nccl_exposed_pct", ".1f"), ("p2p kernels / step (ms)", "p2p_ms", ",.0f"),
                   ("collectives / step (ms)", "collective_ms", ",.0f"), ("breakdown", "profile", "")]


def plot(rows: list[dict], head: dict, path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["layout"] for r in ok]
    axes[0].bar(names, [r["tokens_per_s_per_gpu"] for r in ok])
    axes[0].set(ylabel="tokens/s per GPU")
    axes[1].bar(names, [100 * (r["efficiency"] or 0) for r in ok])
    axes[1].axhline(100, color="gray", lw=0.8)
    axes[1].set(ylabel="per-GPU efficiency vs 1 GPU (%)")
    common.save_figure(fig, head, "scaling", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny config, 4 steps, 2 processes")
    ap.add_argument("--gpus", type=int, choices=sorted(DEFAULT_LAYOUTS), default=2)
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), help="default: by --gpus; '1' is the baseline")
    ap.add_argument("--config", type=Path, help="default: configs/1p3b_diffumamba.yaml (--smoke: tiny_cpu.yaml)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="trace this many more steps on every rank after the measured ones and break them down")
    ap.add_argument("--log-interval", type=int, default=4,
                    help="the first interval is dropped as warm-up (on a fresh machine it includes the Triton "
                         "kernels' compilation; at 8 steps the 1-GPU run was still speeding up)")
    ap.add_argument("--micro-batch", type=int, help="default: the config's")
    ap.add_argument("--grad-accum", type=int, help="default: the config's (micro-batches per pipeline step)")
    ap.add_argument("--global-batch", type=int,
                    help="sequences per optimizer step in every layout (grad_accum = this / (micro-batch x DP)), "
                         "as the trainer keeps a config's global batch on any GPU count; default: the config's "
                         "micro-batch x grad_accum per data-parallel rank")
    ap.add_argument("--seq-len", type=int, help="default: the config's")
    ap.add_argument("--data", help="a built dataset (dshards build); default: the built-in corpus")
    common.add_builtin_data_args(ap)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    common.add_output_args(ap, "scaling", resume_help="keep the layouts already measured in OUT/scaling.json (same card); run the others")
    ap.add_argument("override", nargs="*", help="more dtrain overrides for every run: model.d_model=512 ... (before --layouts, "
                                                    "which would take them as layouts)")
    args = ap.parse_args(argv)
    if args.global_batch and args.grad_accum:
        ap.error("--global-batch sets grad_accum per layout: leave out --grad-accum")
    if args.plot_only:
        return common.replot(args.out, "scaling", plot)
    args.out = args.out.resolve()
    layouts = args.layouts or (["1", "dp2", "pp2"] if args.smoke else DEFAULT_LAYOUTS[args.gpus])
    too_big = [name for name in layouts if LAYOUTS[name][0] > args.gpus and not args.smoke]
    if too_big:
        sys.exit(f"--layouts {' '.join(too_big)}: more processes than --gpus {args.gpus}")
    if args.smoke:
        args.config = args.config or common.REPO / "configs" / "tiny_cpu.yaml"
        args.steps, args.log_interval = min(args.steps, 4), 1
        args.micro_batch = args.micro_batch or 2
        args.grad_accum = args.grad_accum or (None if args.global_batch else 2)
        args.seq_len = args.seq_len or 64
        common.smoke_builtin_data(args)
        args.override = ["train.precision=bf16", "data.num_workers=0", *args.override]
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
            sys.exit(f"needs {args.gpus} CUDA GPUs (or --smoke for a CPU run with gloo)")
        args.config = args.config or common.REPO / "configs" / "1p3b_diffumamba.yaml"
    head = common.header(torch.device("cpu"), "bench.scaling", config=str(args.config),
                         overrides=" ".join(shared_overrides(args)) + " (+ run.name, run.out_dir, "
                                                                      "parallel.pipeline_stages per layout)")
    if not args.smoke:
        head["card"], head["kernels"] = gpu_description()   # the count is per row: --resume adds layouts
    title = f"Scaling: ZeRO-1 data parallelism and pipeline parallelism — {head['card']}"
    notes = ["tokens/s: the trainer's console `tok/s` (all ranks) over every log interval but the first",
             ("efficiency = (tokens/s / GPUs) / tokens/s of the 1-GPU run of the same config; micro-batch and "
              "grad_accum per data-parallel rank are the same in every run (PP=2 pipelines grad_accum "
              "micro-batches per step); --global-batch: every layout trains the same sequences a step instead"),
             ("interval spread = (fastest - slowest) / mean tokens/s of the measured log intervals: an "
              "efficiency within the spreads of its run and of the 1-GPU run is noise (more --steps narrow it)"),
             ("peak reserved per rank: torch.cuda.max_memory_reserved of the whole run, rank 0 first (pipeline "
              "stage 0 first), from the trainer's memory line; it includes CUDA graph pools")]

    def save(rows):
        add_efficiency(rows)
        tables = common.tables_with_profile(COLUMNS, rows, PROFILE_COLUMNS,
                                            "GPU time of the traced steps (% of the GPU window, mean over ranks)",
                                            "gpu_step_ms")
        return common.write_results(args.out, "scaling", title, head, tables, rows, notes)

    previous = common.previous_rows(args.out, "scaling", head, args.resume)
    done = {r["key"]: r for r in previous if r["status"] == "ok"}
    rows = [r for r in previous if r["key"] not in layouts]   # layouts measured by another --layouts run
    for layout in layouts:
        if layout in done:
            rows.append(done[layout])
            continue
        t0 = time.time()
        rc, text = launch(args, layout, args.out / "scaling_logs" / f"{layout}.log")
        rows.append(result_row(layout, rc, text, time.time() - t0, args.steps))
        rows[-1]["batch"] = "{} x {}".format(*batch_shape(args, layout))
        if args.profile_steps and rows[-1]["status"] == "ok":
            rows[-1].update(profile_summary(args, layout))
        print(f"{describe(layout)}: {rows[-1]['status']}"
              + (f", {rows[-1]['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in rows[-1] else ""), flush=True)
        save(rows)
    common.print_results(save(rows))
    plot(rows, head, args.out / "scaling.png")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
