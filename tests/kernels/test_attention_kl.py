"""attention_kl: every implementation against an fp64 materializing oracle, values and gradients.

The Triton kernels run here through Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 on
machines without CUDA): the real kernel code, at small shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastkd import dispatch
from fastkd.functional import attention_kl
from tests.utils import assert_close_rel
from tests.utils import tol

IMPLS = ["torch", "triton", "reference"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def make_inputs(B, H_s, H_t, N, d_s, d_t, dtype_s=torch.float32, dtype_t=None, sharp=1.5, seed=0):
    """Fresh random Q/K; ``sharp`` > 1 makes attention rows peakier than N(0,1) logits would."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * sharp**0.5

    dtype_t = dtype_t or dtype_s
    return (
        rnd(B, H_s, N, d_s).to(dtype_s), rnd(B, H_s, N, d_s).to(dtype_s),
        rnd(B, H_t, N, d_t).to(dtype_t), rnd(B, H_t, N, d_t).to(dtype_t),
    )  # fmt: skip


# Triton runs on CUDA tensors where a GPU exists (real compilation), else through the CPU interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on(device, value):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _upstream(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(impl, inputs, upstream=True, seed=1, **kw):
    """Loss and (dq_s, dk_s) of one implementation; ``upstream``: random grad on the [B, P, R] output."""
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    kw = {k: _on(device, v) for k, v in kw.items()}
    q_s, k_s, q_t, k_t = (x.clone().to(device) for x in inputs)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    if upstream:
        out = attention_kl(q_s, k_s, q_t, k_t, impl=impl, reduction="none", **kw)
        (out * _upstream(out.shape, seed).to(device=out.device, dtype=out.dtype)).sum().backward()
    else:
        out = attention_kl(q_s, k_s, q_t, k_t, impl=impl, **kw)
        out.backward()
    return out.detach().cpu(), q_s.grad.cpu(), k_s.grad.cpu()


def oracle(inputs, upstream=True, seed=1, pairs=None, rows=None, key_mask=None, direction="forward",
           reduction="batchmean", scale_s=None, scale_t=None, lse_s=None, lse_t=None):
    """The definition, written here independently of fastkd: fp64 logits built explicitly per head pair, the
    kept keys selected per batch item, and ``F.kl_div`` on the two log-softmaxes; gradients by autograd.

    Returns (kl, dq_s, dk_s, magnitude): ``magnitude`` is, per row, the sum of the magnitudes of the terms whose
    difference the KL is (sum_j p_j (|t_j| + |s_j|) + |lse_t| + |lse_s|), the scale of its rounding error.
    A given LSE does not change the definition (it is only a shortcut), so ``lse_s``/``lse_t`` are ignored."""
    q_s, k_s, q_t, k_t = (x.detach().double() for x in inputs)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    B, H_s, N, d_s = q_s.shape
    d_t = q_t.shape[3]
    pairs = [(h, h) for h in range(H_s)] if pairs is None else [tuple(int(v) for v in p) for p in pairs]
    rows = list(range(N)) if rows is None else [int(r) for r in rows]
    a_s = d_s**-0.5 if scale_s is None else scale_s
    a_t = d_t**-0.5 if scale_t is None else scale_t
    mask = torch.ones(B, N, dtype=torch.bool) if key_mask is None else key_mask.expand(B, N)
    kl = torch.zeros(B, len(pairs), len(rows), dtype=torch.float64)
    mag = torch.zeros(B, len(pairs), len(rows), dtype=torch.float64)
    for b in range(B):
        keep = mask[b].nonzero().squeeze(1)
        if keep.numel() == 0:
            continue  # no key: no distribution, KL defined as 0
        for p, (hs, ht) in enumerate(pairs):
            s = a_s * torch.einsum("rd,nd->rn", q_s[b, hs, rows], k_s[b, hs, keep])
            t = a_t * torch.einsum("rd,nd->rn", q_t[b, ht, rows], k_t[b, ht, keep])
            log_ps, log_pt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
            target, other = (log_pt, log_ps) if direction == "forward" else (log_ps, log_pt)
            row_kl = F.kl_div(other, target, reduction="none", log_target=True).sum(-1)
            kl = kl.index_put((torch.tensor(b), torch.tensor(p), torch.arange(len(rows))), row_kl)
            # the implementations compute sum_j p_j (a_j - b_j) - lse_a + lse_b from logits (DESIGN.md 3.1)
            terms = (target.exp() * (s.abs() + t.abs())).sum(-1) + s.logsumexp(-1).abs() + t.logsumexp(-1).abs()
            mag[b, p] = terms.detach()
    if upstream:
        (kl * _upstream(kl.shape, seed)).sum().backward()
        out = kl
    else:
        out = {"none": kl, "sum": kl.sum(), "mean": kl.mean(), "batchmean": kl.sum() / B}[reduction]
        out.backward()
        mag = {"none": mag, "sum": mag.sum(), "mean": mag.mean(), "batchmean": mag.sum() / B}[reduction]
    return out.detach(), q_s.grad, k_s.grad, mag


