"""The teacher-cache builder (``fastkd teacher-cache build``, :mod:`fastkd.cache.commands`): run a recipe's
teachers once over its augmented training epochs and store their logits (format: :mod:`fastkd.cache.store`).

Examples::

    fastkd teacher-cache build --config hinton_deit_s_in1k --epochs 300 --topk 10 --out /data/cache/deit_s
    torchrun --nproc_per_node 8 -m fastkd teacher-cache build --config deit_s_in1k --out /data/cache/deit_s
    fastkd train --config hinton_deit_s_in1k teachers.cache=/data/cache/deit_s

The build walks exactly the views training will see: the recipe's data section and the training run's batch layout
(``--world-size``: the number of training processes; by default the number of build processes). Shards are
(epoch, training rank, block of batches); build process ``p`` of ``P`` writes the shards of training ranks
``r ≡ p (mod P)``, so every shard is written exactly once. A killed build resumes: finished shards (checksum file
present and matching) are kept, the others rebuilt.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any

import numpy as np
import torch

from fastkd.cache.replay import tail_logit
from fastkd.cache.replay import view_fingerprint
from fastkd.cache.store import FORMAT
from fastkd.cache.store import CacheError
from fastkd.cache.store import TeacherCache
from fastkd.cache.store import first_difference
from fastkd.cache.store import identity
from fastkd.cache.store import layout_of
from fastkd.cache.store import views_of


def _check_args(epochs: int | None, topk: int, world_size: int | None, block_batches: int) -> None:
    if epochs is not None and epochs < 1:
        raise CacheError(f"--epochs={epochs} must be >= 1")
    if topk < 0:
        raise CacheError(f"--topk={topk} must be >= 0 (0: all classes)")
    if world_size is not None and world_size < 1:
        raise CacheError(f"--world-size={world_size} must be >= 1")
    if block_batches < 1:
        raise CacheError(f"--block-batches={block_batches} must be >= 1")


def build_cache(cfg, out, *, epochs: int | None = None, topk: int = 0, dtype: str = "float32",
                world_size: int | None = None, block_batches: int = 64, progress: bool = True,
                local_rank: int | None = None) -> TeacherCache:
    """Build (or finish) the cache of ``cfg`` in ``out``; returns it. Collective when launched on several processes."""
    from fastkd.data import build_loader
    from fastkd.distributed import barrier
    from fastkd.distributed import setup as setup_distributed
    from fastkd.engine import builders
    from fastkd.engine.logging import progress_bar
    from fastkd.engine.trainer import seed_everything

    _check_args(epochs, topk, world_size, block_batches)
    if not cfg.teachers:
        raise CacheError("the recipe has no teachers: nothing to cache")
    info = setup_distributed(device=cfg.run.device, backend=cfg.distributed.backend, local_rank=local_rank)
    device = info.device
    seed_everything(cfg.run.seed)  # the training run's rank 0 seeds the same way before it builds its models
    data_cfg = builders.data_config(cfg, device)
    from fastkd.data.record import unrecorded_augmentation

    unrecorded = unrecorded_augmentation(data_cfg)
    if unrecorded:
        raise CacheError(f"the recipe cannot be cached: {unrecorded} (a cached run could not replay its views)")
    layout_world = world_size or info.world_size
    loaders = {0: build_loader(data_cfg, "train", 0, layout_world)}
    num_classes = loaders[0].num_classes or data_cfg.num_classes
    if any(not s.weights for s in cfg.teachers):
        builders.build_student(cfg, num_classes)  # random teachers: the same random stream as the training run
    teachers = builders.build_teachers(cfg, num_classes, data_cfg)
    for t in teachers:
        t.to(device).eval().requires_grad_(False)
    steps_per_epoch = len(loaders[0]) // cfg.train.accum_steps
    if steps_per_epoch < 1:
        raise CacheError(f"the training loader has {len(loaders[0])} batches per epoch, fewer than "
                         f"train.accum_steps={cfg.train.accum_steps}")
    if epochs is None:
        from fastkd.cache.replay import epochs_for

        epochs = epochs_for(builders.total_steps_for(cfg, steps_per_epoch), steps_per_epoch)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "identity": identity(cfg, data_cfg, loaders[0].source),
        "epochs": int(epochs), "topk": int(topk) or int(num_classes), "num_classes": int(num_classes),
        "teachers": len(teachers), "dtype": dtype, "layout": layout_of(loaders[0], block_batches),
        "views": views_of(loaders[0]),
        "complete": False,
    }
    cache = _open_or_start(out, manifest, info.is_main)
    barrier()
    cache = TeacherCache.open(out)

    mine = [s for s in cache.all_shards() if s[1] % info.world_size == info.rank]
    todo = [s for s in mine if not cache.is_done(cache.shard_name(*s))]
    if info.is_main:
        _print_estimate(cache, len(todo), len(mine))
    per_block = {b: -(-cache.block_rows(b) // cache.layout["batch_size"]) for _, _, b in mine}
    bar = progress_bar(sum(per_block[b] for _, _, b in mine),
                       sum(per_block[b] for s in mine if s not in todo for b in (s[2],)),
                       enabled=progress and info.is_main, desc="teacher cache")
    amp = builders.autocast(device, builders.amp_dtype(cfg, device))
    try:
        for e, r, b in todo:
            if r not in loaders:
                loaders[r] = build_loader(data_cfg, "train", r, layout_world)
            loaders[r].record_views = True
            records = _record_block(cache, loaders[r], teachers, e, b, amp, bar)
            cache.write_shard(cache.shard_name(e, r, b), records)
    finally:
        bar.close()
    barrier()
    if info.is_main:
        _finish(cache)
    barrier()
    return TeacherCache.open(out)


def _open_or_start(out, manifest: dict[str, Any], is_main: bool) -> TeacherCache:
    path = TeacherCache.manifest_path(out)
    if path.is_file():
        old = TeacherCache.open(out).manifest
        keep = {k: v for k, v in old.items() if k not in ("complete", "shards")}
        new = {k: v for k, v in manifest.items() if k not in ("complete", "shards")}
        diff = first_difference(keep, new)
        if diff:
            raise CacheError(f"--out {out} holds a cache built with other settings ({diff}); choose another folder "
                             "or delete it")
        return TeacherCache(out, old)
    cache = TeacherCache(out, manifest)
    if is_main:
        cache.root.mkdir(parents=True, exist_ok=True)
        cache.write_manifest()
    return cache


def _print_estimate(cache: TeacherCache, todo: int, mine: int) -> None:
    lay = cache.layout
    records = cache.epochs * lay["world_size"] * lay["batches_per_epoch"] * lay["batch_size"]
    total = records * cache.bytes_per_record()
    free = shutil.disk_usage(cache.root).free
    print(f"teacher cache {cache.root}: {cache.epochs} epoch(s) x {lay['world_size'] * lay['samples_per_rank']} "
          f"samples x {cache.num_teachers} teacher(s), top-{cache.k} of {cache.num_classes} classes "
          f"({cache.dtype}): {cache.bytes_per_record()} B per image per epoch, about {total / 2**30:.3g} GiB in all "
          f"({free / 2**30:.3g} GiB free); {todo} of this process's {mine} shards to write", file=sys.stderr,
          flush=True)
    if total > free:
        print("teacher cache: warning: the disk has less free space than the cache needs", file=sys.stderr)


@torch.no_grad()
def _record_block(cache: TeacherCache, loader, teachers, epoch: int, block: int, amp, bar) -> np.ndarray:
    from fastkd.methods._kd import teacher_logits

    begin = block * cache.rows_per_block
    rows = cache.block_rows(block)
    records = np.zeros(rows, dtype=cache.record)
    records["index"] = -1
    loader.load_state_dict({"epoch": epoch, "position": begin})
    it = iter(loader)
    try:
        while loader.position < begin + rows:
            start = loader.position
            try:
                batch = next(it)
            except StopIteration:
                break
            images = batch["images"]
            at = slice(start - begin, start - begin + images.shape[0])
            records["index"][at] = batch["index"].numpy()
            records["pad"][at] = batch["is_pad"].numpy()
            records["params"][at] = batch["view_params"]
            records["view"][at] = view_fingerprint(images).numpy()
            with amp:
                logits = torch.stack([teacher_logits(t, images, f"teachers.{i}") for i, t in enumerate(teachers)], 1)
            if cache.k < cache.num_classes:
                values, classes = logits.topk(cache.k, dim=-1)
                records["classes"][at] = classes.cpu().numpy()
                records["tail"][at] = torch.stack([tail_logit(logits[:, t], classes[:, t])
                                                   for t in range(logits.shape[1])], 1).cpu().numpy()
            else:
                values = logits
            records["logits"][at] = values.float().cpu().numpy().astype(cache.dtype)
            bar.update(1)
    finally:
        if hasattr(it, "close"):
            it.close()
    return records


def _finish(cache: TeacherCache) -> None:
    missing = [cache.shard_name(*s) for s in cache.all_shards() if not cache.is_done(cache.shard_name(*s))]
    if missing:
        raise CacheError(f"teacher cache {cache.root}: {len(missing)} shard(s) missing after the build, e.g. "
                         f"{missing[0]}")
    cache.manifest["shards"] = {
        cache.shard_name(*s): cache.shard_path(cache.shard_name(*s) + ".sha256").read_text().strip()
        for s in cache.all_shards()
    }
    cache.manifest["complete"] = True
    cache.write_manifest()
    print(f"teacher cache {cache.root}: complete ({len(cache.manifest['shards'])} shards)", file=sys.stderr,
          flush=True)


__all__ = ["build_cache"]
