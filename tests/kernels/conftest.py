"""Setup for the kernel tests: one intra-op thread per test (``one_intra_op_thread`` in tests/conftest.py says
why)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_intra_op_thread(one_intra_op_thread):
    yield
