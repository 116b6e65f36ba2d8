"""Inference benchmark: denoising forward passes per second of each family, from 1K to 128K tokens.

    python -m bench.inference --out bench_results            # 1.3B DiffuMamba, DiffuMamba-H, DiffuTran
    python -m bench.inference --smoke --out /tmp/bench       # CPU, tiny presets, every code path
    python -m bench.inference --presets 1.3b-diffumamba --batches 1 --seq-lens 32768 --profile --out x
                                                             # where a forward's GPU time goes, by kernel kind
    python -m bench.inference --presets 1.3b-diffumamba --set model.mamba.chunk_size=128 --out x
                                                             # the same model with other kernel settings

One forward pass of the denoiser (x_t -> logits at every position) per call, as the sampler makes one per
step: bf16 weights (Mamba's A_log, D and dt_bias stay fp32, see model/mamba2.py), torch.inference_mode,
CUDA-event timing of `--iters` calls after `--warmup`, median. A (preset, batch) stops at the first
sequence length that runs out of memory: longer ones would too. Writes inference.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from bench import common, trace_breakdown
from bench.clocks import CLOCK_COLUMNS, CLOCK_NOTE, ClockSampler
from dtrain.config import apply_overrides
from model.config import ConfigError, ModelConfig
from model.flops import forward_flops_per_token
from model.graphs import GraphedDenoiser
from model.lm import DiffusionLM, count_parameters
from model.presets import config_from_fields

PRESETS = ["1.3b-diffumamba", "1.3b-diffumamba-h", "1.3b-diffutran"]
SMOKE_PRESETS = ["tiny-diffumamba", "tiny-diffumamba-h", "tiny-diffutran"]
SEQ_LENS = [1024 * 2 ** k for k in range(8)]          # 1K .. 128K
BASELINE = "diffutran"                                # ratios are against this family
SKIPPED = "skipped (OOM at a shorter L)"
TOO_BIG = "skipped (batch x L > --max-batch-tokens)"


def denoise(model: DiffusionLM, input_ids: torch.Tensor) -> torch.Tensor:
    """One denoising step's network call (tests replace it to simulate running out of memory)."""
    return model(input_ids)


def model_config(name: str, overrides: list[str] = ()) -> ModelConfig:
    """The preset with `--set model.FIELD=VALUE` overrides, as a training config's model section takes them."""
    for item in overrides:
        if not item.startswith("model."):
            raise ConfigError(f"--set {item!r}: only model.FIELD=VALUE overrides apply to a forward pass")
    return config_from_fields(apply_overrides({"model": {"preset": name}}, list(overrides))["model"])


def build_model(name: str, device: torch.device, overrides: list[str] = ()) -> DiffusionLM:
    with torch.device(device):   # initialise on the GPU: a 1.3B model is slow to initialise on the CPU
        model = DiffusionLM(model_config(name, overrides))
    return model.to(torch.bfloat16).eval()


def family(preset: str) -> str:
    return preset.split("-", 1)[1]


def measure(model: DiffusionLM, batch: int, seq_len: int, device: torch.device, warmup: int, iters: int,
            max_row_s: float, profile_dir: Path | None = None) -> dict:
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size - 1, (batch, seq_len), device=device)
    ids[torch.rand(batch, seq_len, device=device) < 0.5] = cfg.mask_token_id   # x_t at t = 0.5
    common.reset_peak(device)

    def call():
        return denoise(model, ids)

    with torch.inference_mode():
        # The first call (kernel compilation, autotuning) never counts; more warm-up only while calls
        # are short. The last warm-up call's time decides how many timed calls fit in max_row_s.
        t = common.time_calls(call, device, 0, 1)[0]
        for _ in range(warmup - 1):
            if t > max_row_s / 4:
                break
            t = common.time_calls(call, device, 0, 1)[0]
        n = max(min(iters, 3), min(iters, int(max_row_s / max(t, 1e-9))))
        with ClockSampler(device) as clocks:
            times = common.time_calls(call, device, 0, n)
        sec = common.median(times)
        got = {"status": "ok", "ms": sec * 1e3, "forwards_per_s": 1 / sec, "tokens_per_s": batch * seq_len / sec,
               "peak_mem_GiB": common.peak_mem_gib(device), "iters": n, **clocks.summary()}
        if profile_dir is not None:
            got.update(common.profile_calls(call, profile_dir, device, 2, "forward passes"))
    return got


def row_overrides(row: dict) -> str:
    """The row's --set, shell-quoted: "" for none (and for rows of results written before --set)."""
    return row.get("overrides", "")


