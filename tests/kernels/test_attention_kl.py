"""attention_kl: every implementation against an fp64 materializing oracle, values and gradients.

The Triton kernels run here through Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 on
machines without CUDA): the real kernel code, at small shapes.
"""

from __future__ import annotations

import pytest
import torch

from fastkd import dispatch
from fastkd.functional import attention_kl
from tests.utils import assert_close_rel

IMPLS = ["torch", "triton", "reference"]

# dtype, tolerance on values, tolerance on gradients (relative to the largest expected magnitude)
DTYPES = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 4e-3, id="fp16"),
    pytest.param(torch.bfloat16, 4e-3, 2e-2, id="bf16"),
]


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


def run(impl, inputs, upstream=True, seed=1, **kw):
    """Loss and (dq_s, dk_s) of one implementation; ``upstream``: random grad on the [B, P, R] output."""
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    kw = {k: _on(device, v) for k, v in kw.items()}
    q_s, k_s, q_t, k_t = (x.clone().to(device) for x in inputs)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    if upstream:
        out = attention_kl(q_s, k_s, q_t, k_t, impl=impl, reduction="none", **kw)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        (out * g.to(out.dtype)).sum().backward()
    else:
        out = attention_kl(q_s, k_s, q_t, k_t, impl=impl, **kw)
        out.backward()
    return out.detach().cpu(), q_s.grad.cpu(), k_s.grad.cpu()


def oracle(inputs, upstream=True, **kw):
    """The same computation in fp64 through the materializing reference."""
    return run("reference", [x.double() for x in inputs], upstream=upstream, **kw)


