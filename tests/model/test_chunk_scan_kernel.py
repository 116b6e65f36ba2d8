"""model/chunk_scan_kernel.py: the scan's output from its chunk states, a Triton kernel.

No GPU here: the kernel runs under Triton's interpreter against the float64 stand-in of mamba_ssm's
launcher (tests/model/chunk_scan_kernel_cases.py, in a process of its own since the interpreter is chosen
when Triton is imported), and every autotune config is compiled for an H100 (sm_90) down to the binary,
which the interpreter does not do. bench/model_checks.py compares it with mamba_ssm's launcher and float64
on a GPU in bfloat16."""
import inspect
import re

import pytest
import torch

from bench.kernel_resources import SHARED_MEMORY_H100, compile_scan_out
from tests.model.chunk_scan_kernel_cases import CASES, GATED_CASES
from tests.model.triton_on_cpu import INTERPRETER_TOLERANCE as TOLERANCE
from tests.model.triton_on_cpu import interpreted


@pytest.fixture(scope="module")
def interpreted_errors():
    return interpreted("tests.model.chunk_scan_kernel_cases")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64(interpreted_errors, case):
    got = interpreted_errors[case]
    b, l, h, p, *_, dtype = CASES[case][:8]
    assert got["shape"] == [b, l, h, p] and got["dtype"] == str(dtype)
    assert got["finite"], "a masked or zero-step weight became inf or nan"
    assert got["rel_err"] <= TOLERANCE[got["dtype"]], got


@pytest.mark.parametrize("case", list(GATED_CASES))
def test_gated_output_and_sums_of_squares_match_float64(interpreted_errors, case):
    """y * silu(z) * weight and the sum over each head's channels of (y * silu(z))^2: a gate, weight or sum
    over the wrong channels, or a sum taken after the weight, fails."""
    got = interpreted_errors[case]
    b, l, h, p, *_, dtype = GATED_CASES[case][:8]
    assert got["shape"] == [b, l, h, p] and got["dtype"] == str(dtype) and got["finite"]
    assert got["sumsq_shape"] == [b, l, h] and got["sumsq_dtype"] == "torch.float32"
    assert got["rel_err"] <= TOLERANCE[got["dtype"]], got
    assert got["sumsq_rel_err"] <= TOLERANCE[got["dtype"]], got


def test_the_cases_run_the_loop_with_and_without_masks():
    """The loop drops its masks where every block lies in its chunk and head (whole_blocks): the cases above
    must check both forms, with and without the gate, and a part chunk, a row block that does not divide the
    chunk or a head with fewer channels than its block must keep the masks."""
    from model.chunk_scan_kernel import whole_blocks
    from tests.model.chunk_scan_kernel_cases import launch_config

    for cases in (CASES, GATED_CASES):
        forms = {whole_blocks(l, q, p, launch_config(blocks)) for b, l, h, p, g, n, q, *_, blocks in cases.values()}
        assert forms == {True, False}
    assert whole_blocks(32768, 256, 64, None) and whole_blocks(4096, 256, 64, {"BLOCK_M": 64})
    assert not whole_blocks(1000, 256, 64, None), "a part chunk"
    assert not whole_blocks(192, 64, 64, None), "the list's 128-row blocks do not divide a chunk of 64"
    assert not whole_blocks(4096, 256, 24, {"BLOCK_M": 64}), "headdim 24 in a block of 32 channels"


# a config outside the autotune list that bench.scan_output measures (--extra-configs)
EXTRA_CONFIGS = [({"BLOCK_M": 128, "BLOCK_K": 32, "HEADS": 2}, 8, 3, None)]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_autotune_config_compiles_for_an_h100(dtype, gated):
    from model.chunk_scan_kernel import _autotuned_kernel

    configs = [(c.kwargs, c.num_warps, c.num_stages, c.maxnreg) for c in _autotuned_kernel.configs] + EXTRA_CONFIGS
    for kwargs, warps, stages, registers in configs:
        compiled = compile_scan_out(kwargs, warps, stages, dtype, gated, maxnreg=registers)
        assert compiled.metadata.shared <= SHARED_MEMORY_H100, f"{kwargs}: more shared memory than an H100 has"


def capped_config_compiled(gated: bool):
    """The autotune list's config capped in registers (the autotuner's pick at the 1.3B shapes on an H200) and
    the kernel compiled under it."""
    from model.chunk_scan_kernel import _autotuned_kernel

    config = next(c for c in _autotuned_kernel.configs if c.maxnreg)
    return config, compile_scan_out(config.kwargs, config.num_warps, config.num_stages, "bf16", gated,
                                    maxnreg=config.maxnreg)


def after_the_loop(compiled) -> list[str]:
    """The SASS a compiled kernel issues after its (last) loop: the finish."""
    from bench.kernel_resources import loop_bodies, sass_instructions

    instructions = sass_instructions(compiled)
    return [text for _, text in instructions[loop_bodies(instructions)[-1].stop:]]


