"""DeiT distillation token: hard and soft losses against a materializing reference, inference rule, errors."""

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
_PARAMS = ("distillation_type, alpha, temperature, kd_reduction, soft_targets", [
    ("hard", 0.5, 1.0, "numel", False),
    ("hard", 0.3, 1.0, "numel", True),
    ("soft", 0.5, 1.0, "numel", False),
    ("soft", 0.7, 3.0, "batchmean", True),
])


def tiny_distilled_vit(num_classes=NUM_CLASSES):
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                             num_heads=2, num_classes=num_classes)


def tiny_cnn(num_classes=NUM_CLASSES):
    return timm.create_model("resnet10t", num_classes=num_classes)


def make_batch(b=6, soft=False):
    g = torch.Generator().manual_seed(2)
    batch = {"images": torch.randn(b, 3, 32, 32, generator=g),
             "labels": torch.randint(0, NUM_CLASSES, (b,), generator=g)}
    if soft:
        t = torch.rand(b, NUM_CLASSES, generator=g)
        batch["targets"] = t / t.sum(1, keepdim=True)
    return batch


def log_softmax(z):
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def reference_loss(student, teacher, batch, distillation_type, alpha, temperature, kd_reduction, smoothing=0.1):
    """From METHODS.md §0 (DeiT), on timm's own (cls, dist) training outputs; label smoothing ε on hard labels.
    Returns the weighted parts and the magnitudes of the terms each is a difference of."""
    x = batch["images"]
    student.set_distilled_training(True)
    z_cls, z_dist = student(x)  # timm returns both heads in distilled training mode
    with torch.no_grad():
        z_t = teacher(x)
    B, C = z_cls.shape
    if "targets" in batch:
        targets = batch["targets"]
    else:  # (1 − ε)·one-hot + ε/C
        targets = (1 - smoothing) * F.one_hot(batch["labels"], C).to(z_cls.dtype) + smoothing / C
    ce, ce_mag = soft_ce(z_cls, targets)
    if distillation_type == "hard":
        kd, kd_mag = soft_ce(z_dist, F.one_hot(z_t.argmax(1), C).to(z_dist.dtype))
    else:
        T = temperature
        p_t = torch.softmax(z_t / T, 1)
        kl_sum = (p_t * (torch.log(p_t) - log_softmax(z_dist / T))).sum()
        n = B * C if kd_reduction == "numel" else B
        kd = T * T * kl_sum / n
        kd_mag = T * T * float(kl_magnitude(z_t / T, z_dist / T).sum()) / n
    values = {"loss": (1 - alpha) * ce + alpha * kd, "ce": (1 - alpha) * ce, "kd": alpha * kd}
    magnitudes = {"ce": (1 - alpha) * ce_mag, "kd": alpha * kd_mag}
    magnitudes["loss"] = magnitudes["ce"] + magnitudes["kd"]
    return values, magnitudes


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(*_PARAMS)
def test_loss_and_grads_match_reference(distillation_type, alpha, temperature, kd_reduction, soft_targets):
    """The method (fp32) against the reference above run in fp64 on copies of the models: every part, every
    student gradient."""
    student, teacher = tiny_distilled_vit(), tiny_cnn()
    method = M.build("deit", student=student, teachers=[teacher], distillation_type=distillation_type, alpha=alpha,
                     temperature=temperature, kd_reduction=kd_reduction)
    method.train()
    batch = make_batch(soft=soft_targets)
    out = method(batch)
    torch.testing.assert_close(out["loss"], out["ce"] + out["kd"])  # a sum of parts: exact up to one rounding
    out["loss"].backward()
    g = grads(student)
    reference = functools.partial(reference_loss, distillation_type=distillation_type, alpha=alpha,
                                  temperature=temperature, kd_reduction=kd_reduction)
    check_against_oracle(out, g, reference, (student, teacher), batch, parts=("loss", "ce", "kd"))
    # both heads and the distillation token receive gradient
    assert g["dist_token"].abs().sum() > 0 and g["head_dist.weight"].abs().sum() > 0


def test_defaults_are_deit_official():
    method = M.build("deit", student=tiny_distilled_vit(), teachers=[tiny_cnn()])
    assert (method.distillation_type, method.alpha, method.temperature) == ("hard", 0.5, 1.0)
    assert method.kd_reduction == "numel" and method.label_smoothing == 0.1


def test_predict_averages_heads_and_matches_timm_eval():
    student = tiny_distilled_vit()
    method = M.build("deit", student=student, teachers=[tiny_cnn()])
    method.eval()
    x = make_batch()["images"]
    z_cls, z_dist = method.heads(x)
    torch.testing.assert_close(method.predict(x), (z_cls + z_dist) / 2)
    torch.testing.assert_close(method.predict(x), student(x))  # timm's eval rule
    assert method.features(x).shape == (6, 32)


def test_steps_reduce_loss():
    method = M.build("deit", student=tiny_distilled_vit(), teachers=[tiny_cnn()])
    method.train()
    batch = make_batch()
    losses = train_losses(method, batch, steps=6, lr=2e-3)
    assert losses[-1] < losses[0]


def test_bad_configurations():
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                              num_classes=NUM_CLASSES)
    with pytest.raises(TypeError, match="distillation token"):
        M.build("deit", student=plain, teachers=[tiny_cnn()])
    with pytest.raises(ValueError, match="exactly 1 teacher"):
        M.build("deit", student=tiny_distilled_vit(), teachers=[])
    with pytest.raises(ValueError, match="distillation_type"):
        M.build("deit", student=tiny_distilled_vit(), teachers=[tiny_cnn()], distillation_type="medium")
    with pytest.raises(ValueError, match="kd_reduction"):
        M.build("deit", student=tiny_distilled_vit(), teachers=[tiny_cnn()], kd_reduction="mean")
    method = M.build("deit", student=tiny_distilled_vit(), teachers=[tiny_cnn(num_classes=3)])
    with pytest.raises(ValueError, match="number of classes"):
        method(make_batch())


# ------------------------------------------------------------------------------------------------------------------
# recipes


def test_recipes():
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 10, (4,), generator=g)}
    cfg, method = recipe_check(["deit_s_in1k"], "deit_tiny", batch)
    official = __import__("fastkd.config", fromlist=["load_config"]).load_config("deit_s_in1k")
    assert official.student.name == "deit_small_distilled_patch16_224" and official.teachers[0].name == "regnety_160"
    assert official.method.params["distillation_type"] == "hard"
