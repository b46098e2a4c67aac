"""Training configuration: typed dataclasses read from one flat YAML file.

Each section maps one-to-one onto what it configures; unknown keys are
errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .backbones.lora import LoraSettings


@dataclass
class BackboneConfig:
    name: str = "vit_large_patch14_dinov2"
    weights: str = ""  # "" random init, "hub", or a local .safetensors/.pth file
    out_indices: list[int] | None = None  # None: blocks at 1/4, 1/2, 3/4 and full depth
    overrides: dict[str, Any] = field(default_factory=dict)  # timm kwargs for small variants
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    # What trains in the backbone: "lora" (the paper), "full" (from scratch, when no
    # pretrained weights exist), or "frozen".
    finetune: str = "lora"


@dataclass
class HeadConfig:
    channels: list[int] = field(default_factory=lambda: [1024, 512, 256])
    dropout: float = 0.1


@dataclass
class RefineConfig:
    """MGRNet, VFMSeg's refinement head, and its high-resolution training view (paper sizes)."""

    dim: int = 256  # token width of the feature-to-semantics attention
    depth: int = 3  # attention blocks
    heads: int = 8
    head_dim: int = 64
    ffn_dim: int = 1024  # GEGLU inner width (the input projection is 2 × this)
    mask_channels: list[int] = field(default_factory=lambda: [64, 128])  # mask-embedding convs
    dropout: float = 0.1
    mask_ratio: float = 0.2  # share of image-feature tokens replaced by the mask token (training only)
    window: int = 512  # high-resolution crop in training, refinement window at inference (pixels)
    loss_weight: float = 1.0  # λ in L_c + λ·L_d


@dataclass
class VisionConfig:
    """A frozen vision tower beside the main backbone (MFuser's VLM image encoder)."""

    name: str = "eva02_l14"  # catalog key or timm name
    weights: str = ""  # "" random init, "hub", or a local file
    overrides: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 768  # width of its projection head (the joint image-text space)


@dataclass
class TextConfig:
    """The frozen VLM text tower and its learnable prompt context (CoOp)."""

    name: str = "eva02_clip_l14"  # text tower key (see training.models.text_encoder)
    weights: str = ""  # "" random init, "hub", or a local CLIP checkpoint
    overrides: dict[str, Any] = field(default_factory=dict)
    context_length: int | None = None  # None: the tower's official length (13 for EVA02-CLIP, 10 for CLIP/SigLIP)
    n_ctx: int | None = None  # learnable context tokens after SOT; None: context_length − 5


@dataclass
class MaskLossConfig:
    """Weights and point sampling of the mask classification losses (Mask2Former's, on every prediction set)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass
class MaskFormerConfig(MaskLossConfig):
    """Sizes of a Mask2Former head (deformable-attention pixel decoder, masked transformer decoder)."""

    conv_dim: int = 256  # pixel decoder and query width
    mask_dim: int = 256
    pixel_decoder_layers: int = 6
    decoder_layers: int = 9
    heads: int = 8
    points: int = 4  # deformable sampling points per head and level
    ffn_dim: int = 2048  # the transformer decoder's FFN (MFuser's pixel decoder uses it too)


@dataclass
class MFuserConfig(MaskFormerConfig):
    """MFuser's parts beyond the DINOv2 backbone (``model.backbone``): sizes of the official model."""

    vlm: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # MVFuser after every block pair.
    d_state: int = 16
    d_conv: int = 3
    dt_rank: int | None = None  # None: ceil(width / 16)
    fuser_dropout: float = 0.1
    scan_chunk: int = 8
    # Per-layer Linear projections around each fuser (the official stride-16 CLIP-L variant has them even at
    # equal widths); None: only where the towers' widths differ.
    projections: bool | None = None
    # MTEnhancer (the context decoder refining the text queries with the image).
    enhancer_width: int = 256
    enhancer_heads: int = 4
    enhancer_layers: int = 1
    enhancer_dropout: float = 0.1
    # None: as the released code, which fills γ with 1e-4 and then overwrites it with trunc_normal(std 1);
    # a number fills γ with it (1e-4 for the near-identity start the fill intended).
    gamma_init: float | None = None
    # tqdm's text-query Mask2Former head has the inherited sizes and losses (identity-assigned mask
    # classification on every prediction set), plus the pixel-text alignment:
    align_weight: float = 1.0
    tau: float = 0.07


@dataclass
class DepthTowerConfig:
    """DepthForge's frozen depth encoder (Depth Anything V2's ViT), run in lockstep with the backbone."""

    name: str = "depth_anything_v2_l16"  # catalog key or timm name; same width, depth and token grid as the backbone
    weights: str = ""  # "" random init, or a local file (see the catalog entry's conversion command)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DepthForgeConfig(MaskFormerConfig):
    """DepthForge's and Rein's parts beyond the visual backbone (``model.backbone``): the official sizes.

    Family ``depthforge`` needs ``depth`` (and by default adds DQCM); family ``rein`` is the same model with
    ``depth: null`` and ``dqcm: false``.
    """

    depth: DepthTowerConfig | None = field(default_factory=DepthTowerConfig)
    # Rein's low-rank tokens after every block.
    token_length: int = 100
    rank: int = 16
    scale_init: float = 1.0e-3
    # Resize factors of the four taps (strides 4, 8, 16, 32 of a patch-16 tower).
    scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    # Dynamic query correction module on the stride-4 map.
    dqcm: bool = True
    dqcm_reduction: int = 16
    # Mask2Former head: the inherited sizes, and the pixel decoder's own FFN width (mmdet's 1024).
    pixel_ffn_dim: int = 1024
    # Losses: mask classification on every prediction set (the inherited weights), Hungarian-matched with
    # these costs.
    class_cost: float = 2.0
    mask_cost: float = 5.0
    dice_cost: float = 5.0


