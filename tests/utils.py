"""Comparison helpers shared by the tests, and the one rule that turns a dtype into a tolerance.

Every implementation is compared with an oracle computed in fp64 from the same (already rounded) inputs, so the
difference is the rounding error of the implementation alone. Its size follows from the dtypes, not from what one
machine printed:

- storing a result in ``dtype`` costs up to its unit roundoff u (2^-24 fp32, 2^-11 fp16, 2^-8 bf16);
- a sum of ``depth`` terms accumulated in ``accumulate`` precision has a rounding error that grows like
  u_acc * sqrt(depth) relative to the sum of the terms' magnitudes (the statistical form of the bound
  |err| <= depth * u * sum|x_i|, Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 3-4).
  Reordered sums (blocked, streamed, vectorised differently on AVX2, AVX-512 or AMX) stay inside it;
- where the result is a small difference of large terms (a KL of 3e-3 made of log-sum-exps of size ~3), the error
  is relative to the terms, not to the result: pass ``scale`` = the sum of the terms' magnitudes.

Where a test can also run the same reference in the tested dtype (whole-model method tests, whose rounding
passes through many layers), :func:`assert_error_budget` holds the implementation to a small multiple of that eager
rounding error (FlashAttention's rule), which tracks the host and the dtype without a table.

``SAFETY`` covers the constant in front of the statistical bound and a few chained operations (exp, log, division
each add a few u); it is one constant for every test, chosen so that a 1% error in any fp32 computation is still
far outside the tolerance.
"""

from __future__ import annotations

import math

import torch

SAFETY = 8.0

# The implementation and the eager reference sum the same terms in different orders (blocked kernels, other conv
# algorithms, 1 or more threads): their worst errors are two draws of the same random variable, not an ordered
# pair. FlashAttention's factor 2 is exceeded by such draws now and then (seen: 2.2 on a ResNet's first-conv
# gradient with 2 threads), so the budget is 4; a 1% error still lies 100x or more above it in fp32.
BUDGET = 4.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of rounding one real number to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def tol(dtype: torch.dtype, depth: int = 1, *, accumulate: torch.dtype = torch.float32) -> float:
    """Norm-wise relative error allowed for a result stored in ``dtype`` whose longest accumulation chain has
    ``depth`` terms summed in ``accumulate`` precision, against an fp64 oracle on the same inputs."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    store = unit_roundoff(dtype) if torch.finfo(dtype).eps > torch.finfo(accumulate).eps else 0.0
    return SAFETY * (store + unit_roundoff(accumulate) * math.sqrt(depth))


def assert_close_rel(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tol: float,
    name: str = "value",
    *,
    scale: float | torch.Tensor | None = None,
    atol: float = 0.0,
) -> None:
    """|actual - expected| <= tol * scale + atol everywhere. ``scale`` = max|expected| unless given: the magnitude
    of the terms whose rounding makes the error, a number or a tensor (per element) broadcastable to ``expected``.
    Reports where and by how much it fails."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values"
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    scale = torch.as_tensor(scale, dtype=torch.float64).cpu().expand_as(e)
    err = (a - e).abs()
    excess = err - (tol * scale + atol)
    if excess.numel() and float(excess.max()) > 0:
        idx = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
        raise AssertionError(
            f"{name}: abs error {float(err[idx]):.3e} > {tol:.1e} x {float(scale[idx]):.3e} + {atol:.0e} at {idx} "
            f"(actual {float(a[idx]):.6e}, expected {float(e[idx]):.6e}); "
            f"{int((excess > 0).sum())}/{err.numel()} elements off"
        )


def assert_error_budget(
    actual: torch.Tensor,
    same_dtype_ref: torch.Tensor,
    fp64_ref: torch.Tensor,
    name: str = "value",
    *,
    scale: float | None = None,
    depth: int = 1,
) -> None:
    """max|actual - oracle| <= BUDGET max|eager - oracle| + tol(dtype, depth) scale (FlashAttention's error budget).

    ``fp64_ref`` is the oracle; ``same_dtype_ref`` the same reference computed in ``actual``'s dtype, whose error
    measures what rounding alone costs on this host. The floor ``tol(dtype, depth) scale`` (``scale``: the
    magnitude of the terms the value is a difference of, default max|oracle|; ``depth``: the longest accumulation
    the implementation does its own way, e.g. N*d inside an attention kernel) covers an eager reference that
    happens to round luckily."""
    a = actual.detach().double().cpu()
    o = fp64_ref.detach().double().cpu()
    r = same_dtype_ref.detach().double().cpu()
    assert a.shape == o.shape == r.shape, f"{name}: shapes {tuple(a.shape)}, {tuple(r.shape)}, {tuple(o.shape)}"
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values"
    if scale is None:
        scale = float(o.abs().max()) if o.numel() else 0.0
    err = float((a - o).abs().max()) if o.numel() else 0.0
    eager = float((r - o).abs().max()) if o.numel() else 0.0
    floor = tol(actual.dtype, depth)
    budget = BUDGET * eager + floor * scale
    assert err <= budget, (f"{name}: error {err:.3e} vs the fp64 oracle > budget {budget:.3e} ({BUDGET:g} x eager "
                           f"{actual.dtype} error {eager:.3e} + {floor:.1e} x {scale:.3e})")
