"""Streaming torch implementation of attention_kl, for CPU tensors.

Works on chunks of query rows (and of the batch when one row block is already large): each chunk
builds its ``[b, P, c, N]`` logits, reduces them to per-row KL and LSE, and frees them. The backward
recomputes each chunk from the saved per-row LSEs (plain autograd over chunks would keep every chunk's
softmax alive, i.e. the whole ``[B, H, N, N]`` map). Peak extra memory: O(chunk_elems), set by
``FASTKD_TORCH_CHUNK_ELEMS`` (default 2**18 logits per chunk: 1 MiB fp32 temporaries).
``attention_kl_forward`` / ``attention_kl_backward`` are this backend's entry points for
:mod:`fastkd.custom_ops` (registered in :mod:`fastkd.dispatch`).

Math (per row, ``a``/``b`` = logits of the target/other distribution, ``p = softmax(a)``)::

    KL(P_a || P_b) = sum_j p_j (a_j - b_j) - lse_a + lse_b
    forward  (a = t, b = s):  dKL/ds_j = p^s_j - p^t_j
    reverse  (a = s, b = t):  dKL/ds_j = p^s_j (log p^s_j - log p^t_j - KL)
"""

from __future__ import annotations

import torch

from fastkd.kernels._torch_common import chunk_elems
from fastkd.kernels._torch_common import compute_dtype
from fastkd.kernels._torch_common import rows_per_chunk

DEFAULT_CHUNK_ELEMS = 1 << 18


