"""Choose, per call, which implementation of an op runs.

* ``triton``    -- fused Triton kernels (``fastkd.kernels.<op>``); CUDA tensors, or any tensors when
  Triton's interpreter is on (``TRITON_INTERPRET=1``, used by the CPU test-suite).
* ``torch``     -- streaming torch implementation (``fastkd.kernels.<op>_torch``): chunked over query
  rows with its own recomputing backward, memory O(chunk * N); the default for CPU tensors.
* ``reference`` -- materializing eager implementation (``fastkd.kernels.reference``); for tests and
  benchmarks, never the default.

``FASTKD_KERNELS=triton|torch|reference`` forces one implementation for every op.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

IMPLEMENTATIONS = ("triton", "torch", "reference")
ENV_VAR = "FASTKD_KERNELS"
OPS = ("attention_kl", "head_importance")


def triton_interpret() -> bool:
    """True when Triton's CPU interpreter is on (the variable must be set before kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def forced() -> str | None:
    """The implementation forced by ``FASTKD_KERNELS``, or None."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV_VAR}={value!r} is not valid; expected one of {', '.join(IMPLEMENTATIONS)} or 'auto'")
    return value


def select(device: torch.device | str, op: str = "attention_kl") -> str:
    """Name of the implementation that runs ``op`` for tensors on ``device``."""
    if op not in OPS:
        raise ValueError(f"op={op!r} is unknown; expected one of {OPS}")
    device = torch.device(device)
    choice = forced()
    if choice is None:
        choice = "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{ENV_VAR}=triton but triton is not installed; install it (pip install triton) or use "
                f"{ENV_VAR}=torch"
            )
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"the Triton kernels need CUDA tensors (got tensors on {device}); set TRITON_INTERPRET=1 before "
                f"importing fastkd to run them on the CPU through Triton's interpreter, or use {ENV_VAR}=torch"
            )
    return choice


def describe() -> dict[str, dict[str, str]]:
    """{device: {op: implementation}} for the devices this process sees (used by ``fastkd info``)."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    table: dict[str, dict[str, str]] = {}
    for dev in devices:
        row = {}
        for op in OPS:
            try:
                row[op] = select(dev, op)
            except RuntimeError as exc:
                row[op] = f"unavailable ({exc})"
        table[dev] = row
    return table
