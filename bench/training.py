"""Training benchmark: tokens/s per GPU and MFU of the 240M and 1.3B presets at L = 1024, 2048, 4096.

    python -m bench.training --out bench_results          # one GPU, the six 240M / 1.3B presets
    python -m bench.training --smoke --out /tmp/bench     # CPU, tiny presets, every code path

The trainer's own path in one process: the preset's production config (configs/<size>_<family>.yaml:
bf16 = DeepSpeed torch_autocast with fp32 weights, its ZeRO stage and activation checkpointing), the
engine from dtrain.engine.build and dtrain.loop.train_step, on random tokens masked by mask_batch.
For each L the largest micro-batch that fits is found by halving from a cap on OOM (grad_accum 1 unless
--grad-accum says otherwise: a production step accumulates several micro-batches per optimizer step).
MFU = tokens/s x model FLOPs per token (model/flops.py, fwd + bwd = 3 x fwd) / peak, against the
measured bf16 matmul peak of the card (8192^3 torch.mm) and against its data-sheet peak.
Writes training.{json,md,png}. --profile traces 2 more steps of each measured row (torch.profiler) and
breaks their GPU time down by kernel kind (bench/trace_breakdown.py): training_profiles/<preset>_L<L>.md,
and a second table of ms per step by kind, to show what keeps MFU below the matmul peak.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import torch

from bench import common, trace_breakdown
from bench.clocks import CLOCK_COLUMNS, CLOCK_NOTE, ClockSampler
from dtrain import engine as dengine
from dtrain.config import load_config
from dtrain.loop import to_device, train_step
from model.diffusion import mask_batch
from model.flops import peak_flops, train_flops_per_token
from model.lm import DiffusionLM, count_parameters
from model.presets import get_preset

PRESETS = [f"{size}-{fam}" for size in ("240m", "1.3b") for fam in ("diffumamba", "diffumamba-h", "diffutran")]
SMOKE_PRESETS = ["tiny-diffumamba", "tiny-diffumamba-h", "tiny-diffutran"]
SEQ_LENS = [1024, 2048, 4096]


def config_path(preset: str) -> Path:
    """configs/1p3b_diffumamba_h.yaml for 1.3b-diffumamba-h; tiny presets use configs/tiny_cpu.yaml."""
    size, fam = preset.split("-", 1)
    if size == "tiny":
        return common.REPO / "configs" / "tiny_cpu.yaml"
    return common.REPO / "configs" / f"{size.replace('.', 'p')}_{fam.replace('-', '_')}.yaml"


def run_config(preset: str, seq_len: int, micro_batch: int, ac: str, grad_accum: int = 1,
               extra: list[str] = ()):
    """The preset's production config at this L and micro-batch; `extra`: more KEY=VALUE overrides."""
    over = [f"model.preset={preset}", f"data.seq_len={seq_len}", f"train.micro_batch_size={micro_batch}",
            f"train.grad_accum={grad_accum}", "train.global_batch_size=null", "train.precision=bf16"]
    if ac != "config":
        over.append(f"train.activation_checkpointing={'true' if ac == 'on' else 'false'}")
    if ac == "on":   # recomputation cannot run inside a recorded backward: the Mamba configs' graphs go
        over.append("train.cuda_graphs=false")
    return load_config(config_path(preset), over + list(extra))


class NoMetrics:
    """train_step hands per-micro-batch loss statistics to a Metrics object; the benchmark drops them."""

    def add_stats(self, stats, keep=True):
        pass


