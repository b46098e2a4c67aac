"""Shared fixtures: a tiny model package made by the real export pipeline."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # training/ is used from the checkout, not installed
    sys.path.insert(0, str(ROOT))

TINY_CONFIG = {
    "name": "tiny_test",
    "model": {
        "family": "vfmnet_mgrnet",
        "img_size": [56, 84],
        "backbone": {"name": "vit_small_patch14_dinov2", "weights": "",
                     "overrides": {"embed_dim": 32, "depth": 4, "num_heads": 2},
                     "lora": {"r": 4, "alpha": 4, "dropout": 0.0, "targets": ["qkv"]}},
        "head": {"channels": [32, 16, 16], "dropout": 0.1},
    },
}


# The tiny model with an MGRNet refine head, for coarse-to-fine inference on 112×224 frames:
# stage 1 at 56×112, 56-pixel windows every 35 pixels (3 × 6 = 18 windows, as the paper's 1024×2048).
TINY_C2F_CONFIG = {
    **TINY_CONFIG,
    "name": "tiny_c2f_test",
    "model": {**TINY_CONFIG["model"], "img_size": [56, 56],
              "refine": {"dim": 16, "depth": 2, "heads": 2, "head_dim": 8, "ffn_dim": 32, "mask_channels": [8, 16],
                         "dropout": 0.1, "window": 56}},
    "inference": {"mode": "coarse_to_fine", "test_size": [112, 224], "coarse_size": [56, 112], "window": 56,
                  "stride": 35, "theta": 0.9, "c_tau": 0.8},
}


# A tiny MFuser: DINOv2- and EVA02-shaped towers of width 32 and depth 4 at 56² (4×4 tokens), a 2-layer
# EVA02-CLIP-shaped text tower with a 24-wide joint space, and a small head; 56-pixel windows every 37 pixels
# of a 112×150 working frame for slide inference.
TINY_MFUSER_CONFIG = {
    "name": "tiny_mfuser_test",
    "model": {
        "family": "mfuser",
        "img_size": [56, 56],
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "backbone": {"name": "vit_small_patch14_dinov2", "weights": "", "lora": None, "finetune": "frozen",
                     "overrides": {"embed_dim": 32, "depth": 4, "num_heads": 2}},
        "mfuser": {
            "vlm": {"name": "eva02_l14", "overrides": {"embed_dim": 32, "depth": 4, "num_heads": 2}, "embed_dim": 24},
            "text": {"name": "eva02_clip_l14", "overrides": {"width": 32, "layers": 2, "heads": 2, "output_dim": 24}},
            "enhancer_width": 16, "enhancer_heads": 2, "conv_dim": 32, "mask_dim": 32, "pixel_decoder_layers": 2,
            "decoder_layers": 3, "heads": 4, "ffn_dim": 64, "num_points": 64,
        },
    },
    "inference": {"mode": "slide", "test_size": [112, 150], "window": 56, "stride": 37},
}


# A tiny DepthForge: DINOv2- and Depth-Anything-V2-shaped towers of width 32 and depth 4 at patch 16 on 64²
# windows (4×4 tokens, maps at 16², 8², 4², 2²), 10 tokens of rank 4 per layer, DQCM and a small Mask2Former
# head; 64-pixel windows every 43 pixels of a 96×150 working frame (6 windows).
TINY_DEPTHFORGE_CONFIG = {
    "name": "tiny_depthforge_test",
    "model": {
        "family": "depthforge",
        "img_size": [64, 64],
        "backbone": {"name": "dinov2_l16", "weights": "", "lora": None, "finetune": "frozen",
                     "overrides": {"embed_dim": 32, "depth": 4, "num_heads": 2}},
        "depthforge": {
            "depth": {"name": "depth_anything_v2_l16", "overrides": {"embed_dim": 32, "depth": 4, "num_heads": 2}},
            "token_length": 10, "rank": 4, "conv_dim": 32, "mask_dim": 32, "pixel_decoder_layers": 2,
            "pixel_ffn_dim": 64, "decoder_layers": 3, "heads": 4, "ffn_dim": 64, "num_points": 64,
        },
    },
    "inference": {"mode": "slide", "test_size": [96, 150], "window": 64, "stride": 43},
}

# Rein, the same model without the depth tower and without DQCM.
TINY_REIN_CONFIG = {
    **TINY_DEPTHFORGE_CONFIG,
    "name": "tiny_rein_test",
    "model": {**TINY_DEPTHFORGE_CONFIG["model"], "family": "rein",
              "depthforge": {**TINY_DEPTHFORGE_CONFIG["model"]["depthforge"], "depth": None, "dqcm": False}},
}


def make_tiny_weights(path: Path, seed: int = 0, config: dict | None = None, sharpen: float = 200.0) -> "object":
    """Random-initialised tiny VFMNet weights (LoRA B non-zero so merging matters); returns the config."""
    import torch
    from safetensors.torch import save_file

    from training.build import build_vfmnet
    from training.config import config_from_dict

    cfg = config_from_dict(config or TINY_CONFIG)
    torch.manual_seed(seed)
    model = build_vfmnet(cfg.model)
    state = model.state_dict()
    for k, v in state.items():
        if "lora_B" in k:
            state[k] = torch.randn_like(v) * 0.05
        elif k in ("head.classifier.weight", "refine_head.classifier.weight"):
            # A sharp classifier: random-initialised logits are otherwise near-uniform and
            # the labels near-constant, which would let wrong outputs pass the tests.
            state[k] = v * sharpen
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(path))
    return cfg


def edited_copy(package: Path, dest: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of a model package at ``dest`` whose card.json ``edit`` changed in place (checksums left as they were)."""
    shutil.copytree(package, dest)
    data = json.loads((dest / "card.json").read_text())
    edit(data)
    (dest / "card.json").write_text(json.dumps(data))
    return dest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported tiny VFMNet package (ONNX + TorchScript + card.json), random weights."""
    from training.export import export_package

    work = tmp_path_factory.mktemp("tiny_model")
    cfg = make_tiny_weights(work / "weights.safetensors")
    out = work / "package"
    export_package(cfg, work / "weights.safetensors", out)
    return out


@pytest.fixture(scope="session")
def in_graph_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The tiny model exported twice from the same weights: resizing on the host, and inside the graph."""
    from training.export import export_package

    work = tmp_path_factory.mktemp("in_graph")
    cfg = make_tiny_weights(work / "weights.safetensors")
    export_package(cfg, work / "weights.safetensors", work / "host")
    card = export_package(cfg, work / "weights.safetensors", work / "graph", resize_in_graph=True)
    return work / "host", work / "graph", card