@dataclass
class ModelConfig:
    family: str = "vfmnet_mgrnet"  # vfmnet_mgrnet | mfuser | depthforge | rein
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    refine: RefineConfig | None = None  # None: VFMNet alone (whole-image inference only)
    mfuser: MFuserConfig | None = None  # the family mfuser's parts; backbone is its DINOv2
    depthforge: DepthForgeConfig | None = None  # the families depthforge and rein; backbone is the visual tower
    num_classes: int = 19
    img_size: list[int] = field(default_factory=lambda: [512, 512])  # (H, W) the network sees
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class RareClassConfig:
    """Rare-class sampling (DAFormer's scheme, the VFMSeg settings)."""

    stats: str = ""  # class statistics JSON written by ``python -m training.data.class_stats``
    temperature: float = 0.01
    min_pixels: int = 3000  # a file counts for a class only with at least this many of its pixels
    min_crop_ratio: float = 2.0  # re-crop until the class has min_pixels × this in the crop…
    max_recrops: int = 10  # …or this many tries have been made


@dataclass
class EvalSetConfig:
    """One evaluation dataset; its domains (e.g. ACDC conditions) are reported separately."""

    layout: str = "cityscapes"
    root: str = ""
    split: str = "val"
    conditions: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    layout: str = "cityscapes"  # cityscapes | gtav | bdd100k | mapillary | acdc | synthia
    root: str = ""
    split: str = "train"
    conditions: list[str] = field(default_factory=list)  # ACDC conditions
    crop_size: list[int] | None = None  # training crop (H, W); None: img_size, or 2 × img_size with a refine head
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 1.0  # re-draw a crop in which one class covers more than this share (1.0: off)
    flip: bool = True
    photometric: bool = True
    rcs: RareClassConfig | None = None
    val: list[EvalSetConfig] = field(default_factory=list)


@dataclass
class InferenceConfig:
    """How evaluation predicts a frame (the exported runtime follows the same rules)."""

    mode: str = "whole"  # whole | slide | coarse | coarse_to_fine
    test_size: list[int] | None = None  # (H, W) frames are resized to before inference; None: as read
    keep_ratio: bool = False  # resize to fit inside test_size keeping the aspect (mmseg's keep_ratio), else stretch
    coarse_size: list[int] = field(default_factory=lambda: [512, 1024])  # stage 1, fixed whatever the aspect
    window: int = 512
    stride: int = 320
    theta: float = 0.968  # a pixel is confident when its max softmax exceeds θ
    c_tau: float = 0.8  # a window is refined when its confident fraction is below C_τ


@dataclass
class OptimConfig:
    iters: int = 40000
    batch_size: int = 2
    grad_accum: int = 1
    lr_backbone: float = 1e-5
    lr_head: float = 1e-4
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    poly_power: float = 1.0
    # "poly": linear warm-up over warmup_iters, then (1 − t)^poly_power; "onecycle": PyTorch's OneCycleLR
    # (cosine rise from lr/onecycle_div over onecycle_pct of the iterations, cosine fall to
    # lr/onecycle_div/onecycle_final_div), DepthForge's schedule.
    schedule: str = "poly"
    onecycle_pct: float = 0.2
    onecycle_div: float = 10.0
    onecycle_final_div: float = 10.0
    # Parameters without weight decay: every normalisation layer's when no_decay_norm, and those whose
    # names contain one of no_decay_keys (embeddings, learnable tokens, as mmengine's paramwise_cfg).
    no_decay_norm: bool = False
    no_decay_keys: list[str] = field(default_factory=list)
    # mmseg's cross-entropy divides by every pixel, ignored ones included ("all", the official
    # setting); "valid" divides by the labelled pixels only.
    loss_norm: str = "all"


@dataclass
class TrainConfig:
    name: str = "vfmnet"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16
    num_workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 1000
    threads: int = 0  # torch CPU threads, 0 = torch default
    dist_backend: str = "auto"  # torchrun: nccl on CUDA, gloo on CPU


def train_crop_size(cfg: TrainConfig) -> tuple[int, int]:
    """The training crop: data.crop_size, else the network size (× 2 for the two-view refine training)."""
    if cfg.data.crop_size:
        return int(cfg.data.crop_size[0]), int(cfg.data.crop_size[1])
    h, w = cfg.model.img_size
    scale = 2 if cfg.model.refine is not None else 1
    return int(h) * scale, int(w) * scale


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(names)})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
        if dataclasses.is_dataclass(hint):
            target = hint
        elif optional and args and dataclasses.is_dataclass(args[0]):
            target = args[0]
        else:
            target = None
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list and typing.get_args(hint) else None
        if item is not None and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise ValueError(f"{where}.{key}: expected a list, got {value!r}")
            kwargs[key] = [_build(item, v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
            continue
        kwargs[key] = _build(target, value, f"{where}.{key}") if target is not None and value is not None else value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, data, "config")


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML training config; relative data roots resolve against the working directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    return config_from_dict(yaml.safe_load(path.read_text()) or {})


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
