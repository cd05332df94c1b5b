"""Head-importance statistics per (sample, head), without N x N attention maps.

Re-exported by :mod:`fastkd.functional`. Each function returns fp32 ``[B, H]`` scores for one attention layer;
``fastkd importance`` averages them over a data set (:mod:`fastkd.importance`). Inputs are what
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

Implementations (``fastkd.dispatch.select(device, "head_importance")``): Triton kernels on CUDA tensors
(``fastkd.kernels.head_importance``), streaming torch chunked over query rows on CPU
(``fastkd.kernels.head_importance_torch``), materializing references (``fastkd.kernels.reference``) when
forced with ``FASTKD_KERNELS=reference``.
"""

from __future__ import annotations

import importlib
import math
from typing import Literal

import torch
import torch.nn.functional as F

from fastkd import dispatch

Score = Literal["gradient", "attribution", "entropy"]
SCORES: tuple[str, ...] = ("gradient", "attribution", "entropy")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["SCORES", "Score", "attribution_importance", "entropy_importance", "gradient_importance", "head_importance"]


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _check4(name: str, x, expected: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape {expected}, got {_shape(x)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_qk(q, k) -> None:
    _check4("q", q, "[B, H, N, d]")
    _check4("k", k, "[B, H, N, d]")
    if q.shape != k.shape:
        raise ValueError(f"q {_shape(q)} and k {_shape(k)} must have the same shape [B, H, N, d]")
    if q.device != k.device:
        raise ValueError(f"q ({q.device}) and k ({k.device}) must be on the same device")


def _check_like_rows(name: str, x, q) -> None:
    B, H, N, _ = q.shape
    _check4(name, x, f"[B, H, N, d_v] = [{B}, {H}, {N}, d_v]")
    if tuple(x.shape[:3]) != (B, H, N):
        raise ValueError(f"{name} must have shape [B, H, N, d_v] = [{B}, {H}, {N}, d_v], got {_shape(x)}")
    if x.device != q.device:
        raise ValueError(f"{name} ({x.device}) must be on the device of q ({q.device})")


def _check_lse(lse, q) -> torch.Tensor | None:
    if lse is None:
        return None
    B, H, N, _ = q.shape
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, H, N) or not lse.is_floating_point():
        got = _shape(lse) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be a float tensor of shape [B, H, N] = [{B}, {H}, {N}], got {got}")
    if lse.device != q.device:
        raise ValueError(f"lse ({lse.device}) must be on the device of q ({q.device})")
    return lse.float()


def _scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be a positive finite float (logits = scale * q @ k^T), got {scale!r}")
    return s


def _impl(device: torch.device):
    choice = dispatch.select(device, "head_importance")
    if choice == "triton":
        return choice, importlib.import_module("fastkd.kernels.head_importance")
    if choice == "torch":
        return choice, importlib.import_module("fastkd.kernels.head_importance_torch")
    return choice, importlib.import_module("fastkd.kernels.reference")


def _triton_ready(*xs):
    # the kernels compute in fp32; fp64 inputs are cast down (the torch path keeps fp64)
    return [x if x is None or x.dtype != torch.float64 else x.float() for x in xs]


def gradient_importance(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Michel et al. 2019 per-head importance ``|sum_{i,c} O[i,c] dL/dO[i,c]|``.

    Args:
        out: ``[B, H, N, d_v]`` per-head attention output before the heads are merged and projected.
        grad_out: ``[B, H, N, d_v]`` its gradient ``dL/d out``.

    Returns:
        fp32 ``[B, H]`` (per sample; average over samples for the data-set score).
    """
    _check4("out", out, "[B, H, N, d_v]")
    _check_like_rows("grad_out", grad_out, out)
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out must have the shape of out {_shape(out)}, got {_shape(grad_out)}")
    from fastkd.kernels import head_importance_torch

    return head_importance_torch.gradient_importance(out.detach(), grad_out.detach()).float()


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
    _check_qk(q, k)
    _check_like_rows("v", v, q)
    _check_like_rows("grad_out", grad_out, q)
    if grad_out.shape != v.shape:
        raise ValueError(f"grad_out must have the shape of v {_shape(v)}, got {_shape(grad_out)}")
    s = _scale(scale, q.shape[-1])
    lse = _check_lse(lse, q)
    q, k, v, grad_out = (x.detach() for x in (q, k, v, grad_out))
    choice, impl = _impl(q.device)
    if choice == "reference":
        return impl.attribution_importance_reference(q, k, v, grad_out, s, upcast=False).float()
    if choice == "triton":
        q, k, v, grad_out = _triton_ready(q, k, v, grad_out)
    return impl.attribution_importance(q, k, v, grad_out, s, lse).float()


def entropy_importance(
    q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean attention-row entropy per head ``mean_i (-sum_j P_ij log P_ij)`` in nats, streamed from q, k.

    Args:
        q, k: ``[B, H, N, d]``; scale: logit scale (default ``d ** -0.5``); lse: optional ``[B, H, N]``.

    Returns:
        fp32 ``[B, H]`` per sample (0 = every row on one key, ``log N`` = uniform rows).
    """
    _check_qk(q, k)
    s = _scale(scale, q.shape[-1])
    lse = _check_lse(lse, q)
    q, k = q.detach(), k.detach()
    choice, impl = _impl(q.device)
    if choice == "reference":
        return impl.entropy_importance_reference(q, k, s, upcast=False).float()
    if choice == "triton":
        q, k = _triton_ready(q, k)
    return impl.entropy_importance(q, k, s, lse).float()


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
    _check_qk(q, k)
    _check_like_rows("v", v, q)
    if out is None:
        s = _scale(scale, q.shape[-1])
        choice = dispatch.select(q.device, "head_importance")
        with torch.no_grad():
            if choice == "reference":
                from fastkd.kernels.reference import attention_probs_reference

                out = attention_probs_reference(q, k, s, upcast=False) @ v.float()
            else:
                out = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), scale=s)
    return gradient_importance(out, grad_out)
