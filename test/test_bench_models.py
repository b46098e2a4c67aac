"""Benchmark packages (random weights at real sizes) and the FLOPs every card records."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY_C2F_CONFIG
from dgss_perception.card import load_card
from dgss_perception.engine import Segmenter
from training.backbones.catalog import create_backbone
from training.bench_models import (PRESETS, bench_config, get_preset, main, meta_flops, meta_model, parse_overrides,
                                   sharpen_mask_classification)
from training.checkpoint import load_state_dict_file
from training.config import config_from_dict
from training.export import count_flops
from training.export_wrappers import RefineGraph
from training.inference import model_at_size, window_grid


SLIDE_PRESETS = [name for name in PRESETS if "_slide_" in name]
# Tiny towers for the slide families: they tap four blocks, so depth 4 is their floor.
TINY_TOWERS = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def vit_formula(tokens: int, dim: int, depth: int) -> float:
    """A ViT's FLOPs per image: depth × (24·N·d² + 4·N²·d), a multiply-add counted as 2."""
    return depth * (24 * tokens * dim ** 2 + 4 * tokens ** 2 * dim)


def towers(model):
    """Every timm ViT of a benchmark model: VFMNet's backbone, or a slide family's visual/depth/VLM towers."""
    backbone = model.backbone
    names = ("model", "visual", "depth", "dino", "vlm")
    return [getattr(backbone, n) for n in names if hasattr(getattr(backbone, n, None), "blocks")]


def tower_arch(vit):
    return int(vit.embed_dim), len(vit.blocks), vit.blocks[0].attn.num_heads, int(vit.patch_embed.patch_size[0])


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_on_the_meta_device(name):
    preset = get_preset(name)
    assert preset.name == name and preset.mode in ("whole", "coarse_to_fine", "slide")
    cfg, size = bench_config(preset)
    assert size == preset.size and cfg.model.backbone.weights == "" and cfg.model.backbone.lora is None
    model = meta_model(cfg, size if preset.mode == "whole" else None)
    assert tower_arch(towers(model)[0]) == preset.arch
    assert next(model.parameters()).device.type == "meta"
    if preset.mode == "slide":
        assert cfg.model.family in ("depthforge", "rein", "mfuser") and tuple(cfg.model.img_size) == (512, 512)
        return
    assert cfg.model.family == "vfmnet_mgrnet"
    if preset.mode == "coarse_to_fine":
        assert model.refine_head is not None
        assert size[0] % 4 == 0 and size[1] % 4 == 0
        window_grid(size[0], size[1], cfg.model.refine.window, cfg.inference.stride)
    else:
        assert model.refine_head is None and tuple(cfg.model.img_size) == size


def test_the_paper_preset_is_the_paper_inference():
    cfg, size = bench_config(get_preset("vfmseg_vitl16_c2f_1024x2048"))
    inf = cfg.inference
    assert size == (1024, 2048) and tuple(inf.coarse_size) == (512, 1024)
    assert (cfg.model.refine.window, inf.stride, inf.theta, inf.c_tau) == (512, 320, 0.968, 0.8)
    assert cfg.model.backbone.name == "dinov2_l16" and list(cfg.model.head.channels) == [1024, 512, 256]
    assert len(window_grid(*size, 512, 320)) == 18


@pytest.mark.parametrize("key,size,tokens,tflop", [
    ("dinov2_l16", (512, 1024), 2049, 1.65),
    ("dinov2_l14", (518, 518), 1370, 1.01),
    ("dinov2_l16", (1024, 2048), 8193, 11.6),
])
def test_vit_flops_match_the_analytic_formula(key, size, tokens, tflop):
    """The counted ViT-L backbone (on the meta device) against the formula and the reference floors table."""
    with torch.device("meta"):
        backbone = create_backbone(key, size).eval()
    counted = count_flops(backbone, (torch.empty(1, 3, *size, device="meta"),))
    formula = vit_formula(tokens, 1024, 24)
    # Beyond the formula: only the patch-embedding convolution (0.2%).
    assert formula <= counted <= 1.01 * formula
    assert counted / 1e12 == pytest.approx(tflop, rel=0.01)


def test_counting_on_fake_tensors_equals_a_real_run():
    torch.manual_seed(0)
    backbone = create_backbone("vit_small_patch14_dinov2", (56, 84),
                               overrides={"embed_dim": 32, "depth": 2, "num_heads": 2}).eval()
    x = torch.randn(2, 3, 56, 84)
    counter = FlopCounterMode(display=False)
    # The real run's attention through the math backend too: the CPU's flash kernel is not counted by torch.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        backbone(x)
    assert count_flops(backbone, (x,)) == counter.get_total_flops() > 0


def test_paper_preset_flops():
    """Coarse graph ≈ ViT-L/16 at 512×1024 plus head; a window ≈ ViT-L/16 at 512² plus head and MGRNet."""
    preset = get_preset("vfmseg_vitl16_c2f_1024x2048")
    cfg, size = bench_config(preset)
    flops = meta_flops(cfg, preset.mode, size)
    assert set(flops) == {"coarse", "refine_per_window"}
    coarse, window = vit_formula(2049, 1024, 24), vit_formula(1025, 1024, 24)
    assert coarse < flops["coarse"] < 1.05 * coarse
    assert window < flops["refine_per_window"] < 1.1 * window
    whole = get_preset("vfmnet_vitl16_512x1024")
    assert meta_flops(bench_config(whole)[0], "whole", whole.size) == {"whole": flops["coarse"], "batch": 1}


