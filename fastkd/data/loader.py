"""The loader contract both backends implement, and :func:`build_loader`.

A loader is an iterable of dict batches::

    batch["images"]   FloatTensor [B, 3, H, W] in ``cfg.dtype`` on the target device, normalised with
                      ``cfg.mean``/``cfg.std`` (a list of ``num_views`` such tensors in multi-view mode)
    batch["labels"]   LongTensor [B]: hard labels (before Mixup/CutMix), on the target device
    batch["targets"]  FloatTensor [B, num_classes]: soft targets, only when Mixup or CutMix is on
    batch["clean_images"]  the images before Mixup/CutMix, only when mixing and ``keep_clean_images`` is set
                      (a method that scores the teacher on clean images asks for it: SSTA's importance="auto")
    batch["index"]    LongTensor [B]: data set index of each sample (on the CPU)
    batch["is_pad"]   BoolTensor [B]: True for samples repeated to even out the ranks (on the CPU)
    batch["view_params"]  NumPy structured array [B]: what was drawn for each sample (crop, flip, RandAugment,
                      erasing, Mixup/CutMix), only when ``record_views`` is set (:mod:`fastkd.data.record`), or
                      what was replayed (``replay``)

Replay (the teacher cache): with ``loader.replay`` set to a callable ``(epoch, start, count)`` returning the records of
positions ``[start, start + count)`` of this rank's share of ``epoch`` (a NumPy structured array with the fields
``index``, ``pad`` and ``params``, :func:`fastkd.data.record.params_dtype`), the loader draws nothing: each batch
holds the recorded samples (``index`` >= 0, in order) with their recorded views, erasing and mixes.

It has ``__len__`` (batches in a full epoch), ``set_epoch``, ``state_dict``/``load_state_dict``
(epoch and position inside it, and the corrupt files met so far), the attributes ``num_classes``,
``backend``, ``corrupt`` (data set index -> reason) and :meth:`BaseLoader.corrupt_summary` (the
corrupt-file totals of the split, ready for a run summary).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fastkd.data import record
from fastkd.data import sharding
from fastkd.data.config import SPLITS
from fastkd.data.config import DataConfig
from fastkd.data.sources import Source
from fastkd.data.sources import encoded_problem
from fastkd.data.sources import open_source
from fastkd.data.transforms import seeded

log = logging.getLogger("fastkd.data")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REPLACE_TRIES = 64


def read_checked(source: Source, index: int) -> tuple[bytes | None, str | None]:
    """The encoded bytes of a sample, or ``(None, reason)`` when it cannot be read or is truncated."""
    try:
        data = source.read(index)
    except OSError as exc:
        return None, f"unreadable: {exc}"
    problem = encoded_problem(data)
    return (None, problem) if problem else (data, None)


def replacement_candidates(num_samples: int, index: int):
    """Where a replacement for an unreadable sample is looked for: the next samples in data set order."""
    return ((index + k) % num_samples for k in range(1, min(num_samples, REPLACE_TRIES + 1)))


class CorruptImageError(RuntimeError):
    """An image could not be read or decoded and ``DataConfig.corrupt == "error"``."""


def resolve_device(cfg: DataConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"DataConfig.device={cfg.device!r}: CUDA is not available on this machine; use device='cpu' "
                "(DALI then runs the same graph with CPU operators) or device='auto'"
            )
        dev = torch.device(cfg.device)
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    return torch.device("cpu")


class BaseLoader:
    """Shared bookkeeping: the epoch plan, resumption, corrupt-file accounting, device-side finishing."""

    backend = "base"

    def __init__(self, cfg: DataConfig, split: str, rank: int, world_size: int, source: Source) -> None:
        self.cfg = cfg
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.source = source
        self.device = resolve_device(cfg)
        self.dtype = _DTYPES[cfg.dtype]
        self.train = split == "train"
        self.batch_size = cfg.batch_size_for(split)
        self.shuffle = cfg.shuffle_for(split)
        self.drop_last = cfg.drop_last
        self.num_classes = cfg.num_classes or source.num_classes
        self.num_views = cfg.num_views if self.train else 1
        self.epoch = 0
        self.position = 0  # samples of this rank's epoch share already handed out
        self.corrupt: dict[int, str] = {}  # data set index -> reason
        self._lock = threading.Lock()
        self._mean = torch.tensor([255.0 * m for m in cfg.mean]).view(1, 3, 1, 1)
        self._std = torch.tensor([255.0 * s for s in cfg.std]).view(1, 3, 1, 1)
        self.keep_clean_images = False  # also hand out the un-mixed images (batch["clean_images"]) when mixing
        self.record_views = False  # also hand out what was drawn for each sample (batch["view_params"])
        self.replay = None  # (epoch, start, count) -> records: replay them instead of drawing (see the docstring)
        self._mixup = None
        if self.train and cfg.mixing:
            from timm.data import Mixup

            self._mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                mode=cfg.mixup_mode,
                label_smoothing=cfg.label_smoothing,
                num_classes=self.num_classes,
            )
        self._erase = None
        if self.train and cfg.random_erasing > 0:
            from timm.data.random_erasing import RandomErasing

            self._erase = RandomErasing(
                probability=cfg.random_erasing, mode=cfg.random_erasing_mode, device=str(self.device)
            )
        self.repeats = cfg.repeated_augmentation if self.train else 1
        sharding.shard(np.arange(len(source)), rank, world_size, cfg.shard_policy)  # fails early if empty

    # ------------------------------------------------------------------------------------------------
    # the plan

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank reads per epoch (equal on every rank)."""
        return sharding.samples_per_rank(len(self.source), self.world_size, self.cfg.shard_policy)

    def __len__(self) -> int:
        """Batches in a full epoch (equal on every rank). See :attr:`batches_left` after a resume."""
        return sharding.num_batches(self.samples_per_epoch, self.batch_size, self.drop_last)

    @property
    def batches_left(self) -> int:
        return len(sharding.batch_slices(self.samples_per_epoch, self.batch_size, self.drop_last, self.position))

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This rank's sample indices for ``epoch`` (default: the current one) and their padding flags."""
        indices, pad, _ = self._plan(self.epoch if epoch is None else epoch)
        return indices, pad

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices, padding flags and augmentation seeds of this rank's share of ``epoch``. With repeated
        augmentation the share is cut from the epoch order of ``repeats`` copies per sample, to the
        length of an ordinary epoch, and each copy has its own seed."""
        order = sharding.epoch_order(len(self.source), epoch, self.cfg.seed, self.shuffle)
        keys, pad = sharding.shard(
            sharding.repeat(order, self.repeats), self.rank, self.world_size, self.cfg.shard_policy
        )
        keys, pad = keys[: self.samples_per_epoch], pad[: self.samples_per_epoch]
        if not self.train:
            return keys, pad, np.zeros(len(keys), np.uint64)
        return keys // self.repeats, pad, sharding.sample_seeds(self.cfg.seed, epoch, keys)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at its beginning; calling it with the current epoch keeps a resumed position."""
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": len(self.source),
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.cfg.seed,
            "split": self.split,
            "corrupt": dict(self.corrupt),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("num_samples", "world_size", "seed"):
            mine = {"num_samples": len(self.source), "world_size": self.world_size, "seed": self.cfg.seed}[key]
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"loader state: saved {key}={state[key]} but this loader has {key}={mine}; the remaining "
                    "samples of the interrupted epoch cannot be reproduced (start the epoch afresh instead)"
                )
        position = int(state["position"])
        if not 0 <= position <= self.samples_per_epoch:
            raise ValueError(f"loader state: position={position} outside [0, {self.samples_per_epoch}]")
        self.epoch, self.position = int(state["epoch"]), position
        with self._lock:  # files found corrupt before the interruption still count (and are not re-read)
            self.corrupt.update({int(i): str(why) for i, why in (state.get("corrupt") or {}).items()})

    # ------------------------------------------------------------------------------------------------
    # iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        indices, pad, seeds = self._plan(epoch)
        slices = sharding.batch_slices(len(indices), self.batch_size, self.drop_last, self.position)
        if self.replay is None:
            chunks = [(indices[b:e], pad[b:e], seeds[b:e]) for b, e in slices]
        else:  # the records of each batch, read when the batch is (from a memory-mapped cache)
            chunks = [(indices[b:e], pad[b:e], seeds[b:e], _Replayed(self.replay, epoch, b, e - b)) for b, e in slices]
        for raw, consumed in self._batches(chunks):
            batch = self._finish(raw, sharding.batch_seed(self.cfg.seed, epoch, self.position))
            self.position += consumed
            yield batch
        self.epoch, self.position = epoch + 1, 0

    def _batches(self, chunks):  # -> iterator of (raw batch dict, samples consumed)
        """``chunks``: ``(indices, is_pad, augmentation seeds)`` of each batch still to read this epoch, with a
        fourth element when replaying: a :class:`_Replayed` (called: the batch's recorded samples and views)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------
    # corrupt files

    def record_bad(self, index: int, reason: str) -> None:
        """Count and report an unreadable sample (once per file); raise when the policy is "error"."""
        name = self.source.describe(index)
        if self.cfg.corrupt == "error":
            raise CorruptImageError(f"corrupt image {name}: {reason} (DataConfig.corrupt='skip' or 'replace' goes on)")
        with self._lock:
            if index in self.corrupt:
                return
            self.corrupt[index] = reason
            count = len(self.corrupt)
        action = "skipped" if self.cfg.corrupt == "skip" else "replaced by the next readable sample"
        log.warning("corrupt image %s: %s; %s (%d corrupt so far in %s)", name, reason, action, count, self.split)

    def corrupt_summary(self) -> dict[str, Any]:
        """The corrupt files this loader (this rank) has met so far, JSON-ready, for ``summary.json`` and
        ``metrics.jsonl``: ``{"split", "policy", "count", "files": {name: reason}}``.

        The record survives a resume (it is part of :meth:`state_dict`). Ranks read different files: the
        run's total for a split is the size of the union of the ranks' ``files`` (names are unique),
        for example after ``torch.distributed.all_gather_object``.
        """
        with self._lock:
            found = sorted(self.corrupt.items())
        files = {self.source.describe(index): reason for index, reason in found}
        return {"split": self.split, "policy": self.cfg.corrupt, "count": len(files), "files": files}

    def read_checked(self, index: int) -> tuple[bytes | None, str | None]:
        return read_checked(self.source, index)

    def replacement_candidates(self, index: int):
        return replacement_candidates(len(self.source), index)

    # ------------------------------------------------------------------------------------------------
    # device side

    def _normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.to(self.device, non_blocking=True).float()
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x.to(self.dtype)

    def _finish(self, raw: dict[str, Any], seed: int) -> dict[str, Any]:
        """raw: images (list of views, normalised on device or uint8), labels, index, is_pad (numpy/tensors),
        seeds (each sample's augmentation seed); ``seed``: the batch's Mixup/CutMix seed."""
        views = raw["images"]
        if views[0].dtype == torch.uint8:
            views = [self._normalize(v) for v in views]
        views = [v if v.dtype == self.dtype else v.to(self.dtype) for v in views]
        replayed = raw.get("params")  # the records the batch replays (``replay``), else None: drawn
        if replayed is not None:
            params = replayed
        else:
            params = record.new_params(self.cfg, raw["draws"]) if self.record_views else None
        if self._erase is not None:
            for v, view in enumerate(views):
                if replayed is not None:
                    for image, box, noise in zip(view, replayed["erase"][:, v], replayed["erase_seed"][:, v]):
                        record.replay_erase(self._erase, image, box, int(noise))
                    continue
                seeds = sharding.derived_seeds(raw["seeds"], v)
                boxes = self._random_erase(view, seeds)
                if params is not None:
                    params["erase"][:, v] = boxes
                    params["erase_seed"][:, v] = seeds
        labels = torch.as_tensor(np.asarray(raw["labels"], dtype=np.int64)).to(self.device, non_blocking=True)
        batch: dict[str, Any] = {
            "images": views if self.num_views > 1 else views[0],
            "labels": labels,
            "index": torch.as_tensor(np.asarray(raw["index"], dtype=np.int64)),
            "is_pad": torch.as_tensor(np.asarray(raw["is_pad"], dtype=bool)),
        }
        if self._mixup is not None and replayed is not None:
            if self.keep_clean_images:
                batch["clean_images"] = views[0].clone()
            batch["images"], batch["targets"] = record.replay_mix(views[0], labels, replayed, self.cfg.mixup_mode,
                                                                  self.num_classes, self.cfg.label_smoothing)
        elif self._mixup is not None:
            # timm draws from NumPy's global generator: seed it for this batch, then give it back untouched
            state = np.random.get_state()
            if params is not None:
                np.random.seed(seed & 0xFFFFFFFF)
                self._record_mix(params, views[0])
            np.random.seed(seed & 0xFFFFFFFF)
            try:
                if self.keep_clean_images:  # timm mixes in place
                    batch["clean_images"] = views[0].clone()
                batch["images"], batch["targets"] = self._mix(views[0], labels)
            finally:
                np.random.set_state(state)
        if params is not None:
            batch["view_params"] = params
        return batch

    def _random_erase(self, images: torch.Tensor, seeds: np.ndarray) -> list[tuple[int, int, int, int]]:
        """timm's ``RandomErasing``, in place, sample by sample, each with its own seed; the erased boxes."""
        boxes = []
        for image, sample_seed in zip(images, seeds.tolist()):
            with seeded(int(sample_seed), images.device):
                boxes.append(record.erase(self._erase, image))
        return boxes

    def _record_mix(self, params: np.ndarray, x: torch.Tensor) -> None:
        """Fill the Mixup/CutMix fields of ``params`` with what :meth:`_mix` is about to draw (see there)."""
        even = len(x) - len(x) % 2
        if not even:
            return
        for i, (j, lam, box) in enumerate(record.draw_mix(self._mixup, even, tuple(x.shape[-2:]))):
            params["mix_partner"][i], params["mix_lam"][i], params["mix_box"][i] = j, lam, box

    def _mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm Mixup/CutMix; an odd batch (a last partial one) mixes its even prefix and gives the
        last sample a smoothed one-hot target, since timm pairs samples with the flipped batch."""
        from timm.data.mixup import mixup_target

        even = len(x) - len(x) % 2
        if even == len(x):
            return self._mixup(x, y)
        targets = mixup_target(y, self.num_classes, 1.0, self.cfg.label_smoothing)
        if even:
            _, targets[:even] = self._mixup(x[:even], y[:even])  # mixes the view in place
        return x, targets

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, backend={self.backend!r}, "
            f"rank={self.rank}/{self.world_size}, samples={len(self.source)}, batches/epoch={len(self)}, "
            f"device={self.device}, dtype={self.cfg.dtype})"
        )


class _Replayed:
    """The recorded rows of one batch (``loader.replay``), read once, when first asked for; picklable."""

    def __init__(self, replay, epoch: int, start: int, count: int) -> None:
        self.replay, self.epoch, self.start, self.count = replay, epoch, start, count
        self._rows: np.ndarray | None = None

    def __call__(self) -> np.ndarray:
        """The batch's recorded samples (``index`` >= 0), in order: fields ``index``, ``pad`` and ``params``."""
        if self._rows is None:
            rows = self.replay(self.epoch, self.start, self.count)
            if len(rows) != self.count:
                raise ValueError(f"replay: {len(rows)} records for positions [{self.start}, "
                                 f"{self.start + self.count}) of epoch {self.epoch}")
            rows = rows[rows["index"] >= 0]
            if not len(rows):
                raise ValueError(f"replay: no recorded sample at positions [{self.start}, {self.start + self.count}) "
                                 f"of epoch {self.epoch}")
            self._rows = rows
        return self._rows

    def where(self, k: int) -> str:
        return f"epoch {self.epoch} position {self.start + k}"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_loader(
    cfg: DataConfig | Mapping[str, Any] | Any,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
) -> BaseLoader:
    """A loader of ``split`` ("train" or "val") for ``rank`` of ``world_size`` ranks.

    ``cfg`` is a :class:`DataConfig` or a dict with its keys. ``backend="auto"`` picks DALI when it is
    installed, else torchvision, and logs the choice.
    """
    cfg = DataConfig.from_any(cfg)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {list(SPLITS)}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: must be a positive integer")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}: must lie in [0, world_size={world_size})")
    backend = cfg.backend
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
        log.info("data backend: %s (auto: DALI is %s)", backend, "installed" if backend == "dali" else "not installed")
    source = open_source(cfg, split)
    if backend == "dali":
        from fastkd.data.dali_loader import DaliLoader

        return DaliLoader(cfg, split, rank, world_size, source)
    from fastkd.data.torch_loader import TorchLoader

    return TorchLoader(cfg, split, rank, world_size, source)
