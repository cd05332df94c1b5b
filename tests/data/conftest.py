"""Fixtures of the data tests: small generated ImageFolder trees of real-photo JPEGs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from fastkd.data import dali_available
from fastkd.data.prepare import skimage_photo_paths

CLASSES = ("cat", "astronaut", "coffee")  # written out of sorted order on purpose


def write_folder(root: str, per_class: dict[str, int], seed: int = 0, square: bool = False) -> str:
    """``root/<class>/img_NNN.jpg``: crops of the scikit-image photographs, assorted sizes and shapes."""
    rng = np.random.default_rng(seed)
    photos = []
    for path in skimage_photo_paths()[:3]:
        with Image.open(path) as im:
            photos.append(im.convert("RGB"))
    k = 0
    for c, (name, count) in enumerate(per_class.items()):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for _ in range(count):
            photo = photos[c % len(photos)]
            w, h = photo.size
            cw, ch = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
            x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            side = int(rng.integers(40, 90))
            size = (side, side) if square else (side, int(rng.integers(40, 90)))
            img = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
            img.save(os.path.join(root, name, f"img_{k:03d}.jpg"), "JPEG", quality=90)
            k += 1
    return root


@pytest.fixture(scope="session")
def folder(tmp_path_factory) -> str:
    """A root with train/ (3 classes, 7+6+8 = 21 images) and val/ (3+2+4 = 9 images)."""
    root = str(tmp_path_factory.mktemp("folder"))
    write_folder(os.path.join(root, "train"), dict(zip(CLASSES, (7, 6, 8))), seed=0)
    write_folder(os.path.join(root, "val"), dict(zip(CLASSES, (3, 2, 4))), seed=1)
    return root


@pytest.fixture(scope="session")
def square_folder(tmp_path_factory) -> str:
    """Square images only (train and val hold the same 10 files), for deterministic full-image crops."""
    root = str(tmp_path_factory.mktemp("square"))
    for split in ("train", "val"):
        write_folder(os.path.join(root, split), {"a": 5, "b": 5}, seed=2, square=True)
    return root


def base_cfg(root: str, backend: str, **kw) -> dict:
    cfg = dict(root=root, backend=backend, device="cpu", batch_size=4, img_size=32, num_workers=0, prefetch=2)
    if backend == "dali":
        cfg["num_workers"] = 1
    cfg.update(kw)
    return cfg


BACKENDS = ("dali", "torch")

# DALI is an optional extra: without it, the tests that need it skip and say why
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install fastkd[dali])")
BACKEND_PARAMS = [pytest.param("dali", marks=needs_dali), "torch"]
