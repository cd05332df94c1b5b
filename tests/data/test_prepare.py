"""`fastkd data prepare`: real images shipped inside scikit-learn / scikit-image, as ImageFolder JPEGs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from fastkd.data import commands


def main(argv: list[str]) -> int:
    """``fastkd <argv>`` through this package's command module only (other commands are not imported)."""
    import argparse

    assert argv[0] == "data"
    parser = argparse.ArgumentParser(prog="fastkd data")
    commands.add_data_arguments(parser)
    return commands.run_data(parser.parse_args(argv[1:]))


def test_cli_maps_data_command():
    from fastkd.cli import COMMANDS

    assert COMMANDS["data"][0] == "fastkd.data.commands"


def test_prepare_digits(tmp_path):
    from sklearn.datasets import load_digits

    out = str(tmp_path / "digits")
    assert main(["data", "prepare", "digits", "--out", out, "--size", "32", "--format", "filelist"]) == 0
    counts = {
        s: sum(len(os.listdir(os.path.join(out, s, c))) for c in os.listdir(os.path.join(out, s)))
        for s in ("train", "val")
    }
    assert counts["train"] + counts["val"] == 1797 and abs(counts["val"] / 1797 - 0.2) < 0.01
    assert sorted(os.listdir(os.path.join(out, "train"))) == [str(c) for c in range(10)]
    digits = load_digits()
    for c in (0, 7):  # the pixels are the digits', upscaled (JPEG q95 adds only small errors)
        name = sorted(os.listdir(os.path.join(out, "val", str(c))))[0]
        i = int(name[6:10])
        assert digits.target[i] == c
        got = np.asarray(Image.open(os.path.join(out, "val", str(c), name)), dtype=np.float64)
        ref = np.asarray(
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.Resampling.BICUBIC),
            dtype=np.float64,
        )
        assert got.shape == (32, 32) and np.abs(got - ref).mean() < 4
    assert os.path.isfile(os.path.join(out, "train.txt"))
    with pytest.raises(SystemExit, match="--force"):
        main(["data", "prepare", "digits", "--out", out])


def test_prepare_photos_and_load(tmp_path):
    from fastkd.data import build_loader

    out = str(tmp_path / "photos")
    assert (
        main(["data", "prepare", "photos", "--out", out, "--size", "40", "--per-class", "5", "--format", "webdataset"])
        == 0
    )
    assert len(os.listdir(os.path.join(out, "train"))) == 10
    loader = build_loader(dict(root=out, backend="auto", device="cpu", img_size=32, batch_size=8), "val")
    batch = next(iter(loader))
    assert loader.num_classes == 10 and batch["images"].shape == (8, 3, 32, 32)
    wds = build_loader(dict(root=out, val_path=f"{out}/wds/val", backend="torch", device="cpu", img_size=32), "val")
    assert len(wds.source) == 10 and wds.source.kind == "webdataset"


def test_prepare_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--val-fraction"):
        main(["data", "prepare", "digits", "--out", str(tmp_path / "x"), "--val-fraction", "1.5"])
