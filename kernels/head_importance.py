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

from fastkd.kernels._common import blocks
from fastkd.kernels._common import device_guard
from fastkd.kernels._common import head_block
from fastkd.kernels._common import online_step
from fastkd.kernels._common import positive_scale
from fastkd.kernels._common import precision
from fastkd.kernels._common import splits
from fastkd.kernels._common import tail_block
from fastkd.kernels._common import tile as _tile
from fastkd.kernels._common import upcast_inputs
from fastkd.kernels._common import warps_for

# ---------------------------------------------------------------------------------------------------------
# Math. Per (batch b, head h, query row i), logits s_j = scale q_i . k_j, P_ij = exp(s_j - lse_i).
#
# attribution (SCORE=0):  a_i = sum_j |P_ij * dP_ij| = sum_j P_ij |dP_ij|   (P >= 0),  dP_ij = dO_i . v_j
# entropy (SCORE=1):      H_i = -sum_j P_ij log P_ij = lse_i - sum_j P_ij s_j
# Both in one online pass over key blocks: a running max m, Z = sum e^(s - m) and A = sum e^(s - m) w_j
# (w = |dP| or s), rescaled by e^(m_old - m_new) when m grows; a = A / Z, H = m + ln Z - A / Z. A given LSE
# fixes m = lse (no rescaling). Inside the kernel logits and LSEs are in log2 units (log2(e) folded into the
# scale, bare ex2; running maxima on the unscaled dot products, the scale applied once in each exponent's
# argument, so the scale must be positive); the main loop runs over full tiles without masks, the partial last
# tile is peeled and narrow.
# Per-row results go to a [B*H, N] fp32 buffer; the per-head sums / means are a tiny torch reduction
# (deterministic, no atomics).
# ---------------------------------------------------------------------------------------------------------

NEG_BIG = tl.constexpr(-1.0e30)  # finite running-max start: 2^(m_old - m_new) never sees (-inf) - (-inf)
LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _hi_tile(q, do, K, V, k_base, v_base, start_n, N, D, DV, stride_kn, stride_kd, stride_vn, stride_vd, scale,
             offs_d, offs_dv, m_i, z_i, a_i, WIDTH: tl.constexpr, MASKED: tl.constexpr, SCORE: tl.constexpr,
             HAS_LSE: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, WIDTH)
    key_ok = offs_n < N
    kt = _tile(K, k_base, offs_n, key_ok, offs_d, D, stride_kn, stride_kd, MASKED, EVEN_D, UPCAST, True)
    s = tl.dot(q, kt, input_precision=PRECISION)  # unscaled: online_step applies the (log2-unit) scale
    if SCORE == 0:
        vt = _tile(V, v_base, offs_n, key_ok, offs_dv, DV, stride_vn, stride_vd, MASKED, EVEN_D, UPCAST, True)
        w = tl.abs(tl.dot(do, vt, input_precision=PRECISION))
    else:
        w = s  # entropy: the sum of P * raw, scaled once per row at the end
    if MASKED:
        w = tl.where(key_ok[None, :], w, 0.0)
        s = tl.where(key_ok[None, :], s, float("-inf"))
    return online_step(s, scale, w, m_i, z_i, a_i, HAS_LSE)


@triton.jit
def _head_importance_kernel(
    Q, K, V, DO, LSE, OUT,  #
    stride_qb, stride_qh, stride_qn, stride_qd,  #
    stride_kb, stride_kh, stride_kn, stride_kd,  #
    stride_vb, stride_vh, stride_vn, stride_vd,  #
    stride_ob, stride_oh, stride_on, stride_od,  #
    stride_lb, stride_lh, stride_ln,  #
    H, N, D, DV, scale, ROW0,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, ROW_TAIL: tl.constexpr,  #
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr,  #
    SCORE: tl.constexpr, HAS_LSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,  #
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _tile(Q, b * stride_qb + h * stride_qh, offs_m, row_ok, offs_d, D, stride_qn, stride_qd, ROW_TAIL, EVEN_D,
              UPCAST, False)
    if SCORE == 0:
        do = _tile(DO, b * stride_ob + h * stride_oh, offs_m, row_ok, offs_dv, DV, stride_on, stride_od, ROW_TAIL,
                   EVEN_D, UPCAST, False)
    else:
        do = q  # unused
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    if HAS_LSE:
        m_i = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=row_ok, other=0.0)
        m_i = m_i.to(tl.float32) * 1.4426950408889634
    else:
        m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    z_i = tl.zeros([BLOCK_M], tl.float32)
    a_i = tl.zeros([BLOCK_M], tl.float32)
    n_full = N - N % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, z_i, a_i = _hi_tile(q, do, K, V, k_base, v_base, start_n, N, D, DV, stride_kn, stride_kd, stride_vn,
                                 stride_vd, scale, offs_d, offs_dv, m_i, z_i, a_i, BLOCK_N, False, SCORE, HAS_LSE,
                                 EVEN_D, UPCAST, PRECISION)
    if BLOCK_T > 0:
        m_i, z_i, a_i = _hi_tile(q, do, K, V, k_base, v_base, n_full, N, D, DV, stride_kn, stride_kd, stride_vn,
                                 stride_vd, scale, offs_d, offs_dv, m_i, z_i, a_i, BLOCK_T, True, SCORE, HAS_LSE,
                                 EVEN_D, UPCAST, PRECISION)
    safe_z = tl.where(z_i > 0.0, z_i, 1.0)
    if SCORE == 0:
        res = a_i / safe_z
    else:
        res = (m_i + tl.log2(safe_z) - a_i / safe_z * scale) * LN2
    tl.store(OUT + pid_bh.to(tl.int64) * N + offs_m, res, mask=row_ok)


# ------------------------------------------------------------------------------------------------- launchers


def _launch(score: int, q, k, v, do, lse, scale: float) -> torch.Tensor:
    scale = positive_scale("scale", scale)  # the kernel's maxima run on unscaled dot products
    B, H, N, D = q.shape
    out = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        return out
    has_lse = lse is not None
    v_ = v if v is not None else k
    do_ = do if do is not None else q
    lse_ = lse if has_lse else out
    DV = v_.shape[-1]
    upcast = upcast_inputs(q, k, v_, do_)
    BLOCK_M, BLOCK_N = blocks(N, N, fp32=upcast)
    with device_guard(q):
        for row0, programs, bm, tail in splits(N, BLOCK_M):
            _head_importance_kernel[(programs, B * H)](
                q, k, v_, do_, lse_, out,
                *q.stride(), *k.stride(), *v_.stride(), *do_.stride(),
                *(lse_.stride() if has_lse else (0, 0, 0)),
                H, N, D, DV, scale * LOG2E, row0,
                BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_T=tail_block(N, BLOCK_N), ROW_TAIL=tail,
                BLOCK_D=head_block(D), BLOCK_DV=head_block(DV), EVEN_D=head_block(D) == D and head_block(DV) == DV,
                SCORE=score, HAS_LSE=has_lse, UPCAST=upcast, PRECISION=precision((q, k, v_, do_), False),
                num_warps=warps_for(upcast),
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
