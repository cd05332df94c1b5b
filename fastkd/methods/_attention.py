"""Helpers shared by the attention / feature methods (``ssta``, ``attndistill``, ``scalekd``).

Private to ``fastkd.methods``: teacher unwrapping, token layouts of timm ViTs, CLS-row attention probabilities,
the task loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.methods._kd import task_ce
from fastkd.models.taps import unwrap_model


def teacher_input(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Student-normalized images as the bare teacher network expects them (its normalization, dtype, layout)."""
    normalize = getattr(teacher, "normalize", None)
    return normalize(images) if callable(normalize) else images


def param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def is_vit(model: nn.Module) -> bool:
    """A timm ViT-style model: ``blocks`` of ``attn`` modules, a patch embedding and prefix tokens."""
    return (
        hasattr(model, "blocks")
        and hasattr(model, "patch_embed")
        and hasattr(model, "num_prefix_tokens")
        and all(hasattr(b, "attn") for b in model.blocks)
    )


def require_vit(model: nn.Module, argument: str, method: str) -> nn.Module:
    """The bare timm ViT behind ``model``, or a clear error naming ``argument`` (e.g. ``teachers[0]``)."""
    bare = unwrap_model(model)
    if not is_vit(bare):
        raise ValueError(
            f"{argument} is a {type(bare).__name__}, not a vision transformer: method {method!r} distils attention "
            "maps and needs timm ViT/DeiT models (blocks with self-attention); a CNN can only supply logits"
        )
    return bare


@dataclass(frozen=True)
class TokenLayout:
    """Token order of a timm ViT: ``prefix`` special tokens (CLS first when ``has_cls``) then the patch grid."""

    prefix: int
    has_cls: bool
    grid: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    @property
    def extra(self) -> int:
        """Prefix tokens other than CLS (distillation token, registers)."""
        return self.prefix - int(self.has_cls)


def token_layout(model: nn.Module) -> TokenLayout:
    bare = unwrap_model(model)
    grid = tuple(int(g) for g in bare.patch_embed.grid_size)
    has_cls = getattr(bare, "cls_token", None) is not None
    return TokenLayout(prefix=int(bare.num_prefix_tokens), has_cls=has_cls, grid=grid)


def patch_size(model: nn.Module) -> tuple[int, int]:
    ps = unwrap_model(model).patch_embed.patch_size
    return (int(ps), int(ps)) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))


def cls_row_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale * q[:, :, 0] . k^T)``: the CLS query row of every head, ``[B, H, N]`` in fp32.

    ``q, k: [B, H, N, d]``. Costs ``O(B·H·N·d)``: the ``N×N`` maps are never formed.
    """
    logits = scale * torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float())
    return torch.softmax(logits, dim=-1)


def classification_loss(
    logits: torch.Tensor, batch: Mapping[str, Any], *, kind: str = "ce", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Task loss: ``"ce"`` = (label-smoothed / soft-target) cross entropy; ``"bce"`` = BCE-with-sigmoid against
    one-hot (smoothed) labels or the batch's soft ``targets`` (RSB-style recipes)."""
    if kind == "ce":
        return task_ce(logits, batch, label_smoothing)
    if kind != "bce":
        raise ValueError(f"kind={kind!r} must be 'ce' or 'bce'")
    targets = batch.get("targets")
    if targets is None:
        if "labels" not in batch:
            raise KeyError("batch needs 'labels' (hard labels [B]) or 'targets' (soft targets [B, C])")
        C = logits.shape[-1]
        targets = F.one_hot(batch["labels"], C).float()
        if label_smoothing:
            targets = targets * (1.0 - label_smoothing) + label_smoothing / C
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
