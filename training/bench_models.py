"""Benchmark model packages: the real architectures at real sizes, randomly initialised.

    python -m training.bench_models --list
    python -m training.bench_models --preset vfmnet_vitl16_512x1024 --out models/bench/vfmnet_vitl16_512x1024
    python -m training.bench_models --preset depthforge_vitl16_slide_1024x2048 \
        --out models/bench/depthforge_vitl16_slide_1024x2048
    python -m training.bench_models --preset tiny --out /tmp/bench_tiny --override embed_dim=64 depth=4
    python -m training.bench_models --preset rein_vitl16_slide_1024x2048 --out /tmp/bench_rein \
        --override embed_dim=64 depth=4 num_heads=2 --height 512 --width 1024

A preset is a model config and a graph input size: VFMNet (the paper's head, MGRNet and
inference settings with the chosen backbone) exported whole or coarse-to-fine, or one of the
slide families (DepthForge, its Rein baseline, MFuser) from its official config, exported as
one graph on 512-pixel windows of a working frame. The model is built with random
initialisation and no LoRA (scaled so that its labels are not all ties, see
:func:`spread_logits` and :func:`sharpen_mask_classification`), its weights written to a
temporary file, and the package made by :func:`training.export.export_package`, parity check
included: it has the form of a trained package, so the runtime and its benchmarks treat it as
one. The card says what it is (``benchmark: true``, ``export.weights`` "random (benchmark)"):
its labels mean nothing; its speed and memory are those of the trained model.

``--override KEY=VALUE`` passes timm constructor kwargs to every ViT tower of the model, so
that one set shrinks a real architecture consistently:

- VFMNet: the backbone (the head's input width follows it).
- DepthForge: the visual tower and the depth tower, which run in lockstep and must agree in
  width, depth and grid; the tokens follow the width, the Mask2Former head keeps its official
  widths (256). Rein: the visual tower.
- MFuser: the DINOv2 and the EVA02 towers (the fusers follow their width). The joint
  image-text space (``mfuser.vlm.embed_dim``, 768) and the text tower keep their official
  sizes: the text tower's output is a constant in the graph, so it costs build time and
  memory but no FLOPs.

The slide families tap four blocks: ``depth`` must stay at least 4. ``--height/--width`` set the
working frame of a slide preset (at least one window each way); its window stays 512, the
size the towers are built at.
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

from .build import build_model
from .config import TrainConfig, config_from_dict, config_to_dict, load_config
from .export import (DEFAULT_ATOL, DEFAULT_FORMATS, FORMATS, PRECISIONS, SLIDE_FAMILIES, ParityError,
                     coarse_to_fine_flops, count_flops, export_package, format_flops, human_flops, parse_formats,
                     print_parity, whole_flops)
from .export_wrappers import CoarseGraph, RefineGraph, SegmentationGraph, WindowGraph, with_constants
from .inference import window_grid
from .models.vfmnet import VFMNet

CONFIGS = Path(__file__).resolve().parent / "configs"
# The paper's model (DINOv2-L/16 VFMNet + MGRNet) and coarse-to-fine inference settings.
PAPER_CONFIG = CONFIGS / "vfmseg_gta2cbm_dinov2l.yaml"
# Standard deviation over classes of a benchmark model's logits (see spread_logits).
LOGIT_SPREAD = 2.0
# Random mask-classification heads (see sharpen_mask_classification). The class, token and context factors
# are those of the tiny test models; their ×40 on the masks is for a 32-wide head on 16² maps, and on the
# official 256-wide head at 128² it makes masked attention chaotic (see the docstring).
MASK_SHARPEN = 4.0
CLASS_SHARPEN = 10.0
TOKEN_SCALE = 0.5
CONTEXT_SHRINK = 0.02
# Default parity tolerance: VFMNet's export default, and the mask-classification families' (see export_bench).
ATOL = 1e-4
MASK_ATOL = 5e-3
# The blocks the slide families tap (four maps for their pixel decoders).
SLIDE_TAPS = 4


@dataclass(frozen=True)
class Preset:
    """One benchmark package: an architecture, its export mode and its graph input size.

    Attributes:
        name: the preset's key in :data:`PRESETS`.
        description: one line for ``--list``.
        mode: ``whole``, ``coarse_to_fine`` or ``slide`` (the export mode).
        size: graph input (H, W): the network size for ``whole``, the working frame for ``coarse_to_fine``
            and ``slide``.
        arch: the (visual) backbone's (embed_dim, depth, num_heads, patch_size).
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


