"""``train.compile``: every shipped ``*_tiny`` recipe trains through ``fastkd train ... train.compile=true``, and the
compiled forward of the methods whose ops are all traceable has no graph break (one compiled run per recipe serves
both checks).

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

TINY = sorted(r.name[:-5] for r in (importlib.resources.files("fastkd") / "recipes").iterdir()
              if r.name.endswith("_tiny.yaml"))


STEPS = 3  # a steady-state step after the first (tracing) and the second (recompiles on changed state)


def _compiled_run(recipe, tmp_path, data) -> dict:
    """``fastkd train --config <recipe> train.compile=true`` for 3 steps and an evaluation, with ``nn.Module.compile``
    on the ``aot_eager`` backend and a fresh Dynamo cache and counters: its exit code, run folder, the modules it
    compiled and Dynamo's counters afterwards."""
    original = torch.nn.Module.compile
    compiled = []

    def compile(self, **kwargs):
        compiled.append(type(self).__name__)
        return original(self, **{"backend": "aot_eager", **kwargs})

    name = recipe[: -len("_tiny")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, "compile", compile)
        torch._dynamo.reset()
        counters.clear()
        try:
            rc = main(["train", "--config", recipe, "train.compile=true",
                       *_common(tmp_path, data, name, sizes=False), f"train.steps={STEPS}"])
            return {"rc": rc, "run": tmp_path / name, "compiled": compiled,
                    "graph_break": dict(counters["graph_break"]),
                    "unique_graphs": counters["stats"]["unique_graphs"]}
        finally:
            torch._dynamo.reset()


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory, tiny_data):
    """The compiled run of a recipe, made once by the first test that asks for it: Dynamo's tracing is the cost
    of these tests, and the CLI check and the graph-break check below read the same run."""
    runs: dict[str, dict] = {}

    def get(recipe: str) -> dict:
        if recipe not in runs:
            runs[recipe] = _compiled_run(recipe, tmp_path_factory.mktemp(recipe), tiny_data)
        return runs[recipe]

    return get


def test_every_tiny_recipe_is_shipped():
    assert len(TINY) >= 8 and "ssta_tiny" in TINY and "attndistill_tiny" in TINY


@pytest.mark.parametrize("recipe", TINY)
def test_fastkd_train_with_compile(recipe, compiled_run):
    run = compiled_run(recipe)
    assert run["rc"] == 0
    assert run["compiled"], "train.compile=true compiled nothing"
    assert run["unique_graphs"] >= 1  # something really was compiled
    records = [json.loads(x) for x in (run["run"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


# every method's whole training forward (student, teachers with their taps, the loss) traces into graphs without a
# break: a forward hook registered inside forward (attndistill, scalekd's ViT student until issue 12) was one, and
# timm's forward_intermediates replaced it. A steady-state step (the third) then runs compiled code only, and so
# does the evaluation after it.
@pytest.mark.parametrize("recipe", TINY)
def test_compiled_step_has_no_graph_break(recipe, compiled_run):
    run = compiled_run(recipe)
    assert run["rc"] == 0
    assert run["graph_break"] == {}
    assert run["unique_graphs"] >= 1
