"""Teacher cache: a cached run equals the online run (losses and parameters, across a mid-epoch resume), the
top-K cache's documented error, refusals that name the difference, the builder's resume and sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastkd.cache import CacheError
from fastkd.cache import TeacherCache
from fastkd.cache.build import build_cache
from fastkd.config import ConfigError
from fastkd.config import load_config
from fastkd.engine.trainer import Trainer
from tests.engine.conftest import write_quadrant_folder
from tests.utils import assert_close_rel
from tests.utils import tol

# 48 training images, 16 per batch: 3 batches per epoch; 2 epochs = 6 steps. Blocks of 2 batches: an epoch is one
# full and one partial shard per rank, so the tests cross shard boundaries.
STEPS, BLOCK = 6, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_quadrant_folder(tmp_path_factory.mktemp("quadrants32"), n_train=48, n_val=16, size=32)


def _cfg(recipe, tmp_path, data, name, *extra):
    return load_config(recipe, [f"run.output_dir={tmp_path}", f"run.name={name}", f"data.root={data}",
                                "train.epochs=2", f"train.steps={STEPS}", "train.log_every=1", "train.eval=false",
                                *extra])


def _train(cfg, stop_at=None):
    trainer = Trainer(cfg, console=False)
    try:
        trainer.train(stop_at=stop_at)
        return trainer
    finally:
        trainer.close()


def _losses(trainer):
    return [{k: v for k, v in h.items() if k in ("loss", "ce", "kd")} for h in trainer.history]


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}


@pytest.mark.parametrize("recipe", ["hinton_tiny", "deit_tiny"])
def test_cached_run_equals_online_run_and_resumes_mid_epoch(recipe, tmp_path, data):
    online = _train(_cfg(recipe, tmp_path, data, "online"))
    assert online.step == STEPS and len(online.history) == STEPS

    cache_dir = tmp_path / "cache"
    cache = build_cache(_cfg(recipe, tmp_path, data, "build"), cache_dir, block_batches=BLOCK, progress=False)
    assert cache.manifest["complete"] and cache.k == cache.num_classes == 10 and cache.epochs == 2

    cached_cfg = _cfg(recipe, tmp_path, data, "cached", f"teachers.cache={cache_dir}")
    cached = _train(cached_cfg)
    assert all(type(t).__name__ == "CachedTeacher" for t in cached.method.teachers)  # the teacher was never built
    assert _losses(cached) == _losses(online)
    ref = _params(online)
    got = _params(cached)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)

    # interrupted in the middle of epoch 1 (step 4 = its first batch), resumed in a fresh trainer
    _train(_cfg(recipe, tmp_path, data, "split", f"teachers.cache={cache_dir}"), stop_at=4)
    resumed = _train(_cfg(recipe, tmp_path, data, "split", f"teachers.cache={cache_dir}", "run.resume=auto"))
    assert _losses(resumed) == _losses(online)[4:]
    got = _params(resumed)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_two_cached_teachers_equal_online_coadvise(tmp_path, data):
    """Co-advise's two logit teachers (a CNN and an involution network) both come from the cache."""
    online = _train(_cfg("coadvise_tiny", tmp_path, data, "online", "train.steps=3", "train.epochs=1"))
    cache_dir = tmp_path / "cache"
    cache = build_cache(_cfg("coadvise_tiny", tmp_path, data, "build", "train.steps=3", "train.epochs=1"), cache_dir,
                        topk=5, block_batches=BLOCK, progress=False)
    assert cache.num_teachers == 2 and cache.epochs == 1
    full = build_cache(_cfg("coadvise_tiny", tmp_path, data, "build", "train.steps=3", "train.epochs=1"),
                       tmp_path / "full", block_batches=BLOCK, progress=False)
    cached = _train(_cfg("coadvise_tiny", tmp_path, data, "cached", "train.steps=3", "train.epochs=1",
                         f"teachers.cache={full.root}"))
    assert [h["loss"] for h in cached.history] == [h["loss"] for h in online.history] and len(online.history) == 3
    for k, v in _params(online).items():
        torch.testing.assert_close(_params(cached)[k], v, rtol=0, atol=0, msg=k)


def _online_teacher_logits(cfg):
    """The run's teacher and its logits of each training batch of epoch 0 (what the cache must hold)."""
    online = Trainer(cfg, console=False)
    teacher = online.method.teachers[0]
    loader = online.train_loader
    loader.set_epoch(0)
    out = []
    with torch.no_grad():
        for batch in loader:
            out.append((batch, teacher(batch["images"]).double()))
    online.close()
    return out


