"""Small real data sets written from files that ship inside dependencies (no downloads).

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upscaled to ``size`` pixels.
* ``photos``: crops of scikit-image's sample photographs and textures (10 classes, one per picture).

Both are written as an ImageFolder of JPEGs, ``<out>/{train,val}/<class>/<name>.jpg``, with a
stratified, seeded split; optionally also as file lists (``train.txt``/``val.txt``) or webdataset
shards (``<out>/wds/{train,val}/shard-000000.tar``). :func:`make_jpeg_folder` writes the larger
photo-sized folder the data-pipeline benchmark reads.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

# sample pictures inside scikit-image: colour photographs and grey textures (one class each)
PHOTO_FILES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)


def _skimage_data_dir() -> str:
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError("the 'photos' data set needs scikit-image: pip install fastkd[data]") from exc
    return os.path.dirname(skimage.data.__file__)


def skimage_photo_paths(kind: str = "all") -> list[str]:
    """Paths of the pictures above (``kind="jpeg"``: only those shipped as JPEG files)."""
    d = _skimage_data_dir()
    names = [n for n in PHOTO_FILES if kind != "jpeg" or n.endswith(".jpg")]
    return [os.path.join(d, n) for n in names]


def _split(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _save(img: Image.Image, path: str, quality: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, "JPEG", quality=quality)


def prepare_digits(out: str, size: int = 64, val_fraction: float = 0.2, seed: int = 0, quality: int = 95) -> dict:
    """scikit-learn digits as an ImageFolder of ``size`` x ``size`` grey JPEGs; returns per-split counts."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the 'digits' data set needs scikit-learn: pip install fastkd[data]") from exc
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for c in range(10):
        members = np.flatnonzero(digits.target == c)
        train, val = _split(len(members), val_fraction, rng)
        for split, part in (("train", train), ("val", val)):
            for j in part:
                i = int(members[j])
                pixels = np.clip(digits.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC)
                _save(img, os.path.join(out, split, str(c), f"digit_{i:04d}.jpg"), quality)
                counts[split] += 1
    return counts


def _random_crop(img: Image.Image, rng: np.random.Generator, area=(0.1, 0.5), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    w, h = img.size
    for _ in range(20):
        a = rng.uniform(*area) * w * h
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((x, y, x + cw, y + ch))
    return img


def prepare_photos(
    out: str, size: int = 96, per_class: int = 60, val_fraction: float = 0.2, seed: int = 0, quality: int = 90
) -> dict:
    """Random crops of the scikit-image pictures, one class per picture, as ``size`` x ``size`` JPEGs."""
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for path in skimage_photo_paths():
        name = os.path.splitext(os.path.basename(path))[0]
        with Image.open(path) as im:
            photo = im.convert("RGB")
        train, val = _split(per_class, val_fraction, rng)
        for split, part in (("train", train), ("val", val)):
            for j in part:
                crop = _random_crop(photo, rng).resize((size, size), Image.Resampling.BICUBIC)
                _save(crop, os.path.join(out, split, name, f"{name}_{int(j):04d}.jpg"), quality)
                counts[split] += 1
    return counts


def make_jpeg_folder(
    out: str, num_images: int, width: int = 500, height: int = 375, quality: int = 90, seed: int = 0
) -> str:
    """An ImageFolder of ``num_images`` photo-sized JPEGs (crops of the scikit-image pictures resized to
    ``width`` x ``height``, ImageNet-like content and file sizes) for throughput measurements."""
    rng = np.random.default_rng(seed)
    photos = []
    for path in skimage_photo_paths():
        with Image.open(path) as im:
            photos.append((os.path.splitext(os.path.basename(path))[0], im.convert("RGB")))
    for i in range(num_images):
        name, photo = photos[i % len(photos)]
        crop = _random_crop(photo, rng, area=(0.3, 1.0)).resize((width, height), Image.Resampling.BICUBIC)
        _save(crop, os.path.join(out, name, f"{i:06d}.jpg"), quality)
    return out


def _splits(root: str):
    """(split, source) for the ImageFolder splits present under ``root``; val uses train's class index."""
    from fastkd.data.sources import open_folder

    classes = None
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            continue
        src = open_folder(folder, classes)
        classes = classes or src.classes
        yield split, src


def write_filelists(root: str) -> list[str]:
    """``<root>/{train,val}.txt`` listing the ImageFolder splits as ``<relative path> <label>``."""
    written = []
    for split, src in _splits(root):
        path = os.path.join(root, f"{split}.txt")
        with open(path, "w") as f:
            for name, label in zip(src.names, src.labels):
                f.write(f"{os.path.relpath(name, root)} {int(label)}\n")
        written.append(path)
    return written


def write_webdataset(root: str, out: str | None = None, shard_size: int = 1000) -> list[str]:
    """The ImageFolder splits under ``root`` as webdataset shards ``<out>/<split>/shard-NNNNNN.tar``
    (default ``out = <root>/wds``); each sample is ``<key>.jpg`` + ``<key>.cls``."""
    out = out or os.path.join(root, "wds")
    written = []
    for split, src in _splits(root):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for s, start in enumerate(range(0, len(src), shard_size)):
            path = os.path.join(out, split, f"shard-{s:06d}.tar")
            with tarfile.open(path, "w") as tf:
                for i in range(start, min(start + shard_size, len(src))):
                    key = f"{i:08d}"
                    ext = os.path.splitext(src.names[i])[1].lstrip(".").lower()
                    for member, payload in ((f"{key}.{ext}", src.read(i)), (f"{key}.cls", b"%d" % src.labels[i])):
                        info = tarfile.TarInfo(member)
                        info.size = len(payload)
                        tf.addfile(info, io.BytesIO(payload))
            written.append(path)
    return written
