"""The Triton attention_kl code paths one by one against the fp64 oracle (interpreter on CPUs).

Each launch has an unmasked main loop over full tiles and one peeled, narrow tail tile; a partial block of the
program dimension (rows for forward/dQ, keys for dK) is a second, narrow launch. These tests pick shapes that
put work in every one of those paths (see ``blocks`` / ``splits``), with given LSEs, key masks, repeated student
heads and repeated rows, in every dtype.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd.kernels import attention_kl as K
from tests.kernels.test_attention_kl import DTYPES
from tests.kernels.test_attention_kl import TRITON_DEVICE
from tests.kernels.test_attention_kl import check
from tests.kernels.test_attention_kl import make_inputs
from tests.kernels.test_attention_kl import oracle
from tests.utils import assert_close_rel
from tests.utils import tol


def _lse(q, k, scale):
    return torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * scale, -1)


def test_splits_cover_every_index_once_and_tails_are_narrow():
    for length in (1, 5, 16, 17, 64, 197, 577, 785, 3137):
        for block in (16, 32, 64):
            covered = []
            for first, programs, width, tail in K.splits(length, block):
                assert width == (K.tail_block(length, block) if tail else block)
                covered += [first + i for i in range(programs * width)]
            assert sorted(set(i for i in covered if i < length)) == list(range(length))
            rem = length % block
            assert K.tail_block(length, block) == (0 if rem == 0 else max(16, 1 << (rem - 1).bit_length()))
    # the ViT remainders: 197 = 3*64 + 5, 577 = 9*64 + 1, 785 = 12*64 + 17, 3137 = 49*64 + 1
    assert [K.tail_block(n, 64) for n in (197, 577, 785, 3137)] == [16, 16, 32, 16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_tails_in_rows_and_keys(dtype, direction):
    """N=197: full tiles plus a tail tile in keys, a full row launch plus a narrow row launch (and dK's too); with
    d_s != d_t and every student head in one pair (the Triton half of test_attention_kl.py::test_dtypes)."""
    N = 197
    bm, bn = K.blocks(N, N)
    assert N // bn >= 1 and N % bn and N // bm >= 1 and N % bm, "shape must exercise main loops and tails"
    inputs = make_inputs(1, 2, 3, N, 32, 16, dtype_s=dtype, seed=101)
    check("triton", inputs, direction=direction, pairs=[(0, 2), (1, 0)])


@pytest.mark.parametrize("which", ["s", "t", "both"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_given_lses_with_tails(which, direction):
    """Natural-log LSEs in, log2 units inside: the same values and gradients as recomputing them."""
    inputs = make_inputs(2, 2, 3, 83, 24, 16, seed=103)  # d_s=24: padded head dim, masked columns
    q_s, k_s, q_t, k_t = inputs
    lse = {"lse_s": _lse(q_s, k_s, 24**-0.5).float(), "lse_t": _lse(q_t, k_t, 0.25).float()}
    kw = {k: v for k, v in lse.items() if which == "both" or k.endswith(which)}
    pairs = [(0, 2), (1, 0)]
    check("triton", inputs, direction=direction, pairs=pairs, **kw)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_mask_in_main_loop_and_tail_with_repeated_heads_and_rows(direction):
    """Masked keys in full tiles and in the tail; a student head in two pairs and a repeated row (buffered
    backward) -- against the oracle, which drops the masked keys."""
    B, N = 2, 77
    inputs = make_inputs(B, 2, 3, N, 16, 16, seed=107)
    mask = torch.rand(B, N, generator=torch.Generator().manual_seed(5)) > 0.25
    mask[:, -1] = False  # the last key sits in the tail tile
    mask[:, 3] = False  # and one in the first full tile
    kw = dict(key_mask=mask, pairs=[(0, 2), (0, 1), (1, 1)], rows=torch.tensor([0, 76, 5, 5, 40]),
              direction=direction)
    check("triton", inputs, **kw)


def test_backward_host_metadata_matches_the_derived_one():
    """unique_heads / unique_rows given by the caller (no device sync) give the same gradients as derived ones."""
    B, H, N = 1, 2, 40
    q_s, k_s, q_t, k_t = make_inputs(B, H, H, N, 16, 16, seed=113)
    pairs = torch.tensor([[0, 0], [1, 1]])
    rows = torch.arange(N)
    assert K.head_rows_unique(pairs, rows) == (True, True)
    assert K.head_rows_unique(torch.tensor([[0, 0], [0, 1]]), torch.tensor([3, 3])) == (False, False)
    kl, ls, lt = K.attention_kl_forward(q_s, k_s, q_t, k_t, pairs, rows, None, 0.25, 0.25, False, None, None)
    g = torch.randn(kl.shape, generator=torch.Generator().manual_seed(3))
    derived = K.attention_kl_backward(g, q_s, k_s, q_t, k_t, pairs, rows, None, 0.25, 0.25, False, ls, lt, kl)
    given = K.attention_kl_backward(g, q_s, k_s, q_t, k_t, pairs, rows, None, 0.25, 0.25, False, ls, lt, kl,
                                    unique_heads=True, unique_rows=True)
    buffered = K.attention_kl_backward(g, q_s, k_s, q_t, k_t, pairs, rows, None, 0.25, 0.25, False, ls, lt, kl,
                                       unique_heads=False, unique_rows=True)
    for a, b, c in zip(derived, given, buffered):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert_close_rel(c, a, tol(torch.float32, N * 16), "buffered vs direct")


class _NoSync(TorchDispatchMode):
    """Fails on the ops that make the host wait for the device: scalar reads, nonzero/unique, device-to-host
    copies. On a CPU-only machine no op synchronises, so it also rejects the indexing ``.tolist()`` of a
    metadata tensor starts with (``select``) -- the tell-tale of host decisions read from tensors."""

    BANNED = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique", "aten._unique", "aten.select.int")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        assert not name.startswith(self.BANNED), f"{name} during the op: a device-to-host synchronisation"
        out = func(*args, **(kwargs or {}))
        if name.startswith(("aten._to_copy", "aten.copy_")):
            src = args[1] if name.startswith("aten.copy_") else args[0]
            dst = args[0] if name.startswith("aten.copy_") else out
            assert not (src.device.type != "cpu" and dst.device.type == "cpu"), f"{name}: device-to-host copy"
        return out


@pytest.mark.parametrize("reverse", [False, True])
def test_launchers_do_not_synchronise(reverse):
    """Forward and backward launchers with host metadata: no synchronising op (values still checked)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q_s, k_s, q_t, k_t = (x.to(device) for x in make_inputs(1, 2, 2, 40, 16, 16, seed=127))
    pairs = torch.tensor([[0, 1], [1, 0]], device=device)
    rows = torch.arange(40, device=device)
    g = torch.randn(1, 2, 40, generator=torch.Generator().manual_seed(4)).to(device)
    with _NoSync():
        kl, ls, lt = K.attention_kl_forward(q_s, k_s, q_t, k_t, pairs, rows, None, 0.25, 0.25, reverse, None, None)
        dq, dk = K.attention_kl_backward(g, q_s, k_s, q_t, k_t, pairs, rows, None, 0.25, 0.25, reverse, ls, lt, kl,
                                         unique_heads=True, unique_rows=True)
    want = oracle([x.cpu() for x in (q_s, k_s, q_t, k_t)], upstream=True, pairs=[(0, 1), (1, 0)],
                  direction="reverse" if reverse else "forward")
    assert_close_rel(kl.cpu(), want[0], tol(torch.float32, 40 * 16), "kl", scale=want[3])
    with pytest.raises(AssertionError, match="synchronisation"), _NoSync():  # the detector does detect
        K.attention_kl_backward(g, q_s, k_s, q_t, k_t, pairs, rows, None, 0.25, 0.25, reverse, ls, lt, kl)


# The backward launcher's three schedules: the default fused kernel with dQ summed in key-block order (tickets),
# the same kernel with fp32 dQ atomics (deterministic=False), and the two-kernel backward (fused=False).
VARIANTS = {"ordered": {}, "atomic": {"deterministic": False}, "two-kernel": {"fused": False}}


def _backward(inputs, pairs, rows, key_mask=None, direction="forward", lse_s=None, lse_t=None, seed=1, **options):
    """Forward and backward through the launchers with the given backward options: (kl, dq_s, dk_s)."""
    q_s, k_s, q_t, k_t = inputs
    N = q_s.shape[2]
    pairs_t = torch.tensor(pairs)
    rows_t = torch.arange(N) if rows is None else torch.tensor(rows)
    reverse, scale_s, scale_t = direction == "reverse", q_s.shape[3] ** -0.5, q_t.shape[3] ** -0.5
    kl, ls, lt = K.attention_kl_forward(q_s, k_s, q_t, k_t, pairs_t, rows_t, key_mask, scale_s, scale_t, reverse,
                                        lse_s, lse_t)
    g = torch.randn(kl.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    dq, dk = K.attention_kl_backward(g, q_s, k_s, q_t, k_t, pairs_t, rows_t, key_mask, scale_s, scale_t, reverse,
                                     ls, lt, kl, **options)
    return kl, dq, dk


FUSED_CASES = [  # B, H_s, H_t, N, d_s, d_t, pairs, rows, masked, direction, given LSEs
    pytest.param(2, 2, 2, 1, 16, 16, [(0, 0), (1, 1)], None, False, "forward", "", id="N1"),
    pytest.param(2, 2, 3, 17, 16, 24, [(0, 2), (1, 0)], None, True, "reverse", "", id="N17-mask-reverse"),
    pytest.param(1, 2, 2, 197, 16, 16, [(0, 1), (1, 0)], None, False, "forward", "st", id="N197-given-lses"),
    pytest.param(1, 2, 3, 197, 24, 16, [(0, 2), (0, 1), (1, 1)], [0, 196, 5, 5, 64, 100], True, "reverse", "",
                 id="N197-repeated-heads-rows-mask"),
    pytest.param(1, 1, 1, 129, 16, 16, [(0, 0)], None, False, "reverse", "t", id="N129-all-rows"),
    pytest.param(1, 1, 1, 577, 16, 16, [(0, 0)], None, False, "reverse", "t", id="N577-all-rows"),
    pytest.param(1, 2, 2, 577, 16, 16, [(1, 0)], [0, 576, 300], True, "forward", "", id="N577-row-subset-mask"),
]  # fmt: skip
# N577-all-rows (9 full 64-wide blocks + a 1-wide remainder in rows and keys, tail tiles of 16) is the costliest
# case under the interpreter: it runs in fp32 with the default (ordered) schedule only. N129-all-rows has the same
# flags and the same tail structure (64-wide blocks in rows and keys, remainder 1, tail tiles of 16; 2 full
# blocks instead of 9) and runs in every dtype and schedule.
ONE_DTYPE_AND_SCHEDULE = {"N577-all-rows": ("fp32", "ordered")}


def _schedule_params():
    for case in FUSED_CASES:
        for dtype in DTYPES:
            for variant in VARIANTS:
                only = ONE_DTYPE_AND_SCHEDULE.get(case.id)
                if only is None or only == (dtype.id, variant):
                    yield pytest.param(*case.values, *dtype.values, variant, id=f"{case.id}-{dtype.id}-{variant}")


@pytest.mark.parametrize("B, H_s, H_t, N, d_s, d_t, pairs, rows, masked, direction, given, dtype, variant",
                         list(_schedule_params()))
def test_backward_schedules_match_fp64_oracle(B, H_s, H_t, N, d_s, d_t, pairs, rows, masked, direction, given,
                                              dtype, variant):
    """Every backward schedule against the fp64 oracle: one key block (N=1, where the first key block is also the
    last), a tail in rows and keys (17, 129 = 2*64 + 1, 197 = 3*64 + 5, 577 = 9*64 + 1), key masks, reverse, given LSEs, repeated
    student heads and rows (the buffered path), d_s != d_t and padded head dims, in every dtype."""
    inputs = make_inputs(B, H_s, H_t, N, d_s, d_t, dtype_s=dtype, seed=N + d_s)
    q_s, k_s, q_t, k_t = inputs
    mask = None
    if masked:
        mask = torch.rand(B, N, generator=torch.Generator().manual_seed(N)) > 0.3
        mask[:, -1] = False  # a dropped key in the narrow remainder key block
        mask[:, 0] = True  # and the CLS key kept
    lse = {}
    if "s" in given:
        lse["lse_s"] = _lse(q_s, k_s, d_s**-0.5).float()
    if "t" in given:
        lse["lse_t"] = _lse(q_t, k_t, d_t**-0.5).float()
    kw = dict(pairs=pairs, rows=rows, key_mask=mask, direction=direction)
    got = _backward(inputs, **kw, **lse, **VARIANTS[variant])
    want = oracle(inputs, **{**kw, "rows": None if rows is None else torch.tensor(rows)})
    assert_close_rel(got[0], want[0], tol(torch.float32, N * max(d_s, d_t)), "kl", scale=want[3])
    for name, a, e in zip(("dq_s", "dk_s"), got[1:], want[1:3]):
        assert a.dtype == dtype, f"{name} dtype {a.dtype}"
        assert_close_rel(a, e, tol(dtype, N * max(d_s, d_t)), f"{variant} {name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairs, rows", [([(0, 1), (1, 0)], None), ([(0, 1), (0, 0)], [3, 3, 0, 150])],
                         ids=["direct", "buffered"])
def test_default_backward_is_bit_identical_across_runs(dtype, pairs, rows):
    """The default backward twice on the same inputs: identical bits (on a GPU the programs run in a different
    order each time; the key-block order of the dQ sum does not change), and equal to the oracle."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(1, 2, 2, 151, 16, 16, dtype_s=dtype, seed=151)  # B=1: bit identity is per program
    on = tuple(x.to(device) for x in inputs)
    first = _backward(on, pairs, rows)
    second = _backward(on, pairs, rows)
    for name, a, b in zip(("kl", "dq_s", "dk_s"), first, second):
        assert torch.equal(a, b), f"{name}: two runs differ in {int((a != b).sum())} elements"
    want = oracle(inputs, pairs=pairs, rows=None if rows is None else torch.tensor(rows))
    for name, a, e in zip(("dq_s", "dk_s"), first[1:], want[1:3]):
        assert_close_rel(a.cpu(), e, tol(dtype, 151 * 16), f"ordered {name} {dtype}")


# The kernels take their running maxima on the unscaled dot products and apply the (log2-folded) scale once, in the
# exponent's argument: that is only the maximum of the logits for a positive scale, so the launchers refuse others.
BAD_SCALES = [0.0, -0.125, float("nan"), float("inf"), "x"]


@pytest.mark.parametrize("value", BAD_SCALES, ids=repr)
@pytest.mark.parametrize("name", ["scale_s", "scale_t"])
def test_attention_kl_launchers_reject_non_positive_scales(name, value):
    q_s, k_s, q_t, k_t = make_inputs(1, 1, 1, 5, 16, 16, seed=5)
    scales = {"scale_s": 0.25, "scale_t": 0.25, name: value}
    with pytest.raises(ValueError, match=f"{name} must be a positive finite float"):
        K.attention_kl_forward(q_s, k_s, q_t, k_t, torch.tensor([[0, 0]]), torch.arange(5), None,
                               scales["scale_s"], scales["scale_t"], False, None, None)


@pytest.mark.parametrize("value", BAD_SCALES, ids=repr)
@pytest.mark.parametrize("score", ["attribution", "entropy"])
def test_head_importance_launchers_reject_non_positive_scales(score, value):
    from fastkd.kernels import head_importance as HI

    q, k, v, do = make_inputs(1, 2, 2, 5, 16, 16, seed=6)
    with pytest.raises(ValueError, match="scale must be a positive finite float"):
        if score == "attribution":
            HI.attribution_rows(q, k, v, do, value)
        else:
            HI.entropy_rows(q, k, value)


@pytest.mark.parametrize("given", ["", "st"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_unequal_scales_far_from_one(direction, given):
    """Student and teacher scales 40x apart (a sharp student, a flat teacher: scale_a / scale_b far from 1 either
    way round), with tails in rows and keys, given LSEs or not: values and gradients against the fp64 oracle."""
    inputs = make_inputs(2, 2, 2, 83, 16, 24, seed=107)
    q_s, k_s, q_t, k_t = inputs
    scale_s, scale_t = 0.9, 0.9 / 40
    kw = {}
    if given:
        kw = {"lse_s": _lse(q_s, k_s, scale_s).float(), "lse_t": _lse(q_t, k_t, scale_t).float()}
    check("triton", inputs, direction=direction, scale_s=scale_s, scale_t=scale_t, **kw)


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("scale", [0.9, 0.01])
def test_head_importance_scales_against_fp64(scale, with_lse):
    """Attribution and entropy rows at a sharp and a flat scale, with tails in rows and keys (N=83): the scale is
    applied after the running max and, for the entropy, once per row at the end. Reference written here in fp64."""
    from fastkd.kernels import head_importance as HI

    q, k, v, do = make_inputs(2, 3, 3, 83, 24, 24, seed=109)
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    lse = torch.logsumexp(logits, -1)
    p = torch.softmax(logits, -1)
    dp = do.double() @ v.double().transpose(-1, -2)
    want_attr = (p * dp).abs().sum(-1)
    want_ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
    dev = TRITON_DEVICE  # compiled on a GPU, interpreted on CPUs
    q, k, v, do = (x.to(dev) for x in (q, k, v, do))
    given = lse.float().to(dev) if with_lse else None
    depth = 83 * 24
    got_attr = HI.attribution_rows(q, k, v, do, scale, given)
    assert_close_rel(got_attr, want_attr, tol(torch.float32, depth), "attribution")
    got_ent = HI.entropy_rows(q, k, scale, given)
    # the entropy is lse - sum p s: a difference of terms of size |lse| + sum p |s|
    mag = lse.abs() + (p * logits.abs()).sum(-1)
    assert_close_rel(got_ent, want_ent, tol(torch.float32, depth), "entropy", scale=mag)


def test_row_offsets_fit_int32_from_host_shapes():
    """The backward's 32-bit row addressing is chosen from shapes and strides alone (meta tensors: no memory)."""
    def view(stride_n, d=16):
        return torch.empty_strided((1, 1, 3, d), (0, 0, stride_n, 1), device="meta")

    assert K.row_offsets_fit_int32(3, view(2**28))
    assert not K.row_offsets_fit_int32(3, view(2**30))
    assert not K.row_offsets_fit_int32(3, view(8), view(2**30))  # any tensor over the bound decides
    assert not K.row_offsets_fit_int32(2**27, view(16))  # N * stride + d = 2^31 + 16


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", ["N197-repeated-heads-rows-mask", "N17-mask-reverse"])
def test_backward_with_64bit_row_offsets(monkeypatch, case, variant):
    """The 64-bit row addressing (tensors whose row offsets overflow int32; forced here by lowering the bound)
    gives the fp64 oracle's gradients too, in every backward schedule."""
    monkeypatch.setattr(K, "INT32_OFFSETS", 0)
    B, H_s, H_t, N, d_s, d_t, pairs, rows, masked, direction, _ = next(
        c.values for c in FUSED_CASES if c.id == case)
    inputs = make_inputs(B, H_s, H_t, N, d_s, d_t, seed=N + 7)
    mask = None
    if masked:
        mask = torch.rand(B, N, generator=torch.Generator().manual_seed(N)) > 0.3
        mask[:, 0] = True
    kw = dict(pairs=pairs, rows=rows, key_mask=mask, direction=direction)
    got = _backward(inputs, **kw, **VARIANTS[variant])
    want = oracle(inputs, **{**kw, "rows": None if rows is None else torch.tensor(rows)})
    for name, a, e in zip(("dq_s", "dk_s"), got[1:], want[1:3]):
        assert_close_rel(a, e, tol(torch.float32, N * max(d_s, d_t)), f"{variant} {name}")
