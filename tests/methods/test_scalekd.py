"""ScaleKD: loss and gradients against a materializing reference (METHODS.md 5), training, errors."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock
from timm.models.resnet import ResNet

import fastkd.methods as M
from fastkd.methods.scalekd import frequency_mimic_loss
from fastkd.models import Teacher
from fastkd.models.teacher import IMAGENET_MEAN
from fastkd.models.teacher import IMAGENET_STD
from tests.methods._common import check_against_oracle
from tests.methods._common import check_method_recipes
from tests.methods._common import soft_ce
from tests.methods._common import train_losses
from tests.utils import assert_error_budget

NUM_CLASSES = 5
IMG = 64


def swin_teacher(seed=1):
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=IMG, embed_dim=16, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 2, 2), window_size=4, num_classes=NUM_CLASSES)  # s3 4x4x64, s4 2x2x128


def vit_teacher(seed=1):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=IMG, depth=4, embed_dim=48, num_heads=2,
                             num_classes=NUM_CLASSES)  # 4x4 grid, D = 48


def vit_teacher24(seed=1, **kw):
    torch.manual_seed(seed)  # the depth of BEiT-L / EVA-L (24 blocks), narrow
    return timm.create_model("vit_tiny_patch16_224", img_size=IMG, depth=24, embed_dim=16, num_heads=2,
                             num_classes=NUM_CLASSES, **kw)


def vit_student(seed=0):
    torch.manual_seed(seed)  # official ViT students: no CLS token, GAP head
    return timm.create_model("vit_tiny_patch16_224", img_size=IMG, depth=4, embed_dim=32, num_heads=2,
                             class_token=False, global_pool="avg", fc_norm=False, num_classes=NUM_CLASSES)


def resnet_student(seed=0):
    """A timm ResNet (BasicBlock, one block per stage) with narrow channels: layer3 4x4x64, layer4 2x2x128 at 64 px."""
    torch.manual_seed(seed)
    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16,
                  num_classes=NUM_CLASSES)


def wrap(model):
    return Teacher(model, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def make_batch(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(b, 3, IMG, IMG, generator=g),
            "labels": torch.randint(0, NUM_CLASSES, (b,), generator=g)}


# --------------------------------------------------------------------------------------------- reference
def dct_matrix(n):
    """DCT-II (unnormalized, scipy norm=None): X_k = 2 Σ_i x_i cos(π k (2i+1) / (2n))."""
    i = torch.arange(n, dtype=torch.float64)
    return 2 * torch.cos(math.pi * i[:, None] * (2 * i[None, :] + 1) / (2 * n))


def remove_dc_by_dct(x):
    """METHODS.md 5.3 as written: 2-D DCT over (H, W), zero the (0, 0) coefficient, inverse DCT."""
    H, W = x.shape[-2:]
    Dh, Dw = dct_matrix(H).to(x.dtype), dct_matrix(W).to(x.dtype)
    X = Dh @ x @ Dw.T
    X = X.clone()
    X[..., 0, 0] = 0
    return torch.linalg.inv(Dh) @ X @ torch.linalg.inv(Dw).T


def l_spat(p, t):
    """(1/B) Σ_{b,h,w} || n(P)[b,:,h,w] − n(T)[b,:,h,w] ||², n = L2 over channels."""
    n_p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n_t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ((n_p - n_t) ** 2).sum() / p.shape[0]


def l_freq(p, t):
    return l_spat(remove_dc_by_dct(p), remove_dc_by_dct(t))


def cap_reference(cap, x, query=None):
    """CAP (METHODS.md 5.2) written out with the projector's parameters, attention materialized."""
    conv, bn = cap.proj_student[0], cap.proj_student[1]
    xs = F.relu(F.batch_norm(F.conv2d(x, conv.weight, conv.bias, padding=1), None, None, bn.weight, bn.bias, True,
                             0.0, bn.eps)) + cap.pos_embed
    B, C_t = x.shape[0], cap.teacher_dim
    Hq, Wq = cap.query_hw
    q0 = (cap.query.weight.reshape(1, Hq, Wq, C_t).permute(0, 3, 1, 2).expand(B, -1, -1, -1) if query is None
          else query.transpose(1, 2).reshape(B, C_t, Hq, Wq))
    q0 = F.relu(F.conv2d(q0, cap.proj_query[0].weight, cap.proj_query[0].bias)).flatten(2).transpose(1, 2)
    kv = xs.flatten(2).transpose(1, 2)
    h, d = cap.num_heads, C_t // cap.num_heads

    def heads(t):
        return t.reshape(B, -1, h, d).transpose(1, 2)

    q, k, v = heads(cap.q(q0)), heads(cap.k(kv)), heads(cap.v(kv))
    attn = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5 * 5.0, dim=-1)
    y = cap.proj((attn @ v).transpose(1, 2).reshape(B, -1, C_t))
    z = F.layer_norm(y, (C_t,), cap.norm.weight, cap.norm.bias, cap.norm.eps)
    return z + cap.ffn.fc2(F.relu(cap.ffn.fc1(z)))


