"""The paper recipes' augmentation on both backends: timm's RandAugment, random erasing, repeated
augmentation, EXIF orientation and the image-size limit. Each is checked against timm itself or
against an independent implementation written here."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from PIL import ImageOps

from fastkd.data import build_loader
from fastkd.data import sharding
from fastkd.data.config import IMAGENET_MEAN
from fastkd.data.config import IMAGENET_STD
from fastkd.data.config import DataConfig
from fastkd.data.transforms import TrainTransform
from tests.data.conftest import BACKEND_PARAMS
from tests.data.conftest import BACKENDS
from tests.data.conftest import base_cfg
from tests.data.conftest import needs_dali
from tests.data.conftest import write_folder

# timm's "inc1" operation set, written out here (not read from timm) in timm's order
TIMM_INC_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
DEIT = dict(img_size=32, randaugment=2, randaugment_magnitude=9, randaugment_mstd=0.5, interpolation="bicubic")


def denorm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(-1, 3, 1, 1) * 255
    return x.float() * std + mean


# ------------------------------------------------------------------------------------------------------------
# RandAugment


def test_torch_randaugment_is_timms_factory_transform():
    """The torch backend's RandAugment is the one timm.data.create_transform builds for DeiT's settings."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    cfg = DataConfig.from_any(dict(DEIT, img_size=224))
    ours = [t for t in TrainTransform(cfg).transform.transforms if isinstance(t, RandAugment)]
    timm_tf = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    theirs = [t for t in timm_tf.transforms if isinstance(t, RandAugment)]
    assert len(ours) == len(theirs) == 1
    assert repr(ours[0]) == repr(theirs[0])  # operations, p, m, mstd
    assert [op.name for op in ours[0].ops] == list(TIMM_INC_OPS)
    for a, b in zip(ours[0].ops, theirs[0].ops):
        assert a.hparams == b.hparams and a.kwargs == b.kwargs  # translate limit, fill colour, resampling


def _timm_draws(n_images: int) -> dict[str, list]:
    """Run timm's own RandAugment and record every operation it applies and its arguments."""
    from timm.data.auto_augment import rand_augment_transform

    ra = rand_augment_transform("rand-n2-m9-mstd0.5-inc1", {"translate_const": 100, "img_mean": (124, 116, 104)})
    calls: dict[str, list] = {name: [] for name in TIMM_INC_OPS}
    for op in ra.ops:
        op.aug_fn = lambda img, *args, _name=op.name, **kw: (calls[_name].append(args), img)[1]
    img = Image.new("RGB", (4, 4))
    random.seed(0)
    np.random.seed(0)
    for _ in range(n_images):
        ra(img)
    return calls


def _dali_draws(n_images: int) -> dict[str, list]:
    """The DALI backend's draws, turned into operation arguments by its DALI suite's own tables."""
    from fastkd.data.dali_loader import RA_BINS
    from fastkd.data.dali_loader import draw_rand_augment
    from fastkd.data.dali_loader import rand_augment_suite

    cfg = DataConfig.from_any(dict(DEIT, img_size=224))  # translate: 0.45 * 224 px = timm's rel. 0.45
    suite = rand_augment_suite(cfg)
    magnitudes = np.linspace(0, 10, RA_BINS, dtype=np.float32)
    calls: dict[str, list] = {name: [] for name in TIMM_INC_OPS}
    rng = np.random.default_rng(0)
    for _ in range(n_images):
        ra = draw_rand_augment(rng, cfg, len(suite) - 1)
        for k in range(2):
            op, b, sign = int(ra[k]), int(ra[2 + k]), int(ra[4 + k])
            if op == len(suite) - 1:
                continue  # not applied
            aug = suite[op]
            m = magnitudes[b] * (-1 if sign and aug.randomly_negate else 1)
            calls[TIMM_INC_OPS[op]].append(None if aug.mag_to_param is None else aug.mag_to_param(m))
    return calls


def _timm_arg(name: str, args) -> float:
    """One number per call in timm's units."""
    if name in ("TranslateXRel", "TranslateYRel"):
        return args[0] * 224
    return float(args[0])


def _dali_arg(name: str, param) -> float:
    """The same number from the DALI suite's parameter (angles, factors, masks, kernels, offsets)."""
    param = np.asarray(param)
    if name == "PosterizeIncreasing":  # mask -> bits kept
        return float(bin(int(param)).count("1"))
    if name == "SharpnessIncreasing":  # kernel = f * identity - (f - 1) * blur; corner = -(f - 1) / 13
        return float(1 - 13 * param[0, 0])
    if name in ("ShearX", "TranslateXRel"):
        return float(param[0])
    if name in ("ShearY", "TranslateYRel"):
        return float(param[1])
    return float(param)


