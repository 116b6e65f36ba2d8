"""model/norm_backward: our launch of mamba_ssm's norm backward kernels. Triton does not run here, so each
kernel is replaced by an emulator that binds the launch's arguments by the kernel's own parameter names
(mamba_ssm 2.3), checks the strides it is given, and does the kernel's row loop in float64 for every
program of the grid, writing one partial weight gradient per program as the kernel does. The launchers'
results are compared with autograd of the norm written out, so a swapped argument, a wrong stride, a grid
that misses rows or a partial buffer summed wrongly shows. bench/gpu_validate.py checks the real kernels
against float64 on a GPU."""
import math
import types

import pytest
import torch
import torch.nn.functional as F

from model import norm_backward

ADD_NORM_KERNEL_PARAMS = (
    "X", "W", "B", "Y", "DY", "DX", "DW", "DB", "DRESIDUAL", "W1", "DY1", "DX1", "DW1", "DB1", "DRESIDUAL_IN",
    "ROWSCALE", "SEEDS", "Mean", "Rstd", "stride_x_row", "stride_y_row", "stride_dy_row", "stride_dx_row",
    "stride_dres_row", "stride_dy1_row", "stride_dx1_row", "stride_dres_in_row", "M", "N", "eps", "dropout_p",
    "rows_per_program", "IS_RMS_NORM", "BLOCK_N", "HAS_DRESIDUAL", "STORE_DRESIDUAL", "HAS_BIAS", "HAS_DROPOUT")
GATED_KERNEL_PARAMS = (
    "X", "W", "B", "Z", "Y", "DY", "DX", "DW", "DB", "DZ", "Mean", "Rstd", "stride_x_row", "stride_z_row",
    "stride_y_row", "stride_dy_row", "stride_dx_row", "stride_dz_row", "stride_dw_row", "stride_db_row", "M", "N",
    "eps", "rows_per_program", "NORM_BEFORE_GATE", "IS_RMS_NORM", "BLOCK_N")
SM_COUNT = 3


class EmulatedKernel:
    """kernel[grid](*args, **kwargs) runs `body(program_ids, a)` for every program, `a` the arguments by name."""

    def __init__(self, names, body):
        self.names, self.body, self.grids = names, body, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            a = dict(zip(self.names, args))
            assert not set(a) & set(kwargs), "an argument given twice"
            a.update({k: v for k, v in kwargs.items() if k != "num_warps"})
            assert set(a) == set(self.names), f"missing or unknown arguments: {set(self.names) ^ set(a)}"
            self.grids.append((grid, kwargs.get("num_warps"), a["rows_per_program"]))
            for pid in range(grid[0]):
                for group in range(grid[1] if len(grid) > 1 else 1):
                    self.body(pid, group, a)
        return launch


def check_stride(tensor, stride):
    assert tensor is None or tensor.stride(0) == stride


def add_norm_program(pid, _group, a):
    for t, s in (("X", "stride_x_row"), ("DY", "stride_dy_row"), ("DX", "stride_dx_row"), ("Y", "stride_y_row"),
                 ("DRESIDUAL", "stride_dres_row"), ("DRESIDUAL_IN", "stride_dres_in_row")):
        check_stride(a[t], a[s])
    assert a["HAS_DRESIDUAL"] == (a["DRESIDUAL"] is not None) and a["STORE_DRESIDUAL"] == (a["DRESIDUAL_IN"] is not None)
    assert a["HAS_BIAS"] == (a["B"] is not None) and not a["HAS_DROPOUT"] and a["BLOCK_N"] >= a["N"]
    w, n = a["W"].double(), a["N"]
    dw = torch.zeros(n, dtype=torch.float64)
    db = torch.zeros(n, dtype=torch.float64)
    for row in range(pid * a["rows_per_program"], min((pid + 1) * a["rows_per_program"], a["M"])):
        x, dy, rstd = a["X"][row].double(), a["DY"][row].double(), a["Rstd"][row].double()
        xhat = x * rstd if a["IS_RMS_NORM"] else (x - a["Mean"][row].double()) * rstd
        if a["Y"] is not None:
            a["Y"][row] = xhat * w + (a["B"].double() if a["B"] is not None else 0)
        wdy = w * dy
        c1 = (xhat * wdy).sum() / n
        dx = (wdy - xhat * c1) * rstd if a["IS_RMS_NORM"] else (wdy - (xhat * c1 + wdy.sum() / n)) * rstd
        dw += dy * xhat
        db += dy
        if a["HAS_DRESIDUAL"]:
            dx = dx + a["DRESIDUAL"][row].double()
        if a["STORE_DRESIDUAL"]:
            a["DRESIDUAL_IN"][row] = dx
        a["DX"][row] = dx
    a["DW"][pid] = dw
    if a["HAS_BIAS"]:
        a["DB"][pid] = db


