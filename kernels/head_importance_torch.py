"""Streaming torch head-importance statistics (CPU default): chunked over query rows, never the full map.

Same math as :mod:`fastkd.kernels.head_importance`: each chunk of query rows builds its ``[B, H, c, N]`` logits,
reduces them to per-row values and frees them, so memory is O(B*H*c*N) instead of O(B*H*N*N). No autograd.
"""

from __future__ import annotations

import torch

# elements of one [B, H, c, N] chunk (16 MiB in fp32): rows per chunk = max(1, CHUNK_ELEMENTS // (B*H*N)). Two
# such buffers live at a time; large enough that the chunked matmuls run at full speed on CPUs.
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(B: int, H: int, N: int, chunk_rows: int | None):
    c = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, B * H * N))
    for start in range(0, N, c):
        yield start, min(N, start + c)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.no_grad()
def attribution_rows(q, k, v, grad_out, scale: float, lse=None, *, chunk_rows: int | None = None) -> torch.Tensor:
    """Per query row ``sum_j |P_ij (dO_i . v_j)|``, ``[B, H, N]`` (fp32, fp64 for fp64 inputs)."""
    B, H, N, _ = q.shape
    dt = _compute_dtype(q)
    kt = k.to(dt).transpose(-1, -2)
    vt = v.to(dt).transpose(-1, -2)
    out = torch.empty(B, H, N, dtype=dt, device=q.device)
    for a, b in _row_chunks(B, H, N, chunk_rows):
        s = torch.matmul(q[:, :, a:b].to(dt), kt).mul_(scale)  # [B, H, c, N]
        if lse is None:
            p = torch.softmax(s, dim=-1)  # one fused pass; s is freed when rebound below
        else:
            p = s.sub_(lse[:, :, a:b, None].to(dt)).exp_()
        del s
        dp = torch.matmul(grad_out[:, :, a:b].to(dt), vt)
        out[:, :, a:b] = p.mul_(dp).abs_().sum(-1)
    return out


@torch.no_grad()
def entropy_rows(q, k, scale: float, lse=None, *, chunk_rows: int | None = None) -> torch.Tensor:
    """Per query row attention entropy ``-sum_j P_ij log P_ij`` (nats), ``[B, H, N]``."""
    B, H, N, _ = q.shape
    dt = _compute_dtype(q)
    kt = k.to(dt).transpose(-1, -2)
    out = torch.empty(B, H, N, dtype=dt, device=q.device)
    for a, b in _row_chunks(B, H, N, chunk_rows):
        s = torch.matmul(q[:, :, a:b].to(dt), kt).mul_(scale)
        if lse is None:
            log_p = torch.log_softmax(s, dim=-1)  # H = -sum p log p
        else:
            log_p = s.sub_(lse[:, :, a:b, None].to(dt))  # log p = s - lse, in place
        del s
        out[:, :, a:b] = -log_p.exp().mul_(log_p).sum(-1)
    return out


def attribution_importance(q, k, v, grad_out, scale: float, lse=None, *, chunk_rows: int | None = None):
    """Per sample and head ``sum_ij |P_ij (dO_i . v_j)|``, ``[B, H]``."""
    return attribution_rows(q, k, v, grad_out, scale, lse, chunk_rows=chunk_rows).sum(-1)


def entropy_importance(q, k, scale: float, lse=None, *, chunk_rows: int | None = None):
    """Per sample and head mean row entropy, ``[B, H]``."""
    return entropy_rows(q, k, scale, lse, chunk_rows=chunk_rows).mean(-1)


def gradient_importance(out, grad_out):
    """Michel et al. 2019: ``|sum_{i,c} O[i,c] dO[i,c]|`` per sample and head, ``[B, H]``."""
    with torch.no_grad():
        dt = _compute_dtype(out)
        return torch.einsum("bhnd,bhnd->bh", out.to(dt), grad_out.to(dt)).abs()
