"""Base class and registry for distillation methods."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
    """A distillation method: the student, its trainable extras, and the loss.

    Teachers are frozen and kept *out of* ``parameters()`` and ``state_dict()`` (optimizers and checkpoints
    see only what trains); they are reachable as ``self.teachers`` so the engine can place them (replicated
    or ZeRO-3 sharded).

    ``forward(batch)`` returns a dict with ``loss`` and each named part (floats for logging are taken with
    ``.detach()`` by the engine). ``predict(images)`` gives the logits the method's inference rule uses;
    ``features(images)`` gives the embedding used for k-NN evaluation.
    """

    name: str = "base"
    self_supervised: bool = False

    def __init__(self, student: nn.Module, teachers: list[nn.Module] | tuple = ()):
        super().__init__()
        self.student = student
        object.__setattr__(self, "_teachers", list(teachers))

    @property
    def teachers(self) -> list[nn.Module]:
        return self._teachers

    def set_teachers(self, teachers: list[nn.Module]) -> None:
        """Replace the teachers (e.g. with DeepSpeed-wrapped ones); they stay out of the state dict."""
        object.__setattr__(self, "_teachers", list(teachers))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        s = self.student
        if hasattr(s, "forward_features") and hasattr(s, "forward_head"):
            return s.forward_head(s.forward_features(images), pre_logits=True)
        return s(images)

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Hook after each optimizer step (EMA targets, loss-weight ramps)."""

    def extra_repr(self) -> str:
        return f"teachers={len(self._teachers)}"
