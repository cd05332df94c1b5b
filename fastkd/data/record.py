"""What a training loader drew for each sample: the view parameters (on request, ``loader.record_views``).

A loader with ``record_views`` set adds ``batch["view_params"]``: a NumPy structured array, one record per sample,
of :func:`params_dtype` (the teacher cache stores it and checks a replayed run against it, :mod:`fastkd.cache`).
Per view ``v`` (``num_views`` of them):

    crop    int32[V, 4]    the random-resized-crop window (left, top, width, height) in the decoded image (EXIF
                           orientation applied), before the resize to ``img_size``
    flip    bool[V]        horizontal flip
    ra_op   int16[V, n]    RandAugment (``n = data.randaugment`` > 0 only): the index of each drawn operation in
                           timm's operation list of the recipe's policy (the DALI suite has the same order), -1 when
                           the draw did not apply it
    ra_mag  float32[V, n]  its magnitude on timm's 0..10 scale after the noise and clipping (DALI: its magnitude
                           bin, as a magnitude); NaN when not applied or the operation takes none
    ra_arg  float64[V, n]  the operation's argument as the backend applies it: torch: timm's level argument (the
                           signed angle, shear, translation, factor or threshold); DALI: the sign bit of the
                           magnitude; NaN when not applied or the operation takes none
    erase   int32[V, 4]    random erasing (``data.random_erasing`` > 0 only): the erased box (left, top, width,
                           height) in the ``img_size`` view, -1 when none

Per sample, of its batch's Mixup/CutMix (``data.mixup`` or ``data.cutmix`` > 0 only; timm pairs sample ``i`` of
a batch with sample ``B-1-i``):

    mix_with   int64       data set index of the sample it is mixed with, -1 when none (the odd last sample)
    mix_lam    float64     weight of its own image (after timm's box correction; 1.0: not mixed)
    mix_box    int32[4]    CutMix: the pasted box (left, top, width, height); -1 for Mixup or no mix

Both backends draw these from each sample's own seed and each batch's seed (:mod:`fastkd.data.sharding`), so a
run with the same data section and batch layout draws the same parameters; the two backends draw from different
generators and do not replay each other's views.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastkd.data.config import DataConfig

# one view's drawn parameters, as the backends hand them over: {"crop": (l, t, w, h), "flip": bool,
# "ra": [(op, magnitude, argument), ...]} (see TrainTransform and DaliLoader.view_params)
ViewDraws = dict[str, Any]


def params_dtype(cfg: DataConfig) -> np.dtype:
    v, n = cfg.num_views, cfg.randaugment
    fields: list[tuple] = [("crop", np.int32, (v, 4)), ("flip", np.bool_, (v,))]
    if n > 0:
        fields += [("ra_op", np.int16, (v, n)), ("ra_mag", np.float32, (v, n)), ("ra_arg", np.float64, (v, n))]
    if cfg.random_erasing > 0:
        fields += [("erase", np.int32, (v, 4))]
    if cfg.mixing:
        fields += [("mix_with", np.int64), ("mix_lam", np.float64), ("mix_box", np.int32, (4,))]
    return np.dtype(fields)


def new_params(cfg: DataConfig, views: list[list[ViewDraws]]) -> np.ndarray:
    """The records of a batch from each sample's per-view draws; erasing and mixing say "none" until filled."""
    out = np.zeros(len(views), dtype=params_dtype(cfg))
    names = out.dtype.names
    for name, empty in (("ra_op", -1), ("ra_mag", np.nan), ("ra_arg", np.nan), ("erase", -1), ("mix_with", -1),
                        ("mix_lam", 1.0), ("mix_box", -1)):
        if name in names:
            out[name] = empty
    for i, sample in enumerate(views):
        for v, d in enumerate(sample):
            out["crop"][i, v] = d["crop"]
            out["flip"][i, v] = d["flip"]
            for k, (op, mag, arg) in enumerate(d.get("ra", ())):
                out["ra_op"][i, v, k], out["ra_mag"][i, v, k], out["ra_arg"][i, v, k] = op, mag, arg
    return out


class _BoxProbe:
    """Stands in for an image tensor in timm's ``RandomErasing._erase``: notes the box it writes, writes it."""

    def __init__(self, image):
        self.image, self.box = image, (-1, -1, -1, -1)

    def __setitem__(self, key, value) -> None:
        _, rows, cols = key
        self.box = (cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        self.image[key] = value


def erase(eraser, image) -> tuple[int, int, int, int]:
    """timm's ``RandomErasing`` (``eraser``) on one ``[C, H, W]`` image, in place; returns the box it erased
    (left, top, width, height), or -1s. Draws exactly what ``eraser(image)`` draws."""
    if eraser.max_count != eraser.min_count or eraser.min_count != 1:
        raise ValueError("recording random erasing supports one box per image (timm's min_count = max_count = 1)")
    probe = _BoxProbe(image)
    eraser._erase(probe, *image.shape, image.dtype)
    return probe.box


def draw_mix(mixup, batch_size: int, size: tuple[int, int]) -> list[tuple[int, float, tuple[int, int, int, int]]]:
    """What timm's ``Mixup`` (``mixup``) will draw for a batch of ``batch_size`` (even) images of ``size``
    (height, width) from NumPy's global generator as it stands: per sample, its partner's position, its weight and
    its CutMix box (-1s: none).

    It makes timm's own draws (``_params_per_batch`` or ``_params_per_elem``, then ``cutmix_bbox_and_lam``) in
    timm's order: call it with the generator in the state the mix starts from, and restore that state before
    mixing."""
    from timm.data.mixup import cutmix_bbox_and_lam

    none = (-1, -1, -1, -1)

    def box(lam: float) -> tuple[tuple[int, int, int, int], float]:
        (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(size, lam, ratio_minmax=mixup.cutmix_minmax,
                                                    correct_lam=mixup.correct_lam)
        return (int(xl), int(yl), int(xh - xl), int(yh - yl)), float(lam)

    b = batch_size
    partner = [b - 1 - i for i in range(b)]
    if mixup.mode == "batch":
        lam, use_cutmix = mixup._params_per_batch()
        bx = none
        if lam != 1.0 and use_cutmix:
            bx, lam = box(lam)
        return [(j, float(lam), bx) for j in partner]
    out = [(j, 1.0, none) for j in partner]
    pairs = b // 2 if mixup.mode == "pair" else b
    lams, use_cutmix = mixup._params_per_elem(pairs)
    for i in range(pairs):
        lam, bx = float(lams[i]), none
        if lam != 1.0 and use_cutmix[i]:
            bx, lam = box(lam)
        out[i] = (partner[i], lam, bx)
        if mixup.mode == "pair":
            out[partner[i]] = (i, lam, bx)
    return out


__all__ = ["draw_mix", "erase", "new_params", "params_dtype"]
