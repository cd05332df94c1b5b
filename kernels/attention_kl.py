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

NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so 2^(m_old - m_new) never sees (-inf) - (-inf)
LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)

# Inside the kernels every logit and LSE is in log2 units: the launchers fold log2(e) into scale_s / scale_t and
# the kernels multiply given (natural-log) LSEs by log2(e) on load and divide on store, so the exponentials are
# bare ex2 (tl.exp2). Each loop runs over full tiles without bounds masks; the last, partial tile along the
# streamed dimension is peeled out of the loop and is only as wide as it needs to be (BLOCK_T). A partial block
# of the program's own dimension (rows for forward/dQ, keys for dK) is a second launch with a narrow block.


@triton.jit
def _keep(MASK, b, stride_mb, stride_mn, offs_n, key_ok, TAIL: tl.constexpr):
    # key_mask of these keys (True = kept); out-of-range keys read as dropped
    if TAIL:
        keep = tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=key_ok, other=0)
        return key_ok & (keep != 0)
    else:
        return tl.load(MASK + b * stride_mb + offs_n * stride_mn) != 0


@triton.jit
def _row_block(QS, QT, ROWS, offs_m, R, b, hs, ht, offs_ds, offs_dt, DS, DT,
               stride_qsb, stride_qsh, stride_qsn, stride_qsd, stride_qtb, stride_qth, stride_qtn, stride_qtd,
               MASKED: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr, UPCAST: tl.constexpr):
    # the program's query rows (positions offs_m into ROWS): row indices, in-range flags, q_s and q_t tiles
    row_ok = offs_m < R
    if MASKED:
        rows = tl.load(ROWS + offs_m, mask=row_ok, other=0).to(tl.int64)
    else:
        rows = tl.load(ROWS + offs_m).to(tl.int64)
    qs = _tile(QS, b * stride_qsb + hs * stride_qsh, rows, row_ok, offs_ds, DS, stride_qsn, stride_qsd,
               MASKED, EVEN_DS, UPCAST, False)
    qt = _tile(QT, b * stride_qtb + ht * stride_qth, rows, row_ok, offs_dt, DT, stride_qtn, stride_qtd,
               MASKED, EVEN_DT, UPCAST, False)
    return rows, row_ok, qs, qt


