"""bench/ncu_stalls.py: a kernel's stall samples by part, from ncu's source page (a small page written here)."""
import csv
import gzip
import io

import pytest

from bench import ncu_stalls

HEADER = ["Address", "Source", ncu_stalls.SAMPLES, "# Samples", "stall_barrier", "stall_long_sb", "stall_wait",
          "stall_long_sb (Not Issued)"]
# address, SASS, (barrier, long_sb, wait) samples: a prologue, a loop with a barrier wait's retry path placed
# after the exit (a branch back into the loop from past its end), and a finish
INSTRUCTIONS = [
    (0x00, "LDG.E R2, desc[UR4][R2.64]", (0, 10, 0)),
    (0x10, "STS.128 [R4], R56", (0, 20, 0)),
    (0x20, "BAR.SYNC.DEFER_BLOCKING 0x0", (30, 0, 0)),               # loop from here
    (0x30, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R8", (0, 5, 0)),
    (0x40, "@!P0 BRA 0x90", (0, 0, 0)),
    (0x50, "FFMA R1, R2, R3, R1", (0, 0, 15)),
    (0x60, "@P1 BRA 0x20", (0, 0, 0)),                                # ... to here
    (0x70, "STG.E desc[UR4][R2.64], R1", (0, 10, 0)),
    (0x80, "EXIT", (0, 0, 0)),
    (0x90, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R8", (0, 10, 0)),   # the retry path
    (0xa0, "@!P0 BRA 0x90", (0, 0, 0)),
    (0xb0, "BRA 0x50", (0, 0, 0)),
]


def write_page(path, rows=INSTRUCTIONS, gz=False):
    text = io.StringIO()
    out = csv.writer(text)
    out.writerow(["Kernel Name", "_some_kernel", ""])
    out.writerow(HEADER)
    for address, sass, (barrier, long_sb, wait) in rows:
        out.writerow([hex(address), sass, barrier + long_sb + wait, 0, barrier, long_sb, wait, 0])
    if gz:
        path.write_bytes(gzip.compress(text.getvalue().encode()))
    else:
        path.write_text(text.getvalue())


def test_the_kernel_is_cut_at_its_loop_and_each_part_gets_its_share(tmp_path):
    write_page(tmp_path / "page.csv")
    instructions = ncu_stalls.read_source_page(tmp_path / "page.csv")
    assert [(name, (span.start, span.stop)) for name, span in ncu_stalls.parts(instructions)] == [
        ("before the first loop", (0, 2)), ("loop 1", (2, 7)), ("after the last loop", (7, 12))]
    table = ncu_stalls.stall_table(instructions, top=2)
    # 100 samples: prologue 30, loop 50 (30 barrier, 5 global memory, 15 fixed latency), the rest 20
    assert "| before the first loop | 0-1 | 30.0% | long_sb 30.0%" in table
    assert "| loop 1 | 2-6 | 50.0% | barrier 30.0%, wait 15.0%, long_sb 5.0% |" in table
    assert "| after the last loop | 7-11 | 20.0% | long_sb 20.0%" in table
    assert "| 2 | `BAR.SYNC.DEFER_BLOCKING 0x0` | 30.0% | barrier |" in table


def test_reads_a_gzipped_page_and_names_a_file_without_one(tmp_path, capsys):
    write_page(tmp_path / "page.csv.gz", gz=True)
    assert ncu_stalls.main([str(tmp_path / "page.csv.gz"), "--top", "1"]) == 0
    assert "100 stall samples" in capsys.readouterr().out
    (tmp_path / "other.csv").write_text("==PROF== nothing profiled\n")
    with pytest.raises(ValueError, match="other.csv: no ncu source page"):
        ncu_stalls.read_source_page(tmp_path / "other.csv")
    assert ncu_stalls.main([str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
