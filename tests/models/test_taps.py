"""Attention taps: per attention family, the recorded q/k/v/out/LSE equal an explicit fp64 computation that itself
reproduces the module's own output; every model a recipe names is tapped exactly or refused by name; each back end's
LSE is the right one and reaches the methods; the forward stays fused; gradients flow; taps are removable."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
import fastkd.methods as M
import fastkd.methods.attndistill
import fastkd.methods.ssta
from fastkd.importance.ops import gradient_importance
from fastkd.models import AttentionTaps
from fastkd.models import Teacher
from fastkd.models import attention_modules
from fastkd.models import build_model
from fastkd.models import taps as taps_mod
from tests.models._tiny import tiny_vit
from tests.utils import assert_close_rel
from tests.utils import assert_error_budget
from tests.utils import tol

RECIPES = Path(fastkd.__file__).parent / "recipes"
TAPPING_METHODS = ("ssta", "attndistill")  # methods whose losses read the taps (`fastkd importance` taps any ViT)


def _norm(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Identity):
        return t
    if isinstance(mod, nn.LayerNorm):
        w = None if mod.weight is None else mod.weight.double()
        b = None if mod.bias is None else mod.bias.double()
        return F.layer_norm(t, mod.normalized_shape, w, b, mod.eps)
    raise AssertionError(f"explicit_attention knows Identity and LayerNorm, not {type(mod).__name__}: extend it")


def _linear(lin: nn.Linear, t: torch.Tensor) -> torch.Tensor:
    return F.linear(t, lin.weight.double(), None if lin.bias is None else lin.bias.double())


def explicit_attention(m, x):
    """timm ``Attention`` ``m`` on ``x [B, N, C]`` written out from its weights in fp64, without SDPA:
    ``(q, k, v, out, y, lse)`` with ``y`` the module's output and ``lse`` the natural-log LSE of the logits."""
    x = x.double()
    B, N, C = x.shape
    H, d = m.num_heads, m.head_dim
    qkv = _linear(m.qkv, x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = _norm(m.q_norm, qkv[0]), _norm(m.k_norm, qkv[1]), qkv[2]
    logits = (q @ k.transpose(-1, -2)) * d**-0.5
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.exp(logits - lse[..., None]) @ v
    y = _norm(m.norm, out.transpose(1, 2).reshape(B, N, H * d))
    if getattr(m, "gate", None) is not None:
        y = y * torch.sigmoid(_linear(m.gate, x))
    return q, k, v, out, _linear(m.proj, y), lse


def check_taps_against_module(model, x, backend="sdpa"):
    """Every block of ``model`` (fp64): the taps' q/k/v/out/LSE equal :func:`explicit_attention` on the block's
    input, whose output equals the module's own (untapped) output; the model's output is unchanged by the taps."""
    model = model.double().eval()
    x = x.double()
    mods = attention_modules(model)
    seen: dict[int, tuple] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out)))
        for i, m in enumerate(mods)
    ]
    try:
        with torch.no_grad():
            own = model(x)  # timm's own forward, no taps
        own_io = dict(seen)
        with torch.no_grad(), AttentionTaps(model, blocks="all", record="all", backend=backend) as taps:
            tapped = model(x)
            for i, m in enumerate(mods):
                inp, out_own = own_io[i]
                q, k, v, out, y, lse = explicit_attention(m, inp)
                t = tol(torch.float64, max(inp.shape[-1], inp.shape[1]), accumulate=torch.float64)
                name = f"{type(model).__name__} block {i}"
                assert_close_rel(y, out_own, t, f"{name}: explicit formula vs the module's own output")
                rec = taps[i]
                assert rec.scale == pytest.approx(m.head_dim**-0.5, rel=1e-15)
                for field, want in (("q", q), ("k", k), ("v", v), ("out", out)):
                    assert_close_rel(getattr(rec, field), want, t, f"{name}: recorded {field}")
                # the LSE is kept in fp32 whatever the input dtype: one rounding to fp32 on top
                assert_close_rel(rec.lse, lse, t + tol(torch.float32), f"{name}: recorded lse")
        assert_close_rel(
            tapped, own, tol(torch.float64, x[0].numel(), accumulate=torch.float64), "model output with taps"
        )
    finally:
        for h in hooks:
            h.remove()


