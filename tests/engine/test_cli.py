"""``fastkd train`` / ``fastkd eval`` end to end on a generated ImageFolder, for every registered method."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import fastkd.methods as methods
from fastkd.cli import main
from fastkd.config import recipe_path
from tests.engine.helpers import REPO
from tests.engine.helpers import run_cli_together

VIT = "{img_size: 16, patch_size: 8, embed_dim: 16, depth: 2, num_heads: 2, mlp_ratio: 2.0}"
TVIT = "{img_size: 16, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2, mlp_ratio: 2.0}"


def _teacher(i: int) -> list[str]:
    return [f"teachers.{i}.name=vit_tiny_patch16_224", f"teachers.{i}.kwargs={TVIT}"]


# used when the method has no fastkd/recipes/<name>_tiny.yaml (shipped tiny recipes take precedence)
FALLBACK = {
    "hinton": _teacher(0),
    "deit": _teacher(0) + ["student.name=deit_tiny_distilled_patch16_224"],
    "ssta": _teacher(0) + _teacher(1) + ["method.params.teacher_head=0", "method.params.ta_head=1",
                                         "method.params.teacher_importance=null", "method.params.ta_importance=null"],
    "attndistill": _teacher(0),
}


def _common(tmp_path, data, name, *, sizes=True):
    """Overrides for a 2-step CPU run on the generated folder (``sizes``: also 16 px, batch 8, for models built
    here; a shipped tiny recipe keeps its own image and batch size)."""
    out = [f"run.output_dir={tmp_path}", f"run.name={name}", "run.device=cpu", "train.steps=2",
           "train.progress=false", "train.log_every=1", "train.eval=true", f"data.root={data}",
           "data.num_workers=0", "data.backend=torch"]
    if sizes:
        out += ["data.img_size=16", "data.batch_size=8", "train.batch_size=null"]
    return out


def _tiny_recipe(name):
    try:
        return recipe_path(f"{name}_tiny")
    except ValueError:
        return None


@pytest.mark.parametrize("name", methods.available())
def test_train_every_method(name, tmp_path, tiny_data, capsys):
    recipe = _tiny_recipe(name)
    extra: list[str] = []
    sizes = recipe is None
    if recipe is None:
        if name not in FALLBACK:
            pytest.skip(f"method {name} has no fastkd/recipes/{name}_tiny.yaml yet")
        empty = tmp_path / "empty.yaml"
        empty.write_text("{}\n")
        recipe = empty
        extra = [f"method.name={name}", "student.name=vit_tiny_patch16_224", f"student.kwargs={VIT}",
                 *FALLBACK[name]]
    rc = main(["train", "--config", str(recipe), *extra, *_common(tmp_path, tiny_data, name, sizes=sizes)])
    assert rc == 0
    run = tmp_path / name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == name
    assert any(k in summary for k in ("top1", "knn_top1"))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    state = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    assert state["step"] == 2 and state["config"]["method"]["name"] == name
    # `fastkd eval` of that checkpoint reproduces the run's final metric (top-1, or k-NN for SSL methods)
    capsys.readouterr()
    rc = main(["eval", "--config", str(recipe), *extra, *_common(tmp_path, tiny_data, name, sizes=sizes),
               "--checkpoint", str(run / "ckpt" / "last.pt")])
    assert rc == 0
    key = "top1" if "top1" in summary else "knn_top1"
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"| {key} "))
    assert float(line.split("|")[2]) == pytest.approx(summary[key], abs=1e-6)


def test_cli_errors_name_the_argument(tmp_path, tiny_data, capsys):
    empty = tmp_path / "e.yaml"
    empty.write_text("{}\n")
    assert main(["train", "--config", str(empty), "train.epoch=1"]) == 2
    assert "train.epoch" in capsys.readouterr().err
    assert main(["train", "--config", str(empty), "method.name=nosuch", *_common(tmp_path, tiny_data, "x")]) == 2
    err = capsys.readouterr().err
    assert "method.name='nosuch'" in err and "hinton" in err
    assert main(["eval", "--config", str(empty), "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["train", "--config", str(empty), "--print-config", "train.epochs=4", "optim.lr=0.01"]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 4" in printed and "lr: 0.01" in printed and "teacher_placement: replicate" in printed
    # options and overrides in any order
    assert main(["train", "--config", str(empty), "--resume", "--print-config", "train.epochs=5"]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 5" in printed and "resume: auto" in printed
    bad = tmp_path / "notackpt.pt"
    torch.save({"x": 1}, bad)
    rc = main(["train", "--config", str(empty), "--resume", str(bad), "method.name=supervised",
               "student.name=vit_tiny_patch16_224", f"student.kwargs={VIT}", *_common(tmp_path, tiny_data, "r")])
    assert rc == 2 and "not a fastkd training checkpoint" in capsys.readouterr().err


def test_python_m_fastkd_train_resume_eval(tmp_path, tiny_data):
    """The real entry point in a fresh process: train 2 steps, --resume to 4 (exact), eval the checkpoint."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "student: {name: vit_tiny_patch16_224, kwargs: " + VIT + "}\n"
        "method: {name: supervised}\n"
        "train: {steps: 4, log_every: 1, progress: false, ema: true, ema_decay: 0.5}\n"
    )
    common = _common(tmp_path, tiny_data, "a")[:3] + _common(tmp_path, tiny_data, "a")[4:]
    common_b = [c.replace("run.name=a", "run.name=b") for c in common]
    # a: uninterrupted, 4 steps. b: interrupted, a run whose process ends after 2 of 4 steps (ckpt_every=2 + kill is
    # simulated by a steps=4 run resumed from its step-2 checkpoint in a new process). Independent processes: run
    # side by side, as are the resume of b and the evaluations of a below.
    r, r_b = run_cli_together(["train", "--config", str(recipe), *common, "train.steps=4"],
                              ["train", "--config", str(recipe), *common_b, "train.ckpt_every=2", "train.keep_ckpts=5"],
                              cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| top1" in r.stdout  # summary table
    full = torch.load(tmp_path / "a" / "ckpt" / "last.pt", weights_only=True)
    assert r_b.returncode == 0, r_b.stderr[-3000:]
    step2 = tmp_path / "b" / "ckpt" / "step_00000002.pt"
    assert step2.is_file()
    last_a = str(tmp_path / "a" / "ckpt" / "last.pt")
    r, r_eval, r_ema = run_cli_together(["train", "--config", str(recipe), *common_b, "--resume", str(step2)],
                                        ["eval", "--config", str(recipe), *common, "--checkpoint", last_a],
                                        ["eval", "--config", str(recipe), *common, "--ema", "--checkpoint", last_a],
                                        cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    resumed = torch.load(tmp_path / "b" / "ckpt" / "last.pt", weights_only=True)
    assert resumed["step"] == 4
    for k, v in full["method"].items():
        torch.testing.assert_close(resumed["method"][k], v, rtol=0, atol=0, msg=k)
    # eval of the checkpoint gives the training run's final top-1
    r = r_eval
    assert r.returncode == 0, r.stderr[-3000:]
    top1 = float(next(line for line in r.stdout.splitlines() if "top1" in line).split("|")[2])
    assert top1 == pytest.approx(full["metrics"]["top1"], abs=0.01)
    r = r_ema
    assert r.returncode == 0, r.stderr[-3000:]
    ema_top1 = float(next(line for line in r.stdout.splitlines() if "top1" in line).split("|")[2])
    assert ema_top1 == pytest.approx(full["metrics"]["ema_top1"], abs=0.01)  # the run's own EMA evaluation
    assert sys.executable
