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


@pytest.fixture
def one_intra_op_thread():
    """One torch intra-op thread for the test, for modules of small tensors only (at most a few [N, N] maps,
    N <= 577): their fp64 oracles and torch implementations run a few hundred microseconds per op, where a second
    OpenMP thread only adds its start and its barrier -- and on a loaded CI host (or a machine shared with other
    jobs) a barrier that waits for a descheduled thread costs milliseconds per op (measured: the fp64 oracle of one
    N=197 case 0.01-0.05 s with one thread, 1.7-2.1 s with two, on a 2-core host with a load of 7). The Triton
    interpreter runs numpy, which this does not touch. Results do not depend on it beyond rounding order, which the
    dtype-derived tolerances cover (tests/utils.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