def _recipe_models() -> dict[tuple, dict]:
    """Every model a recipe names: (name, kwargs) -> {"where": [...], "tapped": a tapping method uses it}."""
    found: dict[tuple, dict] = {}
    for path in sorted(RECIPES.glob("*.yaml")):
        r = yaml.safe_load(path.read_text())
        method = r["method"]["name"]
        specs = [("student", r["student"])] + [(f"teachers[{i}]", t) for i, t in enumerate(r.get("teachers") or [])]
        for role, spec in specs:
            kwargs = dict(spec.get("kwargs") or {})
            entry = found.setdefault((spec["name"], repr(sorted(kwargs.items()))), {"kwargs": kwargs, "where": []})
            entry["where"].append(f"{path.stem}:{role}")
            entry["tapped"] = entry.get("tapped", False) or method in TAPPING_METHODS
    return found


def _is_vit_name(name: str) -> bool:
    return name.split(".")[0].startswith(("vit_", "deit_"))


_RECIPE_VITS = [(name, e["kwargs"]) for (name, _), e in sorted(_recipe_models().items()) if _is_vit_name(name)]


def test_every_model_a_tapping_recipe_names_has_an_adapter_family():
    """A recipe whose method reads attention taps names only ViT-family models, all covered below; anything else
    (a new family) must get an AttentionAdapter and a case in this file."""
    models = _recipe_models()
    assert _RECIPE_VITS, "no ViT in the recipes?"
    off = [e["where"] for (name, _), e in models.items() if e["tapped"] and not _is_vit_name(name)]
    assert not off, f"recipes tap models outside the tested families: {off}"


@pytest.mark.parametrize("name, kwargs", _RECIPE_VITS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(_RECIPE_VITS)])
def test_recipe_vits_are_tapped_exactly(name, kwargs):
    """ViT, DeiT, distilled DeiT (distillation token), DINO/Mugs ViTs, no-CLS ViTs: as the recipes build them
    (depth cut to 2 and images to 32 px to stay small), against the module's own output."""
    kw = {**kwargs, "depth": 2}
    kw.setdefault("img_size", 32)
    model = build_model(name, **kw)
    for m in attention_modules(model):
        assert taps_mod.adapter_for(m).cls is timm.layers.Attention
    check_taps_against_module(model, torch.randn(2, 3, kw["img_size"], kw["img_size"]))


def _sharpen(model: nn.Module, factor: float) -> nn.Module:
    """Random init gives near-uniform attention; larger q/k weights give peaked rows (logits of several units)."""
    with torch.no_grad():
        for m in attention_modules(model):
            m.qkv.weight[: 2 * m.attn_dim].mul_(factor)
    return model


class _OneBlock(nn.Module):
    """A model with one block holding ``attn``: lets the taps take a bare attention module."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].attn = attn

    def forward(self, x):
        return self.blocks[0].attn(x)


def test_timm_attention_options_are_tapped_exactly():
    """Every option of timm.layers.Attention at once: qkv bias, q/k LayerNorm, scale norm, sigmoid gate; N = 197."""
    from timm.layers import Attention

    attn = Attention(48, num_heads=3, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True, norm_layer=nn.LayerNorm)
    with torch.no_grad():
        for p in attn.parameters():  # every norm weight/bias and gate non-trivial
            p.add_(0.3 * torch.randn_like(p))
    check_taps_against_module(_OneBlock(attn), torch.randn(2, 197, 48))


@pytest.mark.parametrize("fused", [True, False])
def test_fused_switch_is_restored(fused):
    """timm's explicit branch (fused_attn False) is tapped through its SDPA branch, and the switch is restored."""
    model = tiny_vit(depth=2)
    for m in attention_modules(model):
        m.fused_attn = fused
    check_taps_against_module(model, torch.randn(2, 3, 32, 32))
    assert all(m.fused_attn is fused for m in attention_modules(model))


