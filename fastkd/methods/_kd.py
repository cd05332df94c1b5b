"""Small pieces the logit-distillation methods share: teacher calls, task CE, temperature KL.

Private to ``fastkd.methods``; the formulas are written out in each method's docstring.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to fp32 for loss arithmetic; fp32/fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def freeze_teachers(teachers: Sequence[nn.Module]) -> None:
    """Teachers never train: eval mode (BN/dropout frozen) and no parameter requires grad."""
    for t in teachers:
        if not isinstance(t, nn.Module):
            raise TypeError(f"teachers must be nn.Module instances; got {type(t).__name__}")
        t.eval()
        t.requires_grad_(False)


def as_logits(out: Any, who: str) -> torch.Tensor:
    """A model output as one logits tensor ``[B, C]``.

    A distilled ViT in eval mode already returns the mean of its two heads; one that returns a tuple of head
    logits is averaged (that is its inference rule).
    """
    if isinstance(out, (tuple, list)):
        if not out or not all(torch.is_tensor(o) for o in out):
            raise TypeError(f"{who} returned {type(out).__name__} of non-tensors; expected logits [B, C]")
        out = torch.stack(list(out)).mean(0)
    if not torch.is_tensor(out) or out.dim() != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{who} must return logits of shape [B, num_classes]; got {shape}")
    return out


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, who: str = "teacher", *,
                   batch: Mapping[str, Any] | None = None, i: int = 0) -> torch.Tensor:
    """Frozen teacher forward (no graph is built); logits upcast to at least fp32. A batch from a teacher cache
    (``teachers.cache``, :mod:`fastkd.cache`) carries ``batch["teacher_logits"][i]``: that is used and the
    teacher does not run."""
    cached = None if batch is None else batch.get("teacher_logits")
    if cached is not None:
        return cached[i]
    return upcast(as_logits(teacher(images), who))


def task_ce(logits: torch.Tensor, batch: Mapping[str, Any], label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with the batch's labels.

    With Mixup/CutMix the loader supplies ``batch["targets"]`` (soft targets ``[B, C]``, label smoothing already
    folded in): soft-target CE ``mean_b Σ_c −t_bc log softmax(z_b)_c``. Otherwise hard CE against
    ``batch["labels"]`` with ``label_smoothing``.
    """
    targets = batch.get("targets")
    if targets is not None:
        if targets.shape != logits.shape:
            raise ValueError(f"batch['targets'] has shape {tuple(targets.shape)}; expected {tuple(logits.shape)}")
        return torch.sum(-upcast(targets) * F.log_softmax(upcast(logits), dim=-1), dim=-1).mean()
    if "labels" not in batch:
        raise KeyError("batch needs 'labels' (hard labels [B]) or 'targets' (soft targets [B, C])")
    return F.cross_entropy(upcast(logits), batch["labels"], label_smoothing=label_smoothing)


def kl_div_t(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
             reduction: str = "batchmean") -> torch.Tensor:
    """``T² · KL(softmax(z_T/T) ‖ softmax(z_S/T))`` summed over classes, divided by ``B`` (``batchmean``) or by
    ``B·C`` (``numel``, DeiT's official normalisation)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ; "
                         "the student and the teacher need the same number of classes")
    t = temperature
    log_p_s = F.log_softmax(upcast(student) / t, dim=-1)
    log_p_t = F.log_softmax(upcast(teacher) / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    if reduction == "batchmean":
        kl = kl / student.shape[0]
    elif reduction == "numel":
        kl = kl / student.numel()
    else:
        raise ValueError(f"reduction={reduction!r} must be 'batchmean' or 'numel'")
    return kl * (t * t)


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = float(value)
    bad = value <= lo if lo_open else value < lo
    if bad or value > hi:
        left = "(" if lo_open else "["
        raise ValueError(f"{name}={value} must be in {left}{lo}, {hi}]")
    return value


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")
    return value


def check_teacher_count(method: str, teachers: Sequence[nn.Module], n: int, what: str) -> None:
    if len(teachers) != n:
        raise ValueError(f"method {method!r} needs exactly {n} teacher{'s' if n != 1 else ''} ({what}); "
                         f"got teachers of length {len(teachers)}")


def images_of(batch: Mapping[str, Any], method: str) -> torch.Tensor:
    images = batch.get("images")
    if not torch.is_tensor(images):
        raise TypeError(f"method {method!r} needs batch['images'] as one tensor [B, 3, H, W]; "
                        f"got {type(images).__name__} (multi-view batches are for self-supervised methods)")
    return images