def test_tiny_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "pkg"
    assert main(["--preset", "tiny", "--out", str(out), "--override", "embed_dim=48", "num_heads=3"]) == 0
    printed = capsys.readouterr().out
    assert "FLOPs per run: whole" in printed and "benchmark package of tiny" in printed
    card = load_card(out)
    raw = card.export
    assert raw["benchmark"] is True and raw["weights"] == "random (benchmark)"
    assert raw["backbone"]["overrides"]["embed_dim"] == 48 and raw["backbone"]["lora"] is None
    assert all(r["ok"] for r in raw["parity"])
    preset = get_preset("tiny")
    cfg, size = bench_config(preset, {"embed_dim": 48, "num_heads": 3})
    assert raw["flops"] == meta_flops(cfg, "whole", size) and raw["flops"]["whole"] > 0
    assert '"benchmark": true' in (out / "card.json").read_text()
    frame = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    result = Segmenter(out).segment(frame)
    assert result.labels.shape == (90, 160) and result.labels.max() < 19
    # The classifier was scaled: labels are not near-ties of all 19 classes (max softmax ≈ 1/19).
    assert result.confidence.mean() > 2 / 19
    assert main(["--preset", "tiny", "--out", str(out)]) == 2  # exists, no --overwrite


def test_tiny_coarse_to_fine_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "pkg"
    assert main(["--preset", "tiny_c2f", "--out", str(out), "--formats", "onnx"]) == 0
    assert "refine_per_window" in capsys.readouterr().out
    card = load_card(out)
    assert card.inference_mode == "coarse_to_fine" and card.export["benchmark"] is True
    flops = card.export["flops"]
    assert flops["coarse"] > 0 and flops["refine_per_window"] > 0
    frame = np.random.default_rng(1).integers(0, 256, (112, 224, 3), dtype=np.uint8)
    result = Segmenter(out, theta=0.999999, c_tau=1.0).segment(frame)
    assert result.labels.shape == (112, 224) and result.windows_refined == 18
    assert result.confidence.mean() > 2 / 19 and len(np.unique(result.labels)) > 1


def test_cli_refuses_bad_requests(tmp_path, capsys):
    assert main(["--preset", "no_such", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--out", str(tmp_path / "x"), "--precision", "bf16"])
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--out", str(tmp_path / "x"), "--height", "56"])
    assert parse_overrides(["depth=2", "qkv_bias=false"]) == {"depth": 2, "qkv_bias": False}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["depth"])
    # The slide families tap four blocks; a frame smaller than a window has no window grid.
    assert main(["--preset", "rein_vitl16_slide_1024x2048", "--out", str(tmp_path / "x"),
                 "--override", "depth=2"]) == 2
    assert "at least 4" in capsys.readouterr().err
    assert main(["--preset", "rein_vitl16_slide_1024x2048", "--out", str(tmp_path / "y"), "--height", "256",
                 "--width", "1024"]) == 2
    assert "smaller than the 512-pixel window" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# Per-window FLOPs and parameters of the released architectures (count_flops on the meta device).
OFFICIAL = {"depthforge_vitl16_slide_1024x2048": (1.76e12, 636.3, 18),
            "depthforge_vitl16_slide_512x1024": (1.76e12, 636.3, 3),
            "rein_vitl16_slide_1024x2048": (0.881e12, 327.8, 18),
            "mfuser_eva02l_slide_1024x2048": (2.56e12, 851.7, 18)}
UNITS = {"T": 1e12, "G": 1e9, "M": 1e6}


def test_list_shows_every_preset_with_its_flops(capsys):
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PRESETS) and "TFLOP" in listing
    for name, (window, params, count) in OFFICIAL.items():
        head, flops = re.search(rf"^{name}: (.*)\n    (.*)$", listing, re.M).groups()
        assert head.startswith(f"slide {name.rsplit('_', 1)[1]}, ViT d=1024 depth=24 heads=16")
        assert f"{params:.1f} M params" in head and f"({count})" in head
        value, unit = re.search(r"window ([\d.]+) (\w)FLOP", flops).groups()
        assert float(value) * UNITS[unit] == pytest.approx(window, rel=0.01)
        total, unit = re.search(rf"a frame: {count} windows, ([\d.]+) (\w)FLOP", flops).groups()
        assert float(total) * UNITS[unit] == pytest.approx(count * window, rel=0.01)


