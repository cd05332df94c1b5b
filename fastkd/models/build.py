"""Build timm models by name and load their weights from a local file; never download.

Formats (by file extension):

* ``.safetensors`` -- recommended: holds tensors only, nothing executes on load.
* ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` -- ``torch.load(weights_only=True)``: checkpoints are untrusted
  input, so no pickled code runs. A file that needs more than tensors and plain containers fails with an
  error saying so; pass ``trust_checkpoint=True`` (CLI ``--trust-checkpoint``) only for files you trust.
* ``.npz`` -- a state dict saved with ``numpy.savez`` (keys as in ``model.state_dict()``), or an original
  JAX/Flax (big_vision) ViT checkpoint, which timm's ``model.load_pretrained`` converts.

Checkpoint layouts: a plain state dict, or one nested under ``state_dict`` / ``model`` / ``teacher`` /
``student`` / ``module`` / ``net`` (DeiT, DINO full checkpoints: ``teacher`` first, the EMA model DINO
evaluates). Prefixes ``module.`` (DDP), ``_orig_mod.`` (torch.compile) and ``backbone.`` (DINO) are
stripped; when keys carry ``backbone.``, keys outside it (the SSL projection head) are dropped and
reported. The model family's timm ``checkpoint_filter_fn`` then adapts layouts (e.g. resamples position
embeddings to the model's image size), exactly as timm's pretrained loading does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "LoadReport", "build_model", "load_weights", "read_state_dict"]

_NESTED_KEYS = ("state_dict", "model", "teacher", "student", "module", "net", "state_dict_ema", "model_ema")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_TORCH_EXTS = (".pth", ".pt", ".bin", ".ckpt", ".tar")


class CheckpointError(ValueError):
    """A weights or training checkpoint file that cannot be used (missing, wrong format, keys or shapes, or not
    matching the run)."""


@dataclass
class LoadReport:
    """What :func:`load_weights` did."""

    path: str
    missing: list[str] = field(default_factory=list)  #: model keys the file lacked (only with strict=False)
    unexpected: list[str] = field(default_factory=list)  #: file keys the model lacks (only with strict=False)
    mismatched: list[str] = field(default_factory=list)  #: keys skipped for a shape mismatch (strict=False)
    dropped: list[str] = field(default_factory=list)  #: keys outside ``backbone.`` in an SSL checkpoint
    source_key: str | None = None  #: nested entry the state dict came from (e.g. "teacher")


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "") + f" [{len(keys)} total]"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(
    path: str | os.PathLike, *, trust_checkpoint: bool = False, checkpoint_key: str | None = None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a state dict from a local file (see the module docstring). Returns ``(state_dict, nested_key)``.

    ``.npz`` files in JAX/Flax layout are not state dicts: for those this raises :class:`CheckpointError`
    with ``big_vision`` in the message (``load_weights`` handles them through timm).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist. fastkd never downloads weights: download the checkpoint "
            "yourself (e.g. from the model's timm/Hugging Face page) and pass its local path (.safetensors "
            "recommended; .pth/.pt state dicts and timm .npz also work)"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    elif suffix == ".npz":
        import numpy as np

        try:
            with np.load(str(path), allow_pickle=False) as z:
                files = list(z.files)
                if any("." in f for f in files) and not any("/" in f for f in files):
                    obj = {k: torch.from_numpy(np.array(z[k])) for k in files}
                else:
                    raise CheckpointError(f"{path}: big_vision (JAX/Flax) .npz layout, not a state dict")
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable .npz archive ({exc})") from exc
    elif suffix in _TORCH_EXTS or suffix == "":
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=not trust_checkpoint)
        except Exception as exc:
            msg = str(exc).lower()
            if not trust_checkpoint and ("weights_only" in msg or "unpickl" in msg):
                raise CheckpointError(
                    f"{path}: the file holds pickled objects beyond tensors and containers, so it was not loaded "
                    "(checkpoints are untrusted input; torch.load(weights_only=True) refuses to run pickled code). "
                    "Convert it to .safetensors, or if you trust the file, pass trust_checkpoint=True "
                    f"(CLI: --trust-checkpoint). Detail: {str(exc).splitlines()[0]}"
                ) from exc
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    else:
        raise CheckpointError(
            f"{path}: unknown weights format {suffix!r}; expected .safetensors, .pth/.pt/.bin/.ckpt or .npz"
        )

    source = None
    if checkpoint_key is not None:
        if not isinstance(obj, Mapping) or checkpoint_key not in obj:
            keys = list(obj.keys()) if isinstance(obj, Mapping) else []
            raise CheckpointError(
                f"{path}: checkpoint_key={checkpoint_key!r} not found; top-level keys: {_fmt_keys(keys)}"
            )
        obj, source = obj[checkpoint_key], checkpoint_key
    else:
        for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
            if _is_state_dict(obj) or not isinstance(obj, Mapping):
                break
            for key in _NESTED_KEYS:
                if isinstance(obj.get(key), Mapping):
                    obj, source = obj[key], key if source is None else f"{source}.{key}"
                    break
            else:
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(
            f"{path}: no tensors found; top-level keys: {_fmt_keys([str(k) for k in obj.keys()])}. "
            "Pass checkpoint_key=... to pick the entry that holds the state dict"
        )
    return state, source


def _strip_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    dropped: list[str] = []
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
        if any(k.startswith("backbone.") for k in state):
            # mmcls classifier layout: the backbone and its classifier ("head.fc.*") are kept, the rest dropped
            keep = [k for k in state if k.startswith(("backbone.", "head.fc."))]
            dropped += [k for k in state if k not in keep]
            state = {k[len("backbone.") :] if k.startswith("backbone.") else k: state[k] for k in keep}
            changed = True
    return state, dropped


def _filter_fn(model: nn.Module):
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    trust_checkpoint: bool = False,
    checkpoint_key: str | None = None,
) -> LoadReport:
    """Load a local weights file into ``model`` (see the module docstring for formats and layouts).

    With ``strict=True`` (default) any missing, unexpected or shape-mismatched key is a
    :class:`CheckpointError` listing them. With ``strict=False`` those keys are skipped and listed in the
    returned :class:`LoadReport` (e.g. a classifier head of another size).
    """
    path = Path(path)
    try:
        state, source = read_state_dict(path, trust_checkpoint=trust_checkpoint, checkpoint_key=checkpoint_key)
    except CheckpointError as exc:
        if "big_vision" in str(exc) and hasattr(model, "load_pretrained"):
            try:
                model.load_pretrained(str(path))
            except Exception as inner:
                raise CheckpointError(
                    f"{path}: could not load the JAX/Flax .npz checkpoint into {type(model).__name__}: {inner}"
                ) from inner
            return LoadReport(path=str(path), source_key=None)
        raise
    state, dropped = _strip_prefixes(state)
    filter_fn = _filter_fn(model)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:
            raise CheckpointError(f"{path}: the checkpoint does not fit {type(model).__name__} ({exc})") from exc

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(
            f"{path} does not match {type(model).__name__}"
            + (f" (state dict taken from checkpoint[{source!r}])" if source else "")
            + f":\n  missing keys: {_fmt_keys(missing)}\n  unexpected keys: {_fmt_keys(unexpected)}"
            + f"\n  shape mismatches: {_fmt_keys(mismatched)}"
            + "\nCheck the model name and its arguments (num_classes, img_size, ...), or pass strict=False to skip "
            "the keys that do not fit."
        )
    bad = {m.split(" ")[0] for m in mismatched}
    loadable = {k: v for k, v in state.items() if k in own and k not in bad}
    model.load_state_dict(loadable, strict=False)
    return LoadReport(
        path=str(path),
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
        dropped=dropped,
        source_key=source,
    )


def build_model(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    strict: bool = True,
    trust_checkpoint: bool = False,
    checkpoint_key: str | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Create the timm model ``name`` with ``pretrained=False`` and load ``weights`` from a local file.

    Args:
        name: a timm model name (``deit_small_patch16_224``, ``vit_base_patch16_224.dino``, ``resnet50``...).
        weights: local weights file (``.safetensors``, ``.pth``/``.pt``, ``.npz``), or None for random init.
        num_classes: classifier size (0: no classifier, e.g. a self-supervised backbone); None keeps timm's.
        strict: refuse files whose keys/shapes do not match exactly (see :func:`load_weights`).
        trust_checkpoint: allow ``torch.load(weights_only=False)`` -- runs pickled code; trusted files only.
        checkpoint_key: nested entry holding the state dict (default: found automatically).
        **timm_kwargs: forwarded to :func:`timm.create_model` (``img_size``, ``depth``, ``drop_path_rate``...).

    The model's ``pretrained_cfg`` (mean, std, input size) is timm's for that name. The load report is
    kept as ``model.fastkd_load_report``.
    """
    import timm

    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a timm model name, got {name!r}")
    if timm_kwargs.pop("pretrained", False):
        raise ValueError("pretrained=True would download weights; pass weights=<local file> instead")
    if weights is not None and not Path(weights).is_file():
        read_state_dict(weights)  # raises the FileNotFoundError that explains how to provide a file
    if num_classes is not None:
        timm_kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"name={name!r} is not a timm model ({exc})") from exc
        raise
    if weights is not None:
        report = load_weights(
            model, weights, strict=strict, trust_checkpoint=trust_checkpoint, checkpoint_key=checkpoint_key
        )
        model.fastkd_load_report = report
    return model