def check(impl, inputs, tol_v, tol_g, upstream=True, **kw):
    got = run(impl, inputs, upstream=upstream, **kw)
    want = oracle(inputs, upstream=upstream, **kw)
    for name, a, e in zip(("kl", "dq_s", "dk_s"), got, want):
        tol = tol_v if name == "kl" else tol_g
        assert a.dtype == (torch.float32 if name == "kl" else inputs[0].dtype), f"{impl}: {name} dtype {a.dtype}"
        assert_close_rel(a, e, tol, f"{impl} {name}")
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
    check(impl, inputs, 2e-5, 2e-5, pairs=pairs, rows=rows_t)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_n577_all_rows(impl):
    inputs = make_inputs(1, 1, 1, 577, 16, 16, seed=577)
    check(impl, inputs, 2e-5, 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_reductions_and_directions(impl, direction, reduction):
    inputs = make_inputs(3, 2, 2, 33, 16, 16, seed=7)
    kw = dict(direction=direction, pairs=[(0, 1), (1, 1)])
    if reduction == "none":
        check(impl, inputs, 2e-5, 2e-5, **kw)
    else:  # plain .backward() on a scalar: the grad_output == 1 case
        check(impl, inputs, 2e-5, 2e-5, upstream=False, reduction=reduction, **kw)


def test_reductions_are_consistent():
    inputs = make_inputs(3, 2, 2, 20, 16, 16, seed=3)
    per_row = attention_kl(*inputs, reduction="none")
    assert per_row.shape == (3, 2, 20)
    assert (per_row >= -1e-6).all(), "KL must be non-negative"
    torch.testing.assert_close(attention_kl(*inputs, reduction="sum"), per_row.sum())
    torch.testing.assert_close(attention_kl(*inputs, reduction="mean"), per_row.mean())
    torch.testing.assert_close(attention_kl(*inputs, reduction="batchmean"), per_row.sum() / 3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, tol_v, tol_g", DTYPES)
def test_dtypes(impl, dtype, tol_v, tol_g):
    inputs = make_inputs(2, 2, 3, 197, 32, 16, dtype_s=dtype, seed=11)
    check(impl, inputs, tol_v, tol_g, pairs=[(0, 2), (1, 0)], direction="forward")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_s, dtype_t", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_mixed_teacher_student_dtypes(impl, dtype_s, dtype_t):
    inputs = make_inputs(2, 2, 2, 50, 16, 32, dtype_s=dtype_s, dtype_t=dtype_t, seed=5)
    tol_g = 2e-5 if dtype_s == torch.float32 else 2e-2
    check(impl, inputs, 4e-3, tol_g, direction="reverse")


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
        check(impl, inputs, 2e-5, 2e-5, key_mask=mask, direction=direction, rows=torch.tensor([0, 2, 50]))


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
    assert_close_rel(masked, expected, 1e-5, "masked KL")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fully_masked_rows_give_zero(impl):
    inputs = make_inputs(2, 1, 1, 19, 16, 16, seed=19)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1] = False  # batch item 1 keeps no key at all
    kl, dq, dk = run(impl, inputs, key_mask=mask)
    assert torch.isfinite(kl).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert (kl[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all()
    ref = oracle([x[:1] for x in inputs], key_mask=mask[:1])
    assert_close_rel(kl[:1], ref[0], 2e-5, "kl of the unmasked item")


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
        got = run(impl, inputs, direction=direction, **kw)
        want = oracle(inputs, direction=direction)
        for name, a, e in zip(("kl", "dq_s", "dk_s"), got, want):
            assert_close_rel(a, e, 5e-5, f"{impl} {name} with {sorted(kw)}")


def test_precomputed_lse_is_used():
    """A deliberately shifted student LSE shifts the KL by exactly that amount: the kernel reads it."""
    inputs = make_inputs(1, 1, 1, 40, 16, 16, seed=29)
    q_s, k_s, _, _ = inputs
    true = torch.logsumexp(q_s @ k_s.transpose(-1, -2) * 0.25, -1)
    for impl in ("torch", "triton"):
        base = attention_kl(*inputs, reduction="none", impl=impl, lse_s=true)
        shifted = attention_kl(*inputs, reduction="none", impl=impl, lse_s=true + 0.5)
        torch.testing.assert_close(shifted - base, torch.full_like(base, 0.5), atol=1e-5, rtol=0)


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
    check(impl, inputs, 2e-5, 2e-5)


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
    whole = run("torch", inputs, direction="reverse")
    monkeypatch.setenv("FASTKD_TORCH_CHUNK_ELEMS", "50")
    chunked = run("torch", inputs, direction="reverse")
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("forced", ["torch", "triton", "reference"])
def test_env_forces_implementation(monkeypatch, forced):
    import fastkd.kernels.attention_kl as tk
    import fastkd.kernels.attention_kl_torch as sk
    import fastkd.kernels.reference as rk

    calls = []
    monkeypatch.setattr(tk.AttentionKLFunction, "apply", lambda *a: calls.append("triton") or torch.zeros(1, 1, 1))
    monkeypatch.setattr(sk.AttentionKLTorchFunction, "apply", lambda *a: calls.append("torch") or torch.zeros(1, 1, 1))
    monkeypatch.setattr(rk, "attention_kl_reference", lambda *a, **k: calls.append("reference") or torch.zeros(1, 1, 1))
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
        (dict(lse_s=torch.zeros(2, 2, 9)), r"lse_s must be a float tensor \[B, H, N\]=\[2, 2, 10\]"),
        (dict(scale_s=-1.0), "scale_s must be a positive finite float"),
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
@pytest.mark.parametrize("dtype, tol_v, tol_g", DTYPES)
@pytest.mark.parametrize("B, H, N, d", GPU_SHAPES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_triton_on_gpu_matches_reference(B, H, N, d, dtype, tol_v, tol_g, direction):
    """Compiled kernels at ViT shapes against the fp64 oracle (on the GPU, materializing in fp64)."""
    inputs = make_inputs(B, H, H, N, d, d, dtype_s=dtype, seed=N + H)
    got = run("triton", inputs, direction=direction)
    dev_inputs = [x.cuda().double() for x in inputs]
    want = run_on_device_reference(dev_inputs, direction=direction)
    for name, a, e in zip(("kl", "dq_s", "dk_s"), got, want):
        assert_close_rel(a, e, tol_v if name == "kl" else tol_g, f"gpu triton {name}")


@pytest.mark.gpu
def test_triton_on_gpu_pairs_rows_mask_lse():
    B, N = 4, 198
    inputs = make_inputs(B, 6, 12, N, 64, 64, dtype_s=torch.bfloat16, seed=3)
    mask = torch.ones(N, dtype=torch.bool)
    mask[1] = False
    kw = dict(pairs=[(0, 3), (0, 7), (5, 11)], rows=torch.tensor([0, 5, 197]), key_mask=mask)
    got = run("triton", inputs, **kw)
    want = oracle(inputs, **kw)
    for name, a, e in zip(("kl", "dq_s", "dk_s"), got, want):
        assert_close_rel(a, e, 2e-2, f"gpu triton {name}")


def run_on_device_reference(inputs64, **kw):
    q_s, k_s, q_t, k_t = (x.clone() for x in inputs64)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    out = attention_kl(q_s, k_s, q_t, k_t, impl="reference", reduction="none", **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.device)
    (out * g).sum().backward()
    return out.detach().cpu(), q_s.grad.cpu(), k_s.grad.cpu()
