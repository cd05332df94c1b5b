"""The view parameters a loader records (fastkd.data.record) describe the views it delivers, the teacher cache
stores them, and a replayed run whose draws differ is refused with one line naming the field, epoch and sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from PIL import ImageOps

from fastkd.cache import CacheError
from fastkd.cache.build import build_cache
from fastkd.config import ConfigError
from fastkd.data import build_loader
from fastkd.data import dali_available
from fastkd.data.transforms import decode_rgb
from tests.cache.test_cache import BLOCK
from tests.cache.test_cache import _cfg
from tests.cache.test_cache import data  # noqa: F401 - the fixture
from tests.utils import assert_close_rel
from tests.utils import tol

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# timm's RandAugment operations of the "inc1" policy, in timm's order (the index ``ra_op`` refers to)
TIMM_INC_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """JPEGs of assorted non-square sizes (the crop window then depends on the image), 2 classes."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(5)
    for i in range(12):
        h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:02d}.jpg", quality=95)
    return root


def _normalise(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    mean = torch.tensor([255 * m for m in MEAN]).view(3, 1, 1)
    std = torch.tensor([255 * s for s in STD]).view(3, 1, 1)
    return (x - mean) / std


def _apply_ra(img: Image.Image, ops, args, fill) -> Image.Image:
    """The recorded RandAugment operations applied with timm's operation functions and the recorded arguments."""
    from timm.data.auto_augment import LEVEL_TO_ARG
    from timm.data.auto_augment import NAME_TO_OP

    for op, arg in zip(ops.tolist(), args.tolist()):
        if op < 0:
            continue
        name = TIMM_INC_OPS[op]
        level = () if LEVEL_TO_ARG[name] is None else (int(arg) if name.startswith(("Posterize", "Solarize")) else arg,)
        img = NAME_TO_OP[name](img, *level, fillcolor=fill, resample=Image.Resampling.BICUBIC)
    return img


@pytest.mark.parametrize("mode", ["batch", "pair"])
def test_recorded_params_describe_the_delivered_views(odd_folder, mode):
    """Rebuild every view of an epoch from its record alone (PIL crop + resize, mirror, timm's operation
    functions, the erased box, the Mixup/CutMix partner, lambda and box) and compare with what the loader gave."""
    size, ra = 24, 2
    cfg = dict(root=str(odd_folder), img_size=size, batch_size=5, num_workers=0, backend="torch", device="cpu",
               scale=(0.2, 1.0), interpolation="bicubic", randaugment=ra, random_erasing=0.5, mixup=0.8, cutmix=1.0,
               mixup_mode=mode, mixup_switch_prob=0.5, seed=3)
    loader = build_loader(cfg, "train")
    loader.record_views = loader.keep_clean_images = True
    fill = tuple(round(255 * m) for m in MEAN)
    seen = {"flip": 0, "ra": 0, "erase": 0, "cutmix": 0, "mixup": 0}
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            p, clean, mixed = batch["view_params"], batch["clean_images"], batch["images"]
            index = batch["index"].numpy()
            for i, idx in enumerate(index.tolist()):
                left, top, w, h = p["crop"][i, 0].tolist()
                img = decode_rgb(loader.source.read(idx), 0).crop((left, top, left + w, top + h))
                img = img.resize((size, size), Image.Resampling.BICUBIC)
                if p["flip"][i, 0]:
                    img = ImageOps.mirror(img)
                img = _apply_ra(img, p["ra_op"][i, 0], p["ra_arg"][i, 0], fill)
                expected = _normalise(img)
                el, et, ew, eh = p["erase"][i, 0].tolist()
                outside = torch.ones(size, size, dtype=torch.bool)
                if ew > 0:
                    outside[et:et + eh, el:el + ew] = False
                    assert not torch.equal(clean[i][:, ~outside], expected[:, ~outside])  # erased: noise there
                assert_close_rel(clean[i][:, outside], expected[:, outside], tol(torch.float32), f"view {idx}",
                                 scale=3.0)
                seen["flip"] += int(p["flip"][i, 0])
                seen["ra"] += int((p["ra_op"][i, 0] >= 0).sum())
                seen["erase"] += int(ew > 0)
            even = len(index) - len(index) % 2
            for i in range(len(index)):
                partner, lam = int(p["mix_with"][i]), float(p["mix_lam"][i])
                if i >= even:
                    assert partner == -1 and lam == 1.0
                    assert torch.equal(mixed[i], clean[i])
                    continue
                j = even - 1 - i
                assert partner == index[j]
                bl, bt, bw, bh = p["mix_box"][i].tolist()
                if bw >= 0:  # CutMix: the partner's pixels inside the box, lambda = the uncovered fraction
                    seen["cutmix"] += 1
                    expected = clean[i].clone()
                    expected[:, bt:bt + bh, bl:bl + bw] = clean[j][:, bt:bt + bh, bl:bl + bw]
                    assert lam == pytest.approx(1 - bw * bh / size**2, rel=1e-6)
                    assert torch.equal(mixed[i], expected)
                else:
                    seen["mixup"] += int(lam != 1.0)
                    assert_close_rel(mixed[i], lam * clean[i].double() + (1 - lam) * clean[j].double(),
                                     tol(torch.float32, 2), f"mix of {index[i]}", scale=3.0)
                # the soft target carries the same lambda and partner
                labels = batch["labels"]
                target = torch.zeros(2, dtype=torch.float64)
                target[int(labels[i])] += lam
                target[int(labels[j])] += 1 - lam
                assert_close_rel(batch["targets"][i], target, tol(torch.float32), f"target of {index[i]}")
    assert all(v > 0 for v in seen.values()), seen  # every kind of parameter was exercised


def test_a_drawn_parameter_that_differs_is_named(tmp_path, data):  # noqa: F811
    from fastkd.engine.trainer import Trainer

    cache_dir = tmp_path / "cache"
    cache = build_cache(_cfg("hinton_tiny", tmp_path, data, "build"), cache_dir, epochs=1, block_batches=BLOCK,
                        progress=False)
    rec = cache.rows(0, 0, 0, 16)["params"]
    assert {"crop", "flip", "mix_with", "mix_lam", "mix_box"} <= set(rec.dtype.names)
    assert (rec["crop"][:, 0, 2:] > 0).all() and (rec["mix_with"] >= 0).all()
    trainer = Trainer(_cfg("hinton_tiny", tmp_path, data, "views", f"teachers.cache={cache_dir}", "train.steps=3"),
                      console=False)
    loader = trainer.train_loader
    loader.set_epoch(0)
    batch = next(iter(loader.loader))
    np.testing.assert_array_equal(batch["view_params"], rec)  # the replayed run draws what the build recorded
    for field, change in (("crop", lambda p: p["crop"].__setitem__((3, 0, 0), p["crop"][3, 0, 0] + 1)),
                          ("mix_lam", lambda p: p["mix_lam"].__setitem__(3, p["mix_lam"][3] * 1.01)),
                          ("flip", lambda p: p["flip"].__setitem__((3, 0), ~p["flip"][3, 0]))):
        params = batch["view_params"].copy()
        change(params)
        with pytest.raises(CacheError) as exc:
            loader.attach(dict(batch, view_params=params), 0, 0)
        msg = str(exc.value)
        assert f"epoch 0 position 3 (sample {int(batch['index'][3])}): view parameter {field} was recorded" in msg
        assert "\n" not in msg
    trainer.close()


@pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI")
def test_a_cache_of_one_backend_is_refused_by_the_other(tmp_path, data):  # noqa: F811
    from fastkd.engine.trainer import Trainer

    cache_dir = tmp_path / "cache"
    build_cache(_cfg("hinton_tiny", tmp_path, data, "build"), cache_dir, epochs=1, block_batches=BLOCK,
                progress=False)
    with pytest.raises(ConfigError, match="views.backend: cache 'torch', this run 'dali'"):
        Trainer(_cfg("hinton_tiny", tmp_path, data, "dali", f"teachers.cache={cache_dir}", "train.steps=3",
                     "data.backend=dali", "data.device=cpu"), console=False)


@pytest.mark.slow
@pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI")
def test_dali_records_and_replays_its_views(tmp_path, data):  # noqa: F811
    """The DALI back end (its CPU graph) with RandAugment and random erasing: the cache records the crop windows,
    flips and RandAugment draws DALI was fed, and the cached run replays them (same losses as the online run)."""
    from tests.cache.test_cache import _losses
    from tests.cache.test_cache import _train

    extra = ["data.backend=dali", "data.device=cpu", "data.randaugment=2", "data.random_erasing=0.5",
             "train.steps=3", "train.epochs=1"]
    online = _train(_cfg("hinton_tiny", tmp_path, data, "online", *extra))
    cache = build_cache(_cfg("hinton_tiny", tmp_path, data, "build", *extra), tmp_path / "c", block_batches=BLOCK,
                        progress=False)
    assert cache.manifest["views"]["backend"] == "dali"
    rec = cache.rows(0, 0, 0, 48)["params"]
    assert (rec["ra_op"] >= 0).any() and (rec["erase"][..., 2] > 0).any() and rec["flip"].any()
    assert ((rec["crop"][:, 0, :2] >= 0) & (rec["crop"][:, 0, 2:] <= 32)).all()
    cached = _train(_cfg("hinton_tiny", tmp_path, data, "cached", *extra, f"teachers.cache={cache.root}"))
    assert _losses(cached) == _losses(online) and len(online.history) == 3
