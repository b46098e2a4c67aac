"""DepthForge and Rein: tokens, DQCM, the lockstep encoder, training split, parameter counts, export, runtime."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import (TINY_DEPTHFORGE_CONFIG, TINY_REIN_CONFIG, check_slide_runtime, labelled_batch,
                      loss_before_and_after_steps, make_tiny_depthforge_weights)
from dgss_perception.card import load_card
from dgss_perception.engine import Segmenter
from onnxutil import op_types
from training.build import build_model
from training.config import config_from_dict, load_config
from training.export import export_package
from training.inference import window_grid
from training.models.depthforge import DepthForge
from training.models.query_correction import FULL_SIZE_PARAMS as DQCM_PARAMS
from training.models.query_correction import QueryCorrection
from training.models.rein_encoder import ReinEncoder
from training.models.rein_tokens import FULL_SIZE_PARAMS as REIN_PARAMS
from training.models.rein_tokens import ReinTokens, reference_delta
from training.objectives import compute_loss
from training.train import DEPTHFORGE_FROZEN, set_trainable

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
TRAINABLE_ROOTS = ("backbone.reins.", "decode_head.")


def tiny_vit(seed: int, size: int = 64, depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=size,
                             patch_size=16, embed_dim=32, depth=depth, num_heads=2).eval()


def tiny_tokens(seed: int = 0, layers: int = 4, scale: float = 0.5) -> ReinTokens:
    torch.manual_seed(seed)
    tokens = ReinTokens(layers, 32, patch_size=16, token_length=10, rank=4, query_dim=16)
    with torch.no_grad():
        tokens.scale.fill_(scale)
    return tokens


# ---- tokens -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_depth", [False, True])
def test_token_update_equals_the_official_formulation(with_depth):
    tokens = tiny_tokens()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 16, 32, generator=g)
    depth = torch.randn(2, 16, 32, generator=g) if with_depth else None
    torch.testing.assert_close(tokens.delta(feats, 2, depth), reference_delta(tokens, feats, 2, depth))
    x = torch.cat([torch.randn(2, 1, 32, generator=g), feats], dim=1)
    out = tokens(x, 2, depth)
    assert torch.equal(out[:, :1], x[:, :1])  # the class token passes unchanged
    torch.testing.assert_close(out[:, 1:], feats + 0.5 * reference_delta(tokens, feats, 2, depth))


def test_depth_steers_only_the_attention():
    tokens = tiny_tokens()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 16, 32, generator=g)
    depth = torch.randn(1, 16, 32, generator=g)
    # Zero depth is Rein; another depth map changes the update.
    torch.testing.assert_close(tokens.delta(feats, 0, torch.zeros_like(feats)), tokens.delta(feats, 0))
    assert not torch.allclose(tokens.delta(feats, 0, depth), tokens.delta(feats, 0), atol=1e-4)
    with pytest.raises(ValueError, match="same token grid"):
        tokens(torch.randn(1, 17, 32), 0, torch.randn(1, 9, 32))


def test_token_zero_is_left_out_of_the_sum():
    """The update depends on token 0's value only through its softmax weight."""
    tokens = tiny_tokens()
    feats = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(3))
    t = tokens.tokens(1)
    attn = torch.softmax(feats @ t.t() / 32 ** 0.5, dim=-1)
    manual = tokens.mlp_delta_f(attn[..., 1:] @ tokens.mlp_token2feat(t[1:]) + feats)
    torch.testing.assert_close(tokens.delta(feats, 1), manual)
    with_zero = tokens.mlp_delta_f(attn @ tokens.mlp_token2feat(t) + feats)
    assert not torch.allclose(with_zero, manual, atol=1e-5)


def test_queries_pool_over_layers_in_the_released_order():
    tokens = tiny_tokens()
    t = tokens.transform(tokens.tokens()).permute(1, 2, 0)  # (M, C, layers), as the official code pools
    pooled = torch.cat([F.max_pool1d(t, 4), F.avg_pool1d(t, 4), t[:, :, -1:]], dim=-1).flatten(-2)
    torch.testing.assert_close(tokens.queries(), tokens.merge(pooled))
    assert tokens.queries().shape == (10, 16)