def gated_program(pid, group, a):
    for t, s in (("X", "stride_x_row"), ("Z", "stride_z_row"), ("Y", "stride_y_row"), ("DY", "stride_dy_row"),
                 ("DX", "stride_dx_row"), ("DZ", "stride_dz_row"), ("DW", "stride_dw_row"), ("DB", "stride_db_row")):
        check_stride(a[t], a[s])
    assert a["IS_RMS_NORM"] and not a["NORM_BEFORE_GATE"] and a["B"] is None   # the model's gated norm
    n, cols = a["N"], slice(group * a["N"], (group + 1) * a["N"])
    w = a["W"][cols].double()
    dw = torch.zeros(n, dtype=torch.float64)
    for row in range(pid * a["rows_per_program"], min((pid + 1) * a["rows_per_program"], a["M"])):
        x_og, dy, z = a["X"][row, cols].double(), a["DY"][row, cols].double(), a["Z"][row, cols].double()
        x = x_og * z * torch.sigmoid(z)
        xhat = x * a["Rstd"][group * a["M"] + row].double()
        if a["Y"] is not None:
            a["Y"][row, cols] = xhat * w
        wdy = w * dy
        dx = (wdy - xhat * (xhat * wdy).sum() / n) * a["Rstd"][group * a["M"] + row].double()
        dw += dy * xhat
        sig = torch.sigmoid(z)
        a["DZ"][row, cols] = dx * x_og * sig * (1 + z * (1 - sig))
        a["DX"][row, cols] = dx * z * sig
    a["DW"][pid, cols] = dw


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def stand_in_modules():
    """(layer_norm, layernorm_gated, ssd_combined) stand-ins with emulated kernels and recording originals."""
    calls = []

    def add_norm_original(dy, x, weight, bias, eps, mean, rstd, dresidual=None, dy1=None, weight1=None,
                          bias1=None, seeds=None, dropout_p=0.0, rowscale=None, has_residual=False, has_x1=False,
                          is_rms_norm=False, x_dtype=None, recompute_output=False):
        calls.append("add_norm original")
        return "original"

    def gated_original(dy, x, weight, bias, eps, mean, rstd, z=None, group_size=None, norm_before_gate=True,
                       is_rms_norm=False, recompute_output=False, dz=None, out=None):
        calls.append("gated original")

    triton = types.SimpleNamespace(next_power_of_2=next_power_of_2)
    layer_norm = types.SimpleNamespace(__name__="layer_norm", _layer_norm_bwd=add_norm_original, triton=triton,
                                       _layer_norm_bwd_kernel=EmulatedKernel(ADD_NORM_KERNEL_PARAMS, add_norm_program))
    gated = types.SimpleNamespace(__name__="layernorm_gated", _layer_norm_bwd=gated_original, triton=triton,
                                  _layer_norm_bwd_kernel=EmulatedKernel(GATED_KERNEL_PARAMS, gated_program))
    ssd_combined = types.SimpleNamespace(__name__="ssd_combined", _layer_norm_bwd=gated_original)
    return layer_norm, gated, ssd_combined, calls


@pytest.fixture
def modules(monkeypatch):
    monkeypatch.setattr(norm_backward, "sm_count_of", lambda device: SM_COUNT)
    layer_norm, gated, ssd_combined, calls = stand_in_modules()
    norm_backward.install(layer_norm, gated, ssd_combined)
    return layer_norm, gated, ssd_combined, calls


def rms(x, eps):
    return torch.rsqrt(x.square().mean(-1) + eps)


