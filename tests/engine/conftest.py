"""Fixtures of the engine tests: a tiny generated ImageFolder and tiny model settings."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def write_quadrant_folder(root, n_train: int = 32, n_val: int = 16, size: int = 16, classes: int = 4, seed: int = 0):
    """``root/{train,val}/c<k>/<i>.jpg``: noisy images whose class is the bright quadrant."""
    rng = np.random.default_rng(seed)
    h = size // 2
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            y = i % classes
            img = rng.integers(0, 90, size=(size, size, 3)).astype(np.uint8)
            r, c = divmod(y % 4, 2)
            img[r * h:(r + 1) * h, c * h:(c + 1) * h] += 150
            d = root / split / f"c{y}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_quadrant_folder(tmp_path_factory.mktemp("quadrants"))
