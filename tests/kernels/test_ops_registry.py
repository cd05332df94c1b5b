"""The op registry: PyTorch custom ops (opcheck, torch.compile without graph breaks, no host syncs), one set of
selection checks for ``impl=`` and ``FASTKD_KERNELS``, a new backend as one registration, and bad inputs."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd import custom_ops
from fastkd import dispatch
from fastkd.functional import attention_kl
from fastkd.importance import ops as importance
from fastkd.kernels.reference import attention_kl_reference
from tests.utils import assert_close_rel
from tests.utils import tol

IMPLS = ["torch", "triton", "reference"]


def _qk(B, H, N, d, gen, requires_grad=False):
    q, k = (torch.randn(B, H, N, d, generator=gen) * 1.2 for _ in range(2))
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


def _kl_terms(q_s, k_s, q_t, k_t, scale_s, scale_t) -> float:
    """An upper bound of the terms a KL row is the difference of (|logits| and |LSE| of both sides, DESIGN.md
    3.1): the scale of its rounding error."""
    s = scale_s * q_s.detach().double() @ k_s.detach().double().transpose(-1, -2)
    t = scale_t * q_t.double() @ k_t.double().transpose(-1, -2)
    return float(s.abs().max() + t.abs().max() + s.logsumexp(-1).abs().max() + t.logsumexp(-1).abs().max())


def _attention_kl_args(impl, reverse=False, with_lse=False, unique=False, seed=0):
    """Positional arguments of fastkd::attention_kl, N=13 with a mask: a repeated student head and row, or
    (``unique``) distinct heads and rows, declared so in the host metadata."""
    gen = torch.Generator().manual_seed(seed)
    q_s, k_s = _qk(2, 2, 13, 16, gen, requires_grad=True)
    q_t, k_t = _qk(2, 3, 13, 16, gen)
    pairs = torch.tensor([[0, 2], [1, 0]] if unique else [[0, 2], [1, 0], [0, 1]])
    rows = torch.tensor([0, 4, 12] if unique else [0, 4, 4, 12])
    mask = torch.rand(2, 13, generator=gen) > 0.2
    lse_s = lse_t = None
    if with_lse:
        off = (~mask[:, None, None]) * 1e30  # masked keys out of the LSE
        lse_s = torch.logsumexp(0.25 * q_s.detach() @ k_s.detach().transpose(-1, -2) - off, -1)
        lse_t = torch.logsumexp(0.3 * q_t @ k_t.transpose(-1, -2) - off, -1)
    return (q_s, k_s, q_t, k_t, pairs, rows, mask, 0.25, 0.3, reverse, lse_s, lse_t, unique, unique, impl)


# ------------------------------------------------------------------------------------------- custom ops
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse, with_lse, unique", [(False, False, False), (True, True, True)])
def test_opcheck_attention_kl(impl, reverse, with_lse, unique):
    args = _attention_kl_args(impl, reverse, with_lse and impl != "reference", unique)
    torch.library.opcheck(torch.ops.fastkd.attention_kl.default, args)


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_head_importance(impl):
    gen = torch.Generator().manual_seed(3)
    q, k = _qk(2, 3, 11, 16, gen)
    v, do = _qk(2, 3, 11, 8, gen)
    lse = torch.logsumexp(0.2 * q @ k.transpose(-1, -2), -1)
    torch.library.opcheck(torch.ops.fastkd.attribution_rows.default, (q, k, v, do, 0.2, lse, impl))
    torch.library.opcheck(torch.ops.fastkd.entropy_rows.default, (q, k, 0.2, None, impl))


def _loss_like_ssta(q_s, k_s, q_t, k_t, key_mask):
    """SSTA's call: one student head against one teacher head, some rows, masked keys, reverse KL."""
    return attention_kl(q_s, k_s, q_t, k_t, pairs=[(1, 0)], scale_s=0.2, scale_t=0.3, rows=[0, 2, 3, 4],
                        key_mask=key_mask, reduction="mean", direction="reverse")  # fmt: skip


_ATTNDISTILL = types.SimpleNamespace(aggregation=False, t_agg=1.0)  # the settings the kernel path reads


def _loss_like_attndistill(q_s, k_s, q_t, k_t, key_mask):
    """AttnDistill's kernel path as the method writes it (rows built as a tensor inside the loss)."""
    from fastkd.methods.attndistill import AttnDistill

    return AttnDistill._attention_loss_kernel(_ATTNDISTILL, q_s, k_s, 0.2, q_t, k_t, 0.3, None, None)


