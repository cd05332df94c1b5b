"""PIL/torchvision transforms of the torch backend, written to match the DALI graphs.

Geometry rules shared with DALI (checked by the tests): validation resizes the shorter side to
``floor(img_size / crop_pct)`` and the longer side to ``round_half_up(long * short_new / short)``;
the centre crop starts at ``round_half_up((size - crop) / 2)``. torchvision's ``Resize`` truncates
and its ``CenterCrop`` rounds half to even, which would shift the crop by a pixel against DALI.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from fastkd.data.config import DataConfig

_PIL_INTERP = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def resized_shape(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``shorter``, keeping the aspect ratio."""
    if height <= width:
        return shorter, max(1, round_half_up(width * shorter / height))
    return max(1, round_half_up(height * shorter / width)), shorter


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred ``size`` square."""
    top = round_half_up((height - size) / 2)
    left = round_half_up((width - size) / 2)
    return left, top, left + size, top + size


def to_chw_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ValTransform:
    """Resize the shorter side, centre-crop, return a uint8 CHW tensor."""

    def __init__(self, cfg: DataConfig) -> None:
        self.size = cfg.img_size
        self.shorter = cfg.resize_size()
        self.interp = _PIL_INTERP[cfg.interpolation]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        h, w = resized_shape(img.height, img.width, self.shorter)
        img = img.resize((w, h), self.interp)
        return to_chw_uint8(img.crop(center_crop_box(h, w, self.size)))


class TrainTransform:
    """Random-resized-crop, horizontal flip, optional RandAugment; uint8 CHW tensor out."""

    def __init__(self, cfg: DataConfig) -> None:
        from torchvision import transforms as T
        from torchvision.transforms import InterpolationMode

        interp = InterpolationMode.BILINEAR if cfg.interpolation == "bilinear" else InterpolationMode.BICUBIC
        steps = [
            T.RandomResizedCrop(cfg.img_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), interpolation=interp),
        ]
        if cfg.hflip > 0:
            steps.append(T.RandomHorizontalFlip(cfg.hflip))
        if cfg.randaugment > 0:
            steps.append(
                T.RandAugment(
                    num_ops=cfg.randaugment,
                    magnitude=cfg.randaugment_magnitude,
                    num_magnitude_bins=31,
                    interpolation=interp,
                    fill=[128, 128, 128],
                )
            )
        self.transform = T.Compose(steps)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_chw_uint8(self.transform(img))


def random_resized_crop_box(
    rng: np.random.Generator, height: int, width: int, scale, ratio
) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random-resized-crop window, drawn from ``rng``.

    The usual Inception-style rule: up to 10 tries of an area fraction uniform in ``scale`` and an
    aspect ratio log-uniform in ``ratio``; if no window fits, the largest centred one within ``ratio``.
    The DALI backend draws its windows here (from each sample's own generator) and hands them to DALI.
    """
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        area = height * width * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(area * aspect)))
        h = int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    if width / height < ratio[0]:
        w, h = width, min(height, max(1, int(round(width / ratio[0]))))
    elif width / height > ratio[1]:
        w, h = min(width, max(1, int(round(height * ratio[1])))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h
