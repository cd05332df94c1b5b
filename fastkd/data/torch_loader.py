"""The torchvision backend: PIL decoding in DataLoader workers, the same plan and output as DALI.

Workers decode and augment to uint8 CHW tensors (4x less to pin and copy than float); the main
process moves them to the device, normalises there, casts to the training dtype and applies
Mixup/CutMix, exactly where the DALI backend does.

Each sample is augmented with torch's, NumPy's and Python's generators seeded by the sample's own
seed (:func:`fastkd.data.sharding.sample_seeds`, :func:`fastkd.data.transforms.seeded`) and restored
afterwards, so its crop, flip and RandAugment
do not depend on the worker that draws it, on the number of workers, or on where a run resumed.
"""

from __future__ import annotations

import functools
import gc
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastkd.data.loader import BaseLoader
from fastkd.data.loader import read_checked
from fastkd.data.loader import replacement_candidates
from fastkd.data.transforms import TrainTransform
from fastkd.data.transforms import ValTransform
from fastkd.data.transforms import decode_rgb
from fastkd.data.transforms import pil_size_limit_lifted
from fastkd.data.transforms import seeded


class _Dataset(torch.utils.data.Dataset):
    """Items are ``(index, is_pad, seed)``, or ``(index, is_pad, 0, params, where)`` to replay the recorded view
    parameters ``params`` (:mod:`fastkd.data.record`); returns the decoded views or None plus any bad files met."""

    def __init__(self, loader: TorchLoader) -> None:
        self.source = loader.source
        self.policy = loader.cfg.corrupt
        self.max_pixels = loader.cfg.max_image_pixels
        self.num_views = loader.num_views
        self.train = loader.train
        if loader.train:  # one transform per view (the views may differ: BYOL's asymmetric blur and solarize)
            self.transforms = [TrainTransform(loader.cfg, v) for v in range(self.num_views)]
        else:
            self.transforms = [ValTransform(loader.cfg)]

    def __len__(self) -> int:
        return len(self.source)

    def decode(self, index: int) -> tuple[Image.Image | None, str | None]:
        data, problem = read_checked(self.source, index)
        if data is None:
            return None, problem
        try:
            return decode_rgb(data, self.max_pixels), None
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad streams
            return None, f"decode failed: {type(exc).__name__}: {exc}"

    def augment(self, img: Image.Image, seed: int) -> tuple[list[torch.Tensor], list[dict]]:
        """The views of a sample and what was drawn for each (:meth:`TrainTransform.draw`)."""
        if not self.train:
            return [self.transforms[0](img)], []
        with seeded(seed):
            views, draws = zip(*(transform.draw(img) for transform in self.transforms))
        return list(views), list(draws)

    def replay(self, img: Image.Image, params) -> list[torch.Tensor]:
        """The views of a sample from its recorded parameters (:meth:`TrainTransform.replay`)."""
        ra = "ra_op" in params.dtype.names
        return [t.replay(img, params["crop"][v], bool(params["flip"][v]), params["ra_op"][v] if ra else (),
                         params["ra_arg"][v] if ra else ()) for v, t in enumerate(self.transforms)]

    def __getitem__(self, item: tuple, force_replace: bool = False) -> dict[str, Any]:
        with pil_size_limit_lifted():  # DataConfig.max_image_pixels applies instead (see decode)
            if len(item) == 5:
                return self._replayed(item)
            return self._get(item, force_replace)

    def _replayed(self, item: tuple) -> dict[str, Any]:
        index, is_pad, params, where = int(item[0]), bool(item[1]), item[3], item[4]
        img, problem = self.decode(index)
        if img is None:
            raise RuntimeError(f"replay: sample {index} ({self.source.describe(index)}), recorded at {where}, cannot "
                               f"be read now: {problem}")
        try:
            views = self.replay(img, params)
        except ValueError as exc:
            raise ValueError(f"replay of sample {index} at {where}: {exc}") from None
        return {"views": views, "params": params, "bad": [], "index": index, "is_pad": is_pad,
                "label": int(self.source.labels[index]), "item": item}

    def _get(self, item: tuple[int, bool, int], force_replace: bool) -> dict[str, Any]:
        index, is_pad, seed = int(item[0]), bool(item[1]), int(item[2])
        bad: list[tuple[int, str]] = []
        img, problem = self.decode(index)
        used = index
        if img is None:
            bad.append((index, problem))
            if self.policy == "replace" or force_replace:
                for cand in replacement_candidates(len(self.source), index):
                    img, problem = self.decode(cand)
                    if img is not None:
                        used = cand
                        break
                    bad.append((cand, problem))
        if img is None or self.policy == "error" and bad:
            return {"views": None, "bad": bad, "index": index, "is_pad": is_pad, "item": item}
        views, draws = self.augment(img, seed)  # a replacement takes the seed of the slot it fills
        label = int(self.source.labels[used])
        return {"views": views, "draws": draws, "bad": bad, "index": used, "is_pad": is_pad, "label": label,
                "item": item}


