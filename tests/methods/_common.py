"""Helpers shared by the method tests: a few optimizer steps on one batch, and the recipe checks (every shipped
recipe of a method parses, its ``method.params`` bind to the constructor, its tiny recipe builds and computes a
finite loss)."""

from __future__ import annotations

import copy

import timm
import torch

import fastkd.methods as M
from tests.utils import assert_error_budget


# ------------------------------------------------------------------------------- fp64 oracles, error budgets
def kl_magnitude(t_logits: torch.Tensor, s_logits: torch.Tensor, direction: str = "forward") -> torch.Tensor:
    """Per-row scale of the rounding error of KL(softmax(t) || softmax(s)) (``reverse``: of KL(P_s || P_t)) computed
    from logits: the magnitudes of the terms sum_j p_j (t_j - s_j) - lse_t + lse_s whose difference it is."""
    t, s = t_logits.detach().double(), s_logits.detach().double()
    p = torch.softmax(s if direction == "reverse" else t, -1)
    return (p * (t.abs() + s.abs())).sum(-1) + t.logsumexp(-1).abs() + s.logsumexp(-1).abs()


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """mean_b Σ_c −t_bc log softmax(z_b)_c written out (hard labels: one-hot ``targets``), and the magnitude of the
    terms it is a difference of, Σ_c t_bc (|z_bc| + |lse_b|) averaged over the batch: the scale of its rounding
    error."""
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    ce = -(targets * (logits - lse)).sum() / logits.shape[0]
    return ce, float((targets * (logits.abs() + lse.abs())).sum().detach()) / logits.shape[0]


def check_against_oracle(out: dict, grads: dict, reference, models: tuple, inputs: dict, parts=("loss",), *,
                         depth: int = 1) -> None:
    """The method's ``out[part]`` and parameter ``grads`` against the test's ``reference(*models, inputs)``, held to
    the error budget of tests/utils.py: the reference runs once in fp64 on copies of ``models`` (the oracle) and
    once in fp32 on other copies (what rounding alone costs). ``reference`` returns ``(values, magnitudes)``:
    dicts over ``parts`` (a magnitude may be None: the value itself), and its first model's gradients are
    compared by parameter name. ``depth``: the longest accumulation the method does its own way (N*d for an
    attention kernel), which sets the budget's floor."""
    results = {}
    for dtype in (torch.float32, torch.float64):
        copies = [copy.deepcopy(m) for m in models]
        for c in copies:
            c.to(dtype)
            for t in getattr(c, "teachers", ()):
                t.to(dtype)
        cast = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        values, magnitudes = reference(*copies, cast)
        values["loss"].backward()
        g = {n: p.grad.detach().clone() for n, p in copies[0].named_parameters() if p.grad is not None}
        results[dtype] = (values, magnitudes, g)
    (v32, _, g32), (v64, mag, g64) = results[torch.float32], results[torch.float64]
    for part in parts:
        m = mag.get(part)
        assert_error_budget(out[part], v32[part], v64[part], part, scale=None if m is None else float(m), depth=depth)
    assert set(grads) == set(g64), f"gradients for {set(grads) ^ set(g64)} on one side only"
    assert grads, "no gradients to compare"
    # rounding reaches each parameter's gradient through the whole backward: the floor is the largest gradient's
    scale = max(float(g.abs().max()) for g in g64.values())
    for n, g in grads.items():
        assert_error_budget(g, g32[n], g64[n], f"grad {n}", scale=scale, depth=depth)


def train_losses(method, batch, steps: int, lr: float, *, step_end: bool = False) -> list[float]:
    """Loss before each of ``steps`` AdamW steps on ``batch`` (trainable parameters only); ``step_end`` also
    calls ``method.on_step_end(step, 1000)`` after each step (EMA targets, ramps)."""
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = method(batch)["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step_end:
            method.on_step_end(step + 1, 1000)
    return losses


def recipe_check(official, tiny, batch):
    """Every official recipe validates and its method params bind to the constructor; the tiny recipe builds its
    models and method and computes a finite loss."""
    import inspect

    from fastkd.config import load_config
    from fastkd.data import DataConfig

    for name in official:
        cfg = load_config(name)
        DataConfig.from_any(cfg.data)
        M.available()  # imports every method module
        cls = M.base.REGISTRY[cfg.method.name]
        inspect.signature(cls).bind(student=None, teachers=[], **cfg.method.params)
    cfg = load_config(tiny)
    DataConfig.from_any(cfg.data)
    n = cfg.data.num_classes
    student = timm.create_model(cfg.student.name, **{"num_classes": n, **cfg.student.kwargs})
    teachers = [timm.create_model(t.name, **{"num_classes": n, **t.kwargs}) for t in cfg.teachers]
    method = M.build(cfg.method.name, student=student, teachers=teachers, **cfg.method.params).train()
    out = method(batch)
    assert torch.isfinite(out["loss"])
    return cfg, method


def check_method_recipes(method_name: str) -> None:
    """The tiny recipe builds and runs through the engine's builders; the ImageNet recipes parse and their
    method.params are all constructor arguments."""
    import glob
    import inspect
    import os

    from fastkd.config import load_config
    from fastkd.engine.builders import build_method
    from fastkd.engine.builders import build_student
    from fastkd.engine.builders import build_teachers
    from fastkd.methods.base import REGISTRY

    M.available()
    cls = REGISTRY[method_name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(os.path.dirname(M.__file__), "..",
                                                                                 "recipes", f"{method_name}_*.yaml")))
    assert f"{method_name}_tiny" in names and len(names) >= 2
    for name in names:
        cfg = load_config(name)
        assert cfg.method.name == method_name
        assert set(cfg.method.params) <= accepted, f"{name}: unknown params {set(cfg.method.params) - accepted}"
    cfg = load_config(f"{method_name}_tiny")
    n = cfg.data.num_classes or None
    student = build_student(cfg, n)
    method = build_method(cfg, student, build_teachers(cfg, n, cfg.data))
    size = cfg.data.img_size
    batch = {"images": torch.randn(2, 3, size, size)}
    if n:
        batch["labels"] = torch.randint(0, n, (2,))
    out = method(batch)
    assert torch.isfinite(out["loss"])
