"""AttnDistill: loss and gradients against a materializing reference (METHODS.md 2.3), kernels, training, errors."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fastkd.methods as M
from fastkd.models import Teacher
from fastkd.models.teacher import IMAGENET_MEAN
from fastkd.models.teacher import IMAGENET_STD
from tests.methods._common import check_against_oracle
from tests.methods._common import check_method_recipes
from tests.methods._common import train_losses


def vit(embed_dim=32, heads=2, depth=2, patch=8, seed=0, class_token=True, distilled=False, sharp=4.0):
    torch.manual_seed(seed)
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    kw = {} if distilled else {"class_token": class_token, "global_pool": "token" if class_token else "avg"}
    m = timm.create_model(name, img_size=32, patch_size=patch, depth=depth, embed_dim=embed_dim, num_heads=heads,
                          num_classes=0, **kw)
    with torch.no_grad():  # sharper than random-init attention, so the KL terms are not trivial
        for blk in m.blocks:
            d = blk.attn.qkv.weight.shape[0] // 3
            blk.attn.qkv.weight[: 2 * d].mul_(sharp)
    return m


def wrap(model):
    return Teacher(model, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def images(b=3, seed=1):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- reference
def last_block(model, x, grad=True):
    """(full attention probabilities [B, H, N, N] of the last block, the last block's output tokens, final tokens)."""
    store = {}
    blk = model.blocks[-1]
    h1 = blk.attn.register_forward_hook(lambda m, i, o: store.__setitem__("a", i[0]))
    h2 = blk.register_forward_hook(lambda m, i, o: store.__setitem__("x", o))
    try:
        with torch.set_grad_enabled(grad):
            final = model.forward_features(x)
    finally:
        h1.remove()
        h2.remove()
    a, attn = store["a"], blk.attn
    B, N, C = a.shape
    qkv = attn.qkv(a).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    probs = torch.softmax((qkv[0] @ qkv[1].transpose(-1, -2)) * attn.head_dim**-0.5, dim=-1)
    return probs, store["x"], final


def reference_projector(p, x):
    """METHODS.md 2.3: LN(D) -> Linear(D,2D) -> GELU -> Linear(2D,D) -> GELU -> Linear(D,2D) -> GELU -> Linear(2D,D_T)
    -> LN(D_T), written out with the method's parameters."""
    mods = list(p)
    ln0, l1, l2, l3, l4, ln5 = mods[0], mods[1], mods[3], mods[5], mods[7], mods[8]
    h = F.layer_norm(x, ln0.normalized_shape, ln0.weight, ln0.bias, 1e-6)
    h = F.gelu(F.linear(h, l1.weight, l1.bias))
    h = F.gelu(F.linear(h, l2.weight, l2.bias))
    h = F.gelu(F.linear(h, l3.weight, l3.bias))
    h = F.linear(h, l4.weight, l4.bias)
    return F.layer_norm(h, ln5.normalized_shape, ln5.weight, ln5.bias, 1e-6)


def reference_loss(method, student, teacher, x, *, w_cls=1.0, w_attn=0.1, t_agg=10.0, clamp=True, drop_dist=False):
    p_s, tok_s, _ = last_block(student, x)
    with torch.no_grad():
        p_t, _, final_t = last_block(teacher, x, grad=False)
    a_s, a_t = p_s[:, :, 0], p_t[:, :, 0]  # CLS query rows [B, H, N]
    if drop_dist:  # distilled student: drop the distillation-token column, renormalize over CLS + patches
        a_s = torch.cat([a_s[:, :, :1], a_s[:, :, 2:]], -1)
        a_s = a_s / a_s.sum(-1, keepdim=True)
    B, Ht = a_t.shape[:2]
    gs = student.patch_embed.grid_size
    gt = teacher.patch_embed.grid_size
    if gs != gt:  # bicubic resize of the teacher's CLS->patch row, rescaled to 1 - a[CLS]
        cls = a_t[:, :, :1]
        patch = F.interpolate(a_t[:, :, 1:].reshape(B, Ht, *gt), size=gs, mode="bicubic", align_corners=False)
        patch = patch.reshape(B, Ht, -1)
        a_t = torch.cat([cls, patch / patch.sum(-1, keepdim=True) * (1 - cls)], -1)
        if not clamp:  # documented guard: a bicubic overshoot to <= 0 is floored at 1e-12, then renormalized
            a_t = a_t.clamp_min(1e-12)
            a_t = a_t / a_t.sum(-1, keepdim=True)
    if a_s.shape[1] != a_t.shape[1]:  # head aggregation
        a_s = torch.softmax(a_s.log().sum(1) / t_agg, -1)
        # documented deviation: a bicubic overshoot to <= 0 (log = NaN in the official code) is floored at 1e-12
        a_t = torch.softmax(a_t.clamp_min(1e-12).log().sum(1) / t_agg, -1)
    if clamp:
        a_s = a_s.clamp(1e-5, 0.996)
        a_s = a_s / a_s.sum(-1, keepdim=True)
        a_t = a_t.clamp(1e-5, 0.996)
        a_t = a_t / a_t.sum(-1, keepdim=True)
    kl = (a_t * (a_t.log() - a_s.log())).sum() / B
    # the KL is a difference of terms of this size: the scale of its rounding error
    magnitude = float((a_t * (a_t.log().abs() + a_s.log().abs())).sum().detach()) / B
    c_s = reference_projector(method.projector, tok_s[:, 0])
    mse = ((c_s - final_t[:, 0]) ** 2).mean()
    return w_cls * mse + w_attn * kl, mse, kl, magnitude



def oracle(method, teacher, inputs, **ref_kw):
    """reference_loss as the parts (and magnitudes) that check_against_oracle compares."""
    loss, mse, kl, magnitude = reference_loss(method, method.student, teacher, inputs["images"], **ref_kw)
    w_attn = ref_kw.get("w_attn", 0.1)
    values = {"loss": loss, "cls": mse, "attn": kl}
    return values, {"attn": magnitude, "loss": float(loss.detach()) + w_attn * magnitude}


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


_CASES = ("teacher_kw, method_kw, ref_kw", [
    ({"embed_dim": 24, "heads": 2}, {}, {}),                                           # per-head, equal grids
    ({"embed_dim": 24, "heads": 2, "patch": 4}, {}, {}),                              # interpolate 8x8 -> 4x4
    ({"embed_dim": 48, "heads": 4}, {"t_agg": 3.0}, {"t_agg": 3.0}),                   # aggregation (4 vs 2 heads)
    ({"embed_dim": 48, "heads": 4}, {"w_attn": 20.0, "w_cls": 0.5}, {"w_attn": 20.0, "w_cls": 0.5}),
    ({"embed_dim": 24, "heads": 2, "sharp": 40.0}, {}, {}),                          # the clamp is active
    ({"embed_dim": 48, "heads": 4, "sharp": 40.0, "patch": 4}, {}, {}),
    ({"embed_dim": 24, "heads": 2}, {"exact_official": False, "clamp": None}, {"clamp": False}),  # attention_kl path
    ({"embed_dim": 48, "heads": 4}, {"exact_official": False, "clamp": None}, {"clamp": False}),  # concatenated heads
])


# the attention kernels' own accumulation: 17 keys (CLS + 4x4 patches) of 16-dim heads
ATTN_DEPTH = 17 * 16


def _run(method, x):
    method.zero_grad()
    out = method({"images": x})
    out["loss"].backward()
    return out, grads(method)


@pytest.mark.parametrize(*_CASES)
def test_matches_reference(teacher_kw, method_kw, ref_kw):
    student, teacher = vit(seed=0), vit(seed=1, **teacher_kw)
    method = M.build("attndistill", student=student, teachers=[wrap(teacher)], **method_kw)
    assert method.self_supervised
    x = images()
    out, g_method = _run(method, x)
    check_against_oracle(out, g_method, functools.partial(oracle, **ref_kw), (method, teacher), {"images": x},
                         parts=("loss", "cls", "attn"))
    ref, _, kl, _ = reference_loss(method, student, teacher, x, **ref_kw)
    assert float(kl) > 1e-3
    if teacher_kw.get("sharp") and not method.aggregation:  # the clamp changes the loss here: covered
        _, _, kl_free, _ = reference_loss(method, student, teacher, x, clamp=False, **ref_kw)
        assert abs(float(kl_free) - float(kl)) > 3e-4 * float(kl)  # >1000x the fp32 rounding of kl
    assert any(n.startswith("projector") for n in g_method)


def test_no_clamp_interpolation_guards_bicubic_overshoot():
    """clamp=None with interpolation (per-head case): the bicubic resize of a sharp teacher row overshoots below 0
    (a NaN log in the official code); the method floors it and renormalizes, and agrees with the reference."""
    student, teacher = vit(seed=0), vit(seed=1, embed_dim=24, heads=2, patch=4, sharp=40.0)
    method = M.build("attndistill", student=student, teachers=[wrap(teacher)], clamp=None)
    assert method.interpolate and not method.aggregation
    x = images()
    with torch.no_grad():
        p_t = last_block(teacher, x, grad=False)[0][:, :, 0, 1:]
        resized = F.interpolate(p_t.reshape(*p_t.shape[:2], 8, 8), size=(4, 4), mode="bicubic", align_corners=False)
    assert float(resized.min()) < 0  # the overshoot happens on this input
    out, g = _run(method, x)
    assert all(torch.isfinite(v).all() for v in g.values()) and torch.isfinite(out["loss"])
    check_against_oracle(out, g, functools.partial(oracle, clamp=False), (method, teacher), {"images": x},
                         parts=("loss", "cls", "attn"))


def test_projector_layout():
    method = M.build("attndistill", student=vit(embed_dim=32), teachers=[wrap(vit(embed_dim=24, seed=1))])
    kinds = [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None))
             for m in method.projector]
    assert kinds == [("LayerNorm", None, None), ("Linear", 32, 64), ("GELU", None, None), ("Linear", 64, 32),
                     ("GELU", None, None), ("Linear", 32, 64), ("GELU", None, None), ("Linear", 64, 24),
                     ("LayerNorm", None, None)]
    assert method.projector[0].eps == 1e-6 and method.projector[-1].normalized_shape == (24,)