@pytest.mark.parametrize("loss_fn", [_loss_like_ssta, _loss_like_attndistill], ids=["ssta", "attndistill"])
def test_compile_fullgraph_no_graph_breaks(loss_fn):
    """torch.compile(fullgraph=True) of a method's attention loss: zero graph breaks, same values and grads as
    an fp64 materialized oracle."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(7)
    q_s, k_s = _qk(2, 2, 9, 16, gen, requires_grad=True)
    q_t, k_t = _qk(2, 2, 9, 16, gen)
    mask = torch.ones(9, dtype=torch.bool)
    mask[5] = False
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q_s, k_s, q_t, k_t, mask)
    dq, dk = torch.autograd.grad(loss, (q_s, k_s))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])

    qs64, ks64 = q_s.detach().double().requires_grad_(True), k_s.detach().double().requires_grad_(True)
    if loss_fn is _loss_like_ssta:
        kl = attention_kl_reference(qs64, ks64, q_t.double(), k_t.double(), torch.tensor([[1, 0]]), 0.2, 0.3,
                                    rows=torch.tensor([0, 2, 3, 4]), key_mask=mask.expand(2, 9),
                                    direction="reverse")  # fmt: skip
        want = kl.mean()
    else:
        pairs = torch.tensor([[0, 0], [1, 1]])
        want = attention_kl_reference(qs64, ks64, q_t.double(), k_t.double(), pairs, 0.2, 0.3,
                                      rows=torch.tensor([0])).sum() / 2  # fmt: skip
    want_dq, want_dk = torch.autograd.grad(want, (qs64, ks64))
    rtol = tol(torch.float32, 9 * 16)  # N keys of d-long dot products, accumulated in fp32
    assert_close_rel(loss, want, rtol, "compiled loss", scale=_kl_terms(q_s, k_s, q_t, k_t, 0.2, 0.3))
    assert_close_rel(dq, want_dq, rtol, "compiled dq_s")
    assert_close_rel(dk, want_dk, rtol, "compiled dk_s")


# ------------------------------------------------------------------------------------------- no host syncs
class NoSync(TorchDispatchMode):
    """Fails on any op that makes the host wait for the device: .item()/int()/bool() of a tensor, nonzero,
    unique, and copies from a device to the CPU. Looks inside fastkd's custom ops too (a mode is switched off
    while its handler runs, so it is pushed again around them). Boolean-mask indexing syncs on CUDA only
    through an internal nonzero the CPU kernel does not dispatch: on the CPU this sees ``nonzero()`` calls."""

    FORBIDDEN = ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique", "aten::item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith(self.FORBIDDEN):
            raise AssertionError(f"host sync inside the op layer: {func}")
        if name in ("aten::_to_copy", "aten::copy_", "aten::to"):
            src = args[1] if name == "aten::copy_" else args[0]
            dst = args[0].device if name == "aten::copy_" else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst).type == "cpu":
                raise AssertionError(f"device-to-host copy inside the op layer: {func}")
        if func.namespace == "fastkd":  # run the op's Python implementation under this mode
            from torch._library.custom_ops import OPDEFS

            with NoSync():
                return OPDEFS[name]._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def test_sync_detector_catches_syncs():
    r = torch.arange(5)
    with pytest.raises(AssertionError, match="host sync"), NoSync():
        int(r.min())
    with pytest.raises(AssertionError, match="host sync"), NoSync():
        r.nonzero()
    with pytest.raises(AssertionError, match="host sync"), NoSync():
        bool(r.any())
    with pytest.raises(AssertionError, match="host sync"), NoSync():
        torch.unique(r)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_host_sync_in_forward_and_backward(impl):
    """Index arguments given as host values (lists, CPU tensors): nothing reads a tensor value on the host."""
    gen = torch.Generator().manual_seed(11)
    q_s, k_s = _qk(2, 3, 10, 16, gen, requires_grad=True)
    q_t, k_t = _qk(2, 4, 10, 16, gen)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 3] = False
    lse_t = torch.logsumexp(0.25 * q_t @ k_t.transpose(-1, -2), -1)
    for pairs, rows in (([(0, 1), (0, 3), (2, 2)], [0, 4, 4]), (torch.tensor([[1, 0]]), torch.tensor([0, 9]))):
        for extra in ({"key_mask": mask}, {"lse_t": lse_t}):
            with NoSync():
                loss = attention_kl(q_s, k_s, q_t, k_t, pairs=pairs, rows=rows, scale_t=0.25, impl=impl,
                                    reduction="batchmean", **extra)  # fmt: skip
                loss.backward()
    q, k = _qk(2, 3, 10, 16, gen)
    v, do = _qk(2, 3, 10, 8, gen)
    with NoSync():
        importance.attribution_importance(q, k, v, do)
        importance.entropy_importance(q, k)
        importance.gradient_importance(v, do)


# ------------------------------------------------------------------------------------------- the registry
def test_impl_argument_gets_the_same_checks_as_the_environment(monkeypatch):
    inputs = _qk(1, 1, 4, 16, torch.Generator().manual_seed(0)) * 2
    with pytest.raises(ValueError, match=r"impl='cuda' is not an implementation of attention_kl"):
        attention_kl(*inputs, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for how in ("impl", "env"):
        with pytest.raises(RuntimeError, match="the Triton kernels need CUDA tensors"):
            if how == "impl":
                attention_kl(*inputs, impl="triton")
            else:
                monkeypatch.setenv("FASTKD_KERNELS", "triton")
                attention_kl(*inputs)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTKD_KERNELS", "triton")
    with pytest.raises(ValueError, match="float64 inputs are supported by the torch and reference"):
        importance.entropy_importance(*(x.double() for x in inputs[:2]))


def test_default_skips_a_backend_that_cannot_take_the_inputs():
    if not dispatch.triton_available():
        pytest.skip("triton is not installed")
    assert dispatch.select("cuda", "attention_kl", dtypes=(torch.bfloat16,)) == "triton"
    assert dispatch.select("cuda", "attention_kl", dtypes=(torch.float64,)) == "torch"
    assert dispatch.select("cpu", "head_importance", dtypes=(torch.float32,)) == "torch"


def test_a_new_backend_is_one_module_and_one_registration(monkeypatch, capsys):
    """A backend module with the op's entry points plus one register() call: selectable, listed by info."""
    from fastkd import info
    from fastkd.kernels import attention_kl_torch

    calls = []
    module = types.ModuleType("my_backend")

    def forward(*args):
        calls.append("forward")
        return attention_kl_torch.attention_kl_forward(*args)

    def backward(*args, **host_metadata):
        calls.append("backward")
        return attention_kl_torch.attention_kl_backward(*args, **host_metadata)

    module.attention_kl_forward, module.attention_kl_backward = forward, backward
    monkeypatch.setitem(sys.modules, "my_backend", module)
    monkeypatch.setitem(dispatch._REGISTRY, "attention_kl", dict(dispatch._REGISTRY["attention_kl"]))
    dispatch.register("attention_kl", "mine", "my_backend", summary="a test backend")

    gen = torch.Generator().manual_seed(5)
    q_s, k_s = _qk(2, 2, 7, 16, gen, requires_grad=True)
    q_t, k_t = _qk(2, 2, 7, 16, gen)
    got = attention_kl(q_s, k_s, q_t, k_t, impl="mine", reduction="sum")
    got.backward()
    assert calls == ["forward", "backward"]
    want = attention_kl_reference(q_s.double(), k_s.double(), q_t.double(), k_t.double(),
                                  torch.tensor([[0, 0], [1, 1]]), 0.25, 0.25).sum()  # fmt: skip
    terms = 2 * 7 * _kl_terms(q_s, k_s, q_t, k_t, 0.25, 0.25)  # a sum over B * P * N rows
    assert_close_rel(got, want, tol(torch.float32, 7 * 16), "new backend", scale=terms)
    monkeypatch.setenv("FASTKD_KERNELS", "mine")
    assert dispatch.select("cpu", "attention_kl") == "mine"
    info.run_info(types.SimpleNamespace(json=False))
    assert "attention_kl     mine       a test backend" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- bad inputs
