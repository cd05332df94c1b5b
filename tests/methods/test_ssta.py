"""SSTA: loss and gradients against a materializing reference (METHODS.md 1.3), kernels, training, errors."""

from __future__ import annotations

import functools
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import fastkd.methods as M
from fastkd.models import Teacher
from fastkd.models.teacher import IMAGENET_MEAN
from fastkd.models.teacher import IMAGENET_STD
from tests.methods._common import check_against_oracle
from tests.methods._common import check_method_recipes
from tests.methods._common import kl_magnitude
from tests.methods._common import train_losses

NUM_CLASSES = 5


def _sharpen(model, factor=4.0):
    """Random-init attention is nearly uniform; scale q/k weights so the maps (and the KLs) are not trivial."""
    with torch.no_grad():
        for blk in model.blocks:
            w = blk.attn.qkv.weight
            d = w.shape[0] // 3
            w[: 2 * d].mul_(factor)
    return model


def vit(embed_dim=32, heads=2, depth=2, patch=8, num_classes=NUM_CLASSES, distilled=False, seed=0):
    torch.manual_seed(seed)
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    m = timm.create_model(name, img_size=32, patch_size=patch, depth=depth, embed_dim=embed_dim, num_heads=heads,
                          num_classes=num_classes)
    return _sharpen(m)


def wrap(model):
    """Frozen teacher whose normalization equals the batch's (no renormalization: the reference stays simple)."""
    return Teacher(model, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def make_batch(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(b, 3, 32, 32, generator=g),
            "labels": torch.randint(0, NUM_CLASSES, (b,), generator=g)}


def models(distilled=False):
    student = vit(distilled=distilled, seed=0)
    teacher = vit(embed_dim=48, heads=4, seed=1)  # d_T = 12 != d_S = 16
    ta = vit(embed_dim=24, heads=3, num_classes=0, seed=2)  # headless SSL backbone
    return student, teacher, ta


# --------------------------------------------------------------------------------------------- reference
def full_logits(model, block, images, grad=True):
    """Materialized attention logits ``[B, H, N, N]`` of ``block``: the attention input is captured by a hook and
    q/k recomputed from the module's own weights (timm's definition: qkv -> q_norm/k_norm -> q k^T d^-1/2)."""
    store = {}
    attn = model.blocks[block].attn
    h = attn.register_forward_hook(lambda m, i, o: store.__setitem__("x", i[0]))
    try:
        with torch.set_grad_enabled(grad):
            out = model(images)
    finally:
        h.remove()
    x = store["x"]
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5, out


def row_kl_mean(t_logits, s_logits, tau=1.0, direction="forward"):
    """(1/(B·R)) Σ_b Σ_i KL(softmax(t_i/τ) ‖ softmax(s_i/τ)) for ``[B, R, N]`` logits (reverse: KL(P_s ‖ P_t)),
    and the magnitude of the terms it is a difference of (the scale of its rounding error)."""
    log_pt = torch.log_softmax(t_logits / tau, -1)
    log_ps = torch.log_softmax(s_logits / tau, -1)
    if direction == "reverse":
        log_pt, log_ps = log_ps, log_pt
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean(), kl_magnitude(t_logits / tau, s_logits / tau, direction).mean()


def reference_loss(student, teacher, ta, batch, *, h_t, h_a, s_heads=(0, 1), logit_kd="hard", alpha=0.5, T=1.0,
                   beta_t=1.0, beta_a=1.0, tau=1.0, ls=0.1, rows="all", distilled=False, direction="forward"):
    x, y = batch["images"], batch["labels"]
    s_log, out = full_logits(student, -1, x)
    with torch.no_grad():
        t_log, z_t = full_logits(teacher, -1, x, grad=False)
        a_log, _ = full_logits(ta, -1, x, grad=False)
    if distilled:  # drop the distillation token (index 1): its row and its column
        keep = [0] + list(range(2, s_log.shape[-1]))
        s_log = s_log[:, :, keep][:, :, :, keep]
        z_cls, z_kd = out
    else:
        z_cls = z_kd = out
    sl = slice(0, 1) if rows == "cls" else slice(None)
    attn_t, mag_t = row_kl_mean(t_log[:, h_t, sl], s_log[:, s_heads[0], sl], tau, direction)
    attn_a, mag_a = row_kl_mean(a_log[:, h_a, sl], s_log[:, s_heads[1], sl], tau, direction)
    ce = F.cross_entropy(z_cls, y, label_smoothing=ls)
    if logit_kd == "hard":
        logit = (1 - alpha) * ce + alpha * F.cross_entropy(z_kd, z_t.argmax(-1))
    elif logit_kd == "soft":
        p_t = torch.softmax(z_t / T, -1)
        kl = (p_t * (torch.log_softmax(z_t / T, -1) - torch.log_softmax(z_kd / T, -1))).sum() / x.shape[0]
        logit = (1 - alpha) * ce + alpha * T * T * kl
    else:
        logit = ce
    parts = {"loss": logit + beta_t * attn_t + beta_a * attn_a, "attn_teacher": attn_t, "attn_ta": attn_a}
    magnitude = {"loss": float(logit.detach().abs()) + beta_t * float(mag_t) + beta_a * float(mag_a),
                 "attn_teacher": float(mag_t), "attn_ta": float(mag_a)}
    return parts, magnitude


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _check_against_reference(method, student, teacher, ta, batch, **ref_kw):
    """The method (fp32, whichever kernel FASTKD_KERNELS selects) against the reference written above, run in fp64
    on copies of the same models: loss, both attention KLs and every student gradient."""
    method.zero_grad()
    out = method(batch)
    out["loss"].backward()
    check_against_oracle(out, grads(student), functools.partial(reference_loss, **ref_kw), (student, teacher, ta),
                         batch, parts=("loss", "attn_teacher", "attn_ta"), depth=18 * 16)  # N keys x d_head
    return out


_CASES = ("kw, ref_kw", [
    ({}, {}),
    ({"logit_kd": "soft", "kd_temperature": 2.0, "alpha": 0.3, "tau": 2.0, "beta_t": 0.5, "student_heads": (1, 1)},
     {"logit_kd": "soft", "T": 2.0, "alpha": 0.3, "tau": 2.0, "beta_t": 0.5, "s_heads": (1, 1)}),
    ({"logit_kd": "none", "rows": "cls", "label_smoothing": 0.0}, {"logit_kd": "none", "rows": "cls", "ls": 0.0}),
    ({"direction": "reverse", "beta_a": 2.0}, {"direction": "reverse", "beta_a": 2.0}),
])


@pytest.mark.parametrize(*_CASES)
@pytest.mark.parametrize("distilled", [False, True])
def test_matches_reference(kw, ref_kw, distilled):
    student, teacher, ta = models(distilled)
    method = M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], teacher_head=2, ta_head=1, **kw)
    batch = make_batch()
    out = _check_against_reference(method, student, teacher, ta, batch, h_t=2, h_a=1, distilled=distilled, **ref_kw)
    assert set(out) == {"loss", "ce", "kd", "attn_teacher", "attn_ta"}
    assert float(out["attn_teacher"]) > 1e-3 and float(out["attn_ta"]) > 1e-3  # non-trivial maps


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])  # Triton: the interpreter on the CPU
@pytest.mark.parametrize("distilled", [False, True])
def test_every_kernel_matches_reference(monkeypatch, distilled, impl):
    """Each attention_kl implementation, used by the method, against the fp64 reference of the whole loss."""
    student, teacher, ta = models(distilled)
    method = M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], teacher_head=3, ta_head=2)
    monkeypatch.setenv("FASTKD_KERNELS", impl)
    _check_against_reference(method, student, teacher, ta, make_batch(), h_t=3, h_a=2, distilled=distilled)


