"""SDSSL (MoCo v3 / BYOL / SimCLR variants): loss parts and gradients against a materializing reference,
schedules, EMA target, distributed gathering, errors."""

from __future__ import annotations

import copy
import math
import os
import time

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd.methods as M
from fastkd.methods.sdssl import sincos_2d_pos_embed
from tests.methods._common import check_against_oracle
from tests.methods._common import recipe_check
from tests.methods._common import train_losses
from tests.utils import assert_error_budget

DEPTH = 3
HEADS = dict(out_dim=16, proj_hidden=24, proj_hidden_last=32, pred_hidden=20)


def tiny_vit(depth=DEPTH):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth, embed_dim=32,
                             num_heads=2, num_classes=0)


def build(variant, **kw):
    return M.build("sdssl", student=tiny_vit(), variant=variant, **{**HEADS, **kw})


def views(b=6, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g)]


# ------------------------------------------------------------------------------------------------------------------
# reference, written from METHODS.md §4


def ref_layer_cls(vit, x):
    """CLS of every block through the shared final LayerNorm, by hand (patch embed + CLS + pos, blocks)."""
    t = vit.patch_embed(x)
    t = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + vit.pos_embed
    out = []
    for blk in vit.blocks:
        t = blk(t)
        out.append(vit.norm(t)[:, 0])
    return out


def ref_nce(rows, z, tau):
    """2τ · mean over rows of −log softmax_j(cos(p_r, z_j)/τ)[own index]; rows = list of [B, k] (one per layer).
    Returns the value and the magnitude of the terms it is a difference of (|s_rr| + |lse_r|, same weights)."""
    losses, mags = [], []
    zn = z / z.norm(dim=1, keepdim=True)
    for p in rows:
        pn = p / p.norm(dim=1, keepdim=True)
        s = pn @ zn.t() / tau
        lse = torch.logsumexp(s, dim=1)
        losses.append(-(s.diagonal() - lse))
        mags.append(s.diagonal().abs() + lse.abs())
    return 2 * tau * torch.cat(losses).mean(), 2 * tau * float(torch.cat(mags).mean().detach())


def ref_byol(rows, z):
    """mean over rows of 2 − 2 cos(p_r, z_r), and the magnitude of its terms (2 + 2 |cos|)."""
    cos = torch.cat([(p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1)) for p in rows])
    return (2 - 2 * cos).mean(), float((2 + 2 * cos.abs()).mean().detach())


def ref_moco_byol(method, x1, x2, variant, lam, tau=0.2):
    L = method.depth
    r1, r2 = ref_layer_cls(method.student, x1), ref_layer_cls(method.student, x2)
    g1 = [method.projectors[l](r1[l]) for l in range(L)]
    g2 = [method.projectors[l](r2[l]) for l in range(L)]
    p1 = [method.predictors[l](g1[l]) for l in range(L)]
    p2 = [method.predictors[l](g2[l]) for l in range(L)]
    q1 = [method.predictors[l](g1[l].detach()) for l in range(L)]
    q2 = [method.predictors[l](g2[l].detach()) for l in range(L)]
    with torch.no_grad():
        z1 = method.target_projector(ref_layer_cls(method.target_backbone, x1)[-1])
        z2 = method.target_projector(ref_layer_cls(method.target_backbone, x2)[-1])
    ell = (lambda rows, z: ref_nce(rows, z, tau)) if variant == "moco" else ref_byol

    def both(rows_a, z_a, rows_b, z_b, weight=1.0):
        (va, ma), (vb, mb) = ell(rows_a, z_a), ell(rows_b, z_b)
        return weight * (va + vb), weight * (ma + mb)

    (final, m_final), (mid, m_mid) = both([p2[-1]], z1, [p1[-1]], z2), both(p2[:-1], z1, p1[:-1], z2, lam)
    pred, m_pred = both(q2, z1, q1, z2, L)
    values = {"final": final, "mid": mid, "pred": pred, "loss": final + mid + pred}
    return values, {"final": m_final, "mid": m_mid, "pred": m_pred, "loss": m_final + m_mid + m_pred}


