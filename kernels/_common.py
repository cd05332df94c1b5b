"""Helpers shared by the Triton launchers and kernels: interpreter detection, tile sizes and launch splits, dtype
handling, the tile loader."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


def interpret() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def head_block(d: int) -> int:
    """Padded head-dim block: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(d))


def upcast_inputs(*tensors: torch.Tensor) -> bool:
    """Whether the kernels convert loaded tiles to fp32 before any arithmetic.

    Always under the interpreter (its bf16 arithmetic is wrong); on GPUs for fp32 inputs only, where
    the dots then run in IEEE fp32. fp16/bf16 tiles go to the tensor cores as they are, accumulating in fp32.
    """
    return interpret() or any(t.dtype == torch.float32 for t in tensors)


def device_guard(t: torch.Tensor):
    """Launch on the tensor's device, not on the current one (the cuda:0 pitfall)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


def blocks(R: int, N: int, fp32: bool = False, fused: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the full tiles. Compiled: 64 x 64 (32 x 32 for fp32 inputs, whose IEEE dots on
    CUDA cores would spill at 64 x 64; 16 x 32 in the fused attention_kl backward, which spills at 32 x 32 on
    sm_90). The interpreter runs each tile as numpy and prefers few tiles, but keeps at least one full tile and
    a tail for small shapes so that both code paths run in the tests."""
    if interpret():
        return max(16, min(64, next_pow2(R) // 2)), max(16, min(64, next_pow2(N) // 2))
    if fp32:
        return (16, 32) if fused else (32, 32)
    return 64, 64


def tail_block(length: int, block: int) -> int:
    """Width of the peeled tail tile of a dimension of ``length`` streamed in ``block``s (0: no tail)."""
    rem = length % block
    return 0 if rem == 0 else max(16, next_pow2(rem))


def warps_for(fp32: bool) -> int:
    """4 warps, also for the narrow tail launches (with 1 or 2 the reverse dQ tail spills on sm_90); 8 for fp32
    inputs, whose IEEE dots run on CUDA cores (fewer warps spill)."""
    return 8 if fp32 else 4


def splits(length: int, block: int) -> list[tuple[int, int, int, bool]]:
    """The launches along a program dimension: ``(first index, programs, block, is_tail)`` -- full blocks, then
    one narrow block for the remainder, so that a remainder never costs a full block."""
    full = length // block
    out = [(0, full, block, False)] if full else []
    if length % block:
        out.append((full * block, 1, tail_block(length, block), True))
    return out


def positive_scale(name: str, value) -> float:
    """A logit scale as a Python float, checked to be positive and finite: the kernels take their running maxima
    on the unscaled dot products, which is only the maximum of the logits for a positive scale."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan  # refused below, with the same message
    if not (v > 0.0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite float (logit scale), got {value!r}")
    return v


def precision(tensors, allow_tf32: bool = False) -> str:
    """tl.dot input precision: IEEE fp32 for fp32 inputs unless ``allow_tf32`` (TF32 tensor cores)."""
    if interpret():
        return "ieee"
    if any(t.dtype == torch.float32 for t in tensors):
        return "tf32" if allow_tf32 else "ieee"
    return "tf32"  # unused for fp16/bf16 tiles (tensor cores take them as they are)


@triton.jit
def tile(ptr, base, idx, ok, offs_d, D, stride_r, stride_d, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
         UPCAST: tl.constexpr, TRANS: tl.constexpr):
    # rows idx of a [rows, D] matrix: [W, D], or [D, W] if TRANS; masked rows / padded head-dim columns read as 0
    if TRANS:
        ptrs = ptr + base + idx[None, :] * stride_r + offs_d[:, None] * stride_d
        row_m = ok[None, :]
        col_m = offs_d[:, None] < D
    else:
        ptrs = ptr + base + idx[:, None] * stride_r + offs_d[None, :] * stride_d
        row_m = ok[:, None]
        col_m = offs_d[None, :] < D
    if MASKED:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_m, other=0.0)
        else:
            x = tl.load(ptrs, mask=row_m & col_m, other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=col_m, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def online_step(raw, scale, w, m, z, acc, FIXED_MAX: tl.constexpr):
    # one tile of an online softmax-weighted sum over logits l = scale * raw (log2 units, scale > 0): z = sum 2^(l - m),
    # acc = sum 2^(l - m) w, rescaled when the running max m (log2 units) grows; FIXED_MAX: m is a given LSE (no max,
    # no rescaling). The max runs on the unscaled raw values (scale > 0 keeps their order, and fp32 rounding is
    # monotone, so scale * max(raw) equals max(scale * raw) exactly); the scale enters once per element, in the
    # exponent's argument raw * scale - m (one FFMA)
    if FIXED_MAX:
        e = tl.exp2(raw * scale - m[:, None])
        z += tl.sum(e, 1)
        acc += tl.sum(e * w, 1)
    else:
        m_new = tl.maximum(m, tl.max(raw, 1) * scale)
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(raw * scale - m_new[:, None])
        z = z * alpha + tl.sum(e, 1)
        acc = acc * alpha + tl.sum(e * w, 1)
        m = m_new
    return m, z, acc