@pytest.mark.parametrize("gated", [False, True])
def test_a_register_cap_in_the_autotune_list_holds_with_at_most_a_small_spill(gated):
    """The cap is there to fit one more program on an SM: the binary must keep to it. The gated kernel spills
    80 bytes a thread (104 with two loops) since it loads the finish's inputs first, and measured 7% faster
    for it on an H200 (docs/benchmarks.md, twenty-second run); a larger spill is a change to measure again
    (bench.kernel_resources reads both from the binary)."""
    from bench.kernel_resources import registers_and_spills
    from model.chunk_scan_kernel import _autotuned_kernel

    capped = [c for c in _autotuned_kernel.configs if c.maxnreg]
    assert capped
    for c in capped:
        compiled = compile_scan_out(c.kwargs, c.num_warps, c.num_stages, "bf16", gated, maxnreg=c.maxnreg)
        registers, spilled = registers_and_spills(compiled)
        assert registers <= c.maxnreg and spilled <= (128 if gated else 0), (c, registers, spilled)


@pytest.mark.parametrize("gated", [False, True])
def test_the_finish_reads_its_inputs_before_the_loop(gated):
    """x[m] (for D), z and the norm's weight are loaded at the program's start, so that the loop hides their
    latency: loaded at the end, the program waited on them (ncu's stall samples, twenty-second run). No
    global load but the loop's own copies (LDGSTS) comes after the loop."""
    _, compiled = capped_config_compiled(gated)
    late = [text for text in after_the_loop(compiled) if re.search(r"\bLDG\.", text)]
    assert not late, late


@pytest.mark.parametrize("gated", [False, True])
def test_one_loop_over_the_key_blocks_issues_one_exponential_a_weight(gated):
    """The loop's cost is the instructions it issues (bench.kernel_resources, ncu). The key blocks run in one
    loop, one pipeline of copies (two loops, past and diagonal, were slower: docs/benchmarks.md, twenty-fifth
    run). Over whole chunks it has no masks, and each key's offset comes in computed, so its only MUFU work is
    one exp2 a weight and it compares no float (a fp32 logarithm a key, as before, added 45 compares and a
    polynomial); its integer compares are the causal select's, at most two a weight."""
    from bench.kernel_resources import loop_opcodes

    config, compiled = capped_config_compiled(gated)
    (loop,) = loop_opcodes(compiled)
    weights_per_thread = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_K"] // (32 * config.num_warps)
    assert loop["MUFU"] == weights_per_thread, loop
    assert loop["FSETP"] == 0 and 0 < loop["ISETP"] <= 2 * weights_per_thread, loop
    assert loop["FSEL"] == weights_per_thread, "the causal select, one a weight"


def test_the_gate_divides_without_a_range_check():
    """Compiled for a GPU, the gate's division is div.approx (_divide): after the loops one reciprocal a gated
    value, and none of div.full's compares against 2^126 (with its rescaling, three instructions a value).
    Triton's interpreter runs no PTX and divides: the interpreted gated cases above take that path."""
    from model.chunk_scan_kernel import interpreted

    assert not interpreted(), "this process compiles the kernels: TRITON_INTERPRET is not set"
    config, compiled = capped_config_compiled(gated=True)
    finish = after_the_loop(compiled)
    values_per_thread = config.kwargs["BLOCK_M"] * 64 // (32 * config.num_warps)      # headdim 64
    assert sum("MUFU.RCP" in text for text in finish) == values_per_thread, finish
    assert not [text for text in finish if "FSETP" in text], "a range check before the reciprocal"


def test_the_autotuner_tries_two_heads_per_program_only_where_a_group_pairs_them():
    from model.chunk_scan_kernel import _autotuned_kernel, _configs_for_the_group

    configs = _autotuned_kernel.configs
    assert {c.kwargs["HEADS"] for c in configs} == {1, 2}
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
    assert chosen_config({"BLOCK_M": 64, "BLOCK_K": 32}) == {"BLOCK_M": 64, "BLOCK_K": 32, "HEADS": 1}
    monkeypatch.setenv(CONFIG_ENV, "64x32:4:3:2")
    assert chosen_config(None) == {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3, "HEADS": 2}
    assert chosen_config({"BLOCK_M": 32, "BLOCK_K": 32})["BLOCK_M"] == 32, "a config given wins"
    monkeypatch.setenv(CONFIG_ENV, "64x32")
    with pytest.raises(ValueError, match=CONFIG_ENV):
        chosen_config(None)


def test_both_kernels_launch_with_fused_multiply_adds_stated(monkeypatch):
    """What every measurement and GPU check had, Triton's default until 3.10 (which turns it off): each launch
    asks for it, so a newer Triton compiles the same kernels."""
    import torch

    from model import chunk_scan_kernel, state_pass_kernel

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(chunk_scan_kernel, "_chunk_scan_out_kernel", Recorder())
    monkeypatch.setattr(state_pass_kernel, "_states_entering_kernel", Recorder())
    b, c, q, h, p, n = 1, 2, 16, 2, 16, 16
    dt = torch.ones(b, h, c, q)
    chunk_scan_kernel.chunk_scan_out(torch.empty(b, c, 1, q, q), torch.empty(b, c * q, h, p), dt, dt,
                                     torch.empty(b, c * q, 1, n), torch.empty(b, c, h, p, n),
                                     config={"BLOCK_M": 16, "BLOCK_K": 16})
    state_pass_kernel.states_entering_chunks(torch.empty(b, c * q, 1, n), torch.empty(b, c * q, h, p), dt, dt,
                                             torch.float32, config={"BLOCK_P": 16, "BLOCK_N": 16})
    assert [kwargs.get("enable_fp_fusion") for kwargs in launches] == [True, True]