@needs_dali
def test_dali_randaugment_draws_follow_timms_distribution():
    """Operation frequencies and argument statistics of the DALI draws match what timm's transform does."""
    n = 6000
    timm_calls, dali_calls = _timm_draws(n), _dali_draws(n)
    total = 2 * n
    for name in TIMM_INC_OPS:
        p_t, p_d = len(timm_calls[name]) / total, len(dali_calls[name]) / total
        se = math.sqrt(2 * (1 / 30) * (1 - 1 / 30) / total)
        assert abs(p_t - p_d) < 5 * se, (name, p_t, p_d)  # each op: 0.5 / 15 of the slots
        assert abs(p_d - 1 / 30) < 5 * se, (name, p_d)
        if name in ("AutoContrast", "Equalize", "Invert"):
            continue
        a = np.array([_timm_arg(name, c) for c in timm_calls[name]])
        b = np.array([_dali_arg(name, c) for c in dali_calls[name]])
        for fa, fb in ((a, b), (np.abs(a), np.abs(b))):  # location and size of the arguments
            se = math.sqrt(fa.var() / len(fa) + fb.var() / len(fb)) + 1e-9
            assert abs(fa.mean() - fb.mean()) < 5 * se, (name, fa.mean(), fb.mean())


@needs_dali
def test_dali_arguments_equal_timms_level_rules(monkeypatch):
    """Each DALI operation's argument at a magnitude and sign equals timm's own level-to-argument rule."""
    import timm.data.auto_augment as aa

    from fastkd.data.dali_loader import RA_BINS
    from fastkd.data.dali_loader import rand_augment_suite

    suite = rand_augment_suite(DataConfig.from_any(dict(DEIT, img_size=224)))
    magnitudes = np.linspace(0, 10, RA_BINS, dtype=np.float32)
    hparams = {"translate_const": 100, "translate_pct": 0.45}
    for b in range(RA_BINS):
        for negate in (False, True):
            monkeypatch.setattr(aa.random, "random", lambda negate=negate: 1.0 if negate else 0.0)
            for name, aug in zip(TIMM_INC_OPS, suite):
                if aa.LEVEL_TO_ARG[name] is None:
                    continue
                expected = _timm_arg(name, aa.LEVEL_TO_ARG[name](float(magnitudes[b]), hparams))
                m = magnitudes[b] * (-1 if negate and aug.randomly_negate else 1)
                got = _dali_arg(name, aug.mag_to_param(m))
                assert got == pytest.approx(expected, rel=1e-5, abs=1e-5), (name, float(magnitudes[b]), negate)


def _dali_ops(image: np.ndarray, draws: list[tuple[str, int, int]]) -> list[np.ndarray]:
    """Run the DALI training graph (CPU) once on copies of one square image, sample k with the single
    RandAugment operation, magnitude bin and sign ``draws[k]``; denormalised HWC outputs."""
    import io

    from fastkd.data.dali_loader import build_pipeline
    from fastkd.data.dali_loader import rand_augment_suite

    size = image.shape[0]
    cfg = DataConfig.from_any(dict(img_size=size, randaugment=1, interpolation="bilinear", hflip=0.0))
    identity = len(rand_augment_suite(cfg)) - 1
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    encoded = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    n = len(draws)
    ops = [identity if name == "identity" else TIMM_INC_OPS.index(name) for name, _, _ in draws]
    batch = (
        [encoded] * n,
        [np.array([0, 0], np.int32)] * n,
        [np.array([size, size], np.int32)] * n,
        [np.array(0, np.int32)] * n,
        [np.array([op, b, sign], np.int32) for op, (_, b, sign) in zip(ops, draws)],
    )
    fed = iter([batch])
    pipe = build_pipeline(cfg, "train", lambda: next(fed), batch_size=n, device_id=None, seed=0, num_threads=1)
    (out,) = pipe.run()
    x = torch.from_numpy(np.array(out.as_tensor()))
    return list(denorm(x).permute(0, 2, 3, 1).numpy())