def _kl_inputs(B=2, N=6):
    gen = torch.Generator().manual_seed(2)
    return (*_qk(B, 2, N, 16, gen), *_qk(B, 3, N, 16, gen))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [[], torch.tensor([], dtype=torch.long)], ids=["list", "tensor"])
def test_empty_rows_name_the_argument(impl, rows):
    with pytest.raises(ValueError, match="rows is empty"):
        attention_kl(*_kl_inputs(), pairs=[(0, 1)], rows=rows, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_names_the_argument(impl):
    with pytest.raises(ValueError, match=r"q_s has batch size B=0"):
        attention_kl(*_kl_inputs(B=0), pairs=[(0, 1)], impl=impl)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(pairs=[(0, 2**70)]), r"pairs: teacher head index 1180591620717411303424 out of range"),
        (dict(pairs=torch.tensor([[0, 2**62]])), r"pairs: teacher head index \d+ out of range; expected 0 <= index"),
        (dict(rows=[2**63 + 5]), r"rows: index out of range; expected 0 <= row < N=6"),
        (dict(pairs=[(0.0, 1)]), r"pairs must be P >= 1 \(student_head, teacher_head\) pairs"),
        (dict(rows=[True]), r"rows must be None or a 1-D integer index"),
        (dict(k_s_dtype=torch.bfloat16), r"q_s \(torch.float32\) and k_s \(torch.bfloat16\) must have the same dtype"),
        (dict(lse_t=torch.zeros(2, 3, 6, 1)), r"lse_t must be a float tensor of shape \[B, H, N\] = \[2, 3, 6\]"),
    ],
)
def test_bad_index_and_dtype_name_the_argument(overrides, match):
    q_s, k_s, q_t, k_t = _kl_inputs()
    if "k_s_dtype" in overrides:
        k_s = k_s.to(overrides.pop("k_s_dtype"))
    kw = dict(pairs=[(0, 1)])
    kw.update(overrides)
    with pytest.raises(ValueError, match=match):
        attention_kl(q_s, k_s, q_t, k_t, **kw)


