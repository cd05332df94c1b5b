"""Attention taps: recorded tensors equal an explicit, non-fused computation; gradients flow; removable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastkd.importance_ops import gradient_importance
from fastkd.models import AttentionTaps
from fastkd.models import Teacher
from tests.models._tiny import tiny_vit
from tests.utils import assert_close_rel


def explicit_attention(m, x):
    """The attention of timm Attention ``m`` on ``x [B, N, C]`` written out without SDPA: (q, k, v, out, y)."""
    B, N, C = x.shape
    H, d = m.num_heads, m.head_dim
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if isinstance(m.q_norm, torch.nn.LayerNorm):
        q = F.layer_norm(q, (d,), m.q_norm.weight, m.q_norm.bias, m.q_norm.eps)
        k = F.layer_norm(k, (d,), m.k_norm.weight, m.k_norm.bias, m.k_norm.eps)
    p = torch.softmax((q * d**-0.5) @ k.transpose(-1, -2), dim=-1)
    out = p @ v
    y = F.linear(out.transpose(1, 2).reshape(B, N, H * d), m.proj.weight, m.proj.bias)
    return q, k, v, out, y


def _capture_inputs(model, blocks):
    """Forward pre-hooks that keep each block's attention input (with autograd)."""
    seen, handles = {}, []
    for b in blocks:
        handles.append(
            model.blocks[b].attn.register_forward_pre_hook(lambda mod, args, b=b: seen.__setitem__(b, args[0]))
        )
    return seen, handles


@pytest.mark.parametrize("qk_norm", [False, True])
def test_recorded_tensors_match_explicit_attention(qk_norm):
    model = tiny_vit(depth=3, qk_norm=qk_norm).eval()
    if qk_norm:  # make the norms non-trivial
        for blk in model.blocks:
            torch.nn.init.normal_(blk.attn.q_norm.weight, 1.0, 0.3)
            torch.nn.init.normal_(blk.attn.k_norm.bias, 0.0, 0.3)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected_logits = model(x)
    seen, handles = _capture_inputs(model, [0, 2])
    taps = AttentionTaps(model, blocks=[0, -1], record="all")
    with torch.no_grad():
        logits = model(x)
    assert_close_rel(logits, expected_logits, 1e-5, "logits with taps")
    assert taps.blocks == [0, 2]
    for b in (0, -1):
        rec = taps[b]
        m = taps.module(b)
        q, k, v, out, _ = explicit_attention(m, seen[b % 3])
        assert rec.q.shape == (3, 3, 5, 64) and rec.scale == pytest.approx(64**-0.5)
        assert_close_rel(rec.q, q, 1e-5, "q")
        assert_close_rel(rec.k, k, 1e-5, "k")
        assert_close_rel(rec.v, v, 1e-5, "v")
        assert_close_rel(rec.out, out, 1e-5, "out")
        assert rec.lse is None  # SDPA's public API returns no LSE
        assert rec.grad_out is None  # no backward ran
    for h in handles:
        h.remove()
    taps.remove()


def test_forward_stays_on_fused_sdpa(monkeypatch):
    model = tiny_vit(depth=2).eval()
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with AttentionTaps(model, blocks="all", record="qk"):
        model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 2, "each tapped block must run its attention through F.scaled_dot_product_attention"
    assert all(blk.attn.fused_attn for blk in model.blocks)


def test_loss_through_taps_gives_explicit_gradients():
    torch.manual_seed(1)
    a = tiny_vit(depth=2).train()
    b = copy.deepcopy(a)
    for mod in (a, b):  # dropout-free so the two runs see identical forwards
        mod.eval()
    x = torch.randn(2, 3, 32, 32)
    target = torch.softmax(torch.randn(2, 3, 5, 5), -1)

    def attn_loss(q, k, scale):
        log_p = torch.log_softmax(scale * q @ k.transpose(-1, -2), -1)
        return -(target * log_p).sum()

    taps = AttentionTaps(a, blocks=[-1], record="qk")
    logits_a = a(x)
    rec = taps[-1]
    assert rec.q.requires_grad and rec.k.requires_grad
    (logits_a.square().mean() + attn_loss(rec.q, rec.k, rec.scale)).backward()

    seen, handles = _capture_inputs(b, [1])
    logits_b = b(x)
    q, k, _, _, _ = explicit_attention(b.blocks[1].attn, seen[1])
    (logits_b.square().mean() + attn_loss(q, k, 64**-0.5)).backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pb.grad is None:
            assert pa.grad is None or pa.grad.abs().max() == 0, name
            continue
        assert_close_rel(pa.grad, pb.grad, 1e-4, f"grad {name}", atol=1e-7)
    taps.remove()
    for h in handles:
        h.remove()


