"""fastkd's public ops (typed, validated, documented); implementations live in ``fastkd.kernels``."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Literal

import torch

from fastkd import dispatch
from fastkd.importance_ops import SCORES
from fastkd.importance_ops import attribution_importance
from fastkd.importance_ops import entropy_importance
from fastkd.importance_ops import gradient_importance
from fastkd.importance_ops import head_importance

Reduction = Literal["none", "sum", "mean", "batchmean"]
Direction = Literal["forward", "reverse"]
_REDUCTIONS = ("none", "sum", "mean", "batchmean")
_DIRECTIONS = ("forward", "reverse")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = [
    "SCORES",
    "attention_kl",
    "attribution_importance",
    "check_finite_enabled",
    "entropy_importance",
    "gradient_importance",
    "head_importance",
]


def check_finite_enabled() -> bool:
    """Whether ops check their inputs for NaN/inf (``FASTKD_DEBUG=1``; costs a device sync per call)."""
    return os.environ.get("FASTKD_DEBUG", "0").lower() in ("1", "true", "yes", "on")


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _check_qk(name_q: str, q, name_k: str, k, side: str) -> None:
    for name, x in ((name_q, q), (name_k, k)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [B, H_{side}, N, d_{side}], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H_{side}, N, d_{side}], got {_shape(x)}")
        if x.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"{name_q} {_shape(q)} and {name_k} {_shape(k)} must have the same shape [B, H, N, d]")
    if q.dtype != k.dtype:
        raise ValueError(f"{name_q} ({q.dtype}) and {name_k} ({k.dtype}) must have the same dtype")


def _normalize_pairs(pairs, H_s: int, H_t: int, device) -> torch.Tensor:
    if pairs is None:
        if H_s != H_t:
            raise ValueError(
                f"pairs is required when the student and teacher head counts differ (H_s={H_s}, H_t={H_t}); "
                "pass pairs=[(student_head, teacher_head), ...]"
            )
        idx = torch.arange(H_s, device=device)
        return torch.stack([idx, idx], dim=1)
    p = torch.as_tensor(pairs, device="cpu") if not isinstance(pairs, torch.Tensor) else pairs.detach().cpu()
    if p.dim() == 1 and p.numel() == 2:
        p = p.view(1, 2)
    if p.dim() != 2 or p.shape[1] != 2 or p.numel() == 0:
        raise ValueError(f"pairs must be P >= 1 (student_head, teacher_head) pairs, shape [P, 2]; got {_shape(p)}")
    if p.dtype.is_floating_point or p.dtype == torch.bool:
        raise ValueError(f"pairs must hold integers, got {p.dtype}")
    p = p.long()
    for col, name, H in ((0, "student", H_s), (1, "teacher", H_t)):
        bad = (p[:, col] < 0) | (p[:, col] >= H)
        if bool(bad.any()):
            raise ValueError(
                f"pairs: {name} head index {int(p[bad.nonzero()[0, 0], col])} out of range; expected 0 <= index < "
                f"{H} (H_{name[0]}={H})"
            )
    return p.to(device)


def _normalize_rows(rows, N: int, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(N, device=device)
    r = torch.as_tensor(rows) if not isinstance(rows, torch.Tensor) else rows
    if r.dim() == 0:
        r = r.view(1)
    if r.dim() != 1 or r.dtype.is_floating_point or r.dtype == torch.bool:
        raise ValueError(f"rows must be None or a 1-D integer index tensor of query rows, got {r.dtype} {_shape(r)}")
    r = r.to(device=device, dtype=torch.long)
    if r.numel() and (int(r.min()) < 0 or int(r.max()) >= N):
        raise ValueError(f"rows: index out of range; expected 0 <= row < N={N}, got min {int(r.min())} "
                         f"max {int(r.max())}")
    return r


def _normalize_mask(key_mask, B: int, N: int, device) -> torch.Tensor | None:
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        got = key_mask.dtype if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
        raise ValueError(f"key_mask must be a bool tensor [N] or [B, N] (True = key kept), got {got}")
    if key_mask.shape == (N,):
        key_mask = key_mask.view(1, N).expand(B, N)
    elif key_mask.shape != (B, N):
        raise ValueError(f"key_mask must have shape [N]=[{N}] or [B, N]=[{B}, {N}], got {_shape(key_mask)}")
    return key_mask.to(device)


def _normalize_lse(name: str, lse, B: int, H: int, N: int, device):
    if lse is None:
        return None
    if not isinstance(lse, torch.Tensor) or lse.shape != (B, H, N) or not lse.dtype.is_floating_point:
        got = _shape(lse) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"{name} must be a float tensor [B, H, N]=[{B}, {H}, {N}] (natural-log LSE), got {got}")
    if lse.device != device:
        raise ValueError(f"{name} is on {lse.device}, expected {device} like the queries")
    return lse.detach()


def _scale(name: str, value, d: int) -> float:
    if value is None:
        return d**-0.5
    value = float(value)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a positive finite float (logit scale, e.g. d**-0.5 / tau), got {value}")
    return value


def attention_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    *,
    pairs: torch.Tensor | Sequence[tuple[int, int]] | None = None,
    scale_s: float | None = None,
    scale_t: float | None = None,
    rows: torch.Tensor | Sequence[int] | None = None,
    key_mask: torch.Tensor | None = None,
    reduction: Reduction = "batchmean",
    direction: Direction = "forward",
    lse_s: torch.Tensor | None = None,
    lse_t: torch.Tensor | None = None,
    check_finite: bool | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    r"""KL divergence between teacher and student attention distributions, without attention maps.

    For each batch item ``b``, head pair ``p = (h_s, h_t)`` and query row ``i``:

    .. math::
        P^t_{ij} = \mathrm{softmax}_j(\alpha_t\, q^t_i \cdot k^t_j), \quad
        P^s_{ij} = \mathrm{softmax}_j(\alpha_s\, q^s_i \cdot k^s_j), \quad
        \mathrm{KL}_{b,p,i} = \mathrm{KL}(P^t_{i} \,\|\, P^s_{i})\ \text{(forward)}

    computed by streaming over key blocks (Triton on CUDA, chunked torch on CPU): memory is O(B·P·N)
    row statistics, never ``[B, H, N, N]``.

    Args:
        q_s, k_s: student queries and keys ``[B, H_s, N, d_s]`` (as the attention uses them, before scaling).
        q_t, k_t: teacher queries and keys ``[B, H_t, N, d_t]``; must not require grad (the teacher is frozen).
        pairs: ``P`` pairs ``(student_head, teacher_head)`` (list or int tensor ``[P, 2]``). A student head may
            appear in several pairs (e.g. SSTA: one student head, a teacher and an assistant). Default: head
            ``i`` with head ``i`` (needs ``H_s == H_t``).
        scale_s, scale_t: logit scales; default ``d ** -0.5`` of each side. A temperature ``tau`` is
            ``scale / tau``.
        rows: query rows to compare, a 1-D index tensor (``[0]`` = CLS row only); default all ``N`` rows.
        key_mask: bool ``[N]`` or ``[B, N]``, True for keys that take part; masked keys are dropped from both
            softmaxes (e.g. a distillation token the teacher lacks). A row with no kept key has KL 0.
        reduction: ``"none"`` -> ``[B, P, R]``; ``"sum"``; ``"mean"`` (over ``B·P·R``); ``"batchmean"`` (sum / B).
            Per-row weights: use ``"none"`` and weight the result.
        direction: ``"forward"`` = ``KL(P_t || P_s)`` (teacher as target); ``"reverse"`` = ``KL(P_s || P_t)``.
        lse_s, lse_t: optional ``[B, H, N]`` natural-log LSEs of ``scale * q k^T`` per row (e.g. returned by the
            attention forward); when given the kernel does not recompute them.
        check_finite: check inputs for NaN/inf (default: ``FASTKD_DEBUG=1``).
        impl: ``"triton" | "torch" | "reference"`` to override :mod:`fastkd.dispatch` for this call.

    Returns:
        fp32 tensor: ``[B, P, R]`` for ``reduction="none"``, else a scalar. Gradients flow to ``q_s`` and ``k_s``.

    Example::

        >>> q_s, k_s = torch.randn(2, 6, 197, 64, requires_grad=True), torch.randn(2, 6, 197, 64, requires_grad=True)
        >>> q_t, k_t = torch.randn(2, 12, 197, 64), torch.randn(2, 12, 197, 64)
        >>> loss = attention_kl(q_s, k_s, q_t, k_t, pairs=[(0, 3), (0, 7)], rows=torch.tensor([0]))
        >>> loss.backward()
    """
    _check_qk("q_s", q_s, "k_s", k_s, "s")
    _check_qk("q_t", q_t, "k_t", k_t, "t")
    B, H_s, N, d_s = q_s.shape
    _, H_t, N_t, d_t = q_t.shape
    if q_t.shape[0] != B:
        raise ValueError(f"batch sizes differ: q_s {_shape(q_s)} has B={B}, q_t {_shape(q_t)} has B={q_t.shape[0]}")
    if N_t != N:
        raise ValueError(
            f"token counts differ: q_s {_shape(q_s)} has N={N}, q_t {_shape(q_t)} has N={N_t}; drop or resize "
            "tokens first (e.g. remove a distillation token, or interpolate the patch grid)"
        )
    if N < 1:
        raise ValueError(f"q_s must have N >= 1 tokens, got {_shape(q_s)}")
    if q_t.device != q_s.device:
        raise ValueError(f"q_t is on {q_t.device}, q_s on {q_s.device}: all inputs must be on one device")
    if q_t.requires_grad or k_t.requires_grad:
        raise ValueError(
            "q_t/k_t require grad: the teacher is frozen and gets no gradient from attention_kl; pass "
            "q_t.detach(), k_t.detach() (or record them under torch.no_grad())"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    device = q_s.device
    pairs_t = _normalize_pairs(pairs, H_s, H_t, device)
    rows_t = _normalize_rows(rows, N, device)
    mask_t = _normalize_mask(key_mask, B, N, device)
    lse_s = _normalize_lse("lse_s", lse_s, B, H_s, N, device)
    lse_t = _normalize_lse("lse_t", lse_t, B, H_t, N, device)
    a_s, a_t = _scale("scale_s", scale_s, d_s), _scale("scale_t", scale_t, d_t)
    if check_finite_enabled() if check_finite is None else check_finite:
        for name, x in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or inf values")

    choice = impl or dispatch.select(device, "attention_kl")
    reverse = direction == "reverse"
    if choice == "reference":
        from fastkd.kernels.reference import attention_kl_reference

        kl = attention_kl_reference(
            q_s, k_s, q_t, k_t, pairs_t, a_s, a_t, rows=rows_t, key_mask=mask_t, direction=direction,
            upcast=q_s.dtype == torch.float64,
        )  # fmt: skip
    else:
        if choice == "triton":
            if q_s.dtype == torch.float64 or q_t.dtype == torch.float64:
                raise ValueError("float64 inputs are supported by the torch and reference implementations only")
            fn = importlib.import_module("fastkd.kernels.attention_kl").AttentionKLFunction
        elif choice == "torch":
            fn = importlib.import_module("fastkd.kernels.attention_kl_torch").AttentionKLTorchFunction
        else:
            raise ValueError(f"impl must be one of {dispatch.IMPLEMENTATIONS}, got {choice!r}")
        kl = fn.apply(q_s, k_s, q_t, k_t, pairs_t, rows_t, mask_t, a_s, a_t, reverse, lse_s, lse_t)
    if reduction == "none":
        return kl
    total = kl.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(1, kl.numel())
    return total / B