def ref_simclr(method, x1, x2, lam, tau=0.2):
    L, B = method.depth, x1.shape[0]
    r1, r2 = ref_layer_cls(method.student, x1), ref_layer_cls(method.student, x2)
    # official SimCLR: both views through each projector together (BatchNorm statistics over the 2B rows)
    g = [method.projectors[l](torch.cat([r1[l], r2[l]])) for l in range(L)]
    g1, g2 = [a[:B] for a in g], [a[B:] for a in g]

    def unit(a):
        return a / a.norm(dim=1, keepdim=True)

    keys = unit(torch.cat([g1[-1], g2[-1]]))

    def nt_xent(anchors, keys):
        """mean over anchors of −(s_pos − lse over the others), and the magnitude of those terms."""
        total, mags = [], []
        for i in range(2 * B):
            pos = (i + B) % (2 * B)
            sims = anchors[i] @ keys.t() / tau
            others = torch.cat([sims[:i], sims[i + 1:]])
            lse = torch.logsumexp(others, 0)
            total.append(-(sims[pos] - lse))
            mags.append(sims[pos].abs() + lse.abs())
        return torch.stack(total).mean(), float(torch.stack(mags).mean().detach())

    final, m_final = nt_xent(keys, keys)
    mids = [nt_xent(unit(torch.cat([g1[l], g2[l]])), keys.detach()) for l in range(L - 1)]
    mid = lam * torch.stack([v for v, _ in mids]).mean()
    m_mid = lam * sum(m for _, m in mids) / len(mids)
    values = {"final": final, "mid": mid, "pred": torch.zeros((), dtype=final.dtype), "loss": final + mid}
    return values, {"final": m_final, "mid": m_mid, "pred": 0.0, "loss": m_final + m_mid}


def reference(method, x1, x2, variant, lam):
    """The parts ``final``, ``mid``, ``pred``, ``loss`` and the magnitudes of the terms each is a difference of."""
    return ref_simclr(method, x1, x2, lam) if variant == "simclr" else ref_moco_byol(method, x1, x2, variant, lam)


def oracle(variant, lam):
    """``reference`` in the form check_against_oracle calls: (method copy, inputs with the two views as tensors)."""
    return lambda method, inputs: reference(method, inputs["x1"], inputs["x2"], variant, lam)


# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["moco", "byol", "simclr"])
def test_loss_parts_and_grads_match_reference(variant):
    """The method (fp32) against the reference above run in fp64 on a copy of it (online, target and heads): every
    part and every trainable gradient, held to the error budget."""
    method = build(variant).train()
    with torch.no_grad():  # a target that differs from the online network, as after some EMA steps
        if method.target_backbone is not None:
            for p in list(method.target_backbone.parameters()) + list(method.target_projector.parameters()):
                p.add_(0.05 * torch.randn_like(p))
    method.lam.fill_(0.37)
    x1, x2 = views()
    out = method({"images": [x1, x2]})
    assert set(out) == {"loss", "final", "mid", "pred"}
    torch.testing.assert_close(out["loss"], out["final"] + out["mid"] + out["pred"])  # a sum of parts
    out["loss"].backward()
    g = {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}
    check_against_oracle(out, g, oracle(variant, 0.37), (method,), {"x1": x1, "x2": x2},
                         parts=("final", "mid", "pred", "loss"))
    assert g["student.blocks.0.attn.qkv.weight"].abs().sum() > 0  # L_mid reaches the first block
    assert g["projectors.0.0.weight"].abs().sum() > 0
    assert not any(n.startswith("target") for n, p in method.named_parameters() if p.requires_grad)  # EMA only


@pytest.mark.parametrize("variant", ["simclr", "moco"])
def test_projector_batchnorm_statistics(variant):
    """SimCLR normalises each projector's BatchNorm over both views at once (the official one-pass projection), so
    a fresh BN's running mean after one step is momentum × the mean of the 2B rows; MoCo v3 projects one view at a
    time (two updates, each over B rows)."""
    method = build(variant).train()
    x1, x2 = views(b=5)
    with torch.no_grad():
        method({"images": [x1, x2]})
        r1, r2 = ref_layer_cls(method.student, x1), ref_layer_cls(method.student, x2)
    for l in (0, method.depth - 1):
        lin, bn = method.projectors[l][0], method.projectors[l][1]
        h1, h2 = lin(r1[l]).double(), lin(r2[l]).double()
        m = bn.momentum
        if variant == "simclr":
            expected = m * torch.cat([h1, h2]).mean(0)
        else:
            expected = m * h2.mean(0) + (1 - m) * m * h1.mean(0)
        torch.testing.assert_close(bn.running_mean.double(), expected, rtol=1e-5, atol=1e-6)