def grid(tokens, hw):
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *hw)


def student_feats(student, x):
    store = {}
    if hasattr(student, "blocks"):  # ViT: s3 = tokens after block 3 of 4 (9 of 12), s4 = final tokens
        h = student.blocks[2].register_forward_hook(lambda m, i, o: store.__setitem__("s3", o))
        feats = student.forward_features(x)
        h.remove()
        logits = student.forward_head(feats)
        return grid(store["s3"], (4, 4)), grid(feats, (4, 4)), logits
    hs = [student.layer3.register_forward_hook(lambda m, i, o: store.__setitem__("s3", o)),
          student.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("s4", o))]
    logits = student(x)
    for h in hs:
        h.remove()
    return store["s3"], store["s4"], logits


def reference_loss(method, student, teacher, batch, *, alpha_kd=0.5, T=1.0, a_spat=0.08, a_freq=0.06, a3=None,
                   a4=None):
    """``a3``/``a4``: per-stage (spatial, frequency) weights (default: ``(a_spat, a_freq)`` for both stages)."""
    a3 = (a_spat, a_freq) if a3 is None else a3
    a4 = (a_spat, a_freq) if a4 is None else a4
    x, y = batch["images"], batch["labels"]
    s3, s4, z_s = student_feats(student, x)
    swin = hasattr(teacher, "layers")
    with torch.no_grad():
        f = teacher.forward_features(x)
        z_t = teacher.forward_head(f)
        t4 = f.permute(0, 3, 1, 2) if swin else grid(f[:, 1:], (4, 4))
    if swin:
        def tpp(tok):  # stage-4 patch merging + blocks + final LN, frozen weights
            return teacher.norm(teacher.layers[-1](tok.reshape(tok.shape[0], 4, 4, -1))).reshape(tok.shape[0], 4, -1)

        def last(tok):
            return tok
        hw4 = (2, 2)
    elif len(teacher.blocks) == 24:
        def tpp(tok):  # official BEiT-L staging: "stage 3" = the last two blocks (+ the final LN)
            return teacher.norm(teacher.blocks[23](teacher.blocks[22](tok)))

        def last(tok):  # "stage 4": nothing
            return tok
        hw4 = (4, 4)
    else:
        def tpp(tok):  # blocks 2..2 of 4 ("blocks 9-11 of 12")
            return teacher.blocks[2](tok)

        def last(tok):  # last block + final LN
            return teacher.norm(teacher.blocks[3](tok))
        hw4 = (4, 4)
    ce, ce_mag = soft_ce(z_s, F.one_hot(y, NUM_CLASSES).to(z_s.dtype))
    kd, kd_mag = soft_ce(z_s / T, torch.softmax(z_t / T, -1))  # CE to the teacher's soft labels, times T²
    kd, kd_mag = kd * T * T, kd_mag * T * T
    loss = (1 - alpha_kd) * ce + alpha_kd * kd
    parts = {"ce": ce, "kd": kd}
    magnitudes = {"ce": ce_mag, "kd": kd_mag, "loss": (1 - alpha_kd) * ce_mag + alpha_kd * kd_mag}
    for i, (view, fn) in enumerate((("spat", l_spat), ("freq", l_freq))):
        cap3, cap4 = getattr(method, f"cap_s3_{view}"), getattr(method, f"cap_s4_{view}")
        r = tpp(cap_reference(cap3, s3))
        p4 = last(cap_reference(cap4, s4, query=r))
        parts[f"s3_{view}"], parts[f"s4_{view}"] = fn(grid(r, hw4), t4), fn(grid(p4, hw4), t4)
        loss = loss + a3[i] * parts[f"s3_{view}"] + a4[i] * parts[f"s4_{view}"]
        # sums of squares: nothing cancels, the values are their own magnitudes
        magnitudes["loss"] += float((a3[i] * parts[f"s3_{view}"] + a4[i] * parts[f"s4_{view}"]).detach())
    parts["loss"] = loss
    return parts, magnitudes


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# The method's CAP runs SDPA, which accumulates q.k over the head dimension and P.v over the keys in its own order
# (the reference: explicit softmax and matmuls); its longest chain, as for the attention kernels, is keys x head_dim:
# at most 16 tokens (the 4x4 grids of s3/s4) x 24 (the ViT teacher's 48 channels over 2 CAP heads).
CAP_DEPTH = 16 * 24

