"""Head-importance statistics per (sample, head), without N x N attention maps.

Re-exported by :mod:`fastkd.functional`. Each function returns fp32 ``[B, H]`` scores for one attention layer;
``fastkd importance`` averages them over a data set (:mod:`fastkd.importance.scoring`). Inputs are what
:class:`fastkd.models.AttentionTaps` records: ``q, k, v`` ``[B, H, N, d]`` (after q_norm/k_norm, before
scaling), the per-head attention output ``out = softmax(scale q k^T) v`` and its gradient ``grad_out``
``[B, H, N, d_v]``, and optionally the attention LSE ``[B, H, N]``. These are statistics, not losses: the
outputs carry no autograd graph.

Scores:

* ``gradient`` -- Michel, Levy, Neubig, "Are Sixteen Heads Really Better than One?", NeurIPS 2019
  (https://arxiv.org/abs/1905.10650): gate each head's output by xi_h = 1; ``I_h = |dL/dxi_h| =
  |sum_{i,c} O_h[i,c] dL/dO_h[i,c]|``. A reduction over ``O * dO`` (FlashAttention's ``D_i`` summed over
  rows), no attention map at all.
* ``attribution`` -- ``sum_ij |P_ij dL/dP_ij|`` with ``dL/dP_ij = dO_i . v_j``: first-order attribution of
  the loss to each attention edge (the integrand of Hao et al., "Self-Attention Attribution", AAAI 2021, at
  alpha = 1). Streamed tile by tile from ``q, k, v, dO`` and the LSE.
* ``entropy`` -- mean over query rows of the row entropy ``-sum_j P_ij log P_ij`` (nats), streamed from
  ``q, k``. Low entropy = a concentrated head.

Implementations (``fastkd.dispatch.select(device, "head_importance")``, run through the custom ops
``fastkd::attribution_rows`` / ``fastkd::entropy_rows`` of :mod:`fastkd.custom_ops`): Triton kernels on CUDA
tensors (``fastkd.kernels.head_importance``), streaming torch chunked over query rows on CPU
(``fastkd.kernels.head_importance_torch``), materializing references (``fastkd.kernels.reference``) when
forced with ``FASTKD_KERNELS=reference``. Argument checks are the ones :func:`fastkd.functional.attention_kl`
uses (:mod:`fastkd._validate`); ``FASTKD_DEBUG=1`` also refuses NaN/inf in every input.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from fastkd import _validate as check
from fastkd import custom_ops
from fastkd import dispatch

Score = Literal["gradient", "attribution", "entropy"]
SCORES: tuple[str, ...] = ("gradient", "attribution", "entropy")

__all__ = ["SCORES", "Score", "attribution_importance", "entropy_importance", "gradient_importance", "head_importance"]


def _check_like_rows(name: str, x, q) -> None:
    """``x`` is ``[B, H, N, d_v]`` with the batch, heads and tokens of ``q``, on its device."""
    B, H, N, _ = q.shape
    expected = f"[B, H, N, d_v] = [{B}, {H}, {N}, d_v]"
    check.float4(name, x, expected)
    if tuple(x.shape[:3]) != (B, H, N):
        raise ValueError(f"{name} must have shape {expected}, got {check.shape(x)}")
    if x.device != q.device:
        raise ValueError(f"{name} is on {x.device}, q on {q.device}: all inputs must be on one device")


def _check_v_grad(v, grad_out, q) -> None:
    _check_like_rows("v", v, q)
    _check_like_rows("grad_out", grad_out, q)
    if grad_out.shape != v.shape:
        raise ValueError(f"grad_out must have the shape of v {check.shape(v)}, got {check.shape(grad_out)}")
    check.same_kind("v", v, "grad_out", grad_out)


def _lse(lse, q):
    B, H, N, _ = q.shape
    lse = check.lse("lse", lse, B, H, N, q.device)
    return None if lse is None else lse.float()


def _select(q: torch.Tensor, *others: torch.Tensor) -> str:
    return dispatch.select(q.device, "head_importance", dtypes=tuple(dict.fromkeys(x.dtype for x in (q, *others))))


def gradient_importance(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Michel et al. 2019 per-head importance ``|sum_{i,c} O[i,c] dL/dO[i,c]|``.

    Args:
        out: ``[B, H, N, d_v]`` per-head attention output before the heads are merged and projected.
        grad_out: ``[B, H, N, d_v]`` its gradient ``dL/d out``.

    Returns:
        fp32 ``[B, H]`` (per sample; average over samples for the data-set score).
    """
    check.float4("out", out, "[B, H, N, d_v]")
    _check_like_rows("grad_out", grad_out, out)
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out must have the shape of out {check.shape(out)}, got {check.shape(grad_out)}")
    check.check_finite(None, out=out, grad_out=grad_out)
    with torch.no_grad():  # a reduction over B*H*N*d with no attention map: the same torch code on every device
        dt = custom_ops.stat_dtype(out, grad_out)
        return torch.einsum("bhnd,bhnd->bh", out.to(dt), grad_out.to(dt)).abs().float()


