"""fastkd's ops as PyTorch custom ops (``torch.library``): one graph node per op for ``torch.compile``.

* ``fastkd::attention_kl`` -> ``(kl, lse_s_rows, lse_t_rows)``, each ``[B, P, R]``; autograd registered
  through ``fastkd::attention_kl_backward`` -> ``(dq_s, dk_s)`` (the teacher gets no gradient).
* ``fastkd::attribution_rows`` / ``fastkd::entropy_rows`` -> per-row head-importance statistics
  ``[B, H, N]`` (no autograd: statistics, not losses).

Each op takes the implementation's name (``impl``), chosen on the host by :func:`fastkd.dispatch.select`, and
calls that backend's entry point: the Triton launchers for CUDA tensors (or the CPU through the interpreter),
the streaming torch code for CPU tensors, or the reference. Index arguments (``pairs``, ``rows``) arrive as
device tensors already validated on the host by :mod:`fastkd.functional`; nothing here reads tensor values.
Fake implementations give output shapes and dtypes without running anything, so the ops trace under
``torch.compile`` (``fullgraph=True``) and pass ``torch.library.opcheck``.

Inputs are trusted here: call the validated functions in :mod:`fastkd.functional` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastkd import dispatch


def stat_dtype(*tensors: Tensor) -> torch.dtype:
    """dtype of the ops' statistics: fp64 when an input is fp64 (torch and reference backends), else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------------- attention_kl
# The inputs of both attention_kl ops, in the order of the backends' entry points, and the host metadata:
# unique_heads / unique_rows (every pair has its own student head; no row repeats) are decided from host values
# by the caller and let the backward write each gradient once; False is always safe.
_KL_INPUTS = (
    "Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor pairs, Tensor rows, Tensor? key_mask, float scale_s, "
    "float scale_t, bool reverse"
)
_KL_HOST = "bool unique_heads, bool unique_rows, str impl"


@torch.library.custom_op(
    "fastkd::attention_kl",
    mutates_args=(),
    schema=f"({_KL_INPUTS}, Tensor? lse_s, Tensor? lse_t, {_KL_HOST}) -> (Tensor, Tensor, Tensor)",
)
def attention_kl(*args) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row KL ``[B, P, R]`` and the per-row LSEs the backward needs (see :func:`fastkd.functional.attention_kl`)."""
    *inputs, _, _, impl = args
    kl, ls, lt = dispatch.load("attention_kl", impl).attention_kl_forward(*inputs)
    dt = stat_dtype(inputs[0], inputs[2])
    return kl.to(dt), ls.to(dt), lt.to(dt)


@attention_kl.register_fake
def _attention_kl_fake(q_s, k_s, q_t, k_t, pairs, rows, *_):
    kl = q_s.new_empty((q_s.shape[0], pairs.shape[0], rows.shape[0]), dtype=stat_dtype(q_s, q_t))
    return kl, torch.empty_like(kl), torch.empty_like(kl)


@torch.library.custom_op(
    "fastkd::attention_kl_backward",
    mutates_args=(),
    schema=f"(Tensor grad, {_KL_INPUTS}, Tensor lse_s_rows, Tensor lse_t_rows, Tensor kl, {_KL_HOST})"
    " -> (Tensor, Tensor)",
)
def attention_kl_backward(grad, *args) -> tuple[Tensor, Tensor]:
    """``(dq_s, dk_s)`` of ``sum(grad * kl)``, in the dtypes of ``q_s, k_s``."""
    *inputs, unique_heads, unique_rows, impl = args
    backend = dispatch.load("attention_kl", impl)
    dq, dk = backend.attention_kl_backward(grad, *inputs, unique_heads=unique_heads, unique_rows=unique_rows)
    # contiguous, as the fake says (q_s, k_s are often strided views of a qkv projection; Inductor checks strides)
    return dq.to(inputs[0].dtype).contiguous(), dk.to(inputs[1].dtype).contiguous()


@attention_kl_backward.register_fake
def _attention_kl_backward_fake(grad, q_s, k_s, *_):
    return q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)


def _attention_kl_setup(ctx, inputs, output):
    q_s, k_s, q_t, k_t, pairs, rows, key_mask, scale_s, scale_t, reverse, _, _, unique_heads, unique_rows, impl = inputs
    kl, ls, lt = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, pairs, rows, key_mask, ls, lt, kl)
    ctx.args = (scale_s, scale_t, reverse)
    ctx.host = (unique_heads, unique_rows, impl)


def _attention_kl_grad(ctx, grad, _grad_ls, _grad_lt):
    q_s, k_s, q_t, k_t, pairs, rows, key_mask, ls, lt, kl = ctx.saved_tensors
    dq = dk = None
    if grad is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        inputs = (q_s, k_s, q_t, k_t, pairs, rows, key_mask)
        dq, dk = attention_kl_backward(grad, *inputs, *ctx.args, ls, lt, kl, *ctx.host)
    return (dq, dk) + (None,) * 13


attention_kl.register_autograd(_attention_kl_grad, setup_context=_attention_kl_setup)


# ---------------------------------------------------------------------------------------------- head importance
@torch.library.custom_op("fastkd::attribution_rows", mutates_args=())
def attribution_rows(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, scale: float, lse: Tensor | None,
                     impl: str) -> Tensor:  # fmt: skip
    """Per query row ``sum_j |P_ij (dO_i . v_j)|``, ``[B, H, N]``."""
    out = dispatch.load("head_importance", impl).attribution_rows(q, k, v, grad_out, scale, lse)
    return out.to(stat_dtype(q))


@attribution_rows.register_fake
def _attribution_rows_fake(q, k, v, grad_out, scale, lse, impl):
    return q.new_empty(q.shape[:3], dtype=stat_dtype(q))


@torch.library.custom_op("fastkd::entropy_rows", mutates_args=())
def entropy_rows(q: Tensor, k: Tensor, scale: float, lse: Tensor | None, impl: str) -> Tensor:
    """Per query row attention entropy ``-sum_j P_ij log P_ij`` (nats), ``[B, H, N]``."""
    return dispatch.load("head_importance", impl).entropy_rows(q, k, scale, lse).to(stat_dtype(q))


@entropy_rows.register_fake
def _entropy_rows_fake(q, k, scale, lse, impl):
    return q.new_empty(q.shape[:3], dtype=stat_dtype(q))
