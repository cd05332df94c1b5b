"""Co-advise: involution layer and RedNet, the CivT student's token layout, loss vs a materializing reference."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F

import fastkd.methods as M
from fastkd.methods.coadvise import CoAdviseViT
from fastkd.models.involution import Involution
from fastkd.models.involution import RedNet
from tests.methods._common import check_against_oracle
from tests.methods._common import kl_magnitude
from tests.methods._common import recipe_check
from tests.methods._common import soft_ce
from tests.methods._common import train_losses
from tests.utils import assert_error_budget

NUM_CLASSES = 5
_INV_PARAMS = ("channels, kernel_size, stride, size", [(16, 3, 1, 6), (32, 7, 2, 8), (32, 3, 2, 10)])


def naive_involution(layer: Involution, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loop over kernel offsets, explicit zero padding: y[c,i,j] = Σ_uv W[g(c),uv,i,j] x[c,si+u-p,sj+v-p]."""
    b, c, h, w = x.shape
    k, s = layer.kernel_size, layer.stride
    p = (k - 1) // 2
    pooled = F.avg_pool2d(x, s, s) if s > 1 else x
    red = layer.conv1.conv(pooled)
    red = F.relu(F.batch_norm(red, layer.conv1.bn.running_mean, layer.conv1.bn.running_var, layer.conv1.bn.weight,
                              layer.conv1.bn.bias, training=False, eps=layer.conv1.bn.eps))
    wgt = layer.conv2.conv(red)  # [B, G·K², Ho, Wo], group-major
    ho, wo = wgt.shape[-2:]
    xp = F.pad(x, (p, p, p, p))
    out = x.new_zeros(b, c, ho, wo)
    gc = layer.group_channels
    for ch in range(c):
        g = ch // gc
        for u in range(k):
            for v in range(k):
                patch = xp[:, ch, u:u + s * (ho - 1) + 1:s, v:v + s * (wo - 1) + 1:s]
                out[:, ch] += wgt[:, g * k * k + u * k + v] * patch
    return out


@pytest.mark.parametrize(*_INV_PARAMS)
def test_involution_matches_naive(channels, kernel_size, stride, size):
    """The layer (fp32) against the naive loop run in fp64 on a copy of the layer, output and input gradient,
    held to a small multiple of the naive loop's own fp32 rounding error (tests/utils.py assert_error_budget)."""
    layer = Involution(channels, kernel_size, stride).eval()
    with torch.no_grad():  # non-trivial BN statistics
        layer.conv1.bn.running_mean.uniform_(-0.2, 0.2)
        layer.conv1.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, channels, size, size, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, channels, size // stride, size // stride)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    refs = {}
    for dtype in (torch.float32, torch.float64):
        xd = x.detach().to(dtype).requires_grad_(True)
        ref = naive_involution(copy.deepcopy(layer).to(dtype), xd)
        refs[dtype] = (ref, torch.autograd.grad(ref, xd, gy.to(dtype))[0])
    (y32, gx32), (y64, gx64) = refs[torch.float32], refs[torch.float64]
    assert_error_budget(y, y32, y64, "involution")
    assert_error_budget(gx, gx32, gx64, "grad x")


def test_rednet_matches_official_sizes():
    # official RedNet parameter counts (d-li14/involution README): RedNet-50 15.54M, RedNet-101 25.65M
    with torch.device("meta"):
        n50 = sum(p.numel() for p in RedNet(50).parameters())
        n101 = sum(p.numel() for p in RedNet(101).parameters())
    assert round(n50 / 1e6, 2) == 15.54 and round(n101 / 1e6, 2) == 25.65
    m = timm.create_model("rednet26", num_classes=NUM_CLASSES, widths=(32, 64, 64, 64), stem_channels=32,
                          group_channels=8)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)
    assert m.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def tiny_vit(patch_size=8, img_size=32, **kw):
    return timm.create_model("vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size, depth=2, embed_dim=32,
                             num_heads=2, num_classes=NUM_CLASSES, **kw)


def tiny_teachers():
    conv = timm.create_model("resnet10t", num_classes=NUM_CLASSES)
    inv = timm.create_model("rednet26", num_classes=NUM_CLASSES, widths=(32, 64, 64, 64), stem_channels=32,
                            group_channels=8, layers=(1, 1, 1, 1))
    return [conv, inv]


def make_batch(b=4, soft=False):
    g = torch.Generator().manual_seed(3)
    batch = {"images": torch.randn(b, 3, 32, 32, generator=g),
             "labels": torch.randint(0, NUM_CLASSES, (b,), generator=g)}
    if soft:
        t = torch.rand(b, NUM_CLASSES, generator=g)
        batch["targets"] = t / t.sum(1, keepdim=True)
    return batch