def attribution_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention attribution per head: ``sum_ij |P_ij (dO_i . v_j)|``, ``P = softmax(scale q k^T)``, streamed.

    Args:
        q, k: ``[B, H, N, d]`` queries and keys (after q_norm/k_norm, before scaling).
        v: ``[B, H, N, d_v]`` values; grad_out: ``[B, H, N, d_v]`` gradient of the attention output.
        scale: logit scale (default ``d ** -0.5``).
        lse: optional ``[B, H, N]`` natural-log LSE of ``scale q k^T`` (saves one pass over the keys).

    Returns:
        fp32 ``[B, H]`` per sample.
    """
    check.same_qk("q", q, "k", k)
    _check_v_grad(v, grad_out, q)
    s = check.scale("scale", scale, q.shape[-1])
    lse = _lse(lse, q)
    check.check_finite(None, q=q, k=k, v=v, grad_out=grad_out, lse=lse)
    impl = _select(q, v)
    q, k, v, grad_out = (x.detach() for x in (q, k, v, grad_out))
    return custom_ops.attribution_rows(q, k, v, grad_out, s, lse, impl).sum(-1).float()


def entropy_importance(
    q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean attention-row entropy per head ``mean_i (-sum_j P_ij log P_ij)`` in nats, streamed from q, k.

    Args:
        q, k: ``[B, H, N, d]``; scale: logit scale (default ``d ** -0.5``); lse: optional ``[B, H, N]``.

    Returns:
        fp32 ``[B, H]`` per sample (0 = every row on one key, ``log N`` = uniform rows).
    """
    check.same_qk("q", q, "k", k)
    s = check.scale("scale", scale, q.shape[-1])
    lse = _lse(lse, q)
    check.check_finite(None, q=q, k=k, lse=lse)
    impl = _select(q)
    return custom_ops.entropy_rows(q.detach(), k.detach(), s, lse, impl).mean(-1).float()


def head_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    *,
    score: Score = "gradient",
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-(sample, head) importance of one attention layer; fp32 ``[B, H]``.

    Args:
        q, k: ``[B, H, N, d]``; v, grad_out: ``[B, H, N, d_v]`` (needed by ``gradient`` and ``attribution``).
        score: ``"gradient"`` (Michel et al. 2019), ``"attribution"`` or ``"entropy"`` (see the module doc).
        scale: logit scale (default ``d ** -0.5``); lse: optional ``[B, H, N]`` attention LSE.
        out: ``[B, H, N, d_v]`` attention output for ``gradient`` (recomputed with SDPA from q, k, v if None).
    """
    if score not in SCORES:
        raise ValueError(f"score={score!r} is unknown; expected one of {SCORES}")
    if score == "entropy":
        return entropy_importance(q, k, scale=scale, lse=lse)
    if v is None or grad_out is None:
        raise ValueError(f"score={score!r} needs v and grad_out, each of shape [B, H, N, d_v]")
    if score == "attribution":
        return attribution_importance(q, k, v, grad_out, scale=scale, lse=lse)
    check.same_qk("q", q, "k", k)
    _check_v_grad(v, grad_out, q)
    if out is None:
        s = check.scale("scale", scale, q.shape[-1])
        with torch.no_grad():
            if _select(q, v) == "reference":
                from fastkd.kernels.reference import attention_probs_reference

                out = attention_probs_reference(q, k, s, upcast=False) @ v.float()
            else:
                out = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), scale=s)
    return gradient_importance(out, grad_out)
