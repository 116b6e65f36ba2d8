"""Where the GPU time of the traced training steps went, from the Chrome traces that torch.profiler writes
(dtrain/profiling.py: <out_dir>/profile/rank<R>_steps<A>-<B>.json.gz, one per rank).

    python -m bench.trace_breakdown runs/x/profile                  # every *.json / *.json.gz in the folder
    python -m bench.trace_breakdown rank0_steps20-21.json.gz --steps 2 --out breakdown.md

Only GPU events count (kernels, memcpy, memset; CPU operators are ignored). Over the GPU window, from the
first GPU event's start to the last one's end, of each trace:
    busy             the union of all GPU event intervals; idle = window - busy: the GPU did nothing,
                     waiting on the CPU (launch overhead, Python), on data, or in a pipeline bubble with no
                     NCCL kernel
    compute busy     the union of the non-NCCL events
    nccl exposed     time where an NCCL kernel runs and no compute kernel does: communication not hidden
    nccl overlapped  NCCL time under compute
    categories       summed durations by kernel name (RULES below); summed over streams, so they can add up
                     to more than the window
Pipeline bubbles: an NCCL p2p receive kernel is launched early and spins until the sender's data arrives, so
most of a pipeline bubble shows up as exposed `nccl_p2p` time, not as idle time.

Times are per step: divided by --steps, else by B - A + 1 from the file name's `steps<A>-<B>`, else by 1.
Prints a markdown table (one row per trace) and each trace's top 10 kernels; --out also writes it to a file.
For the top element-wise and copy kernels, whose names do not say which model code runs them, it also lists
the operators that launched them: the CPU operator with the kernel's "External id" and the operators around
it on the same thread (outer -> inner, e.g. `autograd::engine::evaluate_function: FlipBackward0 >
aten::flip`), which is what a look at the trace in a viewer would show. Then where the GPU sat idle: each
gap charged to the operators that launched the work ending it (what the GPU waited for). Last, per trace,
what the host did (bench/host_time.py): its threads' time in operators, the top operators and the CUDA
runtime calls.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from bench.host_time import host_breakdown, host_markdown

# Kernel name -> category: the first rule whose substrings match wins (lower-case, substring).
# (category, any of these substrings, and also this one if not None)
# The named kernels come before gemm, whose "kernel2" / "matmul" / "cutlass" are loose matches.
RULES = [
    ("nccl_p2p", ("sendrecv", "send", "recv"), "nccl"),
    ("nccl_collective", ("nccl",), None),
    # mamba-ssm's Triton kernels and ours (model/chunk_scan_kernel.py, model/state_pass_kernel.py)
    ("ssm_scan", ("_chunk_", "_state_passing", "_bmm_chunk", "_states_entering"), None),
    ("conv1d", ("causal_conv1d",), None),
    # before gemm: flash-attention / fmha kernels are often cutlass kernels too
    ("attention", ("flash", "fmha", "attention", "sdpa"), None),
    ("norm", ("_layer_norm", "rms_norm", "layer_norm", "rmsnorm"), None),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "kernel2", "matmul"), None),
    ("optimizer", ("multi_tensor_apply", "adam", "_foreach"), None),
]
MEMORY = "memcpy_memset"  # the gpu_memcpy / gpu_memset events, whatever their name
OTHER = "elementwise_other"
CATEGORIES = ("nccl_p2p", "nccl_collective", "gemm", "attention", "ssm_scan", "conv1d", "norm", "optimizer",
              MEMORY, OTHER)
SINGLE_PROCESS_KINDS = tuple(k for k in CATEGORIES if not k.startswith("nccl"))   # one process: no NCCL
GPU_CATS = {"kernel": None, "gpu_memcpy": MEMORY, "gpu_memset": MEMORY}  # event "cat" -> fixed category
STEPS_IN_NAME = re.compile(r"steps(\d+)-(\d+)")
TOP = 10
MIXER_KINDS = ("ssm_scan", "conv1d", "norm")
ORIGINS_PER_KERNEL = 3    # operator chains listed per kernel
CHAIN_DEPTH = 4           # innermost operators shown per chain


def load_events(path) -> list[dict]:
    """The trace's events; a SystemExit naming the file when it is missing or not a Chrome trace."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic: accept a .json.gz whatever its name
            raw = gzip.decompress(raw)
        trace = json.loads(raw)
    except FileNotFoundError:
        raise SystemExit(f"no such trace file: {path}") from None
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:  # bad gzip, bad JSON
        raise SystemExit(f"cannot read {path} as a Chrome trace (JSON or gzipped JSON): {err}") from None
    events = trace.get("traceEvents") if isinstance(trace, dict) else trace  # the format allows a bare list
    if not isinstance(events, list):
        raise SystemExit(f"{path} is not a Chrome trace: no 'traceEvents' list")
    return events