def test_student_token_layout_at_224():
    vit = timm.create_model("vit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2, num_classes=NUM_CLASSES)
    s = CoAdviseViT(vit)
    assert s.pos_embed.shape == (1, 199, 32)  # CLS + conv token + inv token + 14×14 patches
    assert s.conv_stem[-1].kernel_size == (8, 8) and s.conv_stem[-1].stride == (8, 8)
    assert s.conv_stem[0].conv.kernel_size == (7, 7) and s.conv_stem[0].conv.stride == (2, 2)


def reference_loss(student: CoAdviseViT, conv_teacher, inv_teacher, batch, lambdas=(1.0, 1.0, 1.0), taus=(1.0, 1.0),
                   smoothing=0.1):
    """METHODS.md §3.3–3.4, with the token sequence assembled by hand from the student's parts. Returns the weighted
    parts and the magnitudes of the terms each is a difference of."""
    x = batch["images"]
    B = x.shape[0]
    e_conv = student.conv_stem(x).flatten(2).transpose(1, 2)
    e_inv = student.inv_stem(x).flatten(2).transpose(1, 2)
    tok = torch.cat([student.cls_token.expand(B, -1, -1), e_conv.mean(1, keepdim=True), e_inv.mean(1, keepdim=True),
                     e_conv + e_inv], dim=1) + student.pos_embed
    for blk in student.blocks:
        tok = blk(tok)
    tok = student.norm(tok)
    z_cls, z_conv, z_inv = student.head(tok[:, 0]), student.head_conv(tok[:, 1]), student.head_inv(tok[:, 2])
    with torch.no_grad():
        z_c, z_i = conv_teacher(x), inv_teacher(x)

    def log_sm(z):
        return z - torch.logsumexp(z, 1, keepdim=True)

    if "targets" in batch:
        targets = batch["targets"]
    else:  # (1 − ε)·one-hot + ε/C
        targets = (1 - smoothing) * F.one_hot(batch["labels"], NUM_CLASSES).to(z_cls.dtype) + smoothing / NUM_CLASSES
    ce, ce_mag = soft_ce(z_cls, targets)

    def kl(z_t, z_s, tau):
        p = torch.softmax(z_t / tau, 1)
        value = tau * tau * (p * (torch.log(p) - log_sm(z_s / tau))).sum() / B
        return value, tau * tau * float(kl_magnitude(z_t / tau, z_s / tau).sum()) / B

    kd_conv, conv_mag = kl(z_c, z_conv, taus[0])
    kd_inv, inv_mag = kl(z_i, z_inv, taus[1])
    values = {"ce": lambdas[0] * ce, "kd_conv": lambdas[1] * kd_conv, "kd_inv": lambdas[2] * kd_inv}
    values["loss"] = values["ce"] + values["kd_conv"] + values["kd_inv"]
    magnitudes = {"ce": lambdas[0] * ce_mag, "kd_conv": lambdas[1] * conv_mag, "kd_inv": lambdas[2] * inv_mag}
    magnitudes["loss"] = sum(magnitudes.values())
    return values, magnitudes


@pytest.mark.parametrize("soft, lambdas, taus", [(True, (1.0, 1.0, 1.0), (1.0, 1.0)),
                                                 (False, (0.5, 2.0, 0.7), (2.0, 3.0))])
def test_loss_and_grads_match_reference(soft, lambdas, taus):
    """The method (fp32) against the reference above run in fp64 on copies of the student and the teachers: every
    part, every student gradient."""
    teachers = tiny_teachers()
    method = M.build("coadvise", student=tiny_vit(), teachers=teachers, stem_channels=32, lambda_cls=lambdas[0],
                     lambda_conv=lambdas[1], lambda_inv=lambdas[2], tau_conv=taus[0], tau_inv=taus[1])
    method.train()
    batch = make_batch(soft=soft)
    out = method(batch)
    assert set(out) == {"loss", "ce", "kd_conv", "kd_inv"}
    torch.testing.assert_close(out["loss"], out["ce"] + out["kd_conv"] + out["kd_inv"])  # a sum of parts
    out["loss"].backward()
    g = {n: p.grad.detach().clone() for n, p in method.student.named_parameters() if p.grad is not None}
    check_against_oracle(out, g, functools.partial(reference_loss, lambdas=lambdas, taus=taus),
                         (method.student, *teachers), batch, parts=("loss", "ce", "kd_conv", "kd_inv"))
    for n in ("inv_stem.0.1.conv2.conv.weight", "conv_stem.0.conv.weight", "head_conv.weight", "head_inv.weight",
              "cls_token", "pos_embed"):
        assert g[n].abs().sum() > 0, n


def test_extras_in_state_dict_teachers_out():
    teachers = tiny_teachers()
    method = M.build("coadvise", student=tiny_vit(), teachers=teachers, stem_channels=32)
    keys = method.state_dict().keys()
    assert any(k.startswith("student.inv_stem.") for k in keys)
    assert any(k.startswith("student.conv_stem.") for k in keys)
    assert "student.head_inv.weight" in keys and "student.pos_embed" in keys
    assert not any("patch_embed" in k for k in keys)  # the linear patch projection is gone
    ids = {id(p) for p in method.parameters()}
    assert not any(id(p) in ids for t in teachers for p in t.parameters())


def test_predict_is_mean_of_three_heads():
    method = M.build("coadvise", student=tiny_vit(), teachers=tiny_teachers(), stem_channels=32).eval()
    x = make_batch()["images"]
    heads = method.student.forward_heads(x)
    torch.testing.assert_close(method.predict(x), sum(heads) / 3)


def test_involution_stem_runs_fp32_under_autocast():
    method = M.build("coadvise", student=tiny_vit(), teachers=tiny_teachers(), stem_channels=32)
    seen = {}
    method.student.inv_stem.register_forward_hook(lambda m, i, o: seen.__setitem__("inv", o.dtype))
    method.student.conv_stem.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        method.student.embed(make_batch()["images"])
    assert seen == {"inv": torch.float32, "conv": torch.bfloat16}


def test_steps_reduce_loss():
    method = M.build("coadvise", student=tiny_vit(), teachers=tiny_teachers(), stem_channels=32)
    method.train()
    batch = make_batch(soft=True)
    losses = train_losses(method, batch, steps=4, lr=2e-3)
    assert losses[-1] < losses[0]


def test_bad_configurations():
    teachers = tiny_teachers()
    with pytest.raises(ValueError, match="exactly 2 teachers"):
        M.build("coadvise", student=tiny_vit(), teachers=teachers[:1], stem_channels=32)
    with pytest.raises(ValueError, match="patch size"):
        M.build("coadvise", student=tiny_vit(patch_size=7, img_size=28), teachers=teachers, stem_channels=32)
    with pytest.raises(ValueError, match="stem_channels"):
        M.build("coadvise", student=tiny_vit(), teachers=teachers, stem_channels=40)
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1,
                                  embed_dim=32, num_heads=2, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="one CLS token"):
        M.build("coadvise", student=distilled, teachers=teachers, stem_channels=32)
    with pytest.raises(TypeError, match="VisionTransformer"):
        M.build("coadvise", student=teachers[0], teachers=tiny_teachers(), stem_channels=32)
    with pytest.raises(ValueError, match="tau_inv"):
        M.build("coadvise", student=tiny_vit(), teachers=teachers, stem_channels=32, tau_inv=0)
    method = M.build("coadvise", student=tiny_vit(), teachers=teachers, stem_channels=32)
    with pytest.raises(ValueError, match="built for 32×32"):
        method({"images": torch.randn(2, 3, 48, 48), "labels": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="channels"):
        Involution(24, 3)


# ------------------------------------------------------------------------------------------------------------------
# recipes


def test_recipes():
    import fastkd.models.involution  # noqa: F401  (registers rednet* with timm)

    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 10, (4,), generator=g)}
    cfg, method = recipe_check(["coadvise_s_in1k"], "coadvise_tiny", batch)
    official = __import__("fastkd.config", fromlist=["load_config"]).load_config("coadvise_s_in1k")
    assert [t.name for t in official.teachers] == ["regnety_040", "rednet101"] and official.train.amp == "fp32"


