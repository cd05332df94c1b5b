"""Test setup shared by every test module.

On a machine without CUDA the Triton kernels run through Triton's CPU interpreter: the variable
must be set before any kernel module is imported, hence here, at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    """Fresh but reproducible randomness per test; no test leaks FASTKD_KERNELS into another."""
    torch.manual_seed(0)
    monkeypatch.delenv("FASTKD_KERNELS", raising=False)
    yield
