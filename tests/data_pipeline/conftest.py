"""Fixtures of the data pipeline tests: a small synthetic corpus, a tokenizer and a shard dataset, built
once per session in temporary folders."""
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
for path in (HERE.parents[1], HERE):  # the repository (data_pipeline, model) and data_pipeline_testlib
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
torch.set_num_threads(1)  # the CPU is shared

from data_pipeline_testlib import VOCAB, build, write_corpus

TIMEOUT_S = 60


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): fail the test after this long")


@pytest.fixture(autouse=True)
def _never_hang(request):
    """Without pytest-timeout installed, a SIGALRM still turns a hang into a failure."""
    if request.config.pluginmanager.hasplugin("timeout"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"{request.node.name}: no result after {TIMEOUT_S}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> list[Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tokenizer_path(corpus, tmp_path_factory) -> Path:
    from data_pipeline.tokenizer import Tokenizer
    out = tmp_path_factory.mktemp("tok") / "spm"
    Tokenizer.train(corpus, out, VOCAB, model_type="bpe", num_threads=1)
    return Path(f"{out}.model")


@pytest.fixture(scope="session")
def dataset(corpus, tokenizer_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dataset")
    build(corpus, out, tokenizer_path)
    return out


@pytest.fixture
def dataset_copy(dataset, tmp_path) -> Path:
    """A private copy to damage."""
    out = tmp_path / "dataset"
    shutil.copytree(dataset, out)
    return out


