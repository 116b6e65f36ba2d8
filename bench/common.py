"""Shared pieces of the GPU benchmarks: run header, timing, OOM handling, the matmul peak, result files.

Every result file starts with the same header (card, command line, date, commit) so a table can be
traced back to the machine and code that produced it. Results are written after every row, so a run
cut short by a time limit still leaves what it measured.
"""
from __future__ import annotations

import datetime
import gc
import itertools
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import trace_breakdown
from dtrain.profiling import StepProfiler

REPO = Path(__file__).resolve().parents[1]
OOM = "OOM"


# ---------------------------------------------------------------- the header of every table
def git_commit() -> str:
    """HEAD's short hash (+ a note when tracked files differ); BENCH_COMMIT names it where the tree was
    copied without its .git folder (e.g. to a GPU machine)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=False).stdout.strip()
        return rev + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def header(device: torch.device, module: str, **extra) -> dict:
    from model import kernels
    return {"card": card_name(device),
            "command": shlex.join(["python", "-m", module, *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(),
            "torch": torch.__version__,
            "kernels": kernels.describe(device),
            **extra}


def pick_device(smoke: bool) -> torch.device:
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke for a CPU run of every code path)")
    return torch.device("cuda", torch.cuda.current_device())


# ---------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, iters: int, back_to_back: bool = False) -> list[float]:
    """Seconds per call of fn() after `warmup` untimed calls: CUDA events on a GPU, wall clock on a CPU.
    back_to_back: no wait for the GPU between calls (a training loop's steps): the host may queue the next
    call while the GPU runs this one, and any GPU idle while it does counts in the next call's time."""
    for _ in range(warmup):
        fn()
    sync(device)
    if back_to_back and device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        events[0].record()
        for event in events[1:]:
            fn()
            event.record()
        events[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(events)]
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: how far a result is from the one it is checked against."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak(device: torch.device, n: int = 8192, warmup: int = 5, iters: int = 20, bursts: int = 1,
                rest_s: float = 1.0) -> dict:
    """Measured dense bf16 matmul throughput of this card: an n x n x n torch.mm, 2 n^3 FLOPs; the median
    of `bursts` bursts `rest_s` apart, each the median of `iters` calls after `warmup`. One burst moves by a
    few percent with the card's clock at that moment (752-775 TFLOP/s on one H100, docs/benchmarks.md)."""
    secs = []
    for i in range(bursts):
        if i:
            time.sleep(rest_s)
        secs.append(_time_mm(device, n, warmup, iters))
    free_memory(device)   # the operands are gone once _time_mm returns
    sec = median(secs)
    return {"n": n, "ms": sec * 1e3, "flops": 2 * n ** 3 / sec,
            "burst_tflops": [2 * n ** 3 / s / 1e12 for s in secs]}


def matmul_peak_text(mm: dict) -> str:
    """How a benchmark's header states the measured peak."""
    bursts = mm["burst_tflops"]
    spread = f", {len(bursts)} bursts: {min(bursts):.4g}-{max(bursts):.4g}" if len(bursts) > 1 else ""
    return (f"{mm['flops'] / 1e12:.3g} TFLOP/s measured (bf16 torch.mm {mm['n']}^3, {mm['ms']:.2f} ms"
            f"{spread})")


def _time_mm(device: torch.device, n: int, warmup: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    return median(time_calls(lambda: torch.mm(a, b, out=out), device, warmup, iters))


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation of one device: achieved model FLOP/s over the peak FLOP/s."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops


# ---------------------------------------------------------------- trainer runs
def trainer_env(cpu: bool = False) -> dict:
    """The environment of a trainer process a benchmark starts: the repository importable, no rank or
    rendezvous inherited from a parent launcher (torchrun sets its own; a world of one needs none); cpu:
    DeepSpeed's CPU accelerator and no GPU (smoke runs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def torchrun(nproc: int, dtrain_args: list[str], log_path: Path, *, timeout: float, cpu: bool = False,
             ) -> tuple[int | str, str]:
    """`torchrun --nproc_per_node nproc -m dtrain.cli ARGS` on this host: (exit status or 'timeout after
    N s', its output). The output goes to log_path as it comes. cpu: gloo on the CPU (smoke runs)."""
    from dtrain.engine import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "dtrain.cli", *dtrain_args]
    env = trainer_env(cpu)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)   # torchrun and its workers: their own process group
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = f"timeout after {timeout:.0f} s"
    return rc, log_path.read_text()


