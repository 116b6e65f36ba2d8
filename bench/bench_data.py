"""Data pipeline throughput on CPU: shard building and streaming with masking, in tokens/s.

    python bench/bench_data.py [--work /tmp/diffumamba-bench-data] [--seq-len 2048] [--seconds 8]
                               [--procs 1,2] [--workers 0,1,2]

Uses the built-in corpus (Python stdlib docs, copied --copies times so the build has enough work), a 4096
vocab BPE tokenizer, and writes a markdown table to stdout and a plot to docs/bench_data.png (the plot only
when matplotlib is installed). The streaming target: a 1.3B model on one H100 eats ~30-60K tokens/s, the
loader must keep >= 10x margin per rank with 2 workers, i.e. >= 600K tokens/s at seq_len 2048.
Each number is the best of --repeat runs, since the CPU may be shared with other work.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.build import build_shards
from data_pipeline.config import DataConfig
from data_pipeline.corpus import build_default_dataset
from data_pipeline.stream import MaskedBatchLoader
from data_pipeline.tokenizer import Tokenizer
from model.diffusion import mask_batch

TARGET = 600_000  # tokens/s per rank with 2 workers


def bench_build(work: Path, tokenizer: Path, seq_len: int, copies: int, procs: int) -> tuple[float, Path]:
    corpus = work / "corpus_x"
    if not corpus.exists():
        corpus.mkdir()
        for i in range(copies):  # distinct file names, same text: the build does not deduplicate
            for f in sorted((work / "corpus").glob("*.txt")):
                shutil.copyfile(f, corpus / f"copy{i}_{f.name}")
    out = work / f"shards_L{seq_len}"
    t0 = time.perf_counter()
    manifest = build_shards([str(corpus / "*.txt")], out, tokenizer, seq_len, samples_per_shard=256,
                            num_procs=procs, overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    return tokens / seconds, out


def bench_stream(dataset: Path, seq_len: int, micro_batch: int, workers: int, seconds: float) -> float:
    tok = Tokenizer.load(dataset / "tokenizer.model")
    cfg = DataConfig(path=str(dataset), seq_len=seq_len, num_workers=workers, epochs=None, pin_memory=False)
    loader = MaskedBatchLoader(cfg, dp_rank=0, dp_size=1, micro_batch_size=micro_batch, grad_accum=1,
                               mask_id=tok.mask_id, seed=0)
    it = iter(loader)
    for _ in range(5):  # worker start-up and first shard opens are not steady state
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    rate = n * micro_batch * seq_len / (time.perf_counter() - t0)
    del it
    return rate


def bench_masking(seq_len: int, micro_batch: int, seconds: float) -> float:
    x0 = torch.randint(5, 4096, (micro_batch, seq_len))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        mask_batch(x0, seed=0, step=n, positions=torch.arange(micro_batch), global_batch_size=micro_batch,
                   mask_id=4)
        n += 1
    return n * micro_batch * seq_len / (time.perf_counter() - t0)


def plot(rows: list[tuple[str, int, float]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot written to {path})")
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [f"{stage.split(' (')[0]}, {workers} {'proc' if 'build' in stage else 'worker'}(s)"
              for stage, workers, _ in rows]
    colors = ["#4c72b0" if "build" in s else "#dd8452" if "stream" in s else "#999999" for s, _, _ in rows]
    ax.barh(labels[::-1], [rate / 1e6 for _, _, rate in rows][::-1], color=colors[::-1])
    ax.axvline(TARGET / 1e6, color="k", ls="--", lw=1, label="streaming target per rank (600K tokens/s)")
    ax.set_xscale("log")
    ax.set_xlabel("M tokens / s (log scale)")
    ax.set_title("Data pipeline throughput, seq_len 2048 (CPU)")
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/diffumamba-bench-data")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=8.0, help="per streaming measurement")
    p.add_argument("--copies", type=int, default=4, help="copies of the built-in corpus to build from")
    p.add_argument("--procs", default="1,2", help="tokenizer process counts to build with")
    p.add_argument("--workers", default="0,1,2", help="loader worker counts to stream with")
    p.add_argument("--repeat", type=int, default=2, help="best of N (the CPU may be shared)")
    p.add_argument("--png", default=str(REPO / "docs" / "bench_data.png"))
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    base = build_default_dataset(work, seq_len=args.seq_len, vocab_size=4096, progress=False)
    tokenizer = work / "tokenizer_v4096.model"

    rows: list[tuple[str, int, float]] = []
    dataset = None
    for procs in (int(x) for x in args.procs.split(",")):
        rates = [bench_build(work, tokenizer, args.seq_len, args.copies, procs) for _ in range(args.repeat)]
        dataset = rates[0][1]
        rows.append(("shard build (tokenize+pack+write)", procs, max(r for r, _ in rates)))
    manifest = json.loads((dataset / "manifest.json").read_text())
    for workers in (int(x) for x in args.workers.split(",")):
        rate = max(bench_stream(dataset, args.seq_len, args.micro_batch, workers, args.seconds)
                   for _ in range(args.repeat))
        rows.append(("stream + mask", workers, rate))
    rate = max(bench_masking(args.seq_len, args.micro_batch, 3.0) for _ in range(args.repeat))
    rows.append(("mask_batch alone (main process)", 0, rate))

    print(f"\nbuilt-in corpus x{args.copies}: {manifest['splits']['train']['tokens']:,} train tokens, "
          f"seq_len {args.seq_len}, micro-batch {args.micro_batch}, dataset {base.name} tokenizer")
    print("\n| stage | loader workers / tokenizer procs | tokens/s | tokens/s per worker |")
    print("|---|---|---|---|")
    for stage, workers, rate in rows:
        per = f"{rate / workers:,.0f}" if workers else "(in-process)"
        print(f"| {stage} | {workers} | {rate:,.0f} | {per} |")
    stream2 = next((r for s, w, r in rows if s == "stream + mask" and w == 2), None)
    if stream2 is not None:
        print(f"\nstreaming with 2 workers: {stream2 / TARGET:.1f}x the 600K tokens/s per-rank target")
    plot(rows, Path(args.png))


if __name__ == "__main__":
    main()