def test_official_initialisation():
    tokens = ReinTokens(24, 1024, patch_size=16)
    bound = (6.0 / (3 * 256 + (1024 * 16) ** 0.5)) ** 0.5
    assert tokens.learnable_tokens_a.abs().max() <= bound and tokens.learnable_tokens_b.abs().max() <= bound
    assert tokens.learnable_tokens_a.abs().max() > 0.9 * bound
    assert float(tokens.scale.detach()) == pytest.approx(1e-3)
    assert tokens.tokens().shape == (24, 100, 1024)


# ---- DQCM ---------------------------------------------------------------------------------------------

def test_query_correction_equals_its_definition():
    torch.manual_seed(0)
    dqcm = QueryCorrection(32, num_levels=4, reduction=16)
    maps = [torch.randn(2, 32, s, s) for s in (16, 8, 4, 2)]
    gate = dqcm.attention_gate
    gated = []
    for m in maps:
        m = F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False)
        ca = torch.sigmoid(gate.channel_attention[2](torch.relu(gate.channel_attention[0](m))))
        m = m * ca
        gated.append(m * torch.sigmoid(gate.spatial_attention(m)))
    torch.testing.assert_close(dqcm(maps), dqcm.linear_fuse(torch.cat(gated, dim=1)))
    assert dqcm(maps).shape == (2, 32, 16, 16)
    with pytest.raises(ValueError, match="4 maps"):
        dqcm(maps[:3])


# ---- encoder ------------------------------------------------------------------------------------------

def test_encoder_with_silent_tokens_gives_the_towers_raw_blocks():
    visual = tiny_vit(0)
    encoder = ReinEncoder(visual, tiny_tokens(scale=0.0), tiny_vit(1), out_indices=[1, 3], scales=(2.0, 0.5))
    x = torch.randn(2, 3, 64, 64)
    want = visual.forward_intermediates(x, indices=[1, 3], norm=False, output_fmt="NCHW", intermediates_only=True)
    got = encoder(x)
    torch.testing.assert_close(got[0], F.interpolate(want[0], size=(8, 8), mode="bilinear", align_corners=False))
    torch.testing.assert_close(got[1], F.interpolate(want[1], size=(2, 2), mode="bilinear", align_corners=False))


