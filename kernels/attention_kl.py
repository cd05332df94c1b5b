"""Fused attention-KL: KL between teacher and student attention rows, streamed over key blocks.

Layers (top to bottom): the ``@triton.jit`` kernels and the launchers ``attention_kl_forward`` /
``attention_kl_backward``, which are this backend's entry points for the ``fastkd::attention_kl`` custom op
(:mod:`fastkd.custom_ops`, autograd included). The public, validated entry point is
:func:`fastkd.functional.attention_kl`.

Nothing of size N x N is ever stored: the forward keeps per-row running sums, the backward recomputes each
tile from the two saved per-row LSEs (FlashAttention's backward without V).
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
# Math. Per (batch b, head pair p, query row i), with student logits s_j = scale_s * q_s,i . k_s,j and teacher
# logits t_j = scale_t * q_t,i . k_t,j over the kept keys j. Let a be the logits of the target distribution
# (a = t for direction "forward", i.e. KL(P_t || P_s); a = s for "reverse") and b the other one:
#
#     KL_i = sum_j p_j (a_j - b_j) - lse_a + lse_b,        p = softmax(a)
#
# Forward, one pass over key blocks with running maxima m_a, m_b and sums
#     Z_a = sum e^(a - m_a),   Z_b = sum e^(b - m_b),   A = sum e^(a - m_a) (a - b),
# rescaled by e^(m_old - m_new) whenever a maximum grows; at the end lse = m + ln Z, KL = A / Z_a - lse_a + lse_b.
# A given LSE (from the attention forward) fixes m for that side: no running max; for the "other" side it
# also removes its exponential altogether.
#
# Backward (student only, teacher frozen), from the saved lse_s, lse_t (and KL for "reverse"):
#     forward:  dS_ij = g_i scale_s (p^s_ij - p^t_ij)
#     reverse:  dS_ij = g_i scale_s p^s_ij (log p^s_ij - log p^t_ij - KL_i)
#     dQ_s,i = sum_j dS_ij k_s,j        dK_s,j = sum_i dS_ij q_s,i
# ---------------------------------------------------------------------------------------------------------

NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so e^(m_old - m_new) never sees (-inf) - (-inf)


@triton.jit
def _load_rows(ptr, b, h, rows, row_ok, offs_d, D, stride_b, stride_h, stride_n, stride_d, UPCAST: tl.constexpr):
    off = b * stride_b + h * stride_h
    x = tl.load(
        ptr + off + rows[:, None] * stride_n + offs_d[None, :] * stride_d,
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _logits(q, k_t_tile, scale, PRECISION: tl.constexpr):
    # q: [M, D], k_t_tile: [D, N] -> scale * q @ k^T in fp32
    return tl.dot(q, k_t_tile, input_precision=PRECISION) * scale


@triton.jit
def _attention_kl_fwd_kernel(
    QS, KS, QT, KT, PAIRS, ROWS, MASK, LSE_A_IN, LSE_B_IN,  #
    KL, LSE_S_OUT, LSE_T_OUT,  #
    stride_qsb, stride_qsh, stride_qsn, stride_qsd,  #
    stride_ksb, stride_ksh, stride_ksn, stride_ksd,  #
    stride_qtb, stride_qth, stride_qtn, stride_qtd,  #
    stride_ktb, stride_kth, stride_ktn, stride_ktd,  #
    stride_mb, stride_mn,  #
    stride_lab, stride_lah, stride_lan,  #
    stride_lbb, stride_lbh, stride_lbn,  #
    N, R, P, DS, DT, scale_s, scale_t,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,  #
    HAS_MASK: tl.constexpr, HAS_LSE_A: tl.constexpr, HAS_LSE_B: tl.constexpr, REVERSE: tl.constexpr,  #
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,  #
):
    pid_m = tl.program_id(0)
    pid_bp = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = pid_bp % P
    hs = tl.load(PAIRS + 2 * p).to(tl.int64)
    ht = tl.load(PAIRS + 2 * p + 1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    rows = tl.load(ROWS + offs_m, mask=row_ok, other=0).to(tl.int64)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    qs = _load_rows(QS, b, hs, rows, row_ok, offs_ds, DS, stride_qsb, stride_qsh, stride_qsn, stride_qsd, UPCAST)
    qt = _load_rows(QT, b, ht, rows, row_ok, offs_dt, DT, stride_qtb, stride_qth, stride_qtn, stride_qtd, UPCAST)
    # which head the given LSEs are read from: a = t, b = s (forward) or a = s, b = t (reverse)
    if REVERSE:
        ha = hs
        hb = ht
    else:
        ha = ht
        hb = hs

    if HAS_LSE_A:
        m_a = tl.load(LSE_A_IN + b * stride_lab + ha * stride_lah + rows * stride_lan, mask=row_ok, other=0.0)
        m_a = m_a.to(tl.float32)
    else:
        m_a = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    if HAS_LSE_B:
        lse_b = tl.load(LSE_B_IN + b * stride_lbb + hb * stride_lbh + rows * stride_lbn, mask=row_ok, other=0.0)
        lse_b = lse_b.to(tl.float32)
        m_b = lse_b
    else:
        m_b = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    z_a = tl.zeros([BLOCK_M], tl.float32)
    z_b = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)

    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < N
        if HAS_MASK:
            keep = tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=key_ok, other=0)
            key_ok = key_ok & (keep != 0)
        ks = tl.load(
            KS + b * stride_ksb + hs * stride_ksh + offs_n[None, :] * stride_ksn + offs_ds[:, None] * stride_ksd,
            mask=(offs_n[None, :] < N) & (offs_ds[:, None] < DS),
            other=0.0,
        )
        kt = tl.load(
            KT + b * stride_ktb + ht * stride_kth + offs_n[None, :] * stride_ktn + offs_dt[:, None] * stride_ktd,
            mask=(offs_n[None, :] < N) & (offs_dt[:, None] < DT),
            other=0.0,
        )
        if UPCAST:
            ks = ks.to(tl.float32)
            kt = kt.to(tl.float32)
        s = _logits(qs, ks, scale_s, PRECISION)
        t = _logits(qt, kt, scale_t, PRECISION)
        if REVERSE:
            la = s
            lb = t
        else:
            la = t
            lb = s
        valid = key_ok[None, :]
        diff = tl.where(valid, la - lb, 0.0)
        la = tl.where(valid, la, float("-inf"))
        lb = tl.where(valid, lb, float("-inf"))
        if HAS_LSE_A:
            e_a = tl.exp(la - m_a[:, None])
            z_a += tl.sum(e_a, 1)
            acc += tl.sum(e_a * diff, 1)
        else:
            m_new = tl.maximum(m_a, tl.max(la, 1))
            alpha = tl.exp(m_a - m_new)
            e_a = tl.exp(la - m_new[:, None])
            z_a = z_a * alpha + tl.sum(e_a, 1)
            acc = acc * alpha + tl.sum(e_a * diff, 1)
            m_a = m_new
        if not HAS_LSE_B:
            m_new_b = tl.maximum(m_b, tl.max(lb, 1))
            z_b = z_b * tl.exp(m_b - m_new_b) + tl.sum(tl.exp(lb - m_new_b[:, None]), 1)
            m_b = m_new_b

    has_keys = z_a > 0.0
    safe_z = tl.where(has_keys, z_a, 1.0)
    lse_a = tl.where(has_keys, m_a + tl.log(safe_z), float("inf"))
    if not HAS_LSE_B:
        lse_b = tl.where(z_b > 0.0, m_b + tl.log(tl.where(z_b > 0.0, z_b, 1.0)), float("inf"))
    # rows without keys: lse = +inf on both sides; keep inf - inf out of the arithmetic
    kl = tl.where(has_keys, acc / safe_z - tl.where(has_keys, lse_a, 0.0) + tl.where(has_keys, lse_b, 0.0), 0.0)
    out = pid_bp.to(tl.int64) * R + offs_m
    tl.store(KL + out, kl, mask=row_ok)
    if REVERSE:
        tl.store(LSE_S_OUT + out, lse_a, mask=row_ok)
        tl.store(LSE_T_OUT + out, lse_b, mask=row_ok)
    else:
        tl.store(LSE_S_OUT + out, lse_b, mask=row_ok)
        tl.store(LSE_T_OUT + out, lse_a, mask=row_ok)


@triton.jit
def _dscores(s, t, lse_s, lse_t, g, kl, valid, REVERSE: tl.constexpr):
    # dKL/ds times the upstream gradient and scale_s (both folded into g), from raw logits: [M, N] fp32
    log_ps = s - lse_s[:, None]
    log_pt = t - lse_t[:, None]
    p_s = tl.where(valid, tl.exp(log_ps), 0.0)
    if REVERSE:
        ds = p_s * tl.where(valid, log_ps - log_pt - kl[:, None], 0.0)
    else:
        ds = p_s - tl.where(valid, tl.exp(log_pt), 0.0)
    return ds * g[:, None]


@triton.jit
def _attention_kl_bwd_dq_kernel(
    QS, KS, QT, KT, PAIRS, ROWS, MASK, LSE_S, LSE_T, KL, GRAD, DQ,  #
    stride_ob, stride_oh, stride_on, stride_od,  #
    stride_qsb, stride_qsh, stride_qsn, stride_qsd,  #
    stride_ksb, stride_ksh, stride_ksn, stride_ksd,  #
    stride_qtb, stride_qth, stride_qtn, stride_qtd,  #
    stride_ktb, stride_kth, stride_ktn, stride_ktd,  #
    stride_mb, stride_mn,  #
    N, R, P, DS, DT, scale_s, scale_t,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,  #
    HAS_MASK: tl.constexpr, REVERSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,  #
    DIRECT: tl.constexpr,  #
):
    pid_m = tl.program_id(0)
    pid_bp = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = pid_bp % P
    hs = tl.load(PAIRS + 2 * p).to(tl.int64)
    ht = tl.load(PAIRS + 2 * p + 1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    rows = tl.load(ROWS + offs_m, mask=row_ok, other=0).to(tl.int64)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    qs = _load_rows(QS, b, hs, rows, row_ok, offs_ds, DS, stride_qsb, stride_qsh, stride_qsn, stride_qsd, UPCAST)
    qt = _load_rows(QT, b, ht, rows, row_ok, offs_dt, DT, stride_qtb, stride_qth, stride_qtn, stride_qtd, UPCAST)
    row_out = pid_bp.to(tl.int64) * R + offs_m
    lse_s = tl.load(LSE_S + row_out, mask=row_ok, other=1.0e30)
    lse_t = tl.load(LSE_T + row_out, mask=row_ok, other=1.0e30)
    g = tl.load(GRAD + row_out, mask=row_ok, other=0.0) * scale_s
    kl = tl.zeros([BLOCK_M], tl.float32)
    if REVERSE:
        kl = tl.load(KL + row_out, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < N
        if HAS_MASK:
            keep = tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=key_ok, other=0)
            key_ok = key_ok & (keep != 0)
        ks = tl.load(
            KS + b * stride_ksb + hs * stride_ksh + offs_n[:, None] * stride_ksn + offs_ds[None, :] * stride_ksd,
            mask=(offs_n[:, None] < N) & (offs_ds[None, :] < DS),
            other=0.0,
        )
        kt = tl.load(
            KT + b * stride_ktb + ht * stride_kth + offs_n[None, :] * stride_ktn + offs_dt[:, None] * stride_ktd,
            mask=(offs_n[None, :] < N) & (offs_dt[:, None] < DT),
            other=0.0,
        )
        if UPCAST:
            ks = ks.to(tl.float32)
            kt = kt.to(tl.float32)
        valid = key_ok[None, :]
        s = _logits(qs, tl.trans(ks), scale_s, PRECISION)
        t = _logits(qt, kt, scale_t, PRECISION)
        ds = _dscores(s, t, lse_s, lse_t, g, kl, valid, REVERSE)
        dq += tl.dot(ds.to(ks.dtype), ks, input_precision=PRECISION)
    # DIRECT: straight into dq_s[b, h_s, row] (student heads and rows unique); else into the [B, P, R, d_s] buffer
    if DIRECT:
        d_out = DQ + b * stride_ob + hs * stride_oh + rows[:, None] * stride_on + offs_ds[None, :] * stride_od
    else:
        d_out = DQ + b * stride_ob + p * stride_oh + offs_m[:, None] * stride_on + offs_ds[None, :] * stride_od
    tl.store(d_out, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_ds[None, :] < DS))


@triton.jit
def _attention_kl_bwd_dk_kernel(
    QS, KS, QT, KT, PAIRS, ROWS, MASK, LSE_S, LSE_T, KL, GRAD, DK,  #
    stride_ob, stride_oh, stride_on, stride_od,  #
    stride_qsb, stride_qsh, stride_qsn, stride_qsd,  #
    stride_ksb, stride_ksh, stride_ksn, stride_ksd,  #
    stride_qtb, stride_qth, stride_qtn, stride_qtd,  #
    stride_ktb, stride_kth, stride_ktn, stride_ktd,  #
    stride_mb, stride_mn,  #
    N, R, P, DS, DT, scale_s, scale_t,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,  #
    HAS_MASK: tl.constexpr, REVERSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,  #
    DIRECT: tl.constexpr,  #
):
    pid_n = tl.program_id(0)
    pid_bp = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = pid_bp % P
    hs = tl.load(PAIRS + 2 * p).to(tl.int64)
    ht = tl.load(PAIRS + 2 * p + 1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_in = offs_n < N
    key_ok = key_in
    if HAS_MASK:
        keep = tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=key_in, other=0)
        key_ok = key_ok & (keep != 0)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    # this program's keys, loaded once: ks as [N, DS] (for dK's layout), both transposed for the logits
    ks = _load_rows(KS, b, hs, offs_n, key_in, offs_ds, DS, stride_ksb, stride_ksh, stride_ksn, stride_ksd, UPCAST)
    kt = _load_rows(KT, b, ht, offs_n, key_in, offs_dt, DT, stride_ktb, stride_kth, stride_ktn, stride_ktd, UPCAST)
    valid = key_ok[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    for start_m in range(0, R, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < R
        rows = tl.load(ROWS + offs_m, mask=row_ok, other=0).to(tl.int64)
        qs = _load_rows(QS, b, hs, rows, row_ok, offs_ds, DS, stride_qsb, stride_qsh, stride_qsn, stride_qsd, UPCAST)
        qt = _load_rows(QT, b, ht, rows, row_ok, offs_dt, DT, stride_qtb, stride_qth, stride_qtn, stride_qtd, UPCAST)
        row_out = pid_bp.to(tl.int64) * R + offs_m
        lse_s = tl.load(LSE_S + row_out, mask=row_ok, other=1.0e30)
        lse_t = tl.load(LSE_T + row_out, mask=row_ok, other=1.0e30)
        g = tl.load(GRAD + row_out, mask=row_ok, other=0.0) * scale_s
        kl = tl.zeros([BLOCK_M], tl.float32)
        if REVERSE:
            kl = tl.load(KL + row_out, mask=row_ok, other=0.0)
        # padding rows (beyond R) count as masked, so no 0 * (inf - inf) reaches the sum over rows
        tile_ok = valid & row_ok[:, None]
        s = _logits(qs, tl.trans(ks), scale_s, PRECISION)
        t = _logits(qt, tl.trans(kt), scale_t, PRECISION)
        ds = _dscores(s, t, lse_s, lse_t, g, kl, tile_ok, REVERSE)
        dk += tl.dot(tl.trans(ds.to(qs.dtype)), qs, input_precision=PRECISION)
    if DIRECT:
        d_out = DK + b * stride_ob + hs * stride_oh + offs_n[:, None] * stride_on + offs_ds[None, :] * stride_od
    else:
        d_out = DK + b * stride_ob + p * stride_oh + offs_n[:, None] * stride_on + offs_ds[None, :] * stride_od
    tl.store(d_out, dk.to(DK.dtype.element_ty), mask=key_in[:, None] & (offs_ds[None, :] < DS))


# ------------------------------------------------------------------------------------------------- launchers


def gpu_blocks(R: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for compiled kernels: 64-wide tiles (N=197 pads to 256); row blocks shrink
    for short row subsets (CLS row only)."""
    return max(16, min(64, next_pow2(R))), 64, 4


