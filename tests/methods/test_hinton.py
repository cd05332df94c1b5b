"""Hinton logit KD: loss and gradients against a materializing reference, training, errors."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F

import fastkd.methods as M
from tests.methods._common import check_against_oracle
from tests.methods._common import kl_magnitude
from tests.methods._common import recipe_check
from tests.methods._common import soft_ce
from tests.methods._common import train_losses

NUM_CLASSES = 5
_PARAMS = ("temperature, alpha, soft", [(4.0, 0.5, False), (1.0, 0.9, True), (2.5, 0.0, True), (4.0, 1.0, False)])


def tiny_vit(num_classes=NUM_CLASSES):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                             num_classes=num_classes)


def tiny_cnn(num_classes=NUM_CLASSES):
    return timm.create_model("resnet10t", num_classes=num_classes)


def make_batch(b=6, soft=False):
    g = torch.Generator().manual_seed(1)
    batch = {"images": torch.randn(b, 3, 32, 32, generator=g), "labels": torch.randint(0, NUM_CLASSES, (b,),
                                                                                      generator=g)}
    if soft:  # mixup-like targets: convex combination of two one-hots plus smoothing
        lam = 0.7
        y2 = batch["labels"].roll(1)
        t = lam * torch.nn.functional.one_hot(batch["labels"], NUM_CLASSES) + (1 - lam) * torch.nn.functional.one_hot(
            y2, NUM_CLASSES)
        batch["targets"] = t.float() * 0.9 + 0.1 / NUM_CLASSES
    return batch


def hard_targets(labels, smoothing, dtype):
    """Label smoothing as targets: (1 − ε)·one-hot + ε/C."""
    return (1 - smoothing) * F.one_hot(labels, NUM_CLASSES).to(dtype) + smoothing / NUM_CLASSES


def reference_loss(student, teacher, batch, temperature, alpha, smoothing=0.0):
    """L = (1-α)·CE + α·T²·(1/B)·Σ_b Σ_c p_T (log p_T − log p_S), materialized by hand; returns the parts and the
    magnitudes of the terms each is a difference of."""
    x = batch["images"]
    z_s = student(x)
    with torch.no_grad():
        z_t = teacher(x)
    B = x.shape[0]
    targets = batch["targets"] if "targets" in batch else hard_targets(batch["labels"], smoothing, z_s.dtype)
    ce, ce_mag = soft_ce(z_s, targets)
    T = temperature
    s_t = z_t / T
    p_t = torch.exp(s_t - torch.logsumexp(s_t, dim=1, keepdim=True))
    log_p_t = torch.log(p_t)
    s_s = z_s / T
    log_p_s = s_s - torch.logsumexp(s_s, dim=1, keepdim=True)
    kl = (p_t * (log_p_t - log_p_s)).sum() / B
    kl_mag = float(kl_magnitude(s_t, s_s).sum()) / B
    values = {"loss": (1 - alpha) * ce + alpha * T * T * kl, "ce": (1 - alpha) * ce, "kd": alpha * T * T * kl}
    magnitudes = {"ce": (1 - alpha) * ce_mag, "kd": alpha * T * T * kl_mag}
    magnitudes["loss"] = magnitudes["ce"] + magnitudes["kd"]
    return values, magnitudes


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _check_against_reference(method, student, teacher, batch, **ref_kw):
    """The method (fp32) against the reference above run in fp64 on copies of the models: every part, every
    student gradient."""
    method.zero_grad()
    out = method(batch)
    out["loss"].backward()
    check_against_oracle(out, grads(student), functools.partial(reference_loss, **ref_kw), (student, teacher),
                         batch, parts=("loss", "ce", "kd"))
    return out


@pytest.mark.parametrize(*_PARAMS)
def test_loss_and_grads_match_reference(temperature, alpha, soft):
    student, teacher = tiny_vit(), tiny_cnn()
    method = M.build("hinton", student=student, teachers=[teacher], temperature=temperature, alpha=alpha)
    method.train()
    batch = make_batch(soft=soft)
    out = _check_against_reference(method, student, teacher, batch, temperature=temperature, alpha=alpha)
    assert set(out) == {"loss", "ce", "kd"}
    torch.testing.assert_close(out["loss"], out["ce"] + out["kd"])  # a sum of parts: exact up to one rounding


def test_label_smoothing_used_without_targets():
    student, teacher = tiny_vit(), tiny_cnn()
    batch = make_batch()
    m0 = M.build("hinton", student=student, teachers=[teacher], alpha=0.0)
    m1 = M.build("hinton", student=student, teachers=[teacher], alpha=0.0, label_smoothing=0.1)
    _check_against_reference(m1, student, teacher, batch, temperature=4.0, alpha=0.0, smoothing=0.1)
    assert not torch.allclose(m0(batch)["loss"], m1(batch)["loss"])


def test_teacher_frozen_and_out_of_state():
    student, teacher = tiny_vit(), tiny_cnn()
    teacher.train()
    method = M.build("hinton", student=student, teachers=[teacher])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(k.startswith("student.") for k in method.state_dict())
    n_student = sum(p.numel() for p in student.parameters())
    assert sum(p.numel() for p in method.parameters()) == n_student
    method.train()
    assert not teacher.training  # teachers are not submodules: train() leaves them in eval
    out = method(make_batch())
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_steps_reduce_loss():
    method = M.build("hinton", student=tiny_vit(), teachers=[tiny_cnn()])
    method.train()
    batch = make_batch(soft=True)
    losses = train_losses(method, batch, steps=6, lr=2e-3)
    assert losses[-1] < losses[0]


def test_bad_configurations():
    student, teacher = tiny_vit(), tiny_cnn()
    with pytest.raises(ValueError, match="exactly 1 teacher"):
        M.build("hinton", student=student, teachers=[])
    with pytest.raises(ValueError, match="exactly 1 teacher"):
        M.build("hinton", student=student, teachers=[teacher, tiny_cnn()])
    with pytest.raises(ValueError, match="alpha"):
        M.build("hinton", student=student, teachers=[teacher], alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        M.build("hinton", student=student, teachers=[teacher], temperature=0.0)
    with pytest.raises(TypeError, match="unexpected keyword|temprature"):
        M.build("hinton", student=student, teachers=[teacher], temprature=2.0)
    method = M.build("hinton", student=student, teachers=[tiny_cnn(num_classes=7)])
    with pytest.raises(ValueError, match="number of classes"):
        method(make_batch())
    method = M.build("hinton", student=student, teachers=[teacher])
    with pytest.raises(TypeError, match="images"):
        method({"images": [torch.randn(2, 3, 32, 32)] * 2, "labels": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(KeyError, match="labels"):
        method({"images": torch.randn(2, 3, 32, 32)})


def test_registry():
    assert {"hinton", "deit", "coadvise", "sdssl"} <= set(M.available())
    with pytest.raises(ValueError, match="unknown"):
        M.build("nope", student=tiny_vit())


# ------------------------------------------------------------------------------------------------------------------
# recipes


def test_recipes():
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 10, (4,), generator=g)}
    recipe_check(["hinton_deit_s_in1k"], "hinton_tiny", batch)
    official = __import__("fastkd.config", fromlist=["load_config"]).load_config("hinton_deit_s_in1k")
    assert official.teachers[0].name == "regnety_160" and official.train.epochs == 300