def category(name: str) -> str:
    low = name.lower()
    for cat, anyof, also in RULES:
        if any(s in low for s in anyof) and (also is None or also in low):
            return cat
    return OTHER


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def breakdown(events: list[dict], steps: int = 1) -> dict:
    """The GPU time of one trace: totals in ms, percentages of the GPU window, ms per step (totals / steps),
    and every kernel name's total ms and count, largest first. ValueError when there is no GPU event."""
    gpu = []  # (start us, end us, category, name, operator chain)
    chains = operator_chains(events)
    origin_us = defaultdict(lambda: [0.0, 0])   # (kernel name, operator chain) -> [us, count]
    for ev in events:
        kind = str(ev.get("cat", "")).lower()
        if ev.get("ph") == "X" and kind in GPU_CATS:
            start, name = float(ev["ts"]), str(ev.get("name", "?"))
            chain = chains.get((ev.get("args") or {}).get("External id"), "?")
            gpu.append((start, start + float(ev.get("dur", 0)), GPU_CATS[kind] or category(name), name, chain))
            key = (name, chain)
            origin_us[key][0] += float(ev.get("dur", 0))
            origin_us[key][1] += 1
    if not gpu:
        raise ValueError("no GPU kernel events")
    window = max(g[1] for g in gpu) - min(g[0] for g in gpu)
    busy = union_us([(g[0], g[1]) for g in gpu])
    compute_busy = union_us([(g[0], g[1]) for g in gpu if not g[2].startswith("nccl")])
    nccl_busy = union_us([(g[0], g[1]) for g in gpu if g[2].startswith("nccl")])
    nccl_exposed = busy - compute_busy  # the part of the union that only NCCL kernels cover
    totals = {"window": window, "busy": busy, "idle": window - busy, "compute_busy": compute_busy,
              "nccl_exposed": nccl_exposed, "nccl_overlapped": nccl_busy - nccl_exposed}
    cat_us, per_name = dict.fromkeys(CATEGORIES, 0.0), defaultdict(lambda: [0.0, 0, OTHER])
    for s, e, c, name, _ in gpu:
        cat_us[c] += e - s
        per_name[name][0] += e - s
        per_name[name][1] += 1
        per_name[name][2] = c
    totals_ms = {k: v / 1e3 for k, v in totals.items()}
    categories_ms = {k: v / 1e3 for k, v in cat_us.items()}
    pct = {k: 100 * v / window if window else 0.0 for k, v in {**totals, **cat_us}.items() if k != "window"}
    return {
        "steps": steps,
        "totals_ms": totals_ms,
        "categories_ms": categories_ms,
        "pct": pct,
        "per_step_ms": {k: v / steps for k, v in {**totals_ms, **categories_ms}.items()},
        # (name, total ms, count, category), largest first
        "kernels": sorted(((n, us / 1e3, count, c) for n, (us, count, c) in per_name.items()), key=lambda k: -k[1]),
        # (kernel name, operator chain, total ms, count), largest first
        "origins": sorted(((n, chain, us / 1e3, count) for (n, chain), (us, count) in origin_us.items()),
                          key=lambda o: -o[2]),
        # (operator chain that launched the GPU work ending an idle gap, idle ms, gaps, largest ms), largest first
        "idle_by_operator": idle_gaps(gpu),
        "host": host_breakdown(events, steps),   # what the host did meanwhile (bench/host_time.py)
    }


def idle_gaps(gpu: list[tuple]) -> list[tuple[str, float, int, float]]:
    """The GPU's idle gaps (no event on any stream), each charged to the operator chain that launched the
    event ending it: what the GPU was waiting for. (chain, total ms, gaps, largest gap ms), largest total
    first."""
    by_chain = defaultdict(lambda: [0.0, 0, 0.0])
    busy_until = None
    for start, end, _, _, chain in sorted(gpu):
        if busy_until is not None and start > busy_until:
            gap = by_chain[chain]
            gap[0] += start - busy_until
            gap[1] += 1
            gap[2] = max(gap[2], start - busy_until)
        busy_until = end if busy_until is None else max(busy_until, end)
    return sorted(((c, us / 1e3, n, top / 1e3) for c, (us, n, top) in by_chain.items()), key=lambda g: -g[1])


def operator_chains(events: list[dict]) -> dict:
    """External id -> "outer > ... > inner": the CPU operator with that id and the operators enclosing it
    on the same thread (its last CHAIN_DEPTH names; ProfilerStep# markers left out)."""
    by_thread = defaultdict(list)
    for ev in events:
        if ev.get("ph") == "X" and str(ev.get("cat", "")).lower() in ("cpu_op", "user_annotation"):
            by_thread[ev.get("pid"), ev.get("tid")].append(ev)
    chains = {}
    for ops in by_thread.values():
        ops.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))   # parents before their children
        stack: list[tuple[float, str]] = []                                  # (end us, name)
        for ev in ops:
            start, name = float(ev["ts"]), str(ev.get("name", "?"))
            while stack and stack[-1][0] <= start:
                stack.pop()
            stack.append((start + float(ev.get("dur", 0)), name))
            ext = (ev.get("args") or {}).get("External id")
            if ext is not None:
                names = [n for _, n in stack if not n.startswith("ProfilerStep#")]
                chains[ext] = " > ".join(names[-CHAIN_DEPTH:])
    return chains