def test_encoder_runs_the_depth_tower_unchanged_and_is_steered_by_it():
    visual, depth = tiny_vit(0), tiny_vit(1)
    encoder = ReinEncoder(visual, tiny_tokens(), depth, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.randn(1, 3, 64, 64)
    seen = []
    hook = depth.blocks[2].register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    encoder.taps(x)
    hook.remove()
    # The depth tower sees the pixels in its own (ImageNet) statistics and is never refined.
    pixels = (x * 0.25 + 0.5 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    alone = depth.forward_intermediates(pixels, indices=[2], norm=False, output_fmt="NLC",
                                        intermediates_only=True)[0]
    torch.testing.assert_close(seen[0][:, 1:], alone)
    rein = ReinEncoder(visual, encoder.reins, None)
    with torch.no_grad():
        encoder.reins.learnable_tokens_b.mul_(20.0)  # logits large enough for the softmax to move
    assert (encoder(x)[2] - rein(x)[2]).abs().max() > 1e-3  # float noise here is ~1e-6


def test_encoder_refuses_towers_that_do_not_line_up():
    with pytest.raises(ValueError, match="token grids differ"):
        ReinEncoder(tiny_vit(0), tiny_tokens(), tiny_vit(1, size=80))
    with pytest.raises(ValueError, match="must match the visual tower"):
        ReinEncoder(tiny_vit(0), tiny_tokens(), tiny_vit(1, depth=3))
    with pytest.raises(ValueError, match="tokens for 3 layers"):
        ReinEncoder(tiny_vit(0), tiny_tokens(layers=3))


# ---- the model ------------------------------------------------------------------------------------------

def tiny_model(config: dict = TINY_DEPTHFORGE_CONFIG, seed: int = 0) -> tuple[DepthForge, object]:
    cfg = config_from_dict(copy.deepcopy(config))
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.backbone.reins.scale.fill_(0.5)
    set_trainable(model, cfg.model.backbone.finetune)
    return model, cfg


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return labelled_batch(64, seed)


@pytest.mark.parametrize("config", [TINY_DEPTHFORGE_CONFIG, TINY_REIN_CONFIG], ids=["depthforge", "rein"])
def test_forward_shapes_and_the_scores_are_the_last_set(config):
    model, _ = tiny_model(config)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.forward_train(x)
        scores = model(x)
    assert len(out.class_logits) == len(out.mask_logits) == 4  # initial queries + 3 layers
    assert out.class_logits[-1].shape == (2, 10, 20) and out.mask_logits[-1].shape == (2, 10, 16, 16)
    want = torch.einsum("nqc,nqhw->nchw", out.class_logits[-1].softmax(-1)[..., :-1], out.mask_logits[-1].sigmoid())
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(x, queries=model.queries()), scores)
    assert model.uses_depth == (config is TINY_DEPTHFORGE_CONFIG)


@pytest.mark.parametrize("config", [TINY_DEPTHFORGE_CONFIG, TINY_REIN_CONFIG], ids=["depthforge", "rein"])
def test_gradients_reach_exactly_the_tokens_the_correction_and_the_head(config):
    model, cfg = tiny_model(config)
    images, labels = batch()
    loss, parts = compute_loss(model, images, labels, cfg)
    assert set(parts) == {"loss_cls", "loss_mask", "loss_dice"}
    loss.backward()
    names = dict(model.named_parameters())
    for name, p in names.items():
        trainable = name.startswith(TRAINABLE_ROOTS)
        assert p.requires_grad == trainable == (not name.startswith(DEPTHFORGE_FROZEN)), name
        assert (p.grad is not None) == trainable, name
    learners = ["backbone.reins.learnable_tokens_a", "backbone.reins.learnable_tokens_b", "backbone.reins.scale",
                "backbone.reins.mlp_token2feat.weight", "backbone.reins.mlp_delta_f.weight",
                "backbone.reins.transform.weight", "backbone.reins.merge.weight", "decode_head.querys2feat.weight",
                "decode_head.pixel_decoder.mask_feature.weight", "decode_head.decoder.cls_embed.weight"]
    if config is TINY_DEPTHFORGE_CONFIG:
        learners += ["decode_head.correction.linear_fuse.weight",
                     "decode_head.correction.attention_gate.spatial_attention.weight"]
        assert any(n.startswith("backbone.depth.") for n in names)
    else:
        assert not any(n.startswith(("backbone.depth.", "decode_head.correction.")) for n in names)
    for name in learners:
        assert names[name].grad.abs().sum() > 0, name


def test_optimizer_steps_lower_the_loss():
    model, cfg = tiny_model(seed=1)
    towers = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before, after = loss_before_and_after_steps(model, cfg, *batch(1))
    assert after < 0.9 * before
    assert all(torch.equal(p, towers[n]) for n, p in model.named_parameters() if n in towers)


def test_family_and_sections_must_agree():
    data = copy.deepcopy(TINY_REIN_CONFIG)
    data["model"]["depthforge"]["dqcm"] = True
    with pytest.raises(ValueError, match="family rein is DepthForge without depth"):
        build_model(config_from_dict(data).model)
    data = copy.deepcopy(TINY_DEPTHFORGE_CONFIG)
    data["model"]["depthforge"]["depth"] = None
    with pytest.raises(ValueError, match="needs model.depthforge.depth"):
        build_model(config_from_dict(data).model)


# ---- official sizes and configs ----------------------------------------------------------------------------

def test_paper_size_parameter_counts():
    """Per module at the official size, beside the reference (official_vfmseg_depthforge_rein.md §2–3)."""
    cfg = load_config(CONFIGS / "depthforge_gta2cbm_dinov2l.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model, load_weights=False)

    def count(prefix: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))

    assert count("backbone.reins.") == REIN_PARAMS == 2_990_081  # reference: Rein tokens 2.99M
    assert count("decode_head.correction.") == DQCM_PARAMS == 4_336_705  # reference: DQCM 4.34M
    assert count("backbone.visual.") == 304_198_656  # DINOv2-L at patch 16 (16² kernels), 32² + 1 positions
    assert count("backbone.depth.") == count("backbone.visual.")  # Depth Anything V2-L's encoder, same shape
    head = count("decode_head.pixel_decoder.") + count("decode_head.decoder.") + count("decode_head.querys2feat.")
    trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(DEPTHFORGE_FROZEN))
    assert trainable == REIN_PARAMS + DQCM_PARAMS + head
    rein = load_config(CONFIGS / "rein_gta2cbm_dinov2l.yaml")
    with torch.device("meta"):
        baseline = build_model(rein.model, load_weights=False)
    assert sum(p.numel() for p in baseline.parameters()) == count("") - count("backbone.depth.") - DQCM_PARAMS


