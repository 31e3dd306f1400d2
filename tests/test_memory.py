"""flatquant.memory: freed heap pages go back to the OS."""
from __future__ import annotations

import sys

import pytest

from flatquant import memory


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._LIBC is None, reason="glibc only")
def test_trim_returns_freed_heap():
    blocks = [bytearray(b"x" * (64 << 10)) for _ in range(3200)]  # 200 MiB in heap-sized (sub-mmap) blocks
    keep = bytearray(b"y" * (64 << 10))  # allocated last: the freed blocks are not at the heap's top
    del blocks
    before = _rss_kib()
    memory.trim_heap()
    assert before - _rss_kib() > 100 << 10, "less than 100 MiB of 200 MiB freed came back"
    assert keep[0] == ord("y")
    memory.release_memory()  # collects, then trims: no error
