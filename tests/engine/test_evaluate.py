"""Evaluation metrics on cases whose answers are known by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastkd.engine.evaluate import evaluate_knn
from fastkd.engine.evaluate import evaluate_topk
from fastkd.engine.evaluate import knn_classify
from fastkd.engine.evaluate import topk_correct


def test_topk_correct_by_hand():
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
        [0.1, 0.9, 0.8, 0.0, 0.0, 0.0],  # label 2: second -> top-5 only
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: sixth -> miss both
        [0.0, 0.0, 0.0, 0.1, 0.2, 0.3],  # label 1: rank 4..6 ties at 0 -> topk picks; check separately
    ])
    labels = torch.tensor([0, 2, 5, 3])
    assert topk_correct(logits, labels, (1, 5)) == [1, 3]
    # fewer classes than k: every label is in the "top-5"
    assert topk_correct(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), (1, 5))[1] == 4


def test_evaluate_topk_over_batches_with_padding():
    # a predictor that returns one-hot logits of a fixed answer per image (encoded in the image)
    def predict(images):
        return F.one_hot(images[:, 0, 0, 0].long(), 10).float()

    answers = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    labels = torch.tensor([1, 2, 3, 0, 5, 0, 0, 0])  # 4 of 8 right
    batches = []
    for i in range(0, 8, 3):
        a = answers[i:i + 3]
        images = a.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()
        batches.append({"images": images, "labels": labels[i:i + 3]})
    res = evaluate_topk(predict, batches)
    assert res["n"] == 8 and res["top1"] == pytest.approx(50.0)
    # a repeated (padded) sample counts once: mark one wrong duplicate as padding
    pad = {"images": torch.full((1, 3, 2, 2), 9.0), "labels": torch.tensor([0]), "is_pad": torch.tensor([True])}
    res = evaluate_topk(predict, batches + [pad])
    assert res["n"] == 8 and res["top1"] == pytest.approx(50.0)


def test_knn_votes_by_hand():
    # bank: 3 points of class 0 near e0, 2 of class 1 near e1; query near e0 -> class 0
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    bank = F.normalize(torch.stack([e0, e0 + 0.1 * e1, e0 - 0.1 * e1, e1, e1 + 0.05 * e0]), dim=-1)
    labels = torch.tensor([0, 0, 0, 1, 1])
    q = F.normalize(torch.stack([e0 + 0.2 * e1, e1]), dim=-1)
    votes = knn_classify(bank, labels, q, num_classes=2, k=3, temperature=0.07)
    assert votes.argmax(-1).tolist() == [0, 1]
    # the weights are exp(cos/T) of the k nearest
    sim = q[1] @ bank.T
    top = sim.topk(3)
    expected = torch.zeros(2).scatter_add_(0, labels[top.indices], (top.values / 0.07).exp())
    torch.testing.assert_close(votes[1], expected)


def test_evaluate_knn_end_to_end():
    # features = the image itself (flattened); two well separated classes -> 100 %
    torch.manual_seed(0)
    centers = torch.tensor([[3.0, 0, 0, 0], [0, 0, 3.0, 0]])

    def make(n):
        y = torch.arange(n) % 2
        x = centers[y] + 0.1 * torch.randn(n, 4)
        return [{"images": x[i:i + 4].view(-1, 4, 1, 1), "labels": y[i:i + 4]} for i in range(0, n, 4)]

    res = evaluate_knn(lambda im: im.flatten(1), make(40), make(12), num_classes=2, k=20, temperature=0.07)
    assert res["knn_top1"] == pytest.approx(100.0) and res["n"] == 12
