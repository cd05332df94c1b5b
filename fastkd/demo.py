"""``fastkd demo``: the whole pipeline on a small real data set, in a few minutes on a CPU.

1. ``fastkd data prepare``'s digits: scikit-learn's 1,797 real handwritten digits (8x8, 10 classes) upscaled to
   32x32 JPEGs, split train/val.
2. A small ViT teacher trained with cross-entropy.
3. The same small ViT student trained twice with the same recipe and seed: without distillation, and with
   SSTA's head-level attention distillation plus logit KD (``fastkd.methods``; falls back to Hinton logit KD
   when the attention method is unavailable).
4. A table (method, top-1, img/s, time), printed and written to ``<out>/summary.md``.

SSTA wants a supervised teacher and a self-supervised teaching assistant; the demo has one teacher and uses it in
both roles (SSTA then picks each role's head by gradient importance on the first batch). Uses the GPU when one
is present.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# (teacher, student) ViT shapes; patch 4 on 32 px -> 64 patches + CLS = 65 tokens
TEACHER = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}
STUDENT = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0}
QUICK_TEACHER = {"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
QUICK_STUDENT = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for the data, runs and summary.md (runs/demo)")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="teacher epochs (default 20 on CPU, 60 on GPU)")
    parser.add_argument("--student-epochs", type=int, default=None,
                        help="epochs of each student run (default 15 on CPU, 40 on GPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--kd-method", default="ssta",
                        help="distillation method of the second student run (ssta; hinton, attndistill, deit ...)")
    parser.add_argument("--quick", action="store_true",
                        help="a seconds-long smoke run (tiny models, 16 px, a few steps): for tests, not for numbers")
    parser.add_argument("--seed", type=int, default=0)


def _config(out: Path, name: str, method: str, model: dict, epochs: int, device: str, batch: int, lr: float,
            seed: int, *, params: dict | None = None, teacher: dict | None = None, teacher_weights: str | None = None,
            steps: int | None = None, img_size: int = 32):
    from fastkd.config import from_dict

    data = {"root": str(out / "data"), "img_size": img_size, "batch_size": batch, "num_workers": 0, "backend": "torch",
            "scale": [0.6, 1.0], "ratio": [0.9, 1.1], "hflip": 0.0, "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5], "seed": seed}
    cfg = {
        "run": {"name": name, "output_dir": str(out / "runs"), "seed": seed, "device": device, "overwrite": True},
        "student": {"name": "vit_tiny_patch16_224", "kwargs": dict(model)},
        "method": {"name": method, "params": params or {}},
        "data": data,
        "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.05},
        "schedule": {"name": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5, "min_lr": 1e-5},
        "train": {"epochs": epochs, "steps": steps, "log_every": 20, "eval_every": max(epochs, 1), "clip_grad": 1.0,
                  "progress": sys.stderr.isatty()},
    }
    if teacher is not None:
        cfg["teachers"] = [{"name": "vit_tiny_patch16_224", "weights": teacher_weights, "kwargs": dict(teacher)}]
    return from_dict(cfg)


def _train(cfg) -> dict[str, Any]:
    from fastkd.engine.trainer import Trainer

    trainer = Trainer(cfg, console=False)
    t0 = time.perf_counter()
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    summary["wall_s"] = time.perf_counter() - t0
    summary["_trainer"] = trainer
    return summary


def _kd_setup(kd_method: str, teacher: dict, weights: str) -> tuple[str, dict, list[dict]]:
    """(method, params, teachers) for the distilled student; Hinton when the attention method is missing."""
    import fastkd.methods as methods

    available = methods.available()
    t = {"name": "vit_tiny_patch16_224", "weights": weights, "kwargs": dict(teacher)}
    if kd_method == "ssta" and "ssta" in available:
        return "ssta", {"logit_kd": "soft", "kd_temperature": 2.0, "alpha": 0.5, "label_smoothing": 0.0}, [t, t]
    if kd_method in available and kd_method != "ssta":
        return kd_method, {}, [t]
    print(f"fastkd demo: method {kd_method!r} is not available here; using hinton (logit KD)", file=sys.stderr)
    return "hinton", {"temperature": 2.0, "alpha": 0.5}, [t]


def run_demo(args) -> int:
    import torch

    from fastkd.data import prepare_digits
    from fastkd.engine.logging import format_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    quick = args.quick
    t_epochs = args.teacher_epochs or (1 if quick else (60 if cuda else 20))
    s_epochs = args.student_epochs or (1 if quick else (40 if cuda else 15))
    steps = 3 if quick else None
    size = 16 if quick else 32
    tshape, sshape = (QUICK_TEACHER, QUICK_STUDENT) if quick else (TEACHER, STUDENT)
    batch = 128 if cuda else 64
    device = "cuda" if cuda else "cpu"
    start = time.perf_counter()

    # ============ data: real handwritten digits shipped inside scikit-learn ============
    data_dir = out / "data"
    marker = data_dir / f".prepared_{size}"
    if not marker.is_file():
        counts = prepare_digits(str(data_dir), size=size, seed=args.seed)
        marker.write_text(json.dumps(counts))
    counts = json.loads(marker.read_text())
    print(f"data: scikit-learn digits as {size}x{size} JPEGs in {data_dir} ({counts})", flush=True)

    # ============ teacher ============
    print(f"teacher: ViT {tshape['embed_dim']}d x {tshape['depth']} layers, {t_epochs} epochs on {device}", flush=True)
    rows = []
    tcfg = _config(out, "teacher", "supervised", tshape, t_epochs, device, batch, 2e-3, args.seed, steps=steps,
                   img_size=size)
    teacher = _train(tcfg)
    weights = out / "teacher.pth"
    torch.save(teacher["_trainer"].method.student.state_dict(), weights)
    rows.append(_row("teacher (cross-entropy)", teacher, tshape))

    # ============ the same student, without and with distillation ============
    kd_name, kd_params, kd_teachers = _kd_setup(args.kd_method, tshape, str(weights))
    for label, method, params, teachers in (
        ("student, no distillation", "supervised", {}, None),
        (f"student + {kd_name} distillation", kd_name, kd_params, kd_teachers),
    ):
        print(f"{label}: ViT {sshape['embed_dim']}d x {sshape['depth']} layers, {s_epochs} epochs", flush=True)
        cfg = _config(out, f"student_{method}", method, sshape, s_epochs, device, batch, 2e-3, args.seed,
                      params=params, steps=steps, img_size=size)
        if teachers:
            from fastkd.config import ModelSpec

            cfg.teachers = [ModelSpec(**t) for t in teachers]
        rows.append(_row(label, _train(cfg), sshape))

    total = time.perf_counter() - start
    table = format_table(rows, ["run", "method", "params", "top1", "img/s", "time_s"])
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    text = (
        f"fastkd demo: scikit-learn digits ({counts.get('train')} train / {counts.get('val')} val, {size} px), "
        f"{device_name}, total {total:.0f} s\n\n{table}\n"
    )
    print("\n" + text, flush=True)
    (out / "summary.md").write_text(text)
    return 0


def _row(label: str, summary: dict[str, Any], shape: dict) -> dict[str, Any]:
    trainer = summary["_trainer"]
    params = sum(p.numel() for p in trainer.method.student.parameters())
    return {
        "run": label,
        "method": summary["method"],
        "params": f"{params / 1e3:.0f}k",
        "top1": round(float(summary.get("top1", float("nan"))), 2),
        "img/s": round(float(summary["img_per_s"]), 1),
        "time_s": round(float(summary["wall_s"]), 1),
    }


__all__ = ["add_demo_arguments", "run_demo"]
