"""Data-pipeline throughput: DALI vs torchvision, images/s and CPU use at 1, 2, ... workers/threads.

Reads a generated ImageFolder of photo-sized JPEGs (crops of scikit-image's pictures resized to
500x375, quality 90, about the size and content of ImageNet files) through ``fastkd.data.build_loader``
exactly as training does: training graph (random-resized-crop, flip, normalise, NCHW) and validation
graph (resize shorter side, centre crop, normalise). One epoch is timed after a short warm-up; CPU
use is process + worker-process CPU seconds over wall seconds, and images per CPU-second is the
number least disturbed by other processes sharing the machine (its 1-minute load is recorded too). Results go to
``benchmarks/results/data_pipeline_<device>.csv`` (one row per backend/mode/workers, stamped with the
device, library versions, commit and date) and a plot beside it.

    python benchmarks/data_pipeline.py                       # CPU pipelines here
    python benchmarks/data_pipeline.py --device cuda         # DALI "mixed" decoding on a GPU machine
    fastkd bench data --images 2048 --workers 1,2,4,8
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = [
    "device",
    "device_name",
    "backend",
    "mode",
    "workers",
    "images",
    "batch_size",
    "img_size",
    "source_size",
    "seconds",
    "images_per_s",
    "cpu_cores_used",
    "cpu_util_pct",
    "images_per_cpu_s",
    "host_cores",
    "load_avg_1m",
    "dali",
    "torch",
    "torchvision",
    "pillow",
    "commit",
    "date",
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    import PIL
    import torch
    import torchvision

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = "not installed"
    return {
        "dali": dali_version,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
    }


def _cpu_seconds() -> float:
    t = os.times()  # children_*: DataLoader workers, counted once they have been joined
    return t.user + t.system + t.children_user + t.children_system


def measure(cfg: dict, mode: str, warmup_batches: int = 2) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one timed epoch of ``mode`` after a short warm-up."""
    import torch

    from fastkd.data import build_loader

    loader = build_loader(cfg, mode)
    it = iter(loader)
    for _ in range(min(warmup_batches, len(loader) - 1)):
        next(it)
    del it
    loader.set_epoch(1)
    sync = torch.cuda.synchronize if loader.device.type == "cuda" else (lambda: None)
    sync()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["images"].shape[0]
    sync()
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    del loader
    return n, wall, cpu


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (backend, mode), marker in zip(
        sorted({(r["backend"], r["mode"]) for r in rows}), ["o-", "s--", "^-", "v--", "d-", "x--"]
    ):
        pts = sorted(
            (int(r["workers"]), float(r["images_per_s"]), float(r["cpu_cores_used"]))
            for r in rows
            if r["backend"] == backend and r["mode"] == mode
        )
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker, label=f"{backend} {mode}")
        axes[1].plot([p[0] for p in pts], [p[1] / max(p[2], 1e-9) for p in pts], marker, label=f"{backend} {mode}")
    r0 = rows[0]
    axes[0].set(xlabel="workers / threads", ylabel="images / s", title=f"throughput ({r0['device_name'][:40]})")
    axes[1].set(xlabel="workers / threads", ylabel="images / CPU-second", title="CPU efficiency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted({int(r["workers"]) for r in rows}))
        ax.legend(fontsize=8)
    fig.suptitle(
        f"fastkd data pipeline: {r0['images']} JPEGs {r0['source_size']} q90 -> {r0['img_size']}px, "
        f"batch {r0['batch_size']}, DALI {r0['dali']}, torchvision {r0['torchvision']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkd bench data", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512, help="JPEGs in the generated folder")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--data", default=None, help="folder of generated JPEGs (default: a cache under /tmp)")
    p.add_argument("--workers", default="1,2", help="comma-separated DataLoader workers / DALI threads")
    p.add_argument("--backends", default="dali,torch")
    p.add_argument("--modes", default="train,val")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto: where batches end up (DALI: which graph)")
    p.add_argument("--out", default=RESULTS, help="folder for the CSV and the plot")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from fastkd.data import dali_available
    from fastkd.data.prepare import make_jpeg_folder

    workers = [int(w) for w in args.workers.split(",") if w]
    backends = [b for b in args.backends.split(",") if b]
    if "dali" in backends and not dali_available():
        print("DALI is not installed: measuring torchvision only", file=sys.stderr)
        backends.remove("dali")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else _cpu_name()
    tag = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")

    data = args.data or os.path.join(
        "/tmp", f"fastkd_bench_jpegs_{args.images}_{args.width}x{args.height}_q{args.quality}"
    )
    root = os.path.join(data, "root")
    if not os.path.isdir(os.path.join(root, "train")):
        print(f"writing {args.images} JPEGs ({args.width}x{args.height}, q{args.quality}) to {root} ...")
        make_jpeg_folder(os.path.join(root, "train"), args.images, args.width, args.height, args.quality)
    stamp = {
        "device": tag,
        "device_name": device_name,
        "host_cores": os.cpu_count(),
        "commit": C.git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **_versions(),
    }
    rows = []
    print(f"{'backend':8} {'mode':6} {'workers':>7} {'images/s':>10} {'CPU cores':>10}")
    for backend in backends:
        for mode in args.modes.split(","):
            for w in workers:
                cfg = dict(
                    root=root,
                    val_path=os.path.join(root, "train"),
                    backend=backend,
                    device=device,
                    batch_size=args.batch_size,
                    img_size=args.img_size,
                    num_workers=w,
                    seed=0,
                )
                n, wall, cpu = measure(cfg, mode)
                row = {
                    **stamp,
                    "backend": backend,
                    "mode": mode,
                    "workers": w,
                    "images": n,
                    "batch_size": args.batch_size,
                    "img_size": args.img_size,
                    "source_size": f"{args.width}x{args.height}",
                    "seconds": round(wall, 3),
                    "images_per_s": round(n / wall, 1),
                    "cpu_cores_used": round(cpu / wall, 2),
                    "cpu_util_pct": round(100.0 * cpu / wall / (os.cpu_count() or 1), 1),
                    "images_per_cpu_s": round(n / max(cpu, 1e-9), 1),
                    "load_avg_1m": round(os.getloadavg()[0], 2),  # other processes competing for the cores
                }
                rows.append(row)
                print(f"{backend:8} {mode:6} {w:7d} {row['images_per_s']:10.1f} {row['cpu_cores_used']:10.2f}")
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"data_pipeline_{tag}.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    png_path = os.path.join(args.out, f"data_pipeline_{tag}.png")
    try:
        plot(rows, png_path)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        png_path = None
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
