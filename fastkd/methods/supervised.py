"""``supervised``: the no-distillation baseline (cross-entropy only), for teachers and "without KD" runs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.methods._kd import as_logits
from fastkd.methods.base import Method
from fastkd.methods.base import register


@register("supervised")
class Supervised(Method):
    """Cross-entropy on the labels (soft ``targets`` with Mixup/CutMix); teachers are not allowed.

    Args:
        student: classifier returning logits ``[B, C]`` (a tuple of head logits is averaged).
        label_smoothing: smoothing of the hard-label CE (the loader folds it into soft targets under Mixup).
    """

    self_supervised = False

    def __init__(self, student: nn.Module, teachers=(), *, label_smoothing: float = 0.0):
        super().__init__(student, teachers)
        if len(self.teachers):
            raise ValueError("method=supervised trains without a teacher; remove `teachers` or pick a KD method")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1)")
        self.label_smoothing = float(label_smoothing)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["images"]
        if isinstance(images, (list, tuple)):
            raise ValueError("method=supervised needs single-view batches (data.num_views=1)")
        logits = as_logits(self.student(images), "the student").float()
        targets = batch.get("targets")
        if targets is not None:
            ce = torch.sum(-targets.float() * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            ce = F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}


__all__ = ["Supervised"]
