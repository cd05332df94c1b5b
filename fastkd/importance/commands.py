"""``fastkd importance``: score every attention head of a timm ViT over a data set.

Writes ``importance.json`` (scores ``[L, H]`` per score kind, rankings, the top head per layer, the corrupt files
met, run metadata) and ``importance.png`` (a layer x head heatmap per kind). SSTA reads ``top_head_per_layer`` /
``ranking`` from the JSON to choose its heads. The scoring itself is :mod:`fastkd.importance.scoring`; images are
read by :mod:`fastkd.data` with training's corrupt-file checks and policy (``--corrupt``, as ``data.corrupt``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastkd.data.config import CORRUPT_POLICIES
from fastkd.data.config import DataConfig
from fastkd.data.loader import CorruptImageError
from fastkd.importance.ops import SCORES
from fastkd.importance.scoring import LOSSES
from fastkd.importance.scoring import build_eval_loader
from fastkd.importance.scoring import compute_importance
from fastkd.importance.scoring import rank_heads

__all__ = ["add_importance_arguments", "run_importance", "write_heatmap"]


def write_heatmap(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Layer x head heatmap per score kind; the top head of each layer is marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kinds = list(result["scores"])
    L, H = result["num_layers"], result["num_heads"]
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(1.2 + 0.45 * H * len(kinds) + 1.5 * len(kinds), 1.5 + 0.35 * L), squeeze=False
    )
    for ax, kind in zip(axes[0], kinds):
        data = result["rankings"][kind]["normalized"] if kind != "entropy" else result["scores"][kind]
        im = ax.imshow(data, aspect="auto", cmap="viridis_r" if kind == "entropy" else "viridis")
        for layer, head in enumerate(result["rankings"][kind]["top_head_per_layer"]):
            ax.plot(head, layer, marker="*", color="red", markersize=8)
        ax.set_title(kind + (" (nats)" if kind == "entropy" else " (layer-normalized)"), fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{result['model']} head importance ({result['num_images']} images)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- CLI
def _parse_model_args(items: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def add_importance_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model", required=True, help="timm model name, e.g. deit_small_patch16_224 or vit_small_patch16_224.dino"
    )
    g.add_argument(
        "--weights",
        required=True,
        help="local weights file (.safetensors recommended; .pth/.pt load with weights_only=True; .npz)",
    )
    g.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow torch.load(weights_only=False): runs pickled code from the file -- trusted files only",
    )
    g.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier size of the checkpoint (0 for a self-supervised backbone without a head)",
    )
    g.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    g.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="extra timm.create_model argument (repeatable), e.g. --model-arg drop_path_rate=0",
    )
    g = parser.add_argument_group("scoring")
    g.add_argument("--data", required=True, help="ImageFolder directory (DIR/<class>/<img>, or DIR/val/<class>/<img>)")
    g.add_argument(
        "--score",
        default="gradient",
        help="comma-separated kinds among gradient, attribution, entropy, or 'all'. gradient (Michel et al. "
        "2019) is the cheapest and the usual choice; the first kind listed drives `ranking`",
    )
    g.add_argument(
        "--loss",
        choices=LOSSES,
        default="auto",
        help="objective for gradient/attribution: auto picks ce when the classifier matches the folder's "
        "classes, pseudo (the model's own top-1) for another classifier, feature-norm without one",
    )
    g.add_argument(
        "--batches",
        type=int,
        default=None,
        help="stop after N batches (a few thousand images usually give a stable ranking)",
    )
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument(
        "--corrupt",
        choices=CORRUPT_POLICIES,
        default=DataConfig.corrupt,
        help="an image that cannot be read, is truncated or damaged, or does not decode (the checks and values of "
        "data.corrupt in training): skip it, replace it by the next readable one, or stop with one line naming it; "
        "the files met are listed in importance.json (default: %(default)s)",
    )
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    g.add_argument(
        "--backend",
        choices=("sdpa", "xformers", "auto"),
        default="sdpa",
        help="attention backend during scoring (xformers also returns the LSE the streaming kernels reuse)",
    )
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="importance_out", help="output directory for importance.json and importance.png")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    g.add_argument("--no-plot", action="store_true", help="skip importance.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _parse_scores(text: str) -> list[str]:
    kinds = list(SCORES) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    for s in kinds:
        if s not in SCORES:
            raise ValueError(f"--score: {s!r} is unknown; expected a comma-separated list of {SCORES} or 'all'")
    if not kinds:
        raise ValueError(f"--score: expected a comma-separated list of {SCORES} or 'all'")
    return kinds


def run_importance(args: argparse.Namespace) -> int:
    import timm

    import fastkd
    from fastkd.models import build_model

    kinds = _parse_scores(args.score)
    kwargs = _parse_model_args(args.model_arg)
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(
        args.model, weights=args.weights, num_classes=args.num_classes, trust_checkpoint=args.trust_checkpoint, **kwargs
    )
    loader, source = build_eval_loader(
        args.data, model, batch_size=args.batch_size, workers=args.workers, corrupt=args.corrupt
    )
    counts = np.bincount(source.labels, minlength=len(source.classes))
    empty = [c for c, n in zip(source.classes, counts.tolist()) if n == 0]
    if empty:  # still a class: training numbers it too, so class indices stay those of a model trained on the folder
        print(
            f"warning: class folder(s) without images (still counted as classes): {', '.join(empty[:10])}",
            file=sys.stderr,
        )
    try:
        result = compute_importance(
            model,
            loader,
            scores=kinds,
            loss=args.loss,
            num_data_classes=len(source.classes),
            batches=args.batches,
            device=device,
            backend=args.backend,
            progress=not args.quiet,
        )
    except CorruptImageError as exc:  # name this command's option, not the training config's field
        raise CorruptImageError(str(exc).replace("DataConfig.corrupt=", "--corrupt=")) from None
    corrupt = loader.corrupt_summary()
    corrupt.pop("split")
    corrupt["empty_classes"] = empty
    result["rankings"] = {k: rank_heads(result["scores"][k], k) for k in kinds}
    primary = kinds[0]
    result.update(
        {
            "format": "fastkd.importance/1",
            "corrupt": corrupt,
            "model": args.model,
            "weights": str(Path(args.weights).resolve()),
            "data": str(Path(args.data).resolve()),
            "primary": primary,
            "ranking": result["rankings"][primary]["ranking"],
            "top_head_per_layer": result["rankings"][primary]["top_head_per_layer"],
            "metadata": {
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "device": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or "cpu",
                "fastkd": fastkd.__version__,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "batch_size": args.batch_size,
                "batches": args.batches,
                "backend": args.backend,
                "model_args": kwargs,
                "num_classes": int(getattr(model, "num_classes", 0) or 0),
                "data_classes": len(source.classes),
            },
        }
    )
    for kind, table in result["scores"].items():
        if not all(math.isfinite(x) for row in table for x in row):
            raise ValueError(f"non-finite {kind} scores; check the weights and the data")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # column order: what a reader needs first
    ordered = {
        k: result[k]
        for k in (
            "format",
            "model",
            "weights",
            "data",
            "primary",
            "num_layers",
            "num_heads",
            "num_images",
            "loss",
            "corrupt",
            "top_head_per_layer",
            "scores",
            "ranking",
            "rankings",
            "metadata",
        )
    }
    tmp = out / "importance.json.tmp"
    tmp.write_text(json.dumps(ordered, indent=1))
    tmp.replace(out / "importance.json")
    if not args.no_plot:
        write_heatmap(result, out / "importance.png")
    tops = ", ".join(f"L{i}:h{h}" for i, h in enumerate(result["top_head_per_layer"]))
    bad = f"; {corrupt['count']} corrupt file(s) {'skipped' if args.corrupt == 'skip' else 'replaced'}"
    print(
        f"scored {result['num_images']} images ({', '.join(kinds)}; loss={result['loss']}"
        f"{bad if corrupt['count'] else ''}); top head per layer "
        f"by {primary}: {tops}\nwrote {out / 'importance.json'}"
        + ("" if args.no_plot else f" and {out / 'importance.png'}")
    )
    return 0
