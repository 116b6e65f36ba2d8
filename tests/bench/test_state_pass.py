"""bench.state_pass, the states entering the scan's chunks: its inputs and table on the CPU (the timing needs a
GPU and mamba_ssm's kernels)."""
import torch

from bench import state_pass
from model import mixer_function
from model.state_pass_kernel import states_entering_chunks_reference
from tests.model import ssd_emulation


def test_state_pass_inputs_are_the_scans_own():
    """The bench's inputs come from the scan's own cumsum launcher; on the float64 stand-ins of mamba_ssm's
    launchers the two launchers' states equal the plain-torch formula the float64 rows check against."""
    emulation = ssd_emulation.namespace()
    args = state_pass.state_inputs(emulation, 2, 512, torch.float64, "cpu", seed=0)
    args = tuple(t.double() for t in args)
    _, _, dt, dA_cumsum = args
    assert dt.shape == dA_cumsum.shape == (2, 64, 2, state_pass.CHUNK) and (dt >= 0).all()
    got = mixer_function.states_entering_chunks(emulation, *args, state_pass.CHUNK, torch.float64)
    torch.testing.assert_close(got, states_entering_chunks_reference(*args, torch.float64), rtol=1e-9, atol=1e-10)


def test_extra_configs_are_parsed_and_bad_ones_named():
    import pytest
    config = state_pass.parse_config("64x32:8:2")
    assert config == {"BLOCK_P": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    assert state_pass.config_name(config) == "64x32, 8w 2s"
    for bad in ("64x32:8", "64:8:2", "64x32:8:2:1", "64xN:8:2"):
        with pytest.raises(SystemExit, match="BLOCK_PxBLOCK_N:warps:stages"):
            state_pass.parse_config(bad)


def test_state_pass_table_and_refusal_without_a_gpu(tmp_path, capsys):
    rows = [{"shape": "1x4096", "launch": "ours", "config": "float64 check", "ms": None, "rel_diff": 4e-3},
            {"shape": "1x32768", "launch": "mamba_ssm", "config": "chunk states, then passing", "ms": 0.42,
             "rel_diff": 0.0},
            {"shape": "1x32768", "launch": "ours", "config": "64x64, 8w 2s", "ms": 0.21, "rel_diff": 2e-3}]
    head = {"card": "H100", "command": "c", "date": "d", "commit": "x", "torch": "t", "kernels": {}}
    text = state_pass.markdown(rows, head)
    assert "| 1x32768 | ours | 64x64, 8w 2s | 0.210 | 2.00x | 2.0e-03 |" in text
    assert "| 1x4096 | ours | float64 check | - | - | 4.0e-03 |" in text
    assert state_pass.main(["--out", str(tmp_path)]) == 2 and "needs a GPU" in capsys.readouterr().out