@pytest.mark.parametrize("name", ["depthforge_gta2cbm_dinov2l.yaml", "depthforge_cs2acdc_dinov2l.yaml",
                                  "rein_gta2cbm_dinov2l.yaml", "rein_cs2acdc_dinov2l.yaml"])
def test_paper_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.family == name.split("_")[0] and cfg.model.img_size == [512, 512]
    assert cfg.model.backbone.name == "dinov2_l16" and cfg.model.backbone.out_indices == [7, 11, 15, 23]
    assert cfg.inference.mode == "slide" and (cfg.inference.window, cfg.inference.stride) == (512, 341)
    d = cfg.model.depthforge
    assert (d.token_length, d.rank, d.scale_init) == (100, 16, 1e-3)
    assert (d.depth is not None) == d.dqcm == (cfg.model.family == "depthforge")
    # The released schedules: 1e-4 from GTAV, 5e-4 from Cityscapes, one-cycle over 50k iterations.
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.lr_head == (1e-4 if "gta" in name else 5e-4)
    assert cfg.optim.schedule == "onecycle" and cfg.optim.iters == 50000


# ---- export and runtime -------------------------------------------------------------------------------------

def test_package_card_parity_both_encoders_and_constant_queries(tiny_depthforge_dir):
    card = load_card(tiny_depthforge_dir)
    assert card.family == "depthforge" and card.inference_mode == "slide"
    assert card.backbones == ("dinov2_l16", "depth_anything_v2_l16")
    assert (card.input_height, card.input_width) == (96, 150)
    assert card.inference_params["windows"] == [list(w) for w in window_grid(96, 150, 64, 43)]
    assert all(r["ok"] for r in card.export["parity"]) and len(card.export["parity"]) == 2
    assert card.export["depthforge"]["depth"]["name"] == "depth_anything_v2_l16"
    import onnx

    model = onnx.load(str(tiny_depthforge_dir / "window.onnx"))
    assert not op_types(model) & {"Loop", "Scan", "If"}
    names = [t.name for t in model.graph.initializer]
    shapes = [tuple(t.dims) for t in model.graph.initializer]
    # Both towers are in the one graph: two patch embeddings (32, 3, 16, 16).
    assert shapes.count((32, 3, 16, 16)) == 2
    # The queries are a constant (1 × 10 × 32; querys2feat of them folded too); the token-to-query layers are not
    # in the graph, while every layer's tokens are (folded to their transposes, 32 × 10, as is each layer's
    # mlp_token2feat of them).
    assert shapes.count((1, 10, 32)) >= 2
    assert not any(".reins.merge." in n or ".reins.transform." in n for n in names)
    assert any(n.endswith(".reins.scale") for n in names) and shapes.count((32, 10)) == 4


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_runtime_equals_the_reference_slide(tiny_depthforge_dir, backend):
    check_slide_runtime(tiny_depthforge_dir, TINY_DEPTHFORGE_CONFIG, backend, window_batch=4)


