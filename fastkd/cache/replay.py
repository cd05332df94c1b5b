"""Training from a teacher cache: check the cache against the run, then add each batch's cached logits.

:func:`open_for_run` refuses a cache that was built for another recipe, teacher, data set, seed, batch layout or
number of epochs with one line naming the first difference. :class:`CachedLoader` wraps the run's training loader
and drives it from the records: the loader delivers the recorded samples with the recorded views, erasing and mixes
(``loader.replay``, nothing is drawn); each batch is checked against its records (the data set indices and the view
fingerprint) and gets ``batch["teacher_logits"]``, one ``[B, C]`` tensor per teacher, which the
logit-distillation methods use instead of running the teacher (:func:`fastkd.methods._kd.teacher_logits`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from fastkd.cache.store import CacheError
from fastkd.cache.store import TeacherCache
from fastkd.cache.store import first_difference
from fastkd.cache.store import identity
from fastkd.cache.store import layout_of
from fastkd.cache.store import views_of
from fastkd.data.record import unrecorded_augmentation

# |fingerprint difference| allowed between the recorded and the replayed view, in units of the normalised image:
# the same view decoded by another JPEG decoder differs by a pixel level or so (1/255/std ~ 0.02) at a few pixels,
# which moves a whole-image mean by far less; another crop, flip or mix moves it by much more
VIEW_ATOL = 2e-3


def view_fingerprint(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3]`` float32 on the CPU: the mean of each normalised image and its means weighted by x and y in
    [-1, 1] (a flip or a shifted crop changes the weighted ones even when the plain mean stays)."""
    x = images.detach().double()
    b, _, h, w = x.shape
    gy = torch.linspace(-1.0, 1.0, h, dtype=torch.float64, device=x.device).view(1, 1, h, 1)
    gx = torch.linspace(-1.0, 1.0, w, dtype=torch.float64, device=x.device).view(1, 1, 1, w)
    dims = (1, 2, 3)
    return torch.stack([x.mean(dims), (x * gx).mean(dims), (x * gy).mean(dims)], dim=1).float().cpu()


def dense_logits(values: torch.Tensor, classes: torch.Tensor | None = None, num_classes: int = 0,
                 tail: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C]`` logits from the cache's ``[B, K]`` values; when K < C, ``classes`` (``[B, K]`` class ids) and
    ``tail`` (``[B]``: the log-mean-exp of the left-out logits) give every left-out class the logit ``tail``.

    What the KD terms then see (the documented top-K error): at temperature T = 1 the teacher's probabilities of
    the K kept classes and its total mass on the others are exact, spread evenly over the others; so the KD
    gradient w.r.t. the student's kept logits is exact and the error lies in how the left-out mass is shared. At
    T != 1 the left-out mass is approximate too (the even split has a lower log-sum-exp at T > 1). The hard label
    (``argmax``, DeiT's default) is exact for every K >= 1.
    """
    values = values.float()
    if classes is None:
        return values
    out = tail.float().view(-1, 1).expand(values.shape[0], num_classes).clone()
    return out.scatter_(1, classes.long(), values)


def tail_logit(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``log(mean exp)`` of each row's logits outside ``classes`` (the kept top-K), computed in fp64."""
    z = logits.double().scatter(1, classes.long(), float("-inf"))
    return (torch.logsumexp(z, dim=1) - math.log(logits.shape[1] - classes.shape[1])).float()


class CachedTeacher(nn.Module):
    """Stands in for teacher ``i`` when its logits come from the cache: the teacher is not built or loaded, and
    calling it is an error (a method that needs the teacher online refuses the cache before it gets here)."""

    def __init__(self, i: int, name: str):
        super().__init__()
        self.i, self.teacher_name = i, name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"teacher {self.i} ({self.teacher_name}) is served from teachers.cache: only its "
                           "logits (batch['teacher_logits']) exist in this run")


def placeholder_teachers(cfg) -> list[nn.Module]:
    return [CachedTeacher(i, spec.name) for i, spec in enumerate(cfg.teachers)]


def check_method(method_cls: type) -> None:
    """Only methods whose teachers give nothing but logits (``Method.logit_teachers``) can use the cache."""
    if not getattr(method_cls, "logit_teachers", False):
        raise CacheError(
            f"method {getattr(method_cls, 'name', method_cls.__name__)!r} needs its teachers online (attention or "
            "feature terms), so it cannot use teachers.cache; only logit distillation (hinton, deit, coadvise) can")


