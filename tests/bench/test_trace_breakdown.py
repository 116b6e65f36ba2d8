"""bench/trace_breakdown.py on hand-made Chrome traces whose numbers are worked out by hand below, and on a
real CPU-only torch.profiler trace (which must give the clear "no GPU kernel events" error)."""
import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import trace_breakdown as tb
from bench.host_time import host_breakdown


def kernel(name, start, end, stream, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": float(start),
            "dur": float(end - start)}


# Two streams (us): compute on 7, NCCL on 13; a gap at 410-450 and others between.
#   stream 7:  gemm 0-100, _chunk_scan 200-260, memcpy 400-410, elementwise 450-500
#   stream 13: AllReduce 50-150, SendRecv 300-400
EVENTS = [
    kernel("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 0, 100, 7),
    kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", 50, 150, 13),
    kernel("_chunk_scan_fwd_kernel", 200, 260, 7),
    kernel("ncclDevKernel_SendRecv(ncclDevComm*, unsigned long, ncclWork*)", 300, 400, 13),
    kernel("Memcpy DtoD (Device -> Device)", 400, 410, 7, cat="gpu_memcpy"),
    kernel("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 450, 500, 7),
    # not GPU work: must not stretch the window nor count as busy
    kernel("aten::mm", -1000, 5000, 1, cat="cpu_op"),
    kernel("ProfilerStep#20", -1000, 5000, 7, cat="gpu_user_annotation"),
    {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "python"}},
]
# By hand: window 0-500 = 500 us.
# Union of all: [0,150] + [200,260] + [300,410] + [450,500] = 150 + 60 + 110 + 50 = 370.
# Compute union: [0,100] + [200,260] + [400,410] + [450,500] = 220. NCCL union: [50,150] + [300,400] = 200.
# Exposed NCCL = 370 - 220 = 150 (AllReduce 100-150, SendRecv 300-400); overlapped = 200 - 150 = 50 (50-100).
WINDOW, BUSY, COMPUTE, EXPOSED, OVERLAPPED = 500, 370, 220, 150, 50
CATEGORY_US = {"gemm": 100, "nccl_collective": 100, "ssm_scan": 60, "nccl_p2p": 100, "memcpy_memset": 10,
               "elementwise_other": 50, "attention": 0, "conv1d": 0, "norm": 0, "optimizer": 0}


def write_trace(path: Path, events=EVENTS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"schemaVersion": 1, "traceEvents": events}).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def split_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.parametrize("name, cat", [
    ("ncclDevKernel_SendRecv(ncclDevComm*, unsigned long, ncclWork*)", "nccl_p2p"),
    ("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t", "nccl_p2p"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", "nccl_collective"),
    ("ncclDevKernel_AllGather_RING_LL", "nccl_collective"),
    ("ncclDevKernel_Broadcast_RING_LL", "nccl_collective"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm"),
    ("cutlass::Kernel2<cutlass_80_tensorop_s1688gemm>", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "gemm"),
    ("fmha_cutlassF_f32_aligned_64x64_rf_sm80", "attention"),
    ("flash_fwd_kernel", "attention"),
    ("_chunk_cumsum_fwd_kernel", "ssm_scan"),
    ("_state_passing_bwd_kernel", "ssm_scan"),
    ("_bmm_chunk_fwd_kernel", "ssm_scan"),
    ("_chunk_scan_out_kernel", "ssm_scan"),
    ("_states_entering_kernel", "ssm_scan"),
    ("causal_conv1d_fwd_kernel", "conv1d"),
    ("_layer_norm_fwd_1pass_kernel", "norm"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::reduce_kernel<512, 1>", "elementwise_other"),
])
def test_category_rules(name, cat):
    assert tb.category(name) == cat


def test_breakdown_numbers_by_hand():
    r = tb.breakdown(EVENTS, steps=1)
    expected_us = {"window": WINDOW, "busy": BUSY, "idle": WINDOW - BUSY, "compute_busy": COMPUTE,
                   "nccl_exposed": EXPOSED, "nccl_overlapped": OVERLAPPED}
    assert r["totals_ms"] == pytest.approx({k: v / 1e3 for k, v in expected_us.items()})
    assert r["categories_ms"] == pytest.approx({k: v / 1e3 for k, v in CATEGORY_US.items()})
    assert sum(r["categories_ms"].values()) == pytest.approx(0.420)  # > busy: streams overlap
    assert r["pct"]["idle"] == pytest.approx(100 * 130 / 500)
    assert r["pct"]["nccl_exposed"] == pytest.approx(30.0)
    assert r["pct"]["nccl_overlapped"] == pytest.approx(10.0)
    assert r["pct"]["compute_busy"] == pytest.approx(44.0)
    assert r["pct"]["gemm"] == pytest.approx(20.0)
    assert r["kernels"][-1] == ("Memcpy DtoD (Device -> Device)", pytest.approx(0.010), 1, "memcpy_memset")
    assert {k[0] for k in r["kernels"]} == {ev["name"] for ev in EVENTS[:6]}


def test_per_step_division_and_kernel_counts():
    events = EVENTS[:6] + [kernel("_chunk_scan_fwd_kernel", 1000 + s, 1060 + s, 7) for s in (0, 100)]
    r = tb.breakdown(events, steps=4)
    # the window now ends at 1160; the two extra scans add 120 us of compute and of ssm_scan
    assert r["per_step_ms"]["window"] == pytest.approx(1.160 / 4)
    assert r["per_step_ms"]["busy"] == pytest.approx((BUSY + 120) / 1e3 / 4)
    assert r["per_step_ms"]["compute_busy"] == pytest.approx((COMPUTE + 120) / 1e3 / 4)
    assert r["per_step_ms"]["nccl_exposed"] == pytest.approx(EXPOSED / 1e3 / 4)
    assert r["per_step_ms"]["ssm_scan"] == pytest.approx(0.180 / 4)
    assert r["kernels"][0] == ("_chunk_scan_fwd_kernel", pytest.approx(0.180), 3, "ssm_scan")


def test_steps_from_file_name():
    assert tb.steps_of(Path("rank3_steps20-21.json.gz"), None) == 2
    assert tb.steps_of(Path("rank0_steps5-5.json"), None) == 1
    assert tb.steps_of(Path("trace.json"), None) == 1
    assert tb.steps_of(Path("rank0_steps20-21.json.gz"), 7) == 7


def test_cli_directory_and_out(tmp_path, capsys):
    prof = tmp_path / "profile"
    write_trace(prof / "rank1_steps20-21.json.gz")
    write_trace(prof / "rank0_steps20-21.json")
    (prof / "rank0_steps20-21.txt").write_text("the profiler's table, not a trace")
    out = tmp_path / "md" / "breakdown.md"
    assert tb.main([str(prof), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    rows = [ln for ln in text.splitlines() if ln.startswith("| rank")]
    assert [r.split("|")[1].strip() for r in rows] == ["rank0_steps20-21.json", "rank1_steps20-21.json.gz"]
    head = next(ln for ln in text.splitlines() if ln.startswith("| trace"))
    cells = dict(zip(split_row(head), split_row(rows[0])))
    # 2 steps from the name: per step = totals / 2
    assert cells["window ms/step"] == "0.250"
    assert (cells["compute busy %"], cells["idle %"]) == ("44.0", "26.0")
    assert (cells["nccl exposed %"], cells["nccl overlapped %"]) == ("30.0", "10.0")
    assert (cells["gemm ms"], cells["nccl_p2p ms"], cells["ssm_scan ms"]) == ("0.050", "0.050", "0.030")
    assert (cells["memcpy_memset ms"], cells["norm ms"]) == ("0.005", "0.000")
    assert "### rank0_steps20-21.json: top 10 kernels (2 steps)" in text
    assert "| _chunk_scan_fwd_kernel | ssm_scan | 0.030 | 1 |" in text
    # the catch-all kinds get their own list: only element-wise and memory kernels in it
    other = text.split("### rank0_steps20-21.json: top 10 of elementwise_other and memcpy_memset (2 steps)")[1]
    other = other.split("###")[0]
    kinds = {split_row(ln)[1] for ln in other.splitlines() if ln.startswith("| ") and not ln.startswith("| kernel")}
    assert kinds and kinds <= {"elementwise_other", "memcpy_memset"}
    # the mixer's kernels, every one (here the scan's alone)
    mixer = text.split("### rank0_steps20-21.json: every kernel of ssm_scan, conv1d, norm (2 steps)")[1].split("###")[0]
    assert [split_row(ln)[:2] for ln in mixer.splitlines() if ln.startswith("| _")] == [
        ["_chunk_scan_fwd_kernel", "ssm_scan"]]
    long_row = next(ln for ln in text.splitlines() if ln.startswith("| void at::native::vectorized"))
    assert len(long_row.split("|")[1].strip()) == 80


def test_cli_steps_flag(tmp_path, capsys):
    trace = write_trace(tmp_path / "rank0_steps20-21.json.gz")
    tb.main([str(trace), "--steps", "5"])
    assert "| rank0_steps20-21.json.gz | 0.100 |" in capsys.readouterr().out


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "rank0_steps1-2.json.gz"
    with pytest.raises(SystemExit, match=f"no such trace file: {missing}"):
        tb.main([str(missing)])
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(gzip.compress(b"{not json"))
    with pytest.raises(SystemExit, match=f"cannot read {bad}"):
        tb.load_events(bad)
    cpu_only = write_trace(tmp_path / "cpu.json", EVENTS[6:])
    with pytest.raises(SystemExit, match=f"no GPU kernel events in {cpu_only}: was it traced on a GPU"):
        tb.main([str(cpu_only)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no \\*.json or \\*.json.gz traces in"):
        tb.main([str(tmp_path / "empty")])


def test_real_cpu_only_profiler_trace(tmp_path):
    """A trace torch.profiler really wrote, CPU activity only (as on a CPU run): the clear error, no crash."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.randn(16, 16) @ torch.randn(16, 16)
    trace = tmp_path / "rank0_steps1-1.json"
    prof.export_chrome_trace(str(trace))
    assert any(ev.get("name") == "aten::matmul" for ev in tb.load_events(trace))
    with pytest.raises(SystemExit, match="no GPU kernel events in .*rank0_steps1-1.json: was it traced on a"):
        tb.main([str(trace)])


def op(name, start, end, thread, ext=None):
    ev = kernel(name, start, end, thread, cat="cpu_op")
    if ext is not None:
        ev["args"] = {"External id": ext}
    return ev


def launched(name, start, end, ext):
    ev = kernel(name, start, end, 7)
    ev["args"] = {"External id": ext}
    return ev


FLIP = "void at::native::index_elementwise_kernel<128, 4, at::native::flip_kernel_impl>"
COPY = "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>"
# Forward thread 1: a flip inside the mixer's forward; autograd thread 2: a flip inside FlipBackward0, and
# a copy inside the backward of a norm. Kernels carry their launching operator's External id.
ORIGIN_EVENTS = [
    op("ProfilerStep#3", 0, 1000, 1),
    op("BiMamba2.forward", 10, 90, 1),
    op("aten::flip", 20, 30, 1, ext=11),
    op("aten::empty", 21, 22, 1, ext=12),                         # nested in the flip, not its parent
    op("autograd::engine::evaluate_function: FlipBackward0", 100, 200, 2),
    op("FlipBackward0", 101, 199, 2),
    op("aten::flip", 110, 150, 2, ext=21),
    op("autograd::engine::evaluate_function: LayerNormFnBackward", 300, 400, 2),
    op("aten::copy_", 310, 320, 2, ext=31),
    launched(FLIP, 500, 540, 11), launched(FLIP, 600, 700, 21), launched(FLIP, 700, 800, 21),
    launched(COPY, 800, 830, 31), launched(COPY, 830, 835, 99),   # 99: no operator with that id
]


def test_operator_chains_outer_to_inner():
    chains = tb.operator_chains(ORIGIN_EVENTS)
    assert chains[11] == "BiMamba2.forward > aten::flip"                    # ProfilerStep# left out
    assert chains[12] == "BiMamba2.forward > aten::flip > aten::empty"
    assert chains[21] == ("autograd::engine::evaluate_function: FlipBackward0 > FlipBackward0 > aten::flip")
    assert chains[31] == "autograd::engine::evaluate_function: LayerNormFnBackward > aten::copy_"


def test_origins_of_the_top_elementwise_kernels(tmp_path, capsys):
    r = tb.breakdown(ORIGIN_EVENTS, steps=2)
    backward_flip = "autograd::engine::evaluate_function: FlipBackward0 > FlipBackward0 > aten::flip"
    # by hand: backward flips 100 + 100 us, forward flip 40 us; copies 30 us and 5 us (unknown operator)
    assert r["origins"][:2] == [(FLIP, backward_flip, pytest.approx(0.200), 2),
                                (FLIP, "BiMamba2.forward > aten::flip", pytest.approx(0.040), 1)]
    assert (COPY, "?", pytest.approx(0.005), 1) in r["origins"]
    tb.main([str(write_trace(tmp_path / "rank0_steps1-2.json", ORIGIN_EVENTS))])
    text = capsys.readouterr().out.split("who launched the top 10")[1]
    rows = [split_row(ln) for ln in text.splitlines() if ln.startswith("| void")]
    assert [r[1:] for r in rows] == [[backward_flip, "0.100", "2"], ["BiMamba2.forward > aten::flip", "0.020", "1"],
                                     ["autograd::engine::evaluate_function: LayerNormFnBackward > aten::copy_",
                                      "0.015", "1"], ["?", "0.003", "1"]]


def test_operator_chains_of_a_real_profiler_trace(tmp_path):
    """torch.profiler's own trace: the operators under a backward carry the autograd node around them."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(8, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        x.flip(0).square().sum().backward()
    trace = tmp_path / "cpu.json"
    prof.export_chrome_trace(str(trace))
    chains = set(tb.operator_chains(tb.load_events(trace)).values())
    assert any(c.startswith("autograd::engine::evaluate_function: FlipBackward0") and c.endswith("aten::flip")
               for c in chains), chains


def runtime_call(name, start, end):
    return kernel(name, start, end, 1, cat="cuda_runtime")


def test_host_time_by_thread_operator_and_runtime_call(tmp_path, capsys):
    """By hand from ORIGIN_EVENTS over 2 steps. CPU window 10..400 us (the ProfilerStep marker is no work).
    Thread 1: BiMamba2.forward, 80 us (its flip and empty are nested, not counted again). Thread 2: two
    backward nodes, 100 us each. Runtime: 3 launches of 5 us and one 40 us synchronize."""
    events = ORIGIN_EVENTS + [runtime_call("cudaLaunchKernel", t, t + 5) for t in (20, 30, 40)] \
        + [runtime_call("cudaStreamSynchronize", 50, 90)]
    host = tb.breakdown(events, steps=2)["host"]
    assert host["window_ms"] == pytest.approx(0.390 / 2)
    assert [(t["thread"], t["operators"]) for t in host["threads"]] == [("0/2", 1.0), ("0/1", 0.5)]
    assert [t["busy_ms"] for t in host["threads"]] == pytest.approx([0.100, 0.040])
    assert [t["busy_pct"] for t in host["threads"]] == pytest.approx([100 * 200 / 390, 100 * 80 / 390])
    assert {name: (ms, n) for name, ms, n in host["operators"]} == {
        "autograd::engine::evaluate_function: FlipBackward0": pytest.approx((0.050, 0.5)),
        "autograd::engine::evaluate_function: LayerNormFnBackward": pytest.approx((0.050, 0.5)),
        "BiMamba2.forward": pytest.approx((0.040, 0.5))}
    assert host["runtime"] == [("cudaStreamSynchronize", pytest.approx(0.020), 0.5),
                               ("cudaLaunchKernel", pytest.approx(0.0075), 1.5)]
    tb.main([str(write_trace(tmp_path / "rank0_steps1-2.json", events))])
    text = capsys.readouterr().out.split("host time per step (CPU window 0.2 ms)")[1]
    assert "| 0/2 | 0.1 | 51.3 | 1 |" in text and "| cudaLaunchKernel | 0.01 | 2 |" in text


def test_host_time_of_a_real_profiler_trace(tmp_path):
    """torch.profiler's own CPU events: the backward's nodes appear as top-level operators of their thread."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(64, 64, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (x @ x).relu().sum().backward()
    trace = tmp_path / "cpu.json"
    prof.export_chrome_trace(str(trace))
    host = host_breakdown(tb.load_events(trace))
    names = [name for name, _, _ in host["operators"]]
    assert "aten::matmul" in names and any(n.startswith("autograd::engine::evaluate_function: ") for n in names)
    assert all(0 < t["busy_pct"] <= 100 for t in host["threads"]) and host["runtime"] == []
    assert host_breakdown([]) is None


def test_idle_gaps_charged_to_the_operators_that_launched_the_work_after_them(tmp_path, capsys):
    """ORIGIN_EVENTS' GPU work: 500-540, 600-700, 700-800, 800-830, 830-835 us; one gap, 540-600, ended by a
    backward flip. Two more kernels: an overlapping pair on two streams (900-1000, 950-1100) after a 65 us
    gap, then a 1,200 us one after another 100 us gap, both launched by the norm's backward copy."""
    events = ORIGIN_EVENTS + [launched(COPY, 900, 1000, 31), {**launched(COPY, 950, 1100, 31), "tid": 8},
                              launched(COPY, 1200, 1210, 31)]
    r = tb.breakdown(events, steps=2)
    norm_copy = "autograd::engine::evaluate_function: LayerNormFnBackward > aten::copy_"
    backward_flip = "autograd::engine::evaluate_function: FlipBackward0 > FlipBackward0 > aten::flip"
    assert r["idle_by_operator"] == [(norm_copy, pytest.approx(0.165), 2, pytest.approx(0.100)),
                                     (backward_flip, pytest.approx(0.060), 1, pytest.approx(0.060))]
    assert r["totals_ms"]["idle"] == pytest.approx(0.225)      # the gaps add up to the idle time
    tb.main([str(write_trace(tmp_path / "rank0_steps1-2.json", events))])
    text = capsys.readouterr().out.split("GPU idle, by the operators")[1].split("###")[0]
    rows = [split_row(ln) for ln in text.splitlines() if ln.startswith("| auto")]
    assert rows == [[norm_copy, "0.083", "2", "0.100"], [backward_flip, "0.030", "1", "0.060"]]
