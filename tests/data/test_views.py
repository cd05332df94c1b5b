"""The self-supervised views of SDSSL's BYOL / MoCo-v3 recipes (colour jitter, grayscale, Gaussian blur,
solarize, asymmetric between the two views) on both backends.

- torch: the transforms are torchvision's own, with the official parameters;
- DALI, with a fixed draw: each operation's pixels equal torchvision's (8-bit rounding bounds derived below);
- both: the frequency of each operation and the range of each parameter follow the expectation written here,
  with bounds derived from the number of draws;
- the SDSSL method receives the two views.
Exact resume with these views is checked in test_resume.py.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.data import build_loader
from fastkd.data.config import DataConfig
from fastkd.data.transforms import TrainTransform
from fastkd.data.transforms import seeded
from tests.data.conftest import BACKEND_PARAMS
from tests.data.conftest import base_cfg
from tests.data.conftest import needs_dali
from tests.data.test_augment import denorm

# hagiss/SDSSL @ bbd34fa, pl_train_{byol,moco,simclr}.py: augmentation1 / augmentation2, written out here
BYOL = dict(
    num_views=2, color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_p=0.8, grayscale=0.2, gaussian_blur=(1.0, 0.1),
    blur_sigma=(0.1, 2.0), solarize=(0.0, 0.2),
)  # fmt: skip
EXPECTED_P = {  # view -> operation -> probability that it is applied
    0: {"jitter": 0.8, "grayscale": 0.2, "blur": 1.0, "solarize": 0.0},
    1: {"jitter": 0.8, "grayscale": 0.2, "blur": 0.1, "solarize": 0.2},
}
EXPECTED_RANGE = {  # parameter -> uniform on [lo, hi]
    "brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1),
    "blur_sigma": (0.1, 2.0),
}  # fmt: skip
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
Z = 5.0  # a bound of Z standard errors: a false alarm has probability < 1e-6 per check


def test_torch_views_are_torchvisions_transforms():
    from torchvision import transforms as T

    cfg = DataConfig.from_any(dict(BYOL, img_size=224))
    for view in (0, 1):
        steps = TrainTransform(cfg, view).transform.transforms
        kinds = [type(t) for t in steps]
        jitter = [t for t in steps if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], T.ColorJitter)]
        assert len(jitter) == 1 and jitter[0].p == 0.8
        cj = jitter[0].transforms[0]
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        gray = [t for t in steps if isinstance(t, T.RandomGrayscale)]
        assert len(gray) == 1 and gray[0].p == 0.2
        blur = [t for t in steps if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], T.GaussianBlur)]
        assert len(blur) == 1 and blur[0].p == EXPECTED_P[view]["blur"]
        assert tuple(blur[0].transforms[0].sigma) == (0.1, 2.0) and tuple(blur[0].transforms[0].kernel_size) == (13, 13)
        solarize = [t for t in steps if isinstance(t, T.RandomSolarize)]
        assert len(solarize) == (view == 1) and all(t.p == 0.2 and t.threshold == 128 for t in solarize)
        assert kinds[:2] == [T.RandomResizedCrop, T.RandomHorizontalFlip]  # then the colour operations


def test_view_fields_are_validated():
    with pytest.raises(ValueError, match="gaussian_blur"):
        DataConfig.from_any(dict(num_views=3, gaussian_blur=(1.0, 0.1)))
    with pytest.raises(ValueError, match="color_jitter"):
        DataConfig.from_any(dict(color_jitter=(0.4, 0.4, 0.2, 0.6)))
    with pytest.raises(ValueError, match="blur_sigma"):
        DataConfig.from_any(dict(blur_sigma=(0.0, 2.0)))
    assert DataConfig.from_any(dict(num_views=2, solarize=0.2)).solarize == (0.2,)  # one value: every view


# ------------------------------------------------------------------------------------------------------------
# DALI with fixed draws against torchvision's functional operations


def _draw(**kw) -> np.ndarray:
    from fastkd.data.dali_loader import VIEW_COLOUR_FIELDS

    values = dict(zip(VIEW_COLOUR_FIELDS, (0, 0, 1, 2, 3, 1, 1, 1, 0, 0, 0, 0)))
    values.update(kw)
    return np.array([values[k] for k in VIEW_COLOUR_FIELDS], np.float32)


def _jitter(order, **factors) -> np.ndarray:
    return _draw(jitter=1, **{f"order{k}": JITTER_OPS.index(name) for k, name in enumerate(order)}, **factors)


def _dali_views(image: np.ndarray, draws: list[np.ndarray], **cfg) -> list[np.ndarray]:
    """The DALI training graph (CPU) on copies of one square image, full-image window, no flip, sample k with
    the view-augmentation draws ``draws[k]``; denormalised HWC outputs. ``cfg``: DataConfig fields over BYOL's."""
    from fastkd.data.dali_loader import build_pipeline

    size = image.shape[0]
    cfg = DataConfig.from_any(
        dict(BYOL, num_views=1, gaussian_blur=0.5, solarize=0.5, img_size=size, hflip=0.0, **cfg)
    )
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    encoded = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    n = len(draws)
    full = ([np.array([0, 0], np.int32)] * n, [np.array([size, size], np.int32)] * n, [np.array(0, np.int32)] * n)
    fed = iter([([encoded] * n, *full, draws)])
    pipe = build_pipeline(cfg, "train", lambda: next(fed), batch_size=n, device_id=None, seed=0, num_threads=1)
    (out,) = pipe.run()
    return list(denorm(torch.from_numpy(np.array(out.as_tensor()))).permute(0, 2, 3, 1).numpy())


