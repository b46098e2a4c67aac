"""Shared fixtures: a tiny model package made by the real export pipeline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
def tiny_c2f_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported tiny VFMNet + MGRNet coarse-to-fine package; its weights beside it (weights.safetensors)."""
    from training.export import export_package

    work = tmp_path_factory.mktemp("tiny_c2f")
    cfg = make_tiny_weights(work / "weights.safetensors", seed=3, config=TINY_C2F_CONFIG, sharpen=20.0)
    export_package(cfg, work / "weights.safetensors", work / "package")
    return work / "package"


@pytest.fixture(scope="session")
def ros_domain_id() -> int:
    """A DDS domain of this test process's own, so parallel runs never cross-talk."""
    domain = 1 + os.getpid() % 100
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    return domain
