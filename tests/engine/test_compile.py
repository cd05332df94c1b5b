"""``train.compile``: every shipped ``*_tiny`` recipe trains through ``fastkd train ... train.compile=true``, and the
compiled forward of the methods whose ops are all traceable has no graph break.

Dynamo's tracing and AOTAutograd (where graph breaks and tracing errors come from) run here with the ``aot_eager``
backend: Inductor's C++ code generation would take minutes per recipe on a CPU test machine without telling more
about fastkd's code. The GPU suite runs the real (Inductor) compile.
"""

from __future__ import annotations

import importlib.resources
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from fastkd.cli import main
from tests.engine.test_cli import _common
from tests.engine.test_step_syncs import _trainer

TINY = sorted(r.name[:-5] for r in (importlib.resources.files("fastkd") / "recipes").iterdir()
              if r.name.endswith("_tiny.yaml"))


@pytest.fixture
def aot_eager(monkeypatch):
    """``nn.Module.compile`` with the ``aot_eager`` backend; a fresh Dynamo cache and counters."""
    original = torch.nn.Module.compile
    compiled = []

    def compile(self, **kwargs):
        compiled.append(type(self).__name__)
        return original(self, **{"backend": "aot_eager", **kwargs})

    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    torch._dynamo.reset()
    counters.clear()
    yield compiled
    torch._dynamo.reset()


def test_every_tiny_recipe_is_shipped():
    assert len(TINY) >= 8 and "ssta_tiny" in TINY and "attndistill_tiny" in TINY


@pytest.mark.parametrize("recipe", TINY)
def test_fastkd_train_with_compile(recipe, tmp_path, tiny_data, aot_eager):
    name = recipe[: -len("_tiny")]
    rc = main(["train", "--config", recipe, "train.compile=true", *_common(tmp_path, tiny_data, name, sizes=False)])
    assert rc == 0
    assert aot_eager, "train.compile=true compiled nothing"
    assert counters["stats"]["unique_graphs"] >= 1  # something really was compiled
    records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


# every method's whole training forward (student, teachers with their taps, the loss) traces into graphs without a
# break: a forward hook registered inside forward (attndistill, scalekd's ViT student until issue 12) was one, and
# timm's forward_intermediates replaced it. A steady-state step then runs compiled code only.
@pytest.mark.parametrize("recipe", TINY)
def test_compiled_step_has_no_graph_break(recipe, tmp_path, aot_eager):
    tr = _trainer(tmp_path, recipe, "train.compile=true")
    batches = iter(tr.train_loader)
    for _ in range(3):
        tr.train_step(batches)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 1
