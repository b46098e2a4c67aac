"""Benchmark model packages: the real architectures at real sizes, randomly initialised.

    python -m training.bench_models --list
    python -m training.bench_models --preset vfmnet_vitl16_512x1024 --out models/bench/vfmnet_vitl16_512x1024
    python -m training.bench_models --preset tiny --out /tmp/bench_tiny --override embed_dim=64 depth=4

A preset is a model config (the paper's head, MGRNet and inference settings with the chosen
backbone) and a graph input size. The model is built with timm's random initialisation and
no LoRA (its classifiers scaled so that the labels are not all ties, see :func:`spread_logits`),
its weights written to a temporary file, and the package made by
:func:`training.export.export_package`, parity check included: it has the form of a trained
package, so the runtime and its benchmarks treat it as one. The card says what it is
(``benchmark: true``, ``export.weights`` "random (benchmark)"): its labels mean nothing;
its speed and memory are those of the trained model.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .build import build_vfmnet
from .config import TrainConfig, config_from_dict, config_to_dict, load_config
from .export import (ParityError, coarse_to_fine_flops, export_package, format_flops, human_flops, parse_formats,
                     print_parity, whole_flops)
from .export_wrappers import CoarseGraph, RefineGraph, SegmentationGraph
from .inference import window_grid
from .models.vfmnet import VFMNet

# The paper's model (DINOv2-L/16 VFMNet + MGRNet) and coarse-to-fine inference settings.
PAPER_CONFIG = Path(__file__).resolve().parent / "configs" / "vfmseg_gta2cbm_dinov2l.yaml"
PRECISIONS = ("fp32",)
# Standard deviation over classes of a benchmark model's logits (see spread_logits).
LOGIT_SPREAD = 2.0


@dataclass(frozen=True)
class Preset:
    """One benchmark package: an architecture, its export mode and its graph input size.

    Attributes:
        name: the preset's key in :data:`PRESETS`.
        description: one line for ``--list``.
        mode: ``whole`` or ``coarse_to_fine`` (the export mode).
        size: graph input (H, W): the network size for ``whole``, the working frame for ``coarse_to_fine``.
        arch: the backbone's (embed_dim, depth, num_heads, patch_size).
        config: training config data (:class:`TrainConfig` fields) the model is built from.
    """

    name: str
    description: str
    mode: str
    size: tuple[int, int]
    arch: tuple[int, int, int, int]
    config: dict[str, Any]


def _paper_model(backbone: str, overrides: dict[str, Any], refine: bool) -> dict[str, Any]:
    """The paper config's model section with another backbone: random init, no LoRA, catalog taps."""
    model = config_to_dict(load_config(PAPER_CONFIG))["model"]
    # Taps from the catalog (the paper's [7, 11, 15, 23] at depth 24) so that a depth override still builds.
    model["backbone"].update(name=backbone, weights="", out_indices=None, overrides=dict(overrides), lora=None,
                             finetune="full")
    if not refine:
        model["refine"] = None
    return model


def _whole(name: str, backbone: str, overrides: dict[str, Any], arch: tuple[int, int, int, int],
           size: tuple[int, int], what: str) -> Callable[[], Preset]:
    """Factory of a whole-image VFMNet preset with the paper's head."""
    def make() -> Preset:
        model = _paper_model(backbone, overrides, refine=False)
        model["img_size"] = list(size)
        return Preset(name, f"VFMNet {what}, whole image", "whole", size, arch,
                      {"name": name, "model": model, "inference": {"mode": "whole"}})
    return make


def _vfmseg_paper() -> Preset:
    """VFMSeg as the paper runs it: DINOv2-L/16, coarse 512×1024, 512-pixel windows every 320 on 1024×2048."""
    paper = config_to_dict(load_config(PAPER_CONFIG))
    model = _paper_model(paper["model"]["backbone"]["name"], {}, refine=True)
    inference = paper["inference"]
    name = "vfmseg_vitl16_c2f_1024x2048"
    return Preset(name, "VFMSeg DINOv2-L/16 + MGRNet, coarse 512x1024, windows 512/320 (the paper)",
                  "coarse_to_fine", tuple(inference["test_size"]), (1024, 24, 16, 16),
                  {"name": name, "model": model, "inference": inference})