def _photo(size: int) -> np.ndarray:
    from fastkd.data.prepare import skimage_photo_paths

    with Image.open(skimage_photo_paths()[1]) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)).copy()


def _rounding_bound(steps) -> float:
    """Largest difference after a chain of 8-bit operations when each rounds (or truncates) once: an error e in
    the input of a blend ``g + f (x - g)`` (g from the same image) grows to at most ``(|f| + |1 - f|) e``, a
    scaling by f to ``|f| e``; each operation adds one level of its own."""
    bound = 0.0
    for name, f in steps:
        bound = (abs(f) if name == "brightness" else abs(f) + abs(1 - f)) * bound + 1.0
    return bound + 1e-3  # normalising and denormalising in float32


@needs_dali
def test_dali_view_operations_equal_torchvision():
    import torchvision.transforms.functional as F

    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)  # extreme values: clipping is exercised
    bc = [("brightness", 1.3), ("contrast", 0.6), ("saturation", 1.1)]
    cases = [  # (draw, torchvision on the PIL image, chain of blends for the bound)
        (_draw(), lambda p: p, []),
        (_jitter(("brightness", "contrast", "saturation", "hue"), brightness=1.3),
         lambda p: F.adjust_brightness(p, 1.3), [("brightness", 1.3)]),
        (_jitter(("contrast", "hue", "brightness", "saturation"), contrast=0.7), lambda p: F.adjust_contrast(p, 0.7),
         [("contrast", 0.7)]),
        (_jitter(("saturation", "brightness", "contrast", "hue"), saturation=1.2),
         lambda p: F.adjust_saturation(p, 1.2), [("saturation", 1.2)]),
        (_jitter(("saturation", "brightness", "contrast", "hue"), saturation=0.8),
         lambda p: F.adjust_saturation(p, 0.8), [("saturation", 0.8)]),
        (_jitter(("brightness", "contrast", "saturation", "hue"), brightness=1.3, contrast=0.6, saturation=1.1),
         lambda p: F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(p, 1.3), 0.6), 1.1), bc),
        (_jitter(("contrast", "brightness", "saturation", "hue"), brightness=1.3, contrast=0.6, saturation=1.1),
         lambda p: F.adjust_saturation(F.adjust_brightness(F.adjust_contrast(p, 0.6), 1.3), 1.1),
         [bc[1], bc[0], bc[2]]),
        (_jitter(("saturation", "brightness", "contrast", "hue"), brightness=2.0),
         lambda p: F.adjust_brightness(p, 2.0), []),  # doubling integers, clipped at 255: exact on both backends
        (_draw(grayscale=1), lambda p: F.rgb_to_grayscale(p, 3), [("gray", 1.0)]),
        (_draw(blur_sigma=1.3), lambda p: F.gaussian_blur(p, [13, 13], [1.3, 1.3]), [("blur", 1.0)]),
        (_draw(blur_sigma=0.1), lambda p: F.gaussian_blur(p, [13, 13], [0.1, 0.1]), [("blur", 1.0)]),
        (_draw(solarize=1), lambda p: F.solarize(p, 128), [("solarize", 1.0)]),
        (_draw(grayscale=1, blur_sigma=0.7, solarize=1),
         lambda p: F.solarize(F.gaussian_blur(F.rgb_to_grayscale(p, 3), [13, 13], [0.7, 0.7]), 128),
         [("gray", 1.0), ("blur", 1.0), ("solarize", 1.0)]),
    ]  # fmt: skip
    for image in (noise, _photo(24)):  # no hue strength: as torchvision's ColorJitter, no hue operation
        outs = _dali_views(image, [draw for draw, _, _ in cases], color_jitter=(0.4, 0.4, 0.2, 0.0))
        pil = Image.fromarray(image)
        for k, ((_, fn, steps), got) in enumerate(zip(cases, outs)):
            expected = np.asarray(fn(pil), dtype=np.float64)
            assert np.abs(got - expected).max() <= _rounding_bound(steps), (k, np.abs(got - expected).max())
        # the drawn order is applied: brightness-then-contrast is not contrast-then-brightness
        other = np.asarray(F.adjust_saturation(F.adjust_brightness(F.adjust_contrast(pil, 0.6), 1.3), 1.1), float)
        assert np.abs(outs[5] - other).max() > _rounding_bound(bc)


