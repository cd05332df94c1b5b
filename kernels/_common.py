"""Helpers shared by the Triton launchers: interpreter detection, block sizes, dtype handling."""

from __future__ import annotations

import os

import torch


def interpret() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def head_block(d: int) -> int:
    """Padded head-dim block: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(d))


def upcast_inputs(*tensors: torch.Tensor) -> bool:
    """Whether the kernels convert loaded tiles to fp32 before any arithmetic.

    Always under the interpreter (its bf16 arithmetic is wrong); on GPUs for fp32 inputs only, where
    the dots then run in IEEE fp32. fp16/bf16 tiles go to the tensor cores as they are, accumulating in fp32.
    """
    return interpret() or any(t.dtype == torch.float32 for t in tensors)


def device_guard(t: torch.Tensor):
    """Launch on the tensor's device, not on the current one (the cuda:0 pitfall)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()