@triton.jit
def _fwd_tile(qs, qt, ks, kt, scale_a, scale_b, scale_ab, valid, m_a, m_b, z_a, z_b, acc,
              MASKED: tl.constexpr, HAS_LSE_A: tl.constexpr, HAS_LSE_B: tl.constexpr, REVERSE: tl.constexpr,
              PRECISION: tl.constexpr):
    # one [M, W] tile of the online pass on the *unscaled* dot products (see online_step: maxima on raw values, the
    # log2-unit scale applied once in each exponent's argument). acc sums 2^(a - m_a) (raw_a * scale_ab - raw_b), i.e.
    # (a - b) / scale_b, with scale_ab = scale_a / scale_b: one FFMA per element. valid: [W] kept keys (if MASKED)
    s = tl.dot(qs, ks, input_precision=PRECISION)
    t = tl.dot(qt, kt, input_precision=PRECISION)
    if REVERSE:
        la = s
        lb = t
    else:
        la = t
        lb = s
    diff = la * scale_ab - lb
    if MASKED:
        diff = tl.where(valid[None, :], diff, 0.0)
        la = tl.where(valid[None, :], la, float("-inf"))
        lb = tl.where(valid[None, :], lb, float("-inf"))
    m_a, z_a, acc = online_step(la, scale_a, diff, m_a, z_a, acc, HAS_LSE_A)
    if not HAS_LSE_B:
        m_new_b = tl.maximum(m_b, tl.max(lb, 1) * scale_b)
        z_b = z_b * tl.exp2(m_b - m_new_b) + tl.sum(tl.exp2(lb * scale_b - m_new_b[:, None]), 1)
        m_b = m_new_b
    return m_a, m_b, z_a, z_b, acc


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
    N, R, P, DS, DT, scale_a, scale_b, scale_ab, ROW0,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, ROW_TAIL: tl.constexpr,  #
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,  #
    HAS_MASK: tl.constexpr, HAS_LSE_A: tl.constexpr, HAS_LSE_B: tl.constexpr, REVERSE: tl.constexpr,  #
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,  #
):
    # scale_a, scale_b: the logit scales of the target side a and the other side b, log2 units, > 0;
    # scale_ab = scale_a / scale_b
    pid_m = tl.program_id(0)
    pid_bp = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = pid_bp % P
    hs = tl.load(PAIRS + 2 * p).to(tl.int64)
    ht = tl.load(PAIRS + 2 * p + 1).to(tl.int64)
    offs_m = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    rows, row_ok, qs, qt = _row_block(QS, QT, ROWS, offs_m, R, b, hs, ht, offs_ds, offs_dt, DS, DT,
                                      stride_qsb, stride_qsh, stride_qsn, stride_qsd,
                                      stride_qtb, stride_qth, stride_qtn, stride_qtd,
                                      ROW_TAIL, EVEN_DS, EVEN_DT, UPCAST)
    ks_base = b * stride_ksb + hs * stride_ksh
    kt_base = b * stride_ktb + ht * stride_kth
    # which head the given LSEs are read from: a = t, b = s (forward) or a = s, b = t (reverse)
    if REVERSE:
        ha = hs
        hb = ht
    else:
        ha = ht
        hb = hs
    if HAS_LSE_A:
        m_a = tl.load(LSE_A_IN + b * stride_lab + ha * stride_lah + rows * stride_lan, mask=row_ok, other=0.0)
        m_a = m_a.to(tl.float32) * 1.4426950408889634
    else:
        m_a = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    if HAS_LSE_B:
        m_b = tl.load(LSE_B_IN + b * stride_lbb + hb * stride_lbh + rows * stride_lbn, mask=row_ok, other=0.0)
        m_b = m_b.to(tl.float32) * 1.4426950408889634
    else:
        m_b = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    z_a = tl.zeros([BLOCK_M], tl.float32)
    z_b = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)

    n_full = N - N % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ks = _tile(KS, ks_base, offs_n, row_ok, offs_ds, DS, stride_ksn, stride_ksd, False, EVEN_DS, UPCAST, True)
        kt = _tile(KT, kt_base, offs_n, row_ok, offs_dt, DT, stride_ktn, stride_ktd, False, EVEN_DT, UPCAST, True)
        valid = offs_n < N
        if HAS_MASK:
            valid = _keep(MASK, b, stride_mb, stride_mn, offs_n, valid, False)
        m_a, m_b, z_a, z_b, acc = _fwd_tile(qs, qt, ks, kt, scale_a, scale_b, scale_ab, valid, m_a, m_b, z_a, z_b, acc,
                                            HAS_MASK, HAS_LSE_A, HAS_LSE_B, REVERSE, PRECISION)
    if BLOCK_T > 0:  # the peeled, narrow tail tile
        offs_n = n_full + tl.arange(0, BLOCK_T)
        key_ok = offs_n < N
        ks = _tile(KS, ks_base, offs_n, key_ok, offs_ds, DS, stride_ksn, stride_ksd, True, EVEN_DS, UPCAST, True)
        kt = _tile(KT, kt_base, offs_n, key_ok, offs_dt, DT, stride_ktn, stride_ktd, True, EVEN_DT, UPCAST, True)
        if HAS_MASK:
            key_ok = _keep(MASK, b, stride_mb, stride_mn, offs_n, key_ok, True)
        m_a, m_b, z_a, z_b, acc = _fwd_tile(qs, qt, ks, kt, scale_a, scale_b, scale_ab, key_ok, m_a, m_b, z_a, z_b, acc,
                                            True, HAS_LSE_A, HAS_LSE_B, REVERSE, PRECISION)

    has_keys = z_a > 0.0
    safe_z = tl.where(has_keys, z_a, 1.0)
    lse_a = m_a + tl.log2(safe_z)
    if HAS_LSE_B:
        lse_b = m_b
    else:
        lse_b = m_b + tl.log2(tl.where(z_b > 0.0, z_b, 1.0))
    # rows without keys: KL 0, lse = +inf on both sides (no inf - inf in the arithmetic)
    kl = tl.where(has_keys, (acc / safe_z * scale_b - lse_a + lse_b) * LN2, 0.0)
    lse_a = tl.where(has_keys, lse_a * LN2, float("inf"))
    lse_b = tl.where(has_keys, lse_b * LN2, float("inf"))
    out = pid_bp.to(tl.int64) * R + offs_m
    tl.store(KL + out, kl, mask=row_ok)
    if REVERSE:
        tl.store(LSE_S_OUT + out, lse_a, mask=row_ok)
        tl.store(LSE_T_OUT + out, lse_b, mask=row_ok)
    else:
        tl.store(LSE_S_OUT + out, lse_b, mask=row_ok)
        tl.store(LSE_T_OUT + out, lse_a, mask=row_ok)


@triton.jit
def _dscores(s, t, lse_s, lse_t, g, kl, valid, MASKED: tl.constexpr, REVERSE: tl.constexpr):
    # dKL/ds (natural-log logits) times the upstream gradient and scale_s (folded into g), from log2-unit logits
    # and LSEs: [M, W] fp32. valid: [M, W] (read only if MASKED)
    log_ps = s - lse_s[:, None]
    log_pt = t - lse_t[:, None]
    p_s = tl.exp2(log_ps)
    if REVERSE:
        ds = p_s * ((log_ps - log_pt) * LN2 - kl[:, None])
    else:
        ds = p_s - tl.exp2(log_pt)
    if MASKED:
        ds = tl.where(valid, ds, 0.0)
    return ds * g[:, None]


@triton.jit
def _row_stats(LSE_S, LSE_T, KL, GRAD, row_out, row_ok, scale_s, MASKED: tl.constexpr, REVERSE: tl.constexpr,
               BLOCK: tl.constexpr):
    # the saved per-row statistics, LSEs in log2 units; g carries the natural-unit scale_s
    if MASKED:
        lse_s = tl.load(LSE_S + row_out, mask=row_ok, other=1.0e30)
        lse_t = tl.load(LSE_T + row_out, mask=row_ok, other=1.0e30)
        g = tl.load(GRAD + row_out, mask=row_ok, other=0.0)
    else:
        lse_s = tl.load(LSE_S + row_out)
        lse_t = tl.load(LSE_T + row_out)
        g = tl.load(GRAD + row_out)
    kl = tl.zeros([BLOCK], tl.float32)
    if REVERSE:
        if MASKED:
            kl = tl.load(KL + row_out, mask=row_ok, other=0.0)
        else:
            kl = tl.load(KL + row_out)
    return lse_s * 1.4426950408889634, lse_t * 1.4426950408889634, g * (scale_s * LN2), kl


