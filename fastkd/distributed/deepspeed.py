"""DeepSpeed engines: the student's (ZeRO 0/1/2, owns the optimizer) and a teacher's (ZeRO-3, no optimizer).

DeepSpeed is imported lazily: it is an optional dependency (``pip install fastkd[deepspeed]``).

Pitfalls on record (DESIGN.md §7): never put a teacher inside an engine that owns an optimizer (it would be
trained or at least partitioned with the student's state); ``init_inference`` has no injection policy for
timm ViTs, so teachers are sharded with a stage-3 *training* engine that never steps; ``zero.Init(dtype=...)``
forces bf16 on CPU, so teachers are built normally and partitioned by ``deepspeed.initialize``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _import():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "distributed.student=deepspeed / distributed.teacher_placement=zero3 need DeepSpeed: "
            "pip install 'fastkd[deepspeed]'"
        ) from exc
    return deepspeed


def student_config(
    *,
    micro_batch: int,
    accum_steps: int,
    world_size: int,
    zero_stage: int,
    clip_grad: float | None,
    bf16: bool,
) -> dict[str, Any]:
    """DeepSpeed config of the student engine (the optimizer comes from fastkd, see :func:`wrap_student`)."""
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"distributed.zero_stage={zero_stage} must be 0, 1 or 2 for the student (teachers use 3)")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": micro_batch * accum_steps * world_size,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if clip_grad:
        cfg["gradient_clipping"] = float(clip_grad)
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def wrap_student(method: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
    """A DeepSpeed engine around the method (student + trainable extras) with fastkd's optimizer.

    Returns ``(engine, engine_optimizer)``. The learning rate schedule keeps acting on ``optimizer``'s
    param groups (DeepSpeed's ZeRO optimizers step the wrapped optimizer with those groups).
    """
    deepspeed = _import()
    engine, ds_opt, _, _ = deepspeed.initialize(model=method, optimizer=optimizer, config=config)
    return engine, ds_opt


_TAG_RE = re.compile(r"step_\d{8}")


def _safe_globals() -> list:
    """The few DeepSpeed classes a ZeRO 0/1/2 checkpoint of fastkd's student pickles besides tensors and plain data
    (checked on DeepSpeed 0.19): data holders, no code runs when they are rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_student_checkpoint(engine, run_dir: str | os.PathLike, tag: Any, *, trust: bool = False) -> None:
    """Restore the student engine from ``<run_dir>/deepspeed/<tag>`` without running pickled code.

    DeepSpeed reads its files with ``torch.load(weights_only=False)``; here every file goes through
    ``weights_only=True`` with only :func:`_safe_globals` allowed, so a crafted pickle is refused instead of run.
    ``tag`` comes from the checkpoint: it must be a fastkd tag (``step_<8 digits>``) naming a folder inside the
    run folder. ``trust=True`` (``--trust-checkpoint``) hands the files to DeepSpeed's own loader.
    """
    from fastkd.models.build import CheckpointError

    root = Path(run_dir, "deepspeed").resolve()
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise CheckpointError(f"deepspeed_tag={tag!r} in the checkpoint is not a fastkd tag (step_<8 digits>)")
    folder = (root / tag).resolve()
    if folder.parent != root or not folder.is_dir():
        raise CheckpointError(f"deepspeed_tag={tag!r}: no DeepSpeed checkpoint folder {root / tag} in the run folder")
    if not trust:
        import torch

        allowed = _safe_globals()
        unsafe_load = engine.checkpoint_engine.load

        def safe_load(path, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                detail = next((line.strip() for line in lines if "Unsupported" in line), lines[0])
                raise CheckpointError(
                    f"DeepSpeed checkpoint file {path} holds more than tensors and plain data, so it was not "
                    "loaded (it could run code). If you trust it, pass --trust-checkpoint (run.trust_checkpoint=true)."
                    f" Detail: {detail}"
                ) from exc

        engine.checkpoint_engine.load = safe_load
    try:
        engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    finally:
        if not trust:
            engine.checkpoint_engine.load = unsafe_load


def wrap_teacher_zero3(teacher: nn.Module, *, micro_batch: int, world_size: int, bf16: bool = False):
    """Partition a frozen teacher's parameters across ranks with a stage-3 engine that has no optimizer.

    The teacher module itself stays usable: calling it (or any submodule with hooks, such as attention
    taps) gathers each layer's parameters on the fly and releases them after the layer. The few parameters
    owned by non-leaf modules (``cls_token``, ``pos_embed``) are kept whole so entry points such as
    ``teacher.forward_features`` work too. Every rank must run
    the teacher forward the same number of times (the gathers are collective).

    Returns the engine; ``teacher`` is modified in place (its parameters become empty placeholders with
    ``ds_numel`` / ``ds_tensor`` describing the local shard) and keeps a reference to the engine: an engine
    that is garbage-collected runs ``destroy()``, which would take the gathering hooks off the teacher.
    """
    deepspeed = _import()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size,
        "zero_optimization": {
            "stage": 3,
            # partition every parameter, however small (the default keeps tensors < 1e5 elements whole)
            "stage3_param_persistence_threshold": 0,
        },
        "steps_per_print": 1 << 30,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=teacher, config=cfg)
    engine.eval()
    object.__setattr__(teacher, "_zero3_engine", engine)  # not a submodule: the engine wraps the teacher
    _gather_loose_parameters(teacher)
    return engine


def _gather_loose_parameters(teacher: nn.Module) -> list[nn.Parameter]:
    """ZeRO-3 gathers a module's parameters in hooks around that module's ``forward``. Parameters owned directly
    by a *non-leaf* module (a ViT's ``cls_token``, ``pos_embed``, ``dist_token``) are then only gathered when the
    model is called as ``model(x)``; a method that calls ``teacher.forward_features(x)`` would meet empty
    placeholders. Those few small tensors are gathered once and marked persistent (ZeRO-3 never releases a
    persistent parameter); every leaf module's weights stay partitioned."""
    loose = [
        p for m in teacher.modules() if next(m.children(), None) is not None
        for p in m._parameters.values() if p is not None and hasattr(p, "ds_numel")
    ]
    for p in loose:
        p.ds_persist = True
    if loose:
        loose[0].all_gather(param_list=loose)
    return loose


def is_partitioned(module: nn.Module) -> bool:
    """True when ``module`` is under ZeRO-3 and every parameter not marked persistent (see
    :func:`wrap_teacher_zero3`) is a partitioned placeholder holding no data."""
    params = list(module.parameters())
    if not params or not all(hasattr(p, "ds_numel") for p in params):
        return False
    return all(p.numel() == 0 for p in params if not getattr(p, "ds_persist", False))


def partition_numel(module: nn.Module) -> tuple[int, int]:
    """``(elements this rank holds, elements of the whole module)``: a ZeRO-3 partitioned parameter counts its
    local shard, any other parameter (not under ZeRO-3, or kept whole as persistent) all its elements."""
    params = list(module.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)
                else p.numel() for p in params)
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    return local, full


__all__ = [
    "is_partitioned",
    "load_student_checkpoint",
    "partition_numel",
    "student_config",
    "wrap_student",
    "wrap_teacher_zero3",
]
