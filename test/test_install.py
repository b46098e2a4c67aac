"""A reproducible install: the pinned set, FLOP counts that do not depend on the attention kernel, palettes."""

from __future__ import annotations

import copy
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from packaging.requirements import Requirement
from torch import nn

from conftest import TINY_CONFIG, make_tiny_weights
from dgss_perception.card import load_card
from dgss_perception.engine import Segmenter
from dgss_perception.labels import CITYSCAPES_PALETTE, IGNORE_INDEX, colorize, palette_for, palette_lut
from training.backbones.catalog import create_backbone
from training.export import count_flops, export_package

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
# The virtual environment each lock file is installed into by the README and .ci/run.
VENV_LOCKS = {ROOT / ".venv": LOCKS / "lock.txt", ROOT / ".venv-jazzy": LOCKS / "lock-jazzy.txt"}


def lock_pins(path: Path) -> dict[str, str]:
    """``{distribution: version}`` of a lock file's lines whose marker holds for this Python."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {line!r} is not an exact pin"
            pins[canonical(req.name)] = spec.version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class Attention(nn.Module):
    """Only scaled-dot-product attention on (B,H,N,dh) q, k, v: 2 · 2·B·H·N²·dh FLOPs."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_attention_is_counted_whatever_the_device(device):
    b, h, n, dh = 2, 3, 197, 64
    q = torch.zeros(b, h, n, dh, device=device)
    # Dropping attention (as CPU flash attention was dropped by the counter) would count 0 here.
    assert count_flops(Attention(), (q,)) == 4 * b * h * n * n * dh


def test_vit_count_is_the_same_on_cpu_and_meta():
    """The count of a real ViT on the CPU equals the meta count and the analytic formula (+ patch embedding)."""
    overrides = {"embed_dim": 96, "depth": 2, "num_heads": 2}
    size = (224, 448)
    counts = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            backbone = create_backbone("dinov2_l16", size, overrides=overrides).eval()
        counts[device] = count_flops(backbone, (torch.zeros(1, 3, *size, device=device),))
    tokens, dim, depth = 14 * 28 + 1, 96, 2
    blocks = depth * (24 * tokens * dim ** 2 + 4 * tokens ** 2 * dim)
    patch = 2 * (14 * 28) * dim * (3 * 16 * 16)
    assert counts["cpu"] == counts["meta"]
    assert blocks + patch <= counts["cpu"] <= 1.001 * (blocks + patch)


def test_palette_beyond_cityscapes():
    for n in (1, 19):
        assert palette_for(n) == CITYSCAPES_PALETTE[:n]
    palette = palette_for(150)
    assert len(palette) == 150 and palette[:19] == CITYSCAPES_PALETTE
    assert len(set(palette)) == 150 and (0, 0, 0) not in palette
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette)
    assert palette_for(150) == palette  # deterministic: the same classes always get the same colours
    assert palette_for(255)[:150] == palette  # a longer set extends a shorter one
    # Farthest-point picks: no two colours nearly equal (squared distance on a 16-level grid).
    colours = np.asarray(palette, np.int64)
    gaps = ((colours[:, None] - colours[None]) ** 2).sum(-1) + np.eye(150, dtype=np.int64) * 10 ** 6
    assert gaps.min() >= 17 ** 2
    for bad in (0, IGNORE_INDEX + 1):
        with pytest.raises(ValueError, match="1 to 255 classes"):
            palette_for(bad)


def test_export_of_more_than_19_classes_loads_and_colours(tmp_path):
    config = copy.deepcopy(TINY_CONFIG)
    config["model"]["num_classes"] = 24
    cfg = make_tiny_weights(tmp_path / "w.safetensors", config=config)
    export_package(cfg, tmp_path / "w.safetensors", tmp_path / "pkg", formats=("onnx",))
    card = load_card(tmp_path / "pkg")  # refused before: 19 colours for 24 classes
    assert len(card.classes) == len(card.palette) == 24 == len(set(card.palette))
    segmenter = Segmenter(tmp_path / "pkg", backend="onnx", device="cpu")
    labels = segmenter.segment(np.random.default_rng(0).integers(0, 256, (56, 84, 3), np.uint8)).labels
    assert labels.max() < 24
    lut = palette_lut(card.palette)
    np.testing.assert_array_equal(colorize(labels, lut), np.asarray(card.palette, np.uint8)[labels])


@pytest.mark.parametrize("lock", sorted(VENV_LOCKS.values()), ids=lambda p: p.name)
def test_lock_files_are_exact_and_within_setup_ranges(lock):
    """Every line pins one version; the pins of setup.py's requirements satisfy its compatible ranges."""
    pins = lock_pins(lock)
    jazzy = "jazzy" in lock.name
    needed = ["torch", "timm", "peft", "onnxruntime", "rosbags", "pytest", "numpy", "setuptools"]
    needed += ["ros-jazzy-rclpy"] if jazzy else ["ros-kilted-rclpy", "onnxruntime-gpu"]
    for name in needed:
        assert name in pins, f"{lock.name} does not pin {name}"
    setup = (ROOT / "setup.py").read_text()
    ranged = re.findall(r'"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?[<>=!~][^"]*)"', setup)
    assert len(ranged) >= 10
    for text in ranged:
        req = Requirement(text)
        if canonical(req.name) in pins:
            assert req.specifier.contains(pins[canonical(req.name)], prereleases=True), (lock.name, text)


def test_installed_versions_are_the_pinned_ones():
    """In the README's environments (.venv, CI's .venv-jazzy) every installed distribution is the locked one."""
    lock = VENV_LOCKS.get(Path(sys.prefix).resolve())
    if lock is None:
        pytest.skip(f"not one of the README's environments ({sys.prefix}): installed with ranges, not the lock")
    pins = lock_pins(lock)
    # What pip installed (an INSTALLER record): the ROS wheels also carry their packages' own build metadata.
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()
                 if (d.read_text("INSTALLER") or "").strip() == "pip"}
    installed.pop("dgss-perception", None)
    for tool in ("pip", "setuptools", "wheel"):  # the venv's own, not resolved from the package's requirements
        if tool not in pins:
            installed.pop(tool, None)
    wrong = {n: (v, pins.get(n)) for n, v in installed.items() if pins.get(n) != v}
    assert not wrong, f"installed (version, pinned) differ from {lock.name}: {wrong}"
    # The CPU and GPU builds of ONNX Runtime both provide the module onnxruntime: never both.
    assert not {"onnxruntime", "onnxruntime-gpu"} <= set(installed)
