"""bench.scan_output, the scan's output kernel against mamba_ssm's: its inputs and table on the CPU (the
timing needs a GPU and mamba_ssm's kernels)."""
import torch

from bench import scan_output
from model import ssd
from tests.model import ssd_emulation


def test_scan_output_inputs_are_the_scans_own():
    """bench.scan_output builds the output kernel's inputs with the scan's launchers: on the float64
    stand-ins of mamba_ssm's launchers they give model.ssd's chunked scan."""
    raw = scan_output.scan_inputs(2, 512, torch.float64, "cpu", seed=0, heads=4, headdim=8, d_state=16)
    raw = tuple(t.double() for t in raw)          # dt, A, D and dt_bias come in fp32, as the model keeps them
    y, _ = ssd_emulation._chunk_scan_fwd(*scan_output.output_inputs(ssd_emulation.namespace(), *raw))
    want = ssd.ssd_chunked(*raw[:5], 256, D=raw[5], dt_bias=raw[6], dt_softplus=True)
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-10)


def test_scan_output_table_and_refusal_without_a_gpu(tmp_path, capsys):
    rows = [{"shape": "1x4096", "launch": "mamba_ssm", "config": "float64 check", "ms": None, "rel_diff": 4e-3},
            {"shape": "1x32768", "launch": "mamba_ssm", "config": "", "ms": 0.96, "rel_diff": 0.0},
            {"shape": "1x32768", "launch": "ours", "config": "64x32, 4w 3s", "ms": 0.77, "rel_diff": 2e-3}]
    head = {"card": "H100", "command": "c", "date": "d", "commit": "x", "torch": "t", "kernels": {}}
    text = scan_output.markdown(rows, head)
    assert "| 1x32768 | ours | 64x32, 4w 3s | 0.770 | 1.25x | 2.0e-03 |" in text
    assert "| 1x4096 | mamba_ssm | float64 check | - | - | 4.0e-03 |" in text
    assert scan_output.main(["--out", str(tmp_path)]) == 2 and "needs a GPU" in capsys.readouterr().out


def test_extra_configs_are_parsed_and_bad_ones_named():
    import pytest
    assert scan_output.parse_config("128x64:8:3") == {"BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
                                                      "HEADS": 1}
    assert scan_output.parse_config("64x32:4:3:2")["HEADS"] == 2
    assert scan_output.config_name(scan_output.parse_config("64x32:4:3:2")) == "64x32, 4w 3s, 2 heads"
    assert scan_output.config_name(scan_output.parse_config("64x32:4:3")) == "64x32, 4w 3s"
    assert scan_output.parse_config("64x32:4:2:1:128") == {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4,
                                                           "num_stages": 2, "HEADS": 1, "maxnreg": 128}
    assert scan_output.config_name(scan_output.parse_config("64x32:4:2:1:128")) == "64x32, 4w 2s, <= 128 registers"
    for bad, why in (("128x64:8", "BLOCK_MxBLOCK_K:warps:stages"), ("64x128:4:2", "must divide"),
                     ("64x32:4:3:4", "heads 1 or 2"), ("64x32:4:2:1:x", "registers"), ("64x32:4:2:1:300", "24..255"),
                     ("64x32:4:2:1:128:2", "heads 1 or 2"), ("64x32x32:4:2", "BLOCK_MxBLOCK_K:warps:stages")):
        with pytest.raises(SystemExit, match=why):
            scan_output.parse_config(bad)


def test_an_autotune_config_with_a_register_limit_keeps_it():
    import triton
    config = triton.Config({"BLOCK_M": 64, "BLOCK_K": 32, "HEADS": 1}, num_warps=4, num_stages=2, maxnreg=128)
    assert scan_output.as_launch_config(config) == scan_output.parse_config("64x32:4:2:1:128")
    config = triton.Config({"BLOCK_M": 64, "BLOCK_K": 32, "HEADS": 1}, num_warps=4, num_stages=2)
    assert scan_output.as_launch_config(config) == scan_output.parse_config("64x32:4:2")
