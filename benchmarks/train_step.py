"""End-to-end training step: images/s, step time and peak memory of one full fastkd training step.

DeiT-S student <- DeiT-B teacher (bf16 autocast on GPU), through the engine's own step
(:meth:`fastkd.engine.trainer.Trainer.train_step`: forward of teacher and student, loss, backward, clipping,
AdamW step, LR schedule), for these variants:

===================  ====================================================================================
``none``             (a) no distillation: teacher forward + student CE step (the unavoidable cost)
``hinton``           (b) Hinton logit KD (``fastkd.methods``)
``attn1/4/12``       (c) SSTA-style head-level attention KD on the last 1, 4, 12 layers (+ CE), through
                     ``fastkd.functional.attention_kl`` with fastkd's kernels (Triton on CUDA)
``attn1/4/12_eager`` (d) the honest eager baseline, what a user would write: the same loss on materialised
                     ``[B, N, N]`` softmax maps of the selected heads only, in the autocast dtype (bf16 on GPU)
``ssta``             SSTA itself (``fastkd.methods``: 1 layer, 2 heads, teacher = TA), when registered
``attndistill``      (e) AttnDistill (``fastkd.methods``)
===================  ====================================================================================

Every variant runs eager and, with ``--compile on|both``, with ``train.compile=true`` (``compile`` in the config
column). Besides the timings, each configuration records ``host_syncs`` (the host synchronisations of one
steady-state step, :class:`fastkd.engine.syncs.SyncCounter`) and ``kd_overhead`` (step time over the no-KD step's
at the same batch, resolution, data and compile setting, minus 1).

``--recipes`` measures the shipped ``*_tiny`` recipes instead (their own models and method, synthetic batches, the
CPU CSV ``train_step_recipes_cpu.csv``); each recipe's no-KD step (provider ``<recipe>:no_kd``) is the same recipe
with ``method.name=supervised`` and no teacher.

Variants whose method is not registered in this build are reported as ``skipped`` rows, never errors. Each
configuration is timed with synthetic batches already on the device (``data=none``), then with the fastkd
loader reading a generated JPEG folder (``data=loader``), at each batch size and resolution. Rows (the long schema of
benchmarks/_common.py: ``step_time`` ms with p20/p80, ``images_per_s``, ``data_wait_frac`` and
``peak_extra_memory`` MiB above what was allocated before the timed steps) append to
``benchmarks/results/train_step_<device>.csv`` (device, CPU model, versions, commit, date on every row); a plot of
images/s is drawn from that CSV.

``--tiny`` is a CPU smoke mode (tiny ViTs, 32 px, 2 steps) that a test runs in seconds.

Usage::

    python benchmarks/train_step.py                        # everything: ~90 rows, too long for one 10-min command
    # on a GPU machine, one command per (resolution, data) keeps each under ~5 minutes:
    python benchmarks/train_step.py --img-size 224 --data none
    python benchmarks/train_step.py --img-size 384 --data none
    python benchmarks/train_step.py --img-size 224 --data loader --variants none hinton attn12 attn12_eager
    python benchmarks/train_step.py --variants none attn12 attn12_eager --batch 256 --img-size 224 --data none
    fastkd bench train --tiny --out /tmp/bench             # CPU smoke run, seconds
    python benchmarks/train_step.py --recipes --compile both   # the tiny recipes, eager and compiled (CPU CSV)

Rows that run out of GPU memory are recorded with ``status=oom`` (the eager loss at 384 px, batch 256, 12 layers
is expected to).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

ATTN_LAYERS = (1, 4, 12)
VARIANTS = ["none", "hinton"] + [f"attn{n}" for n in ATTN_LAYERS] + [f"attn{n}_eager" for n in ATTN_LAYERS] + [
    "ssta", "attndistill"]

FULL = {"student": "deit_small_patch16_224", "teacher": "deit_base_patch16_224", "kwargs": {}, "t_kwargs": {}}
TINY = {
    "student": "vit_tiny_patch16_224",
    "teacher": "vit_tiny_patch16_224",
    "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0},
    "t_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
}


# ---------------------------------------------------------------------------------------------------------------------
# the bench-local methods: (a) teacher forward + CE, (c)/(d) multi-layer SSTA-style attention KD


def _method_base():
    from fastkd.methods.base import Method

    return Method


def make_teacher_ce(student, teacher):
    """(a): the teacher's forward runs (its cost is unavoidable in any KD run) but only CE trains the student."""
    Method = _method_base()

    class TeacherForwardCE(Method):
        name = "none"

        def forward(self, batch):
            with torch.no_grad():
                self.teachers[0](batch["images"])
            logits = self.student(batch["images"])
            ce = F.cross_entropy(logits.float(), batch["labels"])
            return {"loss": ce, "ce": ce}

    return TeacherForwardCE(student, [teacher])


