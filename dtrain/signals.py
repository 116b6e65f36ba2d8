"""The stop signals: SIGTERM and SIGUSR1 (what Slurm sends before a time limit) set a flag that the training
loop acts on (dtrain/loop.py: the ranks agree on it, save a checkpoint and return "preempted").

On a GPU, something in the first training step (kernel compilation or CUDA-graph capture, in a library)
replaced the process's SIGUSR1 action below Python, which still reported its own handler: the signal was
swallowed and the run never checkpointed (measured on an H100, docs/benchmarks.md, tenth run; the eleventh
named Triton's libtriton.so, which links LLVM, as the one replacing both SIGTERM and SIGUSR1). So the loop
installs the handler again around every step (`StopFlag.reinstall`), and the first time it finds an action
replaced it says which library's function had taken its place (libc's sigaction and dladdr, through ctypes;
where they are missing, it installs again without saying). A signal that comes while another action is in
place is still lost; LLVM registers its actions once per process, so on a GPU the trainer compiles one tiny
Triton kernel before installing its own (`compile_first`, dtrain/compile_first.py) and no later compilation
replaces them. `python -m bench.preempt_check` drills it on a real run.
"""
from __future__ import annotations

import ctypes
import signal

import torch


class _Sigaction(ctypes.Structure):
    """glibc's struct sigaction (x86-64 and aarch64 Linux)."""
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "sigaction") else None
    except (OSError, AttributeError):
        return None


LIBC = _libc()


def current_action(sig: signal.Signals) -> int | None:
    """The address of the function the kernel calls for `sig` (0: default, 1: ignored), None if unknown."""
    if LIBC is None:
        return None
    old = _Sigaction()
    if LIBC.sigaction(int(sig), None, ctypes.byref(old)) != 0:
        return None
    return old.handler or 0


def describe_action(address: int) -> str:
    """'SIG_DFL', 'SIG_IGN', or the function and shared object at `address` (dladdr), else the address."""
    if address in (0, 1):
        return ("SIG_DFL", "SIG_IGN")[address]
    info = _DlInfo()
    if LIBC is not None and hasattr(LIBC, "dladdr") and LIBC.dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
        name = info.sname.decode() if info.sname else "an unnamed function"
        return f"{name} in {info.fname.decode() if info.fname else '?'}"
    return hex(address)


def compile_first(device, report=print) -> dict[str, str] | None:
    """On a GPU with Triton: compile one kernel now, before StopFlag.install(), so that LLVM's signal actions
    are registered under the trainer's rather than over them in the middle of a step. Returns (and
    reports) {signal name: what took its action} for the signals this replaced (empty if none), None
    where it does not apply (no GPU, no Triton) or the compilation failed (reported; the run goes on)."""
    if torch.device(device).type != "cuda":
        return None
    try:
        from dtrain.compile_first import compile_one_kernel
    except ImportError:
        return None
    before = {sig: current_action(sig) for sig in StopFlag.SIGNALS}
    try:
        compile_one_kernel(torch.device(device))
    except Exception as e:  # noqa: BLE001 - a broken Triton fails later, at a real kernel, with its context
        report(f"signals: compiling a Triton kernel before the stop handlers failed ({e!r}); a later "
               f"compilation may replace them during a step (they are installed again after every step)")
        return None
    after = {sig: current_action(sig) for sig in StopFlag.SIGNALS}
    replaced = {sig.name: describe_action(after[sig]) for sig in StopFlag.SIGNALS
                if after[sig] is not None and after[sig] != before[sig]}
    if replaced:
        report("signals: Triton's first compilation took " + ", ".join(
            f"{name} ({what})" for name, what in replaced.items()) + "; the trainer's handlers go on top")
    return replaced


class StopFlag:
    """signal_name is set by SIGTERM or SIGUSR1; install() once, reinstall(step) around every step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, report=print):
        self.signal_name: str | None = None
        self.report = report
        self.ours: dict[signal.Signals, int | None] = {}   # the action Python installed for each signal
        self.reported: set[signal.Signals] = set()

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)
            self.ours[sig] = current_action(sig)

    def reinstall(self, step: int) -> None:
        """Install again; the first time a signal's action is found replaced, say by what."""
        for sig in self.SIGNALS:
            now, ours = current_action(sig), self.ours.get(sig)
            if now is not None and ours is not None and now != ours and sig not in self.reported:
                self.reported.add(sig)
                self.report(f"step {step}: {sig.name}'s action was replaced below Python by "
                            f"{describe_action(now)}; the trainer's handler is installed again")
        self.install()

    def _handler(self, signum, frame):  # only set a flag: the loop agrees on it and checkpoints
        self.signal_name = signal.Signals(signum).name