_TINY_BACKBONE = {"name": "vit_small_patch14_dinov2", "weights": "", "lora": None, "finetune": "full",
                  "overrides": {"embed_dim": 32, "depth": 2, "num_heads": 2}}


def _tiny() -> Preset:
    """A toy VFMNet for tests and smoke runs (seconds to export)."""
    model = {"family": "vfmnet_mgrnet", "img_size": [56, 112], "backbone": copy.deepcopy(_TINY_BACKBONE),
             "head": {"channels": [32, 16, 16], "dropout": 0.1}}
    return Preset("tiny", "toy VFMNet (ViT 32-wide, 2 blocks), whole image", "whole", (56, 112), (32, 2, 2, 14),
                  {"name": "tiny", "model": model, "inference": {"mode": "whole"}})


def _tiny_c2f() -> Preset:
    """A toy VFMSeg at the paper's proportions: frame 112×224, coarse 56×112, 56-pixel windows every 35."""
    model = {"family": "vfmnet_mgrnet", "img_size": [56, 56], "backbone": copy.deepcopy(_TINY_BACKBONE),
             "head": {"channels": [32, 16, 16], "dropout": 0.1},
             "refine": {"dim": 16, "depth": 1, "heads": 2, "head_dim": 8, "ffn_dim": 32, "mask_channels": [8, 16],
                        "window": 56}}
    inference = {"mode": "coarse_to_fine", "test_size": [112, 224], "coarse_size": [56, 112], "window": 56,
                 "stride": 35, "theta": 0.968, "c_tau": 0.8}
    return Preset("tiny_c2f", "toy VFMSeg, coarse 56x112, windows 56/35 on 112x224", "coarse_to_fine", (112, 224),
                  (32, 2, 2, 14), {"name": "tiny_c2f", "model": model, "inference": inference})