def add_builtin_data_args(ap) -> None:
    """--data-root / --data-vocab / --data-max-bytes: the built-in corpus the trainer runs read."""
    ap.add_argument("--data-root", default=str(REPO / ".cache" / "builtin_data"))
    ap.add_argument("--data-vocab", type=int, default=4096, help="tokenizer size for the built-in corpus")
    ap.add_argument("--data-max-bytes", type=int)


def smoke_builtin_data(args) -> None:
    """A small corpus and tokenizer for CPU smoke runs."""
    args.data_vocab, args.data_max_bytes = 512, args.data_max_bytes or 300_000


def builtin_data_overrides(args) -> list[str]:
    """dtrain overrides that train on the built-in corpus chosen by add_builtin_data_args."""
    over = ["data.build_default=true", f"data.default_root={args.data_root}",
            f"data.default_vocab_size={args.data_vocab}"]
    if args.data_max_bytes:
        over.append(f"data.default_max_bytes={args.data_max_bytes}")
    return over


def log_tail(text: str, lines: int = 3, chars: int = 300) -> str:
    return " / ".join(text.strip().splitlines()[-lines:])[-chars:]


# ---------------------------------------------------------------- out-of-memory handling
def is_oom(exc: BaseException) -> bool:
    """The caching allocator's OOM, or a library's failed allocation (cuBLAS workspace, CUDA runtime)."""
    msg = str(exc)
    return (isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower()
            or "CUBLAS_STATUS_ALLOC_FAILED" in msg)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def guarded(fn, device: torch.device, *args, **kwargs):
    """fn(*args, **kwargs) or OOM. Memory is freed after the except block has ended: the traceback's
    frames hold the tensors of the failed attempt until then."""
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:   # anything but an OOM is re-raised
        if not is_oom(exc):
            raise
        result = OOM
    if result is OOM:
        free_memory(device)
    return result


def peak_mem_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def peak_reserved_gib(device: torch.device) -> float | None:
    """The allocator's peak of memory held from the GPU: blocks cached, and CUDA graphs' private pools."""
    return torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- one-process profiles
def profile_calls(call, out_dir: Path, device: torch.device, calls: int = 2, what: str = "steps",
                  python_stacks: bool = False) -> dict:
    """Trace `calls` more calls of `call` (dtrain.profiling.StepProfiler, <out_dir>/profile/) and break their GPU
    time down by kernel kind (bench/trace_breakdown.py) into <out_dir>.md; returns the row's columns:
    profile (that file's name), gpu_idle_pct and ms_<kind> per call. A CPU run has no GPU kernel: then
    profile says so and no other column is filled. python_stacks: the trace records every Python call too,
    for a trace viewer (the breakdown does not use them: the tracer's own cost lands on the callers)."""
    profiler = StepProfiler(1, calls, out_dir, 0, device, python_stacks)
    trace = None
    for i in range(1, calls + 1):
        profiler.before(i)
        call()
        trace = profiler.after(i) or trace
    try:
        results = trace_breakdown.breakdown_files([trace], calls)
    except ValueError as e:
        return {"profile": str(e)}
    md = out_dir.parent / f"{out_dir.name}.md"        # not with_suffix: "1.3b-..." has a dot
    trace_breakdown.write_markdown(md, f"{out_dir.name}: GPU time of {calls} traced {what}", results)
    return {"profile": md.name, **profile_columns(results[0][1])}


def profile_columns(result: dict) -> dict:
    """A trace_breakdown result -> the row's GPU idle % and ms per traced call of each kernel kind."""
    return {"gpu_idle_pct": result["pct"]["idle"],
            **{f"ms_{k}": result["per_step_ms"][k] for k in trace_breakdown.SINGLE_PROCESS_KINDS}}


