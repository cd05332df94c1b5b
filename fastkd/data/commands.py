"""``fastkd data prepare``: write a small real data set (shipped inside scikit-learn / scikit-image).

Examples::

    fastkd data prepare digits --out data/digits            # 1,797 digits, 64 px, 80/20 split
    fastkd data prepare photos --out data/photos --size 128 --per-class 100 --format all
"""

from __future__ import annotations

import argparse
import os
import shutil


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p = sub.add_parser("prepare", help="write a small real data set as an ImageFolder of JPEGs")
    p.add_argument(
        "dataset",
        choices=["digits", "photos"],
        help="digits: scikit-learn handwritten digits (10 "
        "classes, 1,797 images); photos: crops of scikit-image's sample pictures (10 classes)",
    )
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (digits: 64, photos: 96)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out for val/")
    p.add_argument("--per-class", type=int, default=60, help="photos only: crops per picture")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (and of the photo crops)")
    p.add_argument("--quality", type=int, default=None, help="JPEG quality (digits: 95, photos: 90)")
    p.add_argument(
        "--format",
        choices=["folder", "filelist", "webdataset", "all"],
        default="folder",
        help="also write train.txt/val.txt (filelist) or wds/ tar shards (webdataset)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def run_data(args: argparse.Namespace) -> int:
    if getattr(args, "data_command", None) != "prepare":
        print("usage: fastkd data prepare {digits,photos} --out DIR")
        return 2
    return prepare(args)


def prepare(args: argparse.Namespace) -> int:
    from fastkd.data.prepare import prepare_digits
    from fastkd.data.prepare import prepare_photos
    from fastkd.data.prepare import write_filelists
    from fastkd.data.prepare import write_webdataset

    if not 0.0 <= args.val_fraction < 1.0:
        raise SystemExit(f"--val-fraction={args.val_fraction}: must lie in [0, 1)")
    if args.size is not None and args.size < 8:
        raise SystemExit(f"--size={args.size}: must be at least 8")
    if os.path.exists(args.out) and os.listdir(args.out):
        if not args.force:
            raise SystemExit(f"--out={args.out!r} exists and is not empty (add --force to replace it)")
        shutil.rmtree(args.out)
    if args.dataset == "digits":
        counts = prepare_digits(
            args.out, size=args.size or 64, val_fraction=args.val_fraction, seed=args.seed, quality=args.quality or 95
        )
    else:
        counts = prepare_photos(
            args.out,
            size=args.size or 96,
            per_class=args.per_class,
            val_fraction=args.val_fraction,
            seed=args.seed,
            quality=args.quality or 90,
        )
    print(f"{args.dataset}: {counts['train']} train / {counts['val']} val images in {args.out}")
    if args.format in ("filelist", "all"):
        for path in write_filelists(args.out):
            print(f"file list: {path}")
    if args.format in ("webdataset", "all"):
        shards = write_webdataset(args.out)
        print(f"webdataset: {len(shards)} shard(s) under {os.path.join(args.out, 'wds')}")
    return 0