def _hue_test_image(rng: np.random.Generator) -> np.ndarray:
    """24 x 24 RGB: random pixels (every extreme), greys (black and white included), saturated colours (one channel
    255, one 0: the six primaries and secondaries included), near-greys (chroma 1 or 2: the hue is most sensitive)
    and a photograph's pixels."""
    image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (4, 24), dtype=np.uint8)
    grey[0, :2] = (0, 255)
    image[6:10] = grey[..., None]
    hi = rng.integers(0, 3, 96)
    lo = (hi + rng.integers(1, 3, 96)) % 3
    sat = np.zeros((96, 3), np.uint8)
    sat[np.arange(96), hi] = 255
    sat[np.arange(96), 3 - hi - lo] = rng.integers(0, 256, 96)
    sat = sat.reshape(4, 24, 3)
    sat[0, :6] = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    image[10:14] = sat
    base = rng.integers(2, 254, (4, 24, 1))
    image[14:18] = np.clip(base + rng.integers(-1, 2, (4, 24, 3)), 0, 255).astype(np.uint8)
    image[18:24] = _photo(24)[9:15]
    return image


@needs_dali
def test_dali_hue_is_torchvisions_hsv_shift():
    """The DALI hue shift against torchvision's ``adjust_hue`` on the PIL image (what ColorJitter runs on the
    torch backend: PIL's 8-bit HSV, the uint8 hue channel shifted by int(255 h) modulo 256, even for h = 0), for
    shifts of either sign up to +-0.5, on grey, saturated, near-grey, random and photographic pixels; and the
    hue shift at each position of the drawn order, with operations before and after it.

    Bound: the DALI path reproduces PIL's hue and saturation bytes (one hue byte off would move a value by up to
    6 levels), so what is left is the final rounding of each value to 8 bits: one level (then the blends of
    :func:`_rounding_bound`), plus float32 normalising/denormalising."""
    import torchvision.transforms.functional as F

    rng = np.random.default_rng(11)
    image = _hue_test_image(rng)
    order = ("hue", "brightness", "contrast", "saturation")
    shifts = [0.0, 0.07, -0.07, 0.1, -0.1, *rng.uniform(-0.5, 0.5, 3), 0.4999, -0.4999, 0.5, -0.5]
    shifts = [float(np.float32(h)) for h in shifts]  # the value the graph receives (a float32 draw)
    cases = [(_jitter(order, hue=h), lambda p, h=h: F.adjust_hue(p, h), [("hue", 1.0)]) for h in shifts]
    turn = 0.25
    # the hue shift at every position of the drawn order, the other operations the identity
    for k in (1, 2, 3):
        at_k = order[1:k + 1] + ("hue",) + order[k + 1:]
        cases.append((_jitter(at_k, hue=turn), lambda p: F.adjust_hue(p, turn), [("hue", 1.0)]))
    # operations before and after it, in the drawn order. Before: brightness 2 doubles integers (clipped at 255)
    # on both backends, so the hue shift starts from the same pixels (see the exact case in
    # test_dali_view_operations_equal_torchvision); an operation rounding differently before it could move a
    # near-grey pixel's hue anywhere. After: any operation (the blend bounds of _rounding_bound).
    bcs = [("brightness", 1.3), ("contrast", 0.6), ("saturation", 1.1)]
    cases += [
        (_jitter(order, hue=turn, brightness=1.3, contrast=0.6, saturation=1.1),
         lambda p: F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(F.adjust_hue(p, turn), 1.3), 0.6), 1.1),
         [("hue", 1.0), *bcs]),
        (_jitter(("brightness", "hue", "saturation", "contrast"), hue=turn, brightness=2.0, saturation=0.5),
         lambda p: F.adjust_saturation(F.adjust_hue(F.adjust_brightness(p, 2.0), turn), 0.5),
         [("hue", 1.0), ("saturation", 0.5)]),
        (_jitter(("contrast", "brightness", "hue", "saturation"), hue=turn, brightness=2.0, saturation=0.5),
         lambda p: F.adjust_saturation(F.adjust_hue(F.adjust_brightness(p, 2.0), turn), 0.5),
         [("hue", 1.0), ("saturation", 0.5)]),
        (_jitter(("saturation", "contrast", "brightness", "hue"), hue=turn, brightness=2.0),
         lambda p: F.adjust_hue(F.adjust_brightness(p, 2.0), turn), [("hue", 1.0)]),
    ]  # fmt: skip
    outs = _dali_views(image, [draw for draw, _, _ in cases])
    pil = Image.fromarray(image)
    for (draw, fn, steps), got in zip(cases, outs):
        err = np.abs(got - np.asarray(fn(pil), dtype=np.float64))
        assert err.max() <= _rounding_bound(steps), (draw, err.max(), np.unravel_index(err.argmax(), err.shape))
    for h, got in zip(shifts, outs):
        assert np.abs(got[6:10] - image[6:10]).max() < 1e-3, h  # greys keep their value
        if abs(h) >= 0.07:  # and the shift does something to the saturated colours
            assert np.abs(got[10:14] - image[10:14]).max() >= 50, h
    # the order is the drawn one: saturation-then-hue is not hue-then-saturation
    other = np.asarray(F.adjust_hue(F.adjust_saturation(F.adjust_brightness(pil, 2.0), 0.5), turn), np.float64)
    for got in outs[-3:-1]:
        assert np.abs(got - other).max() > _rounding_bound([("hue", 1.0), ("saturation", 0.5)])