def test_distillation_token_student():
    student, teacher = vit(seed=0, distilled=True), vit(seed=1, embed_dim=24, heads=2)
    method = M.build("attndistill", student=student, teachers=[wrap(teacher)])
    x = images()
    out, g = _run(method, x)
    check_against_oracle(out, g, functools.partial(oracle, drop_dist=True), (method, teacher), {"images": x},
                         parts=("loss", "attn"))
    kernel = M.build("attndistill", student=student, teachers=[wrap(teacher)], exact_official=False, clamp=None)
    out, g = _run(kernel, x)
    check_against_oracle(out, g, functools.partial(oracle, drop_dist=True, clamp=False), (kernel, teacher),
                         {"images": x}, parts=("loss", "attn"))


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])  # Triton: the interpreter on the CPU
@pytest.mark.parametrize("teacher_kw", [{"embed_dim": 24, "heads": 2}, {"embed_dim": 48, "heads": 4}])
def test_every_kernel_matches_reference(monkeypatch, teacher_kw, impl):
    """Each attention_kl implementation, used by the method, against the fp64 reference of the whole loss."""
    student, teacher = vit(seed=0), vit(seed=1, **teacher_kw)
    # the attention term alone (w_cls=0), so that the kernel's gradient is not hidden under the CLS term's
    method = M.build("attndistill", student=student, teachers=[wrap(teacher)], exact_official=False, clamp=None,
                     w_cls=0.0, w_attn=1.0)
    monkeypatch.setenv("FASTKD_KERNELS", impl)
    x = images()
    out, g = _run(method, x)
    check_against_oracle(out, g, functools.partial(oracle, clamp=False, w_cls=0.0, w_attn=1.0), (method, teacher),
                         {"images": x}, parts=("loss", "attn"), depth=ATTN_DEPTH)


