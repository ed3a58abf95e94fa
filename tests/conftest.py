"""Test-session settings that must be in place before any module imports triton or wandb."""

import os

# Triton kernels run in the interpreter on machines without a GPU; triton reads this at import time, and
# several libraries (trl, deepspeed) import triton early, so it is set for the whole session.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
