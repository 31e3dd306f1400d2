"""Shared by the tests of benchmarks/*/*.py: load a script (not a package module) by its file name."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="session")
def load_script():
    """load_script("run_accuracy") -> the module benchmarks/accuracy/run_accuracy.py (the one script of that name
    under benchmarks/), loaded once."""
    cache = {}

    def load(name: str):
        if name not in cache:
            (path,) = BENCHMARKS.glob(f"*/{name}.py")
            spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            cache[name] = mod
        return cache[name]
    return load
