"""Base class and registry for distillation methods."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastkd.methods._kd import as_logits
from fastkd.models.build import CheckpointError

REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a :class:`Method` available as ``fastkd.methods.build(name, ...)``."""

    def deco(cls):
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} registered twice ({REGISTRY[name].__name__}, {cls.__name__})")
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


class Method(nn.Module):
    """A distillation method: the student, its trainable extras, and the loss. It owns what is trained
    (``parameters()``: student + extras), what is evaluated (``predict`` / ``features``, also with the EMA of
    the student) and what is checkpointed (:meth:`checkpoint_state` / :meth:`load_checkpoint_state`).

    Teachers are frozen and kept *out of* ``parameters()`` and ``state_dict()`` (optimizers and checkpoints
    see only what trains); they are reachable as ``self.teachers`` so the engine can place them (replicated
    or ZeRO-3 sharded). The EMA of the student (:meth:`setup_ema`) is kept out the same way.

    ``forward(batch)`` returns a dict with ``loss`` and each named part (floats for logging are taken with
    ``.detach()`` by the engine). ``predict(images)`` gives the logits the method's inference rule uses;
    ``features(images)`` gives the embedding used for k-NN evaluation.
    """

    name: str = "base"
    self_supervised: bool = False
    # True when the method uses its teachers only through ``_kd.teacher_logits``: it can train from a teacher
    # cache (``teachers.cache``, fastkd.cache) without the teachers; methods with attention/feature terms refuse it
    logit_teachers: bool = False

    def __init__(self, student: nn.Module, teachers: list[nn.Module] | tuple = ()):
        super().__init__()
        self.student = student
        object.__setattr__(self, "_teachers", list(teachers))
        object.__setattr__(self, "_ema", None)

    @property
    def teachers(self) -> list[nn.Module]:
        return self._teachers

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- evaluation

    def predict(self, images: torch.Tensor, *, ema: bool = False) -> torch.Tensor:
        """Logits ``[B, C]`` of the student (or of its EMA): a student returning a tuple of head logits is
        averaged (DeiT's and CoAdvise's inference rule)."""
        student = self.ema.module if ema else self.student
        return as_logits(student(images), "the student")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        s = self.student
        if hasattr(s, "forward_features") and hasattr(s, "forward_head"):
            return s.forward_head(s.forward_features(images), pre_logits=True)
        return s(images)

    @classmethod
    def needs_clean_images(cls, params: dict[str, Any]) -> bool:
        """Whether the method, built with ``params``, reads ``batch["clean_images"]`` (the images before
        Mixup/CutMix); the engine then asks the training loader to keep them."""
        return False

    # ---- optimizer

    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters()``) of the parameters the optimizer must not decay: what each submodule
        lists in its own ``no_weight_decay()`` (timm's convention: ``pos_embed``, ``cls_token``, ``dist_token``;
        the method's extras such as a projector's position embedding), prefixed with the submodule's path. timm's
        ``create_optimizer_v2`` reads this (biases and 1-d parameters are exempt there anyway)."""
        names: set[str] = set()
        own = dict(self.named_parameters())
        for path, module in self.named_modules():
            fn = getattr(module, "no_weight_decay", None)
            if module is self or not callable(fn):
                continue
            for name in fn():
                full = f"{path}.{name}" if path else name
                if full in own:
                    names.add(full)
        return names

    # ---- training hooks

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Hook after each optimizer step (EMA targets, loss-weight ramps)."""

    def setup_ema(self, decay: float) -> None:
        """Keep an fp32 exponential moving average of the student (timm ``ModelEmaV3``), updated by
        :meth:`update_ema`, evaluated with ``predict(images, ema=True)`` and saved in the checkpoint."""
        from timm.utils import ModelEmaV3

        object.__setattr__(self, "_ema", ModelEmaV3(self.student, decay=decay, dtype=torch.float32))

    @property
    def ema(self):
        """The student's EMA (``ModelEmaV3``; its ``.module`` is the averaged student), or None."""
        return self._ema

    def update_ema(self, step: int) -> None:
        if self._ema is not None:
            self._ema.update(self.student, step=step)

    # ---- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """``{"method": state_dict (student + extras), "ema": the EMA student's state_dict or None}``."""
        return {"method": self.state_dict(),
                "ema": self._ema.module.state_dict() if self._ema is not None else None}

    def load_checkpoint_state(self, state: dict[str, Any], *, ema_as_student: bool = False) -> None:
        """Restore :meth:`checkpoint_state`; ``ema_as_student`` loads the saved EMA weights into the student
        (evaluating the EMA of a run). Raises :class:`CheckpointError` when the state does not fit."""
        if "method" not in state:
            raise CheckpointError("the checkpoint has no 'method' entry; is it a fastkd training checkpoint?")
        missing, unexpected = self.load_state_dict(state["method"], strict=False)
        if missing or unexpected:
            raise CheckpointError(f"the checkpoint does not fit method {self.name} (missing keys: "
                                  f"{list(missing)[:8]}, unexpected keys: {list(unexpected)[:8]})")
        saved_ema = state.get("ema")
        if ema_as_student:
            if saved_ema is None:
                raise CheckpointError("the checkpoint holds no EMA weights (the run had train.ema=false)")
            self.student.load_state_dict(saved_ema)
        elif self._ema is not None and saved_ema is not None:
            self._ema.module.load_state_dict(saved_ema)

    def extra_repr(self) -> str:
        return f"teachers={len(self._teachers)}"