def _plan(B: int, P: int, R: int, N: int) -> tuple[int, int]:
    """(batch chunk, row chunk) so that one chunk holds at most the budget of logits (or one row of one image)."""
    budget = chunk_elems(DEFAULT_CHUNK_ELEMS)
    rows = rows_per_chunk(budget, R, B * P * N)
    batch = min(B, max(1, budget // max(1, P * N * rows)))
    return batch, rows


class _Chunk:
    """Logits and log-probabilities of one (batch chunk, row chunk), recomputed on demand."""

    def __init__(self, q_s, ks, q_t, kt, hs, ht, rows, key_mask, b0, b1, r0, r1, scale_s, scale_t, dtype):
        ridx = rows[r0:r1]
        self.ridx = ridx
        self.qs = q_s[b0:b1][:, hs[:, None], ridx[None, :]].to(dtype)  # [b, P, c, ds]
        qt = q_t[b0:b1][:, ht[:, None], ridx[None, :]].to(dtype)
        self.s = scale_s * torch.matmul(self.qs, ks[b0:b1].transpose(-1, -2))  # [b, P, c, N]
        self.t = scale_t * torch.matmul(qt, kt[b0:b1].transpose(-1, -2))
        self.keep = None
        if key_mask is not None:
            self.keep = key_mask[b0:b1, None, None, :]
            self.s = self.s.masked_fill(~self.keep, float("-inf"))
            self.t = self.t.masked_fill(~self.keep, float("-inf"))

    def masked_zero(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.keep is None else x.masked_fill(~self.keep, 0.0)


def _lse(logits: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    if given is not None:
        return given
    lse = torch.logsumexp(logits, dim=-1)
    # a row whose keys are all masked: +inf makes every probability 0 (and its KL 0) instead of NaN
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def _gather_lse(lse: torch.Tensor | None, heads: torch.Tensor, ridx: torch.Tensor, b0: int, b1: int, dtype):
    if lse is None:
        return None
    return lse[b0:b1][:, heads[:, None], ridx[None, :]].to(dtype)


def attention_kl_forward(q_s, k_s, q_t, k_t, pairs, rows, key_mask, scale_s, scale_t, reverse, lse_s, lse_t):
    """Per-row KL ``[B, P, R]`` plus the per-row LSEs ``(lse_s, lse_t)`` (each ``[B, P, R]``) for backward."""
    B, _, N, _ = q_s.shape
    P, R = pairs.shape[0], rows.numel()
    dtype = compute_dtype(q_s, q_t)
    hs, ht = pairs[:, 0], pairs[:, 1]
    ks = k_s[:, hs].to(dtype)  # [B, P, N, ds]: O(B*P*N*d), not N^2
    kt = k_t[:, ht].to(dtype)
    kl = torch.empty(B, P, R, dtype=dtype, device=q_s.device)
    out_lse_s = torch.empty_like(kl)
    out_lse_t = torch.empty_like(kl)
    bc, rc = _plan(B, P, R, N)
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        for r0 in range(0, R, rc):
            r1 = min(R, r0 + rc)
            c = _Chunk(q_s, ks, q_t, kt, hs, ht, rows, key_mask, b0, b1, r0, r1, scale_s, scale_t, dtype)
            ls = _lse(c.s, _gather_lse(lse_s, hs, c.ridx, b0, b1, dtype))
            lt = _lse(c.t, _gather_lse(lse_t, ht, c.ridx, b0, b1, dtype))
            log_ps = c.s - ls[..., None]
            log_pt = c.t - lt[..., None]
            if reverse:
                val = (log_ps.exp() * c.masked_zero(log_ps - log_pt)).sum(-1)
            else:
                val = (log_pt.exp() * c.masked_zero(log_pt - log_ps)).sum(-1)
            kl[b0:b1, :, r0:r1] = val
            out_lse_s[b0:b1, :, r0:r1] = ls
            out_lse_t[b0:b1, :, r0:r1] = lt
            del c, log_ps, log_pt
    return kl, out_lse_s, out_lse_t


def attention_kl_backward(grad, q_s, k_s, q_t, k_t, pairs, rows, key_mask, scale_s, scale_t, reverse,
                          lse_s, lse_t, kl, *, unique_heads=None, unique_rows=None):
    """Gradients ``(dq_s, dk_s)`` of ``sum(grad * kl)``; ``lse_s, lse_t, kl`` are the forward's ``[B, P, R]``.

    ``unique_heads`` / ``unique_rows`` are not needed: the gradients are accumulated either way.
    """
    B, H_s, N, _ = q_s.shape
    P, R = pairs.shape[0], rows.numel()
    dtype = compute_dtype(q_s, q_t)
    hs, ht = pairs[:, 0], pairs[:, 1]
    ks = k_s[:, hs].to(dtype)
    kt = k_t[:, ht].to(dtype)
    grad = grad.to(dtype)
    dq = torch.zeros(q_s.shape, dtype=dtype, device=q_s.device)
    dk_pairs = torch.zeros(ks.shape, dtype=dtype, device=q_s.device)  # [B, P, N, ds]
    bc, rc = _plan(B, P, R, N)
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        for r0 in range(0, R, rc):
            r1 = min(R, r0 + rc)
            c = _Chunk(q_s, ks, q_t, kt, hs, ht, rows, key_mask, b0, b1, r0, r1, scale_s, scale_t, dtype)
            g = grad[b0:b1, :, r0:r1, None] * scale_s
            log_ps = c.s - lse_s[b0:b1, :, r0:r1, None]
            log_pt = c.t - lse_t[b0:b1, :, r0:r1, None]
            p_s = log_ps.exp()
            if reverse:
                ds = g * p_s * c.masked_zero(log_ps - log_pt - kl[b0:b1, :, r0:r1, None])
            else:
                ds = g * (p_s - log_pt.exp())
            dq_chunk = torch.matmul(ds, ks[b0:b1])  # [b, P, c, ds]
            dk_pairs[b0:b1] += torch.matmul(ds.transpose(-1, -2), c.qs)
            # dq[b, hs[p], ridx[c]] += dq_chunk[b, p, c]  (pairs may repeat a head, rows may repeat)
            heads_idx = hs[:, None].expand(P, r1 - r0)
            rows_idx = c.ridx[None, :].expand(P, r1 - r0)
            dq[b0:b1].permute(1, 2, 0, 3).index_put_(
                (heads_idx, rows_idx), dq_chunk.permute(1, 2, 0, 3), accumulate=True
            )
            del c, ds, log_ps, log_pt, p_s
    dk = torch.zeros(k_s.shape, dtype=dtype, device=k_s.device)
    dk.index_add_(1, hs, dk_pairs)
    return dq.to(q_s.dtype), dk.to(k_s.dtype)