# ------------------------------------------------------------------------------------------------------------
# distributions of the draws


def _torchvision_draws(cfg: DataConfig, view: int, n: int, monkeypatch) -> list[dict]:
    """What the torch backend's transform of ``view`` applies to n samples (seeded per sample as the loader
    does), recorded by spying on torchvision's functional operations (which then leave the image as it is)."""
    import torchvision.transforms.functional as F

    record: dict = {"order": []}
    spies = {
        "adjust_brightness": "brightness", "adjust_contrast": "contrast", "adjust_saturation": "saturation",
        "adjust_hue": "hue", "rgb_to_grayscale": "grayscale", "gaussian_blur": "blur_sigma", "solarize": "solarize",
    }  # fmt: skip

    def spy(name):
        def fn(img, *args, **kw):
            if name == "blur_sigma":
                value = (args[1] if len(args) > 1 else kw["sigma"])[0]
            elif name == "grayscale":
                value = 1.0
            else:
                value = args[0]
            record["order"].append(name)
            record[name] = float(value)
            return img

        return fn

    for attr, name in spies.items():
        monkeypatch.setattr(F, attr, spy(name))
    transform = TrainTransform(cfg, view)
    img = Image.new("RGB", (8, 8))
    out = []
    for seed in range(n):
        record = {"order": []}
        with seeded(10_000 + seed):
            transform(img)
        out.append(record)
    return out


def _dali_draws(cfg: DataConfig, view: int, n: int) -> list[dict]:
    """The DALI backend's draws for ``view``, turned into the same records."""
    from fastkd.data.dali_loader import VIEW_COLOUR_FIELDS
    from fastkd.data.dali_loader import draw_view_colour

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        d = dict(zip(VIEW_COLOUR_FIELDS, draw_view_colour(rng, cfg, view).tolist()))
        record: dict = {"order": []}
        if d["jitter"]:
            for k in range(4):
                name = JITTER_OPS[int(d[f"order{k}"])]
                record["order"].append(name)
                record[name] = d[name]
        for name in ("grayscale", "blur_sigma", "solarize"):
            if d[name]:
                record["order"].append(name)
                record[name] = d[name]
        out.append(record)
    return out


