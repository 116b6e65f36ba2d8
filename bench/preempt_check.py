"""A preemption drill: a real `dtrain train` gets SIGUSR1 (or SIGTERM) after its step N, as a Slurm job's
time-limit warning reaches it, and must save a complete checkpoint and exit cleanly.

    python -m bench.preempt_check --out bench_results      # a GPU: 240M DiffuMamba-H, SIGUSR1, then SIGTERM
    python -m bench.preempt_check --smoke --out /tmp/pc    # CPU: the tiny config

Why on a GPU: there, SIGUSR1 stopped reaching the trainer's handler after the first training step (a library
replaced the signal's action below Python; docs/benchmarks.md, tenth run), which no CPU run shows.
One run per signal, one process (`python -m dtrain.cli train`, a world of one), on the built-in corpus.
Checked for each: exit status 0, the PREEMPTED line naming the signal, a complete checkpoint (its COMPLETE
marker) at the step that line names, saved within --max-late steps of the signal (the ranks agree on it a
step late). Writes preempt_check.{md,json} and the runs' logs under preempt_check_logs/; exit status 1 when
a check fails. Each run's checkpoints (GBs at 240M) are deleted once checked, unless --keep-runs.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import common
from dtrain.checkpoint import MARKER

STEP = re.compile(r"^step (\d+)/")
PREEMPTED = re.compile(r"PREEMPTED: received (\w+); checkpoint (\S+) saved at step (\d+)")
COLUMNS = [("signal", "signal", "s"), ("sent after step", "sent_after", "d"), ("saved at step", "saved_at", ""),
           ("s from signal to exit", "seconds_to_exit", ".1f"), ("exit status", "exit", ""), ("ok", "ok", "s"),
           ("why not", "problem", "s")]


def overrides(args, name: str) -> list[str]:
    return [f"run.name=preempt_{name}", f"run.out_dir={args.out / 'preempt_check_runs' / name}",
            # the config's global batch assumes its GPU count: one process accumulates what the config says
            "train.steps=1000000", "train.global_batch_size=null", "train.eval_interval=0",
            "checkpoint.interval=0", "checkpoint.save_final=false",
            "logging.log_interval=1", "logging.num_samples=0", *common.builtin_data_overrides(args),
            *args.override]


def drill(args, sig: signal.Signals) -> dict:
    """One run: SIGNAL after step --after-step; the row of the table."""
    name = sig.name.removeprefix("SIG")
    cmd = [sys.executable, "-m", "dtrain.cli", "train", "--config", str(args.config), *overrides(args, name)]
    env = common.trainer_env(cpu=args.smoke)
    log_path = args.out / "preempt_check_logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    row = {"signal": sig.name, "sent_after": None, "saved_at": None, "seconds_to_exit": None, "exit": None}
    deadline, sent_at, text = time.time() + args.timeout, None, []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        for line in proc.stdout:   # the trainer prints every step (log_interval 1)
            log.write(line)
            text.append(line)
            step = STEP.match(line)
            if sent_at is None and step and int(step[1]) >= args.after_step:
                proc.send_signal(sig)
                sent_at, row["sent_after"] = time.time(), int(step[1])
                print(f"{sig.name} sent after step {step[1]}", flush=True)
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        row["exit"] = proc.wait()
    if sent_at is not None:
        row["seconds_to_exit"] = time.time() - sent_at
    row.update(check(row, "".join(text), sig, args.max_late))
    if not args.keep_runs:
        shutil.rmtree(args.out / "preempt_check_runs" / name, ignore_errors=True)
    return row


def check(row: dict, text: str, sig: signal.Signals, max_late: int) -> dict:
    """ok and, when not, why: exit 0, the PREEMPTED line for this signal, a complete checkpoint in time."""
    found = PREEMPTED.search(text)
    if found:
        row["saved_at"] = int(found[3])
    if row["sent_after"] is None:
        problem = f"the run ended before the step the signal was due after: {common.log_tail(text, lines=1)}"
    elif row["exit"] != 0:
        problem = f"exit status {row['exit']}"
    elif not found or found[1] != sig.name:
        problem = "no PREEMPTED line for this signal: the signal did not reach the trainer"
    elif not (Path(found[2]) / MARKER).is_file():
        problem = f"{found[2]} has no {MARKER} marker"
    elif not row["sent_after"] < row["saved_at"] <= row["sent_after"] + max_late:
        problem = f"saved at step {row['saved_at']}, more than {max_late} steps after the signal"
    else:
        problem = ""
    return {"ok": "no" if problem else "yes", "problem": problem}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny config")
    ap.add_argument("--config", type=Path, help="default: configs/240m_diffumamba_h.yaml (--smoke: tiny_cpu.yaml)")
    ap.add_argument("--signals", nargs="+", default=["USR1", "TERM"], help="signal names, without SIG")
    ap.add_argument("--after-step", type=int, default=6, help="send the signal once this step is logged")
    ap.add_argument("--max-late", type=int, default=2, help="the checkpoint's step at most this many after it")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's folder (checkpoints) after the check")
    common.add_builtin_data_args(ap)
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    ap.add_argument("override", nargs="*", help="more dtrain overrides for every run")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    if args.smoke:
        args.config = args.config or common.REPO / "configs" / "tiny_cpu.yaml"
        common.smoke_builtin_data(args)
        args.override = ["data.num_workers=0", *args.override]
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (or --smoke for a CPU run)")
        args.config = args.config or common.REPO / "configs" / "240m_diffumamba_h.yaml"
    device = torch.device("cpu" if args.smoke else "cuda")
    head = common.header(device, "bench.preempt_check", config=str(args.config))
    rows = [drill(args, signal.Signals[f"SIG{name}"]) for name in args.signals]
    notes = [(f"one process; the signal is sent once step {args.after_step} is logged; the checkpoint must come "
              f"within {args.max_late} steps (the ranks agree on a stop a step late)")]
    common.write_results(args.out, "preempt_check", f"Preemption drill — {head['card']}", head,
                         [("", common.markdown_table(COLUMNS, rows))], rows, notes)
    common.print_results(args.out / "preempt_check.md")
    return 0 if all(r["ok"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