def test_rein_baseline_exports_and_segments(tmp_path):
    cfg = make_tiny_depthforge_weights(tmp_path / "weights.safetensors", seed=2, config=TINY_REIN_CONFIG)
    card = export_package(cfg, tmp_path / "weights.safetensors", tmp_path / "pkg", formats=("onnx",))
    assert card["family"] == "rein" and card["backbones"] == ["dinov2_l16"]
    assert card["export"]["depthforge"]["depth"] is None and all(r["ok"] for r in card["export"]["parity"])
    rgb = np.random.default_rng(0).integers(0, 256, (96, 150, 3), dtype=np.uint8)
    result = Segmenter(tmp_path / "pkg", backend="onnx").segment(rgb)
    assert result.labels.shape == (96, 150) and result.labels.max() < 19


def test_training_run_evaluates_in_slide_mode_and_exports(tmp_path):
    """Two steps of training.train (one-cycle schedule, no decay on norms and tokens), slide evaluation, export."""
    from test_training import make_cityscapes
    from training.train import train

    make_cityscapes(tmp_path / "cs", "train", 2)
    make_cityscapes(tmp_path / "cs", "val", 1)
    data = copy.deepcopy(TINY_DEPTHFORGE_CONFIG)
    data["data"] = {"root": str(tmp_path / "cs"), "val": [{"root": str(tmp_path / "cs")}], "scale_range": [1.0, 1.2]}
    data["optim"] = {"iters": 4, "batch_size": 2, "lr_backbone": 1e-4, "lr_head": 1e-4, "schedule": "onecycle",
                     "onecycle_pct": 0.5, "no_decay_norm": True, "no_decay_keys": ["learnable_tokens", "reins.scale"]}
    data["inference"] = {"mode": "slide", "test_size": [70, 100], "window": 64, "stride": 36}
    data.update(num_workers=0, log_every=1, checkpoint_every=4)
    cfg = config_from_dict(data)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["step"] == 4 and "cityscapes" in summary["val_miou"]
    card = export_package(load_config(tmp_path / "run" / "config.yaml"), tmp_path / "run" / "model.safetensors",
                          tmp_path / "pkg", formats=("onnx",))
    assert card["inference"]["mode"] == "slide" and all(r["ok"] for r in card["export"]["parity"])
    assert card["inference"]["params"]["windows"] == [[0, 0], [0, 36], [6, 0], [6, 36]]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("lr" in line for line in lines)


# ---- the released schedule -------------------------------------------------------------------------------------

def test_one_cycle_factor_equals_torch_one_cycle():
    from training.train import one_cycle

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=100, pct_start=0.2,
                                                anneal_strategy="cos", div_factor=10, final_div_factor=10,
                                                cycle_momentum=False)
    for step in range(100):
        assert opt.param_groups[0]["lr"] == pytest.approx(one_cycle(step, 100, 0.2, 10, 10), abs=1e-12), step
        opt.step()
        sched.step()
    assert one_cycle(0, 100, 0.2, 10, 10) == pytest.approx(0.1) and one_cycle(99, 100, 0.2, 10, 10) == 0.01


def test_no_weight_decay_on_norms_embeddings_and_tokens():
    from training.train import build_optimizer, lr_factor

    model, cfg = tiny_model()
    cfg.optim.weight_decay, cfg.optim.lr_backbone, cfg.optim.lr_head = 0.05, 1e-4, 2e-4
    cfg.optim.no_decay_norm = True
    cfg.optim.no_decay_keys = ["level_embed", "learnable_tokens", "reins.scale"]
    opt = build_optimizer(model, cfg)
    where = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(where) == {id(p) for p in names.values()}
    exempt = {"backbone.reins.learnable_tokens_a", "backbone.reins.scale", "decode_head.decoder.level_embed.weight",
              "decode_head.decoder.transformer_decoder.layers.0.norms.1.weight",
              "decode_head.pixel_decoder.input_convs.0.gn.bias"}
    decayed = {"backbone.reins.mlp_delta_f.weight", "decode_head.querys2feat.weight",
               "decode_head.correction.linear_fuse.weight"}
    for name in exempt | decayed:
        lr = 1e-4 if name.startswith("backbone.") else 2e-4
        assert where[id(names[name])] == (lr, 0.0 if name in exempt else 0.05), name
    cfg.optim.schedule = "cosine"
    with pytest.raises(ValueError, match="poly or onecycle"):
        lr_factor(cfg)
