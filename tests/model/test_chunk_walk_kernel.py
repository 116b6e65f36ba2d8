"""model/chunk_walk_kernel.py: the whole scan of one direction in one kernel, each program carrying its state.

No GPU here: the kernel runs under Triton's interpreter against the scan computed step by step in float64
(tests/model/chunk_walk_kernel_cases.py, in a process of its own since the interpreter is chosen when Triton
is imported), and each config the model launches is compiled for an H100 (sm_90) down to the binary, which
the interpreter does not do. bench/inference_checks.py compares the mixer that uses it with float64 on a GPU
in bfloat16."""
import pytest

from bench.kernel_resources import SHARED_MEMORY_H100, compile_walk, registers_and_spills
from model import chunk_walk_kernel as walk
from tests.model.chunk_walk_kernel_cases import CASES
from tests.model.triton_on_cpu import INTERPRETER_TOLERANCE as TOLERANCE
from tests.model.triton_on_cpu import interpreted


@pytest.fixture(scope="module")
def interpreted_errors():
    return interpreted("tests.model.chunk_walk_kernel_cases")


@pytest.mark.parametrize("case", list(CASES))
def test_gated_output_and_sums_of_squares_match_float64(interpreted_errors, case):
    """y * silu(z) * weight, and the sums of (y * silu(z))^2 over each block of a head's channels (a column
    per block, whose sum is the head's): a wrong decay, state carried wrongly from chunk to chunk, a lost
    D term, or a sum over the wrong channels fails."""
    got = interpreted_errors[case]
    b, l, h, p, *_, dtype, _, _, (_, block_p) = CASES[case]
    blocks = -(-p // block_p)
    assert got["shape"] == [b, l, h, p] and got["dtype"] == str(dtype) and got["finite"]
    assert got["sumsq_shape"] == [b, l, h * blocks] and got["sumsq_dtype"] == "torch.float32"
    assert got["rel_err"] <= TOLERANCE[got["dtype"]], got
    assert got["sumsq_rel_err"] <= TOLERANCE[got["dtype"]], got


def test_the_cases_run_the_loop_with_and_without_masks():
    """whole_tiles picks the loop without masks: the cases must run both, and the 1.3B shapes the unmasked one."""
    forms = {walk.whole_tiles(l, p, n, {"CHUNK": chunk, "BLOCK_P": block_p})
             for b, l, h, p, g, n, *_, (chunk, block_p) in CASES.values()}
    assert forms == {True, False}
    assert walk.whole_tiles(32768, 64, 128, walk.default_config(1, 64, 64))
    assert not walk.whole_tiles(1000, 64, 128, walk.default_config(1, 64, 64)), "a part chunk"
    assert not walk.whole_tiles(4096, 48, 128, {"CHUNK": 64, "BLOCK_P": 32}), "48 channels in blocks of 32"
    assert not walk.whole_tiles(4096, 64, 96, {"CHUNK": 64, "BLOCK_P": 32}), "a state of 96 in a block of 128"


def test_the_walk_is_used_where_it_pays_and_splits_heads_by_the_programs():
    """Both directions at once: 1.3B (64 heads) at batch 1 makes 128 programs a channel block, two blocks a
    head; 240M (32 heads) and 0.5B (48) at batch 1 make too few, and keep the three launches."""
    assert walk.pays(1, 64) and walk.pays(8, 32) and walk.pays(2, 48)
    assert not walk.pays(1, 32) and not walk.pays(1, 48) and not walk.pays(1, 64, directions=1)
    assert walk.default_config(1, 64, 64) == {"CHUNK": 64, "BLOCK_P": 32, "num_warps": 4, "num_stages": 3}
    assert walk.default_config(2, 64, 64) == {"CHUNK": 64, "BLOCK_P": 64, "num_warps": 4, "num_stages": 2}
    assert walk.default_config(1, 32, 64)["BLOCK_P"] == 16
    assert walk.default_config(8, 64, 24)["BLOCK_P"] == 32, "a head of 24 channels fills a block of 32"


def test_configs_are_parsed_and_bad_ones_named(monkeypatch):
    assert walk.parse_config("64:32:4:3") == {"CHUNK": 64, "BLOCK_P": 32, "num_warps": 4, "num_stages": 3}
    for bad, says in (("64:32:4", "CHUNK:BLOCK_P:warps:stages"), ("64:x:4:3", "CHUNK:BLOCK_P:warps:stages"),
                      ("48:32:4:3", "CHUNK must be a power of two"), ("64:8:4:3", "BLOCK_P must be")):
        with pytest.raises(ValueError, match=says):
            walk.parse_config(bad)
    monkeypatch.setenv(walk.CONFIG_ENV, "64:16:4:2")
    assert walk.chosen_config(None, 1, 64, 64)["BLOCK_P"] == 16
    assert walk.chosen_config({"CHUNK": 32, "BLOCK_P": 16, "num_warps": 4, "num_stages": 2}, 1, 64, 64)["CHUNK"] == 32
    monkeypatch.setenv(walk.CONFIG_ENV, "64:32")
    with pytest.raises(ValueError, match=walk.CONFIG_ENV):
        walk.chosen_config(None, 1, 64, 64)


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_the_models_configs_compile_for_an_h100_and_pipeline_their_tiles(batch):
    """Each default config (a head's channels in 4, 2 or 1 blocks) fits an H100's shared memory, and the loop
    loads C, B and x of the next chunks while it computes (one asynchronous copy of each a stage)."""
    config = walk.default_config(batch, 32, 64)
    compiled = compile_walk(config)
    assert compiled.metadata.shared <= SHARED_MEMORY_H100
    assert compiled.asm["ttgir"].count("async_copy_global_to_local") >= 3 * config["num_stages"], config
    registers, _ = registers_and_spills(compiled)
    assert registers <= 255
