"""Materializing eager references for every fastkd op (tests and benchmarks share these).

They build full attention maps on purpose: they are the definition each fused or streaming
implementation is checked against. ``upcast=True`` computes in fp64 (the test oracle); ``upcast=False``
computes in fp32 (the eager baseline a user would write, used by the benchmarks).
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


def attribution_importance_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, scale: float, upcast: bool = True
) -> torch.Tensor:
    """Attention attribution ``sum_ij |P_ij * dL/dP_ij|`` with ``dL/dP_ij = dO_i . v_j``, from full maps.

    ``q, k, v, grad_out: [B, H, N, d]`` -> ``[B, H]``.
    """
    p = attention_probs_reference(q, k, scale, upcast)
    dp = grad_out.to(p.dtype) @ v.to(p.dtype).transpose(-1, -2)
    return (p * dp).abs().sum((-1, -2))


def entropy_importance_reference(q: torch.Tensor, k: torch.Tensor, scale: float, upcast: bool = True) -> torch.Tensor:
    """Mean over query rows of the attention-row entropy ``-sum_j P_ij log P_ij`` (nats): ``[B, H]``."""
    dtype = torch.float64 if upcast else torch.float32
    log_p = torch.log_softmax(attention_logits(q, k, scale, dtype), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean(-1)
