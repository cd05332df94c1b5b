"""Unreadable images are counted, reported once, skipped or replaced; an epoch never stops or hangs."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from fastkd.data import CorruptImageError
from fastkd.data import build_loader
from fastkd.data.sources import encoded_problem
from tests.data.conftest import BACKENDS
from tests.data.conftest import base_cfg

BAD = {
    "cat/img_bad_truncated.jpg": "truncated",
    "coffee/img_bad_garbage.jpg": "not an image",
    "astronaut/img_bad_stream.jpg": "valid markers, broken entropy-coded data",
}


def _corrupt_folder(folder: str, tmp_path) -> str:
    root = str(tmp_path / "corrupt")
    shutil.copytree(os.path.join(folder, "train"), os.path.join(root, "train"))
    good = open(
        os.path.join(root, "train", "cat", sorted(os.listdir(os.path.join(root, "train", "cat")))[0]), "rb"
    ).read()
    payloads = {
        "truncated": good[: len(good) // 2],
        "not an image": b"this is not a JPEG file\n" * 40,
        # passes the cheap check (SOI ... EOI) but no decoder can read it: only a decode attempt finds it
        "valid markers, broken entropy-coded data": good[:20] + bytes(range(256)) * 8 + b"\xff\xd9",
    }
    for rel, kind in BAD.items():
        with open(os.path.join(root, "train", rel), "wb") as f:
            f.write(payloads[kind])
    return root


def test_cheap_check():
    assert encoded_problem(b"") == "empty file"
    assert "truncated JPEG" in encoded_problem(b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    assert encoded_problem(b"\xff\xd8\xff\xe0" + b"\x00" * 100 + b"\xff\xd9") is None
    assert "truncated PNG" in encoded_problem(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    assert encoded_problem(b"GIF89a....") == "not a supported image format"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["skip", "replace"])
def test_corrupt_images_do_not_stop_the_epoch(folder, tmp_path, caplog, backend, policy):
    root = _corrupt_folder(folder, tmp_path)
    loader = build_loader(base_cfg(root, backend, batch_size=4, corrupt=policy, num_workers=2), "train")
    n = len(loader.source)
    assert n == 24
    bad_index = {loader.source.names.index(os.path.join(root, "train", rel)) for rel in BAD}
    with caplog.at_level(logging.WARNING, logger="fastkd.data"):
        for _epoch in range(2):
            batches = list(loader)
            assert len(batches) == len(loader) == 6  # the number of batches never changes
            index = torch.cat([b["index"] for b in batches]).tolist()
            assert not bad_index & set(index)
            for b in batches:
                assert b["images"].shape[0] == len(b["labels"]) > 0
                assert torch.isfinite(b["images"]).all()
            if policy == "skip":
                assert sorted(index) == sorted(set(range(n)) - bad_index)
            else:
                assert len(index) == n and set(range(n)) - bad_index <= set(index)
    assert set(loader.corrupt) == bad_index
    reasons = {loader.source.names[i]: r for i, r in loader.corrupt.items()}
    assert "truncated JPEG" in reasons[os.path.join(root, "train", "cat", "img_bad_truncated.jpg")]
    assert "not a supported image format" in reasons[os.path.join(root, "train", "coffee", "img_bad_garbage.jpg")]
    assert "decode" in reasons[os.path.join(root, "train", "astronaut", "img_bad_stream.jpg")].lower()
    warnings = [r.getMessage() for r in caplog.records if r.name == "fastkd.data"]
    assert len(warnings) == 3  # each file reported once, not once per epoch
    assert all(any(rel.split("/")[1] in w for w in warnings) for rel in BAD)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", ["astronaut/img_bad_stream.jpg", "cat/img_bad_truncated.jpg"])
def test_corrupt_error_policy_names_the_file(folder, tmp_path, backend, keep):
    """One bad file, found by the decoder (stream) or by the cheap check (truncated): a clear error."""
    root = _corrupt_folder(folder, tmp_path)
    for rel in set(BAD) - {keep}:
        os.remove(os.path.join(root, "train", rel))
    loader = build_loader(base_cfg(root, backend, corrupt="error", shuffle=False), "train")
    with pytest.raises(CorruptImageError, match=os.path.basename(keep)):
        list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_corrupt_batch_is_never_empty(folder, tmp_path, backend):
    root = str(tmp_path / "allbad")
    shutil.copytree(os.path.join(folder, "train"), os.path.join(root, "train"))
    names = sorted(os.listdir(os.path.join(root, "train", "astronaut")))
    for name in names[:2]:  # the first batch (no shuffle, batch of 2) is entirely unreadable
        open(os.path.join(root, "train", "astronaut", name), "wb").write(b"broken")
    loader = build_loader(base_cfg(root, backend, batch_size=2, shuffle=False, corrupt="skip"), "train")
    first = next(iter(loader))
    assert first["index"].tolist() == [2] and first["images"].shape[0] == 1