@pytest.mark.parametrize("name", SLIDE_PRESETS)
def test_slide_presets_are_the_official_configs(name):
    preset = get_preset(name)
    cfg, size = bench_config(preset)
    inf = cfg.inference
    assert preset.mode == "slide" and size == preset.size == tuple(inf.test_size)
    assert (inf.mode, inf.window, inf.stride, inf.keep_ratio) == ("slide", 512, 341, False)
    assert len(window_grid(*size, 512, 341)) == OFFICIAL[name][2]
    m = cfg.model
    assert m.backbone.weights == "" and m.backbone.out_indices is None
    if m.family == "depthforge":
        assert m.depthforge.depth.weights == "" and m.depthforge.dqcm
    if m.family == "mfuser":
        assert m.mfuser.vlm.weights == m.mfuser.text.weights == "" and m.mfuser.vlm.embed_dim == 768
    # Catalog taps at full depth are the configs' [7, 11, 15, 23].
    encoder = meta_model(cfg).backbone
    assert list(encoder.out_indices) == [7, 11, 15, 23]
    # Another working frame keeps the window.
    cfg, size = bench_config(preset, size=(512, 1536))
    assert size == (512, 1536) and list(cfg.inference.test_size) == [512, 1536] and cfg.inference.window == 512


@pytest.mark.parametrize("name", ["depthforge_vitl16_slide_512x1024", "rein_vitl16_slide_1024x2048",
                                  "mfuser_eva02l_slide_1024x2048"])
def test_overrides_shrink_every_tower(name):
    preset = get_preset(name)
    cfg, _ = bench_config(preset, TINY_TOWERS)
    model = meta_model(cfg)
    vits = towers(model)
    assert len(vits) == {"depthforge": 2, "rein": 1, "mfuser": 2}[cfg.model.family]
    patch = preset.arch[3]
    assert all(tower_arch(vit) == (32, 4, 2, patch) for vit in vits)
    assert all(tuple(vit.patch_embed.img_size) == (512, 512) for vit in vits)
    flops = meta_flops(cfg, "slide", preset.size)
    assert set(flops) == {"window"} and 0 < flops["window"] < OFFICIAL[name][0] / 5
    # The random-weight edits find their tensors in every family (meta tensors: shapes only).
    sharpen_mask_classification(model)


def test_shrunk_depthforge_slide_package(tmp_path, capsys):
    """A DepthForge benchmark package at tiny tower widths: card, FLOPs, parity and labels that vary."""
    out = tmp_path / "pkg"
    name = "depthforge_vitl16_slide_512x1024"
    args = [f"{k}={v}" for k, v in TINY_TOWERS.items()]
    assert main(["--preset", name, "--out", str(out), "--override", *args, "--formats", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert "FLOPs per run: window" in printed and "a frame: 3 windows" in printed
    card = load_card(out)
    raw = card.export
    assert raw["benchmark"] is True and raw["weights"] == "random (benchmark)"
    assert '"benchmark": true' in (out / "card.json").read_text()
    assert card.family == "depthforge" and card.inference_mode == "slide"
    assert (card.input_height, card.input_width) == (512, 1024)
    assert raw["parity"] and all(r["ok"] for r in raw["parity"])
    assert raw["backbone"]["overrides"] == raw["depthforge"]["depth"]["overrides"] == TINY_TOWERS
    cfg, size = bench_config(get_preset(name), TINY_TOWERS)
    assert raw["flops"] == meta_flops(cfg, "slide", size)
    # A random model's labels are few (one or two classes on most noise frames, seed 0 weights): on this
    # frame they split about evenly, so a head whose masks or classes were lost would show.
    frame = np.random.default_rng(3).integers(0, 256, (512, 1024, 3), dtype=np.uint8)
    result = Segmenter(out).segment(frame)
    assert result.labels.shape == (512, 1024) and result.labels.max() < 19
    counts = np.unique(result.labels, return_counts=True)[1]
    assert len(counts) > 1 and counts.max() < 0.9 * result.labels.size


def test_trained_packages_carry_flops(tiny_model_dir, tiny_c2f_dir):
    whole = load_card(tiny_model_dir).export
    assert whole["flops"]["whole"] > 0 and whole["flops"]["batch"] == 1
    assert "benchmark" not in whole and whole["weights"].endswith("weights.safetensors")
    assert "multiply-add counts as 2" in whole["flops_convention"]

    card = load_card(tiny_c2f_dir)
    flops = card.export["flops"]
    assert set(flops) == {"coarse", "refine_per_window"} and flops["coarse"] > 0
    # The refine graph on K windows costs K times the per-window figure.
    cfg = config_from_dict(TINY_C2F_CONFIG)
    state = load_state_dict_file(tiny_c2f_dir.parent / "weights.safetensors")
    frame = (card.input_height, card.input_width)
    windows = window_grid(*frame, 56, 35)
    refine = RefineGraph(model_at_size(cfg, state, (56, 56)), cfg.model.mean, cfg.model.std, frame, windows, 56)
    image = torch.zeros(1, *frame, 3, dtype=torch.uint8)
    logits = torch.zeros(1, cfg.model.num_classes, 16, 32)
    per_k = {k: count_flops(refine.eval(), (image, logits, torch.arange(k))) for k in (1, 2, len(windows))}
    assert per_k[1] == flops["refine_per_window"]
    assert per_k[2] == pytest.approx(2 * per_k[1], rel=0.01)
    assert per_k[len(windows)] == pytest.approx(len(windows) * per_k[1], rel=0.01)