@pytest.fixture(scope="session")
def tiny_c2f_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported tiny VFMNet + MGRNet coarse-to-fine package; its weights beside it (weights.safetensors)."""
    from training.export import export_package

    work = tmp_path_factory.mktemp("tiny_c2f")
    cfg = make_tiny_weights(work / "weights.safetensors", seed=3, config=TINY_C2F_CONFIG, sharpen=20.0)
    export_package(cfg, work / "weights.safetensors", work / "package")
    return work / "package"


def save_tiny_model(path: Path, config: dict, seed: int, edit: "object") -> "object":
    """Build ``config``'s model (random init, seeded), pass every tensor through ``edit(key, value)``, save it.

    Returns the config. ``edit`` returns the value to store (e.g. sharper masks, tokens that matter).
    """
    import torch
    from safetensors.torch import save_file

    from training.build import build_model
    from training.config import config_from_dict

    cfg = config_from_dict(copy.deepcopy(config))
    torch.manual_seed(seed)
    state = build_model(cfg.model).state_dict()
    save_file({k: edit(k, v).contiguous() for k, v in state.items()}, str(path))
    return cfg


def sharp_head(key: str, value: "object") -> "object":
    """Sharper masks and class heads: at random init every query's mask is ≈ 0.5 everywhere and the labels
    near-constant, which would let wrong outputs pass the tests; here each query decides on a class of its own."""
    if key == "decode_head.decoder.mask_embed.4.weight":
        return value * 40.0
    if key == "decode_head.decoder.cls_embed.weight":
        return value * 10.0
    return value


def make_tiny_mfuser_weights(path: Path, seed: int = 0) -> "object":
    """Random tiny MFuser weights (fusers' scales non-zero so fusion matters, sharp masks); returns the config."""
    def edit(key: str, value: "object") -> "object":
        if key.startswith("backbone.fusers.") and key.endswith(".scale"):
            return value * 0.0 + 0.5
        if key == "text_encoder.contexts":
            return value * 0.02  # the official N(0, 1) context drowns the class names at random init
        return sharp_head(key, value)

    return save_tiny_model(path, TINY_MFUSER_CONFIG, seed, edit)


def make_tiny_depthforge_weights(path: Path, seed: int = 0, config: dict | None = None) -> "object":
    """Random tiny DepthForge (or Rein) weights with tokens that matter and sharp masks; returns the config."""
    def edit(key: str, value: "object") -> "object":
        # The official 1e-3 start of the tokens' scale would leave them without effect.
        return value * 0.0 + 0.5 if key == "backbone.reins.scale" else sharp_head(key, value)

    return save_tiny_model(path, config or TINY_DEPTHFORGE_CONFIG, seed, edit)


def labelled_batch(size: int, seed: int = 0) -> tuple["object", "object"]:
    """Two random normalised images (2, 3, size, size) and train-id labels with ignored rows and a large region."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, size, size, generator=g)
    labels = torch.randint(0, 19, (2, size, size), generator=g)
    labels[:, :6] = 255
    labels[1, 30:] = 4
    return images, labels


def loss_before_and_after_steps(model: "object", cfg: "object", images: "object", labels: "object",
                                steps: int = 6, lr: float = 2e-3) -> tuple[float, float]:
    """The training loss before and after ``steps`` AdamW steps on one batch (trainable parameters only).

    Both measurements draw the same random numbers (sample points, matching points, dropout), so they differ
    only by what the steps changed.
    """
    import torch

    from training.objectives import compute_loss

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def loss_now() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return float(compute_loss(model, images, labels, cfg)[0])

    before = loss_now()
    for step in range(steps):
        opt.zero_grad()
        torch.manual_seed(step)
        compute_loss(model, images, labels, cfg)[0].backward()
        opt.step()
    return before, loss_now()


def check_slide_runtime(package: Path, config: dict, backend: str, window_batch: int) -> None:
    """The runtime's slide labels and confidence on a smooth random frame equal the PyTorch reference's.

    The frame has the package's working size, so the reference (``training.inference.Predictor``) and the
    runtime see the same pixels.
    """
    import numpy as np
    import torch

    from dgss_perception.engine import Segmenter
    from training.checkpoint import load_state_dict_file
    from training.config import config_from_dict
    from training.inference import Predictor

    cfg = config_from_dict(copy.deepcopy(config))
    height, width = cfg.inference.test_size
    predictor = Predictor(cfg, load_state_dict_file(package.parent / "weights.safetensors"))
    segmenter = Segmenter(package, backend=backend, device="cpu", output_resolution="network",
                          window_batch=window_batch)
    rng = np.random.default_rng(3)
    small = torch.from_numpy(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).permute(2, 0, 1)[None].float()
    rgb = torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0]
    rgb = np.clip(rgb.permute(1, 2, 0).numpy() + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
    with torch.no_grad():
        probs = torch.softmax(predictor.logits(rgb), dim=1)[0].numpy()
    result = segmenter.segment(rgb)
    top2 = np.sort(probs, axis=0)[-2:]
    tied = (top2[1] - top2[0]) < 1e-5
    want = probs.argmax(axis=0)
    assert np.array_equal(result.labels[~tied], want[~tied])
    # Masked attention thresholds sigmoid(mask) at 0.5: a mask logit within rounding of 0 flips a key in or out,
    # so the graphs may move a probability by more than their float error where that happens.
    assert np.abs(result.network_confidence - top2[1]).max() < 1e-3
    assert len(np.unique(want)) >= 2


@pytest.fixture(scope="session")
def tiny_mfuser_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported tiny MFuser slide package; its weights beside it (weights.safetensors)."""
    from training.export import export_package

    work = tmp_path_factory.mktemp("tiny_mfuser")
    cfg = make_tiny_mfuser_weights(work / "weights.safetensors")
    export_package(cfg, work / "weights.safetensors", work / "package")
    return work / "package"


@pytest.fixture(scope="session")
def tiny_depthforge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported tiny DepthForge slide package; its weights beside it (weights.safetensors)."""
    from training.export import export_package

    work = tmp_path_factory.mktemp("tiny_depthforge")
    cfg = make_tiny_depthforge_weights(work / "weights.safetensors")
    export_package(cfg, work / "weights.safetensors", work / "package")
    return work / "package"


@pytest.fixture(scope="session")
def ros_domain_id() -> int:
    """A DDS domain of this test process's own, so parallel runs never cross-talk."""
    domain = 1 + os.getpid() % 100
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    return domain


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which ROS 2 distro's rclpy and which key versions this run tests (CI runs Kilted and Jazzy)."""
    import importlib.metadata as metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    distros = [d for d in ("humble", "jazzy", "kilted") if version(f"ros-{d}-rclpy")]
    rclpy = version("ros-rclpy")
    lines = [f"ROS 2 rclpy: {rclpy or 'not from wheels'} ({', '.join(distros) or 'distro of the ROS 2 install'})"]
    found = {n: version(n) for n in ("torch", "timm", "peft", "onnxruntime", "onnxruntime-gpu", "transformers")}
    lines.append("versions: " + ", ".join(f"{n} {v}" for n, v in found.items() if v))
    return lines
