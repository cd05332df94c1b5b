"""``fastkd teacher-cache build``: the command line of :func:`fastkd.cache.build.build_cache` (see there)."""

from __future__ import annotations

import argparse
import sys

from fastkd.cache.store import CacheError
from fastkd.config import ConfigError


def add_teacher_cache_arguments(parser: argparse.ArgumentParser) -> None:
    from fastkd.engine.commands import _common

    sub = parser.add_subparsers(dest="cache_action", metavar="ACTION")
    b = sub.add_parser("build", help="run the recipe's teachers over its augmented epochs and store their logits",
                       description="run the recipe's teachers over its augmented "
                       "epochs and store their logits (format: fastkd.cache.store)")
    _common(b)
    b.add_argument("--out", required=True, metavar="DIR", help="cache folder (created; a partial one is resumed)")
    b.add_argument("--epochs", type=int, default=None, metavar="E",
                   help="epochs to record (default: as many as the recipe trains)")
    b.add_argument("--topk", type=int, default=0, metavar="K",
                   help="logits kept per sample and teacher (default 0: all classes; K >= classes also keeps all)")
    b.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage type of the logits (float16 halves the size; float32 replays exactly)")
    b.add_argument("--world-size", type=int, default=None, metavar="W",
                   help="number of processes of the training run the cache is for (default: this launch's)")
    b.add_argument("--block-batches", type=int, default=64, metavar="N",
                   help="batches per shard file: the work a kill can lose (default 64)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_teacher_cache(args) -> int:
    from fastkd.cache.build import build_cache
    from fastkd.config import load_config
    from fastkd.distributed import cleanup

    if getattr(args, "cache_action", None) != "build":
        print("fastkd teacher-cache: say what to do: `fastkd teacher-cache build --config RECIPE --out DIR`",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, list(args.overrides))
        build_cache(cfg, args.out, epochs=args.epochs, topk=args.topk, dtype=args.dtype,
                    world_size=args.world_size, block_batches=args.block_batches, progress=not args.no_progress,
                    local_rank=getattr(args, "local_rank", None))
    except (ConfigError, CacheError) as exc:
        print(f"fastkd teacher-cache build: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0



__all__ = ["add_teacher_cache_arguments", "run_teacher_cache"]
