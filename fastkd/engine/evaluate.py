"""Evaluation: top-1/top-5 accuracy with the method's inference rule, and k-NN accuracy on features;
:class:`Evaluator` evaluates a checkpoint (``fastkd eval``), the trainer calls :func:`evaluate_method`.

``top-k``: logits from ``method.predict(images)`` (e.g. DeiT averages its class and distillation heads).
``k-NN`` (self-supervised methods; Wu et al. 2018, as in DINO's ``eval_knn.py``): L2-normalised
``method.features(images)`` of the training set form the bank; each validation image takes its ``k=20``
most cosine-similar bank entries, which vote for their labels with weight ``exp(sim / T)``, ``T = 0.07``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from fastkd.config import Config
from fastkd.config import ConfigError
from fastkd.distributed import all_gather_cat
from fastkd.distributed import all_reduce_sum
from fastkd.distributed import setup as setup_distributed
from fastkd.engine import builders


def _images(batch: dict[str, Any]) -> torch.Tensor:
    images = batch["images"]
    if isinstance(images, (list, tuple)):  # multi-view loader: evaluate on the first (global) view
        images = images[0]
    return images


def _not_pad(batch: dict[str, Any], device) -> torch.Tensor | None:
    pad = batch.get("is_pad")
    if pad is None:
        return None
    return ~pad.to(device=device, dtype=torch.bool)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[-1])
    pred = logits.topk(maxk, dim=-1).indices  # [B, maxk]
    hit = pred.eq(labels[:, None])
    return [int(hit[:, : min(k, maxk)].any(dim=-1).sum()) for k in ks]


@torch.no_grad()
def evaluate_topk(
    predict,
    loader: Iterable[dict[str, Any]],
    *,
    autocast: contextlib.AbstractContextManager | None = None,
    ks: tuple[int, ...] = (1, 5),
    device: torch.device | None = None,
) -> dict[str, float]:
    """Top-k accuracy (in %) of ``predict(images) -> logits`` over a loader; summed over ranks."""
    correct = torch.zeros(len(ks) + 1, dtype=torch.float64)
    for batch in loader:
        images = _images(batch)
        labels = batch["labels"]
        with autocast if autocast is not None else contextlib.nullcontext():
            logits = predict(images)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        labels = labels.to(logits.device)
        keep = _not_pad(batch, logits.device)
        if keep is not None:  # samples repeated to even out the ranks are counted once
            logits, labels = logits[keep], labels[keep]
        c = topk_correct(logits.float(), labels, ks)
        correct += torch.tensor(c + [labels.shape[0]], dtype=torch.float64)
    if device is not None:
        correct = correct.to(device)
    correct = all_reduce_sum(correct).cpu()
    n = max(float(correct[-1]), 1.0)
    out = {f"top{k}": 100.0 * float(correct[i]) / n for i, k in enumerate(ks)}
    out["n"] = int(correct[-1])
    return out


@torch.no_grad()
def extract_features(features, loader, *, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for batch in loader:
        with autocast if autocast is not None else contextlib.nullcontext():
            f = features(_images(batch))
        y = batch["labels"].to(f.device)
        keep = _not_pad(batch, f.device)
        if keep is not None:
            f, y = f[keep], y[keep]
        feats.append(F.normalize(f.float(), dim=-1))
        labels.append(y)
    f = torch.cat(feats)
    y = torch.cat(labels)
    return all_gather_cat(f), all_gather_cat(y)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> torch.Tensor:
    """Weighted k-NN votes ``[N_test, num_classes]``; features are expected L2-normalised."""
    k = min(k, train_features.shape[0])
    scores = []
    for i in range(0, test_features.shape[0], chunk):
        sim = test_features[i : i + chunk] @ train_features.T  # cosine similarity
        top_sim, top_idx = sim.topk(k, dim=-1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


@torch.no_grad()
def evaluate_knn(
    features,
    train_loader,
    val_loader,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    autocast=None,
) -> dict[str, float]:
    """k-NN top-1/top-5 (in %) of ``features(images) -> [B, D]`` with the training set as the bank."""
    bank, bank_labels = extract_features(features, train_loader, autocast=autocast)
    test, test_labels = extract_features(features, val_loader, autocast=autocast)
    votes = knn_classify(bank, bank_labels, test, num_classes=num_classes, k=k, temperature=temperature)
    c = topk_correct(votes, test_labels, (1, 5))
    n = max(test_labels.shape[0], 1)
    return {"knn_top1": 100.0 * c[0] / n, "knn_top5": 100.0 * c[1] / n, "n": int(test_labels.shape[0])}


@torch.no_grad()
def evaluate_method(method, val_loader, bank_loader=None, *, num_classes: int | None = None, autocast=None,
                    device: torch.device | None = None) -> dict[str, float]:
    """What the method's kind is judged by: k-NN accuracy of ``method.features`` with ``bank_loader`` as the bank
    for self-supervised methods, else top-1/top-5 of ``method.predict`` (plus ``ema_top1``/``ema_top5`` of its
    student's EMA when it keeps one). The method is put in eval mode and restored."""
    was_training = method.training
    method.eval()
    try:
        if method.self_supervised:
            if bank_loader is None:
                raise ConfigError("k-NN evaluation needs the training split as the feature bank (data.root)")
            num_classes = num_classes or getattr(bank_loader, "num_classes", None)
            if not num_classes:
                raise ConfigError("k-NN evaluation needs the number of classes: set data.num_classes")
            return evaluate_knn(method.features, bank_loader, val_loader, num_classes=int(num_classes),
                                autocast=autocast)
        res = evaluate_topk(method.predict, val_loader, autocast=autocast, device=device)
        if method.ema is not None:
            ema = evaluate_topk(functools.partial(method.predict, ema=True), val_loader, autocast=autocast,
                                device=device)
            res["ema_top1"], res["ema_top5"] = ema["top1"], ema["top5"]
        return res
    finally:
        method.train(was_training)


class Evaluator:
    """Builds the validation loader (and the k-NN bank for self-supervised methods), the student, the teachers
    (methods take them at construction; they are not run) and the method; loads a checkpoint's weights."""

    def __init__(self, cfg: Config, *, local_rank: int | None = None, method=None, val_loader=None,
                 bank_loader=None):
        self.cfg = cfg
        self.info = setup_distributed(device=cfg.run.device, backend=cfg.distributed.backend, local_rank=local_rank,
                                      timeout=cfg.distributed.timeout)
        self.device = self.info.device
        self.amp_dtype = builders.amp_dtype(cfg, self.device)
        data_cfg = builders.data_config(cfg, self.device)
        cls = builders.method_class(cfg.method.name) if method is None else type(method)
        if val_loader is None:
            from fastkd.data import build_loader

            val_loader = build_loader(data_cfg, "val", self.info.rank, self.info.world_size)
            if cls.self_supervised:
                bank_loader = builders.knn_bank_loader(data_cfg, self.info.rank, self.info.world_size)
        self.val_loader, self.bank_loader = val_loader, bank_loader
        self.num_classes = getattr(val_loader, "num_classes", None) or getattr(data_cfg, "num_classes", None)
        if method is None:
            student = builders.build_student(cfg, self.num_classes)
            teachers = builders.build_teachers(cfg, self.num_classes, data_cfg)
            method = builders.build_method(cfg, student, teachers)
        self.method = method.to(self.device)

    def load_weights(self, state: dict[str, Any], *, ema: bool = False) -> None:
        """The checkpoint's method weights; with ``ema``, its EMA weights become the student."""
        self.method.load_checkpoint_state(state, ema_as_student=ema)

    def evaluate(self) -> dict[str, float]:
        return evaluate_method(self.method, self.val_loader, self.bank_loader, num_classes=self.num_classes,
                               autocast=builders.autocast(self.device, self.amp_dtype), device=self.device)


__all__ = ["Evaluator", "evaluate_knn", "evaluate_method", "evaluate_topk", "extract_features", "knn_classify",
           "topk_correct"]
