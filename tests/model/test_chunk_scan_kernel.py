"""model/chunk_scan_kernel.py: the scan's output from its chunk states, a Triton kernel.

No GPU here: the kernel runs under Triton's interpreter against the float64 stand-in of mamba_ssm's
launcher (tests/model/chunk_scan_kernel_cases.py, in a process of its own since the interpreter is chosen
when Triton is imported), and every autotune config is compiled for an H100 (sm_90) down to the binary,
which the interpreter does not do. bench/model_checks.py compares it with mamba_ssm's launcher and float64
on a GPU in bfloat16. Run as a module (under the interpreter, by interpreted_errors) it prints the errors of
the factored cases below."""
import functools
import inspect

import pytest
import torch

from tests.model.chunk_scan_kernel_cases import CASES, GATED_CASES
from tests.model.triton_on_cpu import INTERPRETER_TOLERANCE as TOLERANCE
from tests.model.triton_on_cpu import SHARED_MEMORY_H100, compile_for_h100, interpreted

# chunk_scan_kernel_cases' cases again with the past key blocks' decay factored (FACTORED 1; the same seeds,
# so the same inputs), and cases that strain it: dA down past -200 within a chunk (the factors underflow) and
# a last chunk of 40 positions, whose row blocks from 48 on lie wholly past its end (ref reads 0 there: its
# keys' exponents, dA below -100, would pass fp32's range but for the clamp). Every case has dt = 0 at every
# seventh position.
STEEP = {"fp32, factored, steep decay, row blocks past a part chunk's end":
         (1, 104, 2, 16, 1, 16, 64, torch.float32, False, 12.0, (16, 16)),
         "fp16, factored, steep decay, two heads per program, 2 groups, a part chunk":
         (2, 104, 4, 16, 2, 16, 64, torch.float16, True, 60.0, (16, 16, 2))}
GATED_STEEP = {"gated, fp32, factored, steep decay, two heads per program, a part chunk":
               (1, 104, 4, 16, 1, 16, 64, torch.float32, False, 12.0, (16, 16, 2))}
FACTORED_CASES = {f"{name}, factored": case for name, case in CASES.items()} | STEEP
FACTORED_GATED_CASES = {f"{name}, factored": case for name, case in GATED_CASES.items()} | GATED_STEEP


@pytest.fixture(scope="module")
def interpreted_errors():
    return interpreted("tests.model.chunk_scan_kernel_cases") | interpreted("tests.model.test_chunk_scan_kernel")


@pytest.mark.parametrize("case", list(CASES | FACTORED_CASES))
def test_matches_float64(interpreted_errors, case):
    got = interpreted_errors[case]
    b, l, h, p, *_, dtype = (CASES | FACTORED_CASES)[case][:8]
    assert got["shape"] == [b, l, h, p] and got["dtype"] == str(dtype)
    assert got["finite"], "a masked or zero-step weight became inf or nan"
    assert got["rel_err"] <= TOLERANCE[got["dtype"]], got


@pytest.mark.parametrize("case", list(GATED_CASES | FACTORED_GATED_CASES))
def test_gated_output_and_sums_of_squares_match_float64(interpreted_errors, case):
    """y * silu(z) * weight and the sum over each head's channels of (y * silu(z))^2: a gate, weight or sum
    over the wrong channels, or a sum taken after the weight, fails."""
    got = interpreted_errors[case]
    b, l, h, p, *_, dtype = (GATED_CASES | FACTORED_GATED_CASES)[case][:8]
    assert got["shape"] == [b, l, h, p] and got["dtype"] == str(dtype) and got["finite"]
    assert got["sumsq_shape"] == [b, l, h] and got["sumsq_dtype"] == "torch.float32"
    assert got["rel_err"] <= TOLERANCE[got["dtype"]], got
    assert got["sumsq_rel_err"] <= TOLERANCE[got["dtype"]], got


