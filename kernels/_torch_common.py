"""Helpers shared by the streaming torch implementations (``*_torch.py``): the chunk budget and the compute dtype.

One knob sizes every chunked torch op: ``FASTKD_TORCH_CHUNK_ELEMS``, the number of logits one chunk may hold
(each op has its own default, chosen so that its chunked matmuls run at full speed on CPUs).
"""

from __future__ import annotations

import os

import torch

CHUNK_ENV = "FASTKD_TORCH_CHUNK_ELEMS"


def chunk_elems(default: int) -> int:
    """Logits per chunk: ``FASTKD_TORCH_CHUNK_ELEMS`` when set, else ``default``; a bad value is a clear error."""
    raw = os.environ.get(CHUNK_ENV)
    if raw is None:
        return default
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"{CHUNK_ENV}={raw!r} is not valid; expected a positive integer number of logits per chunk "
            f"(e.g. {default}), or leave it unset"
        )
    return value


def rows_per_chunk(budget: int, rows: int, row_elems: int) -> int:
    """How many query rows of ``row_elems`` logits each fit in ``budget`` (at least 1, at most ``rows``)."""
    return min(rows, max(1, budget // max(1, row_elems)))


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (half-precision inputs are computed in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
