"""dtrain/signals.py: the stop flag, and its watch on the signals' actions below Python (what a library in a
GPU run's first step changed), emulated here with libc's signal()."""
import ctypes
import os
import signal
import time

import pytest

from dtrain import signals

LIBC = ctypes.CDLL(None)


@pytest.fixture
def saved_handlers():
    saved = {sig: signal.getsignal(sig) for sig in signals.StopFlag.SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def raised(flag: signals.StopFlag, sig: signal.Signals) -> bool:
    flag.signal_name = None
    os.kill(os.getpid(), sig)
    for _ in range(100):   # Python runs the handler at its next bytecode boundary
        if flag.signal_name:
            return True
        time.sleep(0.001)
    return False


def test_a_replaced_action_is_found_named_and_undone(saved_handlers):
    reports = []
    flag = signals.StopFlag(report=reports.append)
    flag.install()
    assert raised(flag, signal.SIGUSR1) and flag.signal_name == "SIGUSR1"
    flag.reinstall(1)
    assert reports == []                                   # nothing replaced: nothing said
    LIBC.signal(signal.SIGUSR1, ctypes.c_void_p(1))          # SIG_IGN, below Python
    assert signal.getsignal(signal.SIGUSR1) == flag._handler   # Python does not know
    assert signals.current_action(signal.SIGUSR1) == 1
    assert not raised(flag, signal.SIGUSR1)                  # the signal is lost
    flag.reinstall(2)
    assert reports == [("step 2: SIGUSR1's action was replaced below Python by SIG_IGN; the trainer's handler "
                        "is installed again")]
    assert raised(flag, signal.SIGUSR1) and raised(flag, signal.SIGTERM)
    LIBC.signal(signal.SIGUSR1, ctypes.c_void_p(1))
    flag.reinstall(3)
    assert len(reports) == 1 and raised(flag, signal.SIGUSR1)   # said once, installed every time


def test_an_action_is_described_by_its_function_and_library():
    printf = ctypes.cast(LIBC.printf, ctypes.c_void_p).value
    text = signals.describe_action(printf)
    assert "printf" in text and "libc" in text, text
    assert signals.describe_action(0) == "SIG_DFL" and signals.describe_action(1) == "SIG_IGN"


def test_a_compilation_first_lets_the_trainers_handlers_go_on_top(saved_handlers, monkeypatch):
    """compile_first: nothing on the CPU; on a GPU it compiles before the trainer installs its handlers and
    names the actions that compilation replaced (LLVM's, emulated by a stand-in compiler that sets SIGUSR1
    to SIG_IGN below Python); the handlers installed afterwards catch the signal."""
    import sys
    import types
    assert signals.compile_first("cpu") is None
    compiler = types.ModuleType("dtrain.compile_first")
    compiled = []
    compiler.compile_one_kernel = lambda device: (compiled.append(device.type),
                                                  LIBC.signal(signal.SIGUSR1, ctypes.c_void_p(1)))
    monkeypatch.setitem(sys.modules, "dtrain.compile_first", compiler)
    signal.signal(signal.SIGUSR1, signal.default_int_handler)
    said = []
    assert signals.compile_first("cuda", said.append) == {"SIGUSR1": "SIG_IGN"} and compiled == ["cuda"]
    assert said == ["signals: Triton's first compilation took SIGUSR1 (SIG_IGN); the trainer's handlers go on top"]
    assert signals.compile_first("cuda", said.append) == {} and len(said) == 1   # nothing left to replace
    flag = signals.StopFlag()
    flag.install()
    assert raised(flag, signal.SIGUSR1) and raised(flag, signal.SIGTERM)
    # a compiler that fails is reported, and the run goes on
    compiler.compile_one_kernel = lambda device: 1 / 0
    reports = []
    assert signals.compile_first("cuda", reports.append) is None
    assert len(reports) == 1 and "ZeroDivisionError" in reports[0] and "installed again" in reports[0]