def _capture_inputs(model, blocks):
    """Forward pre-hooks that keep each block's attention input (with autograd)."""
    seen, handles = {}, []
    for b in blocks:
        handles.append(
            model.blocks[b].attn.register_forward_pre_hook(lambda mod, args, b=b: seen.__setitem__(b, args[0]))
        )
    return seen, handles


@pytest.mark.parametrize("qk_norm", [False, True])
def test_tiny_vit_is_tapped_exactly(qk_norm):
    model = tiny_vit(depth=3, qk_norm=qk_norm)
    if qk_norm:  # make the norms non-trivial
        for blk in model.blocks:
            torch.nn.init.normal_(blk.attn.q_norm.weight, 1.0, 0.3)
            torch.nn.init.normal_(blk.attn.k_norm.bias, 0.0, 0.3)
    check_taps_against_module(_sharpen(model, 4.0), torch.randn(3, 3, 32, 32))
    model.float()
    with AttentionTaps(model, blocks=[0, -1], record="all") as taps:
        assert taps.blocks == [0, 2]
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert taps[-1].q.shape == (1, 3, 5, 64) and taps[-1].grad_out is None  # no backward ran
        assert 1 not in taps


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


class _AtenOps(TorchDispatchMode):
    """Names of the ATen ops that run (below autograd: what actually executes)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("record", ["qk", "all"])
def test_forward_runs_the_fused_kernel_with_or_without_lse(record):
    """With or without the LSE, each tapped block runs PyTorch's fused CPU attention kernel once and never a
    materialized softmax."""
    model = tiny_vit(depth=2).train()
    with AttentionTaps(model, blocks="all", record=record) as taps, _AtenOps() as aten:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert all((taps[b].lse is not None) == (record == "all") for b in (0, 1))
    assert aten.ops.count("_scaled_dot_product_flash_attention_for_cpu") == 2
    assert aten.ops.count("_scaled_dot_product_flash_attention_for_cpu_backward") == 2
    assert not [op for op in aten.ops if "softmax" in op or op in ("bmm", "baddbmm")], sorted(set(aten.ops))


@pytest.mark.parametrize("record", ["qk", ("q", "k", "lse")])  # SDPA, or the ATen op that returns the LSE
def test_loss_through_taps_gives_explicit_gradients(record):
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

    taps = AttentionTaps(a, blocks=[-1], record=record)
    logits_a = a(x)
    rec = taps[-1]
    assert rec.q.requires_grad and rec.k.requires_grad
    (logits_a.square().mean() + attn_loss(rec.q, rec.k, rec.scale)).backward()

    seen, handles = _capture_inputs(b, [1])
    logits_b = b(x)
    q, k = explicit_attention(b.blocks[1].attn, seen[1])[:2]
    (logits_b.square().mean() + attn_loss(q, k, 64**-0.5)).backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pb.grad is None:
            assert pa.grad is None or pa.grad.abs().max() == 0, name
            continue
        # fp32 both ways; the longest sum in the backward is the MLP's hidden width (4 x 192)
        assert_close_rel(pa.grad, pb.grad, tol(torch.float32, 768), f"grad {name}")
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
    net64 = copy.deepcopy(net).double()
    with torch.no_grad():  # the same teacher in fp64 on the teacher-normalised input is the oracle
        oracle = net64(x_teacher.double())
        assert_error_budget(out, net(x_teacher), oracle, "renormalized teacher logits")
    with AttentionTaps(teacher, blocks=[-1]) as taps:
        teacher(x_student)
        assert not taps[-1].q.requires_grad
    feats = teacher.features(x_student)
    assert feats.shape == (2, 192)
    bf = Teacher(copy.deepcopy(net), input_mean=s_mean, input_std=s_std, dtype=torch.bfloat16, channels_last=True)
    out_bf = bf(x_student)
    assert out_bf.dtype == torch.float32
    with torch.no_grad():  # held to what bf16 rounding costs the same network run eagerly in bf16
        eager_bf = copy.deepcopy(net).bfloat16()(x_teacher.bfloat16())
    assert_error_budget(out_bf.bfloat16(), eager_bf, oracle, "bf16 teacher")
    same = Teacher(net, input_mean=t_mean, input_std=t_std)
    assert not same.renormalize
    with pytest.raises(ValueError, match="input_std"):
        Teacher(net, input_std=(0.1, 0.2))


# ------------------------------------------------------------------------------------ unknown or changed modules
def test_unknown_attention_families_are_refused_by_name():
    beit = timm.create_model("beit_base_patch16_224", img_size=32, depth=1, num_classes=2)
    with pytest.raises(ValueError, match=r"block 0: timm\.models\.beit\.Attention has no attention-tap adapter"):
        AttentionTaps(beit)
    swin_kw = _recipe_models()  # ScaleKD's Swin teachers: window attention, no `blocks`
    (swin_name, kwargs), *_ = [(n, e["kwargs"]) for (n, _), e in swin_kw.items() if n.startswith("swin_")]
    swin = build_model(swin_name, **{**kwargs, "img_size": 64, "depths": [1, 1, 1, 1], "window_size": 4})
    with pytest.raises(ValueError, match="WindowAttention"):
        AttentionTaps(swin)

    class OwnForward(timm.layers.Attention):  # a model-specific subclass that rewrites the forward
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="subclass of timm.layers.attention.Attention with its own forward"):
        AttentionTaps(_OneBlock(OwnForward(16, num_heads=2)))


def test_a_changed_attention_forward_fails_instead_of_recording_something_else(monkeypatch):
    """If timm's Attention stopped making its one SDPA call (say, a new upgrade computes it otherwise), the taps
    raise instead of training on stale or missing records."""
    model = tiny_vit(depth=1)
    real = timm.layers.Attention.forward

    def two_calls(self, x, attn_mask=None, is_causal=False):
        real(self, x)
        return real(self, x, attn_mask=attn_mask, is_causal=is_causal)

    with AttentionTaps(model, record="qk"):
        monkeypatch.setattr(timm.layers.Attention, "forward", two_calls)
        with pytest.raises(RuntimeError, match="made 2 F.scaled_dot_product_attention call"):
            model(torch.randn(1, 3, 32, 32))


def test_a_new_family_is_one_adapter(monkeypatch):
    """Registering an adapter is all a new attention family needs (here a toy module that calls SDPA)."""
    monkeypatch.setattr(taps_mod, "_ADAPTERS", list(taps_mod._adapters()))

    class Toy(nn.Module):
        num_heads, head_dim = 2, 8

        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            B, N, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2).reshape(B, N, 16)

    model = _OneBlock(Toy())
    with pytest.raises(ValueError, match="Toy has no attention-tap adapter"):
        AttentionTaps(model)
    taps_mod.register_adapter(taps_mod.AttentionAdapter(Toy, "toy"))
    with pytest.raises(ValueError, match="already registered"):
        taps_mod.register_adapter(taps_mod.AttentionAdapter(Toy, "toy"))
    x = torch.randn(2, 11, 16)
    with torch.no_grad(), AttentionTaps(model, blocks="all", record="all") as taps:
        y = model(x)
        rec = taps[0]
        assert rec.scale == 0.3
        assert_close_rel(y, rec.out.transpose(1, 2).reshape(2, 11, 16), 0.0, "toy output is the recorded out")
        assert rec.lse.shape == (2, 2, 11)


# ------------------------------------------------------------------------------------ the LSE per back end
def _lse_oracle(rec):
    """fp64 natural-log LSE of ``scale q k^T`` from the recorded (already rounded) q, k, and the logits' size."""
    logits = rec.scale * rec.q.double() @ rec.k.double().transpose(-1, -2)
    return torch.logsumexp(logits, dim=-1), float(logits.abs().max())