def _check_frequency(hits: int, n: int, p: float, what) -> None:
    if p in (0.0, 1.0):
        assert hits == p * n, what
    else:
        assert abs(hits / n - p) <= Z * math.sqrt(p * (1 - p) / n), (what, hits / n, p)


def _check_uniform(values: np.ndarray, lo: float, hi: float, what) -> None:
    """Range, mean and variance of a sample from Uniform[lo, hi] (bounds: Z standard errors of each estimate)."""
    n, w = len(values), hi - lo
    assert values.min() >= lo - 1e-6 and values.max() <= hi + 1e-6, what
    assert abs(values.mean() - (lo + hi) / 2) <= Z * w / math.sqrt(12 * n), (what, values.mean())
    var_se = math.sqrt(w**4 * (1 / 80 - 1 / 144) / n)  # sd of the sample variance: (mu4 - sigma^4) / n
    assert abs(values.var() - w * w / 12) <= Z * var_se, (what, values.var())
    assert values.max() - values.min() > w * (1 - 10 / n), what  # reaches both ends (P(miss) ~ e^-10)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_view_draws_follow_the_official_distribution(backend, monkeypatch):
    n = 2000
    cfg = DataConfig.from_any(dict(BYOL, img_size=8))
    for view in (0, 1):
        records = _torchvision_draws(cfg, view, n, monkeypatch) if backend == "torch" else _dali_draws(cfg, view, n)
        expected = EXPECTED_P[view]
        jittered = [r for r in records if "brightness" in r]
        _check_frequency(len(jittered), n, expected["jitter"], (view, "jitter"))
        for name in ("grayscale", "solarize"):
            _check_frequency(sum(name in r for r in records), n, expected[name], (view, name))
        blurred = [r["blur_sigma"] for r in records if "blur_sigma" in r]
        _check_frequency(len(blurred), n, expected["blur"], (view, "blur"))
        for name in JITTER_OPS:
            assert all(name in r for r in jittered), name  # the four operations together, or none
            _check_uniform(np.array([r[name] for r in jittered]), *EXPECTED_RANGE[name], (view, name))
        if len(blurred) > 100:
            _check_uniform(np.array(blurred), *EXPECTED_RANGE["blur_sigma"], (view, "blur_sigma"))
        # the jitter order: every operation equally often at every position (a uniform permutation)
        m = len(jittered)
        for pos in range(4):
            for name in JITTER_OPS:
                hits = sum(r["order"][pos] == name for r in jittered)
                _check_frequency(hits, m, 0.25, (view, pos, name))
        # the fixed order of the rest: jitter, grayscale, blur, solarize
        rank = {name: k for k, name in enumerate(("jitter", "grayscale", "blur_sigma", "solarize"))}
        for r in records:
            ranks = [rank.get(name, 0) for name in r["order"]]
            assert ranks == sorted(ranks), r["order"]


# ------------------------------------------------------------------------------------------------------------
# the loaders and the method


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_views_reach_sdssl(square_folder, backend):
    """Two views per batch, augmented differently and differently from plain crops; the SDSSL method takes
    the batch as its two views."""
    from fastkd.methods import build

    cfg = base_cfg(square_folder, backend, seed=4, batch_size=10, **BYOL)
    batch = next(iter(build_loader(cfg, "train")))
    x1, x2 = batch["images"]
    assert x1.shape == x2.shape == (10, 3, 32, 32) and not torch.equal(x1, x2)
    off = dict(color_jitter=(0.0,) * 4, grayscale=0.0, gaussian_blur=0.0, solarize=0.0)
    plain = next(iter(build_loader(dict(cfg, **off), "train")))["images"]
    assert not torch.equal(plain[0], x1) and not torch.equal(plain[1], x2)
    import timm

    student = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                                num_heads=2, num_classes=0)
    method = build("sdssl", student=student, variant="byol", out_dim=8, proj_hidden=16, proj_hidden_last=16,
                   pred_hidden=16)
    out = method(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
