"""bench.conv_silu, model/conv_kernel.py's conv against causal-conv1d's: its inputs, table and refusal on the
CPU (the timings need a GPU)."""
import pytest
import torch

from bench import conv_silu
from bench.common import header


def test_the_input_is_the_in_proj_outputs_channel_last_slice():
    x, weight, bias = conv_silu.conv_inputs(2, 16, torch.float32, "cpu", seed=0)
    assert x.shape == (2, 16, 4352) and x.stride() == (16 * 8512, 8512, 1)
    assert weight.shape == (4352, 4) and bias.shape == (4352,)
    exact = conv_silu.float64_conv_silu(x, weight, bias)
    first = torch.nn.functional.silu(x[:, 0].double() * weight[:, -1].double() + bias.double())
    torch.testing.assert_close(exact[:, 0], first)   # the first step sees only its own input, by the last tap


def test_table_and_refusal_without_a_gpu(tmp_path, capsys):
    rows = [{"shape": "1x4096", "launch": "causal-conv1d", "config": "2.90 TB/s", "ms": 0.2, "rel_diff": 0.0},
            {"shape": "1x4096", "launch": "ours", "config": "32x128, 4w (default), 3.87 TB/s", "ms": 0.15,
             "rel_diff": 3e-3}]
    text = conv_silu.markdown(rows, header(torch.device("cpu"), "bench.conv_silu", dtype="bf16"))
    assert "| 1x4096 | ours | 32x128, 4w (default), 3.87 TB/s | 0.150 | 1.33x | 3.0e-03 |" in text
    assert conv_silu.main(["--out", str(tmp_path)]) == 2 and "needs a GPU" in capsys.readouterr().out


def test_configs_are_parsed_and_bad_ones_named():
    assert conv_silu.parse_config("64:128:4") == {"BLOCK_L": 64, "BLOCK_C": 128, "num_warps": 4}
    with pytest.raises(SystemExit, match="BLOCK_L:BLOCK_C:warps"):
        conv_silu.parse_config("64:128")
