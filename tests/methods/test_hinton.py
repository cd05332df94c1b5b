"""Hinton logit KD: loss and gradients against a materializing reference, training, errors."""

from __future__ import annotations

import pytest
import timm
import torch

import fastkd.methods as M
from tests.methods._common import recipe_check
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


def reference_loss(student, teacher, batch, temperature, alpha):
    """L = (1-α)·CE + α·T²·(1/B)·Σ_b Σ_c p_T (log p_T − log p_S), materialized by hand."""
    x = batch["images"]
    z_s = student(x)
    with torch.no_grad():
        z_t = teacher(x)
    B = x.shape[0]
    log_q = z_s - torch.logsumexp(z_s, dim=1, keepdim=True)
    if "targets" in batch:
        ce = -(batch["targets"] * log_q).sum() / B
    else:
        ce = -log_q[torch.arange(B), batch["labels"]].sum() / B
    T = temperature
    s_t = z_t / T
    p_t = torch.exp(s_t - torch.logsumexp(s_t, dim=1, keepdim=True))
    log_p_t = torch.log(p_t)
    s_s = z_s / T
    log_p_s = s_s - torch.logsumexp(s_s, dim=1, keepdim=True)
    kl = (p_t * (log_p_t - log_p_s)).sum() / B
    return (1 - alpha) * ce + alpha * T * T * kl, (1 - alpha) * ce, alpha * T * T * kl


@pytest.mark.parametrize(*_PARAMS)
def test_loss_and_grads_match_reference(temperature, alpha, soft):
    student, teacher = tiny_vit(), tiny_cnn()
    method = M.build("hinton", student=student, teachers=[teacher], temperature=temperature, alpha=alpha)
    method.train()
    batch = make_batch(soft=soft)
    params = [p for p in method.parameters() if p.requires_grad]
    out = method(batch)
    assert set(out) == {"loss", "ce", "kd"}
    torch.testing.assert_close(out["loss"], out["ce"] + out["kd"])
    grads = torch.autograd.grad(out["loss"], params)
    ref, ref_ce, ref_kd = reference_loss(student, teacher, batch, temperature, alpha)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ce"], ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["kd"], ref_kd, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_label_smoothing_used_without_targets():
    student, teacher = tiny_vit(), tiny_cnn()
    batch = make_batch()
    m0 = M.build("hinton", student=student, teachers=[teacher], alpha=0.0)
    m1 = M.build("hinton", student=student, teachers=[teacher], alpha=0.0, label_smoothing=0.1)
    z = student(batch["images"])
    log_q = torch.log_softmax(z, 1)
    smooth = 0.9 * -log_q[torch.arange(6), batch["labels"]].mean() + 0.1 * -log_q.mean(1).mean()
    torch.testing.assert_close(m1(batch)["loss"], smooth, rtol=1e-5, atol=1e-6)
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
