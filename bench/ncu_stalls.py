"""Where a kernel's warps stalled, by part of the kernel, from the source page that ncu writes:

    ncu --clock-control none -k regex:KERNEL --section WarpStateStats --section SourceCounters -o rep python probe.py
    ncu -i rep.ncu-rep --page source --csv --print-source sass > source.csv
    python -m bench.ncu_stalls source.csv[.gz] [--top 20]

The page has a row per SASS instruction with its stall samples: how often a sampled warp sat at that
instruction, and why (`stall_long_sb`: waiting on global memory, `stall_barrier`, `stall_wait`: a fixed
latency, `stall_selected`: issuing...). The kernel is cut at its loops (a loop: a branch back to an earlier
address, bench.kernel_resources.loop_bodies): the part before the first loop, each loop, the parts
between, and the part after the last. Each part's share of all samples and its first three reasons are
printed, then the instructions with the most samples.
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import sys
from pathlib import Path

from bench.kernel_resources import loop_bodies

SAMPLES = "Warp Stall Sampling (All Samples)"


def read_source_page(path: Path) -> list[dict]:
    """The instruction rows of one kernel's source page (the first header row after the kernel's name);
    ValueError naming the file where there is none."""
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    header = next((i for i, row in enumerate(rows) if "Address" in row and SAMPLES in row), None)
    if header is None:
        raise ValueError(f"{path}: no ncu source page (a header with 'Address' and '{SAMPLES}')")
    names = rows[header]
    return [dict(zip(names, row)) for row in rows[header + 1:] if len(row) == len(names)]


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def parts(instructions: list[dict]) -> list[tuple[str, range]]:
    """(name, index range) of the kernel's parts: before the first loop, each loop, between, after the last."""
    loops = loop_bodies([(int(row["Address"], 16), row["Source"]) for row in instructions])
    # a loop inside another is no part of its own: its outer loop is the part
    loops = [loop for loop in loops
             if not any(other != loop and other.start <= loop.start and loop.stop <= other.stop for other in loops)]
    named, at = [], 0
    for n, loop in enumerate(loops, 1):
        if loop.start > at:
            named.append(("before the first loop" if n == 1 else f"between loops {n - 1} and {n}",
                          range(at, loop.start)))
        named.append((f"loop {n}", loop))
        at = loop.stop
    named.append(("after the last loop" if loops else "the whole kernel", range(at, len(instructions))))
    return named


def stall_table(instructions: list[dict], top: int = 20) -> str:
    reasons = [name for name in instructions[0] if name.startswith("stall_") and "Not Issued" not in name]
    total = sum(_number(row[SAMPLES]) for row in instructions) or 1.0
    lines = [f"{len(instructions)} instructions, {total:,.0f} stall samples", "",
             "| part | instructions | share of the samples | first reasons |", "| --- | --- | --- | --- |"]
    for name, span in parts(instructions):
        by_reason = collections.Counter()
        for i in span:
            for reason in reasons:
                by_reason[reason[6:]] += _number(instructions[i][reason])
        share = sum(_number(instructions[i][SAMPLES]) for i in span) / total
        first = ", ".join(f"{reason} {count / total:.1%}" for reason, count in by_reason.most_common(3))
        lines.append(f"| {name} | {span.start}-{span.stop - 1} | {share:.1%} | {first} |")
    lines += ["", "| instruction | SASS | share | first reason |", "| --- | --- | --- | --- |"]
    ranked = sorted(range(len(instructions)), key=lambda i: -_number(instructions[i][SAMPLES]))[:top]
    for i in sorted(ranked):
        row = instructions[i]
        reason = max(reasons, key=lambda r: _number(row[r]))
        lines.append(f"| {i} | `{row['Source'].strip()[:70]}` | {_number(row[SAMPLES]) / total:.1%} | {reason[6:]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source_page", type=Path, help="ncu --page source --csv --print-source sass output (.csv or .csv.gz)")
    ap.add_argument("--top", type=int, default=20, help="instructions with the most samples to list")
    args = ap.parse_args(argv)
    if not args.source_page.exists():
        print(f"{args.source_page}: no such file", file=sys.stderr)
        return 2
    try:
        print(stall_table(read_source_page(args.source_page), args.top))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
