"""The teacher-cache format, the identity of what a cache was built from, and shard I/O.

This docstring is the one description of the format (README links here)::

    DIR/manifest.json
    DIR/shards/e{epoch:04d}_r{rank:04d}_b{block:06d}.npy          one shard: a NumPy structured array (memory-mapped)
    DIR/shards/e{epoch:04d}_r{rank:04d}_b{block:06d}.npy.sha256   its checksum; written last, so a shard without
                                                                  one is incomplete and is rebuilt on resume

``manifest.json``::

    format      "fastkd-teacher-cache/3" (a cache of an older format is refused: rebuild it)
    identity    what the cached logits depend on; a training run recomputes it and refuses a mismatch:
                  teachers, data   the recipe fields that decide the teacher's inputs and outputs: the teachers'
                                   specs (name, kwargs) and the data section (augmentation, Mixup/CutMix, seed, dtype,
                                   normalisation; not paths, workers or back end)
                  run.seed, student  only when a teacher is randomly initialised (its weights come from that seed)
                  teacher_weights  per teacher: the sha256 of its weights file ("random-init" without one); the
                                   file may move
                  dataset          number of samples, classes, and a sha256 of the file names (relative) and labels
                  seed             data.seed
    epochs      E: epochs recorded (epoch e of the run reads epoch e of the cache; e >= E only with wrap-around)
    topk        K: logits kept per teacher and sample (K >= classes: all of them, in class order)
    num_classes C, dtype of the logits ("float32" or "float16"), teachers (their count T)
    layout      the batch layout the views and mixes belong to: world_size, batch_size, drop_last,
                shard_policy, samples_per_rank, batches_per_epoch, block_batches
    views       backend   the data back end that drew the views ("torch" or "dali"; they decode, resample and
                          augment differently, so a run replays with the same one)
                params    the NumPy ``descr`` of the ``params`` field below (its fields follow from the data section)
    complete    true once every shard is written; shards: {file name: sha256}

Shard ``e_r_b`` holds positions ``[b·R, (b+1)·R)`` of rank ``r``'s share of epoch ``e`` (``R = block_batches ·
batch_size``; the last block may be shorter), one record per position:

    index    int64          data set index of the sample delivered at that position (-1: none, e.g. a skipped file;
                            the samples of a batch come first, so its -1 rows close it)
    pad      bool           the sample repeats one of another rank to even out the ranks (``batch["is_pad"]``)
    params   struct         the view parameters the loader drew for it (:mod:`fastkd.data.record` lists the
                            fields): per view the crop window (left, top, width, height in the decoded image), the
                            flip, RandAugment's operations, magnitudes and arguments (when on), the random-erasing
                            box and the seed of its noise (when on); per sample its batch's Mixup/CutMix partner
                            (position in the batch), lambda and box (when on)
    view     float32[3]     fingerprint of the view the teacher saw (after Mixup/CutMix): the mean of the
                            normalised image and its means weighted by x and by y in [-1, 1]; it catches what the
                            parameters do not describe (other pixels: another decoder, resize or normalisation)
    logits   dtype[T, K]    each teacher's K largest logits (all C in class order when K >= C)
    classes  int32[T, K]    their class ids (only when K < C)
    tail     float32[T]     only when K < C: ``log(mean_j exp(z_j))`` over the C - K left-out classes ``j``; the
                            reconstruction gives each of them this logit, so at T = 1 the kept classes' probabilities
                            and the left-out mass are exact (:func:`fastkd.cache.replay.dense_logits`)

Replay: a training run reads the views from the cache, it does not draw them.
:class:`fastkd.cache.replay.CachedLoader` hands the loader the records of each batch (``loader.replay``,
:mod:`fastkd.data.loader`) and the loader delivers the recorded samples (``index`` >= 0, in order) with the recorded
views: the torchvision path cuts the recorded crop window, flips and runs timm's RandAugment operations with the
recorded arguments (``TrainTransform.replay``); DALI is fed the recorded crop windows (``decoders.image_slice``
anchors and shapes through ``external_source``), mirror flags and RandAugment operations, magnitude bins and signs
(``DaliLoader.replay_inputs``); both then erase the recorded box with the noise of its recorded seed and mix each
sample with its recorded partner, lambda and box (:func:`fastkd.data.record.replay_erase`,
:func:`~fastkd.data.record.replay_mix`). Editing a record changes the replayed view. The back end must be the
build's (``views.backend``: the two decode and resample differently), and recipes with an augmentation the records
do not describe (the self-supervised view augmentation) cannot be cached. :class:`~fastkd.cache.replay.CachedLoader`
then checks each batch: the delivered data set indices, then the view fingerprint (a difference names the epoch,
position and sample).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "fastkd-teacher-cache/3"

# data-section fields that cannot change what the teacher sees (paths, workers, back end, validation-only settings)
_DATA_IGNORED = ("root", "train_path", "val_path", "source", "backend", "device", "val_batch_size", "num_workers",
                 "prefetch", "pin_memory", "crop_pct", "hw_decoder_load", "extra", "batch_size")


class CacheError(ValueError):
    """A teacher cache that cannot be used: missing, incomplete, corrupt, or built for another run."""


def _sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def dataset_fingerprint(source) -> dict[str, Any]:
    """Number of samples and classes, and a sha256 of the file names (relative to their common folder) and labels."""
    names = [source.describe(i) for i in range(len(source))]
    try:
        base = os.path.commonpath(names) if len(names) > 1 else os.path.dirname(names[0])
    except ValueError:
        base = ""
    h = hashlib.sha256()
    for n in names:
        h.update((os.path.relpath(n, base) if base else n).encode() + b"\0")
    h.update(np.asarray(source.labels, dtype=np.int64).tobytes())
    return {"num_samples": len(source), "num_classes": int(source.num_classes), "sha256": h.hexdigest()}


def teacher_identity(cfg) -> list[str]:
    """Per teacher: the sha256 of its weights file, or "random-init" (the teacher itself is not built)."""
    out = []
    for i, spec in enumerate(cfg.teachers):
        if spec.weights:
            if not os.path.isfile(spec.weights):
                raise CacheError(f"teachers.{i}.weights={spec.weights}: no such file (needed to identify the teacher)")
            digest = _sha256_file(spec.weights)
        else:
            digest = "random-init"
        out.append(digest)
    return out


def recipe_identity(cfg, data_cfg) -> dict[str, Any]:
    """The recipe fields that decide the cached logits (see the module docstring)."""
    data = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in _DATA_IGNORED}
    teachers = [{k: v for k, v in dataclasses.asdict(s).items() if k != "weights"} for s in cfg.teachers]
    out: dict[str, Any] = {"teachers": teachers, "data": data}  # weights: by content (teacher_weights), not path
    if any(not s.weights for s in cfg.teachers):
        out["run"] = {"seed": cfg.run.seed}
        out["student"] = dataclasses.asdict(cfg.student)
    return json.loads(json.dumps(out, default=list))  # tuples -> lists, as they come back from JSON


def identity(cfg, data_cfg, source) -> dict[str, Any]:
    """The recipe's fields by their recipe paths (``data.mixup``, ``teachers.0.name``...), the teachers' weights
    (``teacher_weights``), the data set (``dataset``) and the seed: a difference names the key a user can fix."""
    return {**recipe_identity(cfg, data_cfg), "teacher_weights": teacher_identity(cfg),
            "dataset": dataset_fingerprint(source), "seed": int(data_cfg.seed)}


def layout_of(loader, block_batches: int) -> dict[str, Any]:
    """The batch layout of a training loader (a :class:`fastkd.data.loader.BaseLoader`)."""
    return {"world_size": int(loader.world_size), "batch_size": int(loader.batch_size),
            "drop_last": bool(loader.drop_last), "shard_policy": str(loader.cfg.shard_policy),
            "samples_per_rank": int(loader.samples_per_epoch), "batches_per_epoch": len(loader),
            "block_batches": int(block_batches)}


def first_difference(saved: Any, mine: Any, path: str = "") -> str | None:
    """The dotted path and both values of the first difference between two JSON-like trees, or None."""
    if isinstance(saved, dict) and isinstance(mine, dict):
        for k in sorted(set(saved) | set(mine), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in saved or k not in mine:
                return f"{sub}: cache {saved.get(k, '(absent)')!r}, this run {mine.get(k, '(absent)')!r}"
            d = first_difference(saved[k], mine[k], sub)
            if d:
                return d
        return None
    if isinstance(saved, list) and isinstance(mine, list) and len(saved) == len(mine):
        for i, (a, b) in enumerate(zip(saved, mine)):
            d = first_difference(a, b, f"{path}.{i}")
            if d:
                return d
        return None
    return None if saved == mine else f"{path}: cache {saved!r}, this run {mine!r}"


def views_of(loader) -> dict[str, Any]:
    """The ``views`` entry of the manifest for a training loader: its back end and view-parameter fields."""
    from fastkd.data.record import params_dtype

    return json.loads(json.dumps({"backend": loader.backend, "params": params_dtype(loader.cfg).descr}))


def params_dtype_of(views: dict[str, Any]) -> np.dtype:
    """The ``params`` field's dtype from the manifest's ``views`` entry (JSON lists back to NumPy's tuples)."""
    return np.dtype([(f[0], f[1], tuple(f[2])) if len(f) > 2 else (f[0], f[1]) for f in views["params"]])


def record_dtype(num_teachers: int, k: int, num_classes: int, dtype: str, params: np.dtype) -> np.dtype:
    fields = [("index", np.int64), ("pad", np.bool_), ("params", params), ("view", np.float32, (3,)),
              ("logits", np.dtype(dtype), (num_teachers, k))]
    if k < num_classes:
        fields += [("classes", np.int32, (num_teachers, k)), ("tail", np.float32, (num_teachers,))]
    return np.dtype(fields)


class TeacherCache:
    """A cache folder: its manifest and its shards (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        m = manifest
        self.epochs, self.topk, self.num_classes = int(m["epochs"]), int(m["topk"]), int(m["num_classes"])
        self.num_teachers, self.dtype = int(m["teachers"]), str(m["dtype"])
        self.layout = m["layout"]
        self.k = min(self.topk, self.num_classes)
        self.record = record_dtype(self.num_teachers, self.k, self.num_classes, self.dtype,
                                   params_dtype_of(m["views"]))
        self.rows_per_block = self.layout["block_batches"] * self.layout["batch_size"]
        self._open: OrderedDict[str, np.ndarray] = OrderedDict()  # a few verified, memory-mapped shards
        self._lock = threading.Lock()  # the loader reads records ahead in its threads while training reads logits

    # ---- manifest

    @staticmethod
    def manifest_path(root: str | os.PathLike) -> Path:
        return Path(root) / "manifest.json"

    @classmethod
    def open(cls, root: str | os.PathLike) -> TeacherCache:
        path = cls.manifest_path(root)
        if not path.is_file():
            raise CacheError(f"teachers.cache={root}: no manifest.json there (build one with "
                             "`fastkd teacher-cache build --config RECIPE --out DIR`)")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise CacheError(f"teachers.cache={root}: format {manifest.get('format')!r}, this fastkd reads "
                             f"{FORMAT!r} (it replays the recorded views, which older formats do not fully record); "
                             "rebuild it with `fastkd teacher-cache build`")
        return cls(root, manifest)

    def write_manifest(self) -> None:
        path = self.manifest_path(self.root)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True))
        os.replace(tmp, path)

    # ---- shards

    def blocks_per_epoch(self) -> int:
        rows = self.layout["batches_per_epoch"] * self.layout["batch_size"]
        return -(-rows // self.rows_per_block)

    def shard_name(self, epoch: int, rank: int, block: int) -> str:
        return f"e{epoch:04d}_r{rank:04d}_b{block:06d}.npy"

    def shard_path(self, name: str) -> Path:
        return self.root / "shards" / name

    def all_shards(self) -> list[tuple[int, int, int]]:
        return [(e, r, b) for e in range(self.epochs) for r in range(self.layout["world_size"])
                for b in range(self.blocks_per_epoch())]

    def is_done(self, name: str) -> bool:
        """A finished shard: its checksum file exists and matches its contents (a resumed build trusts nothing else)."""
        path, sums = self.shard_path(name), self.shard_path(name + ".sha256")
        return path.is_file() and sums.is_file() and sums.read_text().strip() == _sha256_file(path)

    def block_rows(self, block: int) -> int:
        rows = self.layout["batches_per_epoch"] * self.layout["batch_size"]
        return min(self.rows_per_block, rows - block * self.rows_per_block)

    def write_shard(self, name: str, records: np.ndarray) -> str:
        """Write a shard atomically (memory-mapped .npy, then its checksum file); returns the sha256."""
        path = self.shard_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.record, shape=records.shape)
        out[...] = records
        out.flush()
        del out
        os.replace(tmp, path)
        digest = _sha256_file(path)
        sums = self.shard_path(name + ".sha256")
        sums.with_name(sums.name + ".tmp").write_text(digest + "\n")
        os.replace(sums.with_name(sums.name + ".tmp"), sums)
        return digest

    def read_shard(self, epoch: int, rank: int, block: int) -> np.ndarray:
        """The shard's records, memory-mapped; its checksum is verified the first time it is opened."""
        name = self.shard_name(epoch, rank, block)
        with self._lock:
            return self._read_shard(name)

    def _read_shard(self, name: str) -> np.ndarray:
        if name in self._open:
            self._open.move_to_end(name)
        else:
            path = self.shard_path(name)
            want = self.manifest.get("shards", {}).get(name)
            if not path.is_file() or want is None:
                raise CacheError(f"teacher cache {self.root}: shard {name} is missing (an incomplete build? run "
                                 "`fastkd teacher-cache build` again with the same arguments to finish it)")
            got = _sha256_file(path)
            if got != want:
                raise CacheError(f"teacher cache {self.root}: shard {name} is corrupt (sha256 {got[:12]}..., the "
                                 f"manifest says {want[:12]}...); delete it and run the build again")
            arr = np.load(path, mmap_mode="r")
            if arr.dtype != self.record:
                raise CacheError(f"teacher cache {self.root}: shard {name} has records {arr.dtype}, expected "
                                 f"{self.record}")
            self._open[name] = arr
            while len(self._open) > 4:  # the loader reads a batch or two ahead of training, both in order
                self._open.popitem(last=False)
        return self._open[name]

    def rows(self, epoch: int, rank: int, start: int, count: int) -> np.ndarray:
        """Records of positions ``[start, start + count)`` of ``rank``'s share of ``epoch``."""
        out = []
        pos = start
        while pos < start + count:
            block, row = divmod(pos, self.rows_per_block)
            take = min(start + count - pos, self.rows_per_block - row)
            out.append(np.asarray(self.read_shard(epoch, rank, block)[row:row + take]))
            pos += take
        return out[0] if len(out) == 1 else np.concatenate(out)

    def replay_rows(self, epoch: int, rank: int, start: int, count: int) -> np.ndarray:
        """What a loader replays of positions ``[start, start + count)``: the fields ``index``, ``pad``, ``params``."""
        rows = self.rows(epoch, rank, start, count)
        out = np.empty(len(rows), dtype=[(f, rows.dtype.fields[f][0]) for f in ("index", "pad", "params")])
        for f in out.dtype.names:
            out[f] = rows[f]
        return out

    def bytes_per_record(self) -> int:
        return self.record.itemsize


__all__ = ["FORMAT", "CacheError", "TeacherCache", "dataset_fingerprint", "first_difference", "identity",
           "layout_of", "params_dtype_of", "record_dtype", "recipe_identity", "teacher_identity", "views_of"]
