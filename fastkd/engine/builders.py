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
    train.keep_clean_images = method_class(cfg.method.name).needs_clean_images(cfg.method.params)
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


def build_teachers(cfg: Config, num_classes: int | None, data_cfg, *,
                   dtype: torch.dtype | None = None) -> list[nn.Module]:
    """Frozen :class:`~fastkd.models.Teacher` wrappers; ``dtype`` (the autocast dtype) converts their weights once,
    convolutional teachers run channels-last."""
    from fastkd.methods._attention import is_vit
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
        cnn = not is_vit(model) and any(isinstance(m, nn.Conv2d) for m in model.modules())
        teachers.append(Teacher(model, input_mean=mean, input_std=std, dtype=dtype, channels_last=cnn))
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
    """The autocast dtype ``train.amp`` asks for (``auto``: bf16 on CUDA, none on CPU); None means fp32. fp16 on a
    device whose autocast has no fp16 (CPU autocast before torch 2.2 had only bf16) is a :class:`ConfigError`."""
    amp = cfg.train.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]
    if dtype is torch.float16 and not _autocasts_to(device, dtype):
        raise ConfigError(f"train.amp=fp16: torch {torch.__version__} has no fp16 autocast on {device.type}; use "
                          "train.amp=bf16 or train.amp=fp32 there")
    return dtype


def _autocasts_to(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.autocast(device.type, dtype)`` really runs in ``dtype`` (older torch warns and disables it)."""
    import warnings

    if not torch.amp.is_autocast_available(device.type):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type=device.type, dtype=dtype):
            return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scale (torch's and timm's ``NativeScaler`` defaults: 2^16 at start, halved on a step with
    non-finite gradients, which is skipped, doubled after 2000 steps without one); None for bf16 and fp32, whose
    range needs no scaling."""
    if dtype is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                                growth_interval=2000)


# ---------------------------------------------------------------------------------------------------------------------
# optimizer and schedule


