"""Head importance over a data set: average the per-layer scores of :mod:`fastkd.importance.ops` over images.

The library part of ``fastkd importance`` (the command itself is :mod:`fastkd.importance.commands`); SSTA uses
:func:`compute_importance` to pick its heads on the first batch.

Scores (see :mod:`fastkd.importance.ops`): ``gradient`` (Michel et al. 2019, the default), ``attribution``
and ``entropy``. Per-sample scores are averaged over the images seen. For ``gradient``/``attribution`` the
loss L is summed over the batch (so each sample's score is its own gradient, independent of the batch size):

* ``ce`` -- cross-entropy on the data set's labels (the model's classes must be the folder's classes);
* ``pseudo`` -- cross-entropy on the model's own top-1 prediction (any folder, any classifier);
* ``feature-norm`` -- ``0.5 * ||f||^2`` of the pooled pre-logits feature (self-supervised backbones);
* ``self-kl`` -- ``KL(softmax(sg(z)/0.04) || softmax(z/0.1))``, z the logits or, without a classifier, the
  pooled feature: a DINO-like sharpened self-distillation target. (A KL to an *unsharpened* detached copy has
  zero gradient at the current point, so it cannot rank heads.)
* ``auto`` (default) -- ``ce`` when the classifier has as many classes as the folder, ``pseudo`` for any
  other classifier, ``feature-norm`` without a classifier (``num_classes == 0``).

Ranking across layers: ``gradient``/``attribution`` scores are L2-normalized within each layer first
(Michel et al. 2019, Sec. 4) and ranked high to low; ``entropy`` is ranked low to high (most concentrated
head first). ``top_head_per_layer`` does not depend on the normalization.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.importance.ops import SCORES
from fastkd.importance.ops import attribution_importance
from fastkd.importance.ops import entropy_importance
from fastkd.importance.ops import gradient_importance

LOSSES = ("auto", "ce", "pseudo", "feature-norm", "self-kl")
_NEEDS_GRAD = ("gradient", "attribution")

__all__ = ["LOSSES", "build_eval_loader", "compute_importance", "rank_heads", "resolve_loss"]


# ------------------------------------------------------------------------------------------------------ data
def _find_image_root(root: Path) -> Path:
    """DIR itself, or DIR/val, DIR/validation, DIR/train when DIR holds a split layout."""
    for split in ("val", "validation", "train"):
        if (root / split).is_dir() and any(p.is_dir() for p in (root / split).iterdir()):
            return root / split
    return root


def eval_input_size(model: nn.Module) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is not None:
        return (int(size[0]), int(size[1]))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    s = cfg.get("input_size", (3, 224, 224))
    return (int(s[1]), int(s[2]))


class _TimmEvalGeometry:
    """timm's eval transform of a model without its tensor conversion and normalisation: PIL image in, uint8
    ``[3, H, W]`` out (fastkd.data's loader normalises with the same mean/std afterwards)."""

    def __init__(self, transform) -> None:
        from timm.data.transforms import MaybeToTensor
        from torchvision import transforms as T

        steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
        cut = next((i for i, t in enumerate(steps) if isinstance(t, (T.ToTensor, MaybeToTensor))), None)
        if cut is None:
            raise TypeError(f"timm's eval transform has no ToTensor step to stop at: {transform}")
        self.geometry = T.Compose(steps[:cut])

    def __call__(self, img):
        from fastkd.data.transforms import to_chw_uint8

        return to_chw_uint8(self.geometry(img))


def build_eval_loader(
    root: str | os.PathLike,
    model: nn.Module,
    *,
    batch_size: int = 32,
    workers: int = 0,
    corrupt: str | None = None,
):
    """A loader of the ImageFolder tree ``root`` (``root/<class>/<image>``, or ``root/val/...``) with timm's eval
    transform for ``model`` (resize, center crop, normalize with the model's mean/std), and its source
    (``.classes``: the class folders, empty ones included, as training numbers them).

    Files are listed, read, checked and decoded by :mod:`fastkd.data` (its torch loader), so a bad image meets the
    same ``corrupt`` policy as in training (``"skip"``, ``"replace"`` or ``"error"``; None: training's default,
    see :class:`~fastkd.data.DataConfig`); the loader's ``corrupt_summary()`` has the files met."""
    from timm.data import create_transform
    from timm.data import resolve_model_data_config

    from fastkd.data.config import CORRUPT_POLICIES
    from fastkd.data.config import DataConfig
    from fastkd.data.sources import open_folder
    from fastkd.data.torch_loader import TorchLoader

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--data {str(root)!r} is not a directory (expected an ImageFolder tree: DIR/<class>/<image>)"
        )
    corrupt = DataConfig.corrupt if corrupt is None else corrupt
    if corrupt not in CORRUPT_POLICIES:
        raise ValueError(f"--corrupt {corrupt!r}: expected one of {list(CORRUPT_POLICIES)}")
    data_cfg = resolve_model_data_config(model)
    data_cfg["input_size"] = (3, *eval_input_size(model))
    image_root = _find_image_root(root)
    try:
        source = open_folder(str(image_root))
    except ValueError as exc:
        raise ValueError(f"--data {str(root)!r}: {exc}") from None
    height, width = data_cfg["input_size"][1:]
    cfg = DataConfig(
        val_path=str(image_root),
        backend="torch",
        device="cpu",
        batch_size=batch_size,
        num_workers=workers,
        img_size=max(height, width),
        mean=tuple(float(m) for m in data_cfg["mean"]),
        std=tuple(float(s) for s in data_cfg["std"]),
        shuffle=False,
        corrupt=corrupt,
    )
    cfg.validate()
    loader = TorchLoader(cfg, "val", 0, 1, source)
    loader.dataset.transforms = [_TimmEvalGeometry(create_transform(**data_cfg, is_training=False))]
    return loader, source


