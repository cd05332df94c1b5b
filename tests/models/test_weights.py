"""Local weight loading: round trips per format, prefixed / nested checkpoints, clear errors; never downloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastkd.models import CheckpointError
from fastkd.models import build_model
from fastkd.models import load_weights
from tests.models._tiny import tiny_vit

X = None


def _same_outputs(a, b, size=32):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def _save(state, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif path.suffix == ".npz":
        np.savez(str(path), **{k: v.numpy() for k, v in state.items()})
    else:
        torch.save(state, str(path))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors", ".npz"])
def test_round_trip(tmp_path, suffix):
    src = tiny_vit()
    path = tmp_path / f"w{suffix}"
    _save(src.state_dict(), path)
    dst = tiny_vit(weights=path)
    assert dst.fastkd_load_report.missing == [] and dst.fastkd_load_report.unexpected == []
    assert _same_outputs(src, dst)
    assert not _same_outputs(src, tiny_vit())  # a fresh random init differs: the load did something


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"module." + k: v for k, v in sd.items()},  # DDP
        lambda sd: {"model": {"_orig_mod." + k: v for k, v in sd.items()}, "epoch": 3},  # compiled, nested (DeiT)
        lambda sd: {"state_dict": sd, "optimizer": {"lr": 0.1}},
    ],
    ids=["module", "nested-compiled", "state_dict"],
)
def test_prefixed_and_nested(tmp_path, wrap):
    src = tiny_vit()
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(src.state_dict()), str(path))
    assert _same_outputs(src, tiny_vit(weights=path))


def test_dino_style_checkpoint(tmp_path):
    """DINO full checkpoint: {'student', 'teacher'} with 'module.backbone.' keys and a projection head."""
    src = tiny_vit(num_classes=0)
    student = tiny_vit(num_classes=0)
    head = {"head.mlp.0.weight": torch.randn(8, 192), "head.last_layer.weight_g": torch.randn(16, 1)}

    def ckpt(sd):
        out = {"module.backbone." + k: v for k, v in sd.items()}
        out.update({"module." + k: v for k, v in head.items()})
        return out

    path = tmp_path / "dino.pth"
    torch.save({"student": ckpt(student.state_dict()), "teacher": ckpt(src.state_dict()), "epoch": 100}, str(path))
    model = tiny_vit(num_classes=0, weights=path)
    rep = model.fastkd_load_report
    assert rep.source_key == "teacher" and sorted(rep.dropped) == sorted(head)
    assert _same_outputs(src, model)
    model_s = tiny_vit(num_classes=0, weights=path, checkpoint_key="student")
    assert _same_outputs(student, model_s)


def test_resamples_position_embedding_through_timm_filter(tmp_path):
    src = tiny_vit(img_size=32)
    path = tmp_path / "w.safetensors"
    _save(src.state_dict(), path)
    big = tiny_vit(img_size=48, weights=path)  # timm's checkpoint_filter_fn resamples pos_embed 2x2 -> 3x3
    assert big.pos_embed.shape == (1, 10, 192)
    assert torch.equal(big.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_missing_file_says_how_to_provide_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        tiny_vit(weights=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="download"):
        build_model("vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(ValueError, match="not a timm model"):
        build_model("vit_nonexistent_model_xyz")


def test_mismatch_lists_keys(tmp_path):
    path = tmp_path / "w.pth"
    sd = tiny_vit(depth=2).state_dict()
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        tiny_vit(depth=3, num_classes=7, weights=path)
    msg = str(err.value)
    assert "missing keys: blocks.2." in msg and "extra.weight" in msg
    assert "head.weight (file (5, 192), model (7, 192))" in msg
    model = tiny_vit(depth=3, num_classes=7, weights=path, strict=False)  # skip what does not fit
    rep = model.fastkd_load_report
    assert "extra.weight" in rep.unexpected and any(k.startswith("blocks.2.") for k in rep.missing)
    assert rep.mismatched and rep.mismatched[0].startswith("head.weight")
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])


def test_untrusted_pickle_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    src = tiny_vit()
    torch.save({"model": src.state_dict(), "args": _Args()}, str(path))  # arbitrary object -> needs pickle
    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        tiny_vit(weights=path)
    assert _same_outputs(src, tiny_vit(weights=path, trust_checkpoint=True))


class _Args:
    lr = 0.1


def test_wrong_files(tmp_path):
    model = tiny_vit()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_weights(model, junk)
    txt = tmp_path / "w.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match="unknown weights format"):
        load_weights(model, txt)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, str(empty))
    with pytest.raises(CheckpointError, match="no tensors"):
        load_weights(model, empty)
    # an .npz that is not a state dict goes to timm's JAX/Flax loader, which rejects a foreign layout clearly
    foreign = tmp_path / "foreign.npz"
    np.savez(str(foreign), something=np.zeros(3))
    with pytest.raises(CheckpointError, match="JAX/Flax"):
        load_weights(model, foreign)
