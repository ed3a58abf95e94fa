"""Test-session settings that must be in place before any module imports triton or wandb, and shared fixtures."""

import os

import pytest

# Triton kernels run in the interpreter on machines without a GPU; triton reads this at import time, and
# several libraries (trl, deepspeed) import triton early, so it is set for the whole session.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and steadiest on a busy machine) on one thread (``usefixtures`` per module)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
