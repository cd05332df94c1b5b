"""PIL/torchvision transforms of the torch backend, written to match the DALI graphs.

Geometry rules shared with DALI (checked by the tests): validation resizes the shorter side to
``floor(img_size / crop_pct)`` and the longer side to ``round_half_up(long * short_new / short)``;
the centre crop starts at ``round_half_up((size - crop) / 2)``. torchvision's ``Resize`` truncates
and its ``CenterCrop`` rounds half to even, which would shift the crop by a pixel against DALI.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import threading
import warnings

import numpy as np
import torch
from PIL import Image
from PIL import ImageOps

from fastkd.data.config import DataConfig
from fastkd.data.record import recorded_box

SOLARIZE_THRESHOLD = 128  # PIL's default: values >= 128 are inverted (BYOL's solarize)
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


_PIL_LIMIT_LOCK = threading.RLock()


@contextlib.contextmanager
def pil_size_limit_lifted():
    """PIL's own decompression-bomb limit off for the block (it also guards ``crop`` and ``resize``):
    ``DataConfig.max_image_pixels``, which both backends apply in :func:`open_image`, replaces it."""
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The encoded image ``data`` opened lazily by PIL (header read, pixels not yet decoded).

    PIL's own decompression-bomb limit is replaced by ``max_pixels`` (``DataConfig.max_image_pixels``;
    0 = none), which both backends apply, so that they accept the same files; a larger image raises
    ``ValueError`` naming the field.
    """
    with pil_size_limit_lifted():
        img = Image.open(io.BytesIO(data))
    if max_pixels and img.width * img.height > max_pixels:
        pixels = img.width * img.height
        img.close()
        raise ValueError(
            f"image of {img.width}x{img.height} = {pixels} pixels exceeds DataConfig.max_image_pixels={max_pixels}"
        )
    return img


def decode_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Decode to RGB with the EXIF orientation applied (as DALI's decoders do)."""
    with open_image(data, max_pixels) as img:
        rgb = img.convert("RGB")  # keeps the EXIF block in ``info``
    ImageOps.exif_transpose(rgb, in_place=True)
    return rgb


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None):
    """Seed torch's CPU generator (and the generator of ``device`` when it is a CUDA device), NumPy's
    and Python's global generators with ``seed`` (a sample's own seed) for the block, and give them
    back untouched afterwards. timm's RandAugment and RandomErasing draw from ``random`` and
    ``np.random`` (RandomErasing's noise from torch on its device), torchvision from torch."""
    cuda = device is not None and device.type == "cuda"
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def timm_rand_augment_config(cfg: DataConfig) -> str:
    """timm's RandAugment config string of ``cfg`` (DeiT: ``rand-n2-m9-mstd0.5-inc1``)."""
    return (
        f"rand-n{cfg.randaugment}-m{cfg.randaugment_magnitude:g}-mstd{cfg.randaugment_mstd:g}"
        f"-inc{int(cfg.randaugment_increasing)}"
    )


