"""The card's bf16 matmul rate two ways: in short bursts, as bench.training and bench.inference measure the peak
behind MFU and the FLOP floor (bench.common.matmul_peak: the median of 20 calls after 5), and sustained,
after the card has been kept busy for --settle seconds, as a training run keeps it for hours.

    python -m bench.matmul_peak --out bench_results     # matmul_peak.md / .json / .png
    python -m bench.matmul_peak --smoke --out /tmp/mp   # CPU, tiny: every code path

A GPU's clock falls under sustained load (power and heat), so the two differ: on one H100 80GB (700 W) bursts
read 732-775 TFLOP/s and sustained windows 650-710 (docs/benchmarks.md, ninth run).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench import common


def tflops(n: int, seconds: float) -> float:
    return 2 * n ** 3 / seconds / 1e12


def measure(device: torch.device, n: int, bursts: int, idle_s: float, settle_s: float, windows: int,
            window_calls: int) -> list[dict]:
    """Rows {phase, index, tflops}: `bursts` runs of common.matmul_peak (the benchmarks' peak), each after
    idle_s of rest; then settle_s of back-to-back calls and `windows` timings of window_calls calls each."""
    rows = []
    for i in range(bursts):
        time.sleep(idle_s)
        rows.append({"phase": f"burst after {idle_s:g} s idle", "index": i + 1,
                     "tflops": common.matmul_peak(device, n)["flops"] / 1e12})
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)

    def mm():
        torch.mm(a, b, out=out)

    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < settle_s:
        for _ in range(10):
            mm()
        common.sync(device)
        calls += 10
    for i, seconds in enumerate(common.time_calls(lambda: [mm() for _ in range(window_calls)], device, 0, windows)):
        rows.append({"phase": f"sustained, after {calls} calls ({settle_s:g} s)", "index": i + 1,
                     "tflops": tflops(n, seconds / window_calls)})
    return rows


def markdown(rows: list[dict], head: dict) -> str:
    lines = [f"## bf16 matmul rate, burst and sustained — {head['card']}", ""]
    lines += [f"- {line}" for line in common.header_lines(head)]
    lines += ["", "| phase | # | TFLOP/s |", "| --- | --- | --- |"]
    lines += [f"| {r['phase']} | {r['index']} | {r['tflops']:.4g} |" for r in rows]
    for phase in dict.fromkeys(r["phase"] for r in rows):
        values = [r["tflops"] for r in rows if r["phase"] == phase]
        lines.append(f"\n{phase}: median {common.median(values):.4g}, range {min(values):.4g}-{max(values):.4g}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], head: dict, path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, phase in enumerate(phases):
        xs = [i for i, r in enumerate(rows) if r["phase"] == phase]
        ax.bar(xs, [rows[i]["tflops"] for i in xs], color=f"C{k}", label=phase)
    ax.set_ylabel("bf16 matmul TFLOP/s")
    ax.set_xticks([])
    ax.legend(loc="lower right")
    common.save_figure(fig, head, "matmul rate", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.matmul_peak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8192, help="square matmul size")
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of rest before each burst")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of back-to-back calls before the windows")
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--window-calls", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help="CPU, n=64, no rest: every code path")
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    args = ap.parse_args(argv)
    device = common.pick_device(args.smoke)
    if args.smoke:
        args.n, args.idle, args.settle, args.window_calls = 64, 0.0, 0.05, 2
    rows = measure(device, args.n, args.bursts, args.idle, args.settle, args.windows, args.window_calls)
    head = common.header(device, "bench.matmul_peak", size=f"{args.n}^3 bf16 torch.mm")
    common.save_and_print(args.out, "matmul_peak", head, rows, markdown(rows, head), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