def check_lse(rec, dtype):
    """LSE = m + log Z: the terms of Z carry a relative error of the kernel's precision (an absolute error in log
    space) and each logit an error relative to its size, so the error is bounded relative to 1 + max|logit|."""
    lse, max_logit = _lse_oracle(rec)
    assert rec.lse.dtype == torch.float32 and rec.lse.shape == rec.q.shape[:3]
    assert_close_rel(rec.lse, lse, tol(dtype, rec.q.shape[2]), f"{rec.extra['kernel']} LSE", scale=1.0 + max_logit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend, kernel", [("sdpa", "sdpa-flash-cpu"), ("flex", "flex")])
def test_cpu_backends_record_the_right_lse(backend, kernel, dtype):
    """N = 197 (ViT-S/16 at 224 px), peaked maps; the CPU flash kernel with autograd, eager FlexAttention under
    no_grad (its CPU path has no backward)."""
    model = _sharpen(tiny_vit(img_size=224, depth=1), 6.0).to(dtype)
    x = torch.randn(2, 3, 224, 224, dtype=dtype)
    inp = _block_input(model, x)
    with AttentionTaps(model, blocks="all", record="all", backend=backend) as taps:
        with torch.set_grad_enabled(backend == "sdpa"):
            model(x)
        rec = taps[0]
        assert rec.extra["kernel"] == kernel and rec.q.shape[2] == 197
        check_lse(rec, dtype)
        out = explicit_attention(taps.module(0), inp)[3]
        assert_close_rel(rec.out, out, tol(dtype, 197), f"{kernel} out", scale=float(rec.v.abs().max()))
        _, max_logit = _lse_oracle(rec)
        assert max_logit > 3.0  # the maps are peaked, not uniform


def _block_input(model, x):
    store = {}
    h = model.blocks[0].attn.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return store["x"]


def test_flex_on_cpu_refuses_a_backward_clearly():
    model = tiny_vit(depth=1)
    with AttentionTaps(model, backend="flex", record="all"):
        with pytest.raises(RuntimeError, match="backend='flex' on the CPU has no backward"):
            model(torch.randn(1, 3, 32, 32))


def test_masked_or_dropout_attention_records_no_lse():
    model = _OneBlock(timm.layers.Attention(16, num_heads=2, attn_drop=0.1)).train()
    x = torch.randn(2, 7, 16)
    with AttentionTaps(model, record="all") as taps:
        model(x)
        assert taps[0].lse is None and taps[0].extra["kernel"] == "sdpa"  # dropout: no LSE of q k^T alone
        model.eval()
        model(x)
        assert taps[0].lse is not None


_GPU_SDPA = [("flash", "sdpa-flash"), ("efficient", "sdpa-efficient"), ("cudnn", "sdpa-cudnn")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend, kernel", [*(("sdpa:" + b, k) for b, k in _GPU_SDPA), ("xformers", "xformers"),
                                             ("flex", "flex")])  # fmt: skip
