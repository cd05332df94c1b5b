"""``train.amp=fp16``: fp16 autocast with torch's ``GradScaler`` (issue 13). An fp16 step's loss and gradients against
an fp64 reference; a step with non-finite gradients is skipped on the device (parameters and optimizer state
untouched), the scale halved, the run goes on and logging steps report it; the scale grows after its interval; no
host read outside logging steps; a resumed run continues with the exact scale and growth count."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastkd.config import ConfigError
from fastkd.config import load_config
from fastkd.config import recipe_path
from fastkd.distributed import DistInfo
from fastkd.engine import builders
from fastkd.engine.checkpoint import CheckpointError
from fastkd.engine.placement import TorchStudent
from fastkd.engine.syncs import SyncCounter
from fastkd.engine.trainer import Trainer
from tests.engine.helpers import MemoryLoader
from tests.utils import assert_close_rel
from tests.utils import tol

CPU = torch.device("cpu")


def _trainer(tmp_path, recipe: str = "hinton_tiny", *extra: str, steps: int = 8, log_every: int = 4) -> Trainer:
    cfg = load_config(recipe_path(recipe), [
        f"run.output_dir={tmp_path}", f"run.name={recipe}", "run.device=cpu", f"train.steps={steps}",
        f"train.log_every={log_every}", "train.eval=false", "train.clip_grad=1.0", "train.progress=false",
        "train.amp=fp16", *extra])
    loader = MemoryLoader(n=64, batch_size=4, num_classes=cfg.data.num_classes or 4, size=cfg.data.img_size)
    return Trainer(cfg, train_loader=loader, console=False)


def _inject_inf(tr: Trainer, when):
    """A gradient hook on one student parameter that makes its gradient +inf while ``when()`` holds (an overflow
    of the scaled fp16 backward, as the scaler sees it)."""
    p = next(p for p in tr.method.student.parameters() if p.requires_grad)
    return p.register_hook(lambda g: torch.full_like(g, math.inf) if when() else g)


def _state(tr: Trainer):
    params = [p.detach().clone() for p in tr.method.parameters()]
    opt = {i: {k: v.clone() for k, v in s.items()} for i, s in tr.optimizer.state_dict()["state"].items()}
    return params, opt


# ---------------------------------------------------------------------------------------------------------------------
# configuration


def test_fp16_config_scaler_defaults_and_refusals(monkeypatch):
    cfg = load_config(None, ["train.amp=fp16"])
    assert builders.amp_dtype(cfg, CPU) is torch.float16  # this torch has fp16 autocast on the CPU
    with builders.autocast(CPU, torch.float16):
        assert nn.Linear(3, 2)(torch.randn(2, 3)).dtype == torch.float16
    scaler = builders.grad_scaler(CPU, torch.float16)
    assert scaler.state_dict() == {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                   "growth_interval": 2000, "_growth_tracker": 0}  # torch's and timm's defaults
    assert builders.grad_scaler(CPU, torch.bfloat16) is None and builders.grad_scaler(CPU, None) is None
    assert builders.amp_dtype(load_config(None, ["train.amp=auto"]), CPU) is None  # auto keeps its meaning

    with pytest.raises(ConfigError, match="train.amp=.*'fp16'"):
        load_config(None, ["train.amp=half"])
    with pytest.raises(ConfigError, match="train.amp='fp16'.*distributed.student=deepspeed"):
        load_config(None, ["train.amp=fp16", "distributed.student=deepspeed"])
    monkeypatch.setattr(builders, "_autocasts_to", lambda device, dtype: False)  # a torch without CPU fp16 autocast
    with pytest.raises(ConfigError, match="train.amp=fp16: .* no fp16 autocast on cpu; use train.amp=bf16"):
        builders.amp_dtype(cfg, CPU)


# ---------------------------------------------------------------------------------------------------------------------
# numerics


class _MLP(nn.Module):
    """A method-shaped module: ``batch -> {"loss"}``, cross-entropy of a two-layer GELU MLP."""

    def __init__(self, d_in: int, hidden: int, classes: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, classes)

    def forward(self, batch):
        logits = self.fc2(F.gelu(self.fc1(batch["x"])))
        return {"loss": F.cross_entropy(logits, batch["y"])}


@pytest.mark.parametrize("accum", [1, 2])
def test_fp16_step_loss_and_gradients_match_fp64(accum):
    """Scaled fp16 backward, accumulation and unscaling give the true gradients to within fp16 rounding."""
    torch.manual_seed(0)
    d_in, hidden, classes, batch = 48, 64, 10, 13  # awkward sizes
    model = _MLP(d_in, hidden, classes)
    ref = _MLP(d_in, hidden, classes).double()
    ref.load_state_dict(model.state_dict())
    micro = [{"x": torch.randn(batch, d_in), "y": torch.randint(0, classes, (batch,))} for _ in range(accum)]

    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    placement = TorchStudent(model, opt, DistInfo(), accum_steps=accum, clip_grad=None,
                             scaler=builders.grad_scaler(CPU, torch.float16))
    losses = [placement.forward_backward(b, last=i == accum - 1, autocast=builders.autocast(CPU, torch.float16))
              ["loss"] for i, b in enumerate(micro)]
    grad_norm = placement.grad_norm()

    ref_losses = [ref({"x": b["x"].double(), "y": b["y"]})["loss"] for b in micro]
    torch.autograd.backward([r / accum for r in ref_losses])
    # the longest accumulation: fc2's inputs (hidden terms) or a weight gradient's sum over the batch
    t = tol(torch.float16, max(d_in, hidden, batch))
    for got, want, b in zip(losses, ref_losses, micro):
        with torch.no_grad():  # cross-entropy = logsumexp - z_y: its rounding is relative to those terms
            logits = ref.fc2(F.gelu(ref.fc1(b["x"].double())))
            terms = (logits.logsumexp(-1).abs() + logits.gather(1, b["y"][:, None]).abs()).mean()
        assert_close_rel(got.detach(), want.detach(), t, "loss", scale=terms)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        assert_close_rel(p.grad, q.grad, t, f"grad {name}")
    want_norm = torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in ref.parameters()]))
    assert_close_rel(grad_norm, want_norm, t, "grad_norm")
    assert placement.scaler.get_scale() == 2.0**16  # the gradients were scaled by 2^16 and unscaled


# ---------------------------------------------------------------------------------------------------------------------
# skipping, growth, host reads


def test_nonfinite_gradients_skip_the_step_halve_the_scale_and_training_goes_on(tmp_path):
    tr = _trainer(tmp_path)
    assert tr.amp == "fp16" and tr.placement.device_skip  # fused AdamW takes the scaler's found_inf
    scaler = tr.placement.scaler
    batches = iter(tr.train_loader)
    tr.train_step(batches)  # step 1
    assert scaler.get_scale() == 2.0**16
    before = _state(tr)
    hook = _inject_inf(tr, lambda: True)
    with SyncCounter() as c:
        tr.train_step(batches)  # step 2: gradients overflow; not a logging step
    hook.remove()
    assert c.calls == []  # skipped on the device
    after = _state(tr)
    for p, q in zip(after[0], before[0]):
        assert torch.equal(p, q)  # parameters unchanged
    for i, s in before[1].items():
        for k, v in s.items():
            assert torch.equal(after[1][i][k], v), k  # moments and step count unchanged
    assert scaler.get_scale() == 2.0**15  # halved
    tr.train_step(batches)  # step 3: finite, applied
    assert not all(torch.equal(p.detach(), q) for p, q in zip(tr.method.parameters(), before[0]))
    assert scaler.get_scale() == 2.0**15
    tr.train()  # steps 4..8 with logging steps 4 and 8: the skipped step is reported, nothing stops
    assert tr.step == 8
    records = [json.loads(line) for line in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    assert [r["skipped_steps"] for r in train] == [1, 0]
    assert [r["loss_scale"] for r in train] == [2.0**15, 2.0**15]
    assert all(math.isfinite(v) for v in (p.detach().abs().max().item() for p in tr.method.parameters()))


def test_scale_grows_after_the_interval_and_an_overflow_restarts_the_count(tmp_path):
    tr = _trainer(tmp_path, steps=12, log_every=100)
    scaler = tr.placement.scaler
    scaler.set_growth_interval(3)
    batches = iter(tr.train_loader)
    scales = []
    inject = {4}
    hook = _inject_inf(tr, lambda: tr.step + 1 in inject)
    for _ in range(7):
        tr.train_step(batches)
        scales.append(scaler.get_scale())
    hook.remove()
    s = 2.0**16
    # steps 1-3 good: doubled after the 3rd; step 4 overflows: halved, count restarts; steps 5-7 good: doubled
    assert scales == [s, s, 2 * s, s, s, s, 2 * s]


@pytest.mark.parametrize("recipe", ["hinton_tiny", "attndistill_tiny"])
def test_steady_fp16_step_has_no_host_sync_outside_logging_steps(tmp_path, recipe):
    tr = _trainer(tmp_path, recipe, steps=12)
    batches = iter(tr.train_loader)
    tr.train_step(batches)  # warm-up: optimizer state, the scaler's lazily created scale tensor
    per_step = []
    for _ in range(4):
        with SyncCounter() as c:
            tr.train_step(batches)
        per_step.append(c.calls)
    assert per_step[0] == [] and per_step[1] == [] and per_step[3] == [], per_step  # steps 2, 3, 5
    assert 1 <= len(per_step[2]) <= 2, per_step  # step 4 logs: reads the non-finite record


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints


def test_resume_restores_the_scale_and_its_growth_count_exactly(tmp_path):
    # growth interval 3, overflows injected at steps 2 and 6 (the scale stays <= 2^16, where the tiny model's fp16
    # backward does not overflow by itself): 1 counts one; 2 halves; 3-5 double at 5; 6 halves; 7, 8 count two.
    # Stopped after step 4 with two good steps counted, a resume that lost the count would not double at step 5.
    def run(name, *extra, stop_at=None, growth=True):
        tr = _trainer(tmp_path / name, "hinton_tiny", *extra)
        if growth:
            tr.placement.scaler.set_growth_interval(3)  # saved with the scaler's state
        hook = _inject_inf(tr, lambda: tr.step + 1 in (2, 6))
        tr.train(stop_at=stop_at)
        hook.remove()
        return tr

    full = run("full")
    assert full.placement.scaler.state_dict()["scale"] == 2.0**15
    assert full.placement.scaler.state_dict()["_growth_tracker"] == 2
    part = run("split", stop_at=4)
    saved = torch.load(tmp_path / "split" / "hinton_tiny" / "ckpt" / "last.pt", weights_only=True)
    assert saved["scaler"] == part.placement.scaler.state_dict()
    assert saved["scaler"]["scale"] == 2.0**15 and saved["scaler"]["_growth_tracker"] == 2
    resumed = run("split", "run.resume=auto", growth=False)  # the interval comes from the checkpoint
    assert resumed.step == 8
    assert resumed.placement.scaler.state_dict() == full.placement.scaler.state_dict()
    for (k, v), w in zip(resumed.method.state_dict().items(), full.method.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)


def test_resume_of_an_fp16_run_needs_its_scaler_state(tmp_path):
    tr = _trainer(tmp_path)
    tr.train(stop_at=2)
    path = tmp_path / "hinton_tiny" / "ckpt" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["scaler"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="run.resume=.*last.pt: holds no fp16 loss scale"):
        _trainer(tmp_path, "hinton_tiny", "run.resume=auto")


def test_optimizer_without_fused_kernel_skips_through_the_scaler(tmp_path):
    """LAMB has no fused kernel: ``GradScaler.step`` reads its found_inf and skips (timm NativeScaler's way)."""
    tr = _trainer(tmp_path, "hinton_tiny", "optim.name=lamb")
    assert not tr.placement.device_skip
    batches = iter(tr.train_loader)
    tr.train_step(batches)
    before = _state(tr)
    hook = _inject_inf(tr, lambda: True)
    tr.train_step(batches)  # checks the loss every step (finite), the scaler skips the update
    hook.remove()
    for p, q in zip(_state(tr)[0], before[0]):
        assert torch.equal(p, q)
    assert tr.placement.scaler.get_scale() == 2.0**15
    tr.train_step(batches)
    assert not all(torch.equal(p.detach(), q) for p, q in zip(tr.method.parameters(), before[0]))
