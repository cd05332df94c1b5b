"""ImageFolder, file list and webdataset sources describe the same samples and labels."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastkd.data import build_loader
from fastkd.data import write_filelists
from fastkd.data import write_webdataset
from fastkd.data.sources import open_filelist
from tests.data.conftest import BACKEND_PARAMS
from tests.data.conftest import base_cfg


@pytest.fixture(scope="module")
def three_formats(folder, tmp_path_factory):
    """The session folder written again as file lists and as webdataset shards (small shards: 4 samples)."""
    import shutil

    root = str(tmp_path_factory.mktemp("formats"))
    for split in ("train", "val"):
        shutil.copytree(os.path.join(folder, split), os.path.join(root, split))
    lists = write_filelists(root)
    shards = write_webdataset(root, shard_size=4)
    return root, lists, shards


def test_writers(three_formats):
    root, lists, shards = three_formats
    assert [os.path.basename(p) for p in lists] == ["train.txt", "val.txt"]
    assert len([s for s in shards if "/train/" in s]) == 6  # 21 samples / 4 per shard


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_sources_agree(three_formats, backend, split):
    root, _, _ = three_formats
    cfgs = {
        "folder": base_cfg(root, backend, source="folder", shuffle=False, img_size=24),
        "filelist": base_cfg(root, backend, source="filelist", shuffle=False, img_size=24),
        "webdataset": base_cfg(root, backend, shuffle=False, img_size=24, **{f"{split}_path": f"{root}/wds/{split}"}),
    }
    results = {}
    for kind, cfg in cfgs.items():
        loader = build_loader(cfg, split)
        assert loader.source.kind == kind and loader.num_classes == 3
        if split == "val" or cfg["backend"] == "torch":
            batches = list(loader)
            results[kind] = (
                torch.cat([b["labels"] for b in batches]),
                torch.cat([b["images"] for b in batches]) if split == "val" else None,
            )
        else:
            results[kind] = (torch.as_tensor(loader.source.labels), None)
    for kind in ("filelist", "webdataset"):
        assert torch.equal(results[kind][0], results["folder"][0])
        if split == "val":  # same bytes, same graph: identical pixels
            assert torch.equal(results[kind][1], results["folder"][1])


def test_tar_bytes_equal_file_bytes(three_formats):
    root, _, _ = three_formats
    folder = build_loader(base_cfg(root, "torch", source="folder"), "train").source
    tars = build_loader(base_cfg(root, "torch", source="webdataset", train_path=f"{root}/wds/train"), "train").source
    assert len(tars) == len(folder) == 21 and len(tars.tars) == 6
    for i in (0, 5, 20):
        assert tars.read(i) == folder.read(i)
    np.testing.assert_array_equal(tars.labels, folder.labels)


def test_auto_source_detection(three_formats):
    root, _, _ = three_formats
    assert build_loader(base_cfg(root, "torch"), "train").source.kind == "folder"  # folder wins over train.txt
    assert build_loader(base_cfg(root, "torch", train_path=f"{root}/train.txt"), "train").source.kind == "filelist"
    assert build_loader(base_cfg(root, "torch", train_path=f"{root}/wds/train/shard-*.tar"), "train").source.kind == (
        "webdataset"
    )


def test_filelist_errors(tmp_path):
    bad = tmp_path / "list.txt"
    bad.write_text("a.jpg 0\nb.jpg cat\n")
    with pytest.raises(ValueError, match="line 2"):
        open_filelist(str(bad))


def test_val_classes_come_from_train(folder, tmp_path):
    """A val split missing a class folder keeps the train split's class indices."""
    import shutil

    root = str(tmp_path / "partial")
    shutil.copytree(os.path.join(folder, "train"), os.path.join(root, "train"))
    shutil.copytree(os.path.join(folder, "val", "coffee"), os.path.join(root, "val", "coffee"))
    loader = build_loader(base_cfg(root, "torch"), "val")
    assert loader.num_classes == 3 and set(loader.source.labels.tolist()) == {2}  # astronaut, cat, coffee