@pytest.mark.parametrize("rows", [1, 5, 37])
@pytest.mark.parametrize("x_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("has_residual", [True, False])
def test_add_norm_backward_matches_autograd(modules, rows, x_dtype, has_residual):
    layer_norm = modules[0]
    g = torch.Generator().manual_seed(rows)
    n, eps = 24, 1e-5
    stream = torch.randn(rows, n, generator=g)                 # residual + hidden, kept in fp32 by the model
    weight, dy = 1 + 0.2 * torch.randn(n, generator=g), torch.randn(rows, n, generator=g)
    dresidual = torch.randn(rows, n, generator=g) if has_residual else None
    dx, dw, db, dres_in, *rest = layer_norm._layer_norm_bwd(
        dy, stream, weight, None, eps, None, rms(stream, eps), dresidual, has_residual=has_residual,
        is_rms_norm=True, x_dtype=x_dtype, recompute_output=True)
    s, w = stream.double().requires_grad_(True), weight.double().requires_grad_(True)
    y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps) * w
    total = (y * dy.double()).sum() + ((s * dresidual.double()).sum() if has_residual else 0)
    want_ds, want_dw = torch.autograd.grad(total, (s, w))
    tol = 1e-2 if x_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(dx.double(), want_ds, rtol=tol, atol=tol)
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-5)
    assert db is None and rest[:3] == [None, None, None]
    torch.testing.assert_close(rest[3].double(), y.detach(), rtol=1e-5, atol=1e-5)   # the recomputed output
    if has_residual:   # the stream's gradient, in the stream's dtype
        assert dres_in.dtype == stream.dtype
        torch.testing.assert_close(dres_in.double(), want_ds, rtol=1e-5, atol=1e-5)
    (grid, _, rows_per_program), = layer_norm._layer_norm_bwd_kernel.grids
    assert grid == (min(rows, SM_COUNT * norm_backward.ADD_NORM_PROGRAMS_PER_SM),)
    assert grid[0] * rows_per_program >= rows   # every row in some program


@pytest.mark.parametrize("rows,ngroups", [(1, 1), (37, 1), (37, 2)])
def test_gated_norm_backward_matches_autograd(modules, rows, ngroups):
    gated = modules[1]
    g = torch.Generator().manual_seed(rows + ngroups)
    d, eps = 32, 1e-5
    group = d // ngroups
    x, z, dy = (torch.randn(rows, d, generator=g) for _ in range(3))
    weight = 1 + 0.2 * torch.randn(d, generator=g)
    xs = (x * F.silu(z)).view(rows, ngroups, group)
    rstd = rms(xs, eps).t().contiguous().view(-1)             # (ngroups * rows): group-major, as mamba_ssm keeps it
    dx, dw, db, dz, out = gated._layer_norm_bwd(dy, x, weight, None, eps, None, rstd, z, group_size=group,
                                                norm_before_gate=False, is_rms_norm=True, recompute_output=True)
    xd, zd, wd = (t.double().requires_grad_(True) for t in (x, z, weight))
    h = (xd * F.silu(zd)).view(rows, ngroups, group)
    y = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).view(rows, d) * wd
    want = torch.autograd.grad((y * dy.double()).sum(), (xd, zd, wd))
    for got, exp in zip((dx, dz, dw, out), want + (y.detach(),)):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)
    assert db is None
    (grid, warps, _), = gated._layer_norm_bwd_kernel.grids
    per_sm = norm_backward.GATED_NORM_PROGRAMS_PER_SM * math.ceil(4 / warps)
    assert grid == (min(rows, math.ceil(SM_COUNT * per_sm / ngroups)), ngroups)
    assert warps == norm_backward.gated_warps(next_power_of_2(group), norm_backward.GATED_NORM_WARPS)


def test_gated_norm_warps_cap():
    assert norm_backward.gated_warps(4096, 16) == 16     # d_inner 4096 at 1.3B: 16 warps (mamba_ssm: 8)
    assert norm_backward.gated_warps(4096, 8) == 8
    assert norm_backward.gated_warps(64, 16) == 1