def test_stem_init_kaiming_fan_in_on_every_conv():
    """Official ``init_weight``: ``nn.init.kaiming_normal_(m.weight)`` (fan-in, gain √2) on every Conv2d of both stems,
    the involution's 1×1 convs and the patch projections included. The sample std of each conv's weights is held
    to its sampling error (6 standard errors of a std estimate, 1/√(2n))."""
    torch.manual_seed(0)
    s = CoAdviseViT(timm.create_model("vit_tiny_patch16_224", depth=1, embed_dim=48, num_heads=2,
                                      num_classes=NUM_CLASSES))
    convs = [m for stem in (s.conv_stem, s.inv_stem) for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) >= 8 and any(c.kernel_size == (1, 1) for c in convs)
    for c in convs:
        w = c.weight.detach().double()
        fan_in = w[0].numel()
        ratio = float(w.std()) / (2.0 / fan_in) ** 0.5
        assert abs(ratio - 1.0) < 6.0 / (2 * w.numel()) ** 0.5, (c, ratio)


@pytest.mark.parametrize("layout", ["mmcls", "authors", "authors_ddp"])
def test_rednet_checkpoint_layouts_load(tmp_path, layout):
    """An mmcls RedNet checkpoint ({"state_dict": {"backbone.*", "head.fc.*"}}) and the Co-advise authors' teacher
    file ({"model": ...} with the same names, optionally DDP's "module." prefix) load into timm's rednet with the
    classifier."""
    from fastkd.models import build_model

    kw = dict(num_classes=NUM_CLASSES, widths=(32, 64, 64, 64), stem_channels=32, group_channels=8,
              layers=(1, 1, 1, 1))
    torch.manual_seed(1)
    src = timm.create_model("rednet26", **kw)
    sd = {(("head." + k) if k.startswith("fc.") else "backbone." + k): v for k, v in src.state_dict().items()}
    assert any(k.startswith("head.fc.") for k in sd)
    if layout == "mmcls":
        obj = {"meta": {"epoch": 1}, "state_dict": sd}
    else:
        prefix = "module." if layout == "authors_ddp" else ""
        obj = {"model": {prefix + k: v for k, v in sd.items()}}
    path = tmp_path / "inv_teacher.pth"
    torch.save(obj, path)
    torch.manual_seed(2)
    dst = build_model("rednet26", weights=str(path), **kw)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)
