"""Teacher cache (``fastkd teacher-cache``): its size, the top-K approximation error, and the speed of a cached step.

Rows of the long schema of benchmarks/_common.py (``benchmark=teacher_cache``; device, CPU model, threads, load
average, versions, commit and date on every row) append to ``benchmarks/results/teacher_cache_<device>.csv``:

``op=size``        ``provider`` k=1|5|10|all, ``mode`` the logits' storage type: ``bytes_per_image_epoch`` (B) of a
                   real shard of the format (``.npy`` header included) at 1,000 classes, one teacher, with the view
                   parameters of ``deit_s_in1k`` (RandAugment, random erasing, Mixup/CutMix; their bytes are
                   ``view_params_bytes`` in ``config``), and ``imagenet_300_epochs`` (GiB: 1,281,167 images, 300
                   epochs). The size does not depend on the data.
``op=topk_error``  ``provider`` k=1|2|3|5|all, ``mode`` T=1|4: the KD loss with a top-K cache against the full
                   teacher on a held-out set: scikit-learn's digits (10 classes, ``fastkd data prepare digits``),
                   a ResNet-10t teacher trained here with cross-entropy, the tiny ViT student of ``hinton_tiny``
                   after a short Hinton run: ``kd_rel_error`` (|KD_topK - KD_full| / KD_full of the mean KD term),
                   ``tail_mass`` (mean teacher probability outside the top K), ``kd_full``. Hard labels (DeiT's
                   default) are exact for every K >= 1. A 10-class teacher is far less peaked than a 1,000-class
                   one: the ImageNet figure belongs to the GPU suite.
``op=train_step``  ``provider`` a tiny logit recipe (``hinton_tiny``, ``deit_tiny``, ``coadvise_tiny``), ``mode``
                   online (the teachers run), cache (a K = all cache, the teachers not built) or no_teacher (the same
                   recipe with ``method.name=supervised`` and no teacher): ``step_time`` (ms, median with p20/p80
                   over ``--steps`` steps after ``--warmup``) of the trainer's own step on the digits with the torch
                   loader (decoding and augmentation in the step: ``num_workers=0``), ``images_per_s``, and
                   ``relative_to_no_teacher`` (images/s over the no-teacher step's). CPU timings on a shared machine
                   are relative only (``load_avg_1m``).

Usage::

    python benchmarks/teacher_cache.py                   # ~6 minutes on 2 CPU cores
    fastkd bench cache --parts size --out /tmp/tc.csv    # seconds
    fastkd bench cache --steps 10 --teacher-epochs 1 --recipes hinton_tiny --out /tmp/tc.csv   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BENCH = "teacher_cache"
RECIPES = ("hinton_tiny", "deit_tiny", "coadvise_tiny")
IMAGENET_IMAGES = 1281167


def size_rows(env: dict[str, Any], classes: int = 1000, n: int = 4096, recipe: str = "deit_s_in1k") -> list[dict]:
    """Bytes per image per epoch of a shard written by :class:`fastkd.cache.store.TeacherCache` itself."""
    from fastkd.cache.store import TeacherCache
    from fastkd.config import load_config
    from fastkd.data.record import params_dtype
    from fastkd.engine.builders import data_config

    params = params_dtype(data_config(load_config(recipe, []), torch.device("cpu")))
    views = {"backend": "dali", "params": [list(f) for f in params.descr]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            for k in (1, 5, 10, classes):
                manifest = {"epochs": 1, "topk": k, "num_classes": classes, "teachers": 1, "dtype": dtype,
                            "views": views, "layout": {"block_batches": 1, "batch_size": n, "batches_per_epoch": 1}}
                cache = TeacherCache(Path(tmp) / f"{dtype}_{k}", manifest)
                cache.write_shard("s.npy", np.zeros(n, dtype=cache.record))
                per_image = cache.shard_path("s.npy").stat().st_size / n
                base = dict(benchmark=BENCH, op="size", provider=f"k={'all' if k == classes else k}", mode=dtype,
                            config={"classes": classes, "k": k, "teachers": 1, "dtype": dtype, "views_of": recipe,
                                    "view_params_bytes": params.itemsize, "images": n})
                rows += [C.row(env, **base, metric="bytes_per_image_epoch", unit="B", value=per_image),
                         C.row(env, **base, metric="imagenet_300_epochs", unit="GiB",
                               value=per_image * IMAGENET_IMAGES * 300 / 2**30)]
    return rows


def _recipe(name: str, work: Path, *extra: str):
    from fastkd.config import load_config

    return load_config(name, [f"run.output_dir={work / 'runs'}", f"run.name={name}", f"data.root={work / 'digits'}",
                              "train.progress=false", "train.eval=false", *extra])


def teacher_weights(work: Path, epochs: int) -> Path:
    """A ResNet-10t digits teacher trained with cross-entropy (the tiny recipes' teacher, no longer random)."""
    from fastkd.engine.trainer import Trainer

    path = work / "teacher.pth"
    if path.is_file():
        return path
    cfg = _recipe("supervised_tiny", work, "student.name=resnet10t", "student.kwargs={}", f"train.epochs={epochs}",
                  "train.steps=null", "run.name=teacher", "optim.lr=3e-3")
    trainer = Trainer(cfg, console=False)
    try:
        trainer.train()
        torch.save(trainer.method.student.state_dict(), path)
    finally:
        trainer.close()
    return path


@torch.no_grad()
def topk_rows(env: dict[str, Any], work: Path, weights: Path, student_steps: int) -> list[dict]:
    """KD loss on the val split: a Hinton-trained student against the full teacher and its top-K reconstruction."""
    from fastkd.cache.replay import dense_logits
    from fastkd.cache.replay import tail_logit
    from fastkd.engine.trainer import Trainer
    from fastkd.methods._kd import kl_div_t

    cfg = _recipe("hinton_tiny", work, f"teachers.0.weights={weights}", f"train.steps={student_steps}",
                  "train.epochs=1", "run.name=topk_student")
    trainer = Trainer(cfg, console=False)
    try:
        with torch.enable_grad():
            trainer.train()
        method = trainer.method.eval()
        zs, zt = [], []
        for batch in trainer.val_loader:
            zs.append(method.predict(batch["images"]).double())
            zt.append(method.teachers[0](batch["images"]).double())
    finally:
        trainer.close()
    zs, zt = torch.cat(zs), torch.cat(zt)
    classes = zt.shape[1]
    rows = []
    for temperature in (1.0, 4.0):
        full = float(kl_div_t(zs, zt, temperature))
        p = torch.softmax(zt / temperature, -1)
        for k in (1, 2, 3, 5, classes):
            top = zt.topk(k, dim=-1)
            approx = full
            if k < classes:
                approx = float(kl_div_t(zs, dense_logits(top.values, top.indices, classes,
                                                         tail_logit(zt, top.indices)).double(), temperature))
            base = dict(benchmark=BENCH, op="topk_error", provider=f"k={'all' if k == classes else k}",
                        mode=f"T={temperature:g}", config={"classes": classes, "k": k, "temperature": temperature,
                                                           "images": len(zt), "data": "digits val",
                                                           "teacher": "resnet10t (trained)",
                                                           "student_steps": student_steps})
            rows += [C.row(env, **base, metric="kd_rel_error", unit="1", value=abs(approx - full) / full),
                     C.row(env, **base, metric="tail_mass", unit="1",
                           value=float(1 - p.gather(1, top.indices).sum(-1).mean())),
                     C.row(env, **base, metric="kd_full", unit="nat", value=full)]
    return rows


def time_steps(cfg, steps: int, warmup: int) -> C.Timing:
    """Milliseconds per step of the trainer built from ``cfg`` (its own loader, cached or not), after warm-up."""
    from fastkd.engine.trainer import Trainer

    trainer = Trainer(cfg, console=False)
    try:
        loader = trainer.train_loader
        if warmup + steps > len(loader):
            raise SystemExit(f"--warmup + --steps = {warmup + steps} exceeds the {len(loader)} batches of an epoch")
        loader.set_epoch(0)
        it = iter(loader)
        for _ in range(warmup):
            trainer.train_step(it)
        return C.time_fn(lambda: trainer.train_step(it), torch.device("cpu"), warmup=0, reps=steps, wall=True)
    finally:
        trainer.close()


def speed_rows(env: dict[str, Any], work: Path, weights: Path, recipes, steps: int, warmup: int) -> list[dict]:
    from fastkd.cache.build import build_cache

    rows = []
    common = [f"train.steps={warmup + steps}", "train.epochs=1", f"train.log_every={1 << 20}"]
    for recipe in recipes:
        kd = [*common, f"teachers.0.weights={weights}"]  # the trained ResNet-10t (Co-advise's RedNet stays random)
        cache_dir = work / f"cache_{recipe}"
        if not (cache_dir / "manifest.json").is_file():
            build_cache(_recipe(recipe, work, *kd, "run.name=build"), cache_dir, progress=False)
        variants = {
            "online": _recipe(recipe, work, *kd, "run.name=online"),
            "cache": _recipe(recipe, work, *kd, "run.name=cached", f"teachers.cache={cache_dir}"),
            "no_teacher": _recipe(recipe, work, *common, "run.name=no_teacher", "method.name=supervised",
                                  "method.params={}", "teachers=[]"),
        }
        timings = {}
        for mode, cfg in variants.items():
            timings[mode] = time_steps(cfg, steps, warmup)
            print(f"{recipe} {mode}: {cfg.data.batch_size / timings[mode].p50 * 1e3:.1f} img/s", flush=True)
        batch = variants["online"].data.batch_size
        for mode, t in timings.items():
            base = dict(benchmark=BENCH, op="train_step", provider=recipe, mode=mode,
                        config={"batch": batch, "img_size": variants[mode].data.img_size, "steps": steps,
                                "warmup": warmup, "data": "digits", "loader": "torch, num_workers=0",
                                "teachers": "+".join(s.name for s in variants[mode].teachers) or "none",
                                "cache_k": "all" if mode == "cache" else None})
            rows += [C.row(env, **base, metric="step_time", unit="ms", value=t),
                     C.row(env, **base, metric="images_per_s", unit="img/s", value=batch / t.p50 * 1e3),
                     C.row(env, **base, metric="relative_to_no_teacher", unit="1",
                           value=timings["no_teacher"].p50 / t.p50)]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/teacher_cache_<dev>.csv)")
    parser.add_argument("--work", default=None, help="folder for data, runs and caches (default: a temp dir)")
    parser.add_argument("--parts", nargs="+", choices=("size", "topk", "speed"), default=["size", "topk", "speed"])
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES), help="recipes of the speed part")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per speed variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--student-steps", type=int, default=60, help="Hinton steps of the top-K part's student")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    C.add_force_dirty(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cpu")
    csv_path = Path(args.out) if args.out else C.RESULTS / f"teacher_cache_{C.device_slug(device)}.csv"
    C.check_output(csv_path, args.force_dirty)
    env = C.stamp(device, ("timm", "numpy"))
    rows = size_rows(env) if "size" in args.parts else []
    if {"topk", "speed"} & set(args.parts):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work or tmp)
            if not (work / "digits").is_dir():
                from fastkd.data import prepare_digits

                prepare_digits(str(work / "digits"), size=32, seed=0)
            weights = teacher_weights(work, args.teacher_epochs)
            if "topk" in args.parts:
                rows += topk_rows(env, work, weights, args.student_steps)
            if "speed" in args.parts:
                rows += speed_rows(env, work, weights, args.recipes, args.steps, args.warmup)
    C.write_rows(csv_path, rows, append=True)
    for r in rows:
        print(r["op"], r["provider"], r["mode"], r["metric"], r["p50"], r["unit"])
    print(f"wrote {len(rows)} rows to {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