@triton.jit
def _attention_kl_bwd_dq_kernel(
    QS, KS, QT, KT, PAIRS, ROWS, MASK, LSE_S, LSE_T, KL, GRAD, DQ,  #
    stride_ob, stride_oh, stride_on, stride_od,  #
    stride_qsb, stride_qsh, stride_qsn, stride_qsd,  #
    stride_ksb, stride_ksh, stride_ksn, stride_ksd,  #
    stride_qtb, stride_qth, stride_qtn, stride_qtd,  #
    stride_ktb, stride_kth, stride_ktn, stride_ktd,  #
    stride_mb, stride_mn,  #
    N, R, P, DS, DT, scale_s, scale_t, OWN0,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, OWN_TAIL: tl.constexpr,  #
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,  #
    HAS_MASK: tl.constexpr, REVERSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,  #
    DIRECT: tl.constexpr,  #
):
    # one program per (row block, batch x pair); streams over key tiles. scale_s, scale_t in log2 units
    pid_m = tl.program_id(0)
    pid_bp = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = pid_bp % P
    hs = tl.load(PAIRS + 2 * p).to(tl.int64)
    ht = tl.load(PAIRS + 2 * p + 1).to(tl.int64)
    offs_m = OWN0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    rows, row_ok, qs, qt = _row_block(QS, QT, ROWS, offs_m, R, b, hs, ht, offs_ds, offs_dt, DS, DT,
                                      stride_qsb, stride_qsh, stride_qsn, stride_qsd,
                                      stride_qtb, stride_qth, stride_qtn, stride_qtd,
                                      OWN_TAIL, EVEN_DS, EVEN_DT, UPCAST)
    ks_base = b * stride_ksb + hs * stride_ksh
    kt_base = b * stride_ktb + ht * stride_kth
    row_out = pid_bp.to(tl.int64) * R + offs_m
    lse_s, lse_t, g, kl = _row_stats(LSE_S, LSE_T, KL, GRAD, row_out, row_ok, scale_s, OWN_TAIL, REVERSE, BLOCK_M)
    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    n_full = N - N % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ks = _tile(KS, ks_base, offs_n, row_ok, offs_ds, DS, stride_ksn, stride_ksd, False, EVEN_DS, UPCAST, False)
        kt = _tile(KT, kt_base, offs_n, row_ok, offs_dt, DT, stride_ktn, stride_ktd, False, EVEN_DT, UPCAST, True)
        valid = offs_n < N
        if HAS_MASK:
            valid = _keep(MASK, b, stride_mb, stride_mn, offs_n, valid, False)
        s = tl.dot(qs, tl.trans(ks), input_precision=PRECISION) * scale_s
        t = tl.dot(qt, kt, input_precision=PRECISION) * scale_t
        ds = _dscores(s, t, lse_s, lse_t, g, kl, valid[None, :], HAS_MASK, REVERSE)
        dq += tl.dot(ds.to(ks.dtype), ks, input_precision=PRECISION)
    if BLOCK_T > 0:
        offs_n = n_full + tl.arange(0, BLOCK_T)
        key_ok = offs_n < N
        ks = _tile(KS, ks_base, offs_n, key_ok, offs_ds, DS, stride_ksn, stride_ksd, True, EVEN_DS, UPCAST, False)
        kt = _tile(KT, kt_base, offs_n, key_ok, offs_dt, DT, stride_ktn, stride_ktd, True, EVEN_DT, UPCAST, True)
        if HAS_MASK:
            key_ok = _keep(MASK, b, stride_mb, stride_mn, offs_n, key_ok, True)
        s = tl.dot(qs, tl.trans(ks), input_precision=PRECISION) * scale_s
        t = tl.dot(qt, kt, input_precision=PRECISION) * scale_t
        ds = _dscores(s, t, lse_s, lse_t, g, kl, key_ok[None, :], True, REVERSE)
        dq += tl.dot(ds.to(ks.dtype), ks, input_precision=PRECISION)
    # DIRECT: straight into dq_s[b, h_s, row] (student heads and rows unique); else into the [B, P, R, d_s] buffer
    if DIRECT:
        d_out = DQ + b * stride_ob + hs * stride_oh + rows[:, None] * stride_on + offs_ds[None, :] * stride_od
    else:
        d_out = DQ + b * stride_ob + p * stride_oh + offs_m[:, None] * stride_on + offs_ds[None, :] * stride_od
    tl.store(d_out, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_ds[None, :] < DS))