def test_install_routes_every_caller_and_is_undone(modules):
    layer_norm, gated, ssd_combined, calls = modules
    assert ssd_combined._layer_norm_bwd is gated._layer_norm_bwd      # the fused mixer's backward too
    norm_backward.install(layer_norm, gated, ssd_combined)            # twice: still one level deep
    assert layer_norm._layer_norm_bwd.original.__name__ == "add_norm_original"
    x = torch.randn(4, 8)
    # dropout is a path the model never takes: mamba_ssm's own launch
    assert layer_norm._layer_norm_bwd(x, x, torch.ones(8), None, 1e-5, None, rms(x, 1e-5), dropout_p=0.1) == "original"
    norm_backward.uninstall(layer_norm, gated, ssd_combined)
    assert layer_norm._layer_norm_bwd.__name__ == "add_norm_original"
    assert gated._layer_norm_bwd.__name__ == ssd_combined._layer_norm_bwd.__name__ == "gated_original"
    assert calls == ["add_norm original"]


def test_install_refuses_another_signature():
    layer_norm, gated, ssd_combined, _ = stand_in_modules()
    gated._layer_norm_bwd = lambda dy, x, weight, bias, eps, mean, rstd, z=None, new_argument=None: None
    with pytest.raises(RuntimeError, match="layernorm_gated._layer_norm_bwd"):
        norm_backward.install(layer_norm, gated, ssd_combined)
    assert not hasattr(layer_norm._layer_norm_bwd, "original")        # nothing was changed


def test_bench_norm_backward_runs_every_setting(monkeypatch, tmp_path):
    """bench/norm_backward.py on the emulated kernels: every launch setting timed, compared with the
    original launch (here: ours at mamba_ssm's settings), table and JSON written; the constants restored."""
    from bench import norm_backward as bench
    layer_norm, gated, ssd_combined, _ = stand_in_modules()
    monkeypatch.setattr(norm_backward, "sm_count_of", lambda device: SM_COUNT)
    norm_backward.install(layer_norm, gated, ssd_combined)

    def as_mamba_ssm(launcher, kind):
        def launch(*args, **kwargs):
            names, old = bench.setting(kind, 1, 8 if kind == "gated" else None)
            try:
                return launcher(*args, **kwargs)
            finally:
                for n, v in zip(names, old):
                    setattr(norm_backward, n, v)
        return launch
    layer_norm._layer_norm_bwd.original = as_mamba_ssm(layer_norm._layer_norm_bwd, "add_norm")
    gated._layer_norm_bwd.original = as_mamba_ssm(gated._layer_norm_bwd, "gated")
    monkeypatch.setattr(bench.kernels, "import_skipping_package_init",
                        lambda name: {"mamba_ssm.ops.triton.layer_norm": layer_norm,
                                      "mamba_ssm.ops.triton.layernorm_gated": gated}[name])
    before = (norm_backward.ADD_NORM_PROGRAMS_PER_SM, norm_backward.GATED_NORM_PROGRAMS_PER_SM,
              norm_backward.GATED_NORM_WARPS)
    rows = bench.measure([7, 40], 24, 32, torch.device("cpu"), iters=1)
    assert (norm_backward.ADD_NORM_PROGRAMS_PER_SM, norm_backward.GATED_NORM_PROGRAMS_PER_SM,
            norm_backward.GATED_NORM_WARPS) == before
    assert len(rows) == 2 * (1 + len(bench.ADD_NORM_SETTINGS)) + 2 * (1 + len(bench.GATED_SETTINGS))
    assert all(r["rel_diff"] < 1e-6 and r["ms"] > 0 and r["gb_per_s"] > 0 for r in rows)
    grids = [g for g, _, _ in layer_norm._layer_norm_bwd_kernel.grids]
    assert {(min(40, SM_COUNT * s),) for s, _ in bench.ADD_NORM_SETTINGS} <= set(grids)   # each setting launched
    head = {"card": "cpu", "command": "x", "date": "d", "commit": "c", "torch": "t", "kernels": {}}
    md = bench.markdown(rows, head)
    assert md.count("| add_norm |") == 2 * (1 + len(bench.ADD_NORM_SETTINGS)) and "1.00x" in md
    assert bench.main(["--out", str(tmp_path)]) == 2          # no GPU here: a clear refusal, nothing written
    assert not list(tmp_path.iterdir())