def test_training_reduces_loss():
    student, teacher = vit(seed=0), vit(seed=1, embed_dim=48, heads=4, patch=4)  # aggregation + interpolation
    method = M.build("attndistill", student=student, teachers=[wrap(teacher)], w_attn=1.0)
    assert method.aggregation and method.interpolate
    x = images(b=4)
    losses = train_losses(method, {"images": x}, steps=4, lr=2e-3)
    assert losses[-1] < losses[0]
    assert torch.isfinite(method.features(x)).all() and method.features(x).shape == (4, 48)


def test_bad_configs():
    student = vit()
    cnn = timm.create_model("resnet10t", num_classes=0)
    with pytest.raises(ValueError, match=r"teachers\[0\].*not a vision transformer"):
        M.build("attndistill", student=student, teachers=[wrap(cnn)])
    with pytest.raises(ValueError, match=r"student.*not a vision transformer"):
        M.build("attndistill", student=timm.create_model("resnet10t", num_classes=0), teachers=[wrap(vit(seed=1))])
    with pytest.raises(ValueError, match="aggregation=False but the head counts differ"):
        M.build("attndistill", student=student, teachers=[wrap(vit(embed_dim=48, heads=4))], aggregation=False)
    with pytest.raises(ValueError, match="token grids differ.*interpolate=False"):
        M.build("attndistill", student=student, teachers=[wrap(vit(patch=4))], interpolate=False)
    with pytest.raises(ValueError, match="interpolate=True needs exact_official=True"):
        M.build("attndistill", student=student, teachers=[wrap(vit(patch=4))], exact_official=False)
    with pytest.raises(ValueError, match="has no CLS token"):
        M.build("attndistill", student=student, teachers=[wrap(vit(class_token=False))])
    with pytest.raises(ValueError, match="clamp="):
        M.build("attndistill", student=student, teachers=[wrap(vit(seed=1))], clamp=(0.5, 0.1))
    with pytest.raises(ValueError, match="needs exactly 1 teacher"):
        M.build("attndistill", student=student, teachers=[])
    assert isinstance(M.build("attndistill", student=student, teachers=[wrap(vit(seed=1))]).projector, nn.Sequential)


# ------------------------------------------------------------------------------------------------ recipes
def test_recipes():
    check_method_recipes("attndistill")
