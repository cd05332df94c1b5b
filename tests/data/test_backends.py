"""DALI (CPU graph) and torchvision give the same batches: format, labels, geometry, pixels."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.data import build_loader
from fastkd.data.config import IMAGENET_MEAN
from fastkd.data.config import IMAGENET_STD
from fastkd.data.prepare import skimage_photo_paths
from fastkd.data.transforms import center_crop_box
from fastkd.data.transforms import resized_shape
from tests.data.conftest import BACKEND_PARAMS
from tests.data.conftest import BACKENDS
from tests.data.conftest import base_cfg
from tests.data.conftest import needs_dali

_DTYPES = ("dtype", [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)])


def collect(loader):
    batches = list(loader)
    return batches, torch.cat([b["index"] for b in batches]), torch.cat([b["labels"] for b in batches])


def denorm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return x.float() * std + mean


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize(*_DTYPES)
@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_format(folder, backend, dtype, split):
    loader = build_loader(base_cfg(folder, backend, dtype=dtype[0]), split)
    batches, index, labels = collect(loader)
    n = 21 if split == "train" else 9
    assert loader.backend == backend and loader.num_classes == 3
    assert len(batches) == len(loader) == -(-n // 4)
    assert sorted(index.tolist()) == list(range(n))
    for b in batches:
        x = b["images"]
        assert x.dtype == dtype[1] and x.device.type == "cpu" and x.is_contiguous()
        assert x.shape == (len(b["labels"]), 3, 32, 32)
        assert b["labels"].dtype == torch.int64 and b["is_pad"].dtype == torch.bool and "targets" not in b
        # normalised: pixel 0..255 maps into [(0 - mean)/std, (255 - mean)/std]
        assert x.float().min() >= -2.2 and x.float().max() <= 2.7 and x.float().std() > 0.2
    # class index = sorted folder name, whatever the order the folders were written in
    names = np.array(loader.source.names)[index.numpy()]
    expected = [sorted(["cat", "astronaut", "coffee"]).index(os.path.basename(os.path.dirname(p))) for p in names]
    assert labels.tolist() == expected


@needs_dali
@pytest.mark.parametrize("split", ["train", "val"])
def test_same_samples_same_order_both_backends(folder, split):
    got = {b: collect(build_loader(base_cfg(folder, b, seed=7), split))[1:] for b in BACKENDS}
    assert torch.equal(got["dali"][0], got["torch"][0])  # identical order (shuffled for train)
    assert torch.equal(got["dali"][1], got["torch"][1])
    if split == "train":
        assert got["dali"][0].tolist() != sorted(got["dali"][0].tolist())


@needs_dali
def test_validation_outputs_agree(folder):
    """Same resize-shorter + centre-crop geometry: the two backends differ only by resampling rounding."""
    out = {}
    for b in BACKENDS:
        batches, _, _ = collect(build_loader(base_cfg(folder, b, img_size=48, crop_pct=0.875), "val"))
        out[b] = denorm(torch.cat([x["images"] for x in batches]))
    diff = (out["dali"] - out["torch"]).abs()
    print(f"val dali vs torch: mean |diff| {diff.mean():.3f}, max {diff.max():.1f} (0..255 units)")
    assert diff.mean() < 1.0 and diff.max() < 32
    # a one-pixel shift of the crop would show up as a far larger mean error
    shifted = (out["dali"][..., 1:] - out["torch"][..., :-1]).abs().mean()
    assert shifted > 2 * diff.mean()


@needs_dali
def test_validation_geometry_matches_dali():
    """fastkd's resize / centre-crop rounding rules reproduce DALI's, including half-pixel cases."""
    from nvidia.dali import fn
    from nvidia.dali import pipeline_def

    shapes = [(77, 101), (101, 77), (375, 500), (427, 640), (64, 64), (50, 99)]
    imgs = [np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8) for i, (h, w) in enumerate(shapes)]

    @pipeline_def(batch_size=len(imgs), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(name="x", layout="HWC")
        r = fn.resize(x, resize_shorter=73, antialias=True)
        return r, fn.crop(r, crop=(64, 64), crop_pos_x=0.5, crop_pos_y=0.5)

    p = pipe()
    p.build()
    p.feed_input("x", imgs)
    resized, cropped = p.run()
    for i, (h, w) in enumerate(shapes):
        r = np.array(resized[i])
        assert r.shape[:2] == resized_shape(h, w, 73)
        left, top, right, bottom = center_crop_box(r.shape[0], r.shape[1], 64)
        np.testing.assert_array_equal(np.array(cropped[i]), r[top:bottom, left:right])


@needs_dali
def test_real_jpegs_decode_identically():
    """scikit-image's JPEG photographs: DALI's CPU decoder and PIL give the same pixels."""
    from nvidia.dali import fn
    from nvidia.dali import pipeline_def
    from nvidia.dali import types

    paths = skimage_photo_paths("jpeg")
    assert len(paths) >= 3

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def pipe():
        return fn.decoders.image(fn.external_source(name="x", dtype=types.UINT8, ndim=1), output_type=types.RGB)

    p = pipe()
    p.build()
    p.feed_input("x", [np.fromfile(path, dtype=np.uint8) for path in paths])
    (decoded,) = p.run()
    for i, path in enumerate(paths):
        ref = np.asarray(Image.open(path).convert("RGB"))
        got = np.array(decoded[i])
        assert got.shape == ref.shape
        assert np.abs(got.astype(np.int16) - ref).max() <= 1, path


@needs_dali
def test_full_image_train_crop_agrees_and_flip(square_folder):
    """At the deterministic limit (whole square image, no flip) the training graphs of both backends
    give the same images; hflip=1 gives exactly the mirrored images."""
    common = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), shuffle=False, img_size=40)
    out = {}
    for b in BACKENDS:
        for flip in (0.0, 1.0):
            batches, index, _ = collect(build_loader(base_cfg(square_folder, b, hflip=flip, **common), "train"))
            out[b, flip] = denorm(torch.cat([x["images"] for x in batches]))
    diff = (out["dali", 0.0] - out["torch", 0.0]).abs()
    assert diff.mean() < 1.5 and diff.max() < 40
    for b in BACKENDS:
        assert torch.equal(out[b, 1.0], out[b, 0.0].flip(-1)), f"{b}: hflip=1 is not the exact mirror"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_random_resized_crop_varies(square_folder, backend):
    loader = build_loader(base_cfg(square_folder, backend, shuffle=False, scale=(0.1, 0.3)), "train")
    a = torch.cat([b["images"] for b in loader])
    b = torch.cat([b["images"] for b in loader])
    assert a.shape == b.shape == (10, 3, 32, 32)
    assert (a - b).abs().mean() > 0.05  # a new crop each epoch


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_multi_view_mode(folder, backend):
    loader = build_loader(base_cfg(folder, backend, num_views=3, scale=(0.2, 0.5)), "train")
    batch = next(iter(loader))
    views = batch["images"]
    assert isinstance(views, list) and len(views) == 3
    assert all(v.shape == (4, 3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert (views[0] - views[1]).abs().mean() > 0.05 and (views[1] - views[2]).abs().mean() > 0.05
    val = next(iter(build_loader(base_cfg(folder, backend, num_views=3), "val")))
    assert isinstance(val["images"], torch.Tensor)  # validation is single-view


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_randaugment_changes_images(square_folder, backend):
    common = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), shuffle=False, hflip=0.0)
    plain = torch.cat([b["images"] for b in build_loader(base_cfg(square_folder, backend, **common), "train")])
    cfg = base_cfg(square_folder, backend, randaugment=2, randaugment_magnitude=9, **common)
    aug = torch.cat([b["images"] for b in build_loader(cfg, "train")])
    assert aug.shape == plain.shape and torch.isfinite(aug).all()
    changed = ((aug - plain).abs().flatten(1).mean(1) > 1e-3).float().mean()
    assert changed >= 0.5  # (an op can be identity-like: not every image must change)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_torch_workers(folder, backend):
    """Multi-process workers (torch) / several threads (DALI) give the same samples as one."""
    one = collect(build_loader(base_cfg(folder, backend, num_workers=1, seed=3), "train"))[1]
    two = collect(build_loader(base_cfg(folder, backend, num_workers=2, seed=3), "train"))[1]
    assert torch.equal(one, two)


@needs_dali
def test_forked_child_survives_dali_garbage(folder):
    """A forked process (DataLoader worker) that collects garbage must not free an inherited DALI
    pipeline: that segfaults. Loaders therefore free their pipelines without reference cycles."""
    import gc

    dali = build_loader(base_cfg(folder, "dali"), "val")
    list(dali)
    del dali
    pid = os.fork()
    if pid == 0:  # the child: what a DataLoader worker's garbage collector would do
        gc.collect()
        os._exit(0)
    import time

    deadline = time.monotonic() + 30  # without the fix the child segfaults or deadlocks
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("forked child hung freeing an inherited DALI pipeline")
    assert done[1] == 0, f"forked child died with status {done[1]}"
    index = torch.cat([b["index"] for b in build_loader(base_cfg(folder, "torch", num_workers=2), "val")])
    assert sorted(index.tolist()) == list(range(9))


@needs_dali
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gpu_pipeline_fails_clearly_without_cuda(folder):
    from fastkd.data.config import DataConfig
    from fastkd.data.dali_loader import build_pipeline

    with pytest.raises(RuntimeError, match="DataConfig.device='cuda'.*CUDA is not available"):
        build_loader(base_cfg(folder, "dali", device="cuda"), "train")
    with pytest.raises(RuntimeError, match="device_id=0.*CUDA is not available"):
        build_pipeline(DataConfig(img_size=32), "train", lambda: [], batch_size=2, device_id=0, seed=0)


@needs_dali
@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu_pipeline(folder):  # pragma: no cover - needs CUDA + DALI
    gpu = collect(build_loader(base_cfg(folder, "dali", device="cuda", img_size=48), "val"))[0]
    cpu = collect(build_loader(base_cfg(folder, "dali", device="cpu", img_size=48), "val"))[0]
    x_gpu = denorm(torch.cat([b["images"].cpu() for b in gpu]))
    x_cpu = denorm(torch.cat([b["images"] for b in cpu]))
    assert gpu[0]["images"].is_cuda
    assert (x_gpu - x_cpu).abs().mean() < 1.5
