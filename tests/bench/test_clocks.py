"""bench/clocks.py: nvidia-smi's samples of the SM clock and power during a benchmark row, with a stand-in
nvidia-smi on the PATH (no GPU here)."""
import os
import stat
import time

import pytest
import torch

from bench import clocks


def test_samples_are_parsed_and_anything_else_skipped():
    text = "1980, 512.34\n1755, [N/A]\nWARNING: something\n\n1830,  600\n1900, 4"   # the last line cut off
    assert clocks.parse_samples(text) == [(1980.0, 512.34), (1755.0, None), (1830.0, 600.0), (1900.0, 4.0)]


def test_summary_is_the_median_and_lowest_clock_and_median_power():
    samples = [(1980.0, 500.0), (1755.0, None), (1830.0, 700.0), (1900.0, 600.0)]
    # clocks sorted 1755 1830 1900 1980: median (1830 + 1900) / 2; powers 500 600 700: median 600
    assert clocks.summarize(samples) == {"sm_mhz": 1865.0, "sm_mhz_min": 1755.0, "power_w": 600.0,
                                         "clock_samples": 4}
    assert clocks.summarize([]) == {}
    assert clocks.summarize([(1500.0, None)])["power_w"] is None


def test_a_cpu_row_gets_no_columns():
    with clocks.ClockSampler(torch.device("cpu")) as sampler:
        pass
    assert sampler.process is None and sampler.summary() == {}


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An nvidia-smi that writes its arguments to a file and prints two samples every 20 ms until stopped."""
    args_file = tmp_path / "args"
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" > {args_file}\n'
                      'while true; do echo "1980, 512.5"; echo "1755, [N/A]"; sleep 0.02; done\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return args_file


def test_a_gpu_row_is_sampled_by_nvidia_smi_while_it_runs(fake_nvidia_smi):
    with clocks.ClockSampler(torch.device("cuda", 0)) as sampler:
        time.sleep(0.3)
    assert sampler.process.poll() is not None, "nvidia-smi must stop with the row"
    args = fake_nvidia_smi.read_text().split()
    assert "--query-gpu=clocks.sm,power.draw" in args and "--format=csv,noheader,nounits" in args
    # no CUDA here: the device is named by its index
    assert args[args.index("-i") + 1] == "0" and args[args.index("-lms") + 1] == str(clocks.INTERVAL_MS)
    summary = sampler.summary()
    assert summary["clock_samples"] >= 4
    assert summary["sm_mhz_min"] == 1755.0 and summary["power_w"] == 512.5
    assert summary["sm_mhz"] in (1755.0, 1867.5, 1980.0)
