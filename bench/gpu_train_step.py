"""One bf16 training step of each preset on one GPU: does it fit, how long, how much memory.

    python bench/gpu_train_step.py --presets 1.3b-diffumamba 1.3b-diffumamba-h 1.3b-diffutran \
        --batch 4 --seq-len 2048 --out docs/gpu_train_step.md

Plain PyTorch (no DeepSpeed): bf16 weights with A_log / D / dt_bias kept in fp32, AdamW on the same
parameters, the real masked-diffusion loss on random tokens. Reports the median of a few steps after
warm-up, tokens/s and the peak memory allocated.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import kernels
from model.diffusion import mask_batch
from model.lm import DiffusionLM, count_parameters
from model.presets import get_preset


def run_preset(name: str, batch: int, seq_len: int, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = get_preset(name)
    model = DiffusionLM(cfg).cuda().to(torch.bfloat16)
    fp32 = sorted({n.split(".")[-1] for n, p in model.named_parameters() if p.dtype == torch.float32})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    x0 = torch.randint(0, cfg.vocab_size - 1, (batch, seq_len))
    times = []
    for step in range(steps):
        b = mask_batch(x0, seed=0, step=step, positions=torch.arange(batch), global_batch_size=batch,
                       mask_id=cfg.mask_token_id)
        b = {k: v.cuda(non_blocking=True) for k, v in b.items()}
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = model.loss(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name}: non-finite loss at step {step}")
    step_s = statistics.median(times[2:] if len(times) > 3 else times)
    return {"preset": name, "params_M": count_parameters(model) / 1e6, "batch": batch, "seq_len": seq_len,
            "step_ms": step_s * 1e3, "tokens_per_s": batch * seq_len / step_s,
            "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30, "loss": loss.item(),
            "fp32_params": ",".join(fp32)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["1.3b-diffumamba", "1.3b-diffumamba-h", "1.3b-diffutran"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    lines = [f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  kernels: {kernels.describe()}",
             "", "| preset | params | batch x L | step (ms) | tokens/s | peak mem (GiB) | loss | fp32 params |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    failed = False
    for name in args.presets:
        try:
            r = run_preset(name, args.batch, args.seq_len, args.steps)
            line = (f"| {r['preset']} | {r['params_M']:.0f}M | {r['batch']} x {r['seq_len']} | {r['step_ms']:.0f} "
                    f"| {r['tokens_per_s']:,.0f} | {r['peak_mem_GiB']:.1f} | {r['loss']:.2f} | {r['fp32_params']} |")
        except torch.cuda.OutOfMemoryError:
            failed, line = True, f"| {name} | - | {args.batch} x {args.seq_len} | OOM | | | | |"
        print(line, flush=True)
        lines.append(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