def markdown(results: list[tuple[str, dict]]) -> str:
    """One row per trace, then each trace's top kernels."""
    head = ["trace", "window ms/step", "compute busy %", "idle %", "nccl exposed %", "nccl overlapped %"]
    lines = ["## GPU time per traced step", "",
             "Category columns: ms per step, summed over streams (they can add up to more than the window).",
             "",
             "| " + " | ".join(head + [f"{c} ms" for c in CATEGORIES]) + " |",
             "|" + "---|" * (len(head) + len(CATEGORIES))]
    for name, r in results:
        cells = [name, f"{r['per_step_ms']['window']:.3f}"]
        cells += [f"{r['pct'][k]:.1f}" for k in ("compute_busy", "idle", "nccl_exposed", "nccl_overlapped")]
        cells += [f"{r['per_step_ms'][c]:.3f}" for c in CATEGORIES]
        lines.append("| " + " | ".join(cells) + " |")
    for name, r in results:
        # the top kernels overall, then those of the catch-all kinds, whose names say what they are
        catch_all = [k for k in r["kernels"] if k[3] in (OTHER, MEMORY)][:TOP]
        # and the Mamba mixer's own kernels, all of them: where a step's time beyond the matmuls goes
        mixer = [k for k in r["kernels"] if k[3] in MIXER_KINDS]
        for title, top in ((f"top {TOP} kernels", r["kernels"][:TOP]), (f"top {TOP} of {OTHER} and {MEMORY}", catch_all),
                           (f"every kernel of {', '.join(MIXER_KINDS)}", mixer)):
            if not top:
                continue
            lines += ["", f"### {name}: {title} ({r['steps']} steps)", "",
                      "| kernel | kind | ms/step | count |", "|---|---|---|---|"]
            for kernel, ms, count, kind in top:
                lines.append(f"| {cell(kernel, 80)} | {kind} | {ms / r['steps']:.3f} | {count} |")
        lines += ["", f"### {name}: who launched the top {TOP} of {OTHER} and {MEMORY} (operators, outer > inner)",
                  "", "| kernel | operators | ms/step | count |", "|---|---|---|---|"]
        for kernel, *_ in catch_all:
            for _, chain, ms, count in [o for o in r["origins"] if o[0] == kernel][:ORIGINS_PER_KERNEL]:
                lines.append(f"| {cell(kernel, 60)} | {cell(chain, 200)} | {ms / r['steps']:.3f} | {count} |")
        lines += ["", f"### {name}: GPU idle, by the operators that launched the work ending each gap (outer > inner)",
                  "", "| operators | idle ms/step | gaps | largest gap ms |", "|---|---|---|---|"]
        for chain, ms, count, top in r.get("idle_by_operator", [])[:TOP]:
            lines.append(f"| {cell(chain, 200)} | {ms / r['steps']:.3f} | {count} | {top:.3f} |")
        lines += host_markdown(name, r.get("host"))
    return "\n".join(lines) + "\n"


def cell(text: str, width: int) -> str:
    return text[:width].replace("|", "/")


def trace_files(paths: list[str]) -> list[Path]:
    """The given files, and every *.json / *.json.gz in the given folders (sorted)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.name.endswith((".json", ".json.gz")) and f.is_file())
            if not found:
                raise SystemExit(f"no *.json or *.json.gz traces in {p}")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise SystemExit(f"no such trace file: {p}")
    return files


def steps_of(path: Path, steps: int | None) -> int:
    """--steps if given, else B - A + 1 from the name's `steps<A>-<B>`, else 1."""
    if steps is not None:
        return steps
    m = STEPS_IN_NAME.search(path.name)
    return int(m[2]) - int(m[1]) + 1 if m and int(m[2]) >= int(m[1]) else 1


def breakdown_files(files: list[Path], steps: int | None = None) -> list[tuple[str, dict]]:
    """(file name, breakdown) of each trace; ValueError naming the file when one has no GPU kernel."""
    results = []
    for path in files:
        try:
            results.append((path.name, breakdown(load_events(path), steps_of(path, steps))))
        except ValueError:  # only breakdown's "no GPU events": load_events turns its own into SystemExit
            raise ValueError(f"no GPU kernel events in {path}: was it traced on a GPU?") from None
    return results


def write_markdown(path: Path, title: str, results: list[tuple[str, dict]]) -> None:
    """`# title` and markdown(results) into path (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n" + markdown(results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.trace_breakdown", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="PATH", help="trace (.json / .json.gz) or folder of them")
    ap.add_argument("--steps", type=int, help="traced steps per trace (default: from the file name, else 1)")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be at least 1")
    try:
        results = breakdown_files(trace_files(args.paths), args.steps)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    text = markdown(results)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