def test_topk_cache_gives_the_documented_error(tmp_path, data):
    """fastkd.cache.replay.dense_logits: a top-K cache keeps the teacher's K largest logits and gives the other
    classes their log-mean-exp. At T = 1 the kept probabilities and the left-out mass are then exact: the Hinton KD
    gradient w.r.t. the student's logits is exact on the kept classes and, on each left-out class, uses the mean
    left-out probability m/(C-K). DeiT's hard label is exact for any K."""
    from fastkd.cache import CachedLoader
    from fastkd.methods.deit import deit_loss
    from fastkd.methods.hinton import hinton_loss

    k, alpha, classes = 3, 0.5, 10
    cfg = _cfg("hinton_tiny", tmp_path, data, "topk")
    cache_dir = tmp_path / "cache_top3"
    cache = build_cache(cfg, cache_dir, topk=k, block_batches=BLOCK, progress=False)
    assert cache.k == k and "classes" in cache.record.names
    reference = _online_teacher_logits(cfg)
    loader = CachedLoader(Trainer(cfg, console=False).train_loader, cache)
    loader.set_epoch(0)
    g = torch.Generator().manual_seed(3)
    checked = 0
    for (ref_batch, z_t), batch in zip(reference, loader):
        assert torch.equal(ref_batch["index"], batch["index"])
        z_hat = batch["teacher_logits"][0].double()
        b = z_t.shape[0]
        top = z_t.topk(k, dim=-1)
        kept = torch.zeros_like(z_t, dtype=torch.bool).scatter_(1, top.indices, True)
        # fp64 oracle of the documented gradient: alpha * T * (q - p_hat) / B at T = 1
        p = torch.softmax(z_t, -1)
        m = (p * ~kept).sum(-1, keepdim=True)
        p_hat = torch.where(kept, p, m / (classes - k))
        z_s = torch.randn(b, classes, generator=g, dtype=torch.float64, requires_grad=True)
        expected = alpha * (torch.softmax(z_s.detach(), -1) - p_hat) / b
        kd = hinton_loss(z_s, z_hat, batch, temperature=1.0, alpha=alpha)["kd"]
        got = torch.autograd.grad(kd, z_s)[0]
        # the cache stores fp32 values: the error is fp32 rounding of logits of size |z|, through a softmax
        assert_close_rel(got, expected, tol(torch.float32, classes), "KD gradient from a top-K cache",
                         scale=float(alpha * z_t.abs().max() / b))
        assert (m > 1e-3).all()  # the left-out mass is not negligible here: the check above is not vacuous
        # DeiT's hard distillation only needs the argmax: exact for any K >= 1
        z_d = torch.randn(b, classes, generator=g, dtype=torch.float64)
        full = deit_loss(z_s.detach(), z_d, z_t, batch)["kd"]
        cached = deit_loss(z_s.detach(), z_d, z_hat, batch)["kd"]
        assert float(full) == float(cached)
        checked += 1
    assert checked == 3


def test_mismatching_cache_refuses_naming_the_difference(tmp_path, data):
    cache_dir = tmp_path / "cache"
    build_cache(_cfg("hinton_tiny", tmp_path, data, "build"), cache_dir, epochs=1, block_batches=BLOCK,
                progress=False)
    use = f"teachers.cache={cache_dir}"
    cases = [
        (["data.mixup=0.5", "train.steps=3"], "does not match this run: data.mixup: cache 0.8, this run 0.5"),
        (["data.seed=7", "train.steps=3"], "data.seed: cache 0, this run 7"),
        (["train.batch_size=8", "train.steps=3"], "layout.batch_size: cache 16, this run 8"),
        (["teachers.0.name=resnet18", "train.steps=3"], "teachers.0.name: cache 'resnet10t', this run 'resnet18'"),
        ([], "holds 1 epoch(s), this run needs 2"),
    ]
    for extra, needle in cases:
        with pytest.raises(ConfigError) as exc:
            Trainer(_cfg("hinton_tiny", tmp_path, data, "bad", use, *extra), console=False)
        assert needle in str(exc.value) and "\n" not in str(exc.value), (extra, str(exc.value))
    # the run of 2 epochs replays the cache's single epoch twice when asked
    trainer = _train(_cfg("hinton_tiny", tmp_path, data, "wrap", use, "teachers.cache_wrap=true"))
    assert trainer.step == STEPS


def test_methods_needing_the_teacher_online_refuse_the_cache(tmp_path, data):
    with pytest.raises(ConfigError, match="needs its teachers online"):
        Trainer(_cfg("attndistill_tiny", tmp_path, data, "attn", f"teachers.cache={tmp_path}"), console=False)


