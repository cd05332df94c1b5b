"""Argument checks shared by the public ops (:mod:`fastkd.functional`, :mod:`fastkd.importance.ops`).

Every check raises ``ValueError`` naming the argument and what was expected. None of them reads tensor
values (no device-to-host synchronisation) except :func:`check_finite`, which runs only when asked
(``FASTKD_DEBUG=1`` or ``check_finite=True``).
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fastkd.dispatch import FLOATS


def debug_enabled() -> bool:
    """Whether ops check their inputs for NaN/inf (``FASTKD_DEBUG=1``; costs a device sync per call)."""
    return os.environ.get("FASTKD_DEBUG", "0").lower() in ("1", "true", "yes", "on")


def shape(x) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def float4(name: str, x, expected: str) -> None:
    """``x`` is a 4-D float tensor; ``expected`` names its layout, e.g. ``[B, H, N, d]``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape {expected}, got {shape(x)}")
    if x.dtype not in FLOATS:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def same_qk(name_q: str, q, name_k: str, k, expected: str = "[B, H, N, d]") -> None:
    """Queries and keys of one attention: same shape, dtype and device."""
    float4(name_q, q, expected)
    float4(name_k, k, expected)
    if q.shape != k.shape:
        raise ValueError(f"{name_q} {shape(q)} and {name_k} {shape(k)} must have the same shape [B, H, N, d]")
    same_kind(name_q, q, name_k, k)


def same_kind(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Same dtype and device (mixed dtypes are refused by name rather than failing inside a kernel)."""
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} ({a.dtype}) and {name_b} ({b.dtype}) must have the same dtype")
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device}, {name_a} on {a.device}: all inputs must be on one device")


def lse(name: str, value, B: int, H: int, N: int, device: torch.device):
    """An optional natural-log LSE ``[B, H, N]`` on ``device``, detached (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (B, H, N) or not value.is_floating_point():
        got = shape(value) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a float tensor of shape [B, H, N] = [{B}, {H}, {N}] (natural-log LSE), "
                         f"got {got}")  # fmt: skip
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, expected {device} like the queries")
    return value.detach()


def scale(name: str, value, d: int) -> float:
    """A logit scale: positive and finite; default ``d ** -0.5``."""
    if value is None:
        return 1.0 / math.sqrt(d)
    try:
        s = float(value)
    except (TypeError, ValueError):
        s = float("nan")
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"{name} must be a positive finite float (logit scale, e.g. d**-0.5 / tau), got {value!r}")
    return s


def host_values(name: str, value, expected: str):
    """The values of an index argument read on the host: an int, a (nested) list, or None.

    Lists, tuples and ranges are taken as they are; a CPU tensor is read without any synchronisation; a CUDA
    tensor costs one device-to-host copy, once per tensor (pass a list, a range or a CPU tensor to avoid it).
    Returns None for a tensor while ``torch.compile`` traces (its values are not known then).
    """
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{name} must be {expected}, got {value.dtype} {shape(value)}")
        if torch.compiler.is_compiling():
            return None
        return _tensor_values(value)
    if callable(getattr(value, "tolist", None)):  # numpy arrays
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, range)):
        raise ValueError(f"{name} must be {expected}, got {type(value).__name__}")
    return [v.tolist() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, (list, tuple)) else v
            for v in value]  # fmt: skip


def as_int(name: str, v, expected: str) -> int:
    """``v`` as a Python int (any size), refusing floats and bools."""
    if isinstance(v, (bool, float)):
        raise ValueError(f"{name} must be {expected}, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be {expected}, got {v!r}") from None


_HOST_CACHE = WeakIdKeyDictionary()  # device index tensor -> (version, values)


def _tensor_values(t: torch.Tensor) -> list:
    """``t.tolist()``, cached per tensor object and version: an index tensor built once is read once."""
    if t.device.type == "cpu":
        return t.tolist()  # reads memory directly: no dispatch, no sync
    hit = _HOST_CACHE.get(t)
    if hit is not None and hit[0] == t._version:
        return hit[1]
    values = t.tolist()
    _HOST_CACHE[t] = (t._version, values)
    return values


def check_finite(enabled: bool | None, **tensors) -> None:
    """With ``enabled`` (default: ``FASTKD_DEBUG=1``), refuse NaN/inf in any given tensor, naming it."""
    if not (debug_enabled() if enabled is None else enabled):
        return
    for name, x in tensors.items():
        if x is not None and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf values")