def check(impl, inputs, upstream=True, **kw):
    """One implementation against the oracle, with tolerances derived from the dtypes (tests/utils.py):

    - the KL (stored in fp32) is a difference of terms of size ``magnitude``, accumulated over N keys of d-long
      dot products: error <= tol(fp32, N*d) * magnitude, per row;
    - dq/dk are stored in the student's dtype and accumulate N terms whose probabilities come from d-long dots:
      tol(dtype_s, N*d) relative to the largest gradient (fp16/bf16 kernels may also round P and dS to the
      input dtype before their matmuls, hence the rounding of dtype_s on top of the fp32 accumulation).
    Teacher inputs in a lower precision than the student are rounded already: the oracle sees the same values.
    """
    got = run(impl, inputs, upstream=upstream, **kw)
    *want, mag = oracle(inputs, upstream=upstream, **kw)
    q_s, _, q_t, _ = inputs
    depth = q_s.shape[2] * max(q_s.shape[3], q_t.shape[3])
    low = min((q_s.dtype, q_t.dtype), key=lambda d: -torch.finfo(d).eps)  # the coarser of the two input dtypes
    for name, a, e in zip(("kl", "dq_s", "dk_s"), got, want):
        assert a.dtype == (torch.float32 if name == "kl" else q_s.dtype), f"{impl}: {name} dtype {a.dtype}"
        if name == "kl":
            assert_close_rel(a, e, tol(torch.float32, depth), f"{impl} kl", scale=mag)
        else:
            assert_close_rel(a, e, tol(low, depth), f"{impl} {name}")
    return got, want


