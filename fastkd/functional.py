"""fastkd's public ops (typed, validated, documented).

Each op validates its arguments on the host, picks an implementation through the registry in
:mod:`fastkd.dispatch` and runs it as a PyTorch custom op (:mod:`fastkd.custom_ops`), one graph node under
``torch.compile``. Index arguments given as host values (lists, ranges, CPU tensors) are checked without any
device-to-host synchronisation and copied to the device once per (values, device).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import torch

from fastkd import _validate as check
from fastkd import custom_ops
from fastkd import dispatch
from fastkd._validate import debug_enabled as check_finite_enabled
from fastkd.importance.ops import SCORES
from fastkd.importance.ops import attribution_importance
from fastkd.importance.ops import entropy_importance
from fastkd.importance.ops import gradient_importance
from fastkd.importance.ops import head_importance

Reduction = Literal["none", "sum", "mean", "batchmean"]
Direction = Literal["forward", "reverse"]
_REDUCTIONS = ("none", "sum", "mean", "batchmean")
_DIRECTIONS = ("forward", "reverse")

__all__ = [
    "SCORES",
    "attention_kl",
    "attribution_importance",
    "check_finite_enabled",
    "entropy_importance",
    "gradient_importance",
    "head_importance",
]

_PAIRS = "P >= 1 (student_head, teacher_head) pairs, shape [P, 2]"
_ROWS = "None or a 1-D integer index tensor (or list) of query rows"


def _host_pairs(pairs, H_s: int, H_t: int) -> tuple[tuple[int, int], ...] | None:
    """The pairs as host integers, range-checked (None: a tensor under torch.compile, checked on the device)."""
    if pairs is None:
        if H_s != H_t:
            raise ValueError(
                f"pairs is required when the student and teacher head counts differ (H_s={H_s}, H_t={H_t}); "
                "pass pairs=[(student_head, teacher_head), ...]"
            )
        return tuple((h, h) for h in range(H_s))
    values = check.host_values("pairs", pairs, _PAIRS)
    if values is None:
        if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
            raise ValueError(f"pairs must be {_PAIRS}; got {check.shape(pairs)}")
        return None
    if len(values) == 2 and not any(isinstance(v, list) for v in values):
        values = [values]  # one pair given flat
    if not values or any(not isinstance(v, list) or len(v) != 2 for v in values):
        got = check.shape(torch.as_tensor(pairs)) if isinstance(pairs, torch.Tensor) else repr(list(pairs))[:80]
        raise ValueError(f"pairs must be {_PAIRS}; got {got}")
    out = []
    for v in values:
        pair = (check.as_int("pairs", v[0], _PAIRS), check.as_int("pairs", v[1], _PAIRS))
        for index, name, H in ((pair[0], "student", H_s), (pair[1], "teacher", H_t)):
            if not 0 <= index < H:
                raise ValueError(
                    f"pairs: {name} head index {index} out of range; expected 0 <= index < {H} (H_{name[0]}={H})"
                )
        out.append(pair)
    return tuple(out)


def _host_rows(rows, N: int) -> tuple[int, ...] | None:
    """The query rows as host integers, range-checked (None: a tensor under torch.compile)."""
    if rows is None:
        return tuple(range(N))
    if isinstance(rows, torch.Tensor) and rows.dim() > 1:
        raise ValueError(f"rows must be {_ROWS}, got {rows.dtype} {check.shape(rows)}")
    values = check.host_values("rows", rows, _ROWS)
    if values is None:
        if rows.numel() == 0:
            raise ValueError("rows is empty: it must select at least one query row (or be None for all rows)")
        return None
    values = values if isinstance(values, list) else [values]  # a 0-d tensor: one row
    if any(isinstance(v, list) for v in values):
        raise ValueError(f"rows must be {_ROWS}, got a nested list")
    if not values:
        raise ValueError("rows is empty: it must select at least one query row (or be None for all rows)")
    out = tuple(check.as_int("rows", v, _ROWS) for v in values)
    lo, hi = min(out), max(out)
    if lo < 0 or hi >= N:
        raise ValueError(f"rows: index out of range; expected 0 <= row < N={N}, got min {lo} max {hi}")
    return out


@functools.lru_cache(maxsize=256)
def _cached_index(values: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _distinct(values: tuple) -> bool:
    return len(set(values)) == len(values)


def _index_tensor(values: tuple | None, given, device: torch.device, bound: tuple[int, ...]) -> torch.Tensor:
    """Host values as a long device tensor, built once per (values, device); under torch.compile a tensor
    argument whose values are unknown is range-checked on the device instead (no synchronisation)."""
    if values is not None:
        if torch.compiler.is_compiling():
            return torch.tensor(values, dtype=torch.long, device=device)
        return _cached_index(values, device)
    t = given.to(device=device, dtype=torch.long)
    limit = torch.tensor(bound, device=device) if len(bound) > 1 else bound[0]
    torch._assert_async(((t >= 0) & (t < limit)).all(), "pairs/rows index out of range")
    return t


def _normalize_mask(key_mask, B: int, N: int, device) -> torch.Tensor | None:
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        got = key_mask.dtype if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
        raise ValueError(f"key_mask must be a bool tensor [N] or [B, N] (True = key kept), got {got}")
    if key_mask.shape == (N,):
        key_mask = key_mask.view(1, N).expand(B, N)
    elif key_mask.shape != (B, N):
        raise ValueError(f"key_mask must have shape [N]=[{N}] or [B, N]=[{B}, {N}], got {check.shape(key_mask)}")
    return key_mask.to(device)


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
            ``i`` with head ``i`` (needs ``H_s == H_t``). Host values cost no synchronisation; a CUDA tensor is
            read once per tensor (under ``torch.compile`` it is range-checked on the device instead).
        scale_s, scale_t: logit scales; default ``d ** -0.5`` of each side. A temperature ``tau`` is
            ``scale / tau``.
        rows: query rows to compare, a 1-D index (list, range or tensor; ``[0]`` = CLS row only); default all
            ``N`` rows; never empty. Read like ``pairs``.
        key_mask: bool ``[N]`` or ``[B, N]``, True for keys that take part; masked keys are dropped from both
            softmaxes (e.g. a distillation token the teacher lacks). A row with no kept key has KL 0.
        reduction: ``"none"`` -> ``[B, P, R]``; ``"sum"``; ``"mean"`` (over ``B·P·R``); ``"batchmean"`` (sum / B).
            Per-row weights: use ``"none"`` and weight the result.
        direction: ``"forward"`` = ``KL(P_t || P_s)`` (teacher as target); ``"reverse"`` = ``KL(P_s || P_t)``.
        lse_s, lse_t: optional ``[B, H, N]`` natural-log LSEs of ``scale * q k^T`` per row (e.g. returned by the
            attention forward, over all N keys); when given the kernel does not recompute them. Not together
            with ``key_mask``.
        check_finite: check inputs (and given LSEs) for NaN/inf (default: ``FASTKD_DEBUG=1``; a sync per call).
        impl: a registered implementation (``"triton" | "torch" | "reference"``; ``fastkd info`` lists them) for
            this call instead of the default or ``FASTKD_KERNELS``; the same checks apply.

    Returns:
        fp32 tensor: ``[B, P, R]`` for ``reduction="none"``, else a scalar. Gradients flow to ``q_s`` and ``k_s``.

    Example::

        >>> q_s, k_s = torch.randn(2, 6, 197, 64, requires_grad=True), torch.randn(2, 6, 197, 64, requires_grad=True)
        >>> q_t, k_t = torch.randn(2, 12, 197, 64), torch.randn(2, 12, 197, 64)
        >>> loss = attention_kl(q_s, k_s, q_t, k_t, pairs=[(0, 3), (0, 7)], rows=[0])
        >>> loss.backward()
    """
    check.same_qk("q_s", q_s, "k_s", k_s, "[B, H_s, N, d_s]")
    check.same_qk("q_t", q_t, "k_t", k_t, "[B, H_t, N, d_t]")
    B, H_s, N, d_s = q_s.shape
    _, H_t, N_t, d_t = q_t.shape
    if q_t.shape[0] != B:
        raise ValueError(f"batch sizes differ: q_s {check.shape(q_s)} has B={B}, q_t {check.shape(q_t)} has "
                         f"B={q_t.shape[0]}")  # fmt: skip
    if B < 1:
        raise ValueError(f"q_s has batch size B=0 ({check.shape(q_s)}); attention_kl needs B >= 1")
    if N_t != N:
        raise ValueError(
            f"token counts differ: q_s {check.shape(q_s)} has N={N}, q_t {check.shape(q_t)} has N={N_t}; drop or "
            "resize tokens first (e.g. remove a distillation token, or interpolate the patch grid)"
        )
    if N < 1:
        raise ValueError(f"q_s must have N >= 1 tokens, got {check.shape(q_s)}")
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
    host_pairs, host_rows = _host_pairs(pairs, H_s, H_t), _host_rows(rows, N)
    pairs_t = _index_tensor(host_pairs, pairs, device, (H_s, H_t))
    rows_t = _index_tensor(host_rows, rows, device, (N,))
    # host metadata for the backward: can each (head, row) gradient be written once, without accumulation?
    unique_heads = host_pairs is not None and _distinct(tuple(h for h, _ in host_pairs))
    unique_rows = host_rows is not None and _distinct(host_rows)
    mask_t = _normalize_mask(key_mask, B, N, device)
    if mask_t is not None and (lse_s is not None or lse_t is not None):
        # an attention forward's LSE covers all N keys; with masked keys the softmaxes here need the LSE over the
        # kept keys only, which no attention call returns: using it would silently give a wrong KL
        given = " and ".join(n for n, v in (("lse_s", lse_s), ("lse_t", lse_t)) if v is not None)
        raise ValueError(f"key_mask cannot be combined with {given}: a given LSE covers all N keys of the "
                         "attention forward, the KL needs it over the kept keys; pass key_mask or the LSEs, not both")
    lse_s = check.lse("lse_s", lse_s, B, H_s, N, device)
    lse_t = check.lse("lse_t", lse_t, B, H_t, N, device)
    a_s, a_t = check.scale("scale_s", scale_s, d_s), check.scale("scale_t", scale_t, d_t)
    check.check_finite(check_finite, q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, lse_s=lse_s, lse_t=lse_t)
    choice = dispatch.select(device, "attention_kl", impl=impl, dtypes=(q_s.dtype, q_t.dtype))
    kl, _, _ = custom_ops.attention_kl(
        q_s, k_s, q_t, k_t, pairs_t, rows_t, mask_t, a_s, a_t, direction == "reverse", lse_s, lse_t,
        unique_heads, unique_rows, choice,
    )  # fmt: skip
    if reduction == "none":
        return kl
    total = kl.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(1, kl.numel())
    return total / B