def add_ratios(rows: list[dict]) -> None:
    """tokens/s relative to the baseline family at the same batch, L and overrides (None where either is
    missing)."""
    base = {(r["batch"], r["seq_len"], row_overrides(r)): r.get("tokens_per_s") for r in rows
            if family(r["preset"]) == BASELINE}
    for r in rows:
        b = base.get((r["batch"], r["seq_len"], row_overrides(r)))
        r["vs_" + BASELINE] = r["tokens_per_s"] / b if r.get("tokens_per_s") and b else None


def add_floor(rows: list[dict], peak_flops: float | None) -> None:
    """The matmul FLOP floor of each row, model FLOPs of the forward (model/flops.py, logits at every
    position) / the measured bf16 matmul peak, and the measured time over it."""
    if not peak_flops:
        return
    for r in rows:
        if r.get("ms"):
            cfg = model_config(r["preset"], shlex.split(row_overrides(r)))
            flops = forward_flops_per_token(cfg, r["seq_len"]) * r["batch"] * r["seq_len"]
            r["floor_ms"] = flops / peak_flops * 1e3
            r["vs_floor"] = r["ms"] / r["floor_ms"]
            if r.get("ms_gemm") is not None:        # --profile: how much of the gap is the matmuls' own
                r["gemm_vs_floor"] = r["ms_gemm"] / r["floor_ms"]


def autotune_picks() -> dict[str, str]:
    """The picks of our Triton kernels' autotuners so far, "kernel (key)" -> config; none without Triton.
    Recorded per row: a pick can differ between processes and machines, and by up to 12% in a kernel's time."""
    try:
        from model import chunk_scan_kernel, state_pass_kernel
    except ImportError:
        return {}
    return {f"{name} {tuple(k for k in key if not str(k).startswith('torch.'))}": str(config)   # dtypes left out
            for name, module in (("scan_out", chunk_scan_kernel), ("state_pass", state_pass_kernel))
            for key, config in module._autotuned_kernel.cache.items()}


