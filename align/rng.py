"""Explicit random streams: every random draw in dlm-align comes from a generator built here.

A stream is identified by integers such as ``(seed, step, micro_batch, rank)``; the same identifiers give
the same generator, so a resumed run draws the same masks and samples, and no library code touches the
global RNG.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed determined by ``parts`` (order matters; stable across runs and machines)."""
    data = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def make_generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by :func:`derive_seed` of ``parts``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g
