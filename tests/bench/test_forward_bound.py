"""bench/forward_bound: the bytes each memory-bound kernel moves, counted here tensor by tensor for the tiny
DiffuMamba-H preset (d_model 64, d_inner 128, 8 heads x 16, state 16, 1 group, chunk 16, GELU hidden 128,
pattern MMA), and the bound they give."""
import dataclasses
import json

import pytest

from bench import forward_bound
from model.presets import get_preset

# (elements per token, bytes per element, how many times the kernel moves it)
ADD_NORM = [(64, 2, 1), (64, 4, 1), (64, 4, 1), (64, 2, 1)]            # hidden, residual in; residual, out
CONV = [(128 + 2 * 16, 2, 2)]                                         # x, B, C read and written
STATES = 8 * 16 * 16 / 16                                             # heads x headdim x state, one per chunk
SCAN = [(128, 2, 3),                                                  # x read twice, y written
        (STATES, 4, 2), (STATES, 2, 2),                               # fp32 written + read, bf16 written + read
        (16, 4, 2),                                                   # C B^T row, fp32, written + read
        (16, 2, 4),                                                   # B twice, C twice
        (8, 2, 1), (8, 4, 6)]                                         # dt read; dt, dA cumsum written, read twice
GATED_NORM = [(128, 2, 3)]                                            # y, z read, output written
FLIPS = [(64, 2, 2), (64, 2, 3)]                                      # input reversed; two outputs summed
GELU = [(128, 2, 2)]
ROTARY = [(64, 2, 4)]                                                 # q, k read and written


def total(tensors) -> float:
    return sum(n * size * times for n, size, times in tensors)


def test_the_bytes_of_each_kernel_counted_tensor_by_tensor():
    cfg = get_preset("tiny-diffumamba-h")
    assert forward_bound.mamba_direction_bytes(cfg) == {"conv": total(CONV), "scan": total(SCAN),
                                                        "gated norm": total(GATED_NORM)}
    mamba = forward_bound.block_bytes("M", cfg)
    assert mamba == {"add + norm": 2 * total(ADD_NORM), "MLP activation": total(GELU), "flips": total(FLIPS),
                     "conv": 2 * total(CONV), "scan": 2 * total(SCAN), "gated norm": 2 * total(GATED_NORM)}
    attention = forward_bound.block_bytes("A", cfg)
    assert attention == {"add + norm": 2 * total(ADD_NORM), "MLP activation": total(GELU), "rotary": total(ROTARY)}
    whole = forward_bound.forward_bytes_per_token(cfg)
    ends = total([(64, 4, 2), (64, 2, 2), (64, 4, 1)])                 # embedding row; final norm
    assert sum(whole.values()) == pytest.approx(2 * sum(mamba.values()) + sum(attention.values()) + ends)


def test_a_fused_mixer_reads_in_projs_output_once_and_writes_its_result():
    cfg = get_preset("tiny-diffumamba-h")
    z_x_b_c_dt = 128 + 128 + 16 + 16 + 8
    assert forward_bound.fused_direction_bytes(cfg) == {"fused mixer": 2 * z_x_b_c_dt + 2 * 128}
    fused = forward_bound.block_bytes("M", cfg, fused_mixer=True)
    assert set(fused) == {"add + norm", "MLP activation", "flips", "fused mixer"}
    assert fused["fused mixer"] == 2 * (2 * z_x_b_c_dt + 2 * 128)


def test_the_bound_adds_the_traffic_time_to_the_floor(tmp_path):
    """At 1.3B, 32K tokens, 770 TFLOP/s: the matmul floor docs/benchmarks.md reports (117 ms); the bound is
    (floor + bytes / bandwidth) / floor, and the command writes its table and JSON."""
    row = forward_bound.bound_row("1.3b-diffumamba", 32768, 770e12, 3.35e12)
    assert row["floor_ms"] == pytest.approx(117.1, abs=0.1)
    assert row["bound"] == pytest.approx(1 + row["traffic_GB"] * 1e9 / 3.35e12 / (row["floor_ms"] / 1e3))
    assert row["memory_ms"] == pytest.approx(sum(v for k, v in row.items() if k.startswith("ms ")))
    assert forward_bound.main(["--presets", "1.3b-diffumamba", "--seq-lens", "4096", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "forward_bound.json").read_text())
    assert [r["seq_len"] for r in saved["rows"]] == [4096] and "bound (x floor)" in (tmp_path / "forward_bound.md").read_text()


def test_without_autograd_the_gate_is_in_the_scan_and_the_gelu_in_the_matmul():
    """A forward without autograd: the scan's output kernel also reads z and writes each head's sum of squares,
    the gated norm does not run, the directions' sum reads the sums, the GELU has no pass of its own, and
    state_pass keeps the fp32 chunk states out of memory."""
    cfg = get_preset("tiny-diffumamba-h")
    scan_with_state_pass = [t for t in SCAN if t != (STATES, 4, 2)]     # no fp32 states written + read
    gated_scan = scan_with_state_pass + [(128, 2, 1), (8, 4, 1)]        # z read; sums of squares written
    assert forward_bound.mamba_direction_bytes(cfg, without_autograd=True) == {"conv": total(CONV),
                                                                             "scan": total(gated_scan)}
    mamba = forward_bound.block_bytes("M", cfg, without_autograd=True)
    # sum_norm: the directions' sum is not written, and the norm after the mixer does not read it
    assert mamba == {"add + norm": 2 * total(ADD_NORM) - 64 * 2, "MLP activation": 0,
                     "flips": total(FLIPS + [(8, 4, 2)]) - 64 * 2, "conv": 2 * total(CONV),
                     "scan": 2 * total(gated_scan)}
    assert forward_bound.block_bytes("A", cfg, without_autograd=True)["add + norm"] == 2 * total(ADD_NORM)
    # two norm groups: the model keeps the gated norm (no scale per row), the GELU still in the matmul
    two_groups = cfg.replace(mamba=dataclasses.replace(cfg.mamba, ngroups=2))
    assert "gated norm" in forward_bound.mamba_direction_bytes(two_groups, without_autograd=True)
    assert forward_bound.block_bytes("A", two_groups, without_autograd=True)["MLP activation"] == 0
    plain = forward_bound.bound_row("1.3b-diffumamba", 32768, 770e12, 3.35e12)
    inference = forward_bound.bound_row("1.3b-diffumamba", 32768, 770e12, 3.35e12, without_autograd=True)
    assert inference["bound"] < plain["bound"] and "ms gated norm" not in inference
