"""Exact resume: after a resume the loader hands out, bit for bit, the batches an uninterrupted run
would have, with random crops, flips, RandAugment, Mixup/CutMix or several (BYOL-augmented) views on, and whatever the
number of torch workers or DALI threads."""

from __future__ import annotations

import copy

import pytest
import torch

from fastkd.data import build_loader
from tests.data.conftest import BACKEND_PARAMS
from tests.data.conftest import base_cfg

# 21 samples, batches of 3: 7 batches per epoch; interrupted after these many batches (the 7th is the
# epoch's last, handed out without the end of the epoch being asked for)
RESUME_AFTER = (1, 5, 7, 10)
TOTAL = 14

VARIANTS = {
    "randaugment+mixup": dict(randaugment=2, randaugment_magnitude=9, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5),
    # two views with SDSSL's asymmetric BYOL augmentation (RandAugment's draws are resumed in the variant above;
    # a DALI RandAugment graph takes ~20 s to build, and this test builds six)
    "byol-views": dict(num_views=2, color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_p=0.8, grayscale=0.2,
                       gaussian_blur=(1.0, 0.1), solarize=(0.0, 0.2)),
    "erasing+repeats+mixup": dict(random_erasing=0.5, repeated_augmentation=3, mixup=0.8, cutmix=1.0),
}


def take(loader, count: int) -> list[dict]:
    """``count`` batches, crossing epochs as the trainer does (set_epoch before each epoch)."""
    out: list[dict] = []
    epoch = loader.epoch
    while len(out) < count:
        loader.set_epoch(epoch)
        for batch in loader:
            out.append(batch)
            if len(out) == count:
                return out
        epoch += 1
    return out


def take_checkpointing(loader, count: int, at: tuple[int, ...]) -> tuple[list[dict], dict[int, dict]]:
    """:func:`take`, and a copy of the loader's state after each number of batches in ``at``, taken as a trainer
    checkpoints: mid-iteration, before the next batch is asked for, and the run goes on."""
    out: list[dict] = []
    states: dict[int, dict] = {}
    epoch = loader.epoch
    while len(out) < count:
        loader.set_epoch(epoch)
        for batch in loader:
            out.append(batch)
            if len(out) in at:
                states[len(out)] = copy.deepcopy(loader.state_dict())
            if len(out) == count:
                return out, states
        epoch += 1
    return out, states


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys(), k
        for key in a:
            x, y = a[key], b[key]
            for u, v in zip(x, y) if isinstance(x, list) else [(x, y)]:
                assert u.dtype == v.dtype and u.shape == v.shape, (k, key)
                assert torch.equal(u, v), f"batch {k}: {key} differs"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_is_bit_exact(folder, backend, variant):
    common = dict(batch_size=3, seed=13, hflip=0.5, scale=(0.08, 1.0), **VARIANTS[variant])
    # the uninterrupted run decodes in one process / thread, the interrupted ones with two
    reference = take(
        build_loader(base_cfg(folder, backend, num_workers=1 if backend == "dali" else 0, **common)), TOTAL
    )
    cfg = base_cfg(folder, backend, num_workers=2, **common)
    # one interrupted run, checkpointed after each of the RESUME_AFTER batches (building a loader is the cost here:
    # a DALI RandAugment graph takes ~20 s); each checkpoint is resumed in a new loader, as by a new process
    first = build_loader(cfg)
    head, states = take_checkpointing(first, max(RESUME_AFTER), RESUME_AFTER)
    del first
    assert sorted(states) == sorted(RESUME_AFTER)
    for stop in RESUME_AFTER:
        resumed = build_loader(cfg)
        resumed.load_state_dict(states[stop])
        assert_same_batches(head[:stop] + take(resumed, TOTAL - stop), reference)
        del resumed
    # the augmentation is random: the epochs differ from each other and the views from each other
    first_view = [b["images"][0] if isinstance(b["images"], list) else b["images"] for b in reference]
    assert not torch.equal(first_view[0], first_view[7])
    if variant.endswith("views"):
        assert not torch.equal(reference[0]["images"][0], reference[0]["images"][1])
    else:
        assert all("targets" in b for b in reference)