# ------------------------------------------------------------------------------------------ shapes and layouts
SHAPES = [  # B, H_s, H_t, N, d_s, d_t, pairs, rows
    pytest.param(2, 2, 2, 1, 16, 16, None, None, id="N1"),
    pytest.param(2, 3, 2, 17, 16, 24, [(0, 1), (2, 0), (1, 1)], None, id="N17-dsdt-pairs"),
    pytest.param(2, 3, 4, 197, 32, 16, [(0, 3), (0, 1), (2, 2)], None, id="N197-repeated-student-head"),
    pytest.param(1, 2, 2, 199, 8, 8, None, [0, 198, 7, 7, 100], id="N199-row-subset-repeats"),
    pytest.param(1, 2, 3, 577, 16, 16, [(1, 2), (0, 0)], [0], id="N577-cls-row"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B, H_s, H_t, N, d_s, d_t, pairs, rows", SHAPES)
def test_matches_fp64_reference(impl, B, H_s, H_t, N, d_s, d_t, pairs, rows):
    inputs = make_inputs(B, H_s, H_t, N, d_s, d_t, seed=N)
    rows_t = None if rows is None else torch.tensor(rows)
    check(impl, inputs, pairs=pairs, rows=rows_t)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_n577_all_rows(impl):
    inputs = make_inputs(1, 1, 1, 577, 16, 16, seed=577)
    check(impl, inputs)


# The reductions are torch code after the op (fastkd/functional.py), the same for every implementation; what a
# scalar reduction changes for the kernels is only the value of a uniform upstream gradient (the launchers make it
# a contiguous fp32 [B, P, R] tensor). So Triton runs "none" (random upstream) and "sum" (grad_output == 1) per
# direction; "mean" and "batchmean" (the same kernels, upstream 1/(B*P*R) and 1/B) run for torch and reference.
REDUCTION_CASES = [pytest.param(impl, reduction, id=f"{reduction}-{impl}") for reduction in
                   ("none", "sum", "mean", "batchmean") for impl in IMPLS
                   if impl != "triton" or reduction in ("none", "sum")]


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("impl, reduction", REDUCTION_CASES)
def test_reductions_and_directions(impl, direction, reduction):
    inputs = make_inputs(3, 2, 2, 33, 16, 16, seed=7)
    kw = dict(direction=direction, pairs=[(0, 1), (1, 1)])
    if reduction == "none":
        check(impl, inputs, **kw)
    else:  # plain .backward() on a scalar: the grad_output == 1 case
        check(impl, inputs, upstream=False, reduction=reduction, **kw)


def test_reductions_are_consistent():
    inputs = make_inputs(3, 2, 2, 20, 16, 16, seed=3)
    per_row = attention_kl(*inputs, reduction="none")
    assert per_row.shape == (3, 2, 20)
    assert (per_row >= -1e-6).all(), "KL must be non-negative"
    torch.testing.assert_close(attention_kl(*inputs, reduction="sum"), per_row.sum())
    torch.testing.assert_close(attention_kl(*inputs, reduction="mean"), per_row.mean())
    torch.testing.assert_close(attention_kl(*inputs, reduction="batchmean"), per_row.sum() / 3)


# the Triton path in every dtype at this shape (N=197, d_s=32 != d_t=16, pairs over H_t=3), both directions:
# test_attention_kl_paths.py::test_tails_in_rows_and_keys
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(impl, dtype):
    inputs = make_inputs(2, 2, 3, 197, 32, 16, dtype_s=dtype, seed=11)
    check(impl, inputs, pairs=[(0, 2), (1, 0)], direction="forward")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_s, dtype_t", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_mixed_teacher_student_dtypes(impl, dtype_s, dtype_t):
    inputs = make_inputs(2, 2, 2, 50, 16, 32, dtype_s=dtype_s, dtype_t=dtype_t, seed=5)
    check(impl, inputs, direction="reverse")


# ------------------------------------------------------------------------------------------- masks and LSEs
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_batch", [False, True], ids=["mask-N", "mask-BN"])
def test_key_mask(impl, per_batch):
    B, N = 2, 198  # e.g. a DeiT student's distillation token at position 1
    inputs = make_inputs(B, 2, 2, N, 16, 16, seed=13)
    if per_batch:
        mask = torch.rand(B, N, generator=torch.Generator().manual_seed(2)) > 0.3
    else:
        mask = torch.ones(N, dtype=torch.bool)
        mask[1] = False
    for direction in ("forward", "reverse"):
        check(impl, inputs, key_mask=mask, direction=direction, rows=torch.tensor([0, 2, 50]))


def test_masked_key_equals_dropped_key():
    """Masking a key gives exactly the KL over the other keys (the distillation-token use case)."""
    inputs = make_inputs(2, 2, 2, 30, 16, 16, seed=17)
    mask = torch.ones(30, dtype=torch.bool)
    mask[1] = False
    keep = mask.nonzero().squeeze(1)
    rows = torch.tensor([0, 5])
    masked = attention_kl(*inputs, key_mask=mask, rows=rows, reduction="none")
    q_s, k_s, q_t, k_t = (x.double() for x in inputs)
    s = torch.softmax(q_s[:, :, rows] @ k_s[:, :, keep].transpose(-1, -2) * 0.25, -1)
    t = torch.softmax(q_t[:, :, rows] @ k_t[:, :, keep].transpose(-1, -2) * 0.25, -1)
    expected = (t * (t.log() - s.log())).sum(-1)
    magnitude = oracle(inputs, key_mask=mask, rows=rows)[3]
    assert_close_rel(masked, expected, tol(torch.float32, 30 * 16), "masked KL", scale=magnitude)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fully_masked_rows_give_zero(impl):
    inputs = make_inputs(2, 1, 1, 19, 16, 16, seed=19)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1] = False  # batch item 1 keeps no key at all
    kl, dq, dk = run(impl, inputs, key_mask=mask)
    assert torch.isfinite(kl).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert (kl[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all()
    ref = oracle([x[:1] for x in inputs], key_mask=mask[:1])
    assert_close_rel(kl[:1], ref[0], tol(torch.float32, 19 * 16), "kl of the unmasked item", scale=ref[3])


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("which", ["s", "t", "both"])
def test_precomputed_lse(impl, which):
    inputs = make_inputs(2, 2, 2, 45, 16, 16, seed=23)
    q_s, k_s, q_t, k_t = inputs
    lse = {
        "lse_s": torch.logsumexp(q_s @ k_s.transpose(-1, -2) * 0.25, -1),
        "lse_t": torch.logsumexp(q_t @ k_t.transpose(-1, -2) * 0.25, -1),
    }
    kw = {k: v for k, v in lse.items() if which == "both" or k.endswith(which)}
    for direction in ("forward", "reverse"):
        check(impl, inputs, direction=direction, **kw)


def test_precomputed_lse_is_used():
    """A deliberately shifted student LSE shifts the KL by exactly that amount: the kernel reads it."""
    inputs = make_inputs(1, 1, 1, 40, 16, 16, seed=29)
    q_s, k_s, _, _ = inputs
    true = torch.logsumexp(q_s @ k_s.transpose(-1, -2) * 0.25, -1)
    magnitude = oracle(inputs)[3] + 0.5
    for impl in ("torch", "triton"):
        base = attention_kl(*inputs, reduction="none", impl=impl, lse_s=true)
        shifted = attention_kl(*inputs, reduction="none", impl=impl, lse_s=true + 0.5)
        assert_close_rel(shifted - base, torch.full_like(base, 0.5), 2 * tol(torch.float32, 40 * 16),
                         f"{impl} KL shift", scale=magnitude)


# --------------------------------------------------------------------------------- layouts, autograd, memory
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_non_contiguous_inputs(impl):
    """Q/K as timm produces them: views into one qkv tensor [3, B, H, N, d] (non-contiguous)."""
    B, H, N, d = 2, 3, 37, 16
    gen = torch.Generator().manual_seed(31)
    qkv_s = torch.randn(B, N, 3, H, d, generator=gen).permute(2, 0, 3, 1, 4)
    qkv_t = torch.randn(B, N, 3, H, d, generator=gen).permute(2, 0, 3, 1, 4)
    inputs = (qkv_s[0], qkv_s[1], qkv_t[0], qkv_t[1])
    assert not inputs[0].is_contiguous()
    check(impl, inputs)


def test_gradcheck_torch_path():
    q_s, k_s, q_t, k_t = (x.double() for x in make_inputs(2, 2, 2, 7, 4, 5, seed=37))
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    mask = torch.tensor([True, False, True, True, True, True, True])
    for direction in ("forward", "reverse"):

        def fn(qs, ks, direction=direction):
            return attention_kl(qs, ks, q_t, k_t, impl="torch", pairs=[(0, 1), (0, 0), (1, 1)], rows=[0, 3, 3],
                                key_mask=mask, reduction="none", direction=direction)

        assert torch.autograd.gradcheck(fn, (q_s, k_s), eps=1e-6, atol=1e-7)


def test_torch_path_chunks_agree(monkeypatch):
    """Tiny chunks (several batch and row chunks) give the same result as one big chunk."""
    inputs = make_inputs(3, 2, 2, 41, 16, 16, seed=41)
    check("torch", inputs, direction="reverse")
    monkeypatch.setenv("FASTKD_TORCH_CHUNK_ELEMS", "50")
    check("torch", inputs, direction="reverse")


# ----------------------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("forced", ["torch", "triton", "reference"])
def test_env_forces_implementation(monkeypatch, forced):
    import fastkd.kernels.attention_kl as tk
    import fastkd.kernels.attention_kl_torch as sk
    import fastkd.kernels.reference as rk

    calls = []
    for name, module in (("triton", tk), ("torch", sk), ("reference", rk)):
        entry = module.attention_kl_forward
        monkeypatch.setattr(module, "attention_kl_forward", lambda *a, e=entry, n=name: calls.append(n) or e(*a))
    monkeypatch.setenv("FASTKD_KERNELS", forced)
    assert dispatch.select("cpu") == forced
    attention_kl(*make_inputs(1, 1, 1, 1, 16, 16))
    assert calls == [forced]


def test_default_dispatch_on_cpu_is_streaming_torch(monkeypatch):
    monkeypatch.delenv("FASTKD_KERNELS", raising=False)
    assert dispatch.select("cpu") == "torch"
    monkeypatch.setenv("FASTKD_KERNELS", "bogus")
    with pytest.raises(ValueError, match="FASTKD_KERNELS"):
        dispatch.select("cpu")
    monkeypatch.setenv("FASTKD_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        dispatch.select("cpu")


# --------------------------------------------------------------------------------------------- bad input
def _bad(**overrides):
    q_s, k_s, q_t, k_t = make_inputs(2, 2, 3, 10, 16, 16)
    args = dict(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, pairs=[(0, 1)])
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(q_t=torch.randn(3, 3, 10, 16), k_t=torch.randn(3, 3, 10, 16)), "batch sizes differ"),
        (dict(q_t=torch.randn(2, 3, 11, 16), k_t=torch.randn(2, 3, 11, 16)), r"token counts differ.*N=10.*N=11"),
        (dict(pairs=None), "pairs is required"),
        (dict(pairs=[(0, 3)]), r"pairs: teacher head index 3 out of range.*H_t=3"),
        (dict(pairs=[(-1, 0)]), r"pairs: student head index -1 out of range"),
        (dict(pairs=[[0, 1, 2]]), r"pairs must be .* shape \[P, 2\]"),
        (dict(q_s=torch.randn(2, 2, 10)), r"q_s must have shape \[B, H_s, N, d_s\]"),
        (dict(k_s=torch.randn(2, 2, 10, 8)), r"q_s \[2, 2, 10, 16\] and k_s \[2, 2, 10, 8\] must have the same shape"),
        (dict(q_s=torch.randint(0, 3, (2, 2, 10, 16))), "q_s must be float16, bfloat16, float32 or float64"),
        (dict(k_t=torch.randn(2, 3, 10, 16).half()), "q_t .* and k_t .* must have the same dtype"),
        (dict(rows=torch.tensor([0, 10])), r"rows: index out of range; expected 0 <= row < N=10"),
        (dict(rows=torch.tensor([0.5])), "rows must be None or a 1-D integer index tensor"),
        (dict(key_mask=torch.ones(9, dtype=torch.bool)), r"key_mask must have shape \[N\]=\[10\] or \[B, N\]"),
        (dict(key_mask=torch.ones(10)), "key_mask must be a bool tensor"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(direction="both"), "direction must be one of"),
        (dict(lse_s=torch.zeros(2, 2, 9)), r"lse_s must be a float tensor of shape \[B, H, N\] = \[2, 2, 10\]"),
        (dict(scale_s=-1.0), "scale_s must be a positive finite float"),
        (dict(key_mask=torch.ones(10, dtype=torch.bool), lse_t=torch.zeros(2, 3, 10)),
         "key_mask cannot be combined with lse_t"),
        (dict(q_t=torch.randn(2, 3, 10, 16, requires_grad=True)), "q_t/k_t require grad"),
    ],
)
def test_bad_input_raises_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        attention_kl(**_bad(**overrides))


def test_non_finite_inputs_detected_when_debugging(monkeypatch):
    args = _bad()
    args["q_t"] = args["q_t"].clone()
    args["q_t"][0, 0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="q_t contains NaN or inf"):
        attention_kl(**args, check_finite=True)
    monkeypatch.setenv("FASTKD_DEBUG", "1")
    with pytest.raises(ValueError, match="q_t contains NaN or inf"):
        attention_kl(**args)


def test_triton_rejects_float64():
    with pytest.raises(ValueError, match="float64 inputs are supported by the torch and reference"):
        attention_kl(*(x.double() for x in make_inputs(1, 1, 1, 4, 16, 16)), impl="triton")


# ------------------------------------------------------------------------------ real GPU (compiled kernels)
GPU_SHAPES = [(8, H, N, 64) for H in (6, 12) for N in (197, 577, 785)] + [(2, 6, 3137, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, N, d", GPU_SHAPES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_triton_on_gpu_matches_reference(B, H, N, d, dtype, direction):
    """Compiled kernels at ViT shapes against the fp64 oracle."""
    check("triton", make_inputs(B, H, H, N, d, d, dtype_s=dtype, seed=N + H), direction=direction)


@pytest.mark.gpu
def test_triton_on_gpu_pairs_rows_mask_lse():
    B, N = 4, 198
    inputs = make_inputs(B, 6, 12, N, 64, 64, dtype_s=torch.bfloat16, seed=3)
    mask = torch.ones(N, dtype=torch.bool)
    mask[1] = False
    check("triton", inputs, pairs=[(0, 3), (0, 7), (5, 11)], rows=torch.tensor([0, 5, 197]), key_mask=mask)
