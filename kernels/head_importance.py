"""Streaming head-importance statistics: attention attribution and attention entropy, never storing P.

Layers: the ``@triton.jit`` kernel, the launchers ``attribution_rows`` / ``entropy_rows`` and the per-head
reductions ``attribution_importance`` / ``entropy_importance``. The public, validated entry points are in
:mod:`fastkd.importance.ops` (re-exported by :mod:`fastkd.functional`). These are statistics, not losses:
no autograd (inputs are read as they are; outputs carry no graph).

Inputs follow the attention taps: ``q, k, v, dO`` ``[B, H, N, d]`` with any strides, ``lse`` ``[B, H, N]``
(natural log of sum_j exp(scale q_i . k_j)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd.kernels._common import device_guard
from fastkd.kernels._common import head_block
from fastkd.kernels._common import interpret
from fastkd.kernels._common import next_pow2
from fastkd.kernels._common import upcast_inputs

# ---------------------------------------------------------------------------------------------------------
# Math. Per (batch b, head h, query row i), logits s_j = scale q_i . k_j, P_ij = exp(s_j - lse_i).
#
# attribution (SCORE=0):  a_i = sum_j |P_ij * dP_ij|,  dP_ij = dO_i . v_j   (= dL/dP_ij when O = P V)
#     needs the row's LSE first: either given, or a first pass over key blocks with a running max m and
#     Z = sum e^(s - m) (rescaled by e^(m_old - m_new) when m grows); lse = m + ln Z. The second pass
#     recomputes each tile of P from the LSE and accumulates |P * (dO V^T)|.
# entropy (SCORE=1):      H_i = -sum_j P_ij log P_ij = lse_i - sum_j P_ij s_j
#     one pass: with a given LSE, accumulate sum e^(s - lse) s; otherwise keep m, Z and A = sum e^(s - m) s
#     (both rescaled when m grows) and finish with H = m + ln Z - A / Z.
# Per-row results go to a [B*H, N] fp32 buffer; the per-head sums / means are a tiny torch reduction
# (deterministic, no atomics).
# ---------------------------------------------------------------------------------------------------------

NEG_BIG = tl.constexpr(-1.0e30)  # finite running-max start: e^(m_old - m_new) never sees (-inf) - (-inf)


@triton.jit
def _load_tile(ptr, base, offs_r, r_ok, offs_d, D, stride_r, stride_d, UPCAST: tl.constexpr):
    # [R, D] tile of rows offs_r (masked rows / padded head-dim columns read as 0)
    x = tl.load(
        ptr + base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d,
        mask=r_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_tile_t(ptr, base, offs_r, r_ok, offs_d, D, stride_r, stride_d, UPCAST: tl.constexpr):
    # transposed [D, R] tile, ready as the right operand of q @ k^T
    x = tl.load(
        ptr + base + offs_r[None, :] * stride_r + offs_d[:, None] * stride_d,
        mask=r_ok[None, :] & (offs_d[:, None] < D),
        other=0.0,
    )
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _head_importance_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    OUT,  #
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,  #
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,  #
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,  #
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,  #
    stride_lb,
    stride_lh,
    stride_ln,  #
    H,
    N,
    D,
    DV,
    scale,  #
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,  #
    SCORE: tl.constexpr,
    HAS_LSE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,  #
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q, b * stride_qb + h * stride_qh, offs_m, row_ok, offs_d, D, stride_qn, stride_qd, UPCAST)
    k_base = b * stride_kb + h * stride_kh

    if HAS_LSE:
        lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=row_ok, other=0.0)
        lse = lse.to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
        z_i = tl.zeros([BLOCK_M], tl.float32)
        a_i = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = offs_n < N
            kt = _load_tile_t(K, k_base, offs_n, key_ok, offs_d, D, stride_kn, stride_kd, UPCAST)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale
            valid = key_ok[None, :]
            s_inf = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_inf, 1))
            alpha = tl.exp(m_i - m_new)
            e = tl.exp(s_inf - m_new[:, None])
            z_i = z_i * alpha + tl.sum(e, 1)
            if SCORE == 1:
                a_i = a_i * alpha + tl.sum(e * tl.where(valid, s, 0.0), 1)
            m_i = m_new
        lse = m_i + tl.log(tl.where(z_i > 0.0, z_i, 1.0))

    if SCORE == 0:
        do = _load_tile(DO, b * stride_ob + h * stride_oh, offs_m, row_ok, offs_dv, DV, stride_on, stride_od, UPCAST)
        v_base = b * stride_vb + h * stride_vh
        acc = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = offs_n < N
            kt = _load_tile_t(K, k_base, offs_n, key_ok, offs_d, D, stride_kn, stride_kd, UPCAST)
            vt = _load_tile_t(V, v_base, offs_n, key_ok, offs_dv, DV, stride_vn, stride_vd, UPCAST)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale
            p = tl.where(key_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            acc += tl.sum(tl.abs(p * dp), 1)
        res = acc
    else:
        if HAS_LSE:
            acc = tl.zeros([BLOCK_M], tl.float32)
            for start_n in range(0, N, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                key_ok = offs_n < N
                kt = _load_tile_t(K, k_base, offs_n, key_ok, offs_d, D, stride_kn, stride_kd, UPCAST)
                s = tl.dot(q, kt, input_precision=PRECISION) * scale
                s = tl.where(key_ok[None, :], s, 0.0)
                p = tl.where(key_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
                acc += tl.sum(p * s, 1)
            res = lse - acc
        else:
            res = lse - a_i / tl.where(z_i > 0.0, z_i, 1.0)
    tl.store(OUT + pid_bh.to(tl.int64) * N + offs_m, res, mask=row_ok)


# ------------------------------------------------------------------------------------------------- launchers


def _blocks(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 64-wide tiles on GPUs (N=197 pads to 256 keys); the interpreter runs
    each tile as numpy, so it prefers few, larger tiles."""
    if interpret():
        return max(16, min(64, next_pow2(N))), max(16, min(128, next_pow2(N))), 4
    return max(16, min(64, next_pow2(N))), 64, 4