@triton.jit
def _ds_tile(QS, QT, ROWS, LSE_S, LSE_T, KL, GRAD, qs_base, qt_base, row0, bp, R, DS, DT,
             stride_qsn, stride_qsd, stride_qtn, stride_qtd, scale_s, scale_t, ks, kt, key_ok, offs_ds, offs_dt,
             WIDTH: tl.constexpr, ROWS_MASKED: tl.constexpr, KEYS_MASKED: tl.constexpr, EVEN_DS: tl.constexpr,
             EVEN_DT: tl.constexpr, REVERSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
             ROWS32: tl.constexpr):
    # dS of one [WIDTH rows, keys] tile (in the dtype of q_s, ready for the tensor cores), with the rows' q_s tile,
    # positions (offs_m, into ROWS), indices and in-range flags. ks, kt: the keys, transposed [d, keys].
    # ROWS32: row offsets (row index x row stride) fit in int32 (checked by the launcher): 32-bit address
    # arithmetic for the gathered rows in the loop, else 64-bit
    MASKED: tl.constexpr = ROWS_MASKED or KEYS_MASKED
    offs_m = row0 + tl.arange(0, WIDTH)
    row_ok = offs_m < R
    if ROWS_MASKED:
        rows = tl.load(ROWS + offs_m, mask=row_ok, other=0)
    else:
        rows = tl.load(ROWS + offs_m)
    if not ROWS32:
        rows = rows.to(tl.int64)
    qs = _tile(QS, qs_base, rows, row_ok, offs_ds, DS, stride_qsn, stride_qsd, ROWS_MASKED, EVEN_DS, UPCAST, False)
    qt = _tile(QT, qt_base, rows, row_ok, offs_dt, DT, stride_qtn, stride_qtd, ROWS_MASKED, EVEN_DT, UPCAST, False)
    lse_s, lse_t, g, kl = _row_stats(LSE_S, LSE_T, KL, GRAD, bp * R + offs_m, row_ok, scale_s, ROWS_MASKED,
                                     REVERSE, WIDTH)
    s = tl.dot(qs, ks, input_precision=PRECISION) * scale_s
    t = tl.dot(qt, kt, input_precision=PRECISION) * scale_t
    # padding rows (beyond R) count as masked, so no 0 * (inf - inf) reaches the sum over rows
    ds = _dscores(s, t, lse_s, lse_t, g, kl, row_ok[:, None] & key_ok[None, :], MASKED, REVERSE).to(qs.dtype)
    return ds, qs, offs_m, rows, row_ok


@triton.jit
def _attention_kl_bwd_dk_kernel(
    QS, KS, QT, KT, PAIRS, ROWS, MASK, LSE_S, LSE_T, KL, GRAD, DK,  #
    stride_ob, stride_oh, stride_on, stride_od,  #
    stride_qsb, stride_qsh, stride_qsn, stride_qsd,  #
    stride_ksb, stride_ksh, stride_ksn, stride_ksd,  #
    stride_qtb, stride_qth, stride_qtn, stride_qtd,  #
    stride_ktb, stride_kth, stride_ktn, stride_ktd,  #
    stride_mb, stride_mn,  #
    N, R, P, DS, DT, scale_s, scale_t, OWN0,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, OWN_TAIL: tl.constexpr,  #
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,  #
    HAS_MASK: tl.constexpr, REVERSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,  #
    DIRECT: tl.constexpr, ROWS32: tl.constexpr,  #
):
    # the two-kernel backward's dK (fused=False): one program per (key block, batch x pair); streams over row
    # tiles (BLOCK_M, tail BLOCK_T); recomputes both softmaxes, as the dQ kernel does
    pid_bp = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = pid_bp % P
    hs = tl.load(PAIRS + 2 * p).to(tl.int64)
    ht = tl.load(PAIRS + 2 * p + 1).to(tl.int64)
    _key_block(QS, KS, QT, KT, ROWS, MASK, LSE_S, LSE_T, KL, GRAD, DK, DK, DK, PAIRS, b, p, hs, ht,
               pid_bp.to(tl.int64), 0, 0, OWN0 + tl.program_id(0) * BLOCK_N,
               stride_ob, stride_oh, stride_on, stride_od, 0, 0, 0, 0,
               stride_qsb, stride_qsh, stride_qsn, stride_qsd, stride_ksb, stride_ksh, stride_ksn, stride_ksd,
               stride_qtb, stride_qth, stride_qtn, stride_qtd, stride_ktb, stride_kth, stride_ktn, stride_ktd,
               stride_mb, stride_mn, N, R, DS, DT, scale_s, scale_t, BLOCK_N, OWN_TAIL, BLOCK_M, BLOCK_T,
               BLOCK_DS, BLOCK_DT, EVEN_DS, EVEN_DT, HAS_MASK, REVERSE, UPCAST, PRECISION, DIRECT, False, False,
               ROWS32)


# The fused backward: one program per (key block j, batch x pair), j on grid axis 0. It loads its keys once, keeps
# dK_j in registers over every row block and adds each tile's dQ contribution dS k_s into dQ. For the dQ sum to be
# deterministic (the default) the contributions to one row block are added in a fixed order, key block
# j = 0, 1, ..., S-1, whatever order the GPU runs the programs in (FlashAttention-3's deterministic backward):
#   - an int32 ticket per (batch x pair, row block), zeroed by the launcher, holds the key block whose turn it is;
#     program j spins on an acquire atomic until the ticket equals j;
#   - j = 0 stores its contribution to an fp32 scratch (no zero fill); 0 < j < S-1 loads the scratch (bypassing
#     L1: ".cg") and stores the sum back; j = S-1 stores the final sum straight into dQ in its dtype (no cast pass);
#   - then a CTA barrier (every thread's stores issued) and a release exchange of the ticket to j + 1.
# Deadlock-free: a program only ever waits for programs of its own (batch x pair) with a lower j, i.e. a lower
# linear block index (axis 0 varies fastest). The GPU dispatches blocks in linear index order, so when a program
# runs, every program it can wait for is already running or finished, and those wait only for lower ones again:
# the lowest waiting program always makes progress. Triton's interpreter runs programs one at a time, axis 0 in
# the outer loop, so every lower j has finished before j starts and no wait ever spins there.
# The remainder key block (N % BLOCK_N keys) is program S-1 of the same launch, on a narrow BLOCK_T-wide tile;
# rows stream in BLOCK_M tiles plus a narrow peeled tail (BLOCK_TR). ATOMIC (deterministic=False) replaces the
# ordering with fp32 atomic adds into a zeroed fp32 dQ (order-dependent rounding, no waiting).