def test_sync_batchnorm_heads():
    """sync_bn converts every BatchNorm of the projectors, predictors and target projector; the default (one
    process) keeps plain BatchNorm."""
    method = build("moco", sync_bn=True)
    for heads in (method.projectors, method.predictors, method.target_projector):
        bns = [m for m in heads.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert bns and all(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    plain = build("simclr")
    assert not plain.sync_bn
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())


@pytest.mark.parametrize("variant", ["moco", "byol"])
def test_pred_term_trains_only_predictors(variant):
    method = build(variant, lambda_max=0.0).train()
    x1, x2 = views()
    out = method({"images": [x1, x2]})
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["pred"], [p for _, p in trainable], allow_unused=True)
    for (n, _), gr in zip(trainable, grads):
        if not n.startswith("predictors."):
            assert gr is None or gr.abs().max() == 0, n
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_defaults_official():
    for variant, lam_max, last_bn in (("moco", 1.0, True), ("byol", 0.8, False), ("simclr", 0.8, True)):
        m = M.build("sdssl", student=tiny_vit(), variant=variant)
        assert m.lambda_max == lam_max and m.last_bn == last_bn and m.temperature == 0.2
        assert m.pred_weight == DEPTH
        assert m.projectors[0][0].out_features == 2048 and m.projectors[-1][0].out_features == 4096
        assert m.projectors[-1][-1 if last_bn else -1].__class__.__name__ == ("BatchNorm1d" if last_bn else "Linear")
        if last_bn:
            assert not m.projectors[-1][-1].affine
        if variant != "simclr":
            last_linear = m.predictors[0][-2 if last_bn else -1]
            assert m.predictors[0][0].out_features == 4096 and last_linear.out_features == 256
        else:
            assert m.predictors is None and m.target_backbone is None
    assert M.build("sdssl", student=tiny_vit()).self_supervised


def test_mocov3_tricks_on_student():
    vit = tiny_vit()
    method = M.build("sdssl", student=vit, **HEADS)
    assert not any(p.requires_grad for p in vit.patch_embed.parameters())
    assert not vit.pos_embed.requires_grad
    assert torch.all(vit.pos_embed[0, 0] == 0)  # CLS position
    torch.testing.assert_close(vit.pos_embed[0, 1:], sincos_2d_pos_embed((4, 4), 32))
    pe = sincos_2d_pos_embed((2, 3), 8)  # rows: (h, w) row-major; cols: sin w, cos w, sin h, cos h (2 freqs each)
    assert pe.shape == (6, 8)
    torch.testing.assert_close(pe[4], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
                                                    math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]))
    torch.testing.assert_close(method.target_backbone.pos_embed, vit.pos_embed)


def test_schedules_and_ema():
    method = build("moco", momentum=0.9)
    T = 10
    assert float(method.lam) == 0.0 and float(method.momentum) == pytest.approx(0.9)
    assert method.lambda_at(0, T) == 0.0 and method.lambda_at(T, T) == pytest.approx(1.0)
    assert method.lambda_at(5, T) == pytest.approx(0.5)
    assert method.momentum_at(0, T) == pytest.approx(0.9) and method.momentum_at(T, T) == pytest.approx(1.0)
    assert method.momentum_at(5, T) == pytest.approx(0.95)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
        for p in method.projectors[-1].parameters():
            p.add_(1.0)
    before_t = [p.clone() for p in method.target_backbone.parameters()]
    online = [p.clone() for p in method.student.parameters()]
    before_tp = [p.clone() for p in method.target_projector.parameters()]
    online_p = [p.clone() for p in method.projectors[-1].parameters()]
    method.on_step_end(3, T)
    for t, b, o in zip(method.target_backbone.parameters(), before_t, online):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    for t, b, o in zip(method.target_projector.parameters(), before_tp, online_p):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    assert float(method.lam) == pytest.approx((1 - math.cos(math.pi * 0.3)) / 2)
    assert float(method.momentum) == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi * 0.3)) / 2)
    sd = method.state_dict()
    assert "lam" in sd and "momentum" in sd and any(k.startswith("target_backbone.") for k in sd)
    fresh = build("moco", momentum=0.9)
    fresh.load_state_dict(sd)
    assert float(fresh.lam) == float(method.lam)


@pytest.mark.parametrize("variant", ["moco", "byol", "simclr"])
def test_steps_reduce_loss(variant):
    method = build(variant, lambda_max=0.5).train()
    x = views(b=8)
    losses = train_losses(method, {"images": x}, steps=6, lr=3e-3, step_end=True)
    assert losses[-1] < losses[0]


def test_features_use_target_for_knn():
    method = build("moco").eval()
    x = views()[0]
    torch.testing.assert_close(method.features(x), method.target_backbone.forward_features(x)[:, 0])
    simclr = build("simclr").eval()
    torch.testing.assert_close(simclr.features(x), simclr.student.forward_features(x)[:, 0])


