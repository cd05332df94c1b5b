"""Setup for the kernel tests: one intra-op thread per test.

Every tensor here is small (at most a few [N, N] maps, N <= 577): the fp64 oracles, the torch and reference
implementations run a few hundred microseconds per op, where a second OpenMP thread only adds its start and its
barrier -- and on a loaded CI host (or a machine shared with other jobs) a barrier that waits for a descheduled
thread costs milliseconds per op (measured: the fp64 oracle of one N=197 case 0.01-0.05 s with one thread, 1.7-2.1 s
with two, on a 2-core host with a load of 7). The Triton interpreter runs numpy, which this does not touch. Results
do not depend on it beyond rounding order, which the dtype-derived tolerances cover (tests/utils.py).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