def test_importance_json_and_auto(tmp_path):
    student, teacher, ta = models()
    path = tmp_path / "importance.json"
    path.write_text(json.dumps({"num_layers": 2, "num_heads": 4, "top_head_per_layer": [0, 3]}))
    method = M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], teacher_importance=str(path),
                     ta_head=2)
    assert method.selected_heads() == {"teacher": 3, "ta": 2}
    with pytest.raises(ValueError, match="ta_importance=.*scores 4 heads per layer but the model has 3"):
        M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], ta_importance=str(path))
    path.write_text(json.dumps({"num_layers": 3, "num_heads": 4, "top_head_per_layer": [0, 3, 1]}))
    with pytest.raises(ValueError, match="teacher_importance=.*scores 3 layers but the model has 2"):
        M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], teacher_importance=str(path))
    with pytest.raises(FileNotFoundError, match="teacher_importance"):
        M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], teacher_importance=str(tmp_path / "no"))

    # "auto": Michel importance on the first batch; chosen once, kept in the state dict
    auto = M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)])
    assert auto.selected_heads() == {"teacher": None, "ta": None}
    batch = make_batch()
    auto(batch)
    heads = auto.selected_heads()
    assert 0 <= heads["teacher"] < 4 and 0 <= heads["ta"] < 3
    # independent check of the teacher's choice: |Σ O_h · dL/dO_h| with a gate on each head's output
    assert heads["teacher"] == _michel_top_head(teacher, batch)
    again = M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)])
    again.load_state_dict(auto.state_dict())
    assert again.selected_heads() == heads