def _blocks(R: int, N: int) -> tuple[int, int, int]:
    """The interpreter runs each tile as numpy, so it prefers few, larger tiles."""
    if interpret():
        return max(16, min(64, next_pow2(R))), max(16, min(128, next_pow2(N))), 4
    return gpu_blocks(R, N)


def _precision(*tensors: torch.Tensor) -> str:
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) or interpret() else "tf32"


def _strides4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


def _mask_args(key_mask: torch.Tensor | None, like: torch.Tensor):
    if key_mask is None:
        return like, 0, 0, False  # pointer never read
    m = key_mask if key_mask.dtype == torch.uint8 else key_mask.to(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def attention_kl_forward(q_s, k_s, q_t, k_t, pairs, rows, key_mask, scale_s, scale_t, reverse, lse_s, lse_t):
    """Launch the forward kernel. Returns ``(kl, lse_s_rows, lse_t_rows)``, each fp32 ``[B, P, R]``."""
    B, _, N, DS = q_s.shape
    DT = q_t.shape[-1]
    P, R = pairs.shape[0], rows.numel()
    dev = q_s.device
    kl = torch.empty(B, P, R, dtype=torch.float32, device=dev)
    out_s = torch.empty_like(kl)
    out_t = torch.empty_like(kl)
    if B * P * R == 0:
        return kl, out_s, out_t
    pairs32 = pairs.to(device=dev, dtype=torch.int32).contiguous()
    rows32 = rows.to(device=dev, dtype=torch.int32).contiguous()
    mask, smb, smn, has_mask = _mask_args(key_mask, pairs32)
    lse_a, lse_b = (lse_s, lse_t) if reverse else (lse_t, lse_s)
    la = lse_a if lse_a is not None else kl
    lb = lse_b if lse_b is not None else kl
    la_strides = la.stride() if lse_a is not None else (0, 0, 0)
    lb_strides = lb.stride() if lse_b is not None else (0, 0, 0)
    BLOCK_M, BLOCK_N, warps = _blocks(R, N)
    grid = (triton.cdiv(R, BLOCK_M), B * P)
    with device_guard(q_s):
        _attention_kl_fwd_kernel[grid](
            q_s, k_s, q_t, k_t, pairs32, rows32, mask, la, lb,
            kl, out_s, out_t,
            *_strides4(q_s), *_strides4(k_s), *_strides4(q_t), *_strides4(k_t),
            smb, smn, *la_strides, *lb_strides,
            N, R, P, DS, DT, float(scale_s), float(scale_t),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_DS=head_block(DS), BLOCK_DT=head_block(DT),
            HAS_MASK=has_mask, HAS_LSE_A=lse_a is not None, HAS_LSE_B=lse_b is not None, REVERSE=bool(reverse),
            UPCAST=upcast_inputs(q_s, q_t), PRECISION=_precision(q_s, q_t), num_warps=warps,
        )  # fmt: skip
    return kl, out_s, out_t


def attention_kl_backward(grad, q_s, k_s, q_t, k_t, pairs, rows, key_mask, scale_s, scale_t, reverse,
                          lse_s_rows, lse_t_rows, kl, *, unique_heads: bool | None = None,
                          unique_rows: bool | None = None):
    """Launch the two backward kernels; returns ``(dq_s, dk_s)`` in the dtypes of ``q_s, k_s``.

    When every pair has its own student head and the rows are distinct (the common case), each element of
    ``dq_s``/``dk_s`` has exactly one writer and the kernels store straight into them in the input dtype.
    Otherwise (a student head in several pairs, repeated rows) each (batch, pair) program writes its own slice
    of fp32 buffers ``[B, P, R, d_s]`` / ``[B, P, N, d_s]`` and one index_add sums them: deterministic, no atomics.
    ``unique_heads`` / ``unique_rows``: that decision from host values; when None it is read from the device.
    """
    B, H_s, N, DS = q_s.shape
    DT = q_t.shape[-1]
    P, R = pairs.shape[0], rows.numel()
    dev = q_s.device
    if unique_heads is None:
        unique_heads = len(set(pairs[:, 0].tolist())) == P
    if unique_rows is None:
        unique_rows = R <= 1 or torch.unique(rows).numel() == R
    direct = unique_heads and unique_rows
    if direct:
        covers_all = P == H_s and R == N  # every head and row written: no zero fill needed
        dq = (torch.empty if covers_all else torch.zeros)(q_s.shape, dtype=q_s.dtype, device=dev)
        dk = (torch.empty if P == H_s else torch.zeros)(k_s.shape, dtype=k_s.dtype, device=dev)
        dq_out, dk_out = dq, dk
    else:
        dq_out = torch.zeros(B, P, R, DS, dtype=torch.float32, device=dev)
        dk_out = torch.zeros(B, P, N, DS, dtype=torch.float32, device=dev)
    if B * P * R > 0:
        pairs32 = pairs.to(device=dev, dtype=torch.int32).contiguous()
        rows32 = rows.to(device=dev, dtype=torch.int32).contiguous()
        mask, smb, smn, has_mask = _mask_args(key_mask, pairs32)
        grad = grad.to(torch.float32).contiguous()
        BLOCK_M, BLOCK_N, warps = _blocks(R, N)
        common = dict(
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_DS=head_block(DS), BLOCK_DT=head_block(DT),
            HAS_MASK=has_mask, REVERSE=bool(reverse), UPCAST=upcast_inputs(q_s, q_t),
            PRECISION=_precision(q_s, q_t), DIRECT=direct, num_warps=warps,
        )  # fmt: skip
        args = (
            *_strides4(q_s), *_strides4(k_s), *_strides4(q_t), *_strides4(k_t), smb, smn,
            N, R, P, DS, DT, float(scale_s), float(scale_t),
        )  # fmt: skip
        with device_guard(q_s):
            _attention_kl_bwd_dq_kernel[(triton.cdiv(R, BLOCK_M), B * P)](
                q_s, k_s, q_t, k_t, pairs32, rows32, mask, lse_s_rows, lse_t_rows, kl, grad, dq_out,
                *_strides4(dq_out), *args, **common,
            )  # fmt: skip
            _attention_kl_bwd_dk_kernel[(triton.cdiv(N, BLOCK_N), B * P)](
                q_s, k_s, q_t, k_t, pairs32, rows32, mask, lse_s_rows, lse_t_rows, kl, grad, dk_out,
                *_strides4(dk_out), *args, **common,
            )  # fmt: skip
    if direct:
        return dq, dk
    hs = pairs[:, 0].to(dev)
    dq = torch.zeros(q_s.shape, dtype=torch.float32, device=dev)
    dq.permute(1, 2, 0, 3).index_put_(
        (hs[:, None].expand(P, R), rows.to(dev)[None, :].expand(P, R)), dq_out.permute(1, 2, 0, 3), accumulate=True
    )
    dk = torch.zeros(k_s.shape, dtype=torch.float32, device=dev)
    dk.index_add_(1, hs, dk_out)
    return dq.to(q_s.dtype), dk.to(k_s.dtype)
