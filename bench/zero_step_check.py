"""The trainer's ZeRO step with its skip decided on the device (dtrain/zero_step.py), checked where it runs.

    python -m bench.zero_step_check --out zero_step.md         # one GPU (the CPU where there is none)
    torchrun --nproc_per_node 2 -m bench.zero_step_check --out zero_step.md

For ZeRO-1 and ZeRO-2, two engines from the same weights and batches (the tiny CPU config, bf16 autocast,
gradient clipping on): the trainer's, and one with DeepSpeed's stock step (skip_on_device off), whose skip
is decided on the host and is the reference. Four steps of two micro-batches each; step 2's loss is NaN.
One row per check:
- the verdicts: step 2 skipped on both; the trainer's verdict a tensor on the device;
- step 2 left the weights, Adam's moments and step counts bit for bit as they were, on both; steps 1, 3
  and 4 changed the weights; Adam counted 3 steps;
- the two runs' weights after every step: equal bit for bit on the CPU, within 5% of the distance training
  moved them on a GPU (its backward kernels add in a varying order, so two runs differ in the last bits);
- host reads of a device value inside one training step (aten's _local_scalar_dense and kin, counted by a
  dispatch mode): none on the trainer's path, a good step and a skipped one; DeepSpeed's step reads its
  gradient norm three times (once in step(), once per parameter group when clipping), once if it skips.
Prints the table, writes it to --out, exits 1 if a row fails.
"""
from __future__ import annotations

import argparse
import collections
import itertools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.tiny_engine import MICRO_BATCH, masked_batches, tiny_engine
from bench.training import NoMetrics
from dtrain import engine as dengine
from dtrain import zero_step
from dtrain.loop import train_step

# aten ops that hand a device value to the host (the host waits for the device)
HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal"}
GRAD_ACCUM, POISONED = 2, 2


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            self.seen[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def build(zero: int, device: torch.device, device_skip: bool):
    overrides = (f"train.grad_accum={GRAD_ACCUM}", "train.precision=bf16", "train.grad_clip=0.5",
                 f"parallel.zero_stage={zero}")
    if not device_skip:
        dengine.skip_on_device = lambda optimizer: False
    try:
        return tiny_engine(*overrides, device=device)
    finally:
        dengine.skip_on_device = zero_step.skip_on_device


def run(zero: int, device: torch.device, device_skip: bool) -> list[dict]:
    """Four steps; before the first and after each: the weights and Adam's state, then the verdict and the
    host reads during the step."""
    trainee = build(zero, device, device_skip)
    data = masked_batches(MICRO_BATCH * torch.distributed.get_world_size(), device,
                          torch.Generator().manual_seed(3))
    engine = trainee.engine

    def snapshot() -> dict:
        state = engine.optimizer.optimizer.state
        return {"weights": torch.cat([p.detach().flatten().float() for p in engine.module.parameters()]),
                "adam": [t.detach().clone() for s in state.values() for k, t in s.items() if k != "step"],
                "adam_steps": [float(s["step"]) for s in state.values()]}

    out = [snapshot()]
    for step in range(1, 5):
        with HostReads() as reads:
            skipped, _ = train_step(trainee, data, GRAD_ACCUM, step == POISONED, NoMetrics())
        out.append({**snapshot(), "on_device": torch.is_tensor(skipped), "skipped": bool(skipped),
                    "host_reads": sum(reads.seen.values())})
    engine.destroy()
    return out


def unchanged(a: dict, b: dict) -> bool:
    return (torch.equal(a["weights"], b["weights"]) and a["adam_steps"] == b["adam_steps"]
            and all(torch.equal(x, y) for x, y in zip(a["adam"], b["adam"], strict=True)))


def rows_for(zero: int, device: torch.device) -> list[tuple[str, str, str, bool]]:
    """The rows for one ZeRO stage. The two runs are compared bit for bit on the CPU; on a GPU, whose
    backward kernels add in a varying order, each step's weights must agree within 5% of the distance
    training moved them (a NaN update, or an Adam step count off by one, moves them far more)."""
    ours, stock = run(zero, device, True), run(zero, device, False)
    steps = ours[1:], stock[1:]
    skips = [s["skipped"] for s in steps[0]], [s["skipped"] for s in steps[1]]
    want_skips = [step == POISONED for step in range(1, 5)]
    kept = [unchanged(run[POISONED - 1], run[POISONED]) for run in (ours, stock)]
    moved = [[not torch.equal(a["weights"], b["weights"]) for a, b in itertools.pairwise(run)] for run in (ours, stock)]
    adam_steps = [run[-1]["adam_steps"] for run in (ours, stock)]
    tolerance = 0.0 if device.type == "cpu" else 0.05
    apart = [float((a["weights"] - b["weights"]).norm() / (b["weights"] - stock[0]["weights"]).norm().clamp_min(1e-30))
             for a, b in zip(steps[0], steps[1], strict=True)]
    reads = [s["host_reads"] for s in steps[0]], [s["host_reads"] for s in steps[1]]
    name = f"ZeRO-{zero}"
    return [
        (f"{name}: steps skipped (trainer / DeepSpeed's step)", f"{skips[0]} / {skips[1]}",
         f"{want_skips} / same", skips[0] == skips[1] == want_skips),
        (f"{name}: the trainer's verdict stays on the device", str([s["on_device"] for s in steps[0]]),
         "all True", all(s["on_device"] for s in steps[0])),
        (f"{name}: step {POISONED} left weights, Adam moments and step counts as they were (trainer / DeepSpeed's)",
         str(kept), "[True, True]", kept == [True, True]),
        (f"{name}: weights changed by steps 1-4 (trainer / DeepSpeed's)", str(moved),
         "[True, False, True, True] each", moved == [[True, False, True, True]] * 2),
        (f"{name}: Adam's step count after 4 steps (trainer / DeepSpeed's)", str(adam_steps), "3 everywhere",
         all(c == 3.0 for run in adam_steps for c in run) and all(adam_steps)),
        (f"{name}: weights after steps 1-4, trainer vs DeepSpeed's, / distance moved",
         "[" + ", ".join(f"{x:.1e}" for x in apart) + "]", f"<= {tolerance:g}", all(x <= tolerance for x in apart)),
        (f"{name}: host reads per training step (trainer / DeepSpeed's step)", f"{reads[0]} / {reads[1]}",
         "0 each / 1 or more each", all(r == 0 for r in reads[0]) and all(r >= 1 for r in reads[1])),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="file the markdown table is written to")
    args = p.parse_args(argv)
    device = dengine.setup_distributed()
    rows = rows_for(1, device) + rows_for(2, device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [f"# ZeRO step: skip decided on the device ({where}, {torch.distributed.get_world_size()} rank(s))\n",
             "| check | got | want | ok |", "|---|---|---|---|"]
    lines += [f"| {what} | {got} | {want} | {'ok' if ok else 'FAIL'} |" for what, got, want, ok in rows]
    passed = all(ok for *_, ok in rows)
    lines.append(f"\n**{'PASS' if passed else 'FAIL'}**")
    if torch.distributed.get_rank() == 0:
        print("\n".join(lines), flush=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    dengine.exit_rank(main())   # not sys.exit: the interpreter's finalisation now and then aborted a rank