def _random_towers(model: dict[str, Any]) -> None:
    """Every tower of an official config's model section randomly initialised, with catalog taps and no LoRA."""
    # Taps from the catalog ([7, 11, 15, 23] at depth 24) so that a depth override still builds.
    model["backbone"].update(weights="", out_indices=None, lora=None)
    depth = (model.get("depthforge") or {}).get("depth")
    if depth:
        depth["weights"] = ""
    if model.get("mfuser"):
        model["mfuser"]["vlm"]["weights"] = ""
        model["mfuser"]["text"]["weights"] = ""


def _slide(name: str, config: str, size: tuple[int, int], arch: tuple[int, int, int, int],
           what: str) -> Callable[[], Preset]:
    """Factory of a slide preset: an official config's model on its windows of a ``size`` working frame."""
    def make() -> Preset:
        data = config_to_dict(load_config(CONFIGS / config))
        model = data["model"]
        _random_towers(model)
        # The frame is the package's input, stretched to it by the runtime (no aspect-preserving fit).
        inference = dict(data["inference"], test_size=list(size), keep_ratio=False)
        window, stride = inference["window"], inference["stride"]
        count = len(window_grid(size[0], size[1], window, stride))
        return Preset(name, f"{what}, windows {window}/{stride} on {size[0]}x{size[1]} ({count})", "slide", size,
                      arch, {"name": name, "model": model, "inference": inference})
    return make


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
    # The slide families as released, on the 1024×2048 frame of the VFMSeg paper (18 windows) and, for
    # DepthForge, also on its official 512×1024 test frame (3 windows).
    "depthforge_vitl16_slide_1024x2048": _slide(
        "depthforge_vitl16_slide_1024x2048", "depthforge_gta2cbm_dinov2l.yaml", (1024, 2048), (1024, 24, 16, 16),
        "DepthForge DINOv2-L/16 + Depth Anything V2-L/16, Rein tokens, DQCM, Mask2Former"),
    "depthforge_vitl16_slide_512x1024": _slide(
        "depthforge_vitl16_slide_512x1024", "depthforge_gta2cbm_dinov2l.yaml", (512, 1024), (1024, 24, 16, 16),
        "DepthForge DINOv2-L/16 + Depth Anything V2-L/16 (the official test size)"),
    "rein_vitl16_slide_1024x2048": _slide(
        "rein_vitl16_slide_1024x2048", "rein_gta2cbm_dinov2l.yaml", (1024, 2048), (1024, 24, 16, 16),
        "Rein DINOv2-L/16, tokens, Mask2Former"),
    "mfuser_eva02l_slide_1024x2048": _slide(
        "mfuser_eva02l_slide_1024x2048", "mfuser_gta2cbm_eva02l.yaml", (1024, 2048), (1024, 24, 16, 14),
        "MFuser DINOv2-L/14 + EVA02-CLIP-L/14, MVFusers, text queries"),
    "tiny": _tiny,
    "tiny_c2f": _tiny_c2f,
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


