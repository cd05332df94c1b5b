"""Teacher cache (``fastkd teacher-cache``): its size, the top-K approximation error, and the speed of a cached step.

Three measurements, rows appended to ``benchmarks/results/teacher_cache_<device>.csv`` (device, versions, commit and
date on every row):

``size``      bytes per image per epoch of a real shard (``.npy`` header included) for K in {1, 5, 10, all} at
              1,000 classes, one teacher, logits in float32 and float16 (the size does not depend on the data).
``topk``      the KD loss with a top-K cache against the full teacher on a held-out set: scikit-learn's digits
              (10 classes; ``fastkd data prepare digits``), a ResNet-10t teacher trained here with cross-entropy,
              the tiny ViT student of ``hinton_tiny`` after a short Hinton run; relative error of the mean KD term,
              mean teacher probability outside the top K (``tail``), for T in {1, 4}. Hard labels (DeiT's default)
              are exact for every K >= 1. A 10-class teacher is far more peaked than a 1,000-class one: the
              ImageNet figure comes from the GPU suite.
``speed``     images/s of ``hinton_tiny``'s training step (the trainer's own loop, torch loader included) with the
              teacher online, with a K = all cache, and with no teacher at all (``supervised_tiny``, same student and
              data): relative figures on the CPU.

Usage::

    python benchmarks/teacher_cache.py                  # ~5 minutes on 2 CPU cores
    python benchmarks/teacher_cache.py --steps 20 --teacher-epochs 1 --out /tmp/tc.csv   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402
from _common import device_slug  # noqa: E402
from _common import stamp  # noqa: E402
from _common import write_csv  # noqa: E402


def size_rows(classes: int = 1000, n: int = 4096) -> list[dict]:
    from fastkd.cache.store import TeacherCache

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            for k in (1, 5, 10, classes):
                manifest = {"epochs": 1, "topk": k, "num_classes": classes, "teachers": 1, "dtype": dtype,
                            "layout": {"block_batches": 1, "batch_size": n, "batches_per_epoch": 1}}
                cache = TeacherCache(Path(tmp) / f"{dtype}_{k}", manifest)
                records = np.zeros(n, dtype=cache.record)
                cache.write_shard("s.npy", records)
                size = cache.shard_path("s.npy").stat().st_size
                rows.append({"kind": "size", "classes": classes, "k": "all" if k == classes else k, "dtype": dtype,
                             "bytes_per_image_epoch": round(size / n, 2),
                             "gib_imagenet_300_epochs": round(size / n * 1281167 * 300 / 2**30, 1)})
    return rows


def _recipe(name: str, out: Path, *extra: str):
    from fastkd.config import load_config

    return load_config(name, [f"run.output_dir={out / 'runs'}", f"run.name={name}", f"data.root={out / 'digits'}",
                              "train.progress=false", *extra])


def _train(cfg):
    from fastkd.engine.trainer import Trainer

    trainer = Trainer(cfg, console=False)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


def teacher_weights(out: Path, epochs: int) -> Path:
    """A ResNet-10t digits teacher trained with cross-entropy (the tiny recipes' teacher, no longer random)."""
    cfg = _recipe("supervised_tiny", out, "student.name=resnet10t", "student.kwargs={}", f"train.epochs={epochs}",
                  "train.steps=null", "train.eval=false", "run.name=teacher", "optim.lr=3e-3")
    trainer, _ = _train(cfg)
    path = out / "teacher.pth"
    torch.save(trainer.method.student.state_dict(), path)
    return path


def speed_rows(out: Path, weights: Path, steps: int) -> tuple[list[dict], object]:
    from fastkd.cache.build import build_cache

    common = [f"train.steps={steps}", "train.epochs=1", "train.eval=false", f"teachers.0.weights={weights}"]
    rows = []
    online_cfg = _recipe("hinton_tiny", out, *common, "run.name=online")
    cache_dir = out / "cache_all"
    if not (cache_dir / "manifest.json").is_file():
        build_cache(online_cfg, cache_dir, progress=False)
    variants = [
        ("online", online_cfg),
        ("cache", _recipe("hinton_tiny", out, *common, "run.name=cached", f"teachers.cache={cache_dir}")),
        ("no_teacher", _recipe("supervised_tiny", out, f"train.steps={steps}", "train.epochs=1", "train.eval=false",
                               "run.name=no_teacher")),
    ]
    kd_trainer = None
    for name, cfg in variants:
        trainer, summary = _train(cfg)
        if name == "online":
            kd_trainer = trainer
        rows.append({"kind": "speed", "variant": name, "steps": steps, "batch": cfg.data.batch_size,
                     "img_per_s": round(summary["img_per_s"], 1)})
    base = next(r["img_per_s"] for r in rows if r["variant"] == "no_teacher")
    for r in rows:
        r["relative_to_no_teacher"] = round(r["img_per_s"] / base, 3)
    return rows, kd_trainer


@torch.no_grad()
def topk_rows(trainer, weights: Path) -> list[dict]:
    """KD loss on the val split: the trained student against the full teacher and its top-K reconstruction."""
    from fastkd.cache.replay import dense_logits
    from fastkd.cache.replay import tail_logit
    from fastkd.methods._kd import kl_div_t

    method = trainer.method.eval()
    teacher = method.teachers[0]
    zs, zt = [], []
    for batch in trainer.val_loader:
        zs.append(method.predict(batch["images"]).double())
        zt.append(teacher(batch["images"]).double())
    zs, zt = torch.cat(zs), torch.cat(zt)
    rows = []
    classes = zt.shape[1]
    for temperature in (1.0, 4.0):
        full = float(kl_div_t(zs, zt, temperature))
        p = torch.softmax(zt / temperature, -1)
        for k in (1, 2, 3, 5, classes):
            top = zt.topk(k, dim=-1)
            if k < classes:
                cached = dense_logits(top.values, top.indices, classes, tail_logit(zt, top.indices))
                approx = float(kl_div_t(zs, cached.double(), temperature))
            else:
                approx = full
            tail = float(1 - p.gather(1, top.indices).sum(-1).mean())
            rows.append({"kind": "topk", "classes": classes, "k": "all" if k == classes else k,
                         "temperature": temperature, "images": len(zt), "kd_full": round(full, 5),
                         "kd_topk": round(approx, 5), "rel_error": round(abs(approx - full) / full, 5),
                         "tail_mass": round(tail, 5)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/teacher_cache_<dev>.csv)")
    parser.add_argument("--work", default=None, help="folder for data, runs and the cache (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per speed variant")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cpu")
    csv_path = Path(args.out) if args.out else RESULTS / f"teacher_cache_{device_slug(device)}.csv"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        from fastkd.data import prepare_digits

        if not (work / "digits").is_dir():
            prepare_digits(str(work / "digits"), size=32, seed=0)
        rows = size_rows()
        weights = teacher_weights(work, args.teacher_epochs)
        speed, kd_trainer = speed_rows(work, weights, args.steps)
        rows += topk_rows(kd_trainer, weights) + speed
    st = stamp(device)
    rows = [{**r, **st} for r in rows]
    write_csv(csv_path, rows, append=True)
    for r in rows:
        print({k: v for k, v in r.items() if k not in st})
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
