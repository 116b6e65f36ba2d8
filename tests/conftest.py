import os

import pytest
import torch

# The CPU is shared by several test processes: one thread each keeps them from thrashing.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
