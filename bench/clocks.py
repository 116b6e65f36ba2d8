"""The GPU's SM clock and board power while a benchmark row runs, from nvidia-smi's own sampling.

The same card does not run at one speed: the same matmul took up to 17% longer on one H200 than on another,
and the scan's output kernel 20% longer between the forward's matmuls than in a loop of its own
(docs/benchmarks.md, twenty-fourth and twenty-fifth runs). A row that states the clock it ran at says
whether a difference is the code's or the card's.

    with ClockSampler(device) as clocks:
        ...                                  # the timed calls
    row.update(clocks.summary())             # sm_mhz (median), sm_mhz_min, power_w (median); {} without samples

nvidia-smi runs beside the benchmark (`--query-gpu=clocks.sm,power.draw -lms`): no query from the timed
process, and nothing at all on a CPU or where nvidia-smi is missing. A row shorter than the interval gets
no sample.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
from typing import Self

import torch

INTERVAL_MS = 100
# the columns and the note a benchmark's table adds for them
CLOCK_COLUMNS = [("SM MHz", "sm_mhz", ",.0f"), ("SM MHz, lowest", "sm_mhz_min", ",.0f"),
                 ("power (W)", "power_w", ",.0f")]
CLOCK_NOTE = (f"SM MHz, power: nvidia-smi's samples every {INTERVAL_MS} ms during the row's timed calls (median; "
              "lowest); blank where the row was shorter or nvidia-smi is missing")


def nvidia_smi_id(device: torch.device) -> str:
    """How nvidia-smi names the device: its UUID (the same under CUDA_VISIBLE_DEVICES), else its index."""
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except (AttributeError, RuntimeError, AssertionError):
        return str(device.index or 0)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def parse_samples(text: str) -> list[tuple[float, float | None]]:
    """nvidia-smi's csv lines ("1980, 512.34", no header, no units) -> (MHz, W); power "[N/A]" -> None.
    Lines that are not samples (a warning, a cut-off last line) are skipped."""
    samples = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2:
            continue
        try:
            mhz = float(fields[0])
        except ValueError:
            continue
        try:
            watts = float(fields[1])
        except ValueError:
            watts = None
        samples.append((mhz, watts))
    return samples


def summarize(samples: list[tuple[float, float | None]]) -> dict:
    """The columns a row gets: median and lowest SM clock (MHz), median power (W); {} without samples."""
    if not samples:
        return {}
    watts = [w for _, w in samples if w is not None]
    return {"sm_mhz": statistics.median(m for m, _ in samples), "sm_mhz_min": min(m for m, _ in samples),
            "power_w": statistics.median(watts) if watts else None, "clock_samples": len(samples)}


class ClockSampler:
    """nvidia-smi sampling the device's SM clock and power for the duration of a `with` block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process, self.samples = None, []

    def __enter__(self) -> Self:
        smi = shutil.which("nvidia-smi")
        if self.device.type == "cuda" and smi:
            self.process = subprocess.Popen(
                [smi, "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                 "-i", nvidia_smi_id(self.device), "-lms", str(INTERVAL_MS)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        self.samples = parse_samples(out)

    def summary(self) -> dict:
        return summarize(self.samples)