def _towers(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The ViT towers of a model section: the backbone, DepthForge's depth tower, MFuser's VLM vision tower."""
    towers = [model["backbone"]]
    depth = (model.get("depthforge") or {}).get("depth")
    if depth:
        towers.append(depth)
    if model.get("mfuser"):
        towers.append(model["mfuser"]["vlm"])
    return towers


def bench_config(preset: Preset, overrides: dict[str, Any] | None = None,
                 size: tuple[int, int] | None = None) -> tuple[TrainConfig, tuple[int, int]]:
    """The preset's training config and graph input size, with tower overrides and another size applied.

    Args:
        overrides: timm constructor kwargs (e.g. ``{"depth": 4}``) for every ViT tower of the model
            (see the module docstring), on top of the preset's.
        size: graph input (H, W); for ``whole`` the network is built at that size, for ``slide`` it is
            the working frame (the window stays).

    Raises:
        ValueError: a slide family shrunk below the four blocks it taps, or a frame smaller than its window.
    """
    data = copy.deepcopy(preset.config)
    model = data["model"]
    overrides = dict(overrides or {})
    if model["family"] in SLIDE_FAMILIES and int(overrides.get("depth", SLIDE_TAPS)) < SLIDE_TAPS:
        raise ValueError(f"{model['family']} taps {SLIDE_TAPS} blocks: depth must be at least {SLIDE_TAPS}, "
                         f"got {overrides['depth']}")
    for tower in _towers(model):
        tower["overrides"] = {**(tower.get("overrides") or {}), **overrides}
    size = (int(size[0]), int(size[1])) if size else preset.size
    if preset.mode == "whole":
        model["img_size"] = list(size)
    elif preset.mode == "slide":
        data["inference"]["test_size"] = list(size)
        window_grid(size[0], size[1], data["inference"]["window"], data["inference"]["stride"])  # before any build
    return config_from_dict(data), size


def meta_model(cfg: TrainConfig, size: tuple[int, int] | None = None) -> nn.Module:
    """The configured model on the meta device: its structure without memory or weights.

    Args:
        size: the network input (H, W); default: the window for the slide families (the only input
            their graphs run them at), ``cfg.model.img_size`` otherwise.
    """
    if size is None:
        slide = cfg.model.family in SLIDE_FAMILIES
        size = (cfg.inference.window, cfg.inference.window) if slide else tuple(cfg.model.img_size)
    with torch.device("meta"):
        return build_model(cfg.model, img_size=size, with_lora=False, load_weights=False).eval()


def meta_flops(cfg: TrainConfig, mode: str, size: tuple[int, int]) -> dict[str, int]:
    """The ``export.flops`` a package of this config would carry, counted on the meta device."""
    mean, std = cfg.model.mean, cfg.model.std
    if mode == "slide":
        # As the slide export: one window through the graph with the image-independent parts constant
        # (no gradients, or the FLOP counter trips over parameters passed between modules).
        window = cfg.inference.window
        model = with_constants(meta_model(cfg, (window, window))).requires_grad_(False)
        graph = WindowGraph(model, mean, std).eval().to("meta")  # its normalisation buffers too
        return {"window": count_flops(graph, (torch.zeros((1, window, window, 3), dtype=torch.uint8,
                                                          device="meta"),))}
    image = torch.zeros((1, *size, 3), dtype=torch.uint8, device="meta")
    if mode == "whole":
        return whole_flops(SegmentationGraph(meta_model(cfg, size), mean, std).eval().to("meta"), image)
    inf, window = cfg.inference, cfg.model.refine.window
    windows = window_grid(size[0], size[1], window, inf.stride)
    coarse_size = tuple(inf.coarse_size)
    coarse = CoarseGraph(meta_model(cfg, coarse_size), mean, std, coarse_size, windows, window).eval().to("meta")
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


def sharpen_mask_classification(model: nn.Module) -> None:
    """Make a random DepthForge, Rein or MFuser decide: what keeps its parity check meaningful.

    At random initialisation every query of a Mask2Former-style head predicts a soft mask (sigmoid
    near 0.5) and near-equal class probabilities, so the scores barely vary over pixels and classes
    and a relative tolerance on them checks little. Scaling the class embedding (×10) gives each
    query a class of its own and the mask embedding's last layer (×4, mask logits' std ≈ 3) firm
    regions. The tiny test models scale the masks ×40; on the official head (256 wide, masks of 128²
    and more) that puts the scores at the mercy of masked attention, whose keys are cut where a mask
    logit is below 0: a logit within rounding of 0 flips a key, and amplified ×40 such flips moved
    the scores by up to 9e-3 of their maximum between float32 and float64 runs, failing parity on
    most frames.
    The official starts of Rein's token scale (1e-3) and of MFuser's fuser scales leave the tokens and
    the fusion almost without effect, so they are set to 0.5: the scores then depend on them. MFuser's
    N(0, 1) prompt context drowns the class names at random initialisation, so it is scaled by 0.02.
    Only weights change: the graph and its cost are those of the official model.
    """
    state = model.state_dict()  # tensors sharing the parameters' storage: edited in place
    with torch.no_grad():
        state["decode_head.decoder.mask_embed.4.weight"].mul_(MASK_SHARPEN)
        state["decode_head.decoder.cls_embed.weight"].mul_(CLASS_SHARPEN)
        for key, value in state.items():
            fuser = key.startswith("backbone.fusers.") and key.endswith(".scale")
            if key == "backbone.reins.scale" or fuser:
                value.fill_(TOKEN_SCALE)
        if "text_encoder.contexts" in state:
            state["text_encoder.contexts"].mul_(CONTEXT_SHRINK)


def random_weights(cfg: TrainConfig, path: Path, seed: int = 0) -> int:
    """Write a randomly initialised model of ``cfg`` to ``path`` (safetensors); returns its parameter count.

    VFMNet gets :func:`spread_logits`, the mask-classification families :func:`sharpen_mask_classification`.
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = build_model(cfg.model, with_lora=False, load_weights=False)
    if isinstance(model, VFMNet):
        spread_logits(model, tuple(cfg.model.img_size))
    else:
        sharpen_mask_classification(model)
    count = parameter_count(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return count


def export_bench(preset: Preset, out: Path, size: tuple[int, int] | None = None,
                 overrides: dict[str, Any] | None = None, formats: tuple[str, ...] = DEFAULT_FORMATS,
                 atol: float | None = None, overwrite: bool = False, seed: int = 0, precision: str = "fp32") -> dict:
    """Export ``preset`` with random weights to ``out``; returns the card (ParityError as export_package).

    ``atol`` defaults (fp32) to :data:`ATOL` for VFMNet and :data:`MASK_ATOL` for the mask-classification
    families: however sharpened, a random Mask2Former head has many mask logits near 0 (trained
    masks sit far from it), and the keys masked attention flips there between ONNX Runtime and
    eager PyTorch moved the scores of a shrunk DepthForge by up to 1e-3 of their maximum (the worst
    of 144 windows; most stay below 1e-4). An export error moves them by far more.

    Raises:
        ValueError: an unsupported precision, or a size the preset's mode refuses.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported (supported: {', '.join(PRECISIONS)})")
    cfg, size = bench_config(preset, overrides, size)
    with tempfile.TemporaryDirectory(prefix="bench_weights_") as tmp:
        weights = Path(tmp) / "weights.safetensors"
        random_weights(cfg, weights, seed)
        if atol is None and precision == "fp32":
            atol = ATOL if cfg.model.family == "vfmnet_mgrnet" else MASK_ATOL
        # Random weights: how far their fp16 labels stray from fp32 says nothing of a trained model's, so the
        # agreement is recorded in the card but not required.
        return export_package(cfg, weights, out, size=size, formats=formats, atol=atol, overwrite=overwrite,
                              name=f"bench_{preset.name}", mode=preset.mode, benchmark=True, precision=precision,
                              min_label_agreement=0.0)


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
    """FLOPs per graph; with the frame's ``windows``, a frame's FLOPs.

    Coarse-to-fine: the range from no window refined to all of them; slide: windows × window.
    """
    text = format_flops(flops)
    if windows and "refine_per_window" in flops:
        low, per = flops["coarse"], flops["refine_per_window"]
        text += (f"; a frame: {human_flops(low)} (no window refined) to {human_flops(low + windows * per)} "
                 f"(all {windows})")
    elif windows and "window" in flops:
        text += f"; a frame: {windows} windows, {human_flops(windows * flops['window'])}"
    return text


def list_presets() -> list[str]:
    """One line per preset: mode, input size, backbone, parameters and FLOPs (counted on the meta device)."""
    lines = []
    for name in PRESETS:
        preset = get_preset(name)
        cfg, size = bench_config(preset)
        d, depth, heads, patch = preset.arch
        # The size the graphs run the model at: the network size, the coarse-to-fine window, the slide window.
        params = parameter_count(meta_model(cfg, size if preset.mode == "whole" else None)) / 1e6
        windows = None
        if preset.mode == "coarse_to_fine":
            windows = len(window_grid(size[0], size[1], cfg.model.refine.window, cfg.inference.stride))
        elif preset.mode == "slide":
            windows = len(window_grid(size[0], size[1], cfg.inference.window, cfg.inference.stride))
        lines.append(f"{name}: {preset.mode} {size[0]}x{size[1]}, ViT d={d} depth={depth} heads={heads} "
                     f"patch={patch}, {params:.1f} M params — {preset.description}\n    "
                     + describe_flops(meta_flops(cfg, preset.mode, size), windows))
    return lines


def _file_sizes(out: Path, card: dict) -> str:
    files = [f for g in card["graphs"].values() for f in (g.get("onnx"), g.get("torchscript"), g.get("pt2")) if f]
    return ", ".join(f"{f} {(out / f).stat().st_size / 1e6:.1f} MB" for f in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the presets with their sizes and FLOPs")
    parser.add_argument("--preset", help="preset to export (see --list)")
    parser.add_argument("--out", help="model package directory to write")
    parser.add_argument("--height", type=int,
                        help="graph input height: network size (whole) or working frame (coarse_to_fine, slide)")
    parser.add_argument("--width", type=int, help="graph input width (see --height)")
    parser.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="timm kwargs for every ViT tower of the model, e.g. embed_dim=64 depth=4 num_heads=2")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"comma list of {', '.join(FORMATS)} (default %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--atol", type=float,
                        help=f"parity tolerance (default fp32 {ATOL:g}, {MASK_ATOL:g} for DepthForge, Rein and MFuser; "
                        f"fp16 {DEFAULT_ATOL['fp16']:g})")
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
