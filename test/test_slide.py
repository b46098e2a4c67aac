"""Slide inference: the exported window graph with the runtime's batched windows against the PyTorch loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG, make_tiny_weights
from dgss_perception.card import CardError, load_card
from dgss_perception.engine import Segmenter
from training.checkpoint import load_state_dict_file
from training.config import config_from_dict
from training.export import export_package
from training.inference import Predictor, window_grid

# The tiny VFMNet on 56-pixel windows every 37 pixels of a 112×150 working frame: 3 rows × 4 columns,
# overlapping by different amounts, the last row and column flush with the border.
WORKING = (112, 150)
SLIDE_CONFIG = {
    **TINY_CONFIG,
    "name": "tiny_slide_test",
    "model": {**TINY_CONFIG["model"], "img_size": [56, 56]},
    "inference": {"mode": "slide", "test_size": list(WORKING), "window": 56, "stride": 37},
}


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict, Path]:
    """(config, trained state, exported slide package) of the tiny model."""
    work = tmp_path_factory.mktemp("tiny_slide")
    cfg = make_tiny_weights(work / "weights.safetensors", seed=5, config=SLIDE_CONFIG, sharpen=30.0)
    export_package(cfg, work / "weights.safetensors", work / "package", mode="slide")
    return cfg, load_state_dict_file(work / "weights.safetensors"), work / "package"


def smooth_frame(size: tuple[int, int], seed: int) -> np.ndarray:
    """Blobs of colour with noise, so the labels vary over the frame."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).permute(2, 0, 1)[None].float()
    big = torch.nn.functional.interpolate(small, size=size, mode="bilinear", align_corners=False)[0]
    noise = rng.normal(0, 10, size=(*size, 3))
    return np.clip(big.permute(1, 2, 0).numpy() + noise, 0, 255).astype(np.uint8)


def test_card_lists_the_windows_and_the_parity(slide):
    _, _, package = slide
    card = load_card(package)
    assert card.inference_mode == "slide" and card.available_modes == ("slide",)
    assert (card.input_height, card.input_width) == WORKING
    windows = window_grid(*WORKING, 56, 37)
    assert len(windows) == 12
    assert card.inference_params["windows"] == [list(w) for w in windows]
    assert card.graphs["window"].inputs[0].shape == (-1, 56, 56, 3)
    assert card.graphs["window"].outputs[0].shape == (-1, 19, 56, 56)
    parity = card.export["parity"]
    assert {r["graph"] for r in parity} == {"window/onnx", "window/torchscript"}
    assert all(r["ok"] for r in parity)
    assert card.export["flops"]["window"] > 0


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
@pytest.mark.parametrize("frame_size", [WORKING, (90, 170)])
def test_runtime_equals_the_reference_loop(slide, backend, frame_size):
    """Engine labels (windows batched, overlaps averaged on the host) equal Predictor's per-window loop."""
    cfg, state, package = slide
    predictor = Predictor(config_from_dict(SLIDE_CONFIG), state, mode="slide")
    segmenter = Segmenter(package, backend=backend, device="cpu")
    for seed in range(2):
        rgb = smooth_frame(frame_size, seed)
        want_labels, _ = predictor(rgb)
        with torch.no_grad():
            logits = predictor.logits(rgb)
            top2 = torch.softmax(logits, dim=1).topk(2, dim=1).values[0].numpy()
        # Compare at the working size (the engine's network size), where both ran.
        result = segmenter.segment(rgb)
        assert result.labels.shape == frame_size
        net = Segmenter(package, backend=backend, device="cpu", output_resolution="network").segment(rgb)
        ref = logits.argmax(dim=1)[0].numpy().astype(np.uint8)
        tied = (top2[0] - top2[1]) < 1e-4
        assert np.array_equal(net.labels[~tied], ref[~tied])
        assert len(np.unique(ref)) >= 3  # a frame that exercises several classes
        assert np.abs(net.network_confidence - top2[0]).max() < 1e-4
        # At the frame's size the engine resizes labels (nearest), the reference its logits (bilinear).
        back = cv2.resize(net.labels, frame_size[::-1], interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(result.labels, back)
        assert (result.labels == want_labels).mean() > 0.8


def test_window_batch_does_not_change_the_labels(slide):
    _, _, package = slide
    rgb = smooth_frame(WORKING, 7)
    results = [Segmenter(package, backend="onnx", device="cpu", window_batch=b).segment(rgb) for b in (0, 1, 5)]
    for r in results[1:]:
        assert np.array_equal(r.labels, results[0].labels)
        assert np.allclose(r.network_confidence, results[0].network_confidence, atol=1e-5)
    with pytest.raises(ValueError, match="window_batch"):
        Segmenter(package, backend="onnx", device="cpu", window_batch=-1)


def _copy_with_card(package: Path, dest: Path, edit) -> Path:
    shutil.copytree(package, dest)
    data = json.loads((dest / "card.json").read_text())
    edit(data)
    (dest / "card.json").write_text(json.dumps(data))
    return dest


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["inference"]["params"]["windows"].append([100, 0]), "windows"),
    (lambda d: d["inference"]["params"].update(window=48), "input must be one uint8"),
    (lambda d: d["graphs"]["window"]["outputs"][0].update(shape=[-1, 19, 28, 28]), "output must be float32"),
    (lambda d: d["input"].update(resize="stretch_in_graph"), "input must be|stretch"),
])
def test_inconsistent_slide_cards_are_refused(slide, tmp_path, edit, match):
    _, _, package = slide
    bad = _copy_with_card(package, tmp_path / "bad", edit)
    with pytest.raises(CardError, match=match):
        load_card(bad)


def test_windows_that_leave_pixels_uncovered_are_refused(slide, tmp_path):
    _, _, package = slide
    bad = _copy_with_card(package, tmp_path / "gap", lambda d: d["inference"]["params"].update(windows=[[0, 0]]))
    with pytest.raises(CardError, match="uncovered"):
        Segmenter(bad, backend="onnx", device="cpu")
