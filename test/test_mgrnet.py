"""MGRNet and the VFMSeg model (VFMNet + MGRNet) on tiny sizes: shapes, paper size, attention paths,
feature masking, the two-view loss and where its gradients go."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CONFIG
from training.build import build_vfmnet
from training.config import config_from_dict
from training.models.mask_embedding import MaskEmbedding
from training.models.mgrnet import MGRNet
from training.models.semantic_attention import reference_attention, set_reference_attention
from training.objectives import compute_loss, random_crop_box, segmentation_loss, two_view_losses
from training.train import set_trainable

NUM_CLASSES = 19


def tiny_mgrnet(mask_ratio: float = 0.2, dropout: float = 0.0) -> MGRNet:
    """Four 32-channel taps, as the tiny ViT gives."""
    return MGRNet(4 * 32, NUM_CLASSES, dim=16, depth=2, heads=2, head_dim=8, ffn_dim=32, mask_channels=(8, 16),
                  dropout=dropout, mask_ratio=mask_ratio)


def tiny_features(n: int = 2, h: int = 4, w: int = 5) -> list[torch.Tensor]:
    return [torch.randn(n, 32, h, w) for _ in range(4)]


def refine_cfg(img: int = 56, **refine):
    """The tiny ViT of conftest with a small MGRNet; square network size = the refinement window."""
    data = json.loads(json.dumps(TINY_CONFIG))
    data["model"]["img_size"] = [img, img]
    data["model"]["refine"] = {"dim": 16, "depth": 2, "heads": 2, "head_dim": 8, "ffn_dim": 32,
                               "mask_channels": [8, 16], "dropout": 0.1, "mask_ratio": 0.2, "window": img,
                               **refine}
    return config_from_dict(data)


def batch(height: int, width: int, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, height, width, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n, height, width), generator=g)
    labels[:, :6] = 255
    return images, labels


def test_mask_embedding_and_mgrnet_shapes():
    emb = MaskEmbedding(NUM_CLASSES, (8, 16), 16)
    assert emb(torch.randn(2, NUM_CLASSES, 16, 20)).shape == (2, 16, 4, 5)
    net = tiny_mgrnet()
    feats = tiny_features()
    for size in [(16, 20), (7, 9), (30, 41)]:  # the context may come at any size
        for mode in (net.train, net.eval):
            mode()
            assert net(feats, torch.randn(2, NUM_CLASSES, *size)).shape == (2, NUM_CLASSES, 4, 5)
    with pytest.raises(ValueError, match="coarse logits"):
        net(feats, torch.randn(2, 3, 16, 20))
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mgrnet(mask_ratio=1.0)


def test_paper_size_parameter_count():
    """MGRNet at the paper's sizes (ViT-L taps, dim 256, 3 blocks of 8×64, FFN 1024) ≈ 6.64M."""
    with torch.device("meta"):
        net = MGRNet(4 * 1024, 19, dim=256, depth=3, heads=8, head_dim=64, ffn_dim=1024, mask_channels=(64, 128),
                     dropout=0.1, mask_ratio=0.2)
    total = sum(p.numel() for p in net.parameters())
    assert abs(total / 1e6 - 6.64) < 0.01, total
    block = net.blocks[0]
    assert block.cross_attn.to_q.out_features == 512 and block.cross_attn.to_k.bias is None
    assert block.ffn.proj_in.out_features == 2048 and block.ffn.proj_out.in_features == 1024
    assert net.mask_token.shape == (1, 256, 1, 1) and net.norm.eps == 1e-6


def test_fused_attention_matches_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), reference_attention(q, k, v))

    net = tiny_mgrnet(mask_ratio=0.0).eval()
    feats = [f.requires_grad_() for f in tiny_features()]
    context = torch.randn(2, NUM_CLASSES, 16, 20, requires_grad=True)
    results = []
    for reference in (False, True):
        set_reference_attention(net, reference)
        net.zero_grad()
        for t in (*feats, context):
            t.grad = None
        out = net(feats, context)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}  # no mask token
        grads.update({f"feat{i}": f.grad.clone() for i, f in enumerate(feats)}, context=context.grad.clone())
        results.append((out.detach(), grads))
    assert all(m.reference for m in net.modules() if hasattr(m, "reference"))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_feature_masking_only_in_training():
    torch.manual_seed(0)
    feats, context = tiny_features(), torch.randn(2, NUM_CLASSES, 16, 20)
    net = tiny_mgrnet(mask_ratio=0.5)
    net.train()
    a, b = net(feats, context), net(feats, context)
    assert not torch.allclose(a, b)  # fresh masks per call
    net.eval()
    c, d = net(feats, context), net(feats, context)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    # Whole positions (all channels) are replaced by the token, at about the mask ratio.
    x = torch.randn(4, 16, 20, 20)
    masked = net.mask_features(x)
    replaced = (masked != x).all(dim=1)
    assert ((masked != x).any(dim=1) == replaced).all()
    assert 0.4 < replaced.float().mean() < 0.6
    swapped = masked.permute(0, 2, 3, 1)[replaced]  # (K,16)
    torch.testing.assert_close(swapped, net.mask_token.detach().view(1, 16).expand_as(swapped))
    # Without masking (and dropout 0) training and evaluation compute the same function.
    plain = tiny_mgrnet(mask_ratio=0.0)
    plain.load_state_dict(net.state_dict())
    torch.testing.assert_close(plain.train()(feats, context), plain.eval()(feats, context))
    torch.testing.assert_close(plain.eval()(feats, context), c)


