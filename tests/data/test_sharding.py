"""Sharding across ranks (exactly once per epoch, equal lengths) and mid-epoch resumption."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from fastkd.data import build_loader
from fastkd.data import sharding
from tests.data.conftest import BACKEND_PARAMS
from tests.data.conftest import base_cfg
from tests.data.conftest import needs_dali

# (num_samples, world_size): divisible, ragged, fewer samples than ranks
_SHARD_PARAMS = ("n, world", [(12, 3), (21, 2), (21, 4), (5, 8), (1, 2), (100, 7)])


@pytest.mark.parametrize(*_SHARD_PARAMS)
@pytest.mark.parametrize("shuffle", [False, True])
def test_pad_policy_covers_every_sample_once(n, world, shuffle):
    order = sharding.epoch_order(n, epoch=3, seed=11, shuffle=shuffle)
    shards = [sharding.shard(order, r, world, "pad") for r in range(world)]
    assert len({len(idx) for idx, _ in shards}) == 1  # equal length on every rank
    real = np.concatenate([idx[~pad] for idx, pad in shards])
    assert sorted(real.tolist()) == list(range(n))  # non-padding samples: each exactly once
    n_pad = sum(int(pad.sum()) for _, pad in shards)
    assert n_pad == len(shards[0][0]) * world - n


@pytest.mark.parametrize(*_SHARD_PARAMS)
def test_drop_policy_is_disjoint(n, world):
    order = sharding.epoch_order(n, epoch=0, seed=0, shuffle=True)
    if n < world:
        with pytest.raises(ValueError, match="leaves nothing"):
            sharding.shard(order, 0, world, "drop")
        return
    shards = [sharding.shard(order, r, world, "drop")[0] for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    seen = np.concatenate(shards)
    assert len(set(seen.tolist())) == len(seen) == n - n % world


def test_epoch_order_depends_on_seed_and_epoch():
    a, b, c = (sharding.epoch_order(50, e, s, True) for e, s in ((0, 1), (1, 1), (0, 2)))
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    np.testing.assert_array_equal(a, sharding.epoch_order(50, 0, 1, True))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_cover_epoch_exactly_once(folder, backend, world):
    """Loaders of simulated ranks: same number of batches, every sample once (padding aside), two epochs."""
    cfg = base_cfg(folder, backend, batch_size=3, seed=5)
    loaders = [build_loader(cfg, "train", rank=r, world_size=world) for r in range(world)]
    assert len({len(ld) for ld in loaders}) == 1
    orders = []
    for epoch in range(2):
        seen = collections.Counter()
        for ld in loaders:
            ld.set_epoch(epoch)
            batches = list(ld)
            assert len(batches) == len(ld)
            for b in batches:
                seen.update(b["index"][~b["is_pad"]].tolist())
        assert sorted(seen) == list(range(21)) and set(seen.values()) == {1}
        orders.append(loaders[0].plan(epoch)[0].tolist())
    assert orders[0] != orders[1]  # reshuffled per epoch


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_drop_last_and_drop_policy_lengths(folder, backend):
    cfg = base_cfg(folder, backend, batch_size=4, shard_policy="drop", drop_last=True)
    loaders = [build_loader(cfg, "train", rank=r, world_size=2) for r in range(2)]
    counts = [[len(b["labels"]) for b in ld] for ld in loaders]
    assert counts == [[4, 4], [4, 4]]  # 21 -> 10 per rank -> two full batches, the rest dropped


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_resume_mid_epoch_yields_exactly_the_rest(folder, backend):
    cfg = base_cfg(folder, backend, batch_size=3, seed=9)
    full = build_loader(cfg, "train", rank=1, world_size=2)
    full.set_epoch(2)
    expected = [b["index"].tolist() for b in full]

    first = build_loader(cfg, "train", rank=1, world_size=2)
    first.set_epoch(2)
    it = iter(first)
    got = [next(it)["index"].tolist() for _ in range(2)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["position"] == 6
    del it  # the run stops here; a new process resumes from the checkpoint

    resumed = build_loader(cfg, "train", rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the engine calls set_epoch(epoch) again on resume: the position is kept
    assert resumed.batches_left == len(expected) - 2
    rest = [b["index"].tolist() for b in resumed]
    assert got + rest == expected
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["position"] == 0
    nxt = [b["index"].tolist() for b in resumed]  # then the next epoch, whole
    assert len(nxt) == len(expected) and nxt != expected


def test_resume_state_validation(folder):
    loader = build_loader(base_cfg(folder, "torch"), "train", rank=0, world_size=2)
    state = loader.state_dict()
    other = build_loader(base_cfg(folder, "torch"), "train", rank=0, world_size=3)
    with pytest.raises(ValueError, match="world_size=2"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="position=999"):
        loader.load_state_dict({**state, "position": 999})
    loader.load_state_dict({"epoch": 4, "position": 4})
    loader.set_epoch(5)  # a different epoch starts from its beginning
    assert (loader.epoch, loader.position) == (5, 0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_abandoned_epoch_then_fresh_epoch(folder, backend):
    """Breaking out of an epoch (batches still in flight) does not leak them into the next one."""
    loader = build_loader(base_cfg(folder, backend, batch_size=2), "train")
    it = iter(loader)
    next(it)
    del it
    loader.set_epoch(1)
    index = torch.cat([b["index"] for b in loader])
    assert sorted(index.tolist()) == list(range(21))


@needs_dali
def test_dali_pipeline_reused_across_epochs(folder):
    """A trainer takes exactly len(loader) batches and never asks for the end of the epoch; the DALI
    pipeline is still reused for the next epoch (rebuilding it costs seconds on a GPU)."""
    loader = build_loader(base_cfg(folder, "dali", batch_size=4), "train")
    for epoch in range(3):
        loader.set_epoch(epoch)
        it = iter(loader)
        index = torch.cat([next(it)["index"] for _ in range(len(loader))])
        del it
        assert sorted(index.tolist()) == list(range(21))
    assert loader._builds == 1
    list(loader)  # and a fully consumed epoch too
    assert loader._builds == 1