def eager_attention_kl(q_s, k_s, q_t, k_t, pairs, scale_s: float, scale_t: float) -> torch.Tensor:
    """(d): the loss as a user writes it: the selected heads' ``[B, P, N, N]`` maps materialised in the input dtype
    (bf16 under autocast), KL(teacher ‖ student) summed over keys, rows and heads, divided by B (``batchmean``)."""
    hs = [p[0] for p in pairs]
    ht = [p[1] for p in pairs]
    log_p_s = torch.log_softmax(scale_s * q_s[:, hs] @ k_s[:, hs].transpose(-1, -2), dim=-1)
    log_p_t = torch.log_softmax(scale_t * q_t[:, ht] @ k_t[:, ht].transpose(-1, -2), dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") / q_s.shape[0]


def make_attention_kd(student, teacher, layers: int, eager: bool):
    """(c)/(d): CE + mean over the last ``layers`` blocks of KL(teacher head ‖ student head) attention rows, student
    head h <- teacher head h·H_t/H_s (SSTA's head-level pairing, every student head), all rows; fastkd's
    ``attention_kl``, or (``eager``) :func:`eager_attention_kl`."""
    from fastkd.functional import attention_kl
    from fastkd.models import AttentionTaps

    Method = _method_base()

    class AttentionKD(Method):
        name = f"attn{layers}"

        def __init__(self, student, teachers):
            super().__init__(student, teachers)
            blocks = list(range(-layers, 0))
            self.s_taps = AttentionTaps(student, blocks=blocks, record="qk")
            self.t_taps = AttentionTaps(teachers[0], blocks=blocks, record="qk")
            h_s = student.blocks[0].attn.num_heads
            h_t = teachers[0].model.blocks[0].attn.num_heads
            self.pairs = [(h, h * h_t // h_s) for h in range(h_s)]
            self.layers = blocks

        def forward(self, batch):
            images = batch["images"]
            with torch.no_grad():
                self.teachers[0](images)
            logits = self.student(images)
            ce = F.cross_entropy(logits.float(), batch["labels"])
            attn = 0.0
            for b in self.layers:
                s, t = self.s_taps[b], self.t_taps[b]
                n = s.q.shape[2]
                if eager:
                    kl = eager_attention_kl(s.q, s.k, t.q.detach(), t.k.detach(), self.pairs, s.scale, t.scale)
                else:
                    kl = attention_kl(s.q, s.k, t.q.detach(), t.k.detach(), pairs=self.pairs, scale_s=s.scale,
                                      scale_t=t.scale, reduction="batchmean")
                attn = attn + kl / (n * len(self.pairs))
            attn = attn / len(self.layers)
            self.s_taps.clear()
            self.t_taps.clear()
            return {"loss": ce + attn, "ce": ce, "attn": attn}

    return AttentionKD(student, [teacher])


def _registered(name: str) -> bool:
    try:
        import fastkd.methods as methods

        return name in methods.available()
    except Exception:
        return False


def _layers(variant: str) -> int:
    """Distilled layers of an ``attn<n>[_eager]`` variant (0 for the others)."""
    n = variant[4:].split("_")[0]
    return int(n) if variant.startswith("attn") and n.isdigit() else 0


def build_method(variant: str, student, teacher, teacher_factory):
    """The method for a variant, or a string saying why it is skipped."""
    import fastkd.methods as methods

    if variant == "none":
        return make_teacher_ce(student, teacher)
    if _layers(variant):
        layers = _layers(variant)
        depth = len(student.blocks)
        if layers > depth:
            return f"student has {depth} blocks < {layers}"
        return make_attention_kd(student, teacher, layers, eager=variant.endswith("_eager"))
    if not _registered(variant):
        return f"method {variant} is not registered in this build"
    if variant == "hinton":
        return methods.build("hinton", student=student, teachers=[teacher])
    if variant == "ssta":
        return methods.build("ssta", student=student, teachers=[teacher, teacher_factory()], teacher_head=0, ta_head=1,
                             teacher_importance=None, ta_importance=None)
    if variant == "attndistill":
        return methods.build("attndistill", student=student, teachers=[teacher])
    return methods.build(variant, student=student, teachers=[teacher])


# ---------------------------------------------------------------------------------------------------------------------
# data


class SyntheticBatches:
    """Fixed random batches already on the device (``data=none``): the step without any loading cost."""

    backend = "synthetic"

    def __init__(self, batch: int, img_size: int, num_classes: int, device: torch.device, n: int = 2, views: int = 1):
        g = torch.Generator(device="cpu").manual_seed(0)

        def images():
            return torch.randn(batch, 3, img_size, img_size, generator=g).to(device)

        self.batches = [
            {"images": images() if views == 1 else [images() for _ in range(views)],
             "labels": torch.randint(0, num_classes, (batch,), generator=g).to(device)}
            for _ in range(n)
        ]
        self.num_classes = num_classes
        self.batch_size = batch

    def __len__(self):
        return 1 << 30

    def __iter__(self):
        i = 0
        while True:
            yield self.batches[i % len(self.batches)]
            i += 1


def jpeg_folder(root: Path, num_images: int) -> Path:
    """An ImageFolder ``root/train/<class>/*.jpg`` of photo-sized JPEGs (generated once, reused)."""
    from fastkd.data import make_jpeg_folder

    train = root / "train"
    marker = root / f".n{num_images}"
    if not marker.is_file():
        make_jpeg_folder(str(train), num_images)
        marker.write_text("ok")
    return root


# ---------------------------------------------------------------------------------------------------------------------
# measurement


def measure(variant: str, *, models: dict, batch: int, img_size: int, data: str, device: torch.device, steps: int,
            warmup: int, amp: str, workdir: Path, data_root: Path | None, num_classes: int,
            compile: bool = False) -> dict[str, Any]:
    """One configuration: build the pieces, run ``warmup`` + ``steps`` engine steps, return timings."""
    from fastkd.config import from_dict
    from fastkd.models import Teacher
    from fastkd.models import build_model

    torch.manual_seed(0)
    kw = dict(models["kwargs"], img_size=img_size)
    tkw = dict(models["t_kwargs"], img_size=img_size)
    student = build_model(models["student"], num_classes=num_classes, **kw)
    make_teacher = lambda: Teacher(build_model(models["teacher"], num_classes=num_classes, **tkw))  # noqa: E731
    teacher = make_teacher()
    method = build_method(variant, student, teacher, make_teacher)
    if isinstance(method, str):
        return {"status": "skipped", "note": method}
    cfg = from_dict({
        "run": {"name": f"{variant}_{batch}_{img_size}_{data}", "output_dir": str(workdir), "device": device.type,
                "overwrite": True},
        "method": {"name": "supervised"},
        "data": {"root": str(data_root or workdir), "img_size": img_size, "batch_size": batch, "num_workers":
                 min(8, os.cpu_count() or 1) if data == "loader" else 0, "backend": "auto", "num_classes": num_classes,
                 "scale": [0.08, 1.0]},
        "optim": {"name": "adamw", "lr": 5e-4},
        "train": {"steps": warmup + steps + 2, "clip_grad": 1.0, "amp": amp, "progress": False, "eval": False,
                  "log_every": 1 << 20, "compile": compile},
    })
    if data == "loader":
        from fastkd.data import build_loader
        from fastkd.engine.builders import data_config

        loader = build_loader(data_config(cfg, device), "train", 0, 1)
    else:
        loader = SyntheticBatches(batch, img_size, num_classes, device)
    return time_steps(cfg, method, loader, device, batch=batch, steps=steps, warmup=warmup)


def time_steps(cfg, method, loader, device: torch.device, *, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """``warmup`` untimed engine steps (compilation, first-batch work), ``steps`` timed ones, then one more step
    under :class:`fastkd.engine.syncs.SyncCounter` (not a logging step): timings, images/s, host syncs."""
    from fastkd.engine.syncs import SyncCounter
    from fastkd.engine.trainer import Trainer

    trainer = Trainer(cfg, method=method, train_loader=loader, console=False)
    try:
        it = iter(_cycle(loader))
        for _ in range(warmup):
            trainer.train_step(it)
        waits = []

        def step():
            waits.append(trainer.train_step(it)["data_wait"])

        with C.PeakMemory(device) as mem:
            timing = C.time_fn(step, device, warmup=0, reps=steps, wall=True)
        with SyncCounter() as syncs:
            trainer.train_step(it)
    finally:
        trainer.close()
    return {"status": "ok", "timing": timing, "img_per_s": batch / (timing.p50 / 1e3),
            "data_wait_frac": sum(waits) / max(timing.total_ms / 1e3, 1e-9), "peak_mib": mem.extra_mib,
            "host_syncs": len(syncs.calls), "sync_sites": sorted(set(syncs.calls))}


def result_rows(env: dict[str, Any], base: dict[str, Any], res: dict[str, Any]) -> list[dict[str, Any]]:
    """The CSV rows of one measured configuration (one per metric)."""
    if res["status"] != "ok":
        return [C.row(env, **base, status=res["status"], note=res["note"])]
    return [
        C.row(env, **base, metric="step_time", unit="ms", value=res["timing"]),
        C.row(env, **base, metric="images_per_s", unit="img/s", value=res["img_per_s"]),
        C.row(env, **base, metric="data_wait_frac", unit="1", value=res["data_wait_frac"]),
        C.row(env, **base, metric="peak_extra_memory", unit="MiB", value=res["peak_mib"]),
        C.row(env, **base, metric="host_syncs", unit="1/step", value=res["host_syncs"],
              note="; ".join(res["sync_sites"])[:300]),
    ]


def _no_kd(provider: str) -> bool:
    """The no-KD step: variant ``none``, or a recipe's ``<recipe>:no_kd``."""
    return provider == "none" or provider.endswith(":no_kd")


def kd_overhead_rows(env: dict[str, Any], measured: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict]:
    """``kd_overhead`` rows: step time / the no-KD step's at the same batch, resolution, data and compile
    setting, minus 1 (``measured``: (row base, result) pairs)."""

    def key(base):
        c = base["config"]
        return (base["provider"].split(":")[0] if base["mode"] == "recipes" else "",
                *(c.get(k) for k in ("batch", "img_size", "data", "compile")))

    ref = {key(b): r["timing"].p50 for b, r in measured if _no_kd(b["provider"]) and r["status"] == "ok"}
    return [C.row(env, **b, metric="kd_overhead", unit="1", value=r["timing"].p50 / ref[key(b)] - 1.0)
            for b, r in measured if r["status"] == "ok" and key(b) in ref and not _no_kd(b["provider"])]


def print_summary(measured: list[tuple[dict[str, Any], dict[str, Any]]], overhead_rows: list[dict]) -> None:
    """The closing table (what the GPU suite's traincompile stage shows): per configuration the median step time with
    p20-p80 (the run-to-run noise), the KD overhead over the no-KD step at the same settings, host syncs per step."""
    over = {(r["provider"], r["config"]): float(r["p50"]) for r in overhead_rows}
    print("\nstep summary (step time p50 [p20-p80] ms; kd_overhead = step time / the no-KD step's - 1)")
    for b, r in measured:
        c = b["config"]
        what = f"{b['provider']} b={c.get('batch')} {c.get('img_size')}px data={c.get('data')}"
        if r["status"] != "ok":
            print(f"  {what:<44} compile={c.get('compile')!s:<5} {r['status']}: {r['note'][:80]}")
            continue
        t = r["timing"]
        o = over.get((b["provider"], json.dumps(c, sort_keys=True)))
        print(f"  {what:<44} compile={c['compile']!s:<5} {t.p50:9.2f} [{t.p20:.2f}-{t.p80:.2f}] ms  "
              f"kd_overhead {'-' if o is None else f'{o:+.0%}':>6}  host syncs {r['host_syncs']}")


def shipped_tiny_recipes() -> list[str]:
    import importlib.resources

    root = importlib.resources.files("fastkd") / "recipes"
    return sorted(r.name[:-5] for r in root.iterdir() if r.name.endswith("_tiny.yaml"))


def measure_recipe(recipe: str, *, device: torch.device, steps: int, warmup: int, compile: bool,
                   workdir: Path, no_kd: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """A shipped recipe's step: its own models and method (built as ``fastkd train`` builds them), synthetic batches
    of its image and batch size on the device; ``no_kd``: the same student, data and optimizer with
    ``method.name=supervised``, no teacher and one view per image (an SSL recipe's own step sees every view).
    Returns (config, result)."""
    from fastkd.config import load_config
    from fastkd.config import recipe_path
    from fastkd.engine import builders

    cfg = load_config(recipe_path(recipe), [f"run.output_dir={workdir}", f"run.name={recipe}_{compile}",
                                            f"run.device={device.type}", "train.eval=false", "train.progress=false",
                                            f"train.steps={warmup + steps + 2}", f"train.log_every={1 << 20}",
                                            f"train.compile={str(compile).lower()}",
                                            *(["method.name=supervised", "method.params={}", "teachers=[]",
                                               "data.num_views=1"] if no_kd else [])])
    num_classes = cfg.data.num_classes or 10
    batch = cfg.train.batch_size or cfg.data.batch_size
    config = {"method": cfg.method.name, "student": cfg.student.name,
              "teacher": "+".join(t.name for t in cfg.teachers) or "none", "batch": batch,
              "img_size": cfg.data.img_size, "data": "none", "amp": cfg.train.amp, "steps": steps, "compile": compile}
    loader = SyntheticBatches(batch, cfg.data.img_size, num_classes, device, views=cfg.data.num_views)
    data_cfg = builders.data_config(cfg, device)
    student = builders.build_student(cfg, num_classes)
    teachers = builders.build_teachers(cfg, num_classes, data_cfg, dtype=builders.amp_dtype(cfg, device))
    method = builders.build_method(cfg, student, teachers)
    return config, time_steps(cfg, method, loader, device, batch=batch, steps=steps, warmup=warmup)


def _cycle(loader):
    while True:
        epoch_start = True
        for b in loader:
            epoch_start = False
            yield b
        if epoch_start:
            raise RuntimeError("the loader yielded no batch")
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(getattr(loader, "epoch", 0))


# ---------------------------------------------------------------------------------------------------------------------
# output


def plot(csv_path: Path, out: Path) -> Path | None:
    """Images/s per variant, one panel per (batch, img_size, data), from the newest rows of the CSV."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in C.read_rows(csv_path) if r["status"] == "ok" and r["metric"] == "images_per_s"]
    if not rows:
        return None
    latest: dict[tuple, dict] = {}
    for r in rows:  # the newest measurement of each configuration wins
        c = r["cfg"]
        latest[(r["mode"], r["provider"], c["batch"], c["img_size"], c["data"])] = r
    panels = sorted({(k[0], k[2], k[3], k[4]) for k in latest})
    cols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (mode, b, s, d) in zip(axes.flat, panels):
        sel = [r for k, r in latest.items() if (k[0], k[2], k[3], k[4]) == (mode, b, s, d)]
        sel.sort(key=lambda r: VARIANTS.index(r["provider"]) if r["provider"] in VARIANTS else 99)
        names = [r["provider"] for r in sel]
        vals = [float(r["p50"]) for r in sel]
        colors = ["#888" if n == "none" else ("#c44" if n.endswith("_eager") else "#36a") for n in names]
        ax.barh(names, vals, color=colors)
        ax.invert_yaxis()
        ax.set_title(f"{mode}: batch {b}, {s} px, data={d}", fontsize=9)
        ax.set_xlabel("images/s")
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    r = rows[-1]
    fig.suptitle(f"fastkd training step, {r['device']} / {r['cpu_model']}, commit {r['commit']} ({r['date'][:10]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="train_step.py", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny ViTs, 32 px, batch 4, 2 steps")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS, metavar="V",
                   help=f"variants to run (default all): {' '.join(VARIANTS)}")
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 128 256; tiny: 4)")
    p.add_argument("--img-size", nargs="+", type=int, default=None, help="resolutions (default 224 384; tiny: 32)")
    p.add_argument("--data", choices=("none", "loader", "both"), default="both",
                   help="none: synthetic batches on the device; loader: fastkd.data on generated JPEGs; both")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; tiny: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny: 1)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--workdir", default=None, help="scratch folder for the JPEGs and run folders (default: a temp dir)")
    p.add_argument("--compile", choices=("off", "on", "both"), default="off",
                   help="train.compile of every configuration: off (eager), on, or both (each twice)")
    p.add_argument("--recipes", nargs="*", default=None, metavar="R",
                   help="measure shipped *_tiny recipes instead of the variants (no names: all of them; "
                        "each beside its no-KD step: method supervised, no teacher)")
    p.add_argument("--no-plot", action="store_true")
    C.add_force_dirty(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_step.py: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    tiny = args.tiny
    models = TINY if tiny else FULL
    variants = args.variants or VARIANTS
    batches = args.batch or ([4] if tiny else [128, 256])
    sizes = args.img_size or ([32] if tiny else [224, 384])
    steps = args.steps or (2 if tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    datas = ["none", "loader"] if args.data == "both" else [args.data]
    num_classes = 10 if tiny else args.num_classes
    out = Path(args.out) if args.out else RESULTS
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    mode = "recipes" if args.recipes is not None else "tiny" if tiny else "full"
    csv_path = out / f"train_step_{'recipes_' if mode == 'recipes' else ''}{C.device_slug(device)}" \
                     f"{'_tiny' if mode == 'tiny' else ''}.csv"
    C.check_output(csv_path, args.force_dirty)
    env = C.stamp(device, ("timm",))
    if mode == "recipes":
        return run_recipes(args, device, env, csv_path, compiles)
    patch = models["kwargs"].get("patch_size", 16)
    rows: list[dict[str, Any]] = []
    measured: list[tuple[dict[str, Any], dict[str, Any]]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="fastkd_train_step_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        data_root = None
        if "loader" in datas:
            n = max(batches) * (steps + warmup + 1)
            data_root = jpeg_folder(work / "jpegs", n)
        for data in datas:
            for size in sizes:
                for batch in batches:
                    for variant, compiled in ((v, c) for v in variants for c in compiles):
                        try:
                            res = measure(variant, models=models, batch=batch, img_size=size, data=data,
                                          device=device, steps=steps, warmup=warmup, amp=args.amp,
                                          workdir=work / "runs", data_root=data_root, num_classes=num_classes,
                                          compile=compiled)
                        except torch.cuda.OutOfMemoryError:
                            res = {"status": "oom", "note": "CUDA out of memory"}
                        except Exception as exc:  # a broken variant must not hide the others
                            traceback.print_exc()
                            res = {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]}
                        finally:
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                        config = {"method": variant.split("_")[0], "student": models["student"],
                                  "teacher": models["teacher"], "batch": batch, "img_size": size, "data": data,
                                  "amp": args.amp, "steps": steps, "tokens": (size // patch) ** 2 + 1,
                                  "kernels": "eager-maps" if variant.endswith("_eager") else "default",
                                  "layers": _layers(variant), "compile": compiled}
                        base = dict(benchmark="train_step", op="train_step", provider=variant, mode=mode,
                                    config=config)
                        rows += result_rows(env, base, res)
                        measured.append((base, res))
                        failed |= res["status"] == "error"
                        _print(f"{variant} b={batch} {size}px data={data} compile={compiled}", res)
    over = kd_overhead_rows(env, measured)
    rows += over
    C.write_rows(csv_path, rows, append=True)
    print_summary(measured, over)
    print(f"\n{env['device']} / {env['cpu_model']}  torch {env['torch']}  triton {env['triton']}  "
          f"commit {env['commit']}")
    print(f"rows appended to {csv_path}")
    if not args.no_plot:
        png = plot(csv_path, csv_path.with_suffix(".png"))
        if png:
            print(f"plot: {png}")
    return 1 if failed else 0


def _print(what: str, res: dict[str, Any]) -> None:
    if res["status"] != "ok":
        print(f"{what}: {res['status']} {res['note']}", flush=True)
        return
    print(f"{what}: ok {res['img_per_s']:.1f} img/s {res['timing'].p50:.1f} ms, peak +{res['peak_mib']:.0f} MiB, "
          f"data wait {res['data_wait_frac']:.1%}, {res['host_syncs']} host syncs/step", flush=True)


def run_recipes(args, device: torch.device, env: dict[str, Any], csv_path: Path, compiles: list[bool]) -> int:
    """``--recipes``: the shipped tiny recipes, eager and/or compiled, with their KD overhead over supervised_tiny."""
    recipes = args.recipes or shipped_tiny_recipes()
    steps = args.steps or 5
    warmup = args.warmup if args.warmup is not None else 2
    rows: list[dict[str, Any]] = []
    measured: list[tuple[dict[str, Any], dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="fastkd_train_step_") as tmp:
        runs = [(r, kd, c) for r in recipes for kd in ((True,) if r == "supervised_tiny" else (False, True))
                for c in compiles]
        for recipe, kd, compiled in runs:
            provider = recipe if kd else f"{recipe}:no_kd"
            try:
                config, res = measure_recipe(recipe, device=device, steps=steps, warmup=warmup, compile=compiled,
                                             workdir=Path(args.workdir or tmp), no_kd=not kd)
            except Exception as exc:  # a broken recipe must not hide the others
                traceback.print_exc()
                config, res = {"compile": compiled}, {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]}
            base = dict(benchmark="train_step", op="train_step", provider=provider, mode="recipes", config=config)
            rows += result_rows(env, base, res)
            measured.append((base, res))
            _print(f"{provider} compile={compiled}", res)
    over = kd_overhead_rows(env, measured)
    rows += over
    C.write_rows(csv_path, rows, append=True)
    print_summary(measured, over)
    print(f"\n{env['device']} / {env['cpu_model']}  torch {env['torch']}  commit {env['commit']}")
    print(f"rows appended to {csv_path}")
    return 0 if all(r["status"] == "ok" for _, r in measured) else 1


if __name__ == "__main__":
    raise SystemExit(main())
