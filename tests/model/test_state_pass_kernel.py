"""model/state_pass_kernel.py: the states entering each chunk of the scan, a Triton kernel.

No GPU here: the kernel runs under Triton's interpreter against the float64 stand-ins of mamba_ssm's two
launchers (tests/model/state_pass_kernel_cases.py, in a process of its own since the interpreter is chosen
when Triton is imported), and every autotune config is compiled for an H100 (sm_90) down to the binary,
which the interpreter does not do. bench/inference_checks.py compares the mixer that uses it with float64
on a GPU in bfloat16."""
import re

import pytest

from bench.kernel_resources import SHARED_MEMORY_H100, compile_state_pass
from tests.model.state_pass_kernel_cases import CASES
from tests.model.triton_on_cpu import INTERPRETER_TOLERANCE as TOLERANCE
from tests.model.triton_on_cpu import interpreted


@pytest.fixture(scope="module")
def interpreted_errors():
    return interpreted("tests.model.state_pass_kernel_cases")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_float64_launchers(interpreted_errors, case):
    got = interpreted_errors[case]
    assert got["shape"] == got["want_shape"] and got["finite"] and got["first_is_zero"], got
    assert got["out_dtype"] == str(CASES[case][8]), got
    assert got["rel_err"] <= TOLERANCE[got["dtype"]], got


@pytest.mark.parametrize("case", list(CASES))
def test_the_plain_torch_reference_matches_the_float64_launchers(case):
    import torch

    from model.state_pass_kernel import states_entering_chunks_reference
    from tests.model.state_pass_kernel_cases import float64_states, inputs
    *shape, dtype, out_dtype, decay, _ = CASES[case]
    args = inputs(*shape, dtype, decay, seed=99)
    want = float64_states(*args)
    torch.testing.assert_close(states_entering_chunks_reference(*(a.double() for a in args), torch.float64), want,
                               rtol=1e-12, atol=1e-12)
    got = states_entering_chunks_reference(*args, out_dtype)              # fp32 compute, out_dtype result
    assert got.dtype == out_dtype and ((got.double() - want).abs().max() <= 1e-3 * want.abs().max().clamp_min(1e-30))


def test_the_cases_run_the_loop_with_and_without_masks():
    """whole_tiles picks the loop: the cases above must run both, and the 1.3B shapes the unmasked one."""
    from model.state_pass_kernel import whole_tiles
    whole = {name: whole_tiles(case[6], case[3], case[5], {"BLOCK_P": case[10][0], "BLOCK_N": case[10][1]})
             for name, case in CASES.items()}
    assert set(whole.values()) == {True, False}, whole
    assert whole_tiles(256, 64, 128, None)                                  # any tile of the autotune list
    assert not whole_tiles(256, 48, 128, None) and not whole_tiles(256, 64, 96, None)   # 48 % 64, 96 % 64
    assert not whole_tiles(100, 64, 128, None) and not whole_tiles(8, 64, 128, None)    # the chunk's tile pads


def test_mixer_function_hands_the_scan_output_the_kernels_states(interpreted_errors):
    got = interpreted_errors["mixer_function.output_inputs"]
    assert got["shape"] == got["want_shape"] and got["finite"] and got["first_is_zero"], got
    assert got["out_dtype"] == "torch.float32", "C's dtype"
    assert got["rel_err"] <= TOLERANCE["torch.float32"] and got["other_pieces_rel_err"] <= 1e-5, got


def compiled_shared_memory(dtype, kwargs, warps, stages):
    compiled = compile_state_pass(kwargs, warps, stages, dtype)
    buffered = set(re.findall(r"memdesc<\d+x(\d+x\d+)x(?:bf16|f32)", compiled.asm["ttgir"]))
    tiles = {f"{kwargs['BLOCK_P']}x256", f"256x{kwargs['BLOCK_N']}"}     # x and B of a whole chunk
    assert tiles <= buffered, f"{kwargs}: the loop does not load x and B ahead ({buffered})"
    return compiled.metadata.shared


def test_every_autotune_config_compiles_for_an_h100_in_bf16():
    from model.state_pass_kernel import _autotuned_kernel
    for config in _autotuned_kernel.configs:
        shared = compiled_shared_memory("bf16", config.kwargs, config.num_warps, config.num_stages)
        assert shared <= SHARED_MEMORY_H100, f"{config}: {shared} bytes of shared memory"


def test_an_autotune_config_fits_an_h100_in_fp32():
    """fp32 inputs need twice the shared memory per stage: the autotuner skips the configs that do not fit
    (OutOfResources), but one must."""
    from model.state_pass_kernel import _autotuned_kernel
    smallest = min(_autotuned_kernel.configs, key=lambda c: c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_N"] * c.num_stages)
    assert compiled_shared_memory("fp32", smallest.kwargs, smallest.num_warps, smallest.num_stages) <= \
        SHARED_MEMORY_H100


def test_the_autotuner_keys_on_shapes_and_a_size_class():
    from model.state_pass_kernel import _autotuned_kernel, size_class
    assert _autotuned_kernel.keys == ["chunk_size", "hdim", "dstate", "tuning_size"]
    assert [size_class(1, 16), size_class(1, 128), size_class(2, 512)] == [16, 128, 256]