def test_bad_configurations():
    with pytest.raises(ValueError, match="without teachers"):
        M.build("sdssl", student=tiny_vit(), teachers=[tiny_vit()])
    with pytest.raises(ValueError, match="variant"):
        M.build("sdssl", student=tiny_vit(), variant="dino")
    with pytest.raises(ValueError, match="at least 2 blocks"):
        M.build("sdssl", student=tiny_vit(depth=1))
    with pytest.raises(TypeError, match="VisionTransformer"):
        M.build("sdssl", student=timm.create_model("resnet10t"))
    with pytest.raises(ValueError, match="out_dim"):
        M.build("sdssl", student=tiny_vit(), out_dim=0)
    method = build("moco")
    with pytest.raises(TypeError, match="list of 2"):
        method({"images": views()[0]})
    with pytest.raises(TypeError, match="list of 2"):
        method({"images": views() + views()[:1]})


# ------------------------------------------------------------------------------------------------------------------
# distributed: 2 gloo ranks with half the batch each == one process with the whole batch (eval-mode BN so that the
# per-rank batch statistics do not differ)


def _rank_worker(rank, world, store, result_file):
    # one intra-op thread per rank: 2 ranks share the host's cores
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        for variant in _DIST_VARIANTS:
            torch.manual_seed(0)
            method = build(variant).eval()
            method.lam.fill_(0.5)
            x1, x2 = views(b=8)
            n = 8 // world
            sl = slice(rank * n, (rank + 1) * n)
            out = method({"images": [x1[sl], x2[sl]]})
            params = [p for p in method.parameters() if p.requires_grad]
            grads = torch.autograd.grad(out["loss"], params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])
            dist.all_reduce(flat)  # DDP's gradient mean
            loss = out["loss"].detach().clone()
            dist.all_reduce(loss)
            results[variant] = {"grad": flat / world, "loss": loss / world}
        if rank == 0:
            torch.save(results, result_file)
    finally:
        dist.destroy_process_group()


_DIST_VARIANTS = ("moco", "simclr")  # the two variants that gather across ranks (targets; keys with gradient)


def _flat_grads(module):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path):
    """The loss and the DDP-averaged gradient of 2 ranks (fp32, half the batch each) against the reference on the
    whole batch in fp64, held to a small multiple of the fp32 reference's own rounding error."""
    result = tmp_path / "result.pt"
    # spawned ranks: forking is refused once the suite has run autograd in this process (its worker threads do not
    # survive a fork); a rank that hangs fails the test instead of stalling the suite
    ranks = mp.start_processes(_rank_worker, args=(2, str(tmp_path / "store"), str(result)), nprocs=2,
                               start_method="spawn", join=False)
    deadline = time.monotonic() + 300
    try:
        while not ranks.join(timeout=1):
            assert time.monotonic() < deadline, "the 2 forked ranks did not finish in 300 s"
    finally:
        for p in ranks.processes:
            if p.is_alive():
                p.kill()
                p.join()
    got = torch.load(result)
    for variant in _DIST_VARIANTS:
        torch.manual_seed(0)
        method = build(variant).eval()
        method.lam.fill_(0.5)
        x1, x2 = views(b=8)
        refs = {}
        for dtype in (torch.float32, torch.float64):
            copied = copy.deepcopy(method).to(dtype)
            values, magnitudes = reference(copied, x1.to(dtype), x2.to(dtype), variant, 0.5)
            values["loss"].backward()
            refs[dtype] = (values["loss"].detach(), _flat_grads(copied), magnitudes["loss"])
        (loss32, grad32, _), (loss64, grad64, magnitude) = refs[torch.float32], refs[torch.float64]
        assert_error_budget(got[variant]["loss"], loss32, loss64, f"{variant} loss", scale=magnitude)
        assert_error_budget(got[variant]["grad"], grad32, grad64, f"{variant} grad")


def test_single_rank_process_group_matches(tmp_path):
    """world_size 1 with an initialized process group takes the gather code paths and changes nothing."""
    method = build("simclr").train()
    method.lam.fill_(0.5)
    x = views()
    ref = method({"images": x})["loss"].item()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store1'}", rank=0, world_size=1)
    try:
        assert method({"images": x})["loss"].item() == ref  # the same operations: bit for bit
    finally:
        dist.destroy_process_group()
    assert os.environ.get("FASTKD_KERNELS") is None


# ------------------------------------------------------------------------------------------------------------------
# recipes


def test_recipes():
    g = torch.Generator().manual_seed(0)
    batch = {"images": [torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)]}
    cfg, method = recipe_check(["sdssl_moco_vitb_in1k", "sdssl_byol_vitb_in1k", "sdssl_simclr_vitb_in1k"],
                                "sdssl_tiny", batch)
    assert cfg.data.num_views == 2 and method.self_supervised
    load = __import__("fastkd.config", fromlist=["load_config"]).load_config
    assert load("sdssl_byol_vitb_in1k").method.params["lambda_max"] == 0.8
    assert load("sdssl_moco_vitb_in1k").method.params["lambda_max"] == 1.0
