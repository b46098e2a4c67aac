"""Training side on tiny configurations: model, LoRA, datasets, one step, resume, export parity."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG, make_tiny_weights
from dgss_perception.engine import Segmenter
from training.backbones.lora import merge_lora
from training.backbones.vit import create_vit, load_backbone_weights, quarter_depth_indices
from training.build import build_vfmnet
from training.checkpoint import load_state_dict_file
from training.config import config_from_dict, load_config
from training.data.datasets import acdc_samples, cityscapes_samples, read_train_ids
from training.export import compare, export_package, load_export_model
from training.export_wrappers import SegmentationGraph, labels_and_confidence
from training.models.deconv_head import DeconvHead
from training.objectives import segmentation_loss
from training.train import set_trainable, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(**data):
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg.update(data)
    return config_from_dict(cfg)


def test_config_rejects_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        config_from_dict({"model": {"backbone": {"nmae": "x"}}})
    assert load_config(ROOT / "training" / "configs" / "demo_tiny.yaml").model.backbone.lora.r == 8
    vfmseg = load_config(ROOT / "training" / "configs" / "demo_vfmseg_tiny.yaml")
    assert vfmseg.model.refine.window == vfmseg.model.img_size[0] == vfmseg.model.img_size[1]
    assert vfmseg.inference.mode == "coarse_to_fine"


def test_feature_taps():
    assert quarter_depth_indices(24) == [5, 11, 17, 23]
    assert quarter_depth_indices(12) == [2, 5, 8, 11]
    model = build_vfmnet(tiny_cfg().model)
    feats = model.backbone(torch.randn(2, 3, 56, 84))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 6)] * 4
    assert model(torch.randn(2, 3, 56, 84)).shape == (2, 19, 16, 24)


def test_paper_sizes_parameter_counts():
    """DINOv2-L LoRA (r=32 on qkv) ≈ 3.15M and the VFMNet decoder ≈ 6.82M, as the reference notes."""
    from training.backbones.lora import LoraSettings, add_lora

    with torch.device("meta"):
        vit = create_vit("vit_large_patch14_dinov2", (512, 512))
        add_lora(vit, LoraSettings(targets=["qkv"]))
        head = DeconvHead(4 * 1024, 19)
    lora = sum(p.numel() for n, p in vit.named_parameters() if "lora_" in n)
    assert lora == 24 * (1024 * 32 + 32 * 3072) == 3_145_728
    assert abs(sum(p.numel() for p in head.parameters()) / 1e6 - 6.82) < 0.01


def test_one_step_reduces_loss_and_grads_reach_only_trainable():
    torch.manual_seed(0)
    model = build_vfmnet(tiny_cfg().model)
    set_trainable(model, "lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 56, 84)
    y = torch.randint(0, 19, (2, 56, 84))
    y[:, :4] = 255
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = segmentation_loss(model(x), y)
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert with_grad <= trainable
        assert {n for n in trainable if "lora_A" in n} <= with_grad or len(losses) == 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_lora_merge_preserves_outputs():
    torch.manual_seed(0)
    model = build_vfmnet(tiny_cfg().model).eval()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    x = torch.randn(1, 3, 56, 84)
    before = model(x)
    merge_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array)


def make_cityscapes(root: Path, split: str, n: int, bad_label: bool = False) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        stem = f"aachen_000000_{i:06d}"
        write_png(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png",
                  rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
        labels = np.zeros((60, 90), np.uint8)
        labels[30:] = 13
        labels[:5] = 255
        if bad_label:
            labels[0, 0] = 40
        write_png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelTrainIds.png", labels)


def test_dataset_layouts(tmp_path):
    make_cityscapes(tmp_path / "cs", "train", 3)
    samples = cityscapes_samples(tmp_path / "cs", "train")
    assert len(samples) == 3 and samples[0].label.name.endswith("_gtFine_labelTrainIds.png")
    assert set(np.unique(read_train_ids(samples[0].label))) == {0, 13, 255}
    write_png(tmp_path / "acdc" / "rgb_anon" / "night" / "val" / "GOPR0351" / "GOPR0351_frame_000001_rgb_anon.png",
              np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "acdc" / "gt" / "night" / "val" / "GOPR0351" / "GOPR0351_frame_000001_gt_labelTrainIds.png",
              np.zeros((8, 8), np.uint8))
    acdc = acdc_samples(tmp_path / "acdc", "val", ["night"])
    assert len(acdc) == 1 and acdc[0].domain == "acdc/night"
    with pytest.raises(FileNotFoundError):
        acdc_samples(tmp_path / "acdc", "val", ["snow"])
    make_cityscapes(tmp_path / "bad", "train", 1, bad_label=True)
    with pytest.raises(ValueError, match=r"aachen_000000_000000_gtFine_labelTrainIds.png holds ids \[40\]"):
        read_train_ids(cityscapes_samples(tmp_path / "bad", "train")[0].label)


def test_train_checkpoint_resume_and_export(tmp_path):
    make_cityscapes(tmp_path / "cs", "train", 4)
    make_cityscapes(tmp_path / "cs", "val", 2)
    cfg = tiny_cfg(data={"root": str(tmp_path / "cs"), "val": [{"root": str(tmp_path / "cs")}],
                         "scale_range": [1.0, 1.2]},
                   optim={"iters": 2, "batch_size": 2, "warmup_iters": 1, "lr_head": 1e-3},
                   num_workers=0, log_every=1, checkpoint_every=1)
    run = tmp_path / "run"
    summary = train(cfg, run, progress=False)
    assert summary["step"] == 2 and "cityscapes" in summary["val_miou"]
    cfg.optim.iters = 4
    train(cfg, run, progress=False)
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == [1, 2, 3, 4]  # resumed at 3, not restarted
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4
    # The run directory is what export reads.
    card = export_package(load_config(run / "config.yaml"), run / "model.safetensors", tmp_path / "pkg")
    assert all(r["ok"] for r in card["export"]["parity"]) and len(card["export"]["parity"]) == 2


def test_corrupt_checkpoint_and_mismatched_weights(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="cannot load"):
        load_state_dict_file(bad)
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "missing.safetensors")
    vit = create_vit("vit_small_patch14_dinov2", (56, 84), overrides={"embed_dim": 32, "depth": 2, "num_heads": 2})
    other = create_vit("vit_small_patch14_dinov2", (56, 84), overrides={"embed_dim": 32, "depth": 3, "num_heads": 2})
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"unexpected \['blocks.2"):
        load_backbone_weights(vit, tmp_path / "other.pth")
    torch.save(vit.state_dict(), tmp_path / "same.pth")
    load_backbone_weights(create_vit("vit_small_patch14_dinov2", (56, 84),
                                     overrides={"embed_dim": 32, "depth": 2, "num_heads": 2}), tmp_path / "same.pth")


def test_export_at_other_size_and_logits_kind(tmp_path, tiny_model_dir):
    cfg = make_tiny_weights(tmp_path / "w.safetensors")
    card = export_package(cfg, tmp_path / "w.safetensors", tmp_path / "big", size=(70, 112))
    assert card["input"]["height"] == 70 and card["graphs"]["whole"]["inputs"][0]["shape"] == [1, 70, 112, 3]
    export_package(cfg, tmp_path / "w.safetensors", tmp_path / "logits", output_kind="logits", formats=("onnx",))
    rgb = np.random.default_rng(3).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    a = Segmenter(tmp_path / "logits").segment(rgb)
    b = Segmenter(tiny_model_dir).segment(rgb)
    assert (a.labels != b.labels).mean() < 1e-3
    assert np.abs(a.confidence - b.confidence).max() < 1e-4
    with pytest.raises(FileExistsError):
        export_package(cfg, tmp_path / "w.safetensors", tmp_path / "big")


def test_labels_and_confidence_equal_softmax_max():
    """The graphs' 1 / Σ exp(l − max) confidence and argmax equal softmax(...).max() (the plain form)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 19, 33, 47, generator=gen) * 6
    logits[0, 4, :5] = logits[0, 7, :5] = 50.0  # exact ties: both forms take the first class
    labels, confidence = labels_and_confidence(logits)
    ref_confidence, ref_labels = torch.softmax(logits, dim=1).max(dim=1)
    assert labels.dtype == torch.uint8 and confidence.dtype == torch.float32
    assert torch.equal(labels, ref_labels.to(torch.uint8)) and (labels[0, :5] == 4).all()
    assert torch.allclose(confidence, ref_confidence, atol=1e-6, rtol=0)


def test_parity_check_detects_a_wrong_graph(tmp_path):
    cfg = make_tiny_weights(tmp_path / "w.safetensors")
    model = load_export_model(cfg, tmp_path / "w.safetensors", (56, 84))
    graph = SegmentationGraph(model, cfg.model.mean, cfg.model.std)
    image = torch.randint(0, 256, (1, 56, 84, 3), dtype=torch.uint8)
    with torch.no_grad():
        ref = [t.numpy() for t in graph(image)]
        probs = torch.softmax(SegmentationGraph(model, cfg.model.mean, cfg.model.std, "logits")(image)[0], 1).numpy()
    assert compare("same", ref, ref, probs, "labels_confidence", 1e-4)["ok"]
    off = [ref[0], ref[1] + 1e-3]
    result = compare("off", off, ref, probs, "labels_confidence", 1e-4)
    assert not result["ok"] and result["max_abs_diff"] > 5e-4
    wrong = [(ref[0] + 1) % 19, ref[1]]
    assert not compare("wrong", [w.astype(np.uint8) for w in wrong], ref, probs, "labels_confidence", 1e-4)["ok"]
