"""Streaming torch head-importance statistics (CPU default): chunked over query rows, never the full map.

Same math as :mod:`fastkd.kernels.head_importance`: each chunk of query rows builds its ``[B, H, c, N]`` logits,
reduces them to per-row values and frees them, so memory is O(B*H*c*N) instead of O(B*H*N*N). No autograd.
``attribution_rows`` / ``entropy_rows`` are this backend's entry points for :mod:`fastkd.custom_ops`.
"""

from __future__ import annotations

import torch

from fastkd.kernels._torch_common import chunk_elems
from fastkd.kernels._torch_common import compute_dtype
from fastkd.kernels._torch_common import rows_per_chunk

# logits in one [B, H, c, N] chunk (16 MiB in fp32; FASTKD_TORCH_CHUNK_ELEMS overrides it). Two such buffers
# live at a time; large enough that the chunked matmuls run at full speed on CPUs.
DEFAULT_CHUNK_ELEMS = 1 << 22


def _row_chunks(B: int, H: int, N: int):
    c = rows_per_chunk(chunk_elems(DEFAULT_CHUNK_ELEMS), N, B * H * N)
    for start in range(0, N, c):
        yield start, min(N, start + c)


@torch.no_grad()
def attribution_rows(q, k, v, grad_out, scale: float, lse=None) -> torch.Tensor:
    """Per query row ``sum_j |P_ij (dO_i . v_j)|``, ``[B, H, N]`` (fp32, fp64 for fp64 inputs)."""
    B, H, N, _ = q.shape
    dt = compute_dtype(q)
    kt = k.to(dt).transpose(-1, -2)
    vt = v.to(dt).transpose(-1, -2)
    out = torch.empty(B, H, N, dtype=dt, device=q.device)
    for a, b in _row_chunks(B, H, N):
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
def entropy_rows(q, k, scale: float, lse=None) -> torch.Tensor:
    """Per query row attention entropy ``-sum_j P_ij log P_ij`` (nats), ``[B, H, N]``."""
    B, H, N, _ = q.shape
    dt = compute_dtype(q)
    kt = k.to(dt).transpose(-1, -2)
    out = torch.empty(B, H, N, dtype=dt, device=q.device)
    for a, b in _row_chunks(B, H, N):
        s = torch.matmul(q[:, :, a:b].to(dt), kt).mul_(scale)
        if lse is None:
            log_p = torch.log_softmax(s, dim=-1)  # H = -sum p log p
        else:
            log_p = s.sub_(lse[:, :, a:b, None].to(dt))  # log p = s - lse, in place
        del s
        out[:, :, a:b] = -log_p.exp().mul_(log_p).sum(-1)
    return out


def attribution_importance(q, k, v, grad_out, scale: float, lse=None):
    """Per sample and head ``sum_ij |P_ij (dO_i . v_j)|``, ``[B, H]``."""
    return attribution_rows(q, k, v, grad_out, scale, lse).sum(-1)


def entropy_importance(q, k, scale: float, lse=None):
    """Per sample and head mean row entropy, ``[B, H]``."""
    return entropy_rows(q, k, scale, lse).mean(-1)
