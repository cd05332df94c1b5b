"""Head-importance scores vs the materializing references; the Triton kernels run under the interpreter."""

from __future__ import annotations

import math

import pytest
import torch

from fastkd.importance import ops
from fastkd.kernels import head_importance_torch
from tests.utils import assert_close_rel
from tests.utils import tol

# (B, H, N, d, d_v): ViT-S/16 at 224 (N=197), an odd N and head dim, a single row, a mid-size power-of-2-ish
SHAPES = [(1, 2, 197, 64, 64), (2, 3, 37, 24, 40), (2, 2, 1, 16, 16), (1, 2, 70, 32, 32)]
IMPLS = ["torch", "triton", "reference"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # small tensors only (tests/conftest.py)


def _inputs(B, H, N, d, dv, dtype=torch.float32, spread=2.0):
    # a spread > 1 gives peaked (low-entropy) rows as well as flat ones
    q = torch.randn(B, H, N, d) * spread
    k = torch.randn(B, H, N, d)
    v = torch.randn(B, H, N, dv)
    do = torch.randn(B, H, N, dv)
    return [t.to(dtype) for t in (q, k, v, do)]


def _lse(q, k, scale):
    return torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), -1).float()


# ------------------------------------------------------------------------- fp64 oracles, written here on purpose
# Independent of fastkd.kernels.reference: explicit einsums, torch.distributions for the entropy. Each returns
# (score [B, H], magnitude [B, H]): the magnitude is the sum of |terms| whose (signed) sum the score is, the scale
# of its rounding error (tests/utils.py).
def _probs(q, k, scale):
    logits = scale * torch.einsum("bhid,bhjd->bhij", q.double(), k.double())
    return torch.softmax(logits, -1), logits


def attribution_oracle(q, k, v, do, scale):
    p, _ = _probs(q, k, scale)
    dp = torch.einsum("bhic,bhjc->bhij", do.double(), v.double())
    # dP_ij = dO_i . v_j is a signed d_v-term sum: its rounding scales with sum_c |dO_ic v_jc|
    dp_terms = torch.einsum("bhic,bhjc->bhij", do.double().abs(), v.double().abs())
    return (p * dp).abs().sum((-1, -2)), (p * dp_terms).sum((-1, -2))


def entropy_oracle(q, k, scale):
    p, logits = _probs(q, k, scale)
    ent = torch.distributions.Categorical(logits=logits).entropy().mean(-1)
    # implementations compute lse - sum_j p_j t_j
    magnitude = (logits.logsumexp(-1).abs() + (p * logits.abs()).sum(-1)).mean(-1)
    return ent, magnitude


def gradient_oracle(q, k, v, do, scale):
    p, _ = _probs(q, k, scale)
    terms = torch.einsum("bhij,bhjc->bhic", p, v.double()) * do.double()
    return terms.sum((-1, -2)).abs(), terms.abs().sum((-1, -2))


def check_score(got, oracle_out, dtype, depth, name):
    """Scores are accumulated in fp32 whatever the input dtype (inputs are rounded before the oracle sees them)."""
    want, magnitude = oracle_out
    assert_close_rel(got, want, tol(torch.float32, depth), name, scale=magnitude)


# the streaming implementations with and without a given LSE; the forced reference path (always materializes)
IMPL_LSE = [("torch", False), ("torch", True), ("triton", False), ("triton", True), ("reference", False)]


@pytest.mark.parametrize("impl,with_lse", IMPL_LSE, ids=lambda x: str(x))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attribution_and_entropy_match_reference(monkeypatch, impl, shape, with_lse):
    monkeypatch.setenv("FASTKD_KERNELS", impl)
    B, H, N, d, dv = shape
    q, k, v, do = _inputs(*shape)
    scale = 0.7 / math.sqrt(d)  # not the default, so a dropped scale would show
    lse = _lse(q, k, scale) if with_lse else None
    a = ops.attribution_importance(q, k, v, do, scale=scale, lse=lse)
    e = ops.entropy_importance(q, k, scale=scale, lse=lse)
    assert a.shape == (B, H) and e.shape == (B, H) and a.dtype == torch.float32
    check_score(a, attribution_oracle(q, k, v, do, scale), q.dtype, N * max(d, dv), f"{impl} attribution")
    check_score(e, entropy_oracle(q, k, scale), q.dtype, N * d, f"{impl} entropy")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_score_matches_reference(monkeypatch, impl):
    monkeypatch.setenv("FASTKD_KERNELS", impl)
    q, k, v, do = _inputs(2, 3, 197, 32, 32)
    depth = 197 * 32
    expected = gradient_oracle(q, k, v, do, 32**-0.5)
    got = ops.head_importance(q, k, v, do, score="gradient")  # recomputes out from q, k, v
    check_score(got, expected, q.dtype, depth, f"{impl} gradient")
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    check_score(ops.gradient_importance(out, do), expected, q.dtype, depth, "gradient from out")
    # the dispatcher routes the other kinds to the same ops
    check_score(ops.head_importance(q, k, v, do, score="attribution"), attribution_oracle(q, k, v, do, 32**-0.5),
                q.dtype, depth, "head_importance attribution")
    check_score(ops.head_importance(q, k, score="entropy"), entropy_oracle(q, k, 32**-0.5), q.dtype, depth,
                "head_importance entropy")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(monkeypatch, impl, dtype):
    """fp32 accumulation: error vs the fp64 reference on the same (rounded) inputs stays at fp32 level."""
    monkeypatch.setenv("FASTKD_KERNELS", impl)
    q, k, v, do = _inputs(1, 2, 50, 64, 64, dtype=dtype)
    scale = 64**-0.5
    check_score(ops.attribution_importance(q, k, v, do), attribution_oracle(q, k, v, do, scale), dtype, 50 * 64,
                f"{impl} {dtype} attribution")
    check_score(ops.entropy_importance(q, k), entropy_oracle(q, k, scale), dtype, 50 * 64, f"{impl} {dtype} entropy")


