"""Data-pipeline throughput: DALI vs torchvision, images/s and CPU use at 1, 2, ... workers/threads.

Reads a generated ImageFolder of photo-sized JPEGs (crops of scikit-image's pictures resized to
500x375, quality 90, about the size and content of ImageNet files) through ``fastkd.data.build_loader``
exactly as training does: training graph (random-resized-crop, flip, normalise, NCHW) and validation
graph (resize shorter side, centre crop, normalise).

Steady state, the same way for both back ends: one epoch's iterator is started, its first
``--warmup-batches`` batches are taken untimed (worker processes / DALI threads started, pipelines and
prefetch queues filled), then every remaining batch of that epoch is timed with benchmarks/_common.py's
``time_fn`` (wall clock per batch), with the workers alive throughout: no start-up inside the window.
images/s = timed images / timed seconds. CPU use is process + live worker-process CPU seconds over the same
window; images per CPU-second is the number least disturbed by other processes sharing the machine (each
row records the 1-minute load average). Rows (the long schema of benchmarks/_common.py: ``batch_time`` ms
with p20/p80, ``timed_window`` ms, ``images_per_s``, ``cpu_cores_used``, ``images_per_cpu_s``) go to
``benchmarks/results/data_pipeline_<device>.csv``, with a plot beside it.

    python benchmarks/data_pipeline.py                       # CPU pipelines here
    python benchmarks/data_pipeline.py --device cuda         # DALI "mixed" decoding on a GPU machine
    fastkd bench data --images 4096 --workers 1,2,4,8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VERSIONS = ("nvidia.dali", "torchvision", "PIL")


def _cpu_seconds() -> float:
    """CPU seconds of this process and its live children (DataLoader workers), from /proc."""
    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    children: set[str] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children.update(f.read().split())
        except OSError:
            pass
    for pid in children:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass  # exited in between
    return total


def measure(cfg: dict, mode: str, warmup_batches: int) -> dict:
    """Per-batch timing of the steady state of one epoch of ``mode``, and the CPU seconds of that window."""
    import torch

    from fastkd.data import build_loader

    loader = build_loader(cfg, mode)
    timed = len(loader) - warmup_batches
    if timed < 4:
        raise SystemExit(f"--images: {len(loader)} batches per epoch leave {timed} to time after "
                         f"{warmup_batches} warm-up batches; generate more images (at least 4 timed batches)")
    it = iter(loader)
    images = []

    def next_batch():
        images.append(next(it)["images"].shape[0])

    device = loader.device
    for _ in range(warmup_batches):
        next_batch()
    images.clear()
    cpu0 = _cpu_seconds()
    timing = C.time_fn(next_batch, device, warmup=0, reps=timed, wall=True)
    cpu = _cpu_seconds() - cpu0
    for _ in it:  # finish the epoch (joins the workers) outside the window
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"timing": timing, "images": sum(images), "cpu_s": cpu}


def plot(csv_path: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in C.read_rows(csv_path) if r["status"] == "ok"]
    value = {(r["provider"], r["mode"], r["cfg"]["workers"], r["metric"]): float(r["p50"]) for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (backend, mode), marker in zip(sorted({(r["provider"], r["mode"]) for r in rows}),
                                       ["o-", "s--", "^-", "v--", "d-", "x--"]):
        workers = sorted({r["cfg"]["workers"] for r in rows if (r["provider"], r["mode"]) == (backend, mode)})
        for ax, metric in zip(axes, ("images_per_s", "images_per_cpu_s")):
            ax.plot(workers, [value[(backend, mode, w, metric)] for w in workers], marker, label=f"{backend} {mode}")
    r0 = rows[0]
    axes[0].set(xlabel="workers / threads", ylabel="images / s", title=f"throughput ({r0['cpu_model'][:40]})")
    axes[1].set(xlabel="workers / threads", ylabel="images / CPU-second", title="CPU efficiency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted({r["cfg"]["workers"] for r in rows}))
        ax.legend(fontsize=8)
    cfg, versions = r0["cfg"], C.json.loads(r0["versions"])
    fig.suptitle(
        f"fastkd data pipeline: {cfg['images']} timed of {cfg['dataset_images']} JPEGs {cfg['source_size']} q90 -> "
        f"{cfg['img_size']}px, batch {cfg['batch_size']}, DALI {versions['nvidia.dali']}, "
        f"torchvision {versions['torchvision']}, commit {r0['commit']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkd bench data", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048, help="JPEGs in the generated folder (one epoch)")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--data", default=None, help="folder of generated JPEGs (default: a cache under /tmp)")
    p.add_argument("--workers", default="1,2", help="comma-separated DataLoader workers / DALI threads")
    p.add_argument("--backends", default="dali,torch")
    p.add_argument("--modes", default="train,val")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup-batches", type=int, default=8, help="untimed batches at the start of the epoch")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto: where batches end up (DALI: which graph)")
    p.add_argument("--out", default=str(C.RESULTS), help="folder for the CSV and the plot")
    C.add_force_dirty(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from fastkd.data import dali_available
    from fastkd.data.prepare import make_jpeg_folder

    workers = [int(w) for w in args.workers.split(",") if w]
    backends = [b for b in args.backends.split(",") if b]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    csv_path = Path(args.out) / f"data_pipeline_{C.device_slug(device)}.csv"
    C.check_output(csv_path, args.force_dirty)
    env = C.stamp(device, VERSIONS)

    data = args.data or os.path.join(
        "/tmp", f"fastkd_bench_jpegs_{args.images}_{args.width}x{args.height}_q{args.quality}"
    )
    root = os.path.join(data, "root")
    if not os.path.isdir(os.path.join(root, "train")):
        print(f"writing {args.images} JPEGs ({args.width}x{args.height}, q{args.quality}) to {root} ...")
        make_jpeg_folder(os.path.join(root, "train"), args.images, args.width, args.height, args.quality)
    rows = []
    print(f"{'backend':8} {'mode':6} {'workers':>7} {'images/s':>10} {'CPU cores':>10}")
    for backend in backends:
        for mode in args.modes.split(","):
            for w in workers:
                config = {"workers": w, "batch_size": args.batch_size, "img_size": args.img_size,
                          "source_size": f"{args.width}x{args.height}", "dataset_images": args.images,
                          "warmup_batches": args.warmup_batches}
                base = dict(benchmark="data_pipeline", op="loader", provider=backend, mode=mode)
                if backend == "dali" and not dali_available():
                    rows.append(C.row(env, **base, config=config, status="not_applicable",
                                      note="DALI is not installed"))
                    print(f"{backend:8} {mode:6} {w:7d} not applicable: DALI is not installed")
                    continue
                cfg = dict(root=root, val_path=os.path.join(root, "train"), backend=backend, device=device.type,
                           batch_size=args.batch_size, img_size=args.img_size, num_workers=w, seed=0)
                res = measure(cfg, mode, args.warmup_batches)
                t, n = res["timing"], res["images"]
                config["images"] = n
                wall_s = t.total_ms / 1e3
                rows += [
                    C.row(env, **base, config=config, metric="batch_time", unit="ms", value=t),
                    C.row(env, **base, config=config, metric="timed_window", unit="ms", value=t.total_ms),
                    C.row(env, **base, config=config, metric="images_per_s", unit="img/s", value=n / wall_s),
                    C.row(env, **base, config=config, metric="cpu_cores_used", unit="cores",
                          value=res["cpu_s"] / wall_s),
                    C.row(env, **base, config=config, metric="images_per_cpu_s", unit="img/CPU-s",
                          value=n / max(res["cpu_s"], 1e-9)),
                ]
                print(f"{backend:8} {mode:6} {w:7d} {n / wall_s:10.1f} {res['cpu_s'] / wall_s:10.2f}")
    C.write_rows(csv_path, rows)
    png_path = csv_path.with_suffix(".png")
    try:
        plot(csv_path, png_path)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        png_path = None
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
