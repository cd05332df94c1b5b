"""The view parameters a loader records (fastkd.data.record) describe the views it delivers, the teacher cache
stores them, and a loader driven by records (``loader.replay``) delivers what the records say: the drawn views bit
for bit when they are unedited, the edited views when a crop window, flip, lambda or partner is changed (also in a
cache's shard). References: PIL and timm's operation functions from the record alone, and for DALI (whose resampler
is not PIL's) the exact values of linear ramp images."""

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


def _normalise(img: Image.Image, mean=MEAN, std=STD) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    mean = torch.tensor([255 * m for m in mean]).view(3, 1, 1)
    std = torch.tensor([255 * s for s in std]).view(3, 1, 1)
    return (x - mean) / std


def _apply_ra(img: Image.Image, ops, args, fill, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """The recorded RandAugment operations applied with timm's operation functions and the recorded arguments."""
    from timm.data.auto_augment import LEVEL_TO_ARG
    from timm.data.auto_augment import NAME_TO_OP

    for op, arg in zip(ops.tolist(), args.tolist()):
        if op < 0:
            continue
        name = TIMM_INC_OPS[op]
        level = () if LEVEL_TO_ARG[name] is None else (int(arg) if name.startswith(("Posterize", "Solarize")) else arg,)
        img = NAME_TO_OP[name](img, *level, fillcolor=fill, resample=resample)
    return img


_PIL = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _records(batch) -> np.ndarray:
    """A delivered batch's records as ``loader.replay`` takes them (index, pad, params)."""
    p = batch["view_params"]
    out = np.zeros(len(p), dtype=[("index", np.int64), ("pad", np.bool_), ("params", p.dtype)])
    out["index"], out["pad"], out["params"] = batch["index"].numpy(), batch["is_pad"].numpy(), p
    return out


def _epoch(loader, epoch: int) -> list[dict]:
    loader.load_state_dict({"epoch": epoch, "position": 0})
    return list(loader)


def _record_epochs(loader, epochs: int) -> tuple[dict[int, np.ndarray], dict[int, list[dict]]]:
    """What the loader draws in ``epochs`` epochs: per epoch the records of every position, and the batches."""
    loader.record_views = loader.keep_clean_images = True
    loader.replay = None
    batches = {e: _epoch(loader, e) for e in range(epochs)}
    return {e: np.concatenate([_records(b) for b in bs]) for e, bs in batches.items()}, batches


def _replay(loader, rows: dict[int, np.ndarray], epochs: int) -> dict[int, list[dict]]:
    loader.replay = lambda e, start, count: rows[e][start:start + count]
    try:
        return {e: _epoch(loader, e) for e in range(epochs)}
    finally:
        loader.replay = None


def _assert_same_batches(a: dict[int, list[dict]], b: dict[int, list[dict]]) -> None:
    for e in a:
        assert len(a[e]) == len(b[e])
        for x, y in zip(a[e], b[e]):
            for key in ("images", "clean_images", "targets", "labels", "index", "is_pad"):
                assert torch.equal(x[key], y[key]), (e, key)
            assert x["view_params"].tobytes() == y["view_params"].tobytes()  # NaN-aware: bit for bit


def _expected_view(loader, index: int, p, i: int) -> Image.Image:
    """View 0 of sample ``index`` rebuilt from its record ``p[i]`` with PIL and timm's operation functions."""
    cfg = loader.cfg
    size, resample = cfg.img_size, _PIL[cfg.interpolation]
    left, top, w, h = p["crop"][i, 0].tolist()
    img = decode_rgb(loader.source.read(index), 0).crop((left, top, left + w, top + h)).resize((size, size), resample)
    if p["flip"][i, 0]:
        img = ImageOps.mirror(img)
    if "ra_op" in p.dtype.names:
        img = _apply_ra(img, p["ra_op"][i, 0], p["ra_arg"][i, 0], tuple(round(255 * m) for m in cfg.mean), resample)
    return img


def _check_batch(loader, batch, p, seen) -> None:
    """Every delivered view of ``batch`` is what its records ``p`` describe: the PIL view (outside the erased box),
    the erased box's noise (torch's normal draws under the recorded seed), the Mixup/CutMix of the recorded partner,
    lambda and box, and the soft target."""
    cfg = loader.cfg
    size = cfg.img_size
    clean, mixed = batch["clean_images"], batch["images"]
    index = batch["index"].numpy()
    names = p.dtype.names
    for i, idx in enumerate(index.tolist()):
        expected = _normalise(_expected_view(loader, idx, p, i), cfg.mean, cfg.std)
        outside = torch.ones(size, size, dtype=torch.bool)
        if "erase" in names and p["erase"][i, 0, 2] > 0:
            el, et, ew, eh = p["erase"][i, 0].tolist()
            outside[et:et + eh, el:el + ew] = False
            noise = torch.empty(3, eh, ew).normal_(generator=torch.Generator().manual_seed(int(p["erase_seed"][i, 0])))
            assert torch.equal(clean[i][:, et:et + eh, el:el + ew], noise), f"erasing noise of {idx}"
            seen["erase"] += 1
        assert_close_rel(clean[i][:, outside], expected[:, outside], tol(torch.float32), f"view {idx}", scale=3.0)
        seen["flip"] += int(p["flip"][i, 0])
        seen["ra"] += int((p["ra_op"][i, 0] >= 0).sum()) if "ra_op" in names else 0
    if "mix_partner" not in names:
        return
    smooth = cfg.label_smoothing
    for i in range(len(index)):
        j, lam = int(p["mix_partner"][i]), float(p["mix_lam"][i])
        if j < 0:
            assert lam == 1.0 and torch.equal(mixed[i], clean[i])
            j = i
        bl, bt, bw, bh = p["mix_box"][i].tolist()
        if bw >= 0:  # CutMix: the partner's pixels inside the box
            seen["cutmix"] += 1
            expected = clean[i].clone()
            expected[:, bt:bt + bh, bl:bl + bw] = clean[j][:, bt:bt + bh, bl:bl + bw]
            assert torch.equal(mixed[i], expected)
        else:
            seen["mixup"] += int(lam != 1.0)
            assert_close_rel(mixed[i], lam * clean[i].double() + (1 - lam) * clean[j].double(),
                             tol(torch.float32, 2), f"mix of {index[i]}", scale=3.0)
        labels = batch["labels"]
        c = batch["targets"].shape[1]
        target = torch.full((c,), smooth / c, dtype=torch.float64)
        target[int(labels[i])] += lam * (1 - smooth)
        target[int(labels[j])] += (1 - lam) * (1 - smooth)
        assert_close_rel(batch["targets"][i], target, tol(torch.float32), f"target of {index[i]}")


def _edit(rows: dict[int, np.ndarray], size: int, batch: int = 5) -> dict[str, tuple[int, int]]:
    """Edit the records in place: a crop window moved right by one pixel, a flip toggled, a Mixup lambda, a CutMix
    box and a Mixup partner changed. Returns where (epoch, position) each edit is."""
    where: dict[str, tuple[int, int]] = {}
    for e, r in rows.items():
        p = r["params"]
        for k in range(len(r)):
            left, top, w, h = p["crop"][k, 0].tolist()
            if "crop" not in where and w > 1:
                p["crop"][k, 0] = (left + 1, top, w - 1, h)
                where["crop"] = (e, k)
            elif "flip" not in where:
                p["flip"][k, 0] = ~p["flip"][k, 0]
                where["flip"] = (e, k)
            if "mix_partner" not in p.dtype.names or p["mix_partner"][k] < 0:
                continue
            box = p["mix_box"][k]
            if "lam" not in where and box[2] < 0 and p["mix_lam"][k] != 1.0:
                p["mix_lam"][k] = 0.25 + 0.5 * p["mix_lam"][k]
                where["lam"] = (e, k)
            elif "box" not in where and box[2] >= 0:
                p["mix_box"][k] = (0, 0, size // 2, size // 3)
                where["box"] = (e, k)
            elif "partner" not in where and box[2] < 0 and p["mix_lam"][k] != 1.0:
                own, old = k % batch, int(p["mix_partner"][k])
                p["mix_partner"][k] = next(q for q in range(batch - 1) if q not in (own, old))  # another sample
                where["partner"] = (e, k)
    return where


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_torch_loader_replays_records_and_follows_edits(odd_folder, mode):
    """Record three epochs (RandAugment, erasing, Mixup/CutMix in ``mode``), check every view against its record,
    replay the records (bit for bit the drawn batches), then replay edited records: the views follow the edits."""
    size = 24
    cfg = dict(root=str(odd_folder), img_size=size, batch_size=5, num_workers=0, backend="torch", device="cpu",
               scale=(0.2, 1.0), interpolation="bicubic", randaugment=2, random_erasing=0.5, mixup=0.8, cutmix=1.0,
               mixup_mode=mode, mixup_switch_prob=0.5, label_smoothing=0.1, seed=3)
    loader = build_loader(cfg, "train")
    rows, drawn = _record_epochs(loader, 3)
    seen = {"flip": 0, "ra": 0, "erase": 0, "cutmix": 0, "mixup": 0}
    for e in drawn:
        for batch in drawn[e]:
            _check_batch(loader, batch, batch["view_params"], seen)
    assert all(v > 0 for v in seen.values()), seen  # every kind of parameter was exercised

    _assert_same_batches(drawn, _replay(loader, rows, 3))  # nothing drawn, the same batches

    edited = {e: r.copy() for e, r in rows.items()}
    where = _edit(edited, size)
    assert set(where) == {"crop", "flip", "lam", "box", "partner"}, where
    replayed = _replay(loader, edited, 3)
    for e in replayed:
        start = 0
        for batch in replayed[e]:
            n = len(batch["index"])
            assert batch["view_params"].tobytes() == edited[e]["params"][start:start + n].tobytes()
            _check_batch(loader, batch, batch["view_params"], seen)
            start += n
    for what, (e, k) in where.items():  # each edit changed what was delivered
        b, i = divmod(k, 5)
        key = "clean_images" if what in ("crop", "flip") else "images"
        assert not torch.equal(replayed[e][b][key][i], drawn[e][b][key][i]), what


def test_an_edited_cache_is_replayed(tmp_path, data):  # noqa: F811
    """Edit a crop window, a flip and a lambda in a built cache's shard (checksum updated): the cached run's loader
    delivers the edited views, and the view check then refuses the batch (the teacher saw another view)."""
    from fastkd.cache import TeacherCache
    from fastkd.engine.trainer import Trainer

    cache_dir = tmp_path / "cache"
    build_cache(_cfg("hinton_tiny", tmp_path, data, "build"), cache_dir, epochs=1, block_batches=BLOCK,
                progress=False)
    cache = TeacherCache.open(cache_dir)
    name = cache.shard_name(0, 0, 0)
    records = np.array(cache.rows(0, 0, 0, cache.block_rows(0)))
    p = records["params"]
    assert (p["crop"][:, 0, 2:] > 1).all() and (p["mix_partner"][:16] >= 0).all()
    left, top, w, h = p["crop"][0, 0].tolist()
    p["crop"][0, 0] = (left + 1, top, w - 1, h)
    p["flip"][1, 0] = ~p["flip"][1, 0]
    p["mix_lam"][2] = 0.5 * p["mix_lam"][2] + 0.25
    cache.manifest["shards"][name] = cache.write_shard(name, records)
    cache.write_manifest()

    trainer = Trainer(_cfg("hinton_tiny", tmp_path, data, "views", f"teachers.cache={cache_dir}", "train.steps=3"),
                      console=False)
    loader = trainer.train_loader
    loader.set_epoch(0)
    loader.loader.keep_clean_images = loader.loader.record_views = True
    batch = next(iter(loader.loader))  # the wrapped loader, driven by the cache's records
    assert batch["view_params"].tobytes() == p[:16].tobytes()
    seen = {"flip": 0, "ra": 0, "erase": 0, "cutmix": 0, "mixup": 0}
    _check_batch(loader.loader, batch, p[:16], seen)
    with pytest.raises(CacheError, match=r"epoch 0 position [012] \(sample \d+\): the view differs"):
        loader.attach(batch, 0, 0)
    trainer.close()


def test_a_cache_of_an_older_format_is_refused(tmp_path):
    from fastkd.cache import TeacherCache

    (tmp_path / "manifest.json").write_text('{"format": "fastkd-teacher-cache/2"}')
    with pytest.raises(CacheError) as exc:
        TeacherCache.open(tmp_path)
    msg = str(exc.value)
    assert "'fastkd-teacher-cache/2'" in msg and "rebuild it" in msg and "\n" not in msg


# ---- DALI (its CPU graph): one pipeline for the module

RAMP_SIZE = 24


def _ramp(height: int, width: int) -> np.ndarray:
    """An exactly linear image: channel c at (x, y) is x + 2 y + 20 c + 10 (lossless PNG, below 255)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x + 2 * y + 20 * c + 10 for c in range(3)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def dali_ramp_loader(tmp_path_factory):
    if not dali_available():
        pytest.skip("needs NVIDIA DALI")
    root = tmp_path_factory.mktemp("ramps")
    rng = np.random.default_rng(11)
    for i in range(10):
        h, w = int(rng.integers(14, RAMP_SIZE + 1)), int(rng.integers(14, RAMP_SIZE + 1))  # windows up-sampled only
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_ramp(h, w)).save(d / f"{i:02d}.png")
    cfg = dict(root=str(root), img_size=RAMP_SIZE, batch_size=5, num_workers=1, backend="dali", device="cpu",
               scale=(0.3, 1.0), interpolation="bilinear", random_erasing=0.5, mixup=0.8, cutmix=1.0,
               mixup_switch_prob=0.5, seed=5)
    return build_loader(cfg, "train")


def _check_ramp_batch(loader, batch, p) -> int:
    """Each view against the exact ramp: the recorded window (never larger than the view: plain linear interpolation,
    exact on a linear image), mirrored when recorded; the border pixels (the resampler's edge handling) and the erased
    box left out. Returns the number of views checked."""
    s = RAMP_SIZE
    mean = torch.tensor(loader.cfg.mean, dtype=torch.float64).view(3, 1, 1) * 255
    std = torch.tensor(loader.cfg.std, dtype=torch.float64).view(3, 1, 1) * 255
    for i in range(len(batch["index"])):
        left, top, w, h = p["crop"][i, 0].tolist()
        u = torch.arange(s, dtype=torch.float64)
        if p["flip"][i, 0]:
            u = u.flip(0)
        x = left + (u + 0.5) * w / s - 0.5
        y = top + (torch.arange(s, dtype=torch.float64) + 0.5) * h / s - 0.5
        expected = x.view(1, 1, s) + 2 * y.view(1, s, 1) + 20 * torch.arange(3).view(3, 1, 1) + 10
        got = batch["clean_images"][i].double() * std + mean  # back to pixel levels
        mx, my = int(np.ceil(s / w)) + 2, int(np.ceil(s / h)) + 2
        inside = torch.zeros(s, s, dtype=torch.bool)
        inside[my:s - my, mx:s - mx] = True
        if p["erase"][i, 0, 2] > 0:
            el, et, ew, eh = p["erase"][i, 0].tolist()
            inside[et:et + eh, el:el + ew] = False
        # uint8 rounding (half a level), DALI's fp32 sampling coordinates (a 64th of a level at most over 24 px),
        # the fp32 normalisation round trip; a window moved by one pixel is one level off
        assert_close_rel(got[:, inside], expected[:, inside], tol(torch.float32), f"view {int(batch['index'][i])}",
                         scale=255.0, atol=0.5 + 1 / 64)
    return len(batch["index"])


def test_dali_loader_replays_records_and_follows_edits(dali_ramp_loader):
    """DALI's CPU graph: the drawn views are the recorded windows (exact ramp values), the replayed records give the
    drawn batches bit for bit, and edited records (crop window, flip, lambda, CutMix box, partner) are followed."""
    loader = dali_ramp_loader
    rows, drawn = _record_epochs(loader, 2)
    for e in drawn:
        for batch in drawn[e]:
            _check_ramp_batch(loader, batch, batch["view_params"])
    _assert_same_batches(drawn, _replay(loader, rows, 2))

    edited = {e: r.copy() for e, r in rows.items()}
    where = _edit(edited, RAMP_SIZE)
    assert {"crop", "flip", "lam"} <= set(where), where
    replayed = _replay(loader, edited, 2)
    checked = 0
    for e in replayed:
        for batch in replayed[e]:
            p = batch["view_params"]
            checked += _check_ramp_batch(loader, batch, p)
            # the mixes, with the views themselves as the clean images (checked above)
            n = len(batch["index"])
            for i in range(n):
                j, lam = int(p["mix_partner"][i]), float(p["mix_lam"][i])
                j = i if j < 0 else j
                bl, bt, bw, bh = p["mix_box"][i].tolist()
                clean, mixed = batch["clean_images"], batch["images"]
                if bw >= 0:
                    expected = clean[i].clone()
                    expected[:, bt:bt + bh, bl:bl + bw] = clean[j][:, bt:bt + bh, bl:bl + bw]
                    assert torch.equal(mixed[i], expected)
                else:
                    assert_close_rel(mixed[i], lam * clean[i].double() + (1 - lam) * clean[j].double(),
                                     tol(torch.float32, 2), "mix", scale=3.0)
    assert checked == sum(len(r) for r in edited.values())
    for what, (e, k) in where.items():
        b, i = divmod(k, 5)
        key = "clean_images" if what in ("crop", "flip") else "images"
        assert not torch.equal(replayed[e][b][key][i], drawn[e][b][key][i]), what


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


@pytest.mark.parametrize("box, optional, ok", [
    ((0, 0, 8, 6), False, True), ((2, 1, 6, 5), False, True),  # the whole 8x6 image; flush with its far corner
    ((3, 0, 6, 6), False, False), ((0, 1, 8, 6), False, False), ((-1, 0, 4, 4), False, False),
    ((0, 0, 0, 4), False, False),  # a crop window is at least 1x1
    ((0, 0, 0, 0), True, True), ((5, 5, -1, -1), True, True),  # an empty box; no box
    ((7, 0, 2, 2), True, False), ((0, 0, 3, -1), True, False),
])
def test_recorded_boxes_must_fit_the_image(box, optional, ok):
    """Every replayed crop window and erasing / CutMix box is checked against the image it is cut from."""
    from fastkd.data.record import recorded_box

    if ok:
        assert recorded_box(np.array(box), 6, 8, "crop window", optional=optional) == box
    else:
        with pytest.raises(ValueError, match=r"recorded crop window \(left, top, width, height\) = .* does not fit "
                                             r"the 8x6 image"):
            recorded_box(np.array(box), 6, 8, "crop window", optional=optional)