def sweep(presets, batches, seq_lens, device, warmup, iters, max_row_s, max_batch_tokens=None,
          on_row=lambda rows: None, previous: list[dict] = (), cuda_graphs: bool = False,
          profile_root: Path | None = None, overrides: list[str] = ()) -> list[dict]:
    """Every (preset, batch, L); rows found in `previous` (an earlier, interrupted run with the same
    overrides) are kept as they are."""
    done = {(r["preset"], r["batch"], r["seq_len"]): r for r in previous
            if row_overrides(r) == shlex.join(overrides)}
    rows: list[dict] = []
    for name in presets:
        model = None   # built when the first row of this preset is measured
        with torch.device("meta"):
            params = count_parameters(DiffusionLM(model_config(name, overrides))) / 1e6
        for batch in batches:
            oom_at = None
            for seq_len in seq_lens:
                if (name, batch, seq_len) in done:
                    rows.append(done[name, batch, seq_len])
                    oom_at = seq_len if rows[-1]["status"] != "ok" else None
                    continue
                row = {"preset": name, "params_M": params, "batch": batch, "seq_len": seq_len,
                       "overrides": shlex.join(overrides)}
                if oom_at is not None:
                    row["status"] = SKIPPED
                elif max_batch_tokens and batch * seq_len > max_batch_tokens:
                    row["status"] = TOO_BIG
                else:
                    if model is None:
                        common.free_memory(device)
                        model = build_model(name, device, overrides)
                        if cuda_graphs:
                            model = GraphedDenoiser(model)
                        print(f"{name}: {params:.0f}M parameters", flush=True)
                    t0 = time.perf_counter()
                    profile_dir = profile_root / f"{name}_b{batch}_L{seq_len}" if profile_root is not None else None
                    picked_before = autotune_picks()
                    got = common.guarded(measure, device, model, batch, seq_len, device, warmup, iters, max_row_s,
                                         profile_dir)
                    row.update({"status": common.OOM} if got is common.OOM else got)
                    row["autotune_picks"] = {k: v for k, v in autotune_picks().items() if k not in picked_before}
                    oom_at = seq_len if got is common.OOM else None
                    print(f"  batch {batch} L {seq_len}: {row['status']}"
                          + (f", {row['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in row else "")
                          + f" ({time.perf_counter() - t0:.1f} s)"
                          + "".join(f"\n    picked {k}: {v}" for k, v in row["autotune_picks"].items()), flush=True)
                rows.append(row)
                on_row(rows)
        del model
    return rows


COLUMNS = [("preset", "preset", ""), ("batch", "batch", "d"), ("L", "seq_len", ","), ("status", "status", ""),
           ("ms / forward", "ms", ".1f"), ("forwards/s", "forwards_per_s", ".2f"),
           ("tokens/s", "tokens_per_s", ",.0f"), ("vs DiffuTran", "vs_" + BASELINE, ".2f"),
           ("matmul floor (ms)", "floor_ms", ".1f"), ("x floor", "vs_floor", ".2f"),
           ("peak mem (GiB)", "peak_mem_GiB", ".1f"), ("calls", "iters", "d"), *CLOCK_COLUMNS]
OVERRIDES_COLUMN = ("--set", "overrides", "")
# --profile: GPU time of a traced forward by kernel kind (bench/trace_breakdown.py's categories)
PROFILE_COLUMNS = ([("preset", "preset", ""), ("batch", "batch", "d"), ("L", "seq_len", ","),
                    ("ms / forward", "ms", ".1f"), ("matmul floor (ms)", "floor_ms", ".1f"),
                    ("gemm / floor", "gemm_vs_floor", ".2f"), ("GPU idle %", "gpu_idle_pct", ".1f")]
                   + [(f"{kind} (ms)", f"ms_{kind}", ".1f") for kind in trace_breakdown.SINGLE_PROCESS_KINDS
                      if kind != "optimizer"]
                   + [("breakdown", "profile", "")])


def plot(rows: list[dict], head: dict, path: Path) -> None:
    """Per batch size (columns): tokens/s, tokens/s relative to DiffuTran, peak memory, against L."""
    plt = common.pyplot()
    if plt is None:
        return
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(3, len(batches), figsize=(6 * len(batches), 11), squeeze=False)
    for j, batch in enumerate(batches):
        for name, sets in dict.fromkeys((r["preset"], row_overrides(r)) for r in rows):
            ok = [r for r in rows if (r["preset"], row_overrides(r)) == (name, sets) and r["batch"] == batch
                  and r["status"] == "ok"]
            xs, label = [r["seq_len"] for r in ok], f"{name} {sets}".strip()
            axes[0][j].plot(xs, [r["tokens_per_s"] for r in ok], marker="o", label=label)
            ratio = [(r["seq_len"], r["vs_" + BASELINE]) for r in ok if r.get("vs_" + BASELINE) is not None]
            if family(name) != BASELINE and ratio:
                axes[1][j].plot(*zip(*ratio), marker="o", label=label)
            if ok and ok[0]["peak_mem_GiB"] is not None:
                axes[2][j].plot(xs, [r["peak_mem_GiB"] for r in ok], marker="o", label=label)
        axes[0][j].set(title=f"batch {batch}", ylabel="tokens/s", yscale="log")
        axes[1][j].set(ylabel="tokens/s relative to DiffuTran")
        axes[1][j].axhline(1.0, color="gray", lw=0.8)
        axes[2][j].set(xlabel="sequence length", ylabel="peak memory (GiB)")
        for ax in (axes[0][j], axes[1][j], axes[2][j]):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    common.save_figure(fig, head, "denoising forward pass", path)


NOTES = [("tokens/s = batch x L / median time of one forward pass; vs DiffuTran = tokens/s over the "
          "DiffuTran preset's at the same batch and L"),
         ("matmul floor = model FLOPs of the forward (model/flops.py: matmuls only, logits at every position) / "
          "the bf16 matmul peak; x floor = ms / floor"),
         "peak mem: torch.cuda.max_memory_allocated during the row", CLOCK_NOTE]


def rewrite_floor(out_dir: Path, peak_flops: float) -> None:
    """--plot-only --matmul-peak-tflops: the matmul-floor columns of an existing result, from a given peak."""
    result = json.loads((out_dir / "inference.json").read_text())
    head, rows = result["header"], result["rows"]
    head["matmul_peak"] = (f"{peak_flops / 1e12:.3g} TFLOP/s (given afterwards: --plot-only "
                           f"--matmul-peak-tflops {peak_flops / 1e12:g})")
    head["matmul_peak_flops"] = peak_flops
    save_results(out_dir, head, rows)


def save_results(out_dir: Path, head: dict, rows: list[dict]) -> Path:
    """OUT/inference.{json,md}, with the DiffuTran ratios and matmul-floor columns (from the header's peak)."""
    add_ratios(rows)
    add_floor(rows, head.get("matmul_peak_flops"))
    columns, profile_columns = COLUMNS, PROFILE_COLUMNS
    if any(r.get("overrides") for r in rows):   # --set: which model each row measured
        columns, profile_columns = ([c[0], OVERRIDES_COLUMN, *c[1:]] for c in (COLUMNS, PROFILE_COLUMNS))
    tables = common.tables_with_profile(columns, rows, profile_columns, "GPU time of a traced forward pass by "
                                        "kernel kind (ms; kinds on different streams can overlap)", "ms_gemm")
    return common.write_results(out_dir, "inference", f"Inference: denoising forward pass — {head['card']}", head,
                                tables, rows, NOTES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny presets, L 64/128, batches 1/2, 1-2 calls")
    ap.add_argument("--presets", nargs="+")
    ap.add_argument("--seq-lens", nargs="+", type=int)
    ap.add_argument("--batches", nargs="+", type=int, help="default: 1 8")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5, help="timed calls per row (median); fewer when slow")
    ap.add_argument("--max-batch-tokens", type=int, default=2 ** 19,
                    help="skip rows with batch x L above this (default 512K: batch 8 up to L 64K)")
    ap.add_argument("--max-row-seconds", type=float, default=20.0,
                    help="fewer timed calls (never under min(iters, 3)) and warm-up calls (never under 1) "
                         "when a row would take longer")
    ap.add_argument("--matmul-n", type=int, default=8192, help="size of the bf16 torch.mm timed for the peak")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="replay each model's trunk from a CUDA graph per shape (model/graphs.py)")
    ap.add_argument("--matmul-peak-tflops", type=float,
                    help="use this bf16 matmul peak instead of measuring it; with --plot-only, (re)computes the "
                         "matmul-floor columns of OUT/inference.{json,md} from it")
    ap.add_argument("--profile", action="store_true",
                    help="trace 2 more forward passes of each row; GPU time by kernel kind in a second table, "
                         "breakdowns in OUT/inference_profiles/")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="model overrides for every preset, e.g. model.mamba.chunk_size=128 (the floor columns "
                         "count the FLOPs of the overridden model)")
    common.add_output_args(ap, "inference")
    args = ap.parse_args(argv)
    given_peak = args.matmul_peak_tflops * 1e12 if args.matmul_peak_tflops else None
    if args.plot_only:
        if given_peak:
            rewrite_floor(args.out, given_peak)
        return common.replot(args.out, "inference", plot)
    presets = args.presets or (SMOKE_PRESETS if args.smoke else PRESETS)
    for name in presets:   # a bad preset or override fails before the GPU is touched
        model_config(name, args.set)
    device = common.pick_device(args.smoke)
    seq_lens = args.seq_lens or ([64, 128] if args.smoke else SEQ_LENS)
    batches = args.batches or ([1, 2] if args.smoke else [1, 8])
    warmup, iters = (1, 2) if args.smoke else (args.warmup, args.iters)
    max_row_s = 0.0 if args.smoke else args.max_row_seconds
    if given_peak:
        peak = {"flops": given_peak, "text": f"{given_peak / 1e12:.3g} TFLOP/s (given: --matmul-peak-tflops)"}
    else:
        mm = (common.matmul_peak(device, n=256, warmup=1, iters=2) if args.smoke
              else common.matmul_peak(device, args.matmul_n, bursts=5))
        peak = {"flops": mm["flops"], "text": common.matmul_peak_text(mm)}
    head = common.header(device, "bench.inference", dtype="bf16 weights (A_log, D, dt_bias fp32)",
                         timing=f"median of {iters} calls after {warmup} warm-up (fewer for rows slower than "
                                f"--max-row-seconds {max_row_s:g}: never under 3 and 1; column `calls`)",
                         matmul_peak=peak["text"], matmul_peak_flops=peak["flops"],
                         cuda_graphs="on: the trunk replayed from a CUDA graph per shape" if args.cuda_graphs else "off",
                         **({"overrides": shlex.join(args.set)} if args.set else {}))

    previous = common.previous_rows(args.out, "inference", head, args.resume)
    planned = {(p, b, L, shlex.join(args.set)) for p in presets for b in batches for L in seq_lens}
    others = [r for r in previous    # other --presets or --set
              if (r["preset"], r["batch"], r["seq_len"], row_overrides(r)) not in planned]

    rows = others + sweep(presets, batches, seq_lens, device, warmup, iters,
                          max_row_s, args.max_batch_tokens,
                          on_row=lambda new: save_results(args.out, head, others + new), previous=previous,
                          cuda_graphs=args.cuda_graphs,
                          profile_root=args.out / "inference_profiles" if args.profile else None,
                          overrides=args.set)
    common.print_results(save_results(args.out, head, rows))
    plot(rows, head, args.out / "inference.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