_PAIRS = ("make_student, make_teacher, heads", [
    (vit_student, swin_teacher, (2, 4)),
    (resnet_student, vit_teacher, (2, 2)),
    (resnet_student, swin_teacher, (4, 8)),
])


@pytest.mark.parametrize(*_PAIRS)
def test_matches_reference(make_student, make_teacher, heads):
    """The method (fp32) against the reference above run in fp64 on copies of the method and the teacher: every
    part, every gradient of the student and the CAP projectors (through the BN / TPP / CAP chain)."""
    student, teacher = make_student(), make_teacher()
    # the reference runs the teacher in eval mode (timm's Swin-T has stochastic depth 0.2 in train mode)
    method = M.build("scalekd", student=student, teachers=[wrap(teacher)], cap_heads=heads, teacher_train_mode=False)
    batch = make_batch()
    out = method(batch)
    out["loss"].backward()
    g = grads(method)

    def reference(method, teacher, inputs):
        return reference_loss(method, method.student, teacher, inputs)

    parts = ("loss", "ce", "kd", "s3_spat", "s4_spat", "s3_freq", "s4_freq")
    check_against_oracle(out, g, reference, (method, teacher), batch, parts=parts, depth=CAP_DEPTH)
    assert all(float(out[k].detach()) > 0 for k in parts)
    assert any(n.startswith("cap_s3_freq") for n in g) and any(n.startswith("student") for n in g)
    assert not any(p.grad is not None for p in teacher.parameters())  # frozen teacher, grad through activations


def test_24_block_teacher_staging_and_per_stage_alpha():
    """A 24-block ViT teacher gets the official BEiT-L staging by default (the TPP runs the last two blocks + LN,
    the last stage nothing), and per-stage [spatial, frequency] weights apply (Swin-S -> ResNet-50: [0.08, 0.0])."""
    student, teacher = resnet_student(), vit_teacher24()
    a3, a4 = (0.08, 0.0), (0.05, 0.03)
    method = M.build("scalekd", student=student, teachers=[wrap(teacher)], cap_heads=(2, 2), alpha_s3=list(a3),
                     alpha_s4=list(a4))
    assert (method._t.start, method._t.last) == (22, 0)
    # in fp64: 24 teacher blocks amplify the fp32 rounding of the method's SDPA-based CAP beyond the fp32 budget;
    # the fp64 run is held to the fp32 reference's own error (the budget), far below what a wrong staging costs
    method.double(), teacher.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in make_batch().items()}
    out = method(batch)
    out["loss"].backward()

    def reference(method, teacher, inputs):
        return reference_loss(method, method.student, teacher, inputs, a3=a3, a4=a4)

    parts = ("loss", "s3_spat", "s4_spat", "s3_freq", "s4_freq")
    check_against_oracle(out, grads(method), reference, (method, teacher), batch, parts=parts)
    with pytest.raises(ValueError, match="alpha_s3"):
        M.build("scalekd", student=resnet_student(), teachers=[wrap(vit_teacher24())], alpha_s3=[0.1])
    with pytest.raises(ValueError, match="vit_teacher_stage4_start"):
        M.build("scalekd", student=resnet_student(), teachers=[wrap(vit_teacher24())], vit_teacher_stage4_start=24)


@pytest.mark.parametrize("train_mode", [True, False])
def test_teacher_train_mode(train_mode):
    """``teacher_train_mode`` (default True, the official runner's behaviour): while the method trains, the teacher
    runs with its stochastic depth on; the loss equals the reference run with ``teacher.train()`` under the same
    random stream. False (or an evaluating method): the eval-mode teacher. The teacher is left in eval mode."""
    torch.manual_seed(1)
    teacher = timm.create_model("vit_tiny_patch16_224", img_size=IMG, depth=4, embed_dim=48, num_heads=2,
                                num_classes=NUM_CLASSES, drop_path_rate=0.5)
    student = vit_student()
    kw = {} if train_mode else {"teacher_train_mode": False}
    method = M.build("scalekd", student=student, teachers=[wrap(teacher)], cap_heads=(2, 2), **kw).train()
    batch = make_batch()
    torch.manual_seed(7)
    got = {k: v.detach() for k, v in method(batch).items()}
    assert not teacher.training

    def ref(mode):
        teacher.train(mode)
        torch.manual_seed(7)
        with torch.no_grad():
            parts = reference_loss(method, student, teacher, batch)[0]
        teacher.eval()
        return parts

    ref_train, ref_eval = ref(True), ref(False)
    # stochastic depth changes the teacher's features, by far more than the 1e-5 the comparison below allows
    assert max(abs(float(ref_train[k] / ref_eval[k]) - 1) for k in ("s3_spat", "s4_spat")) > 1e-4
    expected = ref_train if train_mode else ref_eval
    for k in ("loss", "kd", "s3_spat", "s4_spat", "s3_freq", "s4_freq"):
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=0, msg=k)


