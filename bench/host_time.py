"""Where the host's time went in a torch.profiler trace: the CPU side of bench/trace_breakdown.py.

A GPU that sits idle between kernels waits on the host. This part of the breakdown says what the host was
doing meanwhile, from the trace's CPU events:
    threads        per thread, the time inside top-level operators (operators not nested in another one
                   on the same thread) and its share of the CPU window (first to last CPU operator). On
                   the thread that runs the Python loop, the rest is Python between operators: module
                   code, hooks, the Triton kernels' Python launchers outside any operator.
    operators      the top-level operators with the most time, summed over threads: the forward's
                   operators on the main thread, `autograd::engine::evaluate_function: ...` nodes on the
                   backward's thread (a custom autograd Function's Python backward runs inside its node).
    runtime        CUDA runtime / driver calls by name: the count of kernel launches, and the time spent
                   synchronising (the host waiting on the GPU, not the other way round).
Times are per step (totals / steps), in ms.
"""
from __future__ import annotations

from collections import defaultdict

CPU_CATS = ("cpu_op", "user_annotation")
RUNTIME_CATS = ("cuda_runtime", "cuda_driver")
SKIPPED = ("ProfilerStep#",)     # step markers span everything; they are not work
TOP_OPERATORS = 15
TOP_RUNTIME = 8
TOP_THREADS = 6


def host_breakdown(events: list[dict], steps: int = 1) -> dict | None:
    """The host side of one trace (None when it has no CPU operator): per-thread busy time, the top-level
    operators and the runtime calls, in ms per step, largest first."""
    by_thread = defaultdict(list)
    runtime = defaultdict(lambda: [0.0, 0])
    for ev in events:
        if ev.get("ph") != "X":
            continue
        cat, name = str(ev.get("cat", "")).lower(), str(ev.get("name", "?"))
        if cat in CPU_CATS and not name.startswith(SKIPPED):
            by_thread[ev.get("pid"), ev.get("tid")].append((float(ev["ts"]), float(ev.get("dur", 0)), name))
        elif cat in RUNTIME_CATS:
            runtime[name][0] += float(ev.get("dur", 0))
            runtime[name][1] += 1
    if not by_thread:
        return None
    starts = [s for ops in by_thread.values() for s, _, _ in ops]
    ends = [s + d for ops in by_thread.values() for s, d, _ in ops]
    window = max(ends) - min(starts)
    threads, operators = [], defaultdict(lambda: [0.0, 0])
    for (pid, tid), ops in by_thread.items():
        ops.sort(key=lambda o: (o[0], -o[1]))     # a parent before the children that start with it
        busy, end, count = 0.0, float("-inf"), 0
        for start, dur, name in ops:
            if start >= end:                      # not inside the current top-level operator
                busy += dur
                end = start + dur
                count += 1
                operators[name][0] += dur
                operators[name][1] += 1
        threads.append({"thread": f"{pid}/{tid}", "busy_ms": busy / 1e3 / steps, "operators": count / steps,
                        "busy_pct": 100 * busy / window if window else 0.0})
    threads.sort(key=lambda t: -t["busy_ms"])
    return {"steps": steps, "window_ms": window / 1e3 / steps, "threads": threads,
            "operators": sorted(((n, us / 1e3 / steps, c / steps) for n, (us, c) in operators.items()),
                                key=lambda o: -o[1]),
            "runtime": sorted(((n, us / 1e3 / steps, c / steps) for n, (us, c) in runtime.items()),
                              key=lambda o: -o[1])}


def host_markdown(name: str, host: dict | None) -> list[str]:
    """The markdown lines of one trace's host breakdown (none without CPU events)."""
    if host is None:
        return []
    lines = ["", f"### {name}: host time per step (CPU window {host['window_ms']:.1f} ms)", "",
             "| thread | in top-level operators (ms) | % of CPU window | top-level operators |",
             "|---|---|---|---|"]
    lines += [f"| {t['thread']} | {t['busy_ms']:.1f} | {t['busy_pct']:.1f} | {t['operators']:.0f} |"
              for t in host["threads"][:TOP_THREADS]]
    lines += ["", f"Top-level operators (all threads, top {TOP_OPERATORS}):", "",
              "| operator | ms/step | calls/step |", "|---|---|---|"]
    lines += [f"| {op[:120].replace('|', '/')} | {ms:.2f} | {count:.0f} |"
              for op, ms, count in host["operators"][:TOP_OPERATORS]]
    if host["runtime"]:
        lines += ["", "CUDA runtime and driver calls:", "", "| call | ms/step | calls/step |", "|---|---|---|"]
        lines += [f"| {call} | {ms:.2f} | {count:.0f} |" for call, ms, count in host["runtime"][:TOP_RUNTIME]]
    return lines
