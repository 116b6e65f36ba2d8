"""bench.scan_walk, the scan in one kernel against the three it replaces: its float64 reference, configs and
table on the CPU (the timing needs a GPU and mamba_ssm's kernels)."""
import pytest
import torch
import torch.nn.functional as F

from bench import scan_walk
from model.ssd import ssd_sequential


def test_the_float64_reference_is_the_normed_gated_scan():
    """float64_normed: RMSNorm(scan(...) * silu(z)) * weight over all of a row's channels, as the mixer's one
    norm group computes it (checked against the scan step by step)."""
    g = torch.Generator().manual_seed(0)
    b, l, h, p, n = 1, 40, 2, 4, 8
    x, z = torch.randn(b, l, h, p, generator=g), torch.randn(b, l, h, p, generator=g)
    dt, B, C = torch.randn(b, l, h, generator=g), torch.randn(b, l, 1, n, generator=g), torch.randn(b, l, 1, n, generator=g)
    A, D, dt_bias = -torch.rand(h, generator=g) - 0.5, torch.randn(h, generator=g), torch.randn(h, generator=g)
    weight = torch.rand(h * p, generator=g) + 0.5
    y = ssd_sequential(x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(), dt_bias.double(),
                       dt_softplus=True)
    gated = (y * F.silu(z.double())).flatten(2)
    want = gated * torch.rsqrt(gated.square().mean(-1, keepdim=True) + scan_walk.EPS) * weight.double()
    got = scan_walk.float64_normed((x, dt, A, B, C, D, dt_bias), z, weight)
    torch.testing.assert_close(got, want.flatten(0, 1), rtol=1e-9, atol=1e-9)
    # row_scaled gives the same (in fp32, as it compares the kernels' outputs) from a gated output and its sums
    # in blocks of channels
    sums = gated.unflatten(-1, (2 * h, -1)).square().sum(-1)
    got = scan_walk.row_scaled((gated * weight.double()).unflatten(-1, (h, p)), sums, weight)
    torch.testing.assert_close(got.double(), want.flatten(0, 1), rtol=1e-6, atol=1e-6)


def test_extra_configs_are_parsed_and_bad_ones_named():
    config = scan_walk.parse_config("64:32:4:3")
    assert scan_walk.config_name(config) == "chunk 64, P block 32, 4w 3s"
    with pytest.raises(SystemExit, match="CHUNK:BLOCK_P:warps:stages"):
        scan_walk.parse_config("64:32:4")


def test_table_and_refusal_without_a_gpu(tmp_path, capsys):
    rows = [{"shape": "1x4096", "launch": "walk", "config": "float64 check", "ms": None, "rel_diff": 3e-3},
            {"shape": "2x32768", "launch": "now", "config": "", "ms": 1.8, "rel_diff": 0.0},
            {"shape": "2x32768", "launch": "walk", "config": "chunk 64, P block 32, 4w 3s (default)", "ms": 1.2,
             "rel_diff": 3e-3},
            {"shape": "2x32768", "launch": "walk, asynchronous", "config": "chunk 64, P block 32, 4w 3s (default)",
             "ms": 1.125, "rel_diff": 3e-3}]
    head = {"card": "H200", "command": "c", "date": "d", "commit": "x", "torch": "t", "kernels": {}}
    text = scan_walk.markdown(rows, head)
    assert "| 2x32768 | walk | chunk 64, P block 32, 4w 3s (default) | 1.200 | 1.50x | 3.0e-03 |" in text
    assert "| 1x4096 | walk | float64 check | - | - | 3.0e-03 |" in text
    assert "| 2x32768 | walk, asynchronous | chunk 64, P block 32, 4w 3s (default) | 1.125 | 1.60x | 3.0e-03 |" in text
    assert scan_walk.main(["--out", str(tmp_path)]) == 2 and "needs a GPU" in capsys.readouterr().out