def test_auto_importance_scores_clean_images():
    """Under Mixup/CutMix, importance="auto" scores the teacher's heads on batch["clean_images"] with the (pre-mix)
    labels, not on the mixed images: the pick equals the independent Michel importance of the clean batch. The
    mixed batch is chosen so that its own pick differs (asserted). A mixed batch without clean images is refused."""
    student, teacher, ta = models()
    g = torch.Generator().manual_seed(5)
    for _ in range(50):
        clean = {"images": torch.randn(4, 3, 32, 32, generator=g),
                 "labels": torch.randint(0, NUM_CLASSES, (4,), generator=g)}
        lam = 0.3
        mixed = lam * clean["images"] + (1 - lam) * clean["images"].flip(0)
        on_mixed = _michel_per_sample_top_head(teacher, {**clean, "images": mixed})
        if on_mixed != _michel_per_sample_top_head(teacher, clean):
            break
    else:
        raise AssertionError("no batch found whose mixed and clean head choices differ")
    onehot = F.one_hot(clean["labels"], NUM_CLASSES).float()
    targets = lam * onehot + (1 - lam) * onehot.flip(0)
    batch = {"images": mixed, "labels": clean["labels"], "targets": targets, "clean_images": clean["images"]}
    method = M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], ta_head=1)
    method(batch)
    assert method.selected_heads()["teacher"] == _michel_per_sample_top_head(teacher, clean)
    assert M.get("ssta").needs_clean_images({"ta_head": 1})
    assert not M.get("ssta").needs_clean_images({"teacher_head": 0, "ta_head": 1})
    fresh = M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], ta_head=1)
    with pytest.raises(ValueError, match="clean_images"):
        fresh({k: v for k, v in batch.items() if k != "clean_images"})


def _michel_per_sample_top_head(model, batch):
    """Michel et al.'s I_h = E_x |∂L(x)/∂ξ_h| with the absolute value per sample (``_michel_top_head`` per image,
    the |gate gradient| summed over the batch)."""
    scores = None
    for i in range(batch["images"].shape[0]):
        one = {"images": batch["images"][i:i + 1], "labels": batch["labels"][i:i + 1]}
        g = _michel_gate_grad(model, one).abs()
        scores = g if scores is None else scores + g
    return int(scores.argmax())


def _michel_top_head(model, batch):
    return int(_michel_gate_grad(model, batch).abs().argmax())


def _michel_gate_grad(model, batch):
    """Materialized Michel et al. 2019 importance of the last block: gate ξ_h on each head's output, I_h = |∂L/∂ξ_h|,
    L = CE summed over the batch."""
    attn = model.blocks[-1].attn
    gate = torch.ones(attn.num_heads, requires_grad=True)

    def fwd(m, args):
        x = args[0]
        B, N, C = x.shape
        qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = m.q_norm(qkv[0]), m.k_norm(qkv[1]), qkv[2]
        o = torch.softmax(q @ k.transpose(-1, -2) * m.head_dim**-0.5, -1) @ v  # [B, H, N, d]
        o = o * gate.view(1, -1, 1, 1)
        return m.proj(o.transpose(1, 2).reshape(B, N, C))

    h = attn.register_forward_hook(lambda m, i, o: fwd(m, i))
    try:
        loss = F.cross_entropy(model(batch["images"]), batch["labels"], reduction="sum")
    finally:
        h.remove()
    (g,) = torch.autograd.grad(loss, gate)
    return g


def test_training_reduces_loss():
    student, teacher, ta = models()
    method = M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], teacher_head=0, ta_head=1)
    losses = train_losses(method, make_batch(b=4), steps=4, lr=3e-3)
    assert losses[-1] < losses[0]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(not k.startswith(("teacher", "ta")) for k in method.state_dict())  # teachers stay out


def test_bad_configs():
    student, teacher, ta = models()
    cnn = timm.create_model("resnet10t", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"teachers\[0\].*not a vision transformer"):
        M.build("ssta", student=student, teachers=[wrap(cnn), wrap(ta)], teacher_head=0, ta_head=0)
    with pytest.raises(ValueError, match=r"teachers\[1\].*not a vision transformer"):
        M.build("ssta", student=student, teachers=[wrap(teacher), wrap(cnn)], teacher_head=0, ta_head=0)
    with pytest.raises(ValueError, match="teacher_head=4 is out of range"):
        M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], teacher_head=4, ta_head=0)
    with pytest.raises(ValueError, match="student_heads.*out of range"):
        M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], teacher_head=0, ta_head=0,
                student_heads=(0, 2))
    with pytest.raises(ValueError, match="teacher_layer=5 is out of range"):
        M.build("ssta", student=student, teachers=[wrap(teacher), wrap(ta)], teacher_head=0, ta_head=0,
                teacher_layer=5)
    fine_ta = vit(embed_dim=24, heads=3, num_classes=0, patch=4, seed=2)  # 8x8 grid vs the student's 4x4
    with pytest.raises(ValueError, match="token grids differ"):
        M.build("ssta", student=student, teachers=[wrap(teacher), wrap(fine_ta)], teacher_head=0, ta_head=0)
    with pytest.raises(ValueError, match="needs exactly 2 teachers"):
        M.build("ssta", student=student, teachers=[wrap(teacher)], teacher_head=0, ta_head=0)


# ------------------------------------------------------------------------------------------------ recipes
def test_recipes():
    check_method_recipes("ssta")
