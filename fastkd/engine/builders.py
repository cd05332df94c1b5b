"""Factories that turn a :class:`~fastkd.config.Config` into the run's pieces.

Each factory uses the library that owns the job: ``fastkd.data.build_loader``, ``fastkd.models.build_model``
and ``Teacher``, ``fastkd.methods.build``, timm's ``create_optimizer_v2`` and LR schedulers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from typing import Any

import torch
from torch import nn

from fastkd.config import Config
from fastkd.config import ConfigError

log = logging.getLogger("fastkd.engine")


# ---------------------------------------------------------------------------------------------------------------------
# data


def student_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The student's normalization (mean, std) from timm's pretrained config, without building the model."""
    try:
        from timm.models import get_pretrained_cfg

        pcfg = get_pretrained_cfg(name)
    except Exception:
        return None
    if pcfg is None or pcfg.mean is None or pcfg.std is None:
        return None
    mean, std = tuple(pcfg.mean), tuple(pcfg.std)
    if len(mean) != 3 or len(std) != 3:
        return None
    return mean, std


def data_config(cfg: Config, device: torch.device):
    """The data section with the engine's decisions folded in: batch size (``train.batch_size`` wins when set),
    the device the batches must land on, the student's normalization (when the recipe kept the default), and
    ``train.label_smoothing`` (used by the loader's Mixup/CutMix soft targets)."""
    data = cfg.data
    changes: dict[str, Any] = {}
    if cfg.train.batch_size is not None:
        changes["batch_size"] = cfg.train.batch_size
    if getattr(data, "device", "auto") == "auto":
        changes["device"] = str(device)
    defaults = type(data)()
    if (tuple(data.mean), tuple(data.std)) == (tuple(defaults.mean), tuple(defaults.std)):
        stats = student_stats(cfg.student.name)
        if stats is not None and stats != (tuple(data.mean), tuple(data.std)):
            changes["mean"], changes["std"] = stats
    if cfg.train.label_smoothing and not data.label_smoothing:
        changes["label_smoothing"] = cfg.train.label_smoothing
    return dataclasses.replace(data, **changes) if changes else data


def build_loaders(cfg: Config, data_cfg, rank: int, world_size: int, *, need_train_eval: bool = False):
    """``(train, val, train_eval)`` loaders; ``val`` is None when the data has no validation split, ``train_eval``
    (training images with validation transforms, the k-NN bank) only when asked for."""
    from fastkd.data import build_loader

    train = build_loader(data_cfg, "train", rank, world_size)
    val = _optional_split(build_loader, data_cfg, "val", rank, world_size)
    train_eval = None
    if need_train_eval:
        train_eval = knn_bank_loader(data_cfg, rank, world_size)
    return train, val, train_eval


def _optional_split(build_loader, data_cfg, split, rank, world_size):
    try:
        return build_loader(data_cfg, split, rank, world_size)
    except FileNotFoundError as exc:
        log.warning("no %s split (%s): evaluation is skipped", split, exc)
        return None


def knn_bank_loader(data_cfg, rank, world_size):
    """The training images with validation transforms (no augmentation): the k-NN feature bank."""
    from fastkd.data import build_loader

    train_path = data_cfg.train_path
    if not train_path and data_cfg.root:
        train_path = data_cfg.root.rstrip("/") + "/train"
    bank_cfg = dataclasses.replace(data_cfg, val_path=train_path, num_views=1, mixup=0.0, cutmix=0.0)
    return build_loader(bank_cfg, "val", rank, world_size)


# ---------------------------------------------------------------------------------------------------------------------
# models and method


def build_student(cfg: Config, num_classes: int | None) -> nn.Module:
    from fastkd.models import build_model

    kwargs = dict(cfg.student.kwargs)
    if cfg.train.drop_path:
        kwargs.setdefault("drop_path_rate", cfg.train.drop_path)
    if "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    try:
        return build_model(cfg.student.name, weights=cfg.student.weights, trust_checkpoint=cfg.run.trust_checkpoint,
                           **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"student ({cfg.student.name}): {exc}") from exc


