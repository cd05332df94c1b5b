"""Mixup / CutMix: timm's semantics on the finished batch, soft targets, odd last batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from fastkd.data import build_loader
from fastkd.data import sharding
from tests.data.conftest import BACKEND_PARAMS
from tests.data.conftest import base_cfg
from tests.utils import assert_close_rel
from tests.utils import tol

_DETERMINISTIC = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, shuffle=False)
_MIX_PARAMS = ("mixup, cutmix, smoothing", [(0.8, 0.0, 0.0), (0.0, 1.0, 0.1), (0.8, 1.0, 0.1)])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize(*_MIX_PARAMS)
@pytest.mark.parametrize("batch_size", [4, 3])  # 10 samples: 4,4,2 and 3,3,3,1 (odd batches)
def test_mixup_matches_timm(square_folder, backend, mixup, cutmix, smoothing, batch_size):
    plain = list(build_loader(base_cfg(square_folder, backend, batch_size=batch_size, **_DETERMINISTIC), "train"))
    cfg = base_cfg(
        square_folder,
        backend,
        batch_size=batch_size,
        mixup=mixup,
        cutmix=cutmix,
        label_smoothing=smoothing,
        **_DETERMINISTIC,
    )
    loader = build_loader(cfg, "train")
    np.random.seed(1234)
    mixed = list(loader)
    assert np.random.randint(2**31) == np.random.RandomState(1234).randint(2**31)  # global generator untouched

    ref = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=2)
    assert len(mixed) == len(plain)
    for k, (p, m) in enumerate(zip(plain, mixed)):
        x, y = p["images"].clone(), p["labels"]
        even = len(x) - len(x) % 2
        targets = mixup_target(y, 2, 1.0, smoothing)  # the unpaired last sample of an odd batch: not mixed
        # timm draws lambda and the CutMix box from numpy's global generator, which the loader seeds
        # for each batch from (seed, epoch, position of the batch)
        np.random.seed(sharding.batch_seed(0, 0, k * batch_size) & 0xFFFFFFFF)
        if even:
            _, targets[:even] = ref(x[:even], y[:even])
        # two products and a sum, each rounded once in the images' dtype
        assert_close_rel(m["images"], x, tol(x.dtype, 2), "mixed images")
        torch.testing.assert_close(m["targets"], targets)
        assert torch.equal(m["labels"], y)  # hard labels stay as they were
        torch.testing.assert_close(m["targets"].sum(1), torch.ones(len(y)))
    assert any(not torch.equal(p["images"], m["images"]) for p, m in zip(plain, mixed))


def test_no_mixup_on_validation(square_folder):
    loader = build_loader(base_cfg(square_folder, "torch", mixup=0.8), "val")
    assert "targets" not in next(iter(loader))


def test_mixup_in_half_precision(square_folder):
    loader = build_loader(base_cfg(square_folder, "auto", mixup=0.8, cutmix=1.0, dtype="float16"), "train")
    batch = next(iter(loader))
    assert batch["images"].dtype == torch.float16 and batch["targets"].dtype == torch.float32
    assert batch["targets"].shape == (4, 2)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_clean_images_kept_when_asked(square_folder, backend):
    """keep_clean_images: batch["clean_images"] is the batch before Mixup/CutMix (the same pixels as with mixing off),
    while batch["images"] is still mixed; off by default."""
    plain = list(build_loader(base_cfg(square_folder, backend, batch_size=4, **_DETERMINISTIC), "train"))
    cfg = base_cfg(square_folder, backend, batch_size=4, mixup=0.8, cutmix=1.0, **_DETERMINISTIC)
    assert all("clean_images" not in b for b in build_loader(cfg, "train"))
    loader = build_loader(cfg, "train")
    loader.keep_clean_images = True
    kept = list(loader)
    for p, k in zip(plain, kept):
        torch.testing.assert_close(k["clean_images"], p["images"], rtol=0, atol=0)
    assert any(not torch.equal(k["images"], k["clean_images"]) for k in kept)