@needs_dali
def test_dali_operation_pixels_equal_pil():
    """Pixel-wise operations with a fixed draw: DALI's output equals PIL's (timm's implementation)."""
    from PIL import ImageEnhance

    from fastkd.data.transforms import posterize_any_bits

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    cases = {  # draw -> PIL on the same pixels, arguments from timm's rules at magnitude bin / 10
        ("identity", 0, 0): lambda img: img,
        ("Invert", 0, 0): ImageOps.invert,
        ("PosterizeIncreasing", 90, 0): lambda img: ImageOps.posterize(img, 4 - int(0.9 * 4)),
        # magnitude 10 keeps 0 bits: the torch backend's operation (Pillow refuses 0 bits itself)
        ("PosterizeIncreasing", 100, 0): lambda img: posterize_any_bits(img, 4 - int(1.0 * 4)),
        ("SolarizeIncreasing", 90, 0): lambda img: ImageOps.solarize(img, 256 - int(0.9 * 256)),
        ("SolarizeAdd", 70, 0): lambda img: Image.fromarray(
            np.where(np.asarray(img) < 128, np.minimum(np.asarray(img).astype(int) + int(0.7 * 110), 255), img).astype(
                np.uint8
            )
        ),
        ("BrightnessIncreasing", 50, 1): lambda img: ImageEnhance.Brightness(img).enhance(1 - 0.9 * 0.5),
    }
    outs = _dali_ops(image, list(cases))
    for (draw, pil_fn), got in zip(cases.items(), outs):
        expected = np.asarray(pil_fn(Image.fromarray(image)), dtype=np.float64)
        # normalising and denormalising in float32 costs far less than one 8-bit step; PIL rounds blends
        assert np.abs(got - expected).max() <= 1.0 + 1e-3, draw
    assert np.abs(outs[0] - image).max() < 1e-3  # full-image window of the same size, no flip: untouched
    zero_bits = list(cases).index(("PosterizeIncreasing", 100, 0))
    assert np.abs(outs[zero_bits] - _posterized(Image.fromarray(image), 0)).max() < 1e-3  # black on both backends


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_randaugment_is_per_sample_deterministic(square_folder, backend):
    cfg = base_cfg(square_folder, backend, seed=3, **{k: v for k, v in DEIT.items() if k != "img_size"})
    a = torch.cat([b["images"] for b in build_loader(cfg, "train")])
    b = torch.cat([b["images"] for b in build_loader(dict(cfg, num_workers=2 if backend == "torch" else 2), "train")])
    assert torch.equal(a, b)


def _posterized(img: Image.Image, bits: int) -> np.ndarray:
    """Posterize written out: keep the ``bits`` most significant bits of every value (0 bits: all zero)."""
    return np.asarray(img) & np.uint8((0xFF << (8 - bits)) & 0xFF)


def test_torch_randaugment_survives_zero_bit_posterize():
    """timm's PosterizeIncreasing keeps 4 - int(4 m / 10) bits: 0 at magnitude 10, which DeiT's magnitude noise
    (9 +- 0.5, clipped at 10) reaches; Pillow refuses 0 bits, so 3 of these 300 seeded draws crashed. Posterize
    to 0 bits is now a black image; 1..8 bits stay timm's (Pillow's) posterize."""
    from fastkd.data.transforms import posterize_any_bits
    from fastkd.data.transforms import seeded

    transform = TrainTransform(DataConfig.from_any(DEIT))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    posterize = TIMM_INC_OPS.index("PosterizeIncreasing")
    zero_bits = 0
    for seed in range(300):
        with seeded(seed):
            out, drawn = transform.draw(image)
        applied = [(op, arg) for op, _, arg in drawn["ra"] if op >= 0]
        if applied and applied[-1] == (posterize, 0):  # the last operation: nothing after it to undo the black
            zero_bits += 1
            assert not out.any(), seed
    assert zero_bits >= 1  # the case happened (and did not raise)
    # the operation itself, every number of bits
    for bits in range(9):
        got = posterize_any_bits(image, bits)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), _posterized(image, bits)), bits
    assert not np.asarray(posterize_any_bits(image, 0)).any()


# ------------------------------------------------------------------------------------------------------------
# random erasing


