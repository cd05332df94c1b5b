"""The recipes' data sections: valid DataConfigs that use the real augmentation options, and each
model's own input normalisation."""

from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml

import fastkd
from fastkd.data.config import DataConfig

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(fastkd.__file__), "recipes", "*.yaml")))
IMPLEMENTED = {"random_erasing", "random_erasing_mode", "repeated_augmentation", "randaugment_mstd", "color_jitter",
               "color_jitter_p", "grayscale", "gaussian_blur", "blur_sigma", "solarize", "grayscale_p", "blur_p",
               "solarize_p"}


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_data_sections_use_real_options(path):
    data = _load(path).get("data") or {}
    cfg = DataConfig.from_any(data)
    assert not IMPLEMENTED & set(cfg.extra), f"{path}: {sorted(IMPLEMENTED & set(cfg.extra))} belong in data, not extra"


def test_deit_recipe_applies_the_official_augmentation():
    data = DataConfig.from_any(_load([p for p in RECIPES if p.endswith("/deit_s_in1k.yaml")][0])["data"])
    assert (data.randaugment, data.randaugment_magnitude, data.randaugment_mstd) == (2, 9, 0.5)
    assert data.randaugment_increasing and data.random_erasing == 0.25 and data.random_erasing_mode == "pixel"
    assert data.repeated_augmentation == 3


@pytest.mark.parametrize("variant", ["byol", "moco", "simclr"])
def test_sdssl_recipes_apply_the_official_views(variant):
    """hagiss/SDSSL @ bbd34fa, pl_train_<variant>.py: the asymmetric BYOL / MoCo-v3 views, written out here."""
    data = DataConfig.from_any(_load([p for p in RECIPES if p.endswith(f"/sdssl_{variant}_vitb_in1k.yaml")][0])["data"])
    assert data.num_views == 2 and tuple(data.scale) == (0.08, 1.0) and data.hflip == 0.5
    assert tuple(data.color_jitter) == (0.4, 0.4, 0.2, 0.1) and data.color_jitter_p == 0.8 and data.grayscale == 0.2
    assert tuple(data.gaussian_blur) == (1.0, 0.1) and tuple(data.blur_sigma) == (0.1, 2.0)
    assert tuple(data.solarize) == (0.0, 0.2) and not data.extra


def test_attndistill_recipes_use_the_official_single_view():
    """wangkai930418/attndistill @ 5a5f4e9, dino_transfer.py: one RandomResizedCrop(0.2-1, bicubic) + flip view."""
    for name in ("attndistill_vit_s16_dino_s8", "attndistill_vit_s16_mugs_b16"):
        data = DataConfig.from_any(_load([p for p in RECIPES if p.endswith(f"/{name}.yaml")][0])["data"])
        assert data.num_views == 1 and tuple(data.scale) == (0.2, 1.0) and data.interpolation == "bicubic"
        assert data.hflip == 0.5 and data.randaugment == 0 and not any(data.color_jitter) and not data.mixing


def test_mugs_teacher_sees_imagenet_normalised_inputs():
    """Mugs was trained on ImageNet mean/std; the recipe's teacher must not be renormalised to timm's 0.5/0.5."""
    from fastkd.models import Teacher
    from fastkd.models import build_model

    recipe = _load([p for p in RECIPES if p.endswith("/attndistill_vit_s16_mugs_b16.yaml")][0])
    spec = recipe["teachers"][0]
    data = DataConfig.from_any(recipe["data"])
    kwargs = dict(spec.get("kwargs") or {}, img_size=32, depth=1)  # the architecture is not what is tested
    teacher = Teacher(build_model(spec["name"], weights=None, **kwargs), input_mean=data.mean, input_std=data.std)
    raw = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    student_in = ((raw - torch.tensor(data.mean, dtype=torch.float64).view(1, 3, 1, 1))
                  / torch.tensor(data.std, dtype=torch.float64).view(1, 3, 1, 1))  # fmt: skip
    got = teacher.normalize(student_in.float()).double()
    expected = (raw - imagenet_mean) / imagenet_std
    assert torch.allclose(got, expected, rtol=0, atol=8 * torch.finfo(torch.float32).eps * 3)
