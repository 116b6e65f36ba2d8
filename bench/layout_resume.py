"""Train, checkpoint, resume on the same layout, and resume on another layout through `dckpt reshard`.

    python -m bench.layout_resume --out bench_results       # 4 GPUs: ZeRO-1 DP=4, then PP=2 x DP=2
    python -m bench.layout_resume --smoke --out /tmp/bench  # CPU, gloo: DP=2, then PP=2

Four phases, each a real `torchrun -m dtrain.cli train` (or `dckpt reshard`) of one config (default
configs/1p3b_diffumamba_h.yaml) on the built-in corpus, with N processes:
  A  ZeRO-1 DP=N, steps 1..S, checkpoints at S/2 and S;
  B  A's step-S/2 checkpoint resumed on the same layout (--resume PATH), steps S/2+1..S (no checkpoint);
  R  A's step-S/2 checkpoint converted to a universal checkpoint (`dckpt reshard`), on the CPU while B runs
     (its wall time overlaps B's);
  C  the universal checkpoint resumed as PP=2 x DP=N/2, ZeRO-1, grad_accum doubled (same global batch),
     data.reshard_on_resume=true, steps S/2+1..S, and its final checkpoint (pipeline layout).
Checked and reported (the command fails when a check fails):
  * B logs A's losses step by step: same weights, optimizer state and data. Exact in fp32 on a CPU; on a
    GPU, bf16 kernels with atomic adds are not bitwise deterministic, so the difference is reported and
    must stay under --loss-tol;
  * C logs A's learning rate at every step (the schedule and Adam's step count carried over) and its mean
    loss over S/2+1..S is within --mean-tol of A's (C reads other samples: a resharded run continues the
    data at the next epoch boundary);
  * tokens/s of every phase, checkpoint save and load times, the reshard's wall time.
Writes layout_resume.{json,md,png} and each phase's log under layout_resume_logs/.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import common

STEP_LINE = re.compile(r"step (\d+)/\d+ \| loss (\S+) \| lr (\S+) \|[^\n]*?\| tok/s (\d+(?:\.\d+)?)")
SAVED_LINE = re.compile(r"checkpoint (\S+) saved in ([\d.]+) s")
LOADED_LINE = re.compile(r"resumed from (\S+) at step (\d+) \(loaded in ([\d.]+) s\)")


def parse(text: str) -> dict:
    steps = {int(m[1]): {"loss": float(m[2]), "lr": float(m[3]), "tokens_per_s": float(m[4])}
             for m in STEP_LINE.finditer(text)}
    saves = [float(m[2]) for m in SAVED_LINE.finditer(text)]
    load = LOADED_LINE.search(text)
    return {"steps": steps, "save_s": saves, "load_s": float(load[3]) if load else None,
            "resumed_at": int(load[2]) if load else None}


def steady_tokens_per_s(steps: dict) -> float | None:
    """Tokens/s over all logged steps but the first two (warm-up), as total steps / total time."""
    rates = [v["tokens_per_s"] for k, v in sorted(steps.items())][2:]
    return len(rates) / sum(1 / r for r in rates) if rates else None


def overrides(args, phase: str, dp: int, pp: int, ga: int) -> list[str]:
    over = [f"run.name=layout_resume_{phase}", f"run.out_dir={args.out / 'layout_resume_runs' / phase}",
            f"train.steps={args.steps}", "logging.log_interval=1", "train.global_batch_size=null",
            f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum={ga}",
            f"parallel.pipeline_stages={pp}", "parallel.zero_stage=1",
            "train.cuda_graphs=false",   # every phase alike (graphs sum gradients in another order): losses compare exactly
            f"checkpoint.interval={args.steps // 2}", "checkpoint.keep=0",
            f"train.eval_interval={args.steps // 2}", "train.eval_iters=2", "logging.num_samples=0",
            f"optim.warmup_steps={args.steps // 4}", *common.builtin_data_overrides(args)]
    if args.seq_len:
        over.append(f"data.seq_len={args.seq_len}")
    return over + list(args.override)


def compare(a: dict, other: dict, steps: range) -> dict:
    """Per-step loss and lr differences of `other` against A over `steps` (both must log every step)."""
    missing = [s for s in steps if s not in a or s not in other]
    if missing:
        return {"missing_steps": f"{missing[0]}..{missing[-1]} ({len(missing)})"}
    dl = [abs(other[s]["loss"] - a[s]["loss"]) for s in steps]
    dlr = [abs(other[s]["lr"] - a[s]["lr"]) / a[s]["lr"] for s in steps]
    return {"max_abs_loss_diff": max(dl), "first_step_loss_diff": dl[0], "max_rel_lr_diff": max(dlr),
            "mean_loss_A": statistics.fmean(a[s]["loss"] for s in steps),
            "mean_loss": statistics.fmean(other[s]["loss"] for s in steps)}


def reshard_wall_s(log: Path, start: float) -> float:
    """The reshard's own wall time: from its start to its log's last write (it ran beside B)."""
    return log.stat().st_mtime - start


COLUMNS = [("phase", "phase", ""), ("layout", "layout", ""), ("status", "status", ""), ("steps", "steps", ""),
           ("tokens/s (all GPUs)", "tokens_per_s", ",.0f"), ("tokens/s/GPU", "tokens_per_s_per_gpu", ",.0f"),
           ("checkpoint save (s)", "save_s", ""), ("load (s)", "load_s", ".1f"), ("wall (s)", "wall_s", ".0f"),
           ("max abs loss diff vs A", "max_abs_loss_diff", ".2e"), ("max rel lr diff vs A", "max_rel_lr_diff", ".1e"),
           ("mean loss (A's)", "mean_loss_text", "")]


def plot(rows: list[dict], head: dict, path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        if r.get("losses"):
            xs = sorted(int(k) for k in r["losses"])
            ax.plot(xs, [r["losses"][str(x)] if str(x) in r["losses"] else r["losses"][x] for x in xs],
                    lw=1.0 if r["phase"] == "A" else 1.5, ls="-" if r["phase"] != "B" else "--",
                    label=f"{r['phase']}: {r['layout']}")
    ax.set(xlabel="step", ylabel="training loss (1/t-weighted NELBO per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    common.save_figure(fig, head, "train, resume, reshard", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny config, 2 processes, 8 steps")
    ap.add_argument("--procs", type=int, default=4, help="processes (GPUs); the second layout is PP=2 x DP=procs/2")
    ap.add_argument("--config", type=Path, help="default: configs/1p3b_diffumamba_h.yaml (--smoke: tiny_cpu.yaml)")
    ap.add_argument("--steps", type=int, default=200, help="S: A trains 1..S; B and C resume at S/2")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1, help="of the DP layout; PP=2 doubles it")
    ap.add_argument("--seq-len", type=int, help="default: the config's")
    common.add_builtin_data_args(ap)
    ap.add_argument("--reshard-workers", type=int, default=8)
    ap.add_argument("--loss-tol", type=float, default=0.02, help="max |loss_B - loss_A| (default for bf16 on a GPU)")
    ap.add_argument("--mean-tol", type=float, default=0.05, help="max relative difference of C's mean loss vs A's")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per phase")
    common.add_output_args(ap, "layout_resume", resume_help="(not supported: every phase depends on the one before)")
    ap.add_argument("override", nargs="*", help="more dtrain overrides for every phase")
    args = ap.parse_args(argv)
    if args.plot_only:
        return common.replot(args.out, "layout_resume", plot)
    args.out = args.out.resolve()
    if args.smoke:
        args.config = args.config or common.REPO / "configs" / "tiny_cpu.yaml"
        args.procs, args.steps, args.micro_batch = 2, min(args.steps, 8), 2
        args.seq_len = args.seq_len or 64
        common.smoke_builtin_data(args)
        args.loss_tol = min(args.loss_tol, 1e-4)   # fp32 on a CPU: B repeats A
        args.override = ["data.num_workers=0", *args.override]
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() < args.procs:
            sys.exit(f"needs {args.procs} CUDA GPUs (or --smoke for a CPU run with gloo)")
        args.config = args.config or common.REPO / "configs" / "1p3b_diffumamba_h.yaml"
    if args.procs % 2 or args.steps % 4:
        sys.exit("--procs must be even and --steps a multiple of 4")
    n, half = args.procs, args.steps // 2
    head = common.header(torch.device("cpu"), "bench.layout_resume", config=str(args.config),
                         overrides=" ".join(overrides(args, "X", n, 1, args.grad_accum)[1:]))
    if not args.smoke:
        from bench.scaling import gpu_description
        name, head["kernels"] = gpu_description()
        head["card"] = f"{n} x {name}"
    logs = args.out / "layout_resume_logs"
    ckpt_a = args.out / "layout_resume_runs" / "A" / "checkpoints" / f"step{half:08d}"
    universal = args.out / "layout_resume_runs" / "universal"
    dp_layout, pp_layout = f"ZeRO-1 DP={n}", f"PP=2 x DP={n // 2}" if n > 2 else "PP=2"
    rows, failed = [], []
    notes = [(f"A: {dp_layout}, micro-batch {args.micro_batch} x grad_accum {args.grad_accum}; "
              f"C: {pp_layout}, grad_accum {2 * args.grad_accum} (the same global batch)"),
             ("tokens/s: the trainer's console line (all ranks) over the logged steps but the first two; small "
              "steps (no gradient accumulation to hide communication): not a scaling measurement (bench.scaling)"),
             (f"checks: B vs A loss within {args.loss_tol:g} per step; lr equal (rel. 1e-6); "
              f"C's mean loss within {args.mean_tol:.0%} of A's over steps {half + 1}..{args.steps}")]

    def save():
        return common.write_results(args.out, "layout_resume", f"Train, resume, reshard — {head['card']}", head,
                                    [("", common.markdown_table(COLUMNS, rows))], rows, notes + failed)

    def train_phase(phase, layout, dp, pp, ga, resume=None, extra=()):
        t0 = time.time()
        cmd = ["train", "--config", str(args.config), *overrides(args, phase, dp, pp, ga), *extra]
        rc, text = common.torchrun(n, cmd + (["--resume", str(resume)] if resume else []),
                                   logs / f"{phase}.log", timeout=args.timeout, cpu=args.smoke)
        got = parse(text)
        row = {"phase": phase, "layout": layout, "wall_s": time.time() - t0,
               "steps": f"{min(got['steps'], default='-')}..{max(got['steps'], default='-')}",
               "save_s": ", ".join(f"{s:.1f}" for s in got["save_s"]), "load_s": got["load_s"],
               "losses": {s: v["loss"] for s, v in got["steps"].items()},
               "status": "ok" if rc == 0 else f"failed ({rc}): {common.log_tail(text)}"}
        tps = steady_tokens_per_s(got["steps"])
        if tps:
            row.update(tokens_per_s=tps, tokens_per_s_per_gpu=tps / n)
        rows.append(row)
        save()
        print(f"{phase} ({layout}): {row['status']}", flush=True)
        return row, got["steps"]

    a_row, a = train_phase("A", dp_layout, n, 1, args.grad_accum)
    if a_row["status"] == "ok":
        # R only reads A's checkpoint and works on the CPU: it runs while B trains on the GPUs
        t0 = time.time()
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "R.log", "w") as r_log:
            reshard = subprocess.Popen([sys.executable, "-m", "checkpoints_tools.cli", "reshard", str(ckpt_a),
                                        str(universal), "--workers", str(args.reshard_workers)],
                                       cwd=common.REPO, stdout=r_log, stderr=subprocess.STDOUT, text=True)
            b_row, b = train_phase("B", dp_layout, n, 1, args.grad_accum, resume=ckpt_a,
                                   extra=["checkpoint.interval=0", "checkpoint.save_final=false"])  # disk space
            b_row.update(compare(a, b, range(half + 1, args.steps + 1)))
            rc = reshard.wait()
        r_wall = reshard_wall_s(logs / "R.log", t0)
        r_text = (logs / "R.log").read_text()
        rows.append({"phase": "R", "layout": "universal", "wall_s": r_wall,
                     "status": "ok" if rc == 0 else f"failed ({rc}): {common.log_tail(r_text)}"})
        save()
        if rows[-1]["status"] == "ok":
            c_row, c = train_phase("C", pp_layout, n // 2, 2, 2 * args.grad_accum, resume=universal,
                                   extra=["data.reshard_on_resume=true", "checkpoint.interval=0"])
            c_row.update(compare(a, c, range(half + 1, args.steps + 1)))
            c_row["max_abs_loss_diff"] = None   # other samples: only the mean is comparable
    for r in rows:
        if r["status"] != "ok":
            failed.append(f"FAILED: phase {r['phase']}: {r['status']}")
        elif "missing_steps" in r:
            failed.append(f"FAILED: phase {r['phase']} did not log steps {r['missing_steps']}")
        elif "mean_loss" in r:
            r["mean_loss_text"] = f"{r['mean_loss']:.4f} ({r['mean_loss_A']:.4f})"
            if r["max_rel_lr_diff"] > 1e-6:
                failed.append(f"FAILED: phase {r['phase']}: lr differs from A's (rel. {r['max_rel_lr_diff']:.1e})")
            if r["phase"] == "B" and r["max_abs_loss_diff"] > args.loss_tol:
                failed.append(f"FAILED: phase B: loss differs from A's by {r['max_abs_loss_diff']:.2e}")
            if r["phase"] == "C" and abs(r["mean_loss"] / r["mean_loss_A"] - 1) > args.mean_tol:
                failed.append(f"FAILED: phase C: mean loss {r['mean_loss']:.4f} vs A's {r['mean_loss_A']:.4f}")
    if len(rows) < 4:
        failed.append("FAILED: not every phase ran")
    common.print_results(save())
    plot(rows, head, args.out / "layout_resume.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
