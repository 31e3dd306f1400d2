"""Kernel tests: CUDA when available, else Triton's CPU interpreter (TRITON_INTERPRET=1).

The variable must be set before triton / the kernel modules are imported, hence here at import. This
folder goes on sys.path so that the tests can `import tolerances` (tests/ is not a package).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs every run; the seed is printed (shown by pytest on failure).

    FLATQUANT_TEST_SEED=<seed> replays a failing run."""
    seed = int(os.environ.get("FLATQUANT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed
