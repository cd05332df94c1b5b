"""Unreadable images are counted, reported once, skipped or replaced; an epoch never stops or hangs."""

from __future__ import annotations

import io
import logging
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.data import CorruptImageError
from fastkd.data import build_loader
from fastkd.data.sources import encoded_problem
from tests.data.conftest import BACKEND_PARAMS
from tests.data.conftest import base_cfg

BAD = {
    "cat/img_bad_truncated.jpg": "truncated",
    "coffee/img_bad_garbage.jpg": "not an image",
    "astronaut/img_bad_stream.jpg": "valid markers, undecodable",
    "cat/img_bad_scan.jpg": "random bytes in the scan",
    "coffee/img_bad_cut.jpg": "a piece cut out of the scan",
}


def _scan_span(jpeg: bytes) -> tuple[int, int]:
    """Start and end of the compressed data of a single-scan JPEG."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big"), len(jpeg) - 2


def damaged_scans(good: bytes) -> dict[str, bytes]:
    """Two JPEGs that keep their end marker but whose scan data is damaged, which PIL (and DALI's CPU
    decoder) decode as garbage without an error: the photo saved with restart markers every 2 MCUs,
    then (1) 512 random bytes written over the middle of its scan, (2) 600 bytes cut out of it."""
    out = io.BytesIO()
    Image.open(io.BytesIO(good)).save(out, "JPEG", quality=90, restart_marker_blocks=2)
    jpeg = out.getvalue()
    start, end = _scan_span(jpeg)
    mid = (start + end) // 2
    noise = np.random.default_rng(0).integers(0, 255, 512, dtype=np.uint8).tobytes()  # no 0xFF: no marker
    return {
        "random bytes in the scan": jpeg[: mid - 256] + noise + jpeg[mid + 256 :],
        "a piece cut out of the scan": jpeg[: mid - 300] + jpeg[mid + 300 :],
    }


def _corrupt_folder(folder: str, tmp_path) -> str:
    root = str(tmp_path / "corrupt")
    shutil.copytree(os.path.join(folder, "train"), os.path.join(root, "train"))
    good = open(
        os.path.join(root, "train", "cat", sorted(os.listdir(os.path.join(root, "train", "cat")))[0]), "rb"
    ).read()
    sos = good.index(b"\xff\xda")
    payloads = {
        "truncated": good[: len(good) // 2],
        "not an image": b"this is not a JPEG file\n" * 40,
        # intact markers (passes every check before decoding), but the scan names a component id the
        # frame does not have: only a decode attempt finds it
        "valid markers, undecodable": good[: sos + 5] + b"\x09" + good[sos + 6 :],
        **damaged_scans(good),
    }
    for rel, kind in BAD.items():
        with open(os.path.join(root, "train", rel), "wb") as f:
            f.write(payloads[kind])
    return root


def test_cheap_check():
    assert encoded_problem(b"") == "empty file"
    assert "truncated JPEG" in encoded_problem(b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    # an end marker alone does not make a JPEG: its segments must hold together
    assert "damaged JPEG" in encoded_problem(b"\xff\xd8\xff\xe0" + b"\x00" * 100 + b"\xff\xd9")
    out = io.BytesIO()
    Image.new("RGB", (9, 7), (200, 10, 30)).save(out, "JPEG")
    assert encoded_problem(out.getvalue()) is None
    assert "truncated PNG" in encoded_problem(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    assert encoded_problem(b"GIF89a....") == "not a supported image format"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("policy", ["skip", "replace"])
def test_corrupt_images_do_not_stop_the_epoch(folder, tmp_path, caplog, backend, policy):
    root = _corrupt_folder(folder, tmp_path)
    loader = build_loader(base_cfg(root, backend, batch_size=4, corrupt=policy, num_workers=2), "train")
    n = len(loader.source)
    assert n == 21 + len(BAD)
    bad_index = {loader.source.names.index(os.path.join(root, "train", rel)) for rel in BAD}
    with caplog.at_level(logging.WARNING, logger="fastkd.data"):
        for _epoch in range(2):
            batches = list(loader)
            assert len(batches) == len(loader) == math.ceil(n / 4)  # the number of batches never changes
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
    assert "restart markers" in reasons[os.path.join(root, "train", "cat", "img_bad_scan.jpg")]
    assert "restart markers" in reasons[os.path.join(root, "train", "coffee", "img_bad_cut.jpg")]
    warnings = [r.getMessage() for r in caplog.records if r.name == "fastkd.data"]
    assert len(warnings) == len(BAD)  # each file reported once, not once per epoch
    assert all(any(rel.split("/")[1] in w for w in warnings) for rel in BAD)
    # the totals of the split, for the run summary; they survive a resume
    summary = loader.corrupt_summary()
    assert summary["split"] == "train" and summary["policy"] == policy and summary["count"] == len(BAD)
    assert set(summary["files"]) == {os.path.join(root, "train", rel) for rel in BAD}
    resumed = build_loader(base_cfg(root, backend, batch_size=4, corrupt=policy), "train")
    resumed.load_state_dict(loader.state_dict())
    assert resumed.corrupt_summary() == summary


def test_damaged_scan_data_is_found(folder):
    """JPEGs with intact end markers but damaged scans: PIL decodes them without a word (libjpeg only
    warns), the marker check finds them; intact JPEGs of every kind pass it."""
    photo = Image.open(
        os.path.join(folder, "train", "cat", sorted(os.listdir(os.path.join(folder, "train", "cat")))[0])
    )
    good = open(photo.filename, "rb").read()
    for kind, data in damaged_scans(good).items():
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB")  # no error from the decoder
        assert "damaged JPEG scan data" in (encoded_problem(data) or ""), kind
    start, end = _scan_span(good)
    marker_inside = good[: (start + end) // 2] + b"\xff\x3f" + good[(start + end) // 2 + 2 :]  # no restart markers
    assert "marker 0xFF3F inside the compressed data" in encoded_problem(marker_inside)
    for mode in ("RGB", "L", "CMYK"):
        for kw in (
            {},
            {"progressive": True},
            {"restart_marker_blocks": 3},
            {"progressive": True, "restart_marker_rows": 1},
            {"optimize": True, "subsampling": 0},
        ):
            out = io.BytesIO()
            photo.convert(mode).save(out, "JPEG", quality=85, **kw)
            assert encoded_problem(out.getvalue()) is None, (mode, kw)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("keep", ["astronaut/img_bad_stream.jpg", "cat/img_bad_truncated.jpg"])
def test_corrupt_error_policy_names_the_file(folder, tmp_path, backend, keep):
    """One bad file, found by the decoder (stream) or by the cheap check (truncated): a clear error."""
    root = _corrupt_folder(folder, tmp_path)
    for rel in set(BAD) - {keep}:
        os.remove(os.path.join(root, "train", rel))
    loader = build_loader(base_cfg(root, backend, corrupt="error", shuffle=False), "train")
    with pytest.raises(CorruptImageError, match=os.path.basename(keep)):
        list(loader)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_all_corrupt_batch_is_never_empty(folder, tmp_path, backend):
    root = str(tmp_path / "allbad")
    shutil.copytree(os.path.join(folder, "train"), os.path.join(root, "train"))
    names = sorted(os.listdir(os.path.join(root, "train", "astronaut")))
    for name in names[:2]:  # the first batch (no shuffle, batch of 2) is entirely unreadable
        open(os.path.join(root, "train", "astronaut", name), "wb").write(b"broken")
    loader = build_loader(base_cfg(root, backend, batch_size=2, shuffle=False, corrupt="skip"), "train")
    first = next(iter(loader))
    assert first["index"].tolist() == [2] and first["images"].shape[0] == 1