def test_the_steep_factored_cases_decay_past_minus_200_with_row_blocks_past_the_end():
    from tests.model.chunk_scan_kernel_cases import inputs

    for table, steep in ((FACTORED_CASES, STEEP), (FACTORED_GATED_CASES, GATED_STEEP)):
        for name in steep:
            *shape, (block_m, *_) = table[name]
            dA_cumsum = inputs(*shape, seed=list(table).index(name))[3]     # the seed chunk_scan_kernel_cases uses
            last_len = shape[1] - (dA_cumsum.shape[2] - 1) * shape[6]
            assert dA_cumsum.min() < -200 and dA_cumsum[:, :, -1, :last_len].min() < -100, name
            assert last_len < shape[6] - block_m, f"{name}: no row block wholly past the last chunk's end"


# a config outside the autotune list that bench.scan_output measures (--extra-configs)
EXTRA_CONFIGS = [({"BLOCK_M": 128, "BLOCK_K": 32, "HEADS": 2, "FACTORED": 0}, 8, 3)]
FACTORED_CONFIG = {"BLOCK_M": 64, "BLOCK_K": 32, "HEADS": 2}      # with 4 warps, 3 stages: 64x32:4:3:2:f


@functools.cache
def compiled_for_an_h100(kwargs: tuple, warps: int, stages: int, dtype: str, gated: bool):
    """_chunk_scan_out_kernel for sm_90 with the launch config's constexprs `kwargs` (name, value pairs)."""
    from model.chunk_scan_kernel import FLAGS, _chunk_scan_out_kernel

    pointers = {name: "*fp32" for name in ("cb_ptr", "dt_ptr", "dA_ptr", "D_ptr", "norm_weight_ptr", "sumsq_ptr")}
    pointers |= {name: f"*{dtype}" for name in ("x_ptr", "out_ptr", "C_ptr", "states_ptr", "z_ptr")}
    constants = dict(HAS_D=True, D_HAS_HDIM=False, HAS_Z=gated, BLOCK_P=64, BLOCK_N=128,
                     **dict.fromkeys(FLAGS.values(), 0) | dict(kwargs))
    return compile_for_h100(_chunk_scan_out_kernel, pointers, constants, warps, stages,
                            unit_strides=("s_cb_k", "s_x_p", "s_o_p", "s_dt_q", "s_dA_q", "s_C_n", "s_st_n", "s_D_h",
                                          "s_z_p", "s_ss_h"),
                            not_multiples_of_16=("batch", "tuning_size"))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_autotune_config_compiles_for_an_h100(dtype, gated):
    from model.chunk_scan_kernel import _autotuned_kernel

    configs = [(c.kwargs, c.num_warps, c.num_stages) for c in _autotuned_kernel.configs] + EXTRA_CONFIGS
    for kwargs, warps, stages in configs:
        compiled = compiled_for_an_h100(tuple(kwargs.items()), warps, stages, dtype, gated)
        assert compiled.metadata.shared <= SHARED_MEMORY_H100, f"{kwargs}: more shared memory than an H100 has"


@pytest.mark.parametrize("gated", [False, True])
def test_a_factored_config_compiles_for_an_h100_in_no_more_shared_memory(gated):
    """The factored decay (64x32:4:3:2:f, bf16) against the same config without it (in the autotune list):
    its scaled x tiles and CB tiles in bf16 take no more shared memory than the weights do."""
    shared = [compiled_for_an_h100(tuple({**FACTORED_CONFIG, "FACTORED": f}.items()), 4, 3, "bf16", gated).metadata.shared
              for f in (0, 1)]
    assert shared[1] <= shared[0] <= SHARED_MEMORY_H100, shared


def test_the_autotuner_tries_two_heads_per_program_only_where_a_group_pairs_them():
    from model.chunk_scan_kernel import _autotuned_kernel, _configs_for_the_group

    configs = _autotuned_kernel.configs
    assert {c.kwargs["HEADS"] for c in configs} == {1, 2}
    assert {c.kwargs["FACTORED"] for c in configs} == {0}, "the factored decay is unmeasured on a GPU"
    kept_for_odd = _configs_for_the_group(configs, {"heads_per_group": 3})
    assert kept_for_odd and all(c.kwargs["HEADS"] == 1 for c in kept_for_odd)
    assert _configs_for_the_group(configs, {"heads_per_group": 64}) == configs