class Trial:
    """An engine for one preset, built the trainer's way; rebuilt after an OOM (ZeRO's gradient buffers
    may be half-filled by an interrupted backward pass)."""

    def __init__(self, preset: str, device: torch.device, ac: str, grad_accum: int = 1, extra: list[str] = (),
                 python_stacks: bool = False):
        self.preset, self.device, self.ac = preset, device, ac
        self.grad_accum, self.extra, self.python_stacks = grad_accum, list(extra), python_stacks
        p = get_preset(preset)
        self.vocab, self.mask_id = p.vocab_size, p.mask_token_id
        self.trainee, self.built_for = None, None

    def build(self, seq_len: int, micro_batch: int):
        self.close()
        self.built_for = (seq_len, micro_batch)
        # memory still held from an earlier engine (should be ~0: a leak would shrink what fits)
        self.leftover_gib = torch.cuda.memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else None
        self.cfg = run_config(self.preset, seq_len, micro_batch, self.ac, self.grad_accum, self.extra)
        self.model_cfg = self.cfg.model_config(self.vocab, self.mask_id)
        device = self.device

        def on_device(model_cfg):  # initialise on the GPU: a 1.3B model takes a while on the CPU
            with torch.device(device):
                return DiffusionLM(model_cfg)

        saved, dengine.DiffusionLM = dengine.DiffusionLM, on_device
        try:
            self.trainee = dengine.build(self.cfg, self.model_cfg, device)
        finally:
            dengine.DiffusionLM = saved

    def close(self):
        """Free the engine. DeepSpeed keeps every engine's parameters in a global registry (and hooks) until
        engine.destroy(): without it each rebuild, after an OOM or for the next preset, kept the last
        engine's weights and optimizer states (19 GiB at 1.3B) on the GPU."""
        if self.trainee is not None:
            self.trainee.engine.destroy()
        self.trainee = None
        common.free_memory(self.device)

    def batches(self, micro_batch: int, seq_len: int, n: int = 4) -> list[dict]:
        x0 = torch.randint(0, self.vocab - 1, (micro_batch, seq_len))
        out = []
        for step in range(n):   # a few different t / masks, reused cyclically
            b = mask_batch(x0, seed=0, step=step, positions=torch.arange(micro_batch), global_batch_size=micro_batch,
                           mask_id=self.mask_id)
            out.append(to_device(b, self.device, self.mask_id))     # as the trainer does, index made here
        return out

    def measure(self, seq_len: int, micro_batch: int, warmup: int, iters: int, inject_oom_tokens: int | None,
                profile_dir: Path | None = None):
        # An engine per shape: one kept from the previous L holds that shape's CUDA graphs and their memory
        # pool, and the search then halved below what fits (1.3B, L 2,048: 16 failed after L 1,024, while
        # L 4,096 ran 8, the same tokens).
        if self.trainee is None or self.built_for != (seq_len, micro_batch):
            self.build(seq_len, micro_batch)
        common.free_memory(self.device)   # cached blocks of another shape would only fragment memory
        if inject_oom_tokens is not None and micro_batch * seq_len > inject_oom_tokens:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected above {inject_oom_tokens} tokens)")
        batches = itertools.cycle(self.batches(micro_batch, seq_len))
        common.reset_peak(self.device)
        metrics = NoMetrics()
        ga = self.grad_accum
        def step():
            train_step(self.trainee, batches, ga, False, metrics)

        for _ in range(warmup):
            step()
        with ClockSampler(self.device) as clocks:   # the timed steps only
            sec = common.median(common.time_calls(step, self.device, 0, iters, back_to_back=True))
        got = {"step_ms": sec * 1e3, "tokens_per_s": micro_batch * ga * seq_len / sec,
               "peak_mem_GiB": common.peak_mem_gib(self.device),
               "peak_reserved_GiB": common.peak_reserved_gib(self.device), "leftover_GiB_at_build": self.leftover_gib,
               **clocks.summary()}
        if profile_dir is not None:
            got.update(self.profile(profile_dir, batches, metrics))
        return got

    def profile(self, out_dir: Path, batches, metrics, steps: int = 2) -> dict:
        """Trace `steps` more steps; their GPU time by kernel kind (ms per step), see bench/trace_breakdown."""
        return common.profile_calls(lambda: train_step(self.trainee, batches, self.grad_accum, False, metrics),
                                    out_dir, self.device, steps, "steps", self.python_stacks)


def attempt(trial: Trial, seq_len: int, micro_batch: int, *, warmup: int, iters: int, inject: int | None,
            profile_root: Path | None = None):
    """One micro-batch size: its measurement, or OOM (and the engine is dropped, to be rebuilt)."""
    profile_dir = profile_root / f"{trial.preset}_L{seq_len}" if profile_root is not None else None
    got = common.guarded(trial.measure, trial.device, seq_len, micro_batch, warmup, iters, inject, profile_dir)
    if got is common.OOM:
        trial.close()
    return got


def largest_fitting(try_micro_batch, start: int) -> tuple[int | None, dict | None, list[str]]:
    """Halve the micro-batch from `start` until try_micro_batch(mb) is not OOM: (mb, its result, attempts)."""
    mb, attempts = start, []
    while mb >= 1:
        got = try_micro_batch(mb)
        attempts.append(f"{mb}:{'OOM' if got is common.OOM else 'ok'}")
        if got is not common.OOM:
            return mb, got, attempts
        mb //= 2
    return None, None, attempts


def power_of_two_at_most(x: int) -> int:
    return 1 << max(x, 1).bit_length() - 1


