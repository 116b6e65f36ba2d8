"""bench.kernel_resources on the CPU: the occupancy arithmetic against hand-worked SMs, and a real sm_90 compile
read back from its binary."""
import json

import pytest

from bench import kernel_resources


@pytest.mark.parametrize("registers, shared, warps, want", [
    # 128 x 32 = 4,096 registers a warp: 4 programs of 4 warps; 233,472 / (66,048 + 1,024) = 3.48: shared memory
    (128, 66048, 4, (3, 12, "shared memory")),
    # 255 rounds up to 256 a thread, 8,192 a warp: 65,536 / 16,384 = 4 programs; shared memory would allow 5
    (255, 40448, 2, (4, 8, "registers")),
    # 1 warp of 32 registers, no shared memory: 32 programs (the SM's limit) before registers (64) or warps (64)
    (32, 0, 1, (32, 32, "programs")),
    # 16 warps: 4 programs by warps; 64 x 32 x 16 = 32,768 registers: 2 programs; 100 KiB: 2 programs
    (64, 100 * 1024, 16, (2, 32, "registers and shared memory")),
])
def test_resident_programs_per_sm(registers, shared, warps, want):
    got = kernel_resources.resident_programs(registers, shared, warps)
    assert (got["programs_per_sm"], got["warps_per_sm"], got["limited_by"]) == want


def test_a_compiled_config_reports_its_registers_and_shared_memory():
    compiled = kernel_resources.compile_scan_out({"BLOCK_M": 64, "BLOCK_K": 32, "HEADS": 1}, 4, 3)
    registers, stack = kernel_resources.registers_and_spills(compiled)
    assert 32 <= registers <= 255 and stack >= 0
    row = kernel_resources.usage_row("scan_out", "64x32, 4w 3s", "list", compiled, 4)
    assert row["shared_KiB"] * 1024 == compiled.metadata.shared > 0
    assert 1 <= row["programs_per_sm"] <= 16 and row["warps_per_sm"] == 4 * row["programs_per_sm"]
    assert 100 < int(row["loop_instructions"]) < 400, "the output kernel's one loop, over the key blocks"
    gated = kernel_resources.usage_row("scan_out, gated", "64x32, 4w 3s", "list", kernel_resources.compile_scan_out(
        {"BLOCK_M": 64, "BLOCK_K": 32, "HEADS": 1}, 4, 3, gated=True), 4)
    assert 200 < row["other_instructions"] < gated["other_instructions"], "the gate runs once per program, after the loops"


def test_the_state_kernel_has_one_loop_over_the_chunks():
    compiled = kernel_resources.compile_state_pass({"BLOCK_P": 64, "BLOCK_N": 64}, 4, 3)
    (opcodes,) = kernel_resources.loop_opcodes(compiled)
    assert opcodes["HGMMA"] > 0 and opcodes["BRA"] >= 1, "the chunk's product, and the branch back"


def test_main_tables_every_row(tmp_path, monkeypatch):
    rows = [{"kernel": "scan_out", "config": "64x32, 4w 3s", "source": "list", "registers": 128, "stack_bytes": 0,
             "shared_KiB": 64.5, **kernel_resources.resident_programs(128, 66048, 4), "loop_instructions": "149 / 228",
             "other_instructions": 1480}]
    seen = []
    monkeypatch.setattr(kernel_resources, "config_rows", lambda extra, state: seen.append((extra, state)) or rows)
    assert kernel_resources.main(["--extra-configs", "64x32:4:2:2", "--extra-state-configs", "64x32:8:2",
                                  "--out", str(tmp_path)]) == 0
    assert seen == [([{"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "HEADS": 2}],
                     [{"BLOCK_P": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}])]
    assert json.loads((tmp_path / "kernel_resources.json").read_text())["rows"] == rows
    md = (tmp_path / "kernel_resources.md").read_text()
    assert "| scan_out | 64x32, 4w 3s | list | 128 | 0 | 64.5 | 3 | 12 | shared memory |" in md


def test_a_register_limit_reaches_the_binary():
    """64x32, 4 warps, 2 stages with the gate asks for about 166 registers; capped at 112 it gets at most 112."""
    free = kernel_resources.compile_scan_out({"BLOCK_M": 64, "BLOCK_K": 32, "HEADS": 1}, 4, 2, gated=True)
    capped = kernel_resources.compile_scan_out({"BLOCK_M": 64, "BLOCK_K": 32, "HEADS": 1}, 4, 2, gated=True,
                                               maxnreg=112)
    assert kernel_resources.registers_and_spills(free)[0] > 112 >= kernel_resources.registers_and_spills(capped)[0]


def test_the_asynchronous_walk_issues_three_products_before_it_waits():
    """model/chunk_walk_async.py at the 1.3B shapes (P block 32): in the chunk's loop, the three products that
    need nothing of each other are issued, then waited for one at a time (at most 2, 1, 0 in flight), and the
    weighted pairs' product is the only one issued after a wait. A wait for all before a product (ptxas does
    that where an in-flight product's registers are written) would add a fourth."""
    pytest.importorskip("triton.experimental.gluon")
    compiled = kernel_resources.compile_walk_async({"CHUNK": 64, "BLOCK_P": 32})
    registers, stack = kernel_resources.registers_and_spills(compiled)
    assert registers <= 255 and stack == 0
    instructions = kernel_resources.sass_instructions(compiled)
    (body,) = kernel_resources.loop_bodies(instructions)
    loop = [instructions[i][1] for i in body]
    waits = [text for text in loop if text.startswith("WARPGROUP.DEPBAR")]
    assert [w.split(",")[-1].strip() for w in waits] == ["0x2", "0x1", "0x0"]
    first_wait = loop.index(waits[0])
    products = [i for i, text in enumerate(loop) if text.startswith("HGMMA")]
    # 64x64 pairs over a state of 128 (8 steps of 16), then C state and the update: 8 + 8 + 8
    assert sum(i < first_wait for i in products) == 24 and sum(i > first_wait for i in products) == 4
