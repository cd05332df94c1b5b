"""A steady-state training step reads nothing back to the host outside logging steps (issue 12); the counter is
:class:`fastkd.engine.syncs.SyncCounter`."""

from __future__ import annotations

import pytest
import torch

from fastkd.config import load_config
from fastkd.config import recipe_path
from fastkd.engine.syncs import SyncCounter
from fastkd.engine.trainer import NonFiniteLossError
from fastkd.engine.trainer import Trainer
from tests.engine.helpers import MemoryLoader


def test_counter_sees_each_kind_of_sync():
    x = torch.tensor([0.0, 1.0, 2.0])
    with SyncCounter() as c:
        float(x.sum()), x.tolist(), bool(x[0]), x.nonzero(), x.unique(), x[x > 0]
    assert len(c.calls) >= 6, c.calls  # item, tolist, bool, nonzero, unique, boolean index
    with SyncCounter() as c:
        (x * 2 + 1).exp().sum()
    assert c.calls == []


class _ViewsLoader(MemoryLoader):
    """MemoryLoader's batches as ``views`` views of each image (every other one flipped), as the multi-view (SSL)
    recipes' loaders give them."""

    def __init__(self, views: int, **kw):
        super().__init__(**kw)
        self.views = views

    def __iter__(self):
        for batch in super().__iter__():
            x = batch["images"]
            yield {**batch, "images": [x.flip(-1) if v % 2 else x for v in range(self.views)]}


def _trainer(tmp_path, recipe: str, *extra: str) -> Trainer:
    cfg = load_config(recipe_path(recipe), [f"run.output_dir={tmp_path}", f"run.name={recipe}", "run.device=cpu",
                                            "train.steps=12", "train.log_every=4", "train.eval=false",
                                            "train.clip_grad=1.0", "train.progress=false", *extra])
    kw = dict(n=64, batch_size=4, num_classes=cfg.data.num_classes or 4, size=cfg.data.img_size)
    loader = _ViewsLoader(cfg.data.num_views, **kw) if cfg.data.num_views > 1 else MemoryLoader(**kw)
    return Trainer(cfg, train_loader=loader, console=False)


def _syncs_per_step(tr: Trainer, steps: int = 4) -> list[list[str]]:
    batches = iter(tr.train_loader)
    tr.train_step(batches)  # warm-up: the first step may choose heads, allocate optimizer state, ...
    per_step = []
    for _ in range(steps):
        with SyncCounter() as c:
            tr.train_step(batches)
        per_step.append(c.calls)
    return per_step  # steps 2, 3, 4, 5: step 4 is a logging step (log_every=4)


@pytest.mark.parametrize("recipe", ["hinton_tiny", "supervised_tiny", "deit_tiny", "scalekd_tiny", "coadvise_tiny",
                                    "ssta_tiny", "attndistill_tiny", "sdssl_tiny"])
def test_steady_state_step_has_no_host_sync_outside_logging_steps(tmp_path, recipe):
    tr = _trainer(tmp_path, recipe)
    assert tr.placement.device_skip  # fused AdamW: non-finite steps are skipped on the device
    per_step = _syncs_per_step(tr)
    assert per_step[0] == [] and per_step[1] == [] and per_step[3] == [], per_step
    assert 1 <= len(per_step[2]) <= 2, per_step  # the logging step reads the non-finite record


def test_nonfinite_step_is_skipped_on_the_device_and_reported_at_the_next_logging_step(tmp_path):
    tr = _trainer(tmp_path, "hinton_tiny")
    batches = iter(tr.train_loader)
    tr.train_step(batches)  # step 1
    original = tr.method.forward

    def poisoned(batch):
        out = original(batch)
        out["kd"] = out["kd"] * float("nan")
        out["loss"] = out["ce"] + out["kd"]
        return out

    params = [p.detach().clone() for p in tr.method.parameters()]
    moments = {k: v.clone() for k, v in tr.optimizer.state_dict()["state"][0].items()}
    tr.method.forward = poisoned
    with SyncCounter() as c:
        tr.train_step(batches)  # step 2: NaN loss, not a logging step: no exception, no read, no update
    assert c.calls == []
    for p, q in zip(tr.method.parameters(), params):
        assert torch.equal(p.detach(), q)
    for k, v in tr.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, moments[k]), k  # step count and moments untouched, as AMP's found-inf skip
    tr.method.forward = original
    tr.train_step(batches)  # step 3: finite, applied
    assert not all(torch.equal(p.detach(), q) for p, q in zip(tr.method.parameters(), params))
    with pytest.raises(NonFiniteLossError) as info:
        tr.train_step(batches)  # step 4, a logging step: reads the record and stops before its update
    assert info.value.step == 2 and info.value.parts == ["kd"]
    saved = torch.load(info.value.checkpoint, weights_only=True)
    assert saved["step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["method"].values())