def test_gpu_backends_record_the_right_lse(backend, kernel, dtype):
    """Each CUDA attention kernel's LSE against the fp64 oracle, with a backward through the recorded q, k, out."""
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel

    if backend == "xformers":
        pytest.importorskip("xformers.ops")
    sdpa = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}  # fmt: skip
    choose = sdpa_kernel([sdpa[backend[5:]]]) if backend.startswith("sdpa:") else contextlib.nullcontext()
    model = _sharpen(tiny_vit(img_size=224, depth=1), 6.0).to("cuda", dtype)
    x = torch.randn(2, 3, 224, 224, device="cuda", dtype=dtype)
    with choose, AttentionTaps(model, record="all", backend=backend.split(":")[0]) as taps:
        try:
            model(x).float().square().mean().backward()
        except RuntimeError as e:  # the chosen SDPA kernel is not available on this GPU / build
            if backend.startswith("sdpa:") and "No available kernel" in str(e):
                pytest.skip(f"{backend} unavailable here: {e}")
            raise
        rec = taps[0]
        assert rec.extra["kernel"] == kernel
        check_lse(rec, dtype)
        assert rec.grad_out is not None and model.blocks[0].attn.qkv.weight.grad is not None


# ------------------------------------------------------------------------------------ the LSE reaches the methods
def _spy_attention_kl(monkeypatch, module):
    calls = []
    real = module.attention_kl

    def spy(*args, **kwargs):
        calls.append((args, kwargs, real))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "attention_kl", spy)
    return calls