def test_vfmseg_model_views_and_state_keys():
    torch.manual_seed(0)
    plain_cfg = refine_cfg()
    plain_cfg.model.refine = None
    plain = build_vfmnet(plain_cfg.model)
    assert {k.split(".")[0] for k in plain.state_dict()} == {"backbone", "head"}
    with pytest.raises(RuntimeError, match="no refine head"):
        plain.refine(torch.randn(1, 3, 56, 56), torch.randn(1, NUM_CLASSES, 16, 16))
    model = build_vfmnet(refine_cfg().model).eval()
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "head", "refine_head"}
    assert model.refine_head.fuse[0].in_channels == 4 * 32
    x = torch.randn(2, 3, 56, 56)
    coarse = model.coarse(x)
    assert coarse.shape == (2, NUM_CLASSES, 16, 16)
    torch.testing.assert_close(model(x), coarse)
    assert model.refine(x, coarse).shape == (2, NUM_CLASSES, 4, 4)


def test_two_view_step_reduces_loss_and_grads_reach_exactly_the_trainable():
    torch.manual_seed(0)
    cfg = refine_cfg(mask_ratio=0.5)  # many masked positions, so the mask token surely gets a gradient
    model = build_vfmnet(cfg.model)
    set_trainable(model, "lora")
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero, which would leave A without a gradient
            p.data.normal_(0, 0.05)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"refine_head.mask_token"} < trainable and any("lora_A" in n for n in trainable)
    assert all("lora_" in n for n in trainable if n.startswith("backbone."))
    assert frozen and all(n.startswith("backbone.") for n in frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, labels = batch(112, 112)
    model.train()
    losses = []
    for step in range(5):
        torch.manual_seed(1)  # the same window, masks and dropout each step: one fixed objective
        opt.zero_grad(set_to_none=True)
        loss, parts = compute_loss(model, images, labels, cfg)
        assert set(parts) == {"loss_coarse", "loss_refine"}
        assert loss.item() == pytest.approx(parts["loss_coarse"] + parts["loss_refine"], rel=1e-6)
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            assert with_grad == trainable, (trainable - with_grad, with_grad - trainable)
            assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses


def test_context_is_detached():
    torch.manual_seed(0)
    cfg = refine_cfg()
    model = build_vfmnet(cfg.model)
    set_trainable(model, "lora")
    images, labels = batch(112, 112)
    _, loss_refine = two_view_losses(model, images, labels, cfg)
    loss_refine.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("head.")), "L_d reached VFMNet's head"
    assert all(g is not None for n, g in grads.items() if n.startswith("refine_head."))
    assert any(g is not None for n, g in grads.items() if "lora_" in n)  # the shared backbone does learn from L_d
    model.zero_grad(set_to_none=True)
    loss_coarse, _ = two_view_losses(model, images, labels, cfg)
    loss_coarse.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("refine_head."))


