"""DeiT distillation through a distillation token (Touvron et al., ICML 2021)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.methods._kd import check_choice
from fastkd.methods._kd import check_range
from fastkd.methods._kd import check_teacher_count
from fastkd.methods._kd import freeze_teachers
from fastkd.methods._kd import images_of
from fastkd.methods._kd import kl_div_t
from fastkd.methods._kd import task_ce
from fastkd.methods._kd import teacher_logits
from fastkd.methods._kd import upcast
from fastkd.methods.base import Method
from fastkd.methods.base import register


def deit_loss(z_cls: torch.Tensor, z_dist: torch.Tensor, z_teacher: torch.Tensor, batch: dict[str, Any], *,
              distillation_type: str = "hard", alpha: float = 0.5, temperature: float = 1.0,
              kd_reduction: str = "numel", label_smoothing: float = 0.1) -> dict[str, torch.Tensor]:
    """DeiT's loss on given logits (see :class:`DeiTDistillation`): ``{"loss", "ce", "kd"}`` with weighted parts,
    ``loss = ce + kd``. ``batch`` supplies ``labels`` or soft ``targets``."""
    if z_teacher.shape != z_dist.shape:
        raise ValueError(f"teacher logits {tuple(z_teacher.shape)} and student logits {tuple(z_dist.shape)} "
                         "differ; the student and the teacher need the same number of classes")
    ce = (1.0 - alpha) * task_ce(z_cls, batch, label_smoothing)
    if distillation_type == "hard":
        kd = F.cross_entropy(upcast(z_dist), z_teacher.argmax(dim=-1))
    elif distillation_type == "soft":
        kd = kl_div_t(z_dist, z_teacher, temperature, kd_reduction)
    else:
        raise ValueError(f"distillation_type={distillation_type!r} must be 'hard' or 'soft'")
    kd = alpha * kd
    return {"loss": ce + kd, "ce": ce, "kd": kd}


@register("deit")
class DeiTDistillation(Method):
    r"""Distillation token (DeiT; Touvron, Cord, Douze, Massa, Sablayrolles, Jégou, "Training data-efficient image
    transformers & distillation through attention", ICML 2021, https://arxiv.org/abs/2012.12877; official code
    ``facebookresearch/deit`` ``losses.py``).

    The student carries a learnable distillation token next to CLS (N = 198 at 224 px) with its own linear head:
    CLS head → ``z_cls``, distillation head → ``z_dist``. With a frozen teacher's logits ``z_T``:

    .. math::

        \text{hard:}\quad L = (1-\alpha)\,\mathrm{CE}(z_{cls}, y) + \alpha\,\mathrm{CE}(z_{dist}, \arg\max z_T)

        \text{soft:}\quad L = (1-\alpha)\,\mathrm{CE}(z_{cls}, y)
            + \alpha\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_T/T)\,\|\,\mathrm{softmax}(z_{dist}/T)\big)

    With DeiT's α = 0.5 the hard loss is ``½·CE(z_cls, y) + ½·CE(z_dist, argmax z_T)``. With Mixup/CutMix the
    CE term uses the soft targets ``batch["targets"]`` and the teacher sees the mixed images. Inference
    (``predict``) averages the two heads' logits.

    The student must be a timm distilled ViT (``deit_{tiny,small,base}_distilled_patch16_224``, class
    ``VisionTransformerDistilled``: ``dist_token``, ``head_dist``); the teacher may be any classifier, e.g. a
    RegNetY-16GF CNN (``regnety_160``, DeiT's teacher).

    Args:
        student: timm distilled ViT.
        teachers: exactly one teacher returning logits with the student's number of classes.
        distillation_type: ``"hard"`` (default, DeiT's) or ``"soft"``.
        alpha: weight ``α`` of the distillation term, in [0, 1] (default 0.5).
        temperature: ``T`` of the soft variant (default 1.0).
        kd_reduction: normalisation of the soft KL sum: ``"numel"`` (default; divide by ``B·C`` as DeiT's official
            ``losses.py`` does) or ``"batchmean"`` (divide by ``B``, the textbook KL; ``C`` times larger).
        label_smoothing: label smoothing of the hard-label CE, used only when the batch carries no soft
            ``targets`` (default 0.1, DeiT's ``--smoothing``; with Mixup the loader folds it into the targets).

    Returns (``forward``): ``{"loss", "ce", "kd"}`` with the weighted terms ``ce = (1 − α)·CE`` and ``kd = α·…``
    (``loss = ce + kd``).
    """

    logit_teachers = True  # the teacher gives logits only: teachers.cache can replace it

    def __init__(self, student: nn.Module, teachers=(), *, distillation_type: str = "hard", alpha: float = 0.5,
                 temperature: float = 1.0, kd_reduction: str = "numel", label_smoothing: float = 0.1):
        super().__init__(student, teachers)
        check_teacher_count("deit", self.teachers, 1, "a classifier giving logits, e.g. regnety_160")
        if not (hasattr(student, "dist_token") and hasattr(student, "head_dist")
                and hasattr(student, "forward_features")):
            raise TypeError(
                f"method 'deit' needs a student with a distillation token and head (timm VisionTransformerDistilled, "
                f"e.g. deit_small_distilled_patch16_224); got student of type {type(student).__name__}")
        if hasattr(student, "set_distilled_training"):
            student.set_distilled_training(True)
        freeze_teachers(self.teachers)
        self.distillation_type = check_choice("distillation_type", distillation_type, ("hard", "soft"))
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self.temperature = check_range("temperature", temperature, 0.0, float("inf"), lo_open=True)
        self.kd_reduction = check_choice("kd_reduction", kd_reduction, ("numel", "batchmean"))
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0)

    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_cls, z_dist)`` in train and eval mode alike."""
        s = self.student
        x = s.forward_features(images)
        x_cls, x_dist = x[:, 0], x[:, 1]
        drop = getattr(s, "head_drop", nn.Identity())
        return s.head(drop(x_cls)), s.head_dist(drop(x_dist))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = images_of(batch, "deit")
        z_cls, z_dist = self.heads(images)
        z_t = teacher_logits(self.teachers[0], images, batch=batch)
        return deit_loss(z_cls, z_dist, z_t, batch, distillation_type=self.distillation_type, alpha=self.alpha,
                         temperature=self.temperature, kd_reduction=self.kd_reduction,
                         label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (f"distillation_type={self.distillation_type!r}, alpha={self.alpha}, temperature={self.temperature}, "
                f"kd_reduction={self.kd_reduction!r}, label_smoothing={self.label_smoothing}")
