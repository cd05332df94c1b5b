"""Typed run configuration: dataclasses, YAML recipes and ``key.sub=value`` overrides.

A recipe is a YAML mapping whose top-level keys are the fields of :class:`Config`::

    run:      {name: deit_s_hinton, output_dir: runs, seed: 0}
    student:  {name: deit_small_patch16_224}
    teachers: [{name: regnety_160, weights: /ckpt/regnety_160.pth}]
    method:   {name: hinton, params: {temperature: 4.0, alpha: 0.5}}
    data:     {...}                        # fastkd.data.DataConfig (passed to build_loader)
    optim:    {name: adamw, lr: 5.0e-4, weight_decay: 0.05, lr_base_batch: 512}
    schedule: {warmup_epochs: 5, min_lr: 1.0e-5}
    train:    {epochs: 300, batch_size: 128, clip_grad: null, label_smoothing: 0.1, drop_path: 0.1}
    distributed: {student: ddp, zero_stage: 0, teacher_placement: replicate}

Recipes are read with ``yaml.safe_load`` (a recipe cannot construct Python objects). Overrides on the
command line address any field by its dotted path, list items by index, and are parsed as YAML scalars
and then checked against the field's type: ``train.epochs=3 optim.lr=1e-3 teachers.0.weights=t.pth
method.params.temperature=2``. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import os
import types
import typing
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import Literal

import yaml

from fastkd.data.config import DataConfig


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message names the key."""


MAX_YAML_BYTES = 1 << 20  # a recipe is a few KB
MAX_YAML_NODES = 100_000  # nodes after alias expansion ("billion laughs" stops here, before memory runs out)
MAX_YAML_DEPTH = 64  # nesting of mappings/lists


def safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` with bounds: at most :data:`MAX_YAML_BYTES`, :data:`MAX_YAML_DEPTH` levels and
    :data:`MAX_YAML_NODES` nodes once aliases are expanded (aliases are counted before anything is built).
    ``what`` names the input in errors."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{what}: {len(text)} characters, more than the {MAX_YAML_BYTES} a recipe may have")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_size(node, what)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{what}: nested deeper than {MAX_YAML_DEPTH} levels") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: not valid YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()


def _check_yaml_size(root: yaml.Node, what: str) -> None:
    expanded: dict[int, int] = {}  # id(node) -> nodes it expands to (an alias reuses its anchor's node)

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{what}: nested deeper than {MAX_YAML_DEPTH} levels")
        if id(node) in expanded:
            return expanded[id(node)]
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(size(v, depth + 1) for v in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        if n > MAX_YAML_NODES:
            raise ConfigError(
                f"{what}: expands to more than {MAX_YAML_NODES} values (nested aliases?); a recipe is far smaller"
            )
        expanded[id(node)] = n
        return n

    size(root, 0)


# ---------------------------------------------------------------------------------------------------------------------
# sections


@dataclass
class RunConfig:
    """Where and how a run lives."""

    name: str = "run"  # run folder: <output_dir>/<name>
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    resume: str | None = None  # checkpoint file, or "auto" = latest checkpoint in the run folder
    overwrite: bool = False  # a fresh run may replace the checkpoints of an earlier run in the same folder
    trust_checkpoint: bool = False  # allow pickled (code-running) weights and DeepSpeed files; trusted files only


@dataclass
class ModelSpec:
    """A timm model by name; weights come from a local file (never downloaded)."""

    name: str = "deit_tiny_patch16_224"
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm create_model arguments (img_size, ...)


@dataclass
class MethodConfig:
    """A registered distillation method (``fastkd.methods.available()``) and overrides of its defaults."""

    name: str = "hinton"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimizer, created by timm's ``create_optimizer_v2`` (no weight decay on biases and norms)."""

    name: Literal["adamw", "sgd", "lamb", "adam", "lars", "momentum"] = "adamw"
    lr: float = 5e-4
    lr_base_batch: int | None = None  # linear scaling: lr * global_batch / lr_base_batch (DeiT: 512)
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd / lars
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw / lamb
    eps: float = 1e-8
    layer_decay: float | None = None  # layer-wise lr decay (fine-tuning recipes)
    decay_all: bool = False  # weight decay on every parameter (no bias/1-d/no_weight_decay() exemption; mmcls SGD)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup then cosine, constant, or multi-step decay (timm schedulers)."""

    name: Literal["cosine", "constant", "multistep"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    warmup_prefix: bool = False  # cosine over the steps after the warmup (MAE/DINO); False: over all steps (timm)
    per_epoch: bool = False  # update the LR once per epoch (DeiT's timm scheduler.step(epoch)); False: every step
    decay_epochs: list[float] = field(default_factory=lambda: [30.0, 60.0, 90.0])  # multistep: LR × decay_rate at each
    decay_rate: float = 0.1  # multistep


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 1
    steps: int | None = None  # optimizer steps in total; when set, stops there (overrides epochs for the schedule)
    batch_size: int | None = None  # per process, per micro-batch; when set, overrides data.batch_size
    accum_steps: int = 1  # micro-batches per optimizer step
    # images per optimizer step over all processes (a paper's global batch); when set, accum_steps is derived from
    # it at start (global_batch / (batch_size x processes), which must divide it), replacing train.accum_steps
    global_batch: int | None = None
    clip_grad: float | None = None  # max global grad norm
    ema: bool = False
    ema_decay: float = 0.9998
    drop_path: float = 0.0  # stochastic depth of the student
    label_smoothing: float = 0.0
    # auto: bf16 autocast on CUDA, fp32 on CPU; fp16: fp16 autocast and a dynamic loss scale (torch.amp.GradScaler:
    # 2^16 at start, x0.5 and the step skipped on an overflow, x2 after 2000 steps without one), as DeiT's NativeScaler
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    log_every: int = 10  # steps between JSONL records
    ckpt_every: int = 0  # steps between checkpoints (0: at the end of each epoch only)
    keep_ckpts: int = 2  # step checkpoints kept besides last.pt
    eval: bool = True  # evaluate on the val split at the end of each epoch
    eval_every: int = 1  # epochs
    progress: bool = True  # tqdm progress bar (rank 0)
    channels_last: bool = False
    # torch.compile the training forward (student, teachers with their taps, loss); off on CUDA too until the GPU
    # suite (benchmarks/gpu_suite.sh traincompile) shows it helps
    compile: bool = False


@dataclass
class DistributedConfig:
    """How the student and the teachers are placed across processes."""

    student: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[0, 1, 2] = 0  # DeepSpeed student: ZeRO stage of optimizer state / gradients
    teacher_placement: Literal["replicate", "zero3"] = "replicate"  # zero3: DeepSpeed stage-3 engine, no optimizer
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False  # DDP: needed when a method leaves some trainable extras unused
    timeout: float = 300.0  # seconds a collective waits for the other ranks before the run stops naming them


@dataclass
class TeacherCacheConfig:
    """``teacher_cache``: train the logit-distillation terms from a cache built by ``fastkd teacher-cache build``
    (the teachers are then not built). Set on the command line as ``teachers.cache=DIR`` and
    ``teachers.cache_wrap=true`` (aliases of ``teacher_cache.dir`` and ``teacher_cache.wrap``)."""

    dir: str | None = None
    wrap: bool = False  # a run longer than the cache replays its epochs again (epoch e reads e mod E)


@dataclass
class Config:
    """A whole run. Top-level keys of a recipe."""

    run: RunConfig = field(default_factory=RunConfig)
    student: ModelSpec = field(default_factory=ModelSpec)
    teachers: list[ModelSpec] = field(default_factory=list)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def dump(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# conversion: plain data <-> dataclasses, with type checks


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to annotation ``tp``; ``key`` names the field in errors."""
    if tp is Any:
        if dataclasses.is_dataclass(value):
            return value
        return copy.deepcopy(value)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c and type(value) is type(c):
                return c
        # "0" from a string-typed source never reaches here (overrides are parsed as YAML), but be lenient on
        # numbers given as strings for numeric literals
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(repr, choices))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must not be null (expected {_type_name(tp)})")
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} does not fit {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping with keys {', '.join(_field_names(tp))}; got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list ({_type_name(tp)}); got {value!r}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        if origin is tuple and len(args) > 1:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} items ({_type_name(tp)}); got {value!r}")
            return tuple(_convert(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
        items = [_convert(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping; got {value!r}")
        val_tp = (typing.get_args(tp) or (str, Any))[1]
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number; got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string; got {value!r}")
    return value


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls, data: dict[str, Any], prefix: str = ""):
    names = _field_names(cls)
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + str(k) for k in unknown)}; "
            f"valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in names:
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _convert(data[name], hints[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------------
# overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value parsed as a YAML scalar/flow value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    value = safe_yaml(raw, f"override {key}") if raw.strip() != "" else ""
    return _ALIASES.get(key, key).split("."), value


# overrides that name a setting where users look for it rather than where it lives
_ALIASES = {"teachers.cache": "teacher_cache.dir", "teachers.cache_wrap": "teacher_cache.wrap"}


def _set_path(tree: Any, path: list[str], value: Any, full: str) -> None:
    node = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        here = ".".join(path[: i + 1])
        if isinstance(node, list):
            try:
                idx = int(part)
            except ValueError:
                raise ConfigError(f"override {full}: {here} must be a list index") from None
            if idx == len(node) and last:
                node.append(value)
                return
            if idx == len(node):
                node.append({})
            if not -len(node) <= idx < len(node):
                raise ConfigError(f"override {full}: index {idx} out of range (the list has {len(node)} items)")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            parent = ".".join(path[:i])
            raise ConfigError(f"override {full}: {parent} is a value ({node!r}), not a section")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to plain recipe data (a copy is returned)."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(data, path, value, text)
    return data


# ---------------------------------------------------------------------------------------------------------------------
# loading


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A recipe file: an existing path, or the name of a recipe shipped in ``fastkd/recipes``."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    shipped = importlib.resources.files("fastkd") / "recipes" / f"{stem}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(r.name[:-5] for r in (importlib.resources.files("fastkd") / "recipes").iterdir()
                   if r.name.endswith(".yaml")) if (importlib.resources.files("fastkd") / "recipes").is_dir() else []
    hint = f"; shipped recipes: {', '.join(names)}" if names else ""
    raise ConfigError(f"--config {name_or_path}: no such file or shipped recipe{hint}")


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build and check a :class:`Config` from plain data."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping with keys {', '.join(_field_names(Config))}")
    cfg = _build(Config, data)
    try:
        cfg.data.validate()
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from exc
    check(cfg)
    return cfg


MAX_SEED = 2**32 - 1 - 4096  # numpy seeds are 32-bit; each rank adds its rank (at most 4096 ranks)


def check(cfg: Config) -> None:
    """The value checks that the types alone do not express; the first failure raises a :class:`ConfigError`
    naming the key and what it expects."""
    t, r, d = cfg.train, cfg.run, cfg.distributed

    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value!r}: expected {expected}")

    need(0 <= r.seed <= MAX_SEED, "run.seed", r.seed, f"an integer in [0, {MAX_SEED}]")
    need(bool(r.name.strip()) and r.name not in (".", "..") and "/" not in r.name and "\\" not in r.name,
         "run.name", r.name, "a folder name (no path separators)")
    need(bool(r.output_dir.strip()), "run.output_dir", r.output_dir, "a folder")
    need(t.epochs >= 1 or (t.steps is not None and t.epochs >= 0), "train.epochs", t.epochs,
         "an integer >= 1 (or set train.steps)")
    need(t.steps is None or t.steps >= 1, "train.steps", t.steps, "an integer >= 1, or null (train.epochs decides)")
    need(t.batch_size is None or t.batch_size >= 1, "train.batch_size", t.batch_size,
         "an integer >= 1, or null (data.batch_size decides)")
    need(t.accum_steps >= 1, "train.accum_steps", t.accum_steps, "an integer >= 1")
    need(t.global_batch is None or t.global_batch >= 1, "train.global_batch", t.global_batch,
         "an integer >= 1, or null (train.accum_steps decides)")
    need(t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1")
    need(t.ckpt_every >= 0, "train.ckpt_every", t.ckpt_every, "an integer >= 0 (0: at the end of each epoch)")
    need(t.eval_every >= 1, "train.eval_every", t.eval_every, "an integer >= 1")
    need(t.clip_grad is None or t.clip_grad > 0, "train.clip_grad", t.clip_grad, "> 0, or null (no clipping)")
    need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay, "a number in [0, 1)")
    need(0.0 <= t.drop_path < 1.0, "train.drop_path", t.drop_path, "a number in [0, 1)")
    need(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", t.label_smoothing, "a number in [0, 1)")
    need(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "a number > 0")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay, "a number >= 0")
    need(cfg.optim.lr_base_batch is None or cfg.optim.lr_base_batch >= 1, "optim.lr_base_batch",
         cfg.optim.lr_base_batch, "an integer >= 1, or null (no scaling)")
    need(cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs", cfg.schedule.warmup_epochs, "a number >= 0")
    need(cfg.schedule.warmup_steps is None or cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps",
         cfg.schedule.warmup_steps, "an integer >= 0, or null")
    need(d.timeout > 0, "distributed.timeout", d.timeout, "seconds > 0")
    need(not (t.amp == "fp16" and d.student == "deepspeed"), "train.amp", t.amp,
         "bf16 or fp32 with distributed.student=deepspeed (fastkd's fp16 loss scaler drives torch optimizers; it is "
         "not mapped to DeepSpeed's fp16 section), or distributed.student=ddp for fp16")


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML recipe (safe loader), apply ``key.sub=value`` overrides, and check every field."""
    data: dict[str, Any] = {}
    if recipe is not None:
        path = recipe_path(recipe)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"--config {recipe}: not a text file (a YAML recipe is UTF-8 text)") from None
        except OSError as exc:
            raise ConfigError(f"--config {recipe}: cannot read it: {exc.strerror or exc}") from None
        data = safe_yaml(text, f"--config {recipe}") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config {recipe}: a recipe must be a mapping, got {type(data).__name__}")
    cfg = from_dict(data)  # checks the recipe itself, so its errors name the recipe's keys
    if not overrides:
        return cfg
    return replace(cfg, list(overrides))


def replace(cfg: Config, overrides: list[str]) -> Config:
    """A new config: ``cfg`` with overrides applied (and checked)."""
    return from_dict(apply_overrides(cfg.to_dict(), overrides))


__all__ = [
    "Config",
    "ConfigError",
    "DistributedConfig",
    "MethodConfig",
    "ModelSpec",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TeacherCacheConfig",
    "TrainConfig",
    "apply_overrides",
    "check",
    "from_dict",
    "load_config",
    "parse_override",
    "recipe_path",
    "replace",
    "safe_yaml",
]