def accum_for_global_batch(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per optimizer step that make ``train.global_batch`` images per step over ``world_size``
    processes of ``micro_batch`` images each; a global batch they cannot divide is a :class:`ConfigError`."""
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise ConfigError(
            f"train.global_batch={global_batch}: expected a multiple of batch size x processes = {micro_batch} x "
            f"{world_size} = {per_pass}; pick train.batch_size (or the number of processes) so that it divides "
            f"{global_batch}"
        )
    return global_batch // per_pass


def scaled_lr(cfg: Config, global_batch: int) -> float:
    """``optim.lr``, linearly scaled by ``global_batch / optim.lr_base_batch`` when that is set (DeiT: 512)."""
    lr = cfg.optim.lr
    if cfg.optim.lr_base_batch:
        lr = lr * global_batch / cfg.optim.lr_base_batch
    return lr


# torch's optimizers with a fused kernel (CUDA and CPU) that takes AMP's ``found_inf``: a non-finite step is skipped
# on the device (fastkd.engine.placement); timm names for them
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd", "nesterov", "momentum")


def build_optimizer(cfg: Config, method: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over the method's trainable parameters (student + extras). No weight decay on
    biases, 1-d parameters and what the method's modules list in ``no_weight_decay()`` (timm's convention:
    ``pos_embed``, ``cls_token``, ``dist_token``, projector position embeddings; :meth:`Method.no_weight_decay`),
    unless ``optim.decay_all`` (every parameter decayed, as mmcls' SGD configs without ``paramwise_cfg``).
    AdamW / Adam / SGD run torch's fused kernel (``fused=True``) when the parameters are on CUDA or the CPU (one
    kernel per step, and the device-side skip of a non-finite step); the others keep their default implementation
    (foreach where they have one)."""
    from timm.optim import create_optimizer_v2

    o = cfg.optim
    kwargs: dict[str, Any] = {"eps": o.eps}
    device = next((p.device for p in method.parameters() if p.requires_grad), torch.device("cpu"))
    if o.name in FUSED_OPTIMIZERS and device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    if o.name in ("adamw", "adam", "lamb"):
        kwargs["betas"] = tuple(o.betas)
    if o.layer_decay is not None:
        if o.decay_all:
            raise ConfigError("optim.layer_decay and optim.decay_all=true cannot be combined")
        kwargs["layer_decay"] = o.layer_decay
    trainable = [p for p in method.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"method {cfg.method.name} has no trainable parameters")
    target = trainable if o.decay_all else method  # a parameter list: timm makes no groups, all decayed
    try:
        return create_optimizer_v2(target, opt=o.name, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                   **kwargs)
    except (ValueError, AssertionError) as exc:
        raise ConfigError(f"optim.name={o.name}: {exc}") from exc


class EpochStepped:
    """A timm scheduler in epoch units driven by the trainer's per-step ``step_update(num_updates)``: the LR changes
    only at epoch boundaries (DeiT's ``lr_scheduler.step(epoch)``)."""

    def __init__(self, scheduler, steps_per_epoch: int):
        self.scheduler = scheduler
        self.steps_per_epoch = max(int(steps_per_epoch), 1)

    def step_update(self, num_updates: int, metric=None) -> None:
        self.scheduler.step(num_updates // self.steps_per_epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int):
    """The LR schedule (timm schedulers): linear warmup from ``schedule.warmup_lr``, then

    - ``cosine`` to ``schedule.min_lr`` over all steps (timm), or over the steps after the warmup when
      ``schedule.warmup_prefix`` (MAE's ``lr_sched``, DINO's ``cosine_scheduler``);
    - ``multistep``: × ``decay_rate`` at each of ``decay_epochs`` (PyTorch ``MultiStepLR`` timing: the LR of epoch
      30 is decayed, the one of epoch 29 is not);
    - ``constant``.

    ``schedule.per_epoch`` evaluates the schedule once per epoch (epoch units, DeiT) instead of every step. Call
    ``step_update(num_updates)`` after each optimizer step either way."""
    from timm.scheduler import CosineLRScheduler
    from timm.scheduler import MultiStepLRScheduler
    from timm.scheduler import StepLRScheduler

    s = cfg.schedule
    if s.per_epoch:  # the schedule's unit is the epoch
        unit = max(int(steps_per_epoch), 1)
        total = max(-(-total_steps // unit), 1)
        warmup = int(round(s.warmup_steps / unit)) if s.warmup_steps is not None else int(round(s.warmup_epochs))
    else:
        unit, total = 1, max(total_steps, 1)
        warmup = s.warmup_steps if s.warmup_steps is not None else int(round(s.warmup_epochs * steps_per_epoch))
    warmup = max(0, min(warmup, max(total - 1, 0)))
    epoch_len = 1 if s.per_epoch else max(int(steps_per_epoch), 1)  # one epoch in the schedule's unit
    common = dict(warmup_t=warmup, warmup_lr_init=s.warmup_lr, t_in_epochs=s.per_epoch)
    if s.name == "cosine":
        t_initial = max(total - warmup, 1) if s.warmup_prefix else total
        sched = CosineLRScheduler(optimizer, t_initial=t_initial, lr_min=s.min_lr, warmup_prefix=s.warmup_prefix,
                                  **common)
    elif s.name == "multistep":
        if s.decay_rate <= 0 or any(e < 0 for e in s.decay_epochs):
            raise ConfigError(f"schedule.decay_epochs={s.decay_epochs} must be >= 0 and schedule.decay_rate="
                              f"{s.decay_rate} > 0")
        # timm applies milestone m at t == m - 1; +1 gives PyTorch's timing (decayed from t == m on)
        milestones = sorted(int(round(e * epoch_len)) + 1 for e in s.decay_epochs)
        sched = MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=s.decay_rate, **common)
    else:
        sched = StepLRScheduler(optimizer, decay_t=1 << 40, decay_rate=1.0, **common)
    return EpochStepped(sched, unit) if s.per_epoch else sched


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
    "EpochStepped",
    "grad_scaler",
    "knn_bank_loader",
    "scaled_lr",
    "student_stats",
    "total_steps_for",
]
