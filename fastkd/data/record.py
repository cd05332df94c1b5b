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
    erase_seed uint64[V]   its noise: the seed of torch's generator (on the loader's device) under which timm's
                           ``_get_pixels`` drew the box's fill ("pixel" / "rand" mode; "const" fills zeros)

Per sample, of its batch's Mixup/CutMix (``data.mixup`` or ``data.cutmix`` > 0 only; timm pairs sample ``i`` of
a batch with sample ``B-1-i``):

    mix_partner int32      position in its batch of the sample it is mixed with, -1 when none (the odd last sample)
    mix_lam    float64     weight of its own image (after timm's box correction; 1.0: not mixed)
    mix_box    int32[4]    CutMix: the box (left, top, width, height) where the partner's pixels replace its own;
                           -1 for Mixup or no mix

Both backends draw these from each sample's own seed and each batch's seed (:mod:`fastkd.data.sharding`); the
two backends draw from different generators. A loader given the records instead (``loader.replay``, the teacher
cache's :class:`fastkd.cache.replay.CachedLoader`) draws nothing: it decodes the recorded samples and applies the
recorded crop windows, flips, RandAugment operations, erasing boxes and noise, partners, lambdas and boxes
(:func:`replay_erase`, :func:`replay_mix`, ``TrainTransform.replay``, ``DaliLoader.replay_inputs``). The
self-supervised view augmentation (colour jitter, grayscale, blur, solarize) is not recorded
(:func:`unrecorded_augmentation`).
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
        fields += [("erase", np.int32, (v, 4)), ("erase_seed", np.uint64, (v,))]
    if cfg.mixing:
        fields += [("mix_partner", np.int32), ("mix_lam", np.float64), ("mix_box", np.int32, (4,))]
    return np.dtype(fields)


def new_params(cfg: DataConfig, views: list[list[ViewDraws]]) -> np.ndarray:
    """The records of a batch from each sample's per-view draws; erasing and mixing say "none" until filled."""
    out = np.zeros(len(views), dtype=params_dtype(cfg))
    names = out.dtype.names
    for name, empty in (("ra_op", -1), ("ra_mag", np.nan), ("ra_arg", np.nan), ("erase", -1), ("mix_partner", -1),
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


def unrecorded_augmentation(cfg: DataConfig) -> str | None:
    """The data fields of a random augmentation the records do not describe (so a replay could not follow it), as
    one phrase, or None: the self-supervised view augmentation."""
    from fastkd.data.dali_loader import view_colour_on

    if not view_colour_on(cfg):
        return None
    return ("data.color_jitter / grayscale / gaussian_blur / solarize (the self-supervised view augmentation) is on, "
            "and its draws are not recorded")


def recorded_box(box, height: int, width: int, what: str, *, optional: bool = False) -> tuple[int, int, int, int]:
    """A recorded ``(left, top, width, height)`` as ints, checked to lie inside a ``width`` x ``height`` image (a
    ValueError naming ``what`` otherwise). A crop window is at least 1x1; an ``optional`` box (erasing, CutMix) may
    be empty, or absent: width -1, returned as recorded."""
    left, top, w, h = (int(b) for b in box)
    if optional and w < 0:
        return left, top, w, h
    least = 0 if optional else 1
    if left < 0 or top < 0 or w < least or h < least or left + w > width or top + h > height:
        raise ValueError(f"recorded {what} (left, top, width, height) = {(left, top, w, h)} does not fit the "
                         f"{width}x{height} image")
    return left, top, w, h


def replay_erase(eraser, image, box, seed: int) -> None:
    """Random erasing of one ``[C, H, W]`` image from its record, in place: the box ``(left, top, width, height)``
    (-1s: none) filled by timm's ``_get_pixels`` (``eraser``'s mode, device and the image's dtype) under
    :func:`~fastkd.data.transforms.seeded` ``(seed)``: the fill timm's ``RandomErasing`` drew with that seed."""
    from timm.data.random_erasing import _get_pixels

    from fastkd.data.transforms import seeded

    chan, height, width = image.shape
    left, top, w, h = recorded_box(box, height, width, "random-erasing box", optional=True)
    if w < 0:
        return
    with seeded(int(seed), image.device):
        image[:, top:top + h, left:left + w] = _get_pixels(eraser.per_pixel, eraser.rand_color, (chan, h, w),
                                                           dtype=image.dtype, device=eraser.device)


def replay_mix(x, labels, params: np.ndarray, mode: str, num_classes: int, smoothing: float):
    """Mixup/CutMix of a batch ``x`` ``[B, C, H, W]`` (in place) from its records (``mix_partner``, ``mix_lam``,
    ``mix_box``); returns ``(x, soft targets [B, num_classes])``. Sample ``i`` with partner ``j``: CutMix pastes
    ``j``'s pixels of the box, Mixup gives ``lam * x_i + (1 - lam) * x_j``; its target is ``lam`` on its own
    (smoothed) label and ``1 - lam`` on ``j``'s. The arithmetic is timm's for ``mode`` (``Mixup(mode=...)``: the
    same roundings in every dtype), so a replay of a recorded batch gives timm's images and targets bit for bit."""
    import torch
    from timm.data.mixup import one_hot

    b = len(x)
    partner = params["mix_partner"].astype(np.int64)
    lam = params["mix_lam"].astype(np.float64)
    if len(partner) != b:
        raise ValueError(f"replay_mix: {len(partner)} records for a batch of {b}")
    outside = (partner < -1) | (partner >= b)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"recorded Mixup/CutMix partner {int(partner[i])} of position {i} lies outside its batch "
                         f"of {b}")
    height, width = x.shape[-2:]
    boxes = [recorded_box(box, height, width, "CutMix box", optional=True) for box in params["mix_box"]]
    own = np.flatnonzero(partner < 0)
    lam[own], partner[own] = 1.0, own  # not mixed: all its own
    orig = x.clone()
    blend = [i for i in range(b) if boxes[i][2] < 0 and lam[i] != 1.0]
    if mode == "batch":  # timm: x * lam + flip(x) * (1. - lam), lam a Python float
        a, c = lam.astype(np.float32), (1.0 - lam).astype(np.float32)
    else:  # timm: x[i] * lam + x[j] * (1 - lam), lam a float32
        a = lam.astype(np.float32)
        c = np.float32(1) - a
    if blend:
        rows = torch.as_tensor(blend, device=x.device)
        shape = (-1,) + (1,) * (x.dim() - 1)
        wa = torch.as_tensor(a[blend], device=x.device).view(shape)
        wc = torch.as_tensor(c[blend], device=x.device).view(shape)
        others = torch.as_tensor(partner[blend], device=x.device)
        x[rows] = (orig[rows].float() * wa).to(x.dtype) + (orig[others].float() * wc).to(x.dtype)
    for i, (left, top, w, h) in enumerate(boxes):
        if w >= 0:
            x[i][:, top:top + h, left:left + w] = orig[int(partner[i])][:, top:top + h, left:left + w]
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = one_hot(labels, num_classes, on_value=on, off_value=off)
    y2 = one_hot(labels[torch.as_tensor(partner, device=labels.device)], num_classes, on_value=on, off_value=off)
    if mode == "batch":  # timm: y1 * lam + y2 * (1. - lam), lam a Python float
        ta = torch.as_tensor(a, device=y1.device).view(-1, 1)
        tc = torch.as_tensor(c, device=y1.device).view(-1, 1)
        targets = y1 * ta + y2 * tc
    else:  # timm: lam as a tensor of x's dtype, y1 * lam + y2 * (1. - lam)
        t = torch.as_tensor(a, device=y1.device).to(x.dtype).view(-1, 1)
        targets = y1 * t + y2 * (1.0 - t)
    return x, targets


__all__ = ["draw_mix", "erase", "new_params", "params_dtype", "recorded_box", "replay_erase", "replay_mix",
           "unrecorded_augmentation"]
