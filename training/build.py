"""Builds models from their configs (the one place names turn into modules)."""

from __future__ import annotations

from .backbones.lora import add_lora
from .backbones.vit import ViTBackbone, create_vit, quarter_depth_indices
from .config import ModelConfig
from .models.deconv_head import DeconvHead
from .models.vfmnet import VFMNet


def build_vfmnet(cfg: ModelConfig, img_size: tuple[int, int] | None = None, with_lora: bool = True,
                 load_weights: bool = True) -> VFMNet:
    """VFMNet at ``img_size`` (default cfg.img_size); LoRA attached unless ``with_lora`` is False."""
    size = tuple(img_size or cfg.img_size)
    b = cfg.backbone
    vit = create_vit(b.name, size, weights=b.weights if load_weights else "", overrides=b.overrides)
    if with_lora and b.lora is not None:
        add_lora(vit, b.lora)
    indices = b.out_indices or quarter_depth_indices(len(vit.blocks))
    backbone = ViTBackbone(vit, indices)
    head = DeconvHead(backbone.embed_dim * len(indices), cfg.num_classes, tuple(cfg.head.channels), cfg.head.dropout)
    return VFMNet(backbone, head)
