"""Frozen teacher wrapper: eval mode, no gradients, its own input normalization."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Teacher", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cfg_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def _check_stats(name: str, value: Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 values (per channel), got {list(value)}")
    if name.endswith("std") and bool((t <= 0).any()):
        raise ValueError(f"{name} must be positive, got {list(value)}")
    return t.view(1, -1, 1, 1)


class Teacher(nn.Module):
    """A frozen teacher: eval mode, parameters without grad, forward under ``torch.inference_mode``.

    The batch arrives normalized for the *student* (``(x - input_mean) / input_std``); the teacher
    re-normalizes it to its own statistics (``mean``/``std``, by default from the model's timm
    ``pretrained_cfg``): ``x_t = (x * input_std + input_mean - mean) / std`` -- skipped when the two agree.

    Args:
        model: the teacher network (e.g. from :func:`fastkd.models.build_model`).
        input_mean, input_std: the statistics the incoming batch is normalized with (the student's).
        mean, std: the teacher's own statistics; None reads them from ``model.pretrained_cfg``.
        dtype: e.g. ``torch.bfloat16``: cast the weights once, here, and the input per call (halves memory and
            runs the GEMMs in bf16 without autocast re-casting fp32 weights every step); outputs are returned
            in float32. None keeps the model's dtype.
        channels_last: convert weights and input to channels-last (helps convolutional teachers on GPUs).

    Outputs (and what attention taps record inside the forward) are made under ``torch.inference_mode`` (no
    autograd bookkeeping, no version counters); the returned outputs are ordinary tensors, so a loss may use
    them in its backward. Tap records stay inference tensors: a loss that saves one for its backward clones the
    slice it uses (``.clone()`` outside inference mode gives an ordinary tensor).
        grad_to_input: run the forward with autograd so gradients flow to the *activations* (weights stay
            frozen), e.g. for head importance or teacher stages a loss differentiates through.

    Attention taps attach to a ``Teacher`` like to the bare model: ``AttentionTaps(teacher, blocks=[-1])``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_mean: Sequence[float] = IMAGENET_MEAN,
        input_std: Sequence[float] = IMAGENET_STD,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        grad_to_input: bool = False,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        own_mean, own_std = _cfg_stats(model)
        mean = own_mean if mean is None else mean
        std = own_std if std is None else std
        in_mean, in_std = _check_stats("input_mean", input_mean), _check_stats("input_std", input_std)
        t_mean, t_std = _check_stats("mean", mean), _check_stats("std", std)
        self.renormalize = not (
            in_mean.shape == t_mean.shape
            and in_std.shape == t_std.shape
            and torch.allclose(in_mean, t_mean)
            and torch.allclose(in_std, t_std)
        )
        # x_t = x * a + b with a = input_std / std, b = (input_mean - mean) / std
        self.register_buffer("_scale", in_std / t_std, persistent=False)
        self.register_buffer("_shift", (in_mean - t_mean) / t_std, persistent=False)
        self.model = model
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.grad_to_input = bool(grad_to_input)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if dtype is not None:
            self.model.to(dtype=dtype)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.eval()

    @property
    def pretrained_cfg(self) -> dict:
        return dict(getattr(self.model, "pretrained_cfg", {}) or {})

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0))

    def train(self, mode: bool = True) -> Teacher:
        """A teacher stays in eval mode (dropout, drop-path and batch-norm statistics frozen)."""
        super().train(False)
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalized ``[B, 3, H, W]`` images -> the teacher's normalization, dtype and layout."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        x = images
        if self.renormalize:
            x = x.float() * self._scale + self._shift
        if self.dtype is not None:
            x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _ctx(self):
        if self.grad_to_input:
            return torch.enable_grad()
        # under torch.compile no_grad gives the same graph (and inference_mode would break it)
        return torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()

    @staticmethod
    def _out(y):
        """Float32 ordinary tensors (called outside inference mode: a float copy, or a clone of an fp32 output)."""
        if isinstance(y, torch.Tensor):
            if not torch.compiler.is_compiling() and y.is_inference():
                return y.float() if y.is_floating_point() and y.dtype != torch.float32 else y.clone()
            return y.float() if y.is_floating_point() else y
        if isinstance(y, (tuple, list)):
            return type(y)(Teacher._out(t) for t in y)
        return y

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits (float32) for a student-normalized batch."""
        with self._ctx():
            y = self.model(self.normalize(images))
        return self._out(y)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """timm ``forward_features`` (unpooled tokens / feature map), float32."""
        with self._ctx():
            y = self.model.forward_features(self.normalize(images))
        return self._out(y)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits embedding ``[B, D]`` (timm ``forward_head(pre_logits=True)``), float32."""
        with self._ctx():
            x = self.model.forward_features(self.normalize(images))
            y = self.model.forward_head(x, pre_logits=True)
        return self._out(y)
