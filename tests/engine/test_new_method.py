"""Adding a method is its own file plus its recipe: a method module placed where the registry discovers
methods trains through ``fastkd train`` and evaluates through ``fastkd eval`` with no other change."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import fastkd.methods as methods
from fastkd.cli import main
from fastkd.methods.base import REGISTRY

METHOD_FILE = '''
"""``toykd``: cross-entropy plus the mean squared difference of student and teacher logits (a test method)."""

import torch
import torch.nn.functional as F

from fastkd.methods.base import Method
from fastkd.methods.base import register


@register("toykd")
class ToyKD(Method):
    def __init__(self, student, teachers=(), *, weight: float = 1.0):
        super().__init__(student, teachers)
        if len(self.teachers) != 1:
            raise ValueError(f"method=toykd needs exactly one teacher; got {len(self.teachers)}")
        self.weight = float(weight)

    def forward(self, batch):
        images = batch["images"]
        z_s = self.student(images)
        with torch.no_grad():
            z_t = self.teachers[0](images)
        ce = F.cross_entropy(z_s, batch["labels"])
        mse = F.mse_loss(z_s.float(), z_t.float())
        return {"loss": ce + self.weight * mse, "ce": ce, "mse": mse}
'''

VIT = "{img_size: 16, patch_size: 8, embed_dim: 16, depth: 2, num_heads: 2, mlp_ratio: 2.0}"
TVIT = "{img_size: 16, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2, mlp_ratio: 2.0}"


@pytest.fixture
def method_dir(tmp_path, monkeypatch):
    """A folder searched for method modules like ``fastkd/methods/`` itself (the registry's discovery path)."""
    folder = tmp_path / "methods"
    folder.mkdir()
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(folder)])
    yield folder
    for name in [n for n, cls in REGISTRY.items() if cls.__module__.startswith("fastkd.methods.toy")]:
        del REGISTRY[name]
    for module in [m for m in sys.modules if m.startswith("fastkd.methods.toy")]:
        del sys.modules[module]


def test_new_method_is_one_file_and_a_recipe(method_dir, tmp_path, tiny_data, capsys):
    assert "toykd" not in methods.available()
    (method_dir / "toykd.py").write_text(METHOD_FILE)
    recipe = tmp_path / "toykd_tiny.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        run: {{name: toykd, output_dir: {tmp_path}, device: cpu}}
        student: {{name: vit_tiny_patch16_224, kwargs: {VIT}}}
        teachers: [{{name: vit_tiny_patch16_224, kwargs: {TVIT}}}]
        method: {{name: toykd, params: {{weight: 0.5}}}}
        data: {{root: {tiny_data}, img_size: 16, batch_size: 8, num_workers: 0, backend: torch}}
        train: {{steps: 2, log_every: 1, progress: false}}
        """))
    assert "toykd" in methods.available()
    assert main(["train", "--config", str(recipe)]) == 0
    run = tmp_path / "toykd"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "toykd" and summary["steps"] == 2
    train = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:  # the method's own loss parts reach the log, and add up
        assert r["loss"] == pytest.approx(r["ce"] + 0.5 * r["mse"], rel=1e-6)
        assert r["mse"] > 0
    state = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    assert state["config"]["method"] == {"name": "toykd", "params": {"weight": 0.5}}
    capsys.readouterr()
    assert main(["eval", "--config", str(recipe), "--checkpoint", str(run / "ckpt" / "last.pt")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| top1 "))
    assert float(line.split("|")[2]) == pytest.approx(summary["top1"], abs=1e-6)


def test_method_module_that_fails_to_import_is_an_error(method_dir):
    (method_dir / "toybroken.py").write_text("import fastkd_no_such_dependency\n")
    with pytest.raises(ModuleNotFoundError, match="fastkd_no_such_dependency"):
        methods.available()


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"method.name='nope' is unknown; available: .*supervised"):
        methods.get("nope")
