import os

# The Triton interpreter must be chosen before any @triton.jit function is defined (ANCHORS.md).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    # Tiny tensors: intra-op threads only add overhead (and stall on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_thread_count():
    # `trainer.num_threads=1` in a test's run sets it for the whole process: without this, every later test (the
    # learning tests among them) would train on one of the two cores.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