def build_teachers(cfg: Config, num_classes: int | None, data_cfg) -> list[nn.Module]:
    from fastkd.models import Teacher
    from fastkd.models import build_model

    mean = tuple(getattr(data_cfg, "mean", (0.485, 0.456, 0.406)))
    std = tuple(getattr(data_cfg, "std", (0.229, 0.224, 0.225)))
    teachers = []
    for i, spec in enumerate(cfg.teachers):
        kwargs = dict(spec.kwargs)
        if "num_classes" not in kwargs:
            kwargs["num_classes"] = num_classes
        try:
            model = build_model(spec.name, weights=spec.weights, trust_checkpoint=cfg.run.trust_checkpoint, **kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"teachers.{i} ({spec.name}): {exc}") from exc
        teachers.append(Teacher(model, input_mean=mean, input_std=std))
    return teachers


def method_class(name: str) -> type:
    """The class registered as ``method.name`` in :mod:`fastkd.methods`."""
    import fastkd.methods as methods

    try:
        return methods.get(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def build_method(cfg: Config, student: nn.Module, teachers: list[nn.Module]):
    """``method.name`` built with ``method.params`` (``fastkd.methods`` registry). ``train.label_smoothing``
    reaches methods whose constructor takes ``label_smoothing``."""
    cls = method_class(cfg.method.name)
    params = dict(cfg.method.params)
    if cfg.train.label_smoothing and "label_smoothing" not in params:
        if "label_smoothing" in inspect.signature(cls.__init__).parameters:
            params["label_smoothing"] = cfg.train.label_smoothing
    try:
        return cls(student=student, teachers=list(teachers), **params)
    except TypeError as exc:
        raise ConfigError(f"method.params for {cfg.method.name}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"method {cfg.method.name}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------------
# precision


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``train.amp`` asks for (``auto``: bf16 on CUDA, none on CPU); None means fp32."""
    amp = cfg.train.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp32": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# optimizer and schedule


def scaled_lr(cfg: Config, global_batch: int) -> float:
    """``optim.lr``, linearly scaled by ``global_batch / optim.lr_base_batch`` when that is set (DeiT: 512)."""
    lr = cfg.optim.lr
    if cfg.optim.lr_base_batch:
        lr = lr * global_batch / cfg.optim.lr_base_batch
    return lr


def build_optimizer(cfg: Config, method: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over the method's trainable parameters (student + extras), no weight decay
    on biases and 1-d parameters."""
    from timm.optim import create_optimizer_v2

    o = cfg.optim
    kwargs: dict[str, Any] = {"eps": o.eps}
    if o.name in ("adamw", "adam", "lamb"):
        kwargs["betas"] = tuple(o.betas)
    if o.layer_decay is not None:
        kwargs["layer_decay"] = o.layer_decay
    if not any(p.requires_grad for p in method.parameters()):
        raise ConfigError(f"method {cfg.method.name} has no trainable parameters")
    try:
        return create_optimizer_v2(method, opt=o.name, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                   **kwargs)
    except (ValueError, AssertionError) as exc:
        raise ConfigError(f"optim.name={o.name}: {exc}") from exc


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int):
    """Per-step schedule (timm): linear warmup from ``schedule.warmup_lr``, then cosine to ``schedule.min_lr``
    (or constant). Call ``step_update(num_updates)`` after each optimizer step."""
    from timm.scheduler import CosineLRScheduler
    from timm.scheduler import StepLRScheduler

    s = cfg.schedule
    warmup = s.warmup_steps if s.warmup_steps is not None else int(round(s.warmup_epochs * steps_per_epoch))
    warmup = max(0, min(warmup, max(total_steps - 1, 0)))
    if s.name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=s.min_lr, warmup_t=warmup,
                                 warmup_lr_init=s.warmup_lr, warmup_prefix=False, t_in_epochs=False)
    return StepLRScheduler(optimizer, decay_t=1 << 40, decay_rate=1.0, warmup_t=warmup, warmup_lr_init=s.warmup_lr,
                           t_in_epochs=False)


def total_steps_for(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.train.steps is not None:
        if cfg.train.steps < 1:
            raise ConfigError(f"train.steps={cfg.train.steps} must be >= 1")
        return cfg.train.steps
    if steps_per_epoch < 1:
        raise ConfigError(
            "the training loader yields fewer batches than train.accum_steps; lower accum_steps or the batch size"
        )
    return cfg.train.epochs * steps_per_epoch


__all__ = [
    "amp_dtype",
    "autocast",
    "build_loaders",
    "build_method",
    "method_class",
    "build_optimizer",
    "build_scheduler",
    "build_student",
    "build_teachers",
    "data_config",
    "knn_bank_loader",
    "scaled_lr",
    "student_stats",
    "total_steps_for",
]