def test_debug_checks_lse_for_nan(monkeypatch):
    q_s, k_s, q_t, k_t = _kl_inputs()
    lse = torch.zeros(2, 3, 6)
    lse[1, 2, 3] = float("nan")
    monkeypatch.setenv("FASTKD_DEBUG", "1")
    with pytest.raises(ValueError, match="lse_t contains NaN or inf"):
        attention_kl(q_s, k_s, q_t, k_t, pairs=[(0, 1)], lse_t=lse)


@pytest.mark.parametrize("bad", ["q", "k", "v", "grad_out", "lse", "out"])
def test_debug_checks_head_importance_inputs(monkeypatch, bad):
    gen = torch.Generator().manual_seed(4)
    t = dict(zip(("q", "k"), _qk(1, 2, 5, 16, gen)))
    t.update(zip(("v", "grad_out"), _qk(1, 2, 5, 8, gen)))
    t["lse"] = torch.logsumexp(0.25 * t["q"] @ t["k"].transpose(-1, -2), -1)
    t["out"] = torch.randn(1, 2, 5, 8, generator=gen)
    t[bad] = t[bad].clone()
    t[bad][0, 1, 2, ...] = float("inf") if bad == "lse" else float("nan")
    importance.head_importance(t["q"], t["k"], t["v"], t["grad_out"], score="attribution")  # off by default
    monkeypatch.setenv("FASTKD_DEBUG", "1")
    with pytest.raises(ValueError, match=f"{bad} contains NaN or inf"):
        if bad == "out":
            importance.gradient_importance(t["out"], t["grad_out"])
        else:
            importance.attribution_importance(t["q"], t["k"], t["v"], t["grad_out"], lse=t["lse"])


def test_head_importance_mixed_dtypes_name_the_argument():
    gen = torch.Generator().manual_seed(6)
    q, k = _qk(1, 2, 5, 16, gen)
    v, do = _qk(1, 2, 5, 8, gen)
    with pytest.raises(ValueError, match=r"q \(torch.float32\) and k \(torch.float16\) must have the same dtype"):
        importance.entropy_importance(q, k.half())
    with pytest.raises(ValueError, match=r"v \(torch.float32\) and grad_out \(torch.bfloat16\) must have the same"):
        importance.attribution_importance(q, k, v, do.bfloat16())


@pytest.mark.parametrize("value", ["", " ", "abc", "0", "-5", "1.5"])
def test_bad_chunk_size_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("FASTKD_TORCH_CHUNK_ELEMS", value)
    q_s, k_s, q_t, k_t = _kl_inputs()
    with pytest.raises(ValueError, match="FASTKD_TORCH_CHUNK_ELEMS=.* is not valid; expected a positive integer"):
        attention_kl(q_s, k_s, q_t, k_t, pairs=[(0, 1)], impl="torch")
    with pytest.raises(ValueError, match="FASTKD_TORCH_CHUNK_ELEMS=.* is not valid; expected a positive integer"):
        importance.entropy_importance(q_s, k_s)


def test_stat_dtype_matches_the_backends():
    """The fake implementations promise fp32 statistics (fp64 for fp64 inputs): what every backend returns."""
    assert custom_ops.stat_dtype(torch.empty(1, dtype=torch.bfloat16)) == torch.float32
    assert custom_ops.stat_dtype(torch.empty(1), torch.empty(1, dtype=torch.float64)) == torch.float64


def test_ssta_loads_the_importance_library_not_the_command():
    import subprocess

    code = ("import sys, fastkd.methods.ssta, fastkd.importance; "
            "assert 'fastkd.importance.commands' not in sys.modules, 'the command module was imported'")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
