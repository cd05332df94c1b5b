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
from tests.utils import tol


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


# ---------------------------------------------------------------------------------------------------------------------
# the corrupt-file policy: fastkd.data's checks and data.corrupt's values (skip, replace, error)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """3 classes x 4 JPEGs of 64x64 px (16 MCUs: room for restart markers), weights, and the scores of a clean run."""
    tmp = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(1)
    for c in range(3):
        (tmp / "data" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            img = rng.normal(90, 40, (64, 64, 3))
            img[..., c] += 80
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp / "data" / f"c{c}" / f"{i}.jpg", quality=90)
    _, weights = _weights(tmp, num_classes=3)
    assert main(_policy_args(weights, tmp / "data", tmp / "out", "error")) == 0
    return tmp / "data", weights, json.loads((tmp / "out" / "importance.json").read_text())


def _policy_args(weights, data, out, policy, workers=0):
    """One batch holds every image: the clean run and a run that skips a bad file score the same 12-image batch (a
    batch whose every file is bad is never handed out, so with one image per batch skip would replace)."""
    return ["importance", "--model", "vit_tiny_patch16_224", "--weights", str(weights), "--img-size", "32",
            "--model-arg", "depth=2", "--num-classes", "3", "--data", str(data), "--score", "gradient,entropy",
            "--loss", "pseudo", "--batch-size", "16", "--workers", str(workers), "--corrupt", policy, "--no-plot",
            "--quiet", "--out", str(out)]  # fmt: skip


def _add_problem(case, data, tmp_path):
    """Put one bad input into a copy of the clean folder; returns the copy, the bad file (None: an empty class
    folder) and what its reason must say."""
    import shutil

    from tests.data.test_corrupt import damaged_scans

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    good = (copy / "c1" / "0.jpg").read_bytes()
    bad = copy / "c1" / "0b.jpg"  # sorts between 0.jpg and 1.jpg
    if case == "empty class folder":
        (copy / "c9").mkdir()
        return copy, None, None
    if case == "dangling symlink":
        bad.symlink_to(tmp_path / "gone.jpg")
        return copy, bad, "unreadable"
    if case == "truncated JPEG":
        bad.write_bytes(good[: len(good) // 2])
        return copy, bad, "truncated JPEG"
    if case == "damaged-scan JPEG":  # the end marker is there; PIL alone would decode garbage without a word
        bad.write_bytes(damaged_scans(good)["a piece cut out of the scan"])
        return copy, bad, "damaged JPEG scan data"
    (copy / "c1" / "notes.txt").write_text("not an image, and not named like one: not a sample either\n")
    bad.write_text("an image extension, but text inside\n")
    return copy, bad, "not a supported image format"


CASES = ["empty class folder", "dangling symlink", "truncated JPEG", "damaged-scan JPEG", "non-image file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_under_each_policy(case, clean_run, tmp_path, capsys):
    """skip: the run goes on, the file is counted and named in importance.json and on the console, and the scores
    are those of the clean folder; error: one line naming the file, exit code 2, nothing written."""
    clean, weights, expected = clean_run
    data, bad, reason = _add_problem(case, clean, tmp_path)
    capsys.readouterr()
    assert main(_policy_args(weights, data, tmp_path / "skip", "skip")) == 0
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "skip" / "importance.json").read_text())
    corrupt = report["corrupt"]
    assert report["num_images"] == 12
    for kind in ("gradient", "entropy"):
        assert_close_rel(torch.tensor(report["scores"][kind]), torch.tensor(expected["scores"][kind]),
                         tol(torch.float32, 12), f"{kind}: skipping {case} vs the clean folder")  # fmt: skip
    if bad is None:  # not a file: the class exists (training numbers it too), no file is corrupt, the run says so
        assert corrupt == {"policy": "skip", "count": 0, "files": {}, "empty_classes": ["c9"]}
        assert report["metadata"]["data_classes"] == 4 and "without images (still counted as classes): c9" in err
        assert main(_policy_args(weights, data, tmp_path / "error", "error")) == 0
        return
    assert corrupt["policy"] == "skip" and corrupt["count"] == 1 and corrupt["empty_classes"] == [], corrupt
    assert list(corrupt["files"]) == [str(bad)] and reason in corrupt["files"][str(bad)], corrupt
    assert "1 corrupt file(s) skipped" in out, out
    assert main(_policy_args(weights, data, tmp_path / "error", "error")) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"fastkd importance: corrupt image {bad}: {corrupt['files'][str(bad)]} "
                                "(--corrupt='skip' or 'replace' goes on)"], err  # fmt: skip
    assert not (tmp_path / "error").exists()


def test_replace_policy_with_workers(clean_run, tmp_path, capsys):
    """replace: the next readable image takes the bad one's place (scored twice), counted once; the bad files met in
    the DataLoader workers reach the main process's record."""
    clean, weights, expected = clean_run
    data, bad, _ = _add_problem("truncated JPEG", clean, tmp_path)
    (data / "c2" / "0b.jpg").symlink_to(tmp_path / "gone.jpg")
    assert main(_policy_args(weights, data, tmp_path / "o", "replace", workers=2)) == 0
    report = json.loads((tmp_path / "o" / "importance.json").read_text())
    assert report["num_images"] == 14 and report["corrupt"]["count"] == 2, report["corrupt"]
    assert sorted(report["corrupt"]["files"]) == sorted([str(bad), str(data / "c2" / "0b.jpg")])
    assert "2 corrupt file(s) replaced" in capsys.readouterr().out
    assert report["scores"] != expected["scores"]  # 1.jpg of c1 and c2 now count twice


def test_eval_images_are_timms_eval_transform(tmp_path):
    """The images fastkd.data hands to the scoring are timm's eval transform of the files (resize, centre crop,
    normalise with the model's mean/std), on awkward sizes and both formats; labels follow the class folders."""
    from timm.data import create_transform
    from timm.data import resolve_model_data_config

    from fastkd.importance import build_eval_loader
    from fastkd.importance.scoring import eval_input_size

    rng = np.random.default_rng(2)
    files = []
    for c in range(2):
        (tmp_path / f"k{c}").mkdir()
        for i, (h, w) in enumerate([(40, 40), (37, 53), (61, 29), (100, 77)]):
            files.append((tmp_path / f"k{c}" / f"{i}.{'png' if i % 2 else 'jpg'}", c))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1][0])
    model = tiny_vit(num_classes=2)
    loader, source = build_eval_loader(tmp_path, model, batch_size=len(files))
    batch = next(iter(loader))
    cfg = resolve_model_data_config(model)
    cfg["input_size"] = (3, *eval_input_size(model))
    transform = create_transform(**cfg, is_training=False)
    expected = torch.stack([transform(Image.open(f).convert("RGB")) for f, _ in files])
    assert source.classes == ["k0", "k1"] and batch["labels"].tolist() == [c for _, c in files]
    assert_close_rel(batch["images"], expected, tol(torch.float32), "images vs timm's eval transform")
