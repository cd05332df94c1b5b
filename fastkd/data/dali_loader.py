"""The DALI backend.

Graph (training): encoded bytes -> decode fused with random-resized-crop (``decoders.image_random_crop``:
only the crop window is decoded; "mixed" = nvJPEG on the GPU) -> resize to ``img_size`` -> optional
RandAugment (``nvidia.dali.auto_aug.rand_augment``) -> flip + normalise + HWC->CHW + cast
(``crop_mirror_normalize``). Multi-view mode decodes once and draws ``num_views`` independent
random-resized-crops. Validation: decode -> resize shorter side -> centre crop + normalise.
Without a GPU the identical graph runs with CPU operators (``device_id=None``).

Input: the pipeline reads from ``fn.external_source``, fed by this rank's shard of the epoch plan
(:mod:`fastkd.data.sharding`); the bytes are read by a thread pool one batch ahead. DALI's own file
reader cannot start an epoch at an arbitrary position, nor leave out a file after a decode error, so
the sharded reading is done here: the sample order is then identical to the torch backend's and a
resumed run reads exactly the samples it has not seen.

Corrupt files: obviously broken files (empty, unknown format, truncated JPEG/PNG) are caught before
DALI sees them. A file that still makes the decoder fail raises inside the pipeline; the loader
then probes each sample of the batches in flight with a one-image CPU decode, records the bad ones,
rebuilds the pipeline and feeds those batches again without them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import weakref
from typing import Any

import numpy as np
import torch

from fastkd.data.config import DataConfig
from fastkd.data.loader import BaseLoader


def _dali():
    try:
        import nvidia.dali as dali
    except ImportError as exc:  # pragma: no cover - exercised where DALI is missing
        raise ImportError(
            "DataConfig.backend='dali' needs NVIDIA DALI: pip install fastkd[dali] (or use backend='torch'/'auto')"
        ) from exc
    return dali


def build_pipeline(
    cfg: DataConfig,
    split: str,
    source_fn,
    *,
    batch_size: int,
    device_id: int | None,
    seed: int,
    num_threads: int | None = None,
):
    """The DALI pipeline of ``split``, fed by ``source_fn`` (a callable returning a list of uint8 arrays
    of encoded images, raising StopIteration at the end of an epoch). Built and ready to run.

    ``device_id=None`` builds the CPU graph; an integer builds the GPU graph, which fails with a clear
    error where CUDA is missing.
    """
    _dali()
    from nvidia.dali import fn
    from nvidia.dali import pipeline_def
    from nvidia.dali import types

    gpu = device_id is not None
    train = split == "train"
    num_views = cfg.num_views if train else 1
    decode_device = "mixed" if gpu else "cpu"
    interp = types.INTERP_LINEAR if cfg.interpolation == "bilinear" else types.INTERP_CUBIC
    out_dtype = types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT
    mean = [255.0 * m for m in cfg.mean]
    std = [255.0 * s for s in cfg.std]
    size = cfg.img_size
    decoder_kw: dict[str, Any] = {"output_type": types.RGB}
    if gpu:
        # ImageNet-sized buffers, so nvJPEG does not reallocate during the first epochs
        decoder_kw.update(device_memory_padding=211025920, host_memory_padding=140544512)
        decoder_kw["hw_decoder_load"] = cfg.hw_decoder_load

    @pipeline_def(enable_conditionals=train and cfg.randaugment > 0)
    def graph():
        encoded = fn.external_source(source=source_fn, batch=True, dtype=types.UINT8, ndim=1, name="encoded")
        if not train:
            img = fn.decoders.image(encoded, device=decode_device, **decoder_kw)
            img = fn.resize(img, resize_shorter=cfg.resize_size(), interp_type=interp, antialias=True)
            return fn.crop_mirror_normalize(
                img,
                crop=(size, size),
                crop_pos_x=0.5,
                crop_pos_y=0.5,
                mean=mean,
                std=std,
                dtype=out_dtype,
                output_layout="CHW",
            )
        crop_kw = dict(random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio), num_attempts=10)
        if num_views == 1:
            img = fn.decoders.image_random_crop(encoded, device=decode_device, **crop_kw, **decoder_kw)
            views = [fn.resize(img, resize_x=size, resize_y=size, interp_type=interp, antialias=True)]
        else:
            img = fn.decoders.image(encoded, device=decode_device, **decoder_kw)
            views = [
                fn.random_resized_crop(img, size=(size, size), interp_type=interp, antialias=True, **crop_kw)
                for _ in range(num_views)
            ]
        outs = []
        for view in views:
            if cfg.randaugment > 0:
                from nvidia.dali.auto_aug import rand_augment

                view = rand_augment.rand_augment(
                    view, n=cfg.randaugment, m=cfg.randaugment_magnitude, num_magnitude_bins=31, fill_value=128
                )
            mirror = fn.random.coin_flip(probability=cfg.hflip) if cfg.hflip > 0 else 0
            outs.append(
                fn.crop_mirror_normalize(view, mirror=mirror, mean=mean, std=std, dtype=out_dtype, output_layout="CHW")
            )
        return tuple(outs)

    pipe = graph(
        batch_size=batch_size,
        num_threads=max(1, num_threads if num_threads is not None else cfg.num_workers),
        device_id=device_id,
        seed=seed & 0x7FFFFFFF,
        prefetch_queue_depth=cfg.prefetch,
    )
    try:
        pipe.build()
    except RuntimeError as exc:
        if gpu and ("CUDA" in str(exc) or "cuda" in str(exc)):
            raise RuntimeError(
                f"DALI GPU pipeline (device_id={device_id}) cannot start: CUDA is not available here. "
                "Build it with device_id=None (DataConfig.device='cpu') to run the same graph on the CPU."
            ) from exc
        raise
    return pipe


class _Feeder:
    """The ``external_source`` callable: hands DALI one batch of encoded images per call, reading the
    next batch in the background, and remembers what is in flight (for labels and error recovery)."""

    def __init__(self, loader: DaliLoader) -> None:
        self._loader = weakref.ref(loader)  # the pipeline holds the feeder: no cycle back to the loader
        self.queue: collections.deque = collections.deque()
        self.in_flight: collections.deque = collections.deque()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, loader.cfg.num_workers) + 1)
        self._ahead: tuple[Any, concurrent.futures.Future] | None = None

    def start(self, chunks) -> None:
        self.queue = collections.deque(chunks)
        self.in_flight.clear()
        self._ahead = None

    def __call__(self):
        if not self.queue:
            raise StopIteration
        chunk = self.queue.popleft()
        if self._ahead is not None and self._ahead[0] is chunk:
            items = self._ahead[1].result()
        else:
            items = self._loader().read_chunk(chunk, self._pool)
        self._ahead = None
        if self.queue:
            nxt = self.queue[0]
            self._ahead = (nxt, self._pool.submit(self._loader().read_chunk, nxt, self._pool))
        self.in_flight.append((chunk, items))
        return [np.frombuffer(item[2], dtype=np.uint8) for item in items]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class DaliLoader(BaseLoader):
    backend = "dali"

    def __init__(self, cfg, split, rank, world_size, source) -> None:
        _dali()
        super().__init__(cfg, split, rank, world_size, source)
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self._feeder = _Feeder(self)
        self._pipe = None
        self._state = "dirty"  # fresh: nothing in flight | drain: only the end signal left | dirty: rebuild
        self._builds = 0
        self._probe_pipe = None

    # -- input side ---------------------------------------------------------------------------------

    def read_chunk(self, chunk, pool) -> list[tuple[int, bool, bytes]]:
        """``(index used, is_pad, bytes)`` of a batch, corrupt samples skipped or replaced."""
        idx, pad = chunk
        reads = list(pool.map(self.read_checked, idx.tolist())) if len(idx) > 1 else [self.read_checked(int(idx[0]))]
        items = []
        for i, p, (data, problem) in zip(idx.tolist(), pad.tolist(), reads):
            if data is not None and i not in self.corrupt:
                items.append((i, p, data))
                continue
            self.record_bad(i, problem or self.corrupt.get(i, "corrupt"))
            if self.cfg.corrupt == "replace":
                rep = self._replacement(i)
                if rep is not None:
                    items.append((rep[0], p, rep[1]))
        if not items:  # never feed an empty batch: the first sample's replacement stands in
            rep = self._replacement(int(idx[0]))
            if rep is None:
                raise RuntimeError(f"no readable image near data set index {int(idx[0])}")
            items.append((rep[0], bool(pad[0]), rep[1]))
        return items

    def _replacement(self, index: int) -> tuple[int, bytes] | None:
        for cand in self.replacement_candidates(index):
            if cand in self.corrupt:
                continue
            data, problem = self.read_checked(cand)
            if data is not None:
                return cand, data
            self.record_bad(cand, problem)
        return None

    # -- pipeline ------------------------------------------------------------------------------------

    def _build(self):
        seed = hash((self.cfg.seed, self.rank, self.epoch, self._builds)) & 0x7FFFFFFF
        self._builds += 1
        self._pipe = build_pipeline(
            self.cfg, self.split, self._feeder, batch_size=self.batch_size, device_id=self.device_id, seed=seed
        )
        self._state = "fresh"

    def _probe(self, data: bytes) -> str | None:
        """Why a single image fails to decode with DALI's CPU decoder, or None when it decodes."""
        from nvidia.dali import fn
        from nvidia.dali import pipeline_def
        from nvidia.dali import types

        if self._probe_pipe is None:

            @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_pipelined=False)
            def probe():
                encoded = fn.external_source(name="x", dtype=types.UINT8, ndim=1)
                return fn.decoders.image(encoded, output_type=types.RGB)

            self._probe_pipe = probe()
            self._probe_pipe.build()
        self._probe_pipe.feed_input("x", [np.frombuffer(data, dtype=np.uint8)])
        try:
            self._probe_pipe.run()
        except Exception as exc:  # DALI reports decode errors as RuntimeError
            self._probe_pipe = None  # a failed pipeline is not reused
            text = str(exc).split("encountered:")[-1].split("Current pipeline object")[0]
            detail = " ".join(text.split()) or type(exc).__name__
            return "DALI decode failed: " + detail
        return None

    def _recover(self, exc: Exception) -> None:
        """A pipeline run failed: find the undecodable samples among the batches in flight, record them,
        and queue those batches again (the corrupt policy then applies to them)."""
        in_flight = list(self._feeder.in_flight)
        found = 0
        for _, items in in_flight:
            for index, _, data in items:
                reason = self._probe(data)
                if reason is not None:
                    self.record_bad(index, reason)
                    found += 1
        if not found:
            raise exc
        # the originals go back (their bad entries are now known) ahead of the rest of the epoch
        self._feeder.queue.extendleft(chunk for chunk, _ in reversed(in_flight))
        self._feeder.in_flight.clear()
        self._feeder._ahead = None
        self._pipe = None

    def _to_torch(self, tensor_list) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        from nvidia.dali.plugin.pytorch import to_torch_type

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out

    def _ready(self) -> None:
        """Make the pipeline ready for a new epoch: reuse it when it has nothing in flight, else rebuild."""
        if self._pipe is not None and self._state == "drain":
            # the previous epoch handed out its last batch but nobody asked for the end of it
            try:
                self._pipe.run()
            except StopIteration:
                self._pipe.reset()
                self._state = "fresh"
            except RuntimeError:
                self._state = "dirty"
        if self._pipe is None or self._state != "fresh":
            self._feeder.start([])
            self._build()

    def _batches(self, chunks):
        if not chunks:
            return
        self._ready()
        self._feeder.start(chunks)
        self._state = "dirty"
        try:
            while True:
                if self._pipe is None:  # rebuilt after a decode error, mid-epoch
                    self._build()
                    self._state = "dirty"
                try:
                    outputs = self._pipe.run()
                except StopIteration:
                    self._pipe.reset()
                    self._state = "fresh"
                    return
                except RuntimeError as exc:
                    self._recover(exc)  # re-raises when no sample is to blame
                    continue
                chunk, items = self._feeder.in_flight.popleft()
                if not self._feeder.queue and not self._feeder.in_flight:
                    self._state = "drain"  # nothing left in flight: only the end-of-epoch signal
                views = [self._to_torch(o) for o in outputs]
                raw = {
                    "images": views,
                    "labels": self.source.labels[[it[0] for it in items]],
                    "index": [it[0] for it in items],
                    "is_pad": [it[1] for it in items],
                }
                yield raw, len(chunk[0])
        finally:
            if self._state not in ("fresh", "drain"):
                self._state = "dirty"  # abandoned with batches in flight: rebuild next time

    def __del__(self):
        feeder = getattr(self, "_feeder", None)
        if feeder is not None:
            feeder.close()