@triton.jit
def _dq_add(DQ, SCRATCH, TICKETS, dq, d_ptr, scr_ptr, ok, ticket, j, last, ATOMIC: tl.constexpr):
    # add one tile's dQ contribution: ordered by key block j (see above), or by fp32 atomics
    if ATOMIC:
        tl.atomic_add(d_ptr, dq, mask=ok, sem="relaxed")
    else:
        while tl.atomic_cas(TICKETS + ticket, j, j, sem="acquire") != j:
            pass
        dq += tl.load(scr_ptr, mask=ok & (j > 0), other=0.0, cache_modifier=".cg")  # j = 0: nothing to add
        if j == last:
            tl.store(d_ptr, dq.to(DQ.dtype.element_ty), mask=ok)
        else:
            tl.store(scr_ptr, dq, mask=ok)
        tl.debug_barrier()
        tl.atomic_xchg(TICKETS + ticket, j + 1, sem="release")


@triton.jit
def _key_block(QS, KS, QT, KT, ROWS, MASK, LSE_S, LSE_T, KL, GRAD, DK, DQ, SCRATCH, TICKETS,
               b, p, hs, ht, bp, j, last, key0,
               stride_ob, stride_oh, stride_on, stride_od, stride_dqb, stride_dqh, stride_dqn, stride_dqd,
               stride_qsb, stride_qsh, stride_qsn, stride_qsd, stride_ksb, stride_ksh, stride_ksn, stride_ksd,
               stride_qtb, stride_qth, stride_qtn, stride_qtd, stride_ktb, stride_kth, stride_ktn, stride_ktd,
               stride_mb, stride_mn, N, R, DS, DT, scale_s, scale_t,
               WIDTH: tl.constexpr, KEY_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_TR: tl.constexpr,
               BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,
               HAS_MASK: tl.constexpr, REVERSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               DIRECT: tl.constexpr, WITH_DQ: tl.constexpr, ATOMIC: tl.constexpr, ROWS32: tl.constexpr):
    # the backward of one key block: dK_j stored at the end; WITH_DQ (the fused kernel): the dQ contributions are
    # added row block by row block (_dq_add), else (the two-kernel dK) they are left to the dQ kernel
    offs_n = key0 + tl.arange(0, WIDTH)
    key_in = offs_n < N
    key_ok = key_in
    if HAS_MASK:
        key_ok = _keep(MASK, b, stride_mb, stride_mn, offs_n, key_in, KEY_TAIL)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    ks = _tile(KS, b * stride_ksb + hs * stride_ksh, offs_n, key_in, offs_ds, DS, stride_ksn, stride_ksd,
               KEY_TAIL, EVEN_DS, UPCAST, True)
    kt = _tile(KT, b * stride_ktb + ht * stride_kth, offs_n, key_in, offs_dt, DT, stride_ktn, stride_ktd,
               KEY_TAIL, EVEN_DT, UPCAST, True)
    qs_base = b * stride_qsb + hs * stride_qsh
    qt_base = b * stride_qtb + ht * stride_qth
    if DIRECT:  # dQ rows at their row index of head h_s; else at their position in the [B, P, R, d_s] buffer
        dq_base = DQ + b * stride_dqb + hs * stride_dqh
    else:
        dq_base = DQ + b * stride_dqb + p * stride_dqh
    scr_base = SCRATCH + bp * R * DS  # fp32 [B x P, R, d_s], contiguous
    col_ok = offs_ds[None, :] < DS
    KEYS_MASKED: tl.constexpr = KEY_TAIL or HAS_MASK
    n_rb = tl.cdiv(R, BLOCK_M)
    dk = tl.zeros([WIDTH, BLOCK_DS], tl.float32)
    r_full = R - R % BLOCK_M
    for start_m in range(0, r_full, BLOCK_M):
        ds, qs, offs_m, rows, row_ok = _ds_tile(
            QS, QT, ROWS, LSE_S, LSE_T, KL, GRAD, qs_base, qt_base, start_m, bp, R, DS, DT, stride_qsn, stride_qsd,
            stride_qtn, stride_qtd, scale_s, scale_t, ks, kt, key_ok, offs_ds, offs_dt, BLOCK_M, False, KEYS_MASKED,
            EVEN_DS, EVEN_DT, REVERSE, UPCAST, PRECISION, ROWS32)
        dk += tl.dot(tl.trans(ds), qs, input_precision=PRECISION)
        if WITH_DQ:
            dq = tl.dot(ds, tl.trans(ks), input_precision=PRECISION)
            idx = rows if DIRECT else offs_m
            _dq_add(DQ, SCRATCH, TICKETS, dq, dq_base + idx[:, None] * stride_dqn + offs_ds[None, :] * stride_dqd,
                    scr_base + offs_m[:, None] * DS + offs_ds[None, :], row_ok[:, None] & col_ok,
                    bp * n_rb + start_m // BLOCK_M, j, last, ATOMIC)
    if BLOCK_TR > 0:
        ds, qs, offs_m, rows, row_ok = _ds_tile(
            QS, QT, ROWS, LSE_S, LSE_T, KL, GRAD, qs_base, qt_base, r_full, bp, R, DS, DT, stride_qsn, stride_qsd,
            stride_qtn, stride_qtd, scale_s, scale_t, ks, kt, key_ok, offs_ds, offs_dt, BLOCK_TR, True, KEYS_MASKED,
            EVEN_DS, EVEN_DT, REVERSE, UPCAST, PRECISION, ROWS32)
        dk += tl.dot(tl.trans(ds), qs, input_precision=PRECISION)
        if WITH_DQ:
            dq = tl.dot(ds, tl.trans(ks), input_precision=PRECISION)
            idx = rows if DIRECT else offs_m
            _dq_add(DQ, SCRATCH, TICKETS, dq, dq_base + idx[:, None] * stride_dqn + offs_ds[None, :] * stride_dqd,
                    scr_base + offs_m[:, None] * DS + offs_ds[None, :], row_ok[:, None] & col_ok,
                    bp * n_rb + r_full // BLOCK_M, j, last, ATOMIC)
    if DIRECT:
        d_out = DK + b * stride_ob + hs * stride_oh + offs_n[:, None] * stride_on + offs_ds[None, :] * stride_od
    else:
        d_out = DK + b * stride_ob + p * stride_oh + offs_n[:, None] * stride_on + offs_ds[None, :] * stride_od
    tl.store(d_out, dk.to(DK.dtype.element_ty), mask=key_in[:, None] & col_ok)


@triton.jit
def _attention_kl_bwd_kernel(
    QS, KS, QT, KT, PAIRS, ROWS, MASK, LSE_S, LSE_T, KL, GRAD, DK, DQ, SCRATCH, TICKETS,  #
    stride_ob, stride_oh, stride_on, stride_od,  #
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,  #
    stride_qsb, stride_qsh, stride_qsn, stride_qsd,  #
    stride_ksb, stride_ksh, stride_ksn, stride_ksd,  #
    stride_qtb, stride_qth, stride_qtn, stride_qtd,  #
    stride_ktb, stride_kth, stride_ktn, stride_ktd,  #
    stride_mb, stride_mn,  #
    N, R, P, DS, DT, scale_s, scale_t,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_TR: tl.constexpr,  #
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,  #
    HAS_MASK: tl.constexpr, REVERSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,  #
    DIRECT: tl.constexpr, ATOMIC: tl.constexpr, ROWS32: tl.constexpr,  #
):
    # the fused backward (see the comment above _dq_add): program (j, batch x pair); scale_s, scale_t in log2 units
    j = tl.program_id(0)
    pid_bp = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = pid_bp % P
    hs = tl.load(PAIRS + 2 * p).to(tl.int64)
    ht = tl.load(PAIRS + 2 * p + 1).to(tl.int64)
    bp = pid_bp.to(tl.int64)
    n_full = N // BLOCK_N
    last = tl.num_programs(0) - 1
    args = (QS, KS, QT, KT, ROWS, MASK, LSE_S, LSE_T, KL, GRAD, DK, DQ, SCRATCH, TICKETS, b, p, hs, ht, bp, j, last,
            j * BLOCK_N, stride_ob, stride_oh, stride_on, stride_od, stride_dqb, stride_dqh, stride_dqn, stride_dqd,
            stride_qsb, stride_qsh, stride_qsn, stride_qsd, stride_ksb, stride_ksh, stride_ksn, stride_ksd,
            stride_qtb, stride_qth, stride_qtn, stride_qtd, stride_ktb, stride_kth, stride_ktn, stride_ktd,
            stride_mb, stride_mn, N, R, DS, DT, scale_s, scale_t)
    if BLOCK_T > 0:
        if j == n_full:  # the narrow remainder key block
            _key_block(*args, BLOCK_T, True, BLOCK_M, BLOCK_TR, BLOCK_DS, BLOCK_DT, EVEN_DS, EVEN_DT,
                             HAS_MASK, REVERSE, UPCAST, PRECISION, DIRECT, True, ATOMIC, ROWS32)
        else:
            _key_block(*args, BLOCK_N, False, BLOCK_M, BLOCK_TR, BLOCK_DS, BLOCK_DT, EVEN_DS, EVEN_DT,
                             HAS_MASK, REVERSE, UPCAST, PRECISION, DIRECT, True, ATOMIC, ROWS32)
    else:
        _key_block(*args, BLOCK_N, False, BLOCK_M, BLOCK_TR, BLOCK_DS, BLOCK_DT, EVEN_DS, EVEN_DT,
                         HAS_MASK, REVERSE, UPCAST, PRECISION, DIRECT, True, ATOMIC, ROWS32)


# ------------------------------------------------------------------------------------------------- launchers


def _strides4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


INT32_OFFSETS = 2**31  # row offsets below this bound use 32-bit address arithmetic in the backward's row loops


def row_offsets_fit_int32(N: int, *tensors: torch.Tensor) -> bool:
    """Whether every element offset ``row * stride(-2) + col * stride(-1)`` within one (batch, head) slice of these
    ``[..., N, d]`` tensors (head dim padded to its block) stays below ``INT32_OFFSETS``: host shapes only."""
    return all(N * t.stride(-2) + head_block(t.shape[-1]) * t.stride(-1) < INT32_OFFSETS for t in tensors)


def _mask_args(key_mask: torch.Tensor | None, like: torch.Tensor):
    if key_mask is None:
        return like, 0, 0, False  # pointer never read
    m = key_mask if key_mask.dtype == torch.uint8 else key_mask.to(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def attention_kl_forward(q_s, k_s, q_t, k_t, pairs, rows, key_mask, scale_s, scale_t, reverse, lse_s, lse_t, *,
                         allow_tf32: bool = False):
    """Launch the forward kernel. Returns ``(kl, lse_s_rows, lse_t_rows)``, each fp32 ``[B, P, R]`` (natural log).

    ``allow_tf32``: fp32 inputs use TF32 tensor-core dots instead of IEEE fp32 ones (faster, ~1e-3 relative).
    No device-to-host synchronisation: sizes come from shapes, ``pairs`` / ``rows`` are only copied to the device.
    ``scale_s``, ``scale_t`` must be positive (ValueError otherwise): the kernel's running maxima are taken on the
    unscaled dot products.
    """
    scale_s, scale_t = positive_scale("scale_s", scale_s), positive_scale("scale_t", scale_t)
    B, _, N, DS = q_s.shape
    DT = q_t.shape[-1]
    P, R = pairs.shape[0], rows.numel()
    dev = q_s.device
    kl = torch.empty(B, P, R, dtype=torch.float32, device=dev)
    out_s = torch.empty_like(kl)
    out_t = torch.empty_like(kl)
    if B * P * R == 0:
        return kl, out_s, out_t
    pairs32 = pairs.to(device=dev, dtype=torch.int32, non_blocking=True).contiguous()
    rows32 = rows.to(device=dev, dtype=torch.int32, non_blocking=True).contiguous()
    mask, smb, smn, has_mask = _mask_args(key_mask, pairs32)
    lse_a, lse_b = (lse_s, lse_t) if reverse else (lse_t, lse_s)
    scale_a, scale_b = (scale_s, scale_t) if reverse else (scale_t, scale_s)
    la = lse_a if lse_a is not None else kl
    lb = lse_b if lse_b is not None else kl
    la_strides = la.stride() if lse_a is not None else (0, 0, 0)
    lb_strides = lb.stride() if lse_b is not None else (0, 0, 0)
    upcast = upcast_inputs(q_s, q_t)
    BLOCK_M, BLOCK_N = blocks(R, N, fp32=upcast)
    with device_guard(q_s):
        for row0, programs, bm, tail in splits(R, BLOCK_M):
            _attention_kl_fwd_kernel[(programs, B * P)](
                q_s, k_s, q_t, k_t, pairs32, rows32, mask, la, lb,
                kl, out_s, out_t,
                *_strides4(q_s), *_strides4(k_s), *_strides4(q_t), *_strides4(k_t),
                smb, smn, *la_strides, *lb_strides,
                N, R, P, DS, DT, scale_a * LOG2E, scale_b * LOG2E, scale_a / scale_b, row0,
                BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_T=tail_block(N, BLOCK_N), ROW_TAIL=tail,
                BLOCK_DS=head_block(DS), BLOCK_DT=head_block(DT), EVEN_DS=head_block(DS) == DS,
                EVEN_DT=head_block(DT) == DT, HAS_MASK=has_mask, HAS_LSE_A=lse_a is not None,
                HAS_LSE_B=lse_b is not None, REVERSE=bool(reverse),
                UPCAST=upcast, PRECISION=precision((q_s, q_t), allow_tf32), num_warps=warps_for(upcast),
            )  # fmt: skip
    return kl, out_s, out_t


def head_rows_unique(pairs: torch.Tensor, rows: torch.Tensor) -> tuple[bool, bool]:
    """(every pair has its own student head, rows are distinct) -- host metadata for the backward launcher.

    Free on CPU tensors; on device tensors it synchronises, so callers with device tensors should compute it once
    from the host values they built ``pairs`` / ``rows`` from and pass it to :func:`attention_kl_backward`.
    """
    heads = pairs[:, 0].tolist()
    return len(set(heads)) == len(heads), rows.numel() <= 1 or len(set(rows.tolist())) == rows.numel()


def attention_kl_backward(grad, q_s, k_s, q_t, k_t, pairs, rows, key_mask, scale_s, scale_t, reverse,
                          lse_s_rows, lse_t_rows, kl, *, unique_heads: bool | None = None,
                          unique_rows: bool | None = None, allow_tf32: bool = False, deterministic: bool = True,
                          fused: bool = True):
    """Launch the backward; returns ``(dq_s, dk_s)`` in the dtypes of ``q_s, k_s``.

    Default: one fused kernel, one program per (key block, batch x pair), computes dS once per tile for both
    gradients (4 exponentials per element for forward + backward) and sums dQ over key blocks in a fixed order
    (int32 tickets, see ``_dq_add``): deterministic, bit-identical from run to run, no floating-point atomics.
    ``deterministic=False``: the same kernel adds dQ with fp32 atomics into a zeroed fp32 buffer, cast at the end
    (no waiting between programs; rounding depends on the order the GPU runs them in).
    ``fused=False``: two kernels (dQ over key blocks, dK over row blocks), each recomputing both softmaxes (6
    exponentials per element), with no ordering between programs and no scratch; deterministic.

    When every pair has its own student head and the rows are distinct (the common case), each element of
    ``dq_s``/``dk_s`` has exactly one final writer and the kernels store straight into them in the input dtype.
    Otherwise (a student head in several pairs, repeated rows) each (batch, pair) program writes its own slice
    of fp32 buffers ``[B, P, R, d_s]`` / ``[B, P, N, d_s]`` and one index_add sums them: deterministic, no atomics.
    ``unique_heads`` / ``unique_rows``: that decision from host values (see :func:`head_rows_unique`); when
    either is None it is read from ``pairs`` / ``rows``, which synchronises if they live on the device.
    """
    B, H_s, N, DS = q_s.shape
    DT = q_t.shape[-1]
    P, R = pairs.shape[0], rows.numel()
    dev = q_s.device
    if unique_heads is None or unique_rows is None:
        heads_ok, rows_ok = head_rows_unique(pairs, rows)
        unique_heads = heads_ok if unique_heads is None else unique_heads
        unique_rows = rows_ok if unique_rows is None else unique_rows
    direct = unique_heads and unique_rows
    atomic = not deterministic
    fused = fused or atomic
    if direct:
        covers_all = P == H_s and R == N and not atomic  # every head and row written: no zero fill needed
        dq_dtype = torch.float32 if atomic else q_s.dtype  # atomics accumulate in fp32
        dq = (torch.empty if covers_all else torch.zeros)(q_s.shape, dtype=dq_dtype, device=dev)
        dk = (torch.empty if P == H_s else torch.zeros)(k_s.shape, dtype=k_s.dtype, device=dev)
        dq_out, dk_out = dq, dk
    else:
        dq_out = (torch.zeros if atomic else torch.empty)(B, P, R, DS, dtype=torch.float32, device=dev)
        dk_out = torch.empty(B, P, N, DS, dtype=torch.float32, device=dev)
    pairs_dev = pairs.to(device=dev, non_blocking=True)
    rows_dev = rows.to(device=dev, non_blocking=True)
    if B * P * R > 0:
        pairs32 = pairs_dev.to(torch.int32).contiguous()
        rows32 = rows_dev.to(torch.int32).contiguous()
        mask, smb, smn, has_mask = _mask_args(key_mask, pairs32)
        grad = grad.to(torch.float32).contiguous()
        upcast = upcast_inputs(q_s, q_t)
        BLOCK_M, BLOCK_N = blocks(R, N, fp32=upcast, fused=fused)
        rows32_ok = row_offsets_fit_int32(N, q_s, q_t, *((dq_out,) if direct else ()))
        common = dict(
            BLOCK_DS=head_block(DS), BLOCK_DT=head_block(DT), EVEN_DS=head_block(DS) == DS,
            EVEN_DT=head_block(DT) == DT, HAS_MASK=has_mask, REVERSE=bool(reverse),
            UPCAST=upcast, PRECISION=precision((q_s, q_t), allow_tf32), DIRECT=direct, num_warps=warps_for(upcast),
        )  # fmt: skip
        args = (
            *_strides4(q_s), *_strides4(k_s), *_strides4(q_t), *_strides4(k_t), smb, smn,
            N, R, P, DS, DT, float(scale_s) * LOG2E, float(scale_t) * LOG2E,
        )  # fmt: skip
        with device_guard(q_s):
            if fused:
                # ordered dQ: an fp32 scratch [B x P, R, d_s] (the buffer itself when dQ is buffered; never
                # zeroed) and one int32 ticket per (batch x pair, row block), zeroed
                scratch = dq_out if atomic or not direct else torch.empty(B, P, R, DS, dtype=torch.float32,
                                                                          device=dev)
                n_rb = -(-R // BLOCK_M)
                tickets = pairs32 if atomic else torch.zeros(B * P * n_rb, dtype=torch.int32, device=dev)
                _attention_kl_bwd_kernel[(-(-N // BLOCK_N), B * P)](
                    q_s, k_s, q_t, k_t, pairs32, rows32, mask, lse_s_rows, lse_t_rows, kl, grad, dk_out, dq_out,
                    scratch, tickets, *_strides4(dk_out), *_strides4(dq_out), *args, BLOCK_M=BLOCK_M,
                    BLOCK_N=BLOCK_N, BLOCK_T=tail_block(N, BLOCK_N), BLOCK_TR=tail_block(R, BLOCK_M), ATOMIC=atomic,
                    ROWS32=rows32_ok, **common,
                )  # fmt: skip
            else:
                for row0, programs, bm, tail in splits(R, BLOCK_M):
                    _attention_kl_bwd_dq_kernel[(programs, B * P)](
                        q_s, k_s, q_t, k_t, pairs32, rows32, mask, lse_s_rows, lse_t_rows, kl, grad, dq_out,
                        *_strides4(dq_out), *args, row0, BLOCK_M=bm, BLOCK_N=BLOCK_N,
                        BLOCK_T=tail_block(N, BLOCK_N), OWN_TAIL=tail, **common,
                    )  # fmt: skip
                for key0, programs, bn, tail in splits(N, BLOCK_N):
                    _attention_kl_bwd_dk_kernel[(programs, B * P)](
                        q_s, k_s, q_t, k_t, pairs32, rows32, mask, lse_s_rows, lse_t_rows, kl, grad, dk_out,
                        *_strides4(dk_out), *args, key0, BLOCK_M=BLOCK_M, BLOCK_N=bn,
                        BLOCK_T=tail_block(R, BLOCK_M), OWN_TAIL=tail, ROWS32=rows32_ok, **common,
                    )  # fmt: skip
    if direct:
        return dq.to(q_s.dtype), dk
    hs = pairs_dev[:, 0]
    dq = torch.zeros(q_s.shape, dtype=torch.float32, device=dev)
    dq.permute(1, 2, 0, 3).index_put_(
        (hs[:, None].expand(P, R), rows_dev[None, :].expand(P, R)), dq_out.permute(1, 2, 0, 3), accumulate=True
    )
    dk = torch.zeros(k_s.shape, dtype=torch.float32, device=dev)
    dk.index_add_(1, hs, dk_out)
    return dq.to(q_s.dtype), dk.to(k_s.dtype)