def _collate(items: list[dict[str, Any]], num_views: int, size: int) -> dict[str, Any]:
    good = [it for it in items if it["views"] is not None]
    if good:
        views = [torch.stack([it["views"][v] for it in good]) for v in range(num_views)]
    else:
        views = [torch.empty(0, 3, size, size, dtype=torch.uint8) for _ in range(num_views)]
    return {
        "images": views,
        "labels": np.array([it["label"] for it in good], dtype=np.int64),
        "index": np.array([it["index"] for it in good], dtype=np.int64),
        "is_pad": np.array([it["is_pad"] for it in good], dtype=bool),
        "seeds": np.array([it["item"][2] for it in good], dtype=np.uint64),
        "draws": [it.get("draws") for it in good],
        "bad": [b for it in items for b in it["bad"]],
        "first": items[0]["item"],
        **({"params": np.array([it["params"] for it in good], dtype=good[0]["params"].dtype)}
           if good and "params" in good[0] else {}),
    }


class _EpochBatches:
    """Batch sampler over the chunks of the current epoch plan (iterated in the main process)."""

    def __init__(self, chunks) -> None:
        self.chunks = chunks

    def __iter__(self):
        for chunk in self.chunks:
            if len(chunk) == 4:  # replay: the recorded samples and their view parameters
                rows = chunk[3]()
                yield [(int(r["index"]), bool(r["pad"]), 0, r["params"], chunk[3].where(k)) for k, r in enumerate(rows)]
                continue
            idx, pad, seeds = chunk
            yield list(zip(idx.tolist(), pad.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        return len(self.chunks)


class TorchLoader(BaseLoader):
    backend = "torch"

    def __init__(self, cfg, split, rank, world_size, source) -> None:
        super().__init__(cfg, split, rank, world_size, source)
        self.dataset = _Dataset(self)

    def _batches(self, chunks):
        cfg = self.cfg
        workers = cfg.num_workers
        gen = torch.Generator()  # worker base seeds; the augmentation is seeded per sample
        gen.manual_seed(0)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=_EpochBatches(chunks),
            num_workers=workers,
            collate_fn=functools.partial(_collate, num_views=self.num_views, size=cfg.img_size),
            pin_memory=cfg.pin_memory and self.device.type == "cuda",
            prefetch_factor=cfg.prefetch if workers > 0 else None,
            generator=gen,
            persistent_workers=False,
        )
        if workers > 0:
            # Workers are forked here. A forked child must never run the destructor of an object it
            # inherited (a DALI pipeline freed in the child segfaults), so collect garbage now and
            # freeze the survivors out of the child's garbage collector while the workers start.
            gc.collect()
            gc.freeze()
            try:
                batches = iter(loader)
            finally:
                gc.unfreeze()
        else:
            batches = iter(loader)
        for (idx, *_), raw in zip(chunks, batches):
            for index, reason in raw["bad"]:
                self.record_bad(index, reason)
            if len(raw["index"]) == 0:  # every sample unreadable: never hand out an empty batch
                item = self.dataset.__getitem__(raw["first"], force_replace=True)
                for index, reason in item["bad"]:
                    self.record_bad(index, reason)
                if item["views"] is None:
                    raise RuntimeError(f"no readable image near data set index {raw['first'][0]}")
                raw = _collate([item], self.num_views, cfg.img_size)
            yield raw, len(idx)