def test_the_autotuner_keys_on_a_size_class():
    from model.chunk_scan_kernel import _autotuned_kernel, size_class

    assert "tuning_size" in _autotuned_kernel.keys
    # 1 x 4K, 1 x 32K, 2 x 32K, 1 x 128K and 8 x 2K tokens in chunks of 256
    assert [size_class(b, c) for b, c in ((1, 16), (1, 128), (2, 128), (1, 512), (8, 8), (3, 5))] == \
        [16, 128, 256, 256, 64, 16]


def test_takes_the_arguments_of_mamba_ssms_launcher():
    from model import mixer_function
    from model.chunk_scan_kernel import chunk_scan_out

    expected = [n for n in mixer_function.LAUNCHERS["_chunk_scan_fwd"] if n not in ("z", "seq_idx")]
    assert list(inspect.signature(chunk_scan_out).parameters)[:len(expected)] == expected


def test_refuses_a_grid_too_tall():
    from model.chunk_scan_kernel import chunk_scan_out

    b, c, q = 65536, 1, 16
    x = torch.empty(b, q, 1, 16)
    dt = torch.empty(b, 1, c, q)
    with pytest.raises(AssertionError, match="grid"):
        chunk_scan_out(torch.empty(b, c, 1, q, q), x, dt, dt, torch.empty(b, q, 1, 16), torch.empty(b, c, 1, 16, 16))


def test_two_heads_per_program_need_an_even_group():
    from model.chunk_scan_kernel import chunk_scan_out

    b, c, q, h = 1, 1, 16, 3
    x = torch.empty(b, q, h, 16)
    dt = torch.empty(b, h, c, q)
    with pytest.raises(AssertionError, match="HEADS=2"):
        chunk_scan_out(torch.empty(b, c, 1, q, q), x, dt, dt, torch.empty(b, q, 1, 16), torch.empty(b, c, h, 16, 16),
                       config={"BLOCK_M": 16, "BLOCK_K": 16, "HEADS": 2})


def test_a_launch_config_from_the_environment(monkeypatch):
    """chunk_scan_out's config: the one given, else $DIFFUMAMBA_SCAN_OUT_CONFIG's, else the autotuner's (None);
    a bad value names the variable."""
    from model.chunk_scan_kernel import CONFIG_ENV, chosen_config

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert chosen_config(None) is None
    assert chosen_config({"BLOCK_M": 64, "BLOCK_K": 32}) == {"BLOCK_M": 64, "BLOCK_K": 32, "HEADS": 1, "FACTORED": 0}
    monkeypatch.setenv(CONFIG_ENV, "64x32:4:3:2")
    assert chosen_config(None) == {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3, "HEADS": 2, "FACTORED": 0}
    monkeypatch.setenv(CONFIG_ENV, "64x32:4:3:2:f")
    assert chosen_config(None)["FACTORED"] == 1
    assert chosen_config({"BLOCK_M": 32, "BLOCK_K": 32})["BLOCK_M"] == 32, "a config given wins"
    monkeypatch.setenv(CONFIG_ENV, "64x32")
    with pytest.raises(ValueError, match=CONFIG_ENV):
        chosen_config(None)


def test_parse_config_reads_heads_and_the_factored_flag():
    from model.chunk_scan_kernel import parse_config

    assert parse_config("128x64:8:3") == {"BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "HEADS": 1,
                                          "FACTORED": 0}
    assert parse_config("64x32:4:3:2:f") == {**parse_config("64x32:4:3:2"), "FACTORED": 1}
    for bad, why in (("64x32:4:3:f", "heads 1 or 2"), ("64x32:4:3:2:x", "letters f at most once"),
                     ("64x32:4:3:2:ff", "letters f at most once"), ("64x32:4:3:2:f:f", r"heads 1 or 2\[:flags\]"),
                     ("64x128:4:3:2:f", "must divide")):
        with pytest.raises(ValueError, match=why):
            parse_config(bad)


if __name__ == "__main__":   # interpreted_errors' second run: chunk_scan_kernel_cases' on the factored cases
    from tests.model import chunk_scan_kernel_cases as cases

    unfactored = cases.launch_config
    cases.CASES, cases.GATED_CASES = FACTORED_CASES, FACTORED_GATED_CASES
    cases.launch_config = lambda blocks: {**unfactored(blocks), "FACTORED": 1}
    cases.main()