def open_for_run(cfg, data_cfg, loader, *, epochs_needed: int) -> TeacherCache:
    """The cache of ``teachers.cache`` checked against this run; raises :class:`CacheError` naming the difference."""
    where = cfg.teacher_cache.dir
    cache = TeacherCache.open(where)
    m = cache.manifest
    if not m.get("complete"):
        raise CacheError(f"teachers.cache={where}: the build is not complete (run `fastkd teacher-cache build` with "
                         "the same arguments again to finish it)")
    diff = first_difference(m["identity"], identity(cfg, data_cfg, loader.source))
    if diff:
        raise CacheError(f"teachers.cache={where} does not match this run: {diff}")
    diff = first_difference({k: v for k, v in m["layout"].items() if k != "block_batches"},
                            {k: v for k, v in layout_of(loader, 1).items() if k != "block_batches"}, "layout")
    if diff:
        raise CacheError(f"teachers.cache={where} does not match this run's batch layout: {diff}")
    unrecorded = unrecorded_augmentation(data_cfg)
    if unrecorded:
        raise CacheError(f"teachers.cache={where} cannot be replayed by this run: {unrecorded}")
    diff = first_difference(m["views"], views_of(loader), "views")
    if diff:
        raise CacheError(f"teachers.cache={where} does not match this run's views: {diff} (set data.backend to the "
                         "build's: the two back ends draw different views)")
    if len(cfg.teachers) != cache.num_teachers:
        raise CacheError(f"teachers.cache={where} holds {cache.num_teachers} teacher(s), this run has "
                         f"{len(cfg.teachers)}")
    if epochs_needed > cache.epochs and not cfg.teacher_cache.wrap:
        raise CacheError(f"teachers.cache={where} holds {cache.epochs} epoch(s), this run needs {epochs_needed}; "
                         "build more (--epochs) or set teachers.cache_wrap=true to replay its epochs again")
    return cache


class CachedLoader:
    """The training loader with each batch's cached teacher logits added (``batch["teacher_logits"]``).

    The wrapped loader replays the cache's records (``loader.replay``): samples, crop windows, flips, RandAugment,
    erasing and mixes come from the cache. Everything else (``len``, ``state_dict``, ``num_classes``...) is the
    wrapped loader's. With wrap-around, epoch ``e`` of the run replays epoch ``e mod E`` of the cache: the wrapped
    loader is set to that epoch.
    """

    def __init__(self, loader, cache: TeacherCache, *, wrap: bool = False):
        self.loader, self.cache, self.wrap = loader, cache, wrap
        rank = loader.rank

        def replay(epoch: int, start: int, count: int) -> np.ndarray:
            if epoch >= cache.epochs:
                raise CacheError(f"teacher cache {cache.root}: epoch {epoch} is not recorded (it holds "
                                 f"{cache.epochs})")
            return cache.replay_rows(epoch, rank, start, count)

        loader.replay = replay
        self._run_epoch: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if not self.wrap:
            self.loader.set_epoch(epoch)
            return
        replay = epoch % self.cache.epochs
        if epoch != self._run_epoch and self.loader.epoch == replay:
            # a new run epoch replaying the epoch the loader stands in (e.g. a 1-epoch cache): from its start
            self.loader.load_state_dict({**self.loader.state_dict(), "epoch": replay, "position": 0})
        else:
            self.loader.set_epoch(replay)
        self._run_epoch = epoch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self):
        inner = self.loader
        it = iter(inner)
        while True:
            epoch, start = inner.epoch, inner.position
            try:
                batch = next(it)
            except StopIteration:
                return
            yield self.attach(batch, epoch, start)

    def attach(self, batch: dict[str, Any], epoch: int, start: int) -> dict[str, Any]:
        cache = self.cache
        if epoch >= cache.epochs:
            raise CacheError(f"teacher cache {cache.root}: epoch {epoch} is not recorded (it holds {cache.epochs})")
        images = batch["images"]
        n = int(images.shape[0])
        rec = cache.rows(epoch, self.loader.rank, start, n)
        index = batch["index"].cpu().numpy()
        if not np.array_equal(rec["index"], index):
            bad = int(np.flatnonzero(rec["index"] != index)[0])
            raise CacheError(f"teacher cache {cache.root}: epoch {epoch} position {start + bad} delivered sample "
                             f"{index[bad]} but the cache recorded sample {rec['index'][bad]}; the data or its "
                             "order differ from the build")
        got = view_fingerprint(images).numpy()
        off = np.abs(got - rec["view"]).max(axis=1)
        if (off > VIEW_ATOL).any():
            bad = int(np.argmax(off))
            raise CacheError(f"teacher cache {cache.root}: epoch {epoch} position {start + bad} (sample {index[bad]}): "
                             f"the view differs from the recorded one (fingerprint off by {off[bad]:.3g}); crop, "
                             "flip, augmentation or mix do not replay")
        values = torch.from_numpy(np.ascontiguousarray(rec["logits"]))
        topk = "classes" in rec.dtype.names
        classes = torch.from_numpy(np.ascontiguousarray(rec["classes"])) if topk else None
        tail = torch.from_numpy(np.ascontiguousarray(rec["tail"])) if topk else None
        device = images.device
        batch["teacher_logits"] = [
            dense_logits(values[:, t].to(device), classes[:, t].to(device), cache.num_classes, tail[:, t].to(device))
            if topk else values[:, t].to(device)
            for t in range(cache.num_teachers)
        ]
        return batch


def epochs_for(total_steps: int, steps_per_epoch: int) -> int:
    return math.ceil(total_steps / max(steps_per_epoch, 1))


__all__ = ["CachedLoader", "CachedTeacher", "check_method", "dense_logits", "epochs_for", "open_for_run",
           "placeholder_teachers", "tail_logit", "view_fingerprint"]
