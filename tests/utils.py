"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch


def assert_close_rel(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "value", atol: float = 1e-6
) -> None:
    """max|actual - expected| <= tol * max|expected| + atol; reports where and by how much it fails."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values"
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = (a - e).abs()
    worst = float(err.max()) if err.numel() else 0.0
    if worst > tol * scale + atol:
        idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(
            f"{name}: max abs error {worst:.3e} > {tol:.1e} x {scale:.3e} + {atol:.0e} at {idx} "
            f"(actual {float(a[idx]):.6e}, expected {float(e[idx]):.6e}); "
            f"{int((err > tol * scale + atol).sum())}/{err.numel()} elements off"
        )
