"""`fastkd importance` end to end on a small generated image folder, and compute_importance directly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.cli import main
from fastkd.importance import compute_importance
from fastkd.importance import rank_heads
from fastkd.models import AttentionTaps
from tests.models._tiny import tiny_vit
from tests.utils import assert_close_rel


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes x 4 images of 40x40 px, each class a different colour cast plus noise (DIR/val/<class>/)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / "val" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(4):
            img = rng.normal(90, 40, (40, 40, 3))
            img[..., c] += 80
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def _weights(tmp_path, num_classes):
    from safetensors.torch import save_file

    model = tiny_vit(num_classes=num_classes)
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_cli_end_to_end(tmp_path, image_folder, capsys):
    model, weights = _weights(tmp_path, num_classes=3)
    out = tmp_path / "out"
    rc = main(
        [
            "importance",
            "--model",
            "vit_tiny_patch16_224",
            "--weights",
            str(weights),
            "--data",
            str(image_folder),
            "--score",
            "gradient,attribution,entropy",
            "--batches",
            "2",
            "--batch-size",
            "5",
            "--workers",
            "0",
            "--img-size",
            "32",
            "--model-arg",
            "depth=2",
            "--num-classes",
            "3",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    report = json.loads((out / "importance.json").read_text())
    assert report["model"] == "vit_tiny_patch16_224" and report["primary"] == "gradient"
    assert report["num_layers"] == 2 and report["num_heads"] == 3 and report["num_images"] == 10  # 2 batches of 5
    assert report["loss"] == "ce"  # the classifier has as many classes as the folder
    assert set(report["scores"]) == {"gradient", "attribution", "entropy"}
    for kind, table in report["scores"].items():
        t = torch.tensor(table)
        assert t.shape == (2, 3) and torch.isfinite(t).all() and (t > 0).all(), kind
    ent = torch.tensor(report["scores"]["entropy"])
    assert (ent <= math.log(5) + 1e-5).all()  # 5 tokens at 32 px
    grad = torch.tensor(report["scores"]["gradient"])
    assert report["top_head_per_layer"] == grad.argmax(1).tolist()
    assert report["rankings"]["entropy"]["top_head_per_layer"] == ent.argmin(1).tolist()
    ranking = report["ranking"]
    assert len(ranking) == 6 and len({(r["layer"], r["head"]) for r in ranking}) == 6
    norm = [r["normalized"] for r in ranking]
    assert norm == sorted(norm, reverse=True)
    md = report["metadata"]
    assert md["torch"] == torch.__version__ and md["model_args"] == {"depth": 2, "img_size": 32} and md["date"]
    png = (out / "importance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "top head per layer" in capsys.readouterr().out

    # the same numbers as compute_importance over the same images, in one batch of 10 (per-sample scores are
    # independent of batching because the loss is summed over the batch)
    from fastkd.importance import build_eval_loader

    loader, _ = build_eval_loader(image_folder, model, batch_size=10)
    direct = compute_importance(model, loader, scores=["gradient", "entropy"], loss="ce", batches=1, progress=False)
    assert_close_rel(torch.tensor(direct["scores"]["gradient"]), grad, 1e-4, "gradient, batch 10 vs 2x5")
    assert_close_rel(torch.tensor(direct["scores"]["entropy"]), ent, 1e-5, "entropy, batch 10 vs 2x5")


def test_self_supervised_losses(tmp_path, image_folder):
    model = tiny_vit(num_classes=0)
    imgs = torch.randn(6, 3, 32, 32)
    batches = [
        {"images": imgs[:3], "labels": torch.zeros(3, dtype=torch.long)},
        {"images": imgs[3:], "labels": torch.zeros(3, dtype=torch.long)},
    ]
    res = compute_importance(model, batches, scores=["gradient", "attribution"], loss="auto", progress=False)
    assert res["loss"] == "feature-norm" and res["num_images"] == 6
    res_kl = compute_importance(model, batches, scores=["gradient"], loss="self-kl", progress=False)
    g = torch.tensor(res_kl["scores"]["gradient"])
    assert torch.isfinite(g).all() and (g > 0).all()  # the sharpened self-KL has a non-zero gradient
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards
    assert "forward" not in model.blocks[0].attn.__dict__  # taps removed
    with pytest.raises(ValueError, match="needs a classifier"):
        compute_importance(model, batches, scores=["gradient"], loss="ce", progress=False)


def test_gradient_scores_equal_per_sample_taps(image_folder):
    """compute_importance's gradient score = mean over samples of |<O_h, dL/dO_h>| from one-image backwards."""
    model = tiny_vit(num_classes=7).eval()  # 7 classes != 3 folder classes -> auto uses pseudo labels
    imgs = torch.randn(4, 3, 32, 32)
    res = compute_importance(model, [(imgs, torch.zeros(4, dtype=torch.long))], scores=["gradient"], progress=False)
    assert res["loss"] == "pseudo"
    total = torch.zeros(2, 3, dtype=torch.float64)
    with AttentionTaps(model, blocks="all", record=("out", "grad_out")) as taps:
        for i in range(4):
            x = imgs[i : i + 1].clone().requires_grad_(True)
            logits = model(x)
            torch.nn.functional.cross_entropy(logits, logits.argmax(-1)).backward()
            for layer in range(2):
                o, g = taps[layer].out.double(), taps[layer].grad_out.double()
                total[layer] += (o * g).sum((-1, -2)).abs()[0]
    assert_close_rel(torch.tensor(res["scores"]["gradient"]), total / 4, 1e-4, "gradient importance")


def test_rank_heads_normalization():
    r = rank_heads([[3.0, 4.0], [0.1, 0.0]], "gradient")
    assert r["top_head_per_layer"] == [1, 0]
    assert [(x["layer"], x["head"]) for x in r["ranking"]][:2] == [(1, 0), (0, 1)]  # 1.0 then 0.8 after L2 norm
    e = rank_heads([[2.0, 1.0], [0.5, 3.0]], "entropy")
    assert e["order"] == "ascending" and e["top_head_per_layer"] == [1, 0]


def test_cli_errors(tmp_path, image_folder, capsys, monkeypatch):
    _, weights = _weights(tmp_path, num_classes=3)
    base = [
        "importance",
        "--model",
        "vit_tiny_patch16_224",
        "--weights",
        str(weights),
        "--img-size",
        "32",
        "--model-arg",
        "depth=2",
        "--num-classes",
        "3",
        "--workers",
        "0",
        "--quiet",
        "--out",
        str(tmp_path / "o"),
    ]
    # expected errors: one line naming the argument, exit code 2 (FASTKD_DEBUG=1 re-raises them)
    assert main(base + ["--data", str(image_folder), "--score", "gradient,magic"]) == 2
    assert "--score" in capsys.readouterr().err
    assert main(base + ["--data", str(tmp_path / "missing")]) == 2
    assert "--data" in capsys.readouterr().err
    monkeypatch.setenv("FASTKD_DEBUG", "1")
    with pytest.raises(ValueError, match="--score"):
        main(base + ["--data", str(image_folder), "--score", "gradient,magic"])
    with pytest.raises(FileNotFoundError, match="--data"):
        main(base + ["--data", str(tmp_path / "missing")])