def test_streaming_torch_chunks_and_strides(monkeypatch):
    """Chunked over a few rows at a time, on non-contiguous [B, N, H, d] -> [B, H, N, d] views (like the taps)."""
    B, N, H, d = 2, 45, 3, 16
    q, k, v, do = (torch.randn(B, N, H, d).transpose(1, 2) for _ in range(4))
    assert not q.is_contiguous()
    scale = d**-0.5
    monkeypatch.setenv("FASTKD_TORCH_CHUNK_ELEMS", str(7 * B * H * N))  # 7 rows per chunk
    a = head_importance_torch.attribution_importance(q, k, v, do, scale)
    e = head_importance_torch.entropy_importance(q, k, scale)
    check_score(a, attribution_oracle(q, k, v, do, scale), q.dtype, N * d, "chunked attribution")
    check_score(e, entropy_oracle(q, k, scale), q.dtype, N * d, "chunked entropy")


def test_triton_non_contiguous(monkeypatch):
    monkeypatch.setenv("FASTKD_KERNELS", "triton")
    B, N, H, d = 1, 33, 2, 16
    q, k, v, do = (torch.randn(B, N, H, d).transpose(1, 2) for _ in range(4))
    check_score(ops.attribution_importance(q, k, v, do), attribution_oracle(q, k, v, do, 0.25), q.dtype, N * d,
                "strided attribution")


def test_entropy_limits():
    """Uniform rows (q = 0) have entropy log N; one dominant key per row gives ~0."""
    q = torch.zeros(1, 2, 10, 16)
    k = torch.randn(1, 2, 10, 16)
    assert_close_rel(ops.entropy_importance(q, k), torch.full((1, 2), math.log(10)), tol(torch.float32, 10 * 16),
                     "uniform")
    k = torch.zeros(1, 1, 10, 16)
    k[..., 3, 0] = 1.0
    q = torch.zeros(1, 1, 10, 16)
    q[..., 0] = 400.0
    assert float(ops.entropy_importance(q, k, scale=1.0).max()) < 1e-6


def test_no_autograd_graph():
    q, k, v, do = (t.requires_grad_(True) for t in _inputs(1, 2, 9, 16, 16))
    assert not ops.attribution_importance(q, k, v, do).requires_grad
    assert not ops.entropy_importance(q, k).requires_grad
    assert not ops.gradient_importance(v, do).requires_grad


def test_bad_inputs_name_the_argument():
    q, k, v, do = _inputs(2, 3, 11, 16, 8)
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, N, d\]"):
        ops.entropy_importance(q[0], k)
    with pytest.raises(ValueError, match=r"q \[2, 3, 11, 16\] and k"):
        ops.entropy_importance(q, k[:, :2])
    with pytest.raises(ValueError, match=r"v must have shape \[B, H, N, d_v\] = \[2, 3, 11, d_v\]"):
        ops.attribution_importance(q, k, v[:, :, :5], do)
    with pytest.raises(ValueError, match="grad_out must have the shape of v"):
        ops.attribution_importance(q, k, v, do[..., :4])
    with pytest.raises(ValueError, match=r"lse must be a float tensor of shape \[B, H, N\] = \[2, 3, 11\]"):
        ops.entropy_importance(q, k, lse=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="scale must be a positive"):
        ops.entropy_importance(q, k, scale=-1.0)
    with pytest.raises(ValueError, match="score="):
        ops.head_importance(q, k, v, do, score="magnitude")
    with pytest.raises(ValueError, match="needs v and grad_out"):
        ops.head_importance(q, k, score="attribution")
    with pytest.raises(ValueError, match="float16, bfloat16"):
        ops.entropy_importance(q.long(), k.long())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 6, 197, 64, 64), (4, 12, 577, 64, 64), (2, 6, 785, 64, 64)])
@pytest.mark.parametrize("with_lse", [False, True])
def test_triton_on_gpu_matches_reference(monkeypatch, shape, dtype, with_lse):
    """The compiled kernels at ViT shapes, against the fp64 references computed on the same (rounded) inputs."""
    monkeypatch.setenv("FASTKD_KERNELS", "triton")
    d = shape[3]
    scale = d**-0.5
    q, k, v, do = (t.cuda() for t in _inputs(*shape, dtype=dtype))
    lse = _lse(q, k, scale) if with_lse else None
    a = ops.attribution_importance(q, k, v, do, scale=scale, lse=lse).cpu()
    e = ops.entropy_importance(q, k, scale=scale, lse=lse).cpu()
    q, k, v, do = (t.cpu() for t in (q, k, v, do))
    N = shape[2]
    check_score(a, attribution_oracle(q, k, v, do, scale), dtype, N * d, "gpu attribution")
    check_score(e, entropy_oracle(q, k, scale), dtype, N * d, "gpu entropy")
