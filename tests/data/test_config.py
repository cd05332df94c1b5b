"""DataConfig: dict and dataclass input, and errors that name the offending argument."""

from __future__ import annotations

import dataclasses

import pytest

from fastkd.data import DataConfig
from fastkd.data import build_loader
from tests.data.conftest import base_cfg


def test_from_dict_and_dataclass():
    cfg = DataConfig.from_any({"batch_size": 8, "scale": [0.2, 1.0], "mean": [0.5, 0.5, 0.5]})
    assert cfg.batch_size == 8 and cfg.scale == (0.2, 1.0) and cfg.mean == (0.5, 0.5, 0.5)
    assert DataConfig.from_any(cfg) == cfg and cfg is not DataConfig.from_any(cfg)

    @dataclasses.dataclass
    class Embedded:  # e.g. the engine's own copy of a subset of the fields
        img_size: int = 96
        backend: str = "torch"

    assert DataConfig.from_any(Embedded()).img_size == 96
    assert cfg.batch_size_for("val") == 8 and DataConfig(val_batch_size=3).batch_size_for("val") == 3
    assert DataConfig(img_size=224, crop_pct=0.875).resize_size() == 256


def test_every_field_is_documented():
    doc = DataConfig.__doc__
    missing = [f.name for f in dataclasses.fields(DataConfig) if f.name != "extra" and f"{f.name}" not in doc]
    assert not missing


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("backend", "opencv", "must be one of"),
        ("source", "lmdb", "must be one of"),
        ("dtype", "int8", "must be one of"),
        ("device", "tpu", "must be 'auto'"),
        ("batch_size", 0, "positive integer"),
        ("num_workers", -1, "non-negative"),
        ("crop_pct", 1.2, r"\(0, 1\]"),
        ("scale", (0.5, 0.1), "min <= max"),
        ("ratio", (0.0, 1.0), "0 < min"),
        ("hflip", 1.5, r"\[0, 1\]"),
        ("mixup", -0.1, ">= 0"),
        ("std", (0.2, 0.0, 0.2), "> 0"),
        ("mean", (0.5, 0.5), "3 values"),
        ("shard_policy", "wrap", "must be one of"),
        ("corrupt", "ignore", "must be one of"),
        ("randaugment_magnitude", 11, r"\[0, 10\]"),
        ("num_views", 0, "positive integer"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=rf"DataConfig\.{field}=.*{message}"):
        DataConfig.from_any({field: value})


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="unknown field.*'batchsize'"):
        DataConfig.from_any({"batchsize": 3})
    with pytest.raises(ValueError, match="DataConfig.num_views.*mixup"):
        DataConfig.from_any({"num_views": 2, "mixup": 0.8})
    with pytest.raises(TypeError, match="cfg: expected"):
        DataConfig.from_any(42)
    with pytest.raises(ValueError, match="split='test'"):
        build_loader(base_cfg(folder, "torch"), "test")
    with pytest.raises(ValueError, match="rank=2"):
        build_loader(base_cfg(folder, "torch"), "train", rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size=0"):
        build_loader(base_cfg(folder, "torch"), "train", rank=0, world_size=0)
    with pytest.raises(FileNotFoundError, match="DataConfig.root.*does not exist"):
        build_loader(base_cfg(folder + "/nope", "torch"), "train")
    with pytest.raises(FileNotFoundError, match="DataConfig.val_path"):
        build_loader(base_cfg(folder, "torch", val_path=folder + "/missing.txt", source="filelist"), "val")
    with pytest.raises(ValueError, match="DataConfig.root: empty"):
        build_loader({"backend": "torch"}, "train")
    with pytest.raises(ValueError, match="DataConfig.num_classes=2"):
        build_loader(base_cfg(folder, "torch", num_classes=2), "train")


def test_auto_backend_reports_its_choice(folder, caplog):
    import logging

    from fastkd.data import dali_available

    with caplog.at_level(logging.INFO, logger="fastkd.data"):
        loader = build_loader(base_cfg(folder, "auto"), "val")
    expected = "dali" if dali_available() else "torch"  # DALI is an optional extra
    assert loader.backend == expected
    assert any(f"data backend: {expected} (auto" in r.getMessage() for r in caplog.records)


def test_missing_dali_names_the_extra(folder, monkeypatch):
    """Without DALI (simulated: its import fails), backend='dali' says which extra to install and
    backend='auto' falls back to torchvision."""
    import sys

    from fastkd.data import dali_available

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now raises ImportError
    assert not dali_available()
    with pytest.raises(ImportError, match=r"backend='dali'.*pip install fastkd\[dali\]"):
        build_loader(base_cfg(folder, "dali"), "train")
    assert build_loader(base_cfg(folder, "auto"), "val").backend == "torch"