def test_two_view_views_match_the_official_recipe():
    """At 2×: low-view labels are every second pixel, the context is the low-view logits cropped by box//2."""
    torch.manual_seed(0)
    cfg = refine_cfg()
    model = build_vfmnet(cfg.model).eval()  # no masking, no dropout: both passes compute the same
    images, labels = batch(112, 168)
    seen = []
    model.refine_head.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    loss_coarse, loss_refine = two_view_losses(model, images, labels, cfg, generator=torch.Generator().manual_seed(5))
    y0, y1, x0, x1 = random_crop_box(112, 168, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        low = F.interpolate(images, size=(56, 56), mode="bilinear", align_corners=False)
        coarse = F.interpolate(model.coarse(low), size=(56, 56), mode="bilinear", align_corners=False)
        torch.testing.assert_close(loss_coarse, segmentation_loss(coarse, labels[:, ::2, ::3]))
        y_scale, x_scale = 56 / 112, 56 / 168
        context = coarse[:, :, round(y0 * y_scale):round(y1 * y_scale), round(x0 * x_scale):round(x1 * x_scale)]
        torch.testing.assert_close(seen[0], context)
        fine = model.refine(images[:, :, y0:y1, x0:x1], context)
        torch.testing.assert_close(loss_refine, segmentation_loss(fine, labels[:, y0:y1, x0:x1]))
    assert seen[0].shape[-2] == 28 and not seen[0].requires_grad


def test_two_view_other_scales_and_guards():
    torch.manual_seed(0)
    cfg = refine_cfg()
    model = build_vfmnet(cfg.model)
    for size in [(98, 126), (56, 56), (64, 200)]:  # not 2 × img_size
        loss, parts = compute_loss(model, *batch(*size), cfg)
        assert torch.isfinite(loss) and parts["loss_refine"] > 0
    with pytest.raises(ValueError, match="does not fit"):
        compute_loss(model, *batch(48, 112), cfg)
    images, labels = batch(112, 112)
    with pytest.raises(ValueError, match="do not match"):
        compute_loss(model, images, labels[:, :100], cfg)
    with pytest.raises(ValueError, match="must agree"):
        compute_loss(model, images, labels, refine_cfg(window=32))
    plain_cfg = refine_cfg()
    plain_cfg.model.refine = None
    plain = build_vfmnet(plain_cfg.model)
    with pytest.raises(ValueError, match="no refine head"):
        compute_loss(plain, images, labels, cfg)
    with pytest.raises(ValueError, match="needs model.refine"):
        compute_loss(model, images, labels, plain_cfg)
    loss, parts = compute_loss(plain, *batch(56, 56), plain_cfg)  # VFMNet alone: the single view as before
    assert set(parts) == {"loss_coarse"} and torch.isfinite(loss)


def test_random_crop_box_is_aligned_complete_and_reproducible():
    boxes = {random_crop_box(120, 200, 56, generator=torch.Generator().manual_seed(s)) for s in range(200)}
    assert {b[0] for b in boxes} == {0, 32, 64} and {b[2] for b in boxes} == {0, 32, 64, 96, 128}
    assert all(b[1] - b[0] == 56 and b[3] - b[2] == 56 for b in boxes)
    assert random_crop_box(56, 56, 56) == (0, 56, 0, 56)
    torch.manual_seed(3)
    first = random_crop_box(512, 1024, 256)
    torch.manual_seed(3)
    assert random_crop_box(512, 1024, 256) == first
    with pytest.raises(ValueError, match="does not fit"):
        random_crop_box(40, 100, 56)


def test_mgrnet_traces_for_export():
    net = tiny_mgrnet().eval()
    feats, context = tiny_features(1), torch.randn(1, NUM_CLASSES, 9, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shape checks become constants, as intended at a fixed size
        traced = torch.jit.trace(net, (feats, context), check_trace=False)
    torch.testing.assert_close(traced(feats, context), net(feats, context))


@pytest.mark.parametrize("config", ["vfmseg_gta2cbm_dinov2l.yaml", "vfmseg_cs2bma_dinov2l.yaml"])
def test_paper_configs_build_the_paper_model(config):
    """The paper configs give DINOv2-L/16 taps [7, 11, 15, 23] and ≈16.6M trainable parameters."""
    from training.build import build_vfmnet
    from training.config import load_config
    from training.train import set_trainable

    cfg = load_config(Path(__file__).resolve().parents[1] / "training" / "configs" / config)
    with torch.device("meta"):
        model = build_vfmnet(cfg.model, load_weights=False)
    set_trainable(model, cfg.model.backbone.finetune)
    assert model.backbone.out_indices == [7, 11, 15, 23] and model.backbone.patch_size == 16
    assert tuple(model.backbone.model.patch_embed.grid_size) == (32, 32)

    def millions(module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6

    assert abs(millions(model.backbone) - 3.15) < 0.01  # LoRA on the 24 qkv projections
    assert abs(millions(model.head) - 6.82) < 0.01
    assert abs(millions(model.refine_head) - 6.64) < 0.01
    assert cfg.inference.mode == "coarse_to_fine" and cfg.inference.theta == 0.968 and cfg.inference.c_tau == 0.8
