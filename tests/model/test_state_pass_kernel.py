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


def test_the_cases_load_through_tma_and_through_pointers(interpreted_errors):
    """Strides of 16 bytes and up go through TMA descriptors; the 24-byte rows of a state of 12 in fp16
    through pointers (model/state_pass_kernel.tma_usable)."""
    through_tma = {case for case in CASES if interpreted_errors[case]["tma"]}
    assert "fp32, a chunk of 48 and a part" in through_tma and "fp32, headdim and state below the tile" in through_tma
    assert set(CASES) - through_tma == {"fp16, headdim and state below the tile"}


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


def test_mixer_function_hands_the_scan_output_the_kernels_states(interpreted_errors):
    got = interpreted_errors["mixer_function.output_inputs"]
    assert got["shape"] == got["want_shape"] and got["finite"] and got["first_is_zero"], got
    assert got["out_dtype"] == "torch.float32", "C's dtype"
    assert got["rel_err"] <= TOLERANCE["torch.float32"] and got["other_pieces_rel_err"] <= 1e-5, got


def compiled_shared_memory(dtype, kwargs, warps, stages, tma):
    """Shared memory of one config compiled for an H100, after checking that its loop loads x and B of the
    next chunks ahead (buffers for stages - 1 chunks): through TMA (tiles 1 x 256 x 1 x P and N) or pointers."""
    compiled = compile_state_pass(kwargs, warps, stages, dtype, tma=tma)
    p, n = kwargs["BLOCK_P"], kwargs["BLOCK_N"]
    if tma:
        buffered = set(re.findall(rf"memdesc<{stages - 1}x(1x256x1x\d+)x(?:bf16|f32)", compiled.asm["ttgir"]))
        tiles = {f"1x256x1x{p}", f"1x256x1x{n}"}
    else:
        buffered = set(re.findall(r"memdesc<\d+x(\d+x\d+)x(?:bf16|f32)", compiled.asm["ttgir"]))
        tiles = {f"{p}x256", f"256x{n}"}
    assert tiles <= buffered, f"{kwargs}, tma={tma}: the loop does not load x and B ahead ({buffered})"
    return compiled.metadata.shared


@pytest.mark.parametrize("tma", [True, False])
def test_every_autotune_config_compiles_for_an_h100_in_bf16(tma):
    from model.state_pass_kernel import _autotuned_kernel
    for config in _autotuned_kernel.configs:
        shared = compiled_shared_memory("bf16", config.kwargs, config.num_warps, config.num_stages, tma)
        assert shared <= SHARED_MEMORY_H100, f"{config}: {shared} bytes of shared memory"


@pytest.mark.parametrize("tma", [True, False])
def test_an_autotune_config_fits_an_h100_in_fp32(tma):
    """fp32 inputs need twice the shared memory per stage: the autotuner skips the configs that do not fit
    (OutOfResources), but one must."""
    from model.state_pass_kernel import _autotuned_kernel
    smallest = min(_autotuned_kernel.configs, key=lambda c: c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_N"] * c.num_stages)
    assert compiled_shared_memory("fp32", smallest.kwargs, smallest.num_warps, smallest.num_stages, tma) <= \
        SHARED_MEMORY_H100


def test_tma_cuts_the_loops_instructions():
    """The loop through TMA issues at least a fifth fewer instructions than through pointers (the per-thread
    addresses and copies): the kernel is bound by the latency of what it issues (module docstring)."""
    from bench.kernel_resources import loop_opcodes
    config = {"BLOCK_P": 64, "BLOCK_N": 64}
    through_tma, through_pointers = (loop_opcodes(compile_state_pass(config, 4, 3, tma=tma)) for tma in (True, False))
    assert len(through_tma) == len(through_pointers) == 1, "one loop over the chunks; barrier retries are not loops"
    assert through_tma[0]["LDGSTS"] < through_pointers[0]["LDGSTS"] // 4, (through_tma, through_pointers)
    assert sum(through_tma[0].values()) <= 0.8 * sum(through_pointers[0].values())


def test_the_autotuner_keys_on_shapes_and_a_size_class():
    from model.state_pass_kernel import _autotuned_kernel, size_class
    assert _autotuned_kernel.keys == ["chunk_size", "hdim", "dstate", "tuning_size"]
    assert [size_class(1, 16), size_class(1, 128), size_class(2, 512)] == [16, 128, 256]
