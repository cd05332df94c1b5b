"""Config: YAML recipes, typed overrides, unknown keys, saved resolved config."""

from __future__ import annotations

import pytest
import yaml

from fastkd.config import Config
from fastkd.config import ConfigError
from fastkd.config import load_config
from fastkd.config import parse_override

RECIPE = """
run: {name: t, output_dir: runs}
student: {name: deit_tiny_patch16_224, kwargs: {img_size: 32}}
teachers:
  - {name: deit_small_patch16_224, weights: t.safetensors}
method: {name: hinton, params: {temperature: 2.0}}
optim: {name: sgd, lr: 0.1, momentum: 0.8}
train: {epochs: 3, clip_grad: 1.0, ema: true}
distributed: {student: deepspeed, zero_stage: 2, teacher_placement: zero3}
"""


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    return p


def test_recipe_loads_typed(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    assert cfg.student.kwargs == {"img_size": 32}
    assert cfg.teachers[0].weights == "t.safetensors"
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.8
    assert cfg.train.epochs == 3 and cfg.train.ema is True and cfg.train.clip_grad == 1.0
    assert cfg.distributed.zero_stage == 2 and cfg.distributed.teacher_placement == "zero3"
    assert cfg.method.params == {"temperature": 2.0}
    # untouched sections keep their defaults
    assert cfg.schedule.name == "cosine" and cfg.train.accum_steps == 1


def test_overrides_are_typed(recipe):
    cfg = load_config(recipe, ["train.epochs=7", "optim.lr=1e-3", "train.clip_grad=null", "train.ema=false",
                               "teachers.0.weights=other.pth", "teachers.1.name=vit_small_patch16_224",
                               "method.params.alpha=0.25", "optim.betas=[0.9, 0.95]", "data.img_size=64",
                               "run.name=12"])
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)  # "1e-3" is a str in YAML 1.1
    assert cfg.train.clip_grad is None and cfg.train.ema is False
    assert [t.name for t in cfg.teachers] == ["deit_small_patch16_224", "vit_small_patch16_224"]
    assert cfg.teachers[0].weights == "other.pth"
    assert cfg.method.params == {"temperature": 2.0, "alpha": 0.25}
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.data.img_size == 64 if not isinstance(cfg.data, dict) else cfg.data["img_size"] == 64
    assert cfg.run.name == "12"  # str fields keep digits as text


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epoch=3", ["train.epoch", "valid keys of train", "epochs", "accum_steps"]),
        ("trian.epochs=3", ["trian", "valid keys", "train", "optim"]),
        ("train.epochs=three", ["train.epochs", "integer"]),
        ("train.ema=maybe", ["train.ema", "true or false"]),
        ("optim.lr=fast", ["optim.lr", "number"]),
        ("optim.name=adagradx", ["optim.name", "'adamw'", "'lamb'", "'sgd'"]),
        ("distributed.zero_stage=3", ["distributed.zero_stage", "0", "2"]),
        ("distributed.teacher_placement=shard", ["teacher_placement", "'replicate'", "'zero3'"]),
        ("train.epochs.x=1", ["train.epochs", "not a section"]),
        ("teachers.5.name=x", ["index 5", "1 items"]),
        ("train.epochs", ["key.sub=value"]),
        ("data.bogus=1", ["data.bogus", "valid keys of data"]),
    ],
)
def test_bad_overrides_name_the_key(recipe, override, words):
    with pytest.raises(ConfigError) as info:
        load_config(recipe, [override])
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


def test_unknown_key_in_recipe_lists_valid_ones(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: {epochs: 1, warmup: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key train\.warmup; valid keys of train: epochs, steps"):
        load_config(p)
    p.write_text("schedules: {}\n")
    with pytest.raises(ConfigError, match="valid keys: run, student, teachers, method, data"):
        load_config(p)


def test_safe_loader_refuses_python_objects(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("run: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_missing_recipe_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="no such file or shipped recipe"):
        load_config(tmp_path / "nope.yaml")


def test_parse_override_values():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=x=y") == (["a"], "x=y")


def test_resolved_config_round_trips(recipe, tmp_path):
    cfg = load_config(recipe, ["train.epochs=2", "data.scale=[0.5, 1.0]"])
    out = tmp_path / "resolved.yaml"
    cfg.dump(out)
    text = out.read_text()
    assert "!!python" not in text  # plain YAML, loadable by safe_load
    assert yaml.safe_load(text)["train"]["epochs"] == 2
    again = load_config(out)
    assert again == cfg
