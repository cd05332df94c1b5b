"""Tests of the benchmark scripts in benchmarks/ (they are scripts, not a package: load them by path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    """A fresh module object of ``benchmarks/<name>.py`` (loading one puts ``benchmarks/`` on ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