# DINOv2 at patch 16 (the 512-crop setting; S and B built like the catalog's dinov2_l16) at 512×1024,
# and at its native patch 14 at 518×1036 (37×74 tokens, the nearest multiple of 14).
PRESETS: dict[str, Callable[[], Preset]] = {
    "vfmnet_vits16_512x1024": _whole("vfmnet_vits16_512x1024", "vit_small_patch14_dinov2", {"patch_size": 16},
                                     (384, 12, 6, 16), (512, 1024), "DINOv2-S/16"),
    "vfmnet_vitb16_512x1024": _whole("vfmnet_vitb16_512x1024", "vit_base_patch14_dinov2", {"patch_size": 16},
                                     (768, 12, 12, 16), (512, 1024), "DINOv2-B/16"),
    "vfmnet_vitl16_512x1024": _whole("vfmnet_vitl16_512x1024", "dinov2_l16", {}, (1024, 24, 16, 16), (512, 1024),
                                     "DINOv2-L/16"),
    "vfmnet_vits14_518x1036": _whole("vfmnet_vits14_518x1036", "dinov2_s14", {}, (384, 12, 6, 14), (518, 1036),
                                     "DINOv2-S/14"),
    "vfmnet_vitb14_518x1036": _whole("vfmnet_vitb14_518x1036", "dinov2_b14", {}, (768, 12, 12, 14), (518, 1036),
                                     "DINOv2-B/14"),
    "vfmnet_vitl14_518x1036": _whole("vfmnet_vitl14_518x1036", "dinov2_l14", {}, (1024, 24, 16, 14), (518, 1036),
                                     "DINOv2-L/14"),
    "vfmseg_vitl16_c2f_1024x2048": _vfmseg_paper,
    "tiny": _tiny,
    "tiny_c2f": _tiny_c2f,
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


def bench_config(preset: Preset, overrides: dict[str, Any] | None = None,
                 size: tuple[int, int] | None = None) -> tuple[TrainConfig, tuple[int, int]]:
    """The preset's training config and graph input size, with backbone overrides and another size applied.

    Args:
        overrides: timm constructor kwargs for the backbone (e.g. ``{"depth": 2}``), on top of the preset's.
        size: graph input (H, W); for ``whole`` the network is built at that size.
    """
    data = copy.deepcopy(preset.config)
    data["model"]["backbone"].setdefault("overrides", {}).update(overrides or {})
    size = (int(size[0]), int(size[1])) if size else preset.size
    if preset.mode == "whole":
        data["model"]["img_size"] = list(size)
    return config_from_dict(data), size


def meta_model(cfg: TrainConfig, size: tuple[int, int]) -> VFMNet:
    """The configured model at ``size`` on the meta device: its structure without memory or weights."""
    with torch.device("meta"):
        return build_vfmnet(cfg.model, img_size=size, with_lora=False, load_weights=False).eval()


def meta_flops(cfg: TrainConfig, mode: str, size: tuple[int, int]) -> dict[str, int]:
    """The ``export.flops`` a package of this config would carry, counted on the meta device."""
    mean, std = cfg.model.mean, cfg.model.std
    image = torch.zeros((1, *size, 3), dtype=torch.uint8, device="meta")
    if mode == "whole":
        return whole_flops(SegmentationGraph(meta_model(cfg, size), mean, std).eval(), image)
    inf, window = cfg.inference, cfg.model.refine.window
    windows = window_grid(size[0], size[1], window, inf.stride)
    coarse_size = tuple(inf.coarse_size)
    coarse = CoarseGraph(meta_model(cfg, coarse_size), mean, std, coarse_size, windows, window).eval()
    with torch.device("meta"):  # the refine graph's window tables live with its model
        refine = RefineGraph(meta_model(cfg, (window, window)), mean, std, size, windows, window).eval()
    theta = torch.tensor([inf.theta], device="meta")
    with torch.no_grad():
        logits = coarse(image, theta)[2]
    return coarse_to_fine_flops(coarse, refine, image, theta, logits)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def spread_logits(model: VFMNet, size: tuple[int, int], spread: float = LOGIT_SPREAD) -> None:
    """Scale the classifiers of a random model so that its logits vary by ``spread`` (std over classes).

    A random ViT and head give near-equal logits for all classes (max softmax ≈ 1/C): every
    label is then a tie, and parity, which excuses label differences between tied classes, would
    check nothing. Scaling a 1×1 classifier's weight and bias scales its logits exactly and
    costs no compute at inference. Calibrated on one random image at ``size``.
    """
    x = torch.randn(1, 3, *size)
    model.eval()
    with torch.no_grad():
        _scale_classifier(model.head.classifier, model.coarse(x), spread)
        if model.refine_head is not None:
            # Its context is the calibrated coarse prediction, as at inference.
            _scale_classifier(model.refine_head.classifier, model.refine(x, model.coarse(x)), spread)


def _scale_classifier(classifier: nn.Conv2d, logits: torch.Tensor, spread: float) -> None:
    """Scale a classifier so that ``logits`` it produced get a mean per-pixel std over classes of ``spread``."""
    std = float(logits.std(dim=1).mean())
    if std > 0:
        classifier.weight.mul_(spread / std)
        classifier.bias.mul_(spread / std)


def random_weights(cfg: TrainConfig, path: Path, seed: int = 0) -> int:
    """Write a randomly initialised model of ``cfg`` to ``path`` (safetensors); returns its parameter count."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = build_vfmnet(cfg.model, with_lora=False, load_weights=False)
    spread_logits(model, tuple(cfg.model.img_size))
    count = parameter_count(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return count


def export_bench(preset: Preset, out: Path, size: tuple[int, int] | None = None,
                 overrides: dict[str, Any] | None = None, formats: tuple[str, ...] = ("onnx", "torchscript"),
                 atol: float = 1e-4, overwrite: bool = False, seed: int = 0, precision: str = "fp32") -> dict:
    """Export ``preset`` with random weights to ``out``; returns the card (ParityError as export_package).

    Raises:
        ValueError: an unsupported precision, or a size the preset's mode refuses.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported (supported: {', '.join(PRECISIONS)})")
    cfg, size = bench_config(preset, overrides, size)
    with tempfile.TemporaryDirectory(prefix="bench_weights_") as tmp:
        weights = Path(tmp) / "weights.safetensors"
        random_weights(cfg, weights, seed)
        return export_package(cfg, weights, out, size=size, formats=formats, atol=atol, overwrite=overwrite,
                              name=f"bench_{preset.name}", mode=preset.mode, benchmark=True)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["embed_dim=32", "depth=2"]`` → ``{"embed_dim": 32, "depth": 2}`` (values read as YAML scalars)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--override takes KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def describe_flops(flops: dict[str, int], windows: int | None = None) -> str:
    """FLOPs per graph, and for coarse-to-fine the frame's range from no window refined to all of them."""
    text = format_flops(flops)
    if windows:
        low, per = flops["coarse"], flops["refine_per_window"]
        text += (f"; a frame: {human_flops(low)} (no window refined) to {human_flops(low + windows * per)} "
                 f"(all {windows})")
    return text


def list_presets() -> list[str]:
    """One line per preset: mode, input size, backbone, parameters and FLOPs (counted on the meta device)."""
    lines = []
    for name in PRESETS:
        preset = get_preset(name)
        cfg, size = bench_config(preset)
        d, depth, heads, patch = preset.arch
        build_size = size if preset.mode == "whole" else tuple(cfg.model.img_size)
        params = parameter_count(meta_model(cfg, build_size)) / 1e6
        windows = None
        if preset.mode == "coarse_to_fine":
            windows = len(window_grid(size[0], size[1], cfg.model.refine.window, cfg.inference.stride))
        lines.append(f"{name}: {preset.mode} {size[0]}x{size[1]}, ViT d={d} depth={depth} heads={heads} "
                     f"patch={patch}, {params:.1f} M params — {preset.description}\n    "
                     + describe_flops(meta_flops(cfg, preset.mode, size), windows))
    return lines


def _file_sizes(out: Path, card: dict) -> str:
    files = [f for g in card["graphs"].values() for f in (g.get("onnx"), g.get("torchscript")) if f]
    return ", ".join(f"{f} {(out / f).stat().st_size / 1e6:.1f} MB" for f in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the presets with their sizes and FLOPs")
    parser.add_argument("--preset", help="preset to export (see --list)")
    parser.add_argument("--out", help="model package directory to write")
    parser.add_argument("--height", type=int, help="graph input height: network size (whole) or frame (c2f)")
    parser.add_argument("--width", type=int, help="graph input width (see --height)")
    parser.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="timm backbone kwargs, e.g. embed_dim=64 depth=4 num_heads=2")
    parser.add_argument("--formats", default="onnx,torchscript", help="comma list of onnx, torchscript")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--atol", type=float, default=1e-4, help="parity tolerance")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(list_presets()))
        return 0
    if not (args.preset and args.out):
        parser.error("give --preset and --out (or --list)")
    if (args.height is None) != (args.width is None):
        parser.error("give both --height and --width, or neither")
    formats = parse_formats(parser, args.formats)
    out = Path(args.out)
    try:
        preset = get_preset(args.preset)
        overrides = parse_overrides(args.override)
        size = (args.height, args.width) if args.height else None
        start = time.perf_counter()
        card = export_bench(preset, out, size, overrides, formats, args.atol, args.overwrite, args.seed,
                            args.precision)
        seconds = time.perf_counter() - start
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_parity(card)
    windows = card["inference"]["params"].get("windows")
    print(describe_flops(card["export"]["flops"], len(windows) if windows else None))
    print(f"files: {_file_sizes(out, card)}")
    print(f"wrote {out} in {seconds:.0f} s (build, export and parity): benchmark package of {args.preset}, "
          f"random weights, input {card['input']['height']}x{card['input']['width']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