# ------------------------------------------------------------------------------------------------------ loss
def resolve_loss(loss: str, model: nn.Module, num_data_classes: int | None) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is unknown; expected one of {LOSSES}")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if loss == "auto":
        if num_classes == 0:
            return "feature-norm"
        return "ce" if num_data_classes is not None and num_data_classes == num_classes else "pseudo"
    if loss in ("ce", "pseudo") and num_classes == 0:
        raise ValueError(
            f"loss={loss!r} needs a classifier, but the model has num_classes=0; use feature-norm or self-kl"
        )
    return loss


def _pooled(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    feats = model.forward_features(images)
    pre = model.forward_head(feats, pre_logits=True)
    logits = model.forward_head(feats) if int(getattr(model, "num_classes", 0) or 0) > 0 else None
    return pre, logits


def _loss(kind: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss summed over the batch."""
    pre, logits = _pooled(model, images)
    if isinstance(logits, tuple):  # distilled DeiT in train mode; we run eval, but be safe
        logits = sum(logits) / len(logits)
    if kind == "ce":
        if int(labels.max()) >= logits.shape[-1]:
            raise ValueError(f"label {int(labels.max())} >= num_classes {logits.shape[-1]}; use --loss pseudo")
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    if kind == "pseudo":
        return F.cross_entropy(logits.float(), logits.detach().argmax(-1), reduction="sum")
    if kind == "feature-norm":
        return 0.5 * pre.float().pow(2).sum()
    z = (logits if logits is not None else pre).float()
    target = F.softmax(z.detach() / 0.04, dim=-1)
    return F.kl_div(F.log_softmax(z / 0.1, dim=-1), target, reduction="sum")


# --------------------------------------------------------------------------------------------------- compute
def compute_importance(
    model: nn.Module,
    loader: Iterable,
    *,
    scores: Iterable[str] = ("gradient",),
    loss: str = "auto",
    num_data_classes: int | None = None,
    batches: int | None = None,
    device: torch.device | str = "cpu",
    backend: str = "sdpa",
    progress: bool = True,
) -> dict[str, Any]:
    """Average per-sample head scores over ``loader`` (``(images, labels)`` tuples or dict batches).

    Returns ``{"scores": {kind: [L, H] list}, "num_images": int, "loss": str, "num_layers": L, "num_heads": H}``.
    The model runs in eval mode; for gradient-based scores the backward computes activation gradients only
    (parameters are frozen for the duration and restored afterwards).
    """
    from tqdm.auto import tqdm

    from fastkd.models import AttentionTaps
    from fastkd.models import attention_modules

    scores = list(dict.fromkeys(scores))
    for s in scores:
        if s not in SCORES:
            raise ValueError(f"score {s!r} is unknown; expected any of {SCORES}")
    if not scores:
        raise ValueError(f"scores must name at least one of {SCORES}")
    device = torch.device(device)
    need_grad = any(s in _NEEDS_GRAD for s in scores)
    loss_kind = resolve_loss(loss, model, num_data_classes) if need_grad else "none"
    record = set()
    if "gradient" in scores:
        record |= {"out", "grad_out"}
    if "attribution" in scores:
        record |= {"q", "k", "v", "grad_out", "lse"}
    if "entropy" in scores:
        record |= {"q", "k", "lse"}
    layers = len(attention_modules(model))
    was_training = model.training
    req = {p: p.requires_grad for p in model.parameters()}
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sums: dict[str, torch.Tensor | None] = {s: None for s in scores}
    seen = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    if batches is not None:
        total = batches if total is None else min(total, batches)
    taps = AttentionTaps(model, blocks="all", record=sorted(record), backend=backend)
    try:
        for step, batch in enumerate(tqdm(loader, total=total, desc="importance", disable=not progress)):
            if batches is not None and step >= batches:
                break
            if isinstance(batch, dict):
                images, labels = batch["images"], batch.get("labels")
            else:
                images, labels = batch[0], batch[1]
            images = images.to(device, non_blocking=True)
            labels = labels.to(device) if labels is not None else None
            taps.clear()
            if need_grad:
                images = images.detach().requires_grad_(True)  # activation grads only, no weight grads
                with torch.enable_grad():
                    objective = _loss(loss_kind, model, images, labels)
                    objective.backward()
            else:
                with torch.no_grad():
                    model(images)
            per_kind: dict[str, list[torch.Tensor]] = {s: [] for s in scores}
            for rec in (taps[b] for b in range(layers)):
                for s in scores:
                    if s == "gradient":
                        val = gradient_importance(rec.out, rec.grad_out)
                    elif s == "attribution":
                        val = attribution_importance(rec.q, rec.k, rec.v, rec.grad_out, scale=rec.scale, lse=rec.lse)
                    else:
                        val = entropy_importance(rec.q, rec.k, scale=rec.scale, lse=rec.lse)
                    per_kind[s].append(val.sum(0).double().cpu())  # [H], summed over the batch
            for s in scores:
                stacked = torch.stack(per_kind[s])  # [L, H]
                sums[s] = stacked if sums[s] is None else sums[s] + stacked
            seen += images.shape[0]
    finally:
        taps.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was_training)
    if seen == 0:
        raise ValueError("no images were scored: the data set is empty or --batches is 0")
    out_scores = {s: (sums[s] / seen).tolist() for s in scores}
    heads = len(next(iter(out_scores.values()))[0])
    return {"scores": out_scores, "num_images": seen, "loss": loss_kind, "num_layers": layers, "num_heads": heads}


def rank_heads(scores: list[list[float]], kind: str) -> dict[str, Any]:
    """Ranking of every (layer, head) and the top head per layer for one score kind."""
    t = torch.tensor(scores, dtype=torch.float64)
    if kind == "entropy":
        key, descending = t, False
        normalized = t
    else:
        norm = t.norm(dim=1, keepdim=True)
        normalized = t / torch.where(norm > 0, norm, torch.ones_like(norm))
        key, descending = normalized, True
    flat = key.flatten()
    order = torch.argsort(flat, descending=descending, stable=True).tolist()
    H = t.shape[1]
    ranking = [
        {"layer": i // H, "head": i % H, "score": float(t.flatten()[i]), "normalized": float(normalized.flatten()[i])}
        for i in order
    ]
    top = (key.argmin(dim=1) if kind == "entropy" else key.argmax(dim=1)).tolist()
    return {
        "order": "ascending" if kind == "entropy" else "descending",
        "normalized": normalized.tolist(),
        "ranking": ranking,
        "top_head_per_layer": top,
    }