def test_build_resumes_after_a_kill_and_shards_exactly_once(tmp_path, data):
    cfg = _cfg("hinton_tiny", tmp_path, data, "build")
    # the layout of a 2-process training run, built by one process: every (epoch, rank, block) shard once
    cache = build_cache(cfg, tmp_path / "c2", epochs=1, world_size=2, block_batches=1, progress=False)
    records = [cache.rows(0, r, 0, cache.layout["samples_per_rank"]) for r in range(2)]
    assert len(cache.manifest["shards"]) == 2 * 2  # 24 samples per rank = 2 batches of 16 (one partial)
    seen = np.concatenate([r["index"] for r in records])
    assert sorted(seen.tolist()) == list(range(48))  # exactly once over the ranks

    # a kill: one shard's checksum never written, another shard truncated; the manifest not complete
    first = tmp_path / "c1"
    build_cache(cfg, first, epochs=1, block_batches=1, progress=False)
    man = json.loads((first / "manifest.json").read_text())
    names = sorted(man["shards"])
    before = {n: (first / "shards" / n).read_bytes() for n in names}
    (first / "shards" / (names[0] + ".sha256")).unlink()
    (first / "shards" / names[1]).write_bytes(before[names[1]][:100])
    man["complete"] = False
    (first / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match="not complete"):
        Trainer(_cfg("hinton_tiny", tmp_path, data, "x", f"teachers.cache={first}", "train.steps=3"), console=False)
    again = build_cache(cfg, first, epochs=1, block_batches=1, progress=False)
    assert again.manifest["complete"]
    assert {n: (first / "shards" / n).read_bytes() for n in names} == before

    # a corrupt shard is caught when training opens it
    (first / "shards" / names[2]).write_bytes(before[names[2]][:-1] + bytes([before[names[2]][-1] ^ 1]))
    with pytest.raises(CacheError, match="corrupt"):
        TeacherCache.open(first).rows(0, 0, 2 * 16, 16)
    # other settings in the same folder are refused
    with pytest.raises(CacheError, match="topk"):
        build_cache(cfg, first, epochs=1, topk=5, block_batches=1, progress=False)


def test_cli_builds_then_trains(tmp_path, data):
    from tests.engine.helpers import run_cli

    out = tmp_path / "cli_cache"
    common = [f"run.output_dir={tmp_path}", f"data.root={data}", "train.steps=2", "train.eval=false"]
    r = run_cli(["teacher-cache", "build", "--config", "hinton_tiny", "--out", str(out), "--epochs", "1",
                 "--topk", "5", "--no-progress", *common], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "B per image per epoch" in r.stderr and "complete" in r.stderr
    r = run_cli(["train", "--config", "hinton_tiny", f"teachers.cache={out}", "run.name=cli", *common], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli(["teacher-cache", "build", "--config", "hinton_tiny", "--out", str(out), "--topk", "-1", *common],
                cwd=tmp_path)
    assert r.returncode == 2 and "--topk=-1" in r.stderr


def test_replayed_views_are_checked_against_the_record(tmp_path, data):
    cache_dir = tmp_path / "cache"
    build_cache(_cfg("hinton_tiny", tmp_path, data, "build"), cache_dir, epochs=1, block_batches=BLOCK,
                progress=False)
    trainer = Trainer(_cfg("hinton_tiny", tmp_path, data, "views", f"teachers.cache={cache_dir}", "train.steps=3"),
                      console=False)
    loader = trainer.train_loader
    loader.set_epoch(0)
    batch = next(iter(loader.loader))  # the wrapped loader's first batch, without the cache
    assert loader.attach(dict(batch), 0, 0)["teacher_logits"][0].shape == (16, 10)
    with pytest.raises(CacheError, match="the view differs"):
        loader.attach(dict(batch, images=batch["images"].flip(-1)), 0, 0)  # a flip the build did not see
    with pytest.raises(CacheError, match="delivered sample"):
        loader.attach(dict(batch), 0, 16)  # another position of the epoch
    trainer.close()


@pytest.mark.distributed
def test_two_process_build_writes_each_shard_once_and_matches_one_process(tmp_path, data):
    """torchrun with 2 processes: process p writes the shards of training rank p; the result is the 1-process
    build of the same 2-rank layout, byte for byte."""
    import socket
    import sys

    from tests.engine.helpers import run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                "-m", "fastkd"]
    common = [f"run.output_dir={tmp_path}", f"data.root={data}", "train.steps=3", "--epochs", "1", "--topk", "4",
              "--block-batches", "1", "--no-progress"]
    r = run_cli(["teacher-cache", "build", "--config", "hinton_tiny", "--out", str(tmp_path / "two"), *common],
                cwd=tmp_path, launcher=launcher, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    # torchrun gives each worker one thread; the same here, so both builds sum in the same order (byte equality)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = build_cache(_cfg("hinton_tiny", tmp_path, data, "build"), tmp_path / "one", epochs=1, topk=4,
                          world_size=2, block_batches=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    two = TeacherCache.open(tmp_path / "two")
    assert two.manifest["complete"] and two.layout["world_size"] == 2
    assert two.manifest["shards"] == one.manifest["shards"] and len(one.manifest["shards"]) == 4
