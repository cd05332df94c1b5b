"""Two CPU processes (gloo): DDP + replicated teacher, DeepSpeed ZeRO-2 student + ZeRO-3 teacher, launched by
``torchrun`` and by the ``deepspeed`` launcher, 3 training steps each."""

from __future__ import annotations

import json
import shutil
import socket
import sys

import pytest
import torch

from tests.engine.helpers import REPO
from tests.engine.helpers import run_cli
from tests.engine.helpers import run_cli_together

pytestmark = pytest.mark.distributed

VIT = "{img_size: 16, patch_size: 8, embed_dim: 16, depth: 2, num_heads: 2, mlp_ratio: 2.0}"
TVIT = "{img_size: 16, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2, mlp_ratio: 2.0}"

PLACEMENTS = {
    "ddp+replicate": ["distributed.student=ddp", "distributed.teacher_placement=replicate"],
    # SSTA: attention taps on both ZeRO-3 teachers (teacher + assistant) must still record Q/K
    "zero2+zero3": ["distributed.student=deepspeed", "distributed.zero_stage=2", "distributed.teacher_placement=zero3",
                    "method.name=ssta", "teachers.1.name=vit_tiny_patch16_224", f"teachers.1.kwargs={TVIT}",
                    "method.params={teacher_head: 0, ta_head: 1, teacher_importance: null, ta_importance: null}"],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(kind: str) -> list[str]:
    port = str(_port())
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                "-m", "fastkd"]
    exe = shutil.which("deepspeed")
    if exe is None:
        pytest.skip("the deepspeed launcher is not installed (pip install fastkd[deepspeed])")
    return [exe, "--num_gpus", "2", "--master_port", port, "--module", "fastkd"]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_two_process_training(launcher, placement, tmp_path, tiny_data):
    if "zero" in placement or launcher == "deepspeed":
        pytest.importorskip("deepspeed")
    if "zero" in placement:
        import fastkd.methods

        if "ssta" not in fastkd.methods.available():
            pytest.skip("method ssta is not registered in this build")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "student: {name: vit_tiny_patch16_224, kwargs: " + VIT + "}\n"
        "teachers: [{name: vit_tiny_patch16_224, kwargs: " + TVIT + "}]\n"
        "method: {name: hinton, params: {temperature: 2.0}}\n"
        "train: {steps: 3, log_every: 1, progress: false, eval: false, clip_grad: 1.0}\n"
    )
    args = ["train", "--config", str(recipe), f"run.output_dir={tmp_path}", "run.name=run", "run.device=cpu",
            f"data.root={tiny_data}", "data.img_size=16", "data.batch_size=4", "data.num_workers=0",
            "data.backend=torch", *PLACEMENTS[placement]]
    r = run_cli(args, cwd=REPO, launcher=_launcher(launcher), timeout=280)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    setup = next(r for r in records if r["kind"] == "setup")
    assert setup["world_size"] == 2 and setup["backend"] == "gloo"
    assert setup["global_batch"] == 8
    teachers = setup["teachers"]
    if placement == "zero2+zero3":
        assert setup["student"] == "deepspeed" and setup["zero_stage"] == 2
        assert len(teachers) == 2
        for teacher in teachers:
            assert teacher["partitioned"] is True
            # each rank holds about half of the teacher: its shard of every layer (padded to equal size) plus
            # the few loose tensors kept whole (cls_token, pos_embed)
            assert all(n < 0.6 * teacher["numel"] for n in teacher["local_numel"])
            assert sum(teacher["local_numel"]) >= teacher["numel"]
        assert (tmp_path / "run" / "deepspeed" / "step_00000003").is_dir()
    else:
        (teacher,) = teachers
        assert setup["student"] == "ddp"
        assert teacher["partitioned"] is False and teacher["local_numel"] == [teacher["numel"]] * 2
    train = [r for r in records if r["kind"] == "train"]
    if placement == "zero2+zero3":  # the attention terms were computed from the partitioned teachers' taps
        assert all(r["attn_teacher"] > 0 and r["attn_ta"] > 0 for r in train)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] for r in train)  # finite, not NaN
    state = torch.load(tmp_path / "run" / "ckpt" / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not any("teacher" in k for k in state["method"])


def test_deepspeed_student_resume_is_exact(tmp_path, tiny_data):
    """A DeepSpeed (ZeRO-1) student in one process: stop at step 2, --resume, equal to an uninterrupted run."""
    pytest.importorskip("deepspeed")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "student: {name: vit_tiny_patch16_224, kwargs: " + VIT + "}\n"
        "method: {name: supervised}\n"
        "train: {steps: 4, log_every: 1, progress: false, eval: false, clip_grad: 1.0}\n"
        "distributed: {student: deepspeed, zero_stage: 1}\n"
    )
    common = [f"run.output_dir={tmp_path}", "run.device=cpu", f"data.root={tiny_data}", "data.img_size=16",
              "data.batch_size=4", "data.num_workers=0", "data.backend=torch"]
    # the uninterrupted and the interrupted run are independent processes: side by side; then the resume
    train = ["train", "--config", str(recipe), *common]
    for r in run_cli_together([*train, "run.name=full"], [*train, "run.name=split", "train.ckpt_every=2",
                                                          "train.keep_ckpts=5"], cwd=REPO, timeout=200):
        assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli([*train, "run.name=split", "--resume", str(tmp_path / "split" / "ckpt" / "step_00000002.pt")],
                cwd=REPO, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    full = torch.load(tmp_path / "full" / "ckpt" / "last.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "ckpt" / "last.pt", weights_only=True)
    assert split["step"] == 4 and split["deepspeed_tag"] == "step_00000004"
    for k, v in full["method"].items():
        torch.testing.assert_close(split["method"][k], v, rtol=0, atol=0, msg=k)