def _precision(*tensors: torch.Tensor) -> str:
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) or interpret() else "tf32"


def _launch(score: int, q, k, v, do, lse, scale: float) -> torch.Tensor:
    B, H, N, D = q.shape
    out = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        return out
    has_lse = lse is not None
    v_ = v if v is not None else k
    do_ = do if do is not None else q
    lse_ = lse if has_lse else out
    DV = v_.shape[-1]
    BLOCK_M, BLOCK_N, warps = _blocks(N)
    grid = (triton.cdiv(N, BLOCK_M), B * H)
    with device_guard(q):
        _head_importance_kernel[grid](
            q, k, v_, do_, lse_, out,
            *q.stride(), *k.stride(), *v_.stride(), *do_.stride(),
            *(lse_.stride() if has_lse else (0, 0, 0)),
            H, N, D, DV, float(scale),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=head_block(D), BLOCK_DV=head_block(DV),
            SCORE=score, HAS_LSE=has_lse, UPCAST=upcast_inputs(q, k, v_, do_), PRECISION=_precision(q, k, v_, do_),
            num_warps=warps,
        )  # fmt: skip
    return out


@torch.no_grad()
def attribution_rows(q, k, v, grad_out, scale: float, lse=None) -> torch.Tensor:
    """Per query row ``sum_j |P_ij (dO_i . v_j)|``, fp32 ``[B, H, N]``."""
    return _launch(0, q, k, v, grad_out, lse, scale)


@torch.no_grad()
def entropy_rows(q, k, scale: float, lse=None) -> torch.Tensor:
    """Per query row attention entropy ``-sum_j P_ij log P_ij`` (nats), fp32 ``[B, H, N]``."""
    return _launch(1, q, k, None, None, lse, scale)


def attribution_importance(q, k, v, grad_out, scale: float, lse=None) -> torch.Tensor:
    """Per sample and head ``sum_ij |P_ij (dO_i . v_j)|``, fp32 ``[B, H]``."""
    return attribution_rows(q, k, v, grad_out, scale, lse).sum(-1)


def entropy_importance(q, k, scale: float, lse=None) -> torch.Tensor:
    """Per sample and head mean row entropy, fp32 ``[B, H]``."""
    return entropy_rows(q, k, scale, lse).mean(-1)


def gradient_importance(out, grad_out) -> torch.Tensor:
    """Michel et al. 2019: ``|sum_{i,c} O[i,c] dO[i,c]|`` per sample and head, fp32 ``[B, H]``.

    A reduction over ``B*H*N*d`` with no attention map (FlashAttention's ``D_i = rowsum(dO * O)`` summed over
    rows); the same torch code serves every device.
    """
    with torch.no_grad():
        return torch.einsum("bhnd,bhnd->bh", out.float(), grad_out.float()).abs()