def check_given_lse(calls, expect_given):
    """Each attention_kl call got the LSE of its own q, k at its own scale (or none), and the loss with the
    given LSEs equals the loss that computes them."""
    assert calls
    for args, kw, real in calls:
        q_s, k_s, q_t, k_t = args[:4]
        for side, (q, k, scale) in (("s", (q_s, k_s, kw["scale_s"])), ("t", (q_t, k_t, kw["scale_t"]))):
            lse = kw.get(f"lse_{side}")
            assert (lse is not None) == expect_given, f"lse_{side}"
            if lse is not None:
                want = torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), dim=-1)
                assert_close_rel(lse, want, tol(q.dtype, q.shape[2]), f"lse_{side}")
        if expect_given:
            without = real(*args, **{**kw, "lse_s": None, "lse_t": None})
            with_lse = real(*args, **kw)
            assert_close_rel(with_lse, without, tol(torch.float32, q_s.shape[2]), "KL with / without given LSEs")


def _vit(embed_dim, heads, num_classes=5, distilled=False, seed=0):
    torch.manual_seed(seed)
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    m = timm.create_model(name, img_size=32, patch_size=8, depth=2, embed_dim=embed_dim, num_heads=heads,
                          num_classes=num_classes)  # fmt: skip
    return _sharpen(m, 4.0)


def _teacher(m):
    return Teacher(m, mean=timm.data.IMAGENET_DEFAULT_MEAN, std=timm.data.IMAGENET_DEFAULT_STD)


@pytest.mark.parametrize("case, given", [("tau=1", True), ("tau=2", False), ("distilled student", False)])
def test_ssta_passes_the_taps_lse(monkeypatch, case, given):
    student = _vit(32, 2, distilled=case == "distilled student")
    teachers = [_teacher(_vit(48, 4, seed=1)), _teacher(_vit(24, 3, num_classes=0, seed=2))]
    method = M.build("ssta", student=student, teachers=teachers, teacher_head=1, ta_head=2,
                     tau=2.0 if case == "tau=2" else 1.0)  # fmt: skip
    calls = _spy_attention_kl(monkeypatch, fastkd.methods.ssta)
    batch = {"images": torch.randn(3, 3, 32, 32), "labels": torch.tensor([0, 3, 1])}
    method(batch)["loss"].backward()
    assert len(calls) == 2  # teacher and TA terms
    check_given_lse(calls, given)


@pytest.mark.parametrize("heads_t, given", [(2, True), (4, False)])  # equal heads; aggregated heads (own scale / T)
def test_attndistill_kernel_path_passes_the_taps_lse(monkeypatch, heads_t, given):
    student, teacher = _vit(32, 2, num_classes=0), _vit(16 * heads_t, heads_t, num_classes=0, seed=1)
    method = M.build("attndistill", student=student, teachers=[_teacher(teacher)], exact_official=False, clamp=None)
    calls = _spy_attention_kl(monkeypatch, fastkd.methods.attndistill)
    method({"images": torch.randn(3, 3, 32, 32)})["loss"].backward()
    check_given_lse(calls, given)
