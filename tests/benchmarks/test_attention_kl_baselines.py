"""The peers in benchmarks/attention_kl.py compute the loss they claim, against an fp64 oracle.

The oracle materializes both softmax maps in fp64 from the same (already rounded) inputs and sums
P_t * (log P_t - log P_s) explicitly: independent of the FlexAttention construction (LSEs and P_t-weighted
key sums) and of F.kl_div (the eager peer). Tolerances: tests/utils.py's ``tol(dtype, depth)`` times the size of the
terms that are rounded (a KL is a small difference of large terms), never what one machine printed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.benchmarks import load
from tests.utils import assert_close_rel
from tests.utils import tol


@pytest.fixture(scope="module")
def bench():
    return load("attention_kl")


def inputs(B, H, N, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, N, d, generator=g) * s).to(dtype) for s in (1.5, 1.0, 1.5, 1.0)]


def oracle_rows(q_s, k_s, q_t, k_t):
    """KL_i = sum_j P_t,ij (log P_t,ij - log P_s,ij) in fp64, and the magnitude of the terms that get rounded."""
    q_s, k_s, q_t, k_t = (x.double() for x in (q_s, k_s, q_t, k_t))
    s = q_s @ k_s.transpose(-1, -2) / q_s.shape[-1] ** 0.5
    t = q_t @ k_t.transpose(-1, -2) / q_t.shape[-1] ** 0.5
    lse_s, lse_t = torch.logsumexp(s, -1, keepdim=True), torch.logsumexp(t, -1, keepdim=True)
    p_t = torch.exp(t - lse_t)
    kl = (p_t * ((t - lse_t) - (s - lse_s))).sum(-1)
    # sum_j P_t (|t| + |s|) + |LSE_t| + |LSE_s|: what the FlexAttention construction adds and subtracts
    size = (p_t * (t.abs() + s.abs())).sum(-1) + lse_t.squeeze(-1).abs() + lse_s.squeeze(-1).abs()
    return kl, size


SHAPES = [(2, 3, 197, 64), (1, 2, 17, 16), (1, 1, 1, 8)]  # ViT's N=197, an odd tail, a single token


@pytest.mark.parametrize("B,H,N,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flex_construction_forward_matches_oracle(bench, B, H, N, d, dtype):
    """FlexAttention's eager forward (the CPU has no backward for it): every row's KL."""
    q_s, k_s, q_t, k_t = inputs(B, H, N, d, dtype, seed=N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        rows = bench.flex_kl_rows(q_s, k_s, q_t, k_t)
    kl, size = oracle_rows(q_s, k_s, q_t, k_t)
    assert rows.shape == (B, H, N) and rows.dtype == torch.float32
    # the P_t-weighted key sums (N terms) come back in the input dtype, the rest is fp32: error relative to the terms
    t = tol(dtype, depth=N)
    assert_close_rel(rows, kl, t, name="KL rows", scale=size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = bench.flex_loss(q_s, k_s, q_t, k_t)
    assert_close_rel(loss, kl.sum() / B, t, name="batchmean", scale=size.sum() / B)


@pytest.mark.parametrize("B,H,N,d", SHAPES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_peer_matches_oracle(bench, B, H, N, d, dtype):
    """The eager peer (bf16 maps in a bf16 run): value and gradients to the student's q and k."""
    q_s, k_s, q_t, k_t = inputs(B, H, N, d, dtype, seed=N + 1)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    loss = bench.eager_loss(q_s, k_s, q_t, k_t)
    loss.backward()
    q64, k64 = q_s.detach().double().requires_grad_(), k_s.detach().double().requires_grad_()
    kl, size = oracle_rows(q64, k64, q_t, k_t)
    ref = kl.sum() / B
    ref.backward()
    # logits (d terms) and log-probabilities (N terms) are stored in the dtype: error relative to the terms
    assert_close_rel(loss, ref, tol(dtype, depth=N), name="loss", scale=size.sum() / B)
    assert_close_rel(q_s.grad, q64.grad, tol(dtype, depth=N), name="dq_s")
    assert_close_rel(k_s.grad, k64.grad, tol(dtype, depth=N), name="dk_s")


def test_eager_peer_selects_heads(bench):
    """With head pairs the eager peer computes the loss of the selected heads only."""
    q_s, k_s, q_t, k_t = inputs(2, 3, 33, 16, torch.float32, seed=3)
    heads_s, heads_t = [0, 2], [1, 1]
    got = bench.eager_loss(q_s, k_s, q_t, k_t, heads_s=heads_s, heads_t=heads_t)
    kl, size = oracle_rows(q_s[:, heads_s], k_s[:, heads_s], q_t[:, heads_t], k_t[:, heads_t])
    assert_close_rel(got, kl.sum() / 2, tol(torch.float32, depth=33), name="loss", scale=size.sum() / 2)


def test_flex_not_applicable_on_cpu_is_a_row(bench, tmp_path):
    """On the CPU the flex peer is recorded as not applicable, with the reason, not silently left out."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the flex peer runs")
    out = tmp_path / "ak.csv"
    assert bench.main(["--shapes", "1,1,9,8", "--providers", "flex", "--dtypes", "fp32", "--out", str(out)]) == 0
    import csv

    (row,) = list(csv.DictReader(open(out)))
    assert row["status"] == "not_applicable" and "no backward" in row["note"] and row["p50"] == ""


def test_compile_peer_is_fresh_per_configuration(bench, monkeypatch):
    """Each configuration gets its own compiled function, built after a dynamo reset (no recompile limit)."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    a, b = bench.make_fn("compile"), bench.make_fn("compile")
    assert a is not b and len(resets) == 2


def test_design_bound_comes_from_the_cost_model_csv(bench, tmp_path, monkeypatch):
    """design_bound_ms: the model's predicted bound for this GPU, shape, N and dtype; nothing for other GPUs."""
    import sys
    import types

    (tmp_path / "attention_kl_model_sm90.csv").write_text(
        "hardware,kernel,N,dtype,predicted_bound_ms\n"
        "H100,_attention_kl_fwd_kernel,197,bf16,0.06\n"
        "H100,attention_kl total,197,bf16,0.18639\n"
        "H200,attention_kl total,197,bf16,0.15\n"
    )
    monkeypatch.setattr(bench.C, "RESULTS", tmp_path)
    monkeypatch.setitem(sys.modules, "kernel_model", types.SimpleNamespace(SHAPES={"B": 256, "H": 6, "d": 64}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert bench.design_bounds(torch.device("cuda")) == {(256, 6, 197, 64, "bf16"): 0.18639}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert bench.design_bounds(torch.device("cuda")) == {}
    assert bench.design_bounds(torch.device("cpu")) == {}