def timm_rand_augment_hparams(cfg: DataConfig) -> dict:
    """The hparams timm's ``create_transform`` gives RandAugment: translate limit, fill colour, resampling."""
    from timm.data.transforms import str_to_pil_interp

    return {
        "translate_const": int(cfg.img_size * 0.45),
        "img_mean": tuple(round(255 * m) for m in cfg.mean),
        "interpolation": str_to_pil_interp(cfg.interpolation),
    }


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's RandAugment ``posterize`` with 0 bits allowed: all values 0, a black image (the DALI graph's AND mask
    of 0). timm's ``PosterizeIncreasing`` keeps 0 bits at magnitude 10, which DeiT's magnitude noise reaches, and
    Pillow's ``ImageOps.posterize`` refuses 0 bits; 1..8 bits go to timm's own function."""
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return img.point([0] * (256 * len(img.getbands())))
    return posterize(img, bits_to_keep, **kwargs)


def _zero_bit_posterize(ra) -> None:
    """Swap :func:`posterize_any_bits` in for timm's ``posterize`` in the operations of timm's RandAugment ``ra``."""
    from timm.data.auto_augment import posterize

    for op in ra.ops:
        if op.aug_fn is posterize:
            op.aug_fn = posterize_any_bits


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


class _Noted:
    """A function of one of timm's RandAugment operations, noting in ``log[-1]`` that it ran (``aug_fn``) or the
    magnitude it got and the argument it returned (``level_fn``)."""

    def __init__(self, fn, log: list, kind: str) -> None:
        self.fn, self.log, self.kind = fn, log, kind

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        if self.kind == "aug":
            self.log[-1]["applied"] = True
        else:
            self.log[-1].update(mag=float(args[0]), arg=float(out[0]) if len(out) == 1 else math.nan)
        return out


class _NotedOp:
    """One of timm's RandAugment operations, run by timm's own code, noting what it drew in ``log``."""

    def __init__(self, op, index: int, log: list) -> None:
        self.op, self.index, self.log = op, index, log
        op.aug_fn = _Noted(op.aug_fn, log, "aug")
        if op.level_fn is not None:
            op.level_fn = _Noted(op.level_fn, log, "level")

    def __call__(self, img):
        self.log.append({"op": self.index})
        return self.op(img)

    def __getattr__(self, name: str):
        return getattr(self.op, name)

    def __repr__(self) -> str:
        return repr(self.op)


class TrainTransform:
    """Random-resized-crop, horizontal flip, optional RandAugment (timm's own transform, as timm's
    ``create_transform`` builds it), then the self-supervised view augmentation of view ``view``
    (torchvision's colour jitter, grayscale, Gaussian blur and solarize, see :class:`DataConfig`);
    uint8 CHW tensor out. Run it inside :func:`seeded`.

    :meth:`draw` also returns what was drawn (:mod:`fastkd.data.record`): the crop window, the flip and each
    RandAugment operation with its magnitude and argument (the view augmentation's draws are not recorded)."""

    def __init__(self, cfg: DataConfig, view: int = 0) -> None:
        from torchvision import transforms as T
        from torchvision.transforms import InterpolationMode

        interp = InterpolationMode.BILINEAR if cfg.interpolation == "bilinear" else InterpolationMode.BICUBIC
        self.crop = T.RandomResizedCrop(cfg.img_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                        interpolation=interp)
        steps = [self.crop]
        self.hflip = cfg.hflip
        if cfg.hflip > 0:
            steps.append(T.RandomHorizontalFlip(cfg.hflip))
        self.rand_augment = None
        self._ra_log: list[dict] = []
        if cfg.randaugment > 0:
            from timm.data.auto_augment import rand_augment_transform

            ra = rand_augment_transform(timm_rand_augment_config(cfg), timm_rand_augment_hparams(cfg))
            _zero_bit_posterize(ra)
            ra.ops = [_NotedOp(op, k, self._ra_log) for k, op in enumerate(ra.ops)]
            self.rand_augment = ra
            steps.append(ra)
        # the colour operations and the symmetric blur commute with the flip: after it, as in the DALI graph
        views = []
        if any(cfg.color_jitter) and cfg.color_jitter_p > 0:
            views.append(T.RandomApply([T.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p))
        if cfg.grayscale > 0:
            views.append(T.RandomGrayscale(cfg.grayscale))
        blur = cfg.view_probability("gaussian_blur", view)
        if blur > 0:
            views.append(T.RandomApply([T.GaussianBlur(cfg.blur_kernel_size, sigma=tuple(cfg.blur_sigma))], p=blur))
        solarize = cfg.view_probability("solarize", view)
        if solarize > 0:
            views.append(T.RandomSolarize(SOLARIZE_THRESHOLD, p=solarize))
        self.view_steps = views
        self.transform = T.Compose(steps + views)  # the steps as torchvision and timm build them; :meth:`draw` runs them

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.draw(img)[0]

    def draw(self, img: Image.Image) -> tuple[torch.Tensor, dict]:
        """The view and its draws ``{"crop": (left, top, width, height), "flip": bool, "ra": [(op, magnitude,
        argument), ...]}``; the same random calls, in the same order, as torchvision's ``RandomResizedCrop`` and
        ``RandomHorizontalFlip`` and timm's RandAugment."""
        from torchvision.transforms import functional as F

        c = self.crop
        top, left, h, w = c.get_params(img, c.scale, c.ratio)
        img = F.resized_crop(img, top, left, h, w, c.size, c.interpolation, antialias=c.antialias)
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        if flip:
            img = F.hflip(img)
        drawn: dict = {"crop": (left, top, w, h), "flip": flip}
        if self.rand_augment is not None:
            self._ra_log.clear()
            img = self.rand_augment(img)
            drawn["ra"] = [(e["op"], e.get("mag", math.nan), e.get("arg", math.nan)) if e.get("applied")
                           else (-1, math.nan, math.nan) for e in self._ra_log]
        for step in self.view_steps:
            img = step(img)
        return to_chw_uint8(img), drawn

    def replay(self, img: Image.Image, crop, flip: bool, ra_op=(), ra_arg=()) -> torch.Tensor:
        """The view of recorded draws (:mod:`fastkd.data.record`), drawing nothing: the crop window ``crop`` (left,
        top, width, height) resized as ``RandomResizedCrop`` does, the flip, and RandAugment's operations ``ra_op``
        (indices into its operation list; -1: not applied) run by timm's operation functions with the recorded
        arguments ``ra_arg``. Equals :meth:`draw`'s view for its own draws."""
        from torchvision.transforms import functional as F

        if self.view_steps:
            raise ValueError("TrainTransform.replay: the self-supervised view augmentation (colour jitter, grayscale, "
                             "blur, solarize) is not recorded and cannot be replayed")
        left, top, w, h = recorded_box(crop, img.height, img.width, "crop window")
        c = self.crop
        img = F.resized_crop(img, top, left, h, w, c.size, c.interpolation, antialias=c.antialias)
        if flip:
            img = F.hflip(img)
        for op, arg in zip(np.asarray(ra_op).tolist(), np.asarray(ra_arg).tolist()):
            if op >= 0:
                img = self._replay_op(img, int(op), arg)
        return to_chw_uint8(img)

    def _replay_op(self, img: Image.Image, index: int, arg: float) -> Image.Image:
        """RandAugment operation ``index`` (timm's own function) applied with the recorded argument ``arg``."""
        ops = self.rand_augment.ops if self.rand_augment is not None else []
        if not 0 <= index < len(ops):
            raise ValueError(f"recorded RandAugment operation {index} is not one of this policy's {len(ops)}")
        op = ops[index].op  # timm's AugmentOp (its functions wrapped by _Noted)
        fn = op.aug_fn.fn if isinstance(op.aug_fn, _Noted) else op.aug_fn
        if op.level_fn is None:
            return fn(img, **op.kwargs)
        if math.isnan(arg):
            raise ValueError(f"recorded RandAugment operation {op.name} has no argument")
        # timm's level functions give these operations an int (bits, threshold, addend), the others a float
        level = int(arg) if op.name.startswith(("Posterize", "Solarize")) else arg
        return fn(img, level, **op.kwargs)


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