def _erased(backend, root, p, **kw):
    cfg = base_cfg(root, backend, seed=5, random_erasing=p, hflip=0.0, **kw)
    loader = build_loader(cfg, "train")
    out = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        out.append(torch.cat([b["images"] for b in loader]))
    return torch.cat(out)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_random_erasing_is_timms_rectangle_of_noise(square_folder, backend):
    """Against the unerased batches: each changed sample differs in one axis-aligned rectangle of
    timm's size/aspect limits, filled with standard normal noise ("pixel" mode); about p of them."""
    plain = _erased(backend, square_folder, 0.0)
    erased = _erased(backend, square_folder, 0.25)
    changed = (plain != erased).any(dim=1)  # [N, H, W]
    hits = 0
    noise = []
    for k in range(len(plain)):
        mask = changed[k]
        if not mask.any():
            continue
        hits += 1
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        area = h * w / mask.numel()
        assert 0.02 - 0.01 <= area <= 1 / 3 + 0.05, area  # timm: 2 % .. 1/3 of the image (rounded sides)
        assert 0.3 * 0.5 <= h / w <= 2 / 0.3, (h, w)  # log-uniform aspect in [0.3, 1/0.3] (rounded)
        noise.append(erased[k][:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].flatten())
    n = len(plain)
    assert abs(hits / n - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    z = torch.cat(noise)
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1


@needs_dali
def test_random_erasing_identical_on_both_backends(square_folder):
    """The erasing draws depend only on the sample's seed: same rectangles and noise on both backends."""
    got = {b: _erased(b, square_folder, 0.5) - _erased(b, square_folder, 0.0) for b in BACKENDS}
    m_d, m_t = got["dali"] != 0, got["torch"] != 0
    mask = m_d.any(1) & m_t.any(1)
    assert (m_d.any(1) ^ m_t.any(1)).float().mean() < 0.01  # pixels of resampling rounding at most
    erased = _erased("dali", square_folder, 0.5)[mask.unsqueeze(1).expand_as(m_d)]
    assert torch.equal(erased, _erased("torch", square_folder, 0.5)[mask.unsqueeze(1).expand_as(m_d)])


# ------------------------------------------------------------------------------------------------------------
# repeated augmentation


def _deit_ra_sampler(perm: np.ndarray, repeats: int, rank: int, world: int, keep: int) -> np.ndarray:
    """DeiT's RASampler order, written out: each index ``repeats`` times in a row, padded cyclically to
    a multiple of the ranks, every world-th from ``rank``, the first ``keep`` of them."""
    idx = np.repeat(perm, repeats)
    total = math.ceil(len(idx) / world) * world
    idx = np.concatenate([idx, idx[: total - len(idx)]])
    return idx[rank:total:world][:keep]


@pytest.mark.parametrize("n, world", [(21, 1), (21, 2), (21, 4), (10, 3)])
def test_repeated_augmentation_plan_is_deits(folder, n, world):
    for rank in range(world):
        loader = build_loader(base_cfg(folder, "torch", seed=2, repeated_augmentation=3), "train", rank, world)
        perm = sharding.epoch_order(len(loader.source), 1, 2, True)
        indices, _ = loader.plan(1)
        keep = math.ceil(len(loader.source) / world)
        assert len(indices) == keep == loader.samples_per_epoch
        np.testing.assert_array_equal(indices, _deit_ra_sampler(perm, 3, rank, world, keep))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_repeated_copies_are_augmented_differently(square_folder, backend):
    loader = build_loader(base_cfg(square_folder, backend, seed=1, repeated_augmentation=3, batch_size=12), "train")
    batch = next(iter(loader))
    index = batch["index"].tolist()
    assert index[:3] == [index[0]] * 3  # one rank: the three copies are adjacent
    x = batch["images"]
    assert not torch.equal(x[0], x[1]) and not torch.equal(x[1], x[2])


# ------------------------------------------------------------------------------------------------------------
# decoding: EXIF orientation, image-size limit


def _exif_folder(root: str) -> str:
    """An image stored sideways with EXIF orientation 6 (rotate 90 deg clockwise to view)."""
    write_folder(os.path.join(root, "train"), {"a": 2}, seed=4)
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split, "a"), exist_ok=True)
    photo = Image.open(os.path.join(root, "train", "a", "img_000.jpg")).convert("RGB").resize((64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.transpose(Image.Transpose.ROTATE_90).save(os.path.join(root, "val", "a", "x.jpg"), exif=exif, quality=95)
    return photo


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_exif_orientation_is_applied(tmp_path, backend):
    upright = _exif_folder(str(tmp_path))  # 64 wide, 40 high when viewed
    cfg = base_cfg(str(tmp_path), backend, img_size=40, crop_pct=1.0)
    x = denorm(next(iter(build_loader(cfg, "val")))["images"])[0].permute(1, 2, 0).numpy()
    expected = np.asarray(upright.crop((12, 0, 52, 40)), dtype=np.float64)  # centre 40x40 of the upright image
    assert np.abs(x - expected).mean() < 6  # JPEG noise; a rotated image is off by far more
    assert np.abs(x - np.asarray(upright.rotate(90).resize((40, 64)).crop((0, 12, 40, 52)), float)).mean() > 20


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_image_size_limit_is_the_configured_one(folder, backend, monkeypatch):
    cfg = base_cfg(folder, backend, max_image_pixels=0)
    limit = 4000
    loader = build_loader(dict(cfg, max_image_pixels=limit), "val")
    sizes = [Image.open(path).size for path in loader.source.names]
    too_big = {i for i, (w, h) in enumerate(sizes) if w * h > limit}
    assert 0 < len(too_big) < len(sizes)
    # PIL's own limit set far below the images: it must not be the one that decides
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert sorted(torch.cat([b["index"] for b in build_loader(cfg, "val")]).tolist()) == list(range(len(sizes)))
    assert Image.MAX_IMAGE_PIXELS == 100  # given back
    seen = torch.cat([b["index"] for b in loader]).tolist()
    assert sorted(seen) == sorted(set(range(len(sizes))) - too_big)
    assert set(loader.corrupt) == too_big
    assert all(f"max_image_pixels={limit}" in why for why in loader.corrupt.values())