def test_grad_out_gives_michel_gate_gradient():
    """|dL/dxi_h| with a gate xi on each head's output equals gradient_importance(out, grad_out) per sample."""
    model = tiny_vit(depth=2).eval()
    x = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 3, 1])
    taps = AttentionTaps(model, blocks="all", record=("out", "grad_out"))
    xi = torch.ones(3, 2, 3, requires_grad=True)  # [sample, layer, head]

    with taps.paused():  # explicit gates on a forward without recording
        gates = []
        for layer, blk in enumerate(model.blocks):

            def gate(mod, args, layer=layer):
                (inp,) = args
                B, N, C = inp.shape
                g = xi[:, layer].repeat_interleave(C // 3, dim=1)  # [B, C]
                return (inp * g[:, None, :],)

            gates.append(blk.attn.proj.register_forward_pre_hook(gate))
        F.cross_entropy(model(x), labels, reduction="sum").backward()
        for g in gates:
            g.remove()
    assert not taps.records
    expected = xi.grad.abs()  # [B, L, H]

    images = x.clone().requires_grad_(True)
    F.cross_entropy(model(images), labels, reduction="sum").backward()
    for layer in range(2):
        rec = taps[layer]
        assert rec.grad_out is not None and rec.grad_out.shape == rec.out.shape
        assert_close_rel(gradient_importance(rec.out, rec.grad_out), expected[:, layer], 1e-4, f"layer {layer}")
    taps.remove()


def test_remove_restores_forward_and_history():
    model = tiny_vit(depth=2)
    attn = model.blocks[1].attn
    t1 = AttentionTaps(model, blocks=-1, record="qk", history=True)
    t2 = AttentionTaps(model, blocks=[1], record="v")
    assert "forward" in attn.__dict__
    x = torch.randn(1, 3, 32, 32)
    model(x)
    model(x)
    assert len(t1.history[1]) == 2 and t1[-1].v is None and t2[1].q is None and t2[1].v is not None
    assert -1 in t1 and 0 not in t1
    with pytest.raises(KeyError, match="not tapped"):
        t1[0]
    t1.remove()
    assert "forward" in attn.__dict__  # t2 still attached
    t2.remove()
    assert "forward" not in attn.__dict__ and "_fastkd_taps" not in attn.__dict__
    assert not t1.records and not t2.records
    model(x)  # still works, nothing recorded
    assert not t2.records


def test_deepcopy_of_tapped_model_records_nothing():
    model = tiny_vit(depth=2)
    taps = AttentionTaps(model, blocks="all", record="qk")
    ema = copy.deepcopy(model)  # e.g. an EMA target built from a tapped student
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ema(x), model(x))
    assert taps[0].q is not None
    taps.clear()
    ema(x)
    assert not taps.records
    with AttentionTaps(ema, blocks=[0]) as ema_taps:  # the copy can be tapped on its own
        ema(x)
        assert 0 in ema_taps and not taps.records
    taps.remove()


def test_bad_arguments_are_clear():
    model = tiny_vit(depth=2)
    with pytest.raises(ValueError, match="out of range"):
        AttentionTaps(model, blocks=[2])
    with pytest.raises(ValueError, match="recordable"):
        AttentionTaps(model, record=("attn",))
    with pytest.raises(ValueError, match="backend"):
        AttentionTaps(model, backend="flash")
    import timm

    with pytest.raises(ValueError, match="blocks"):
        AttentionTaps(timm.create_model("resnet18", pretrained=False, num_classes=2))
    x = torch.randn(1, 3, 32, 32)
    with AttentionTaps(model, backend="xformers") as taps:  # no CPU kernel: clear error, not a crash inside
        with pytest.raises(RuntimeError, match="xformers"):
            model(x)
    with AttentionTaps(model, backend="auto") as taps:  # auto falls back to SDPA on CPU
        model(x)
        assert taps[-1].q is not None and taps[-1].lse is None


def test_teacher_wrapper():
    net = tiny_vit(depth=2)
    s_mean, s_std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    teacher = Teacher(net, input_mean=s_mean, input_std=s_std)
    teacher.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    raw = torch.rand(2, 3, 32, 32)
    x_student = (raw - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    t_mean, t_std = net.pretrained_cfg["mean"], net.pretrained_cfg["std"]
    x_teacher = (raw - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    with torch.enable_grad():
        out = teacher(x_student.requires_grad_(True))
    assert not out.requires_grad
    with torch.no_grad():
        assert_close_rel(out, net(x_teacher), 1e-5, "renormalized teacher logits")
    with AttentionTaps(teacher, blocks=[-1]) as taps:
        teacher(x_student)
        assert not taps[-1].q.requires_grad
    feats = teacher.features(x_student)
    assert feats.shape == (2, 192)
    bf = Teacher(copy.deepcopy(net), input_mean=s_mean, input_std=s_std, dtype=torch.bfloat16, channels_last=True)
    out_bf = bf(x_student)
    assert out_bf.dtype == torch.float32
    assert_close_rel(out_bf, out, 0.1, "bf16 teacher")
    same = Teacher(net, input_mean=t_mean, input_std=t_std)
    assert not same.renormalize
    with pytest.raises(ValueError, match="input_std"):
        Teacher(net, input_std=(0.1, 0.2))
