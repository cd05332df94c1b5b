"""Materializing eager references for every fastkd op (tests and benchmarks share these).

They build full attention maps on purpose: they are the definition each fused or streaming
implementation is checked against. ``upcast=True`` computes in fp64 (the test oracle); ``upcast=False``
computes in fp32 (the eager baseline a user would write, used by the benchmarks).

The ``reference`` backend's entry points for :mod:`fastkd.custom_ops` are at the bottom (fp64 for fp64 inputs,
else fp32): ``attention_kl_forward`` / ``attention_kl_backward`` (autograd through the reference) and
``attribution_rows`` / ``entropy_rows``.
"""

from __future__ import annotations

import torch


def attention_logits(q: torch.Tensor, k: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * q @ k^T`` for ``q, k: [B, H, N, d]`` -> ``[B, H, N, N]`` in ``dtype``."""
    return scale * torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2))


def attention_kl_reference(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    pairs: torch.Tensor,
    scale_s: float,
    scale_t: float,
    rows: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    direction: str = "forward",
    upcast: bool = True,
) -> torch.Tensor:
    """Per-row KL between teacher and student attention, from full ``[B, H, N, N]`` maps.

    ``pairs``: long ``[P, 2]`` of (student head, teacher head); ``rows``: long ``[R]`` or None (all rows);
    ``key_mask``: bool ``[B, N]`` of keys that take part (None: all). Returns ``[B, P, R]`` in fp32
    (fp64 when ``upcast``); differentiable with respect to ``q_s`` and ``k_s``.
    """
    dtype = torch.float64 if upcast else torch.float32
    s = attention_logits(q_s, k_s, scale_s, dtype)
    t = attention_logits(q_t, k_t, scale_t, dtype)
    if key_mask is not None:
        keep = key_mask[:, None, None, :]
        s = s.masked_fill(~keep, float("-inf"))
        t = t.masked_fill(~keep, float("-inf"))
    s = s[:, pairs[:, 0]]  # [B, P, N, N]
    t = t[:, pairs[:, 1]]
    if rows is not None:
        s = s[:, :, rows]
        t = t[:, :, rows]
    log_ps = torch.log_softmax(s, dim=-1)
    log_pt = torch.log_softmax(t, dim=-1)
    if direction == "forward":  # KL(P_t || P_s)
        target, log_target, log_other = log_pt.exp(), log_pt, log_ps
    else:  # KL(P_s || P_t)
        target, log_target, log_other = log_ps.exp(), log_ps, log_pt
    diff = log_target - log_other
    if key_mask is not None:  # excluded keys: 0 * (-inf - -inf) must count as 0, in values and gradients
        diff = diff.masked_fill(~key_mask[:, None, None, :], 0.0)
    kl = (target * diff).sum(-1)
    if key_mask is not None:  # a row with no key at all has no distribution: define its KL as 0
        kl = kl.masked_fill(~key_mask.any(-1)[:, None, None], 0.0)
    return kl


# ------------------------------------------------------------------------------------ head importance (issue 3)


def attention_probs_reference(q: torch.Tensor, k: torch.Tensor, scale: float, upcast: bool = True) -> torch.Tensor:
    """Full attention map ``softmax(scale * q @ k^T)`` ``[B, H, N, N]`` (fp64 when ``upcast``, else fp32)."""
    dtype = torch.float64 if upcast else torch.float32
    return torch.softmax(attention_logits(q, k, scale, dtype), dim=-1)


def gradient_importance_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, scale: float, upcast: bool = True
) -> torch.Tensor:
    """Michel et al. 2019 head importance ``|sum_{i,c} O[i,c] dO[i,c]|`` with ``O = P V`` built from the full map.

    ``q, k, v, grad_out: [B, H, N, d]`` -> ``[B, H]``.
    """
    p = attention_probs_reference(q, k, scale, upcast)
    o = p @ v.to(p.dtype)
    return (o * grad_out.to(p.dtype)).sum((-1, -2)).abs()


def attribution_rows_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, scale: float, upcast: bool = True
) -> torch.Tensor:
    """Per query row ``sum_j |P_ij * dL/dP_ij|`` with ``dL/dP_ij = dO_i . v_j``, from full maps: ``[B, H, N]``."""
    p = attention_probs_reference(q, k, scale, upcast)
    dp = grad_out.to(p.dtype) @ v.to(p.dtype).transpose(-1, -2)
    return (p * dp).abs().sum(-1)


def attribution_importance_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, scale: float, upcast: bool = True
) -> torch.Tensor:
    """Attention attribution ``sum_ij |P_ij * dL/dP_ij|`` with ``dL/dP_ij = dO_i . v_j``, from full maps.

    ``q, k, v, grad_out: [B, H, N, d]`` -> ``[B, H]``.
    """
    return attribution_rows_reference(q, k, v, grad_out, scale, upcast).sum(-1)


def entropy_rows_reference(q: torch.Tensor, k: torch.Tensor, scale: float, upcast: bool = True) -> torch.Tensor:
    """Attention-row entropy ``-sum_j P_ij log P_ij`` (nats) per query row: ``[B, H, N]``."""
    dtype = torch.float64 if upcast else torch.float32
    log_p = torch.log_softmax(attention_logits(q, k, scale, dtype), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def entropy_importance_reference(q: torch.Tensor, k: torch.Tensor, scale: float, upcast: bool = True) -> torch.Tensor:
    """Mean over query rows of the attention-row entropy ``-sum_j P_ij log P_ij`` (nats): ``[B, H]``."""
    return entropy_rows_reference(q, k, scale, upcast).mean(-1)


# ---------------------------------------------------------------------------- backend entry points (dispatch)


def _fp64(*tensors: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


def attention_kl_forward(q_s, k_s, q_t, k_t, pairs, rows, key_mask, scale_s, scale_t, reverse, lse_s, lse_t):
    """``(kl, lse_s_rows, lse_t_rows)``, each ``[B, P, R]``; the given LSEs are not used (it materializes anyway)."""
    upcast = _fp64(q_s, q_t)
    dtype = torch.float64 if upcast else torch.float32
    direction = "reverse" if reverse else "forward"
    with torch.no_grad():
        kl = attention_kl_reference(q_s, k_s, q_t, k_t, pairs, scale_s, scale_t, rows, key_mask, direction, upcast)
        lses = []
        for q, k, heads, scale in ((q_s, k_s, pairs[:, 0], scale_s), (q_t, k_t, pairs[:, 1], scale_t)):
            logits = attention_logits(q[:, heads][:, :, rows], k[:, heads], scale, dtype)  # [B, P, R, N]
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            lses.append(torch.logsumexp(logits, -1))
    return kl, lses[0], lses[1]


def attention_kl_backward(grad, q_s, k_s, q_t, k_t, pairs, rows, key_mask, scale_s, scale_t, reverse,
                          lse_s_rows, lse_t_rows, kl, *, unique_heads=None, unique_rows=None):
    """``(dq_s, dk_s)`` of ``sum(grad * kl)``: the vector-Jacobian product of :func:`attention_kl_reference`.

    ``torch.func.vjp`` rather than ``torch.autograd``: it also differentiates inside a custom op's backward,
    where the autograd dispatch keys are off. The host metadata (``unique_*``) is not needed here.
    """
    direction, upcast = "reverse" if reverse else "forward", _fp64(q_s, q_t)

    def kl_of(qs, ks):
        return attention_kl_reference(qs, ks, q_t, k_t, pairs, scale_s, scale_t, rows, key_mask, direction, upcast)

    out, vjp = torch.func.vjp(kl_of, q_s, k_s)
    return vjp(grad.to(out.dtype))


def attribution_rows(q, k, v, grad_out, scale: float, lse=None) -> torch.Tensor:
    """Per query row attribution ``[B, H, N]`` from the full map (``lse`` is not used)."""
    return attribution_rows_reference(q, k, v, grad_out, scale, upcast=_fp64(q))


def entropy_rows(q, k, scale: float, lse=None) -> torch.Tensor:
    """Per query row entropy ``[B, H, N]`` from the full map (``lse`` is not used)."""
    return entropy_rows_reference(q, k, scale, upcast=_fp64(q))
