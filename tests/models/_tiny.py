"""Tiny timm ViTs shared by the tests in this folder (random init, CPU, a few ms per forward)."""

from __future__ import annotations

from fastkd.models import build_model


def tiny_vit(img_size: int = 32, depth: int = 2, num_classes: int = 5, **kwargs):
    """vit_tiny_patch16_224 at 32 px: N = 5 tokens (4 patches + CLS), 3 heads of d = 64."""
    return build_model("vit_tiny_patch16_224", img_size=img_size, depth=depth, num_classes=num_classes, **kwargs)