def test_dc_removal_identity():
    """Zeroing the DCT DC coefficient == per-channel spatial mean removal (the simplification the method uses); the
    method's frequency loss (fp32) against the DCT form in fp64, value and gradient."""
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(remove_dc_by_dct(x), x - x.mean(dim=(2, 3), keepdim=True))  # fp64, rounding only
    p, t = torch.randn(2, 6, 4, 4, requires_grad=True), torch.randn(2, 6, 4, 4)
    value = frequency_mimic_loss(p, t)
    (grad,) = torch.autograd.grad(value, p)
    refs = {}
    for dtype in (torch.float32, torch.float64):
        pd = p.detach().to(dtype).requires_grad_(True)
        ref = l_freq(pd, t.to(dtype))
        refs[dtype] = (ref, torch.autograd.grad(ref, pd)[0])
    assert_error_budget(value, refs[torch.float32][0], refs[torch.float64][0], "frequency loss")
    assert_error_budget(grad, refs[torch.float32][1], refs[torch.float64][1], "grad")


def test_training_reduces_loss():
    student, teacher = vit_student(), swin_teacher()
    method = M.build("scalekd", student=student, teachers=[wrap(teacher)], cap_heads=(2, 4))
    batch = make_batch(b=4)
    losses = train_losses(method, batch, steps=3, lr=1e-3)
    assert losses[-1] < losses[0]
    assert all(k.startswith(("student.", "cap_")) for k in method.state_dict())  # the teacher stays out
    assert method.predict(batch["images"]).shape == (4, NUM_CLASSES)


def test_options_and_bad_configs():
    student, teacher = vit_student(), swin_teacher()
    m = M.build("scalekd", student=student, teachers=[wrap(teacher)], cap_heads=(2, 4), ce_loss="bce",
                label_smoothing=0.1, alpha_kd=0.0)
    out = m(make_batch())
    torch.testing.assert_close(out["loss"], out["ce"] + 0.08 * (out["s3_spat"] + out["s4_spat"])
                               + 0.06 * (out["s3_freq"] + out["s4_freq"]))
    with pytest.raises(ValueError, match=r"teachers\[0\].*not a timm Swin or ViT"):
        M.build("scalekd", student=student, teachers=[wrap(resnet_student())])
    with pytest.raises(ValueError, match="needs exactly 1 teacher"):
        M.build("scalekd", student=student, teachers=[wrap(teacher), wrap(vit_teacher())])
    with pytest.raises(ValueError, match="num_heads=3 must divide teacher_dim=64"):
        M.build("scalekd", student=student, teachers=[wrap(teacher)], cap_heads=(3, 4))
    with pytest.raises(ValueError, match="student_s3_block=7 is out of range"):
        M.build("scalekd", student=student, teachers=[wrap(teacher)], student_s3_block=7)
    with pytest.raises(ValueError, match="ce_loss"):
        M.build("scalekd", student=student, teachers=[wrap(teacher)], ce_loss="focal")
    bad = M.build("scalekd", student=student, teachers=[wrap(vit_teacher())], cap_heads=(2, 2))
    with pytest.raises(ValueError, match="logits .* differ"):
        M.build("scalekd", student=vit_student(), teachers=[wrap(timm.create_model(
            "vit_tiny_patch16_224", img_size=IMG, depth=4, embed_dim=48, num_heads=2, num_classes=7))],
            cap_heads=(2, 2))(make_batch())
    torch.testing.assert_close((o := bad(make_batch()))["loss"], 0.5 * o["ce"] + 0.5 * o["kd"] + 0.08 * (  # ViT teacher
        o["s3_spat"] + o["s4_spat"]) + 0.06 * (o["s3_freq"] + o["s4_freq"]))


# ------------------------------------------------------------------------------------------------ recipes
def test_recipes():
    check_method_recipes("scalekd")
