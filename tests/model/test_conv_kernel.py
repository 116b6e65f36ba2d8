"""model/conv_kernel.py: the mixer's causal depthwise conv and its SiLU in one Triton kernel (forward only).

No GPU here: the kernel runs under Triton's interpreter against F.conv1d in float64
(tests/model/conv_kernel_cases.py, in a process of its own since the interpreter is chosen when Triton is
imported), and the model's launch config is compiled for an H100 (sm_90) down to the binary."""
import pytest

from bench.kernel_resources import compile_conv_silu, registers_and_spills
from model import conv_kernel
from tests.model.conv_kernel_cases import CASES
from tests.model.triton_on_cpu import INTERPRETER_TOLERANCE as TOLERANCE
from tests.model.triton_on_cpu import interpreted


@pytest.fixture(scope="module")
def interpreted_errors():
    return interpreted("tests.model.conv_kernel_cases")


@pytest.mark.parametrize("case", list(CASES))
def test_conv_and_silu_match_float64(interpreted_errors, case):
    """A tap read from the wrong step, a window that reads before the sequence's start, a lost bias or a
    channel block that misses the slice's columns fails; the launcher form (causal-conv1d's signature) too."""
    got = interpreted_errors[case]
    b, l, c, *_ = CASES[case]
    assert got["shape"] == [b, l, c] and got["contiguous"] and got["launcher_shape"] == [b, c, l]
    assert got["rel_err"] <= TOLERANCE[got["dtype"]], got
    assert got["launcher_rel_err"] <= TOLERANCE[got["dtype"]], got


def test_the_launcher_form_refuses_what_it_does_not_compute():
    import torch
    x = torch.zeros(1, 8, 16).transpose(1, 2)
    w = torch.zeros(8, 4)
    for args in ((torch.zeros(1, 16, dtype=torch.int32), None, None, True), (None, torch.zeros(1, 8, 3), None, True),
                 (None, None, None, False)):
        with pytest.raises(NotImplementedError, match="conv_kernel"):
            conv_kernel.causal_conv1d_fwd_function(x, w, None, *args)


def test_the_models_config_compiles_for_an_h100_without_spills():
    compiled = compile_conv_silu(conv_kernel.CONFIG)
    registers, spilled = registers_and_spills(compiled)
    assert spilled == 0 and registers <= 128, (registers, spilled)