# ---------------------------------------------------------------- result files
def fmt(value, spec: str = ",.0f") -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.replace("|", "\\|")   # a log excerpt in a cell must not split the row
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def markdown_table(columns: list[tuple[str, str, str]], rows: list[dict]) -> str:
    """columns: (title, row key, format spec). A row with status OOM/failed shows it in its first number."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(key), spec) for _, key, spec in columns) + " |")
    return "\n".join(lines)


def tables_with_profile(columns, rows: list[dict], profile_table, caption: str, key: str) -> list[tuple[str, str]]:
    """write_results' tables: every row, then (under caption) the rows that a profile's breakdown filled
    in (those with `key`); no second table when none has it (no profile, or a CPU run's)."""
    tables = [("", markdown_table(columns, rows))]
    profiled = [r for r in rows if key in r]
    if profiled:
        tables.append((caption, markdown_table(profile_table, profiled)))
    return tables


def header_lines(head: dict) -> list[str]:
    kernels = ", ".join(f"{k}: {v}" for k, v in head["kernels"].items())
    lines = [f"card: {head['card']}", f"command: `{head['command']}`", f"date: {head['date']}",
             f"commit: {head['commit']}", f"torch {head['torch']}; kernels: {kernels}"]
    lines += [f"{k}: {v}" for k, v in head.items()   # numbers are for the JSON; the text says them too
              if k not in ("card", "command", "date", "commit", "torch", "kernels") and isinstance(v, str)]
    return lines


def previous_rows(out_dir: Path, name: str, head: dict, resume: bool) -> list[dict]:
    """With --resume: the rows an earlier run of the same benchmark on the same card left in out_dir (a run
    stopped by a time limit continues where it stopped); otherwise none."""
    path = out_dir / f"{name}.json"
    if not resume or not path.is_file():
        return []
    old = json.loads(path.read_text())
    if old["header"]["card"] != head["card"]:
        print(f"--resume: {path} was measured on {old['header']['card']}; starting afresh", flush=True)
        return []
    head["resumed"] = f"{len(old['rows'])} rows from the run of {old['header']['date']} ({old['header']['commit']})"
    print(f"--resume: {head['resumed']}", flush=True)
    return old["rows"]


def write_results(out_dir: Path, name: str, title: str, head: dict, tables: list[tuple[str, str]],
                  rows: list[dict], notes: list[str] = ()) -> Path:
    """out_dir/name.json (header + rows) and out_dir/name.md (header + the markdown tables)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1,
                                                     default=str) + "\n")
    md = [f"## {title}", "", *[f"- {line}" for line in header_lines(head)], ""]
    for caption, table in tables:
        md += ([f"**{caption}**", ""] if caption else []) + [table, ""]
    md += [f"- {n}" for n in notes]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return path


def save_and_print(out_dir: Path, name: str, head: dict, rows: list[dict], text: str, plot) -> None:
    """A benchmark with its own markdown: out_dir/name.json (header + rows), name.md (text), name.png
    (plot(rows, head, path)), and the text printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    (out_dir / f"{name}.md").write_text(text)
    plot(rows, head, out_dir / f"{name}.png")
    print(text, flush=True)


def print_results(path: Path) -> None:
    print(path.read_text(), flush=True)


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None (with a message) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return None
    return plt


def replot(out_dir: Path, name: str, plot) -> int:
    """--plot-only: draw OUT/name.png from OUT/name.json (e.g. on a machine that has matplotlib)."""
    result = json.loads((out_dir / f"{name}.json").read_text())
    plot(result["rows"], result["header"], out_dir / f"{name}.png")
    return 0


def plot_title(head: dict, what: str) -> str:
    return f"{what} — {head['card']} — {head['date']} — {head['commit'].split()[0]}"


def save_figure(fig, head: dict, what: str, path: Path) -> None:
    """Title the figure with the card, date and commit, write it to path and close it."""
    import matplotlib.pyplot as plt
    fig.suptitle(plot_title(head, what))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}", flush=True)


def add_output_args(ap, name: str, resume_help: str | None = None) -> None:
    """--out / --plot-only / --resume, shared by every GPU benchmark."""
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    ap.add_argument("--plot-only", action="store_true", help=f"redraw OUT/{name}.png from OUT/{name}.json")
    ap.add_argument("--resume", action="store_true", help=resume_help or (
        f"keep the rows already in OUT/{name}.json (same card) and measure only the missing ones"))