def sweep(presets, seq_lens, device, *, cap_tokens, warmup, iters, ac, peak, spec_peak, inject_oom_tokens=None,
          grad_accum: int = 1, extra: list[str] = (),
          on_row=lambda rows: None, previous: list[dict] = (), profile_root: Path | None = None,
          python_stacks: bool = False) -> list[dict]:
    """Every (preset, L); rows found in `previous` (an earlier, interrupted run) are kept as they are."""
    done = {(r["preset"], r["seq_len"]): r for r in previous}
    rows = []
    for name in presets:
        trial = Trial(name, device, ac, grad_accum, extra, python_stacks)
        best_prev = None   # micro-batch of the previous L; 0 when even 1 sequence did not fit
        for seq_len in seq_lens:
            if (name, seq_len) in done:
                rows.append(done[name, seq_len])
                best_prev = rows[-1]["micro_batch"] or 0
                continue
            if best_prev == 0:
                rows.append({"preset": name, "seq_len": seq_len, "status": "skipped (OOM at a shorter L)"})
                on_row(rows)
                continue
            start = power_of_two_at_most(cap_tokens // seq_len)
            if best_prev:   # memory per sequence grows with L: what failed at a shorter L fails here too
                start = min(start, best_prev)
            t0 = time.perf_counter()
            mb, got, attempts = largest_fitting(
                functools.partial(attempt, trial, seq_len, warmup=warmup, iters=iters, inject=inject_oom_tokens,
                                  profile_root=profile_root),
                start)
            cfg, model_cfg = trial.cfg, trial.model_cfg
            row = {"preset": name, "seq_len": seq_len, "zero_stage": cfg.parallel.zero_stage,
                   "activation_checkpointing": cfg.train.activation_checkpointing,
                   "cuda_graphs": cfg.train.cuda_graphs, "attempts": " ".join(attempts),
                   "micro_batch": mb, "grad_accum": grad_accum, "status": "ok" if got else common.OOM}
            if got:
                fpt = train_flops_per_token(model_cfg, seq_len)
                row.update(got, params_M=count_parameters(trial.trainee.engine.module) / 1e6,
                           train_flops_per_token=fpt, tflops=got["tokens_per_s"] * fpt / 1e12,
                           mfu=common.mfu(got["tokens_per_s"], fpt, peak),
                           mfu_spec=common.mfu(got["tokens_per_s"], fpt, spec_peak))
            best_prev = mb or 0
            print(f"{name} L {seq_len}: micro-batch {mb} ({row['attempts']}), "
                  f"{row.get('tokens_per_s', 0):,.0f} tokens/s ({time.perf_counter() - t0:.0f} s)", flush=True)
            rows.append(row)
            on_row(rows)
        trial.close()
    return rows


COLUMNS = [("preset", "preset", ""), ("L", "seq_len", ","), ("status", "status", ""), ("ZeRO", "zero_stage", "d"),
           ("act. ckpt", "activation_checkpointing", ""), ("CUDA graphs", "cuda_graphs", ""),
           ("micro-batch", "micro_batch", "d"),
           ("grad accum", "grad_accum", "d"), ("tried", "attempts", ""), ("step (ms)", "step_ms", ".0f"),
           ("tokens/s/GPU", "tokens_per_s", ",.0f"),
           ("model TFLOP/s", "tflops", ".1f"), ("MFU (measured peak)", "mfu", ".1%"),
           ("MFU (spec peak)", "mfu_spec", ".1%"), ("peak mem (GiB)", "peak_mem_GiB", ".1f"),
           ("peak reserved (GiB)", "peak_reserved_GiB", ".1f"), *CLOCK_COLUMNS]
# --profile: GPU time of a traced step by kernel kind (bench/trace_breakdown.py's categories)
PROFILE_COLUMNS = ([("preset", "preset", ""), ("L", "seq_len", ","), ("step (ms)", "step_ms", ".0f"),
                    ("GPU idle %", "gpu_idle_pct", ".1f")]
                   + [(f"{kind} (ms)", f"ms_{kind}", ".1f") for kind in trace_breakdown.SINGLE_PROCESS_KINDS]
                   + [("breakdown", "profile", "")])


def plot(rows: list[dict], head: dict, path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["preset"] for r in rows):
        ok = [r for r in rows if r["preset"] == name and r["status"] == "ok"]
        xs = [r["seq_len"] for r in ok]
        axes[0].plot(xs, [r["tokens_per_s"] for r in ok], marker="o", label=name)
        axes[1].plot(xs, [100 * r["mfu"] for r in ok], marker="o", label=name)
    axes[0].set(xlabel="sequence length", ylabel="tokens/s per GPU", yscale="log")
    axes[1].set(xlabel="sequence length", ylabel="MFU vs measured bf16 matmul peak (%)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    common.save_figure(fig, head, "training step", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny presets, L 64/128, 1-2 steps, injected OOMs")
    ap.add_argument("--presets", nargs="+")
    ap.add_argument("--seq-lens", nargs="+", type=int)
    ap.add_argument("--max-tokens", type=int, default=65536,
                    help="micro-batch search starts at the largest power of two with micro-batch x L <= this")
    ap.add_argument("--activation-checkpointing", choices=["config", "on", "off"], default="config")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5, help="timed optimizer steps (median)")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step (the optimizer's share of a step shrinks with it)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="more config overrides for every row, e.g. model.mamba.chunk_size=128")
    ap.add_argument("--matmul-n", type=int, default=8192, help="size of the bf16 torch.mm timed for the peak")
    ap.add_argument("--profile", action="store_true",
                    help="trace 2 more steps of each row; GPU time by kernel kind in a second table")
    ap.add_argument("--profile-stacks", action="store_true",
                    help="--profile, recording every Python call too, for a trace viewer (Perfetto): which Python "
                         "code the host's time goes to (a much larger trace; use with --grad-accum 1)")
    ap.add_argument("--inject-oom-tokens", type=int, help="testing: fake an OOM above this many tokens per "
                                                          "micro-batch (default in --smoke: 128)")
    common.add_output_args(ap, "training")
    args = ap.parse_args(argv)
    if args.plot_only:
        return common.replot(args.out, "training", plot)
    device = common.pick_device(args.smoke)
    presets = args.presets or (SMOKE_PRESETS if args.smoke else PRESETS)
    seq_lens = args.seq_lens or ([64, 128] if args.smoke else SEQ_LENS)
    smoke = args.smoke
    cap = 256 if smoke else args.max_tokens
    warmup, iters = (1, 2) if smoke else (args.warmup, args.iters)
    inject = args.inject_oom_tokens if args.inject_oom_tokens is not None else (128 if smoke else None)

    dengine.setup_distributed()   # a world of one, as `dtrain train` without a launcher
    mm = (common.matmul_peak(device, n=256, warmup=1, iters=2, bursts=2, rest_s=0.0) if smoke
          else common.matmul_peak(device, args.matmul_n, bursts=5))
    spec = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    head = common.header(device, "bench.training",
                         matmul_peak=f"{common.matmul_peak_text(mm)}; data sheet: "
                                     + (f"{spec / 1e12:.0f} TFLOP/s" if spec else "unknown"),
                         matmul_peak_flops=mm["flops"], spec_peak_flops=spec,
                         setup=f"one process, DeepSpeed engine as dtrain builds it, grad_accum {args.grad_accum}, "
                               f"median of {iters} steps after {warmup}, run back to back as the trainer runs them"
                               + (f", overrides {' '.join(args.set)}" if args.set else ""),
                         **({"injected_oom": f"above {inject} tokens per micro-batch"} if inject is not None else {}))
    print("\n".join(common.header_lines(head)), flush=True)
    title = f"Training: tokens/s and MFU, one GPU — {head['card']}"
    notes = [("MFU = tokens/s x model FLOPs/token (model/flops.py: matmuls only, fwd+bwd = 3x fwd, activation "
              "recomputation not counted) / peak"),
             ("micro-batch: the largest power of two that fits, halving from micro-batch x L <= --max-tokens; "
              "`tried` lists the attempts"), CLOCK_NOTE,
             ("peak mem: the allocator's peak of live tensors (torch.cuda.max_memory_allocated); peak reserved: "
              "of memory held from the GPU, cached blocks and CUDA graphs' pools included (max_memory_reserved)")]

    def save(rows):
        tables = common.tables_with_profile(
            COLUMNS, rows, PROFILE_COLUMNS, "GPU time of a traced step by kernel kind (ms; kinds on different "
                                            "streams can overlap)", "ms_gemm")
        return common.write_results(args.out, "training", title, head, tables, rows, notes)

    previous = common.previous_rows(args.out, "training", head, args.resume)
    planned = {(p, L) for p in presets for L in seq_lens}
    others = [r for r in previous if (r["preset"], r["seq_len"]) not in planned]   # other --presets
    rows = others + sweep(presets, seq_lens, device, cap_tokens=cap, warmup=warmup, iters=iters,
                          ac=args.activation_checkpointing, peak=mm["flops"], spec_peak=spec,
                          inject_oom_tokens=inject, grad_accum=args.grad_accum, extra=args.set,
                          on_row=lambda new: save(others + new), previous=previous,
                          profile_root=args.out / "training_profiles" if args.profile or args.profile_stacks else None,
                          python_stacks=args.profile_stacks)
    common.print_results(save(rows))
    plot(rows, head, args.out / "training.png")
    if torch.distributed.is_initialized():   # a clean exit: no "destroy_process_group() was not called"
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
