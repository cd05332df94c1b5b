"""Hinton logit distillation: task cross-entropy plus temperature-scaled KL to a teacher's soft labels."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastkd.methods._kd import as_logits
from fastkd.methods._kd import check_range
from fastkd.methods._kd import check_teacher_count
from fastkd.methods._kd import freeze_teachers
from fastkd.methods._kd import images_of
from fastkd.methods._kd import kl_div_t
from fastkd.methods._kd import task_ce
from fastkd.methods._kd import teacher_logits
from fastkd.methods.base import Method
from fastkd.methods.base import register


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict[str, Any], *,
                temperature: float = 4.0, alpha: float = 0.5, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Hinton KD on given logits (see :class:`HintonKD`): ``{"loss", "ce", "kd"}`` with weighted parts,
    ``loss = ce + kd``. ``batch`` supplies ``labels`` or soft ``targets``."""
    ce = (1.0 - alpha) * task_ce(student_logits, batch, label_smoothing)
    kd = alpha * kl_div_t(student_logits, teacher_logits, temperature, "batchmean")
    return {"loss": ce + kd, "ce": ce, "kd": kd}


@register("hinton")
class HintonKD(Method):
    r"""Logit knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network",
    https://arxiv.org/abs/1503.02531).

    .. math::

        L = (1 - \alpha)\,\mathrm{CE}(z_S, y) + \alpha\,T^2\,\frac{1}{B}\sum_b
            \mathrm{KL}\big(\mathrm{softmax}(z_T/T)\,\|\,\mathrm{softmax}(z_S/T)\big)

    The teacher (any classifier, CNN or ViT, with the student's number of classes) is frozen and runs under
    ``no_grad``. With Mixup/CutMix the CE term uses the batch's soft targets (``batch["targets"]``); the teacher
    sees the same mixed images as the student.

    Args:
        student: classifier returning logits ``[B, C]``.
        teachers: exactly one teacher returning logits ``[B, C]``.
        temperature: ``T`` (default 4.0, timm's KD default; 1.0 is the other common choice; METHODS.md §0).
        alpha: weight ``α`` of the KD term, in [0, 1] (default 0.5).
        label_smoothing: label smoothing of the hard-label CE, used only when the batch carries no soft
            ``targets`` (default 0.0, plain Hinton KD).

    Returns (``forward``): ``{"loss", "ce", "kd"}`` with the weighted terms ``ce = (1 − α)·CE`` and
    ``kd = α·T²·KL`` (``loss = ce + kd``).
    """

    logit_teachers = True  # the teacher gives logits only: teachers.cache can replace it

    def __init__(self, student: nn.Module, teachers=(), *, temperature: float = 4.0, alpha: float = 0.5,
                 label_smoothing: float = 0.0):
        super().__init__(student, teachers)
        check_teacher_count("hinton", self.teachers, 1, "a classifier giving logits")
        freeze_teachers(self.teachers)
        self.temperature = check_range("temperature", temperature, 0.0, float("inf"), lo_open=True)
        self.alpha = check_range("alpha", alpha, 0.0, 1.0)
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = images_of(batch, "hinton")
        z_s = as_logits(self.student(images), "the student")
        z_t = teacher_logits(self.teachers[0], images, batch=batch)
        return hinton_loss(z_s, z_t, batch, temperature=self.temperature, alpha=self.alpha,
                           label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, label_smoothing={self.label_smoothing}"
