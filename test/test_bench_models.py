"""Benchmark packages (random weights at real sizes) and the FLOPs every card records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY_C2F_CONFIG
from dgss_perception.card import load_card
from dgss_perception.engine import Segmenter
from training.backbones.catalog import create_backbone
from training.bench_models import PRESETS, bench_config, get_preset, main, meta_flops, meta_model, parse_overrides
from training.checkpoint import load_state_dict_file
from training.config import config_from_dict
from training.export import count_flops
from training.export_wrappers import RefineGraph
from training.inference import model_at_size, window_grid


def vit_formula(tokens: int, dim: int, depth: int) -> float:
    """A ViT's FLOPs per image: depth × (24·N·d² + 4·N²·d), a multiply-add counted as 2."""
    return depth * (24 * tokens * dim ** 2 + 4 * tokens ** 2 * dim)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_on_the_meta_device(name):
    preset = get_preset(name)
    assert preset.name == name and preset.mode in ("whole", "coarse_to_fine")
    cfg, size = bench_config(preset)
    assert size == preset.size and cfg.model.backbone.weights == "" and cfg.model.backbone.lora is None
    model = meta_model(cfg, size if preset.mode == "whole" else tuple(cfg.model.img_size))
    vit = model.backbone.model
    assert (model.backbone.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads,
            model.backbone.patch_size) == preset.arch
    assert next(model.parameters()).device.type == "meta"
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
    with torch.no_grad(), counter:
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
        main(["--preset", "tiny", "--out", str(tmp_path / "x"), "--precision", "fp16"])
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--out", str(tmp_path / "x"), "--height", "56"])
    assert parse_overrides(["depth=2", "qkv_bias=false"]) == {"depth": 2, "qkv_bias": False}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["depth"])
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PRESETS) and "TFLOP" in listing


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
