"""The DALI backend.

Graph (training): encoded bytes -> decode fused with the random-resized-crop (``decoders.image_slice``:
only the crop window is decoded; "mixed" = nvJPEG on the GPU) -> resize to ``img_size`` -> optional
RandAugment (timm's ``rand-m9-mstd0.5-inc1`` policy built from ``nvidia.dali.auto_aug`` blocks) -> flip + normalise +
HWC->CHW + cast (``crop_mirror_normalize``), with the self-supervised view augmentation (colour jitter,
grayscale, blur, solarize) before the last step. Multi-view mode decodes once and cuts ``num_views``
windows. Validation: decode -> resize shorter side -> centre crop + normalise. Without a GPU the
identical graph runs with CPU operators (``device_id=None``).

Randomness: the graph holds no random operator. Every random choice (crop window, flip, RandAugment
operations and signs) is drawn in Python from the sample's own generator, seeded by
:func:`fastkd.data.sharding.sample_seeds` ``(seed, epoch, data set index)``, and fed to the graph next
to the encoded bytes. A DALI random operator instead keeps one state per slot of the batch, carried
from batch to batch, so a resumed run (or a rebuilt pipeline) would draw different augmentations.

Replay (``loader.replay``, the teacher cache): the same inputs are made from the recorded view parameters instead
of drawn (:meth:`DaliLoader.replay_inputs`): the decoder cuts the recorded crop windows, the mirror flags and
RandAugment choices are the recorded ones.

Input: the pipeline reads from ``fn.external_source``, fed by this rank's shard of the epoch plan
(:mod:`fastkd.data.sharding`); the bytes are read by a thread pool one batch ahead. DALI's own file
reader cannot start an epoch at an arbitrary position, nor leave out a file after a decode error, so
the sharded reading is done here: the sample order is then identical to the torch backend's and a
resumed run reads exactly the samples it has not seen.

Corrupt files: obviously broken files (empty, unknown format, truncated JPEG/PNG) are caught before
DALI sees them. A file that still makes the decoder fail raises inside the pipeline; the loader
then probes each sample of the batches in flight with a one-image CPU decode, records the bad ones,
rebuilds the pipeline and feeds those batches again without them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import weakref
from typing import Any

import numpy as np
import torch

from fastkd.data.config import DataConfig
from fastkd.data.loader import BaseLoader
from fastkd.data.record import recorded_box
from fastkd.data.transforms import SOLARIZE_THRESHOLD
from fastkd.data.transforms import open_image
from fastkd.data.transforms import random_resized_crop_box


def view_input_count(cfg: DataConfig) -> int:
    """Inputs per view of the training graph: crop anchor (x, y), crop size (w, h), mirror flag, with
    RandAugment its draws (3 * randaugment values, see :func:`draw_rand_augment`), and with the
    self-supervised view augmentation its draws (see :func:`draw_view_colour`)."""
    return 3 + (cfg.randaugment > 0) + view_colour_on(cfg)


def view_colour_on(cfg: DataConfig) -> bool:
    """Whether any self-supervised view augmentation (colour jitter, grayscale, blur, solarize) is on."""
    jitter = any(cfg.color_jitter) and cfg.color_jitter_p > 0
    return bool(jitter or cfg.grayscale > 0 or max(cfg.gaussian_blur) > 0 or max(cfg.solarize) > 0)


def _dali():
    try:
        import nvidia.dali as dali
    except ImportError as exc:  # pragma: no cover - exercised where DALI is missing
        raise ImportError(
            "DataConfig.backend='dali' needs NVIDIA DALI: pip install fastkd[dali] (or use backend='torch'/'auto')"
        ) from exc
    return dali


def build_pipeline(
    cfg: DataConfig,
    split: str,
    source_fn,
    *,
    batch_size: int,
    device_id: int | None,
    seed: int,
    num_threads: int | None = None,
):
    """The DALI pipeline of ``split``, fed by ``source_fn`` (a callable raising StopIteration at the end
    of an epoch). Built and ready to run.

    ``source_fn`` returns a batch: for validation a list of uint8 arrays of encoded images; for training
    a tuple of ``1 + view_input_count(cfg) * num_views`` lists: the encoded images, then for each view
    the int32 crop anchor ``(x, y)``, crop size ``(w, h)``, mirror flag, and (with RandAugment) its
    draws (see :meth:`DaliLoader.view_inputs`).

    ``device_id=None`` builds the CPU graph; an integer builds the GPU graph, which fails with a clear
    error where CUDA is missing.
    """
    _dali()
    from nvidia.dali import fn
    from nvidia.dali import pipeline_def
    from nvidia.dali import types

    gpu = device_id is not None
    train = split == "train"
    num_views = cfg.num_views if train else 1
    decode_device = "mixed" if gpu else "cpu"
    interp = types.INTERP_LINEAR if cfg.interpolation == "bilinear" else types.INTERP_CUBIC
    out_dtype = types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT
    mean = [255.0 * m for m in cfg.mean]
    std = [255.0 * s for s in cfg.std]
    size = cfg.img_size
    decoder_kw: dict[str, Any] = {"output_type": types.RGB}
    if gpu:
        # ImageNet-sized buffers, so nvJPEG does not reallocate during the first epochs
        decoder_kw.update(device_memory_padding=211025920, host_memory_padding=140544512)
        decoder_kw["hw_decoder_load"] = cfg.hw_decoder_load

    @pipeline_def(enable_conditionals=train and (cfg.randaugment > 0 or view_colour_on(cfg)))
    def graph():
        if not train:
            encoded = fn.external_source(source=source_fn, batch=True, dtype=types.UINT8, ndim=1, name="encoded")
            img = fn.decoders.image(encoded, device=decode_device, **decoder_kw)
            img = fn.resize(img, resize_shorter=cfg.resize_size(), interp_type=interp, antialias=True)
            return fn.crop_mirror_normalize(
                img,
                crop=(size, size),
                crop_pos_x=0.5,
                crop_pos_y=0.5,
                mean=mean,
                std=std,
                dtype=out_dtype,
                output_layout="CHW",
            )
        per_view = view_input_count(cfg)
        n_in = 1 + per_view * num_views
        view_dtypes = [types.INT32] * (per_view - 1) + [types.FLOAT if view_colour_on(cfg) else types.INT32]
        encoded, *params = fn.external_source(
            source=source_fn, batch=True, num_outputs=n_in, dtype=[types.UINT8] + view_dtypes * num_views
        )
        slice_kw = dict(axis_names="WH")
        if num_views == 1:
            windows = [
                fn.decoders.image_slice(encoded, params[0], params[1], device=decode_device, **slice_kw, **decoder_kw)
            ]
        else:
            img = fn.decoders.image(encoded, device=decode_device, **decoder_kw)
            windows = [
                fn.slice(img, params[per_view * v], params[per_view * v + 1], **slice_kw) for v in range(num_views)
            ]
        outs = []
        for v, window in enumerate(windows):
            view = fn.resize(window, resize_x=size, resize_y=size, interp_type=interp, antialias=True)
            if cfg.randaugment > 0:
                view = _rand_augment(view, params[per_view * v + 3], cfg)
            if view_colour_on(cfg):
                view = _view_colour(view, params[per_view * v + per_view - 1], cfg, v)
            outs.append(
                fn.crop_mirror_normalize(
                    view, mirror=params[per_view * v + 2], mean=mean, std=std, dtype=out_dtype, output_layout="CHW"
                )
            )
        return tuple(outs)

    pipe = graph(
        batch_size=batch_size,
        num_threads=max(1, num_threads if num_threads is not None else cfg.num_workers),
        device_id=device_id,
        seed=seed & 0x7FFFFFFF,
        prefetch_queue_depth=cfg.prefetch,
    )
    try:
        pipe.build()
    except RuntimeError as exc:
        if gpu and ("CUDA" in str(exc) or "cuda" in str(exc)):
            raise RuntimeError(
                f"DALI GPU pipeline (device_id={device_id}) cannot start: CUDA is not available here. "
                "Build it with device_id=None (DataConfig.device='cpu') to run the same graph on the CPU."
            ) from exc
        raise
    return pipe


RA_BINS = 101  # magnitude grid of the DALI lookup tables: timm's 0..10 scale in steps of 0.1


def _posterize_mask(bits: int) -> np.ndarray:
    """The AND mask that keeps the ``bits`` most significant bits (PIL ``posterize``; 8 or more: all)."""
    bits = min(8, max(0, int(bits)))
    return np.array((0xFF << (8 - bits)) & 0xFF, dtype=np.uint8)


def rand_augment_suite(cfg: DataConfig):
    """timm's RandAugment operations (``rand_augment_choices``: the ``inc1`` or ``inc0`` set, in timm's
    order) as ``nvidia.dali.auto_aug`` augmentations, followed by ``identity`` (an operation that its
    coin flip did not apply). Magnitudes are timm's 0..10 scale (``mag_range=(0, 10)``) and each
    ``mag_to_param`` is timm's level-to-argument rule (``timm.data.auto_augment.LEVEL_TO_ARG``), so a
    magnitude bin and a sign give the argument timm would use.

    Differences left: the geometric operations resample bilinearly and fill with one grey value (DALI
    fills every channel alike; timm fills with the per-channel mean), ``Equalize`` follows OpenCV's rounding, ``Color``
    is DALI's saturation and sharpness leaves a one-pixel border unfiltered.
    """
    from nvidia.dali.auto_aug import augmentations as a

    size = cfg.img_size
    inc = cfg.randaugment_increasing

    def level(m) -> float:  # the table's magnitudes are linspace(0, 10, RA_BINS): undo float noise
        return round(float(m), 6) / 10.0

    def enhance(m):
        if inc:  # 1 +- 0.9 level, kept >= 0.1 (the sign is already in m)
            return np.float32(max(0.1, 1.0 + 0.9 * level(m)))
        return np.float32(1.8 * level(m) + 0.1)

    def sharpen(m):  # PIL: factor * img + (1 - factor) * smooth
        return a.sharpness_kernel(float(enhance(m)) - 1.0)

    def posterize(m):
        bits = int(level(m) * 4)
        return _posterize_mask(4 - bits if inc else bits)

    def solarize(m):
        thresh = min(256, int(level(m) * 256))
        return np.float32(256 - thresh if inc else thresh)

    enhance_kw = dict(mag_range=(0, 10), randomly_negate=inc, mag_to_param=enhance)
    ops = [
        a.auto_contrast,
        a.equalize,
        a.invert,
        a.rotate.augmentation(
            mag_range=(0, 10), randomly_negate=True, mag_to_param=lambda m: np.float32(30 * level(m))
        ),
        a.posterize.augmentation(mag_range=(0, 10), randomly_negate=False, mag_to_param=posterize),
        a.solarize.augmentation(mag_range=(0, 10), randomly_negate=False, mag_to_param=solarize),
        a.solarize_add.augmentation(
            mag_range=(0, 10), randomly_negate=False, mag_to_param=lambda m: np.uint8(min(128, int(level(m) * 110)))
        ),
        a.color.augmentation(**enhance_kw),
        a.contrast.augmentation(**enhance_kw),
        a.brightness.augmentation(**enhance_kw),
        a.sharpness.augmentation(mag_range=(0, 10), randomly_negate=inc, mag_to_param=sharpen),
        a.shear_x.augmentation(mag_range=(0, 10), randomly_negate=True, mag_to_param=lambda m: [0.3 * level(m), 0]),
        a.shear_y.augmentation(mag_range=(0, 10), randomly_negate=True, mag_to_param=lambda m: [0, 0.3 * level(m)]),
        a.translate_x_no_shape.augmentation(
            mag_range=(0, 10), randomly_negate=True, mag_to_param=lambda m: [0.45 * level(m) * size, 0]
        ),
        a.translate_y_no_shape.augmentation(
            mag_range=(0, 10), randomly_negate=True, mag_to_param=lambda m: [0, 0.45 * level(m) * size]
        ),
    ]
    cls = _numpy_param_augmentation()
    return [op.augmentation(augmentation_cls=cls) for op in ops] + [a.identity]


@functools.cache
def _numpy_param_augmentation():
    """``auto_aug``'s Augmentation whose parameter tables (plain NumPy: ``mag_to_param`` over every magnitude bin)
    are computed without DALI's AutoGraph, which the conditionals switch on for the whole graph: converting
    those thousands of NumPy calls made each RandAugment pipeline build take about four times longer."""
    from nvidia.dali.auto_aug.core._augmentation import Augmentation
    from nvidia.dali.pipeline import do_not_convert

    class NumpyParamAugmentation(Augmentation):
        _map_mag_to_param = do_not_convert(Augmentation._map_mag_to_param)
        _map_mags_to_params = do_not_convert(Augmentation._map_mags_to_params)

    return NumpyParamAugmentation


def draw_rand_augment(rng: np.random.Generator, cfg: DataConfig, num_ops: int) -> np.ndarray:
    """One view's RandAugment draws, as timm makes them: ``n`` operations uniformly with replacement,
    each applied with probability 0.5, its magnitude ``Normal(M, mstd)`` clipped to [0, 10], its
    sign a fair coin. Returns ``n`` operation indices (``num_ops`` = not applied), ``n`` magnitude
    bins of :data:`RA_BINS` and ``n`` sign bits."""
    n = cfg.randaugment
    ops = rng.integers(0, num_ops, n)
    applied = rng.random(n) < 0.5
    mags = np.full(n, float(cfg.randaugment_magnitude))
    if cfg.randaugment_mstd > 0:
        mags = rng.normal(mags, cfg.randaugment_mstd)
    bins = np.rint(np.clip(mags, 0.0, 10.0) * (RA_BINS - 1) / 10.0)
    signs = rng.integers(0, 2, n)
    return np.concatenate([np.where(applied, ops, num_ops), bins, signs]).astype(np.int32)


def _rand_augment(view, ra, cfg: DataConfig):
    """timm's RandAugment on a DALI batch, with the operations, magnitude bins and signs read from
    ``ra`` (see :func:`draw_rand_augment`) instead of drawn by DALI random operators. The geometric
    operations resample bilinearly (DALI's warps offer no bicubic; timm uses ``interpolation``)."""
    from nvidia.dali import types
    from nvidia.dali.auto_aug.core import select
    from nvidia.dali.auto_aug.core import signed_bin

    suite = rand_augment_suite(cfg)
    n = cfg.randaugment
    fill = round(255 * sum(cfg.mean) / 3)
    for k in range(n):
        magnitude = signed_bin(ra[n + k], random_sign=ra[2 * n + k])
        view = select(
            suite, ra[k], data=view, magnitude_bin=magnitude, num_magnitude_bins=RA_BINS, fill_value=fill,
            interp_type=types.INTERP_LINEAR,
        )
    return view


# the draws of one view's self-supervised augmentation, in the order of the float32 vector fed to the graph
VIEW_COLOUR_FIELDS = ("jitter", "order0", "order1", "order2", "order3", "brightness", "contrast", "saturation",
                      "hue", "grayscale", "blur_sigma", "solarize")


def draw_view_colour(rng: np.random.Generator, cfg: DataConfig, view: int) -> np.ndarray:
    """One view's self-supervised augmentation draws, as torchvision's transforms make them (see
    :data:`VIEW_COLOUR_FIELDS`): whether the colour jitter applies (``color_jitter_p``), the order of its four
    operations (a permutation), brightness / contrast / saturation factors uniform in ``[max(0, 1 - x), 1 + x]``,
    the hue shift uniform in ``[-x, x]`` turns (identity values where a strength is 0), grayscale (0/1), the
    blur sigma (0 = no blur) and solarize (0/1). Every value is drawn whether it is used or not, so the stream
    of draws does not depend on earlier outcomes."""
    b, c, s, h = cfg.color_jitter
    jitter = any(cfg.color_jitter) and rng.random() < cfg.color_jitter_p
    order = rng.permutation(4)
    factors = [rng.uniform(max(0.0, 1 - x), 1 + x) if x > 0 else 1.0 for x in (b, c, s)]
    hue = rng.uniform(-h, h) if h > 0 else 0.0
    gray = rng.random() < cfg.grayscale
    blur = rng.random() < cfg.view_probability("gaussian_blur", view)
    sigma = rng.uniform(*cfg.blur_sigma)
    solarize = rng.random() < cfg.view_probability("solarize", view)
    return np.array([jitter, *order, *factors, hue, gray, sigma if blur else 0.0, solarize], dtype=np.float32)


def _view_colour(view, draws, cfg: DataConfig, index: int):
    """The self-supervised view augmentation of view ``index`` on a DALI batch of uint8 HWC images, with every
    choice read from ``draws`` (see :func:`draw_view_colour`): colour jitter (its four operations in the drawn
    order; contrast blends with the grey mean as PIL does: ``auto_aug``'s ``contrast``), grayscale, Gaussian
    blur, solarize at 128; the hue shift is PIL's 8-bit HSV one (:func:`_hsv_hue_shift`)."""
    from nvidia.dali import fn
    from nvidia.dali import types
    from nvidia.dali.auto_aug import augmentations as a

    if any(cfg.color_jitter) and cfg.color_jitter_p > 0:
        if draws[0] > 0.5:
            if cfg.color_jitter[3] > 0:
                # one instance of the hue shift (by far the largest subgraph) between the operations drawn before
                # it and those drawn after it, rather than one at each of the four positions
                hue_at = (draws[2] > 2.5) * 1 + (draws[3] > 2.5) * 2 + (draws[4] > 2.5) * 3
                for k in range(3):
                    if hue_at > k:
                        view = _jitter_op(view, draws, k)
                view = _hue_shift_op()(view, draws[8])
                for k in range(1, 4):
                    if hue_at < k:
                        view = _jitter_op(view, draws, k)
            else:  # as torchvision: no hue strength, no hue operation (its HSV round trip is not lossless)
                for k in range(4):
                    view = _jitter_op(view, draws, k)
    if cfg.grayscale > 0:
        if draws[9] > 0.5:
            gray = fn.color_space_conversion(view, image_type=types.RGB, output_type=types.GRAY)
            view = fn.cat(gray, gray, gray, axis=2)
    if cfg.view_probability("gaussian_blur", index) > 0:
        if draws[10] > 0:
            view = fn.gaussian_blur(view, sigma=draws[10], window_size=cfg.blur_kernel_size)
    if cfg.view_probability("solarize", index) > 0:
        if draws[11] > 0.5:
            view = a.solarize.op(view, types.Constant(SOLARIZE_THRESHOLD, dtype=types.UINT8))
    return view


def _jitter_op(view, draws, k: int):
    """The colour jitter's brightness, contrast or saturation if it is the operation drawn at position ``k``
    (``draws[1 + k]``: 0, 1, 2; 3, the hue, is not done here)."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as a

    op = draws[1 + k]
    if op < 0.5:
        view = fn.brightness(view, brightness=draws[5])
    elif op < 1.5:
        view = a.contrast.op(view, draws[6])
    elif op < 2.5:
        view = fn.saturation(view, saturation=draws[7])
    return view


@functools.cache
def _hue_shift_op():
    """:func:`_hsv_hue_shift` kept out of DALI's AutoGraph (it has no conditionals): converting its arithmetic
    made a two-view BYOL graph take about 4.7 s instead of 3.8 s to build (CPU)."""
    from nvidia.dali.pipeline import do_not_convert

    return do_not_convert(_hsv_hue_shift)


def _hsv_hue_shift(view, hue):
    """torchvision's ``adjust_hue`` on a PIL image, on a DALI batch of uint8 RGB HWC images (CPU or GPU), written
    in DALI arithmetic; ``hue``: the per-sample shift in turns, in [-0.5, 0.5].

    torchvision converts the image to PIL's 8-bit HSV, adds ``int(255 * hue)`` to the uint8 hue channel (wrapping
    modulo 256) and converts back, both conversions PIL's (``Convert.c``). RGB -> HSV: ``v = max``,
    ``s = int(255 * chroma / v)``, hue from the channel holding the maximum, ``int(255 * (h / 6 + 1 mod 1))``.
    HSV -> RGB: sector ``i = floor(6 h / 255)``, fraction ``f``, channels ``v``, ``p = v (1 - s)``,
    ``q = v (1 - s f)``, ``t = v (1 - s (1 - f))`` rounded half up. The hue byte is PIL's own only if its float
    steps are (one hue byte more moves an output value by up to 6 levels): the hue in sixths and its fraction of a
    turn are computed here in PIL's float32 / float64 steps; every other step is float32, which gives PIL's bytes
    for all 2^24 colours (and PIL's RGB for all 2^24 HSV triples). DALI's own ``hue`` operator rotates the chroma
    in YIQ space instead."""
    from nvidia.dali import fn
    from nvidia.dali import math as dmath
    from nvidia.dali import types

    def f32(x):
        return fn.cast(x, dtype=types.FLOAT)

    def f64(x):
        return fn.cast(x, dtype=types.FLOAT64)

    x = f32(view)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    v = dmath.max(r, dmath.max(g, b))
    chroma = v - dmath.min(r, dmath.min(g, b))
    grey = chroma == 0  # hue and saturation 0; the divisions below then divide 0 by 1
    c = chroma + grey
    # which channel holds the maximum (red first, then green, as PIL tests them)
    at_r, at_g = r == v, (g == v) & (r != v)
    at_b = (r != v) & (g != v)
    # PIL's hue in sixths, base + (v - xa) / c - (v - xb) / c: red 0 + bc - gc, green 2 + rc - bc, blue 4 + gc - rc;
    # the quotients in float32, their sum exact in float64, rounded once to float32
    xa = b * at_r + r * at_g + g * at_b
    xb = g * at_r + b * at_g + r * at_b
    h6 = f32(f64((v - xa) / c) - f64((v - xb) / c) + (2.0 * at_g + 4.0 * at_b))
    turns = f64(h6) / 6.0 + 1.0
    turns = f32(turns - (turns >= 1.0))  # fmod(., 1) in float64, then float32
    hue_byte = dmath.floor(turns * 255.0)
    # PIL: int(255 * float32(chroma / v)), which is floor(255 chroma / v) for every 8-bit colour: a quotient of
    # integers <= 65025 is an integer or at least 1/255 away from one
    sat_byte = dmath.floor(chroma * 255.0 / (v + grey))
    # torchvision: int(255 * hue), truncated towards 0 (per sample), added to the uint8 channel modulo 256
    scaled = f64(hue) * 255.0
    shift = dmath.floor(dmath.abs(scaled)) * (1.0 - 2.0 * (scaled < 0))
    shift = f32(shift + 256.0 * (shift < 0))
    hue_byte = hue_byte + shift
    hue_byte = hue_byte - 256.0 * (hue_byte >= 256)
    sector6 = hue_byte * 6.0 / 255.0
    i = dmath.floor(sector6)
    frac = sector6 - i
    fs = sat_byte / 255.0
    p = dmath.floor(v * (1.0 - fs) + 0.5)
    q = dmath.floor(v * (1.0 - fs * frac) + 0.5)
    t = dmath.floor(v * (1.0 - fs * (1.0 - frac)) + 0.5)
    s0, s1, s2, s3, s4, s5 = ((i == 0) | (i == 6)), i == 1, i == 2, i == 3, i == 4, i == 5
    red = v * (s0 | s5) + q * s1 + p * (s2 | s3) + t * s4
    green = t * s0 + v * (s1 | s2) + q * s3 + p * (s4 | s5)
    blue = p * (s0 | s1) + t * s2 + v * (s3 | s4) + q * s5
    return fn.cast(fn.stack(red, green, blue, axis=2, axis_name="C"), dtype=types.UINT8)


class _Feeder:
    """The ``external_source`` callable: hands DALI one batch of encoded images per call, reading the
    next batch in the background, and remembers what is in flight (for labels and error recovery)."""

    def __init__(self, loader: DaliLoader) -> None:
        self._loader = weakref.ref(loader)  # the pipeline holds the feeder: no cycle back to the loader
        self.queue: collections.deque = collections.deque()
        self.in_flight: collections.deque = collections.deque()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, loader.cfg.num_workers) + 1)
        self._ahead: tuple[Any, concurrent.futures.Future] | None = None

    def start(self, chunks) -> None:
        self.queue = collections.deque(chunks)
        self.in_flight.clear()
        self._ahead = None

    def __call__(self):
        if not self.queue:
            raise StopIteration
        chunk = self.queue.popleft()
        if self._ahead is not None and self._ahead[0] is chunk:
            items = self._ahead[1].result()
        else:
            items = self._loader().read_chunk(chunk, self._pool)
        self._ahead = None
        if self.queue:
            nxt = self.queue[0]
            self._ahead = (nxt, self._pool.submit(self._loader().read_chunk, nxt, self._pool))
        self.in_flight.append((chunk, items))
        encoded = [np.frombuffer(item[2], dtype=np.uint8) for item in items]
        if not self._loader().train:
            return encoded
        return (encoded, *([item[3][k] for item in items] for k in range(len(items[0][3]))))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _oriented_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(height, width) of an encoded image as DALI decodes it (EXIF orientation applied); headers only.
    Raises ValueError for an image over ``max_pixels`` (``DataConfig.max_image_pixels``)."""
    with open_image(data, max_pixels) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


class DaliLoader(BaseLoader):
    backend = "dali"

    def __init__(self, cfg, split, rank, world_size, source) -> None:
        _dali()
        super().__init__(cfg, split, rank, world_size, source)
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self._feeder = _Feeder(self)
        self._pipe = None
        self._state = "dirty"  # fresh: nothing in flight | drain: only the end signal left | dirty: rebuild
        self._builds = 0
        self._probe_pipe = None
        self._num_ops = len(rand_augment_suite(cfg)) - 1 if self.train and cfg.randaugment > 0 else 0

    # -- input side ---------------------------------------------------------------------------------

    def read_chunk(self, chunk, pool) -> list[tuple[int, bool, bytes, list[np.ndarray], int]]:
        """``(index used, is_pad, bytes, view inputs, augmentation seed)`` of a batch, corrupt samples skipped or
        replaced.
        A replacement is augmented with the seed of the slot it fills. Replaying (a fourth element in ``chunk``):
        the recorded samples with their recorded view inputs (and their records last in each entry)."""
        if len(chunk) == 4:
            return self._read_replayed(chunk[3], pool)
        idx, pad, seeds = chunk
        reads = list(pool.map(self.read_checked, idx.tolist())) if len(idx) > 1 else [self.read_checked(int(idx[0]))]
        items = []
        for i, p, seed, (data, problem) in zip(idx.tolist(), pad.tolist(), seeds.tolist(), reads):
            if data is not None and i not in self.corrupt:
                items.append(self._item(i, p, data, seed))
                continue
            self.record_bad(i, problem or self.corrupt.get(i, "corrupt"))
            if self.cfg.corrupt == "replace":
                rep = self._replacement(i)
                if rep is not None:
                    items.append(self._item(rep[0], p, rep[1], seed))
        items = [it for it in items if it is not None]
        if not items:  # never feed an empty batch: the first sample's replacement stands in
            rep = self._replacement(int(idx[0]))
            item = None if rep is None else self._item(rep[0], bool(pad[0]), rep[1], int(seeds[0]))
            if item is None:
                raise RuntimeError(f"no readable image near data set index {int(idx[0])}")
            items.append(item)
        return items

    def _item(self, index: int, is_pad: bool, data: bytes, seed: int):
        """The feeder's entry of a sample; None (recorded as corrupt) when its header cannot be parsed
        or the image is larger than ``max_image_pixels``."""
        try:
            height, width = _oriented_size(data, self.cfg.max_image_pixels)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad headers
            self.record_bad(index, f"decode failed: {type(exc).__name__}: {exc}")
            return None
        if not self.train:
            return index, is_pad, data, [], seed
        return index, is_pad, data, self.view_inputs(np.random.default_rng(seed), height, width), seed

    def _read_replayed(self, rows_of, pool) -> list[tuple]:
        rows = rows_of()
        index = rows["index"].tolist()
        reads = list(pool.map(self.read_checked, index)) if len(index) > 1 else [self.read_checked(index[0])]
        items = []
        for k, (row, i, (data, problem)) in enumerate(zip(rows, index, reads)):
            where = rows_of.where(k)
            if data is None or i in self.corrupt:
                raise RuntimeError(f"replay: sample {i} ({self.source.describe(i)}), recorded at {where}, cannot be "
                                   f"read now: {problem or self.corrupt.get(i)}")
            height, width = _oriented_size(data, self.cfg.max_image_pixels)
            try:
                inputs = self.replay_inputs(row["params"], height, width)
            except ValueError as exc:
                raise ValueError(f"replay of sample {i} at {where}: {exc}") from None
            items.append((i, bool(row["pad"]), data, inputs, 0, row["params"]))
        return items

    def replay_inputs(self, params, height: int, width: int) -> list[np.ndarray]:
        """:meth:`view_inputs` made from a sample's recorded view parameters (:mod:`fastkd.data.record`), drawing
        nothing: per view the crop window, the mirror flag and the RandAugment operations, magnitude bins and signs."""
        cfg = self.cfg
        if view_colour_on(cfg):
            raise ValueError("the self-supervised view augmentation (colour jitter, grayscale, blur, solarize) is not "
                             "recorded and cannot be replayed")
        out = []
        for v in range(self.num_views):
            left, top, w, h = recorded_box(params["crop"][v], height, width, "crop window")
            out += [np.array([left, top], dtype=np.int32), np.array([w, h], dtype=np.int32),
                    np.array(bool(params["flip"][v]), dtype=np.int32)]
            if cfg.randaugment > 0:
                ops = params["ra_op"][v].astype(np.int64)
                if (ops >= self._num_ops).any():
                    raise ValueError(f"recorded RandAugment operations {ops.tolist()}: this policy has "
                                     f"{self._num_ops}")
                bins = np.rint(np.nan_to_num(params["ra_mag"][v].astype(np.float64)) * (RA_BINS - 1) / 10.0)
                signs = np.nan_to_num(params["ra_arg"][v].astype(np.float64))
                out.append(np.concatenate([np.where(ops >= 0, ops, self._num_ops), bins, signs]).astype(np.int32))
        return out

    def view_inputs(self, rng: np.random.Generator, height: int, width: int) -> list[np.ndarray]:
        """The random choices of one sample, per view: crop anchor, crop size, mirror, RandAugment, view colour."""
        cfg = self.cfg
        out = []
        for v in range(self.num_views):
            left, top, w, h = random_resized_crop_box(rng, height, width, cfg.scale, cfg.ratio)
            mirror = rng.random() < cfg.hflip
            out += [
                np.array([left, top], dtype=np.int32),
                np.array([w, h], dtype=np.int32),
                np.array(mirror, dtype=np.int32),
            ]
            if cfg.randaugment > 0:
                out.append(draw_rand_augment(rng, cfg, self._num_ops))
            if view_colour_on(cfg):
                out.append(draw_view_colour(rng, cfg, v))
        return out

    def view_draws(self, inputs: list[np.ndarray]) -> list[dict]:
        """:meth:`view_inputs` of a sample as :mod:`fastkd.data.record` describes views: per view the crop window,
        the flip and the RandAugment operations (-1: not applied) with their magnitude bins (as magnitudes) and
        sign bits."""
        per = view_input_count(self.cfg)
        out = []
        for v in range(0, len(inputs), per):
            (left, top), (w, h), mirror = inputs[v], inputs[v + 1], inputs[v + 2]
            d = {"crop": (int(left), int(top), int(w), int(h)), "flip": bool(mirror)}
            if per == 4:
                n = self.cfg.randaugment
                ra = inputs[v + 3]
                d["ra"] = [(int(ra[k]), ra[n + k] * 10.0 / (RA_BINS - 1), float(ra[2 * n + k]))
                           if ra[k] < self._num_ops else (-1, np.nan, np.nan) for k in range(n)]
            out.append(d)
        return out

    def _replacement(self, index: int) -> tuple[int, bytes] | None:
        for cand in self.replacement_candidates(index):
            if cand in self.corrupt:
                continue
            data, problem = self.read_checked(cand)
            if data is not None:
                return cand, data
            self.record_bad(cand, problem)
        return None

    # -- pipeline ------------------------------------------------------------------------------------

    def _build(self):
        self._builds += 1
        self._pipe = build_pipeline(  # no random operator in the graph: the seed does not matter
            self.cfg, self.split, self._feeder, batch_size=self.batch_size, device_id=self.device_id, seed=self.cfg.seed
        )
        self._state = "fresh"

    def _probe(self, data: bytes) -> str | None:
        """Why a single image fails to decode with DALI's CPU decoder, or None when it decodes."""
        from nvidia.dali import fn
        from nvidia.dali import pipeline_def
        from nvidia.dali import types

        if self._probe_pipe is None:

            @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_pipelined=False)
            def probe():
                encoded = fn.external_source(name="x", dtype=types.UINT8, ndim=1)
                return fn.decoders.image(encoded, output_type=types.RGB)

            self._probe_pipe = probe()
            self._probe_pipe.build()
        self._probe_pipe.feed_input("x", [np.frombuffer(data, dtype=np.uint8)])
        try:
            self._probe_pipe.run()
        except Exception as exc:  # DALI reports decode errors as RuntimeError
            self._probe_pipe = None  # a failed pipeline is not reused
            text = str(exc).split("encountered:")[-1].split("Current pipeline object")[0]
            detail = " ".join(text.split()) or type(exc).__name__
            return "DALI decode failed: " + detail
        return None

    def _recover(self, exc: Exception) -> None:
        """A pipeline run failed: find the undecodable samples among the batches in flight, record them,
        and queue those batches again (the corrupt policy then applies to them)."""
        in_flight = list(self._feeder.in_flight)
        found = 0
        for _, items in in_flight:
            for index, _, data, *_ in items:
                reason = self._probe(data)
                if reason is not None:
                    self.record_bad(index, reason)
                    found += 1
        if not found:
            raise exc
        # the originals go back (their bad entries are now known) ahead of the rest of the epoch
        self._feeder.queue.extendleft(chunk for chunk, _ in reversed(in_flight))
        self._feeder.in_flight.clear()
        self._feeder._ahead = None
        self._pipe = None

    def _to_torch(self, tensor_list) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        from nvidia.dali.plugin.pytorch import to_torch_type

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out

    def _ready(self) -> None:
        """Make the pipeline ready for a new epoch: reuse it when it has nothing in flight, else rebuild."""
        if self._pipe is not None and self._state == "drain":
            # the previous epoch handed out its last batch but nobody asked for the end of it
            try:
                self._pipe.run()
            except StopIteration:
                self._pipe.reset()
                self._state = "fresh"
            except RuntimeError:
                self._state = "dirty"
        if self._pipe is None or self._state != "fresh":
            self._feeder.start([])
            self._build()

    def _batches(self, chunks):
        if not chunks:
            return
        self._ready()
        self._feeder.start(chunks)
        self._state = "dirty"
        try:
            while True:
                if self._pipe is None:  # rebuilt after a decode error, mid-epoch
                    self._build()
                    self._state = "dirty"
                try:
                    outputs = self._pipe.run()
                except StopIteration:
                    self._pipe.reset()
                    self._state = "fresh"
                    return
                except RuntimeError as exc:
                    self._recover(exc)  # re-raises when no sample is to blame
                    continue
                chunk, items = self._feeder.in_flight.popleft()
                if not self._feeder.queue and not self._feeder.in_flight:
                    self._state = "drain"  # nothing left in flight: only the end-of-epoch signal
                views = [self._to_torch(o) for o in outputs]
                raw = {
                    "images": views,
                    "labels": self.source.labels[[it[0] for it in items]],
                    "index": [it[0] for it in items],
                    "is_pad": [it[1] for it in items],
                    "seeds": [it[4] for it in items],
                    "draws": [self.view_draws(it[3]) for it in items],
                }
                if len(items[0]) > 5:  # replayed: the records themselves
                    raw["params"] = np.array([it[5] for it in items], dtype=items[0][5].dtype)
                yield raw, len(chunk[0])
        finally:
            if self._state not in ("fresh", "drain"):
                self._state = "dirty"  # abandoned with batches in flight: rebuild next time

    def __del__(self):
        feeder = getattr(self, "_feeder", None)
        if feeder is not None:
            feeder.close()
