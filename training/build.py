"""Builds models from their configs (the one place names turn into modules)."""

from __future__ import annotations

from dataclasses import replace

from .backbones.catalog import default_out_indices, find_entry
from .backbones.lora import add_lora
from .backbones.vit import ViTBackbone, create_vit
from .config import ModelConfig
from .models.deconv_head import DeconvHead
from .models.mgrnet import MGRNet
from .models.vfmnet import VFMNet


def build_vfmnet(cfg: ModelConfig, img_size: tuple[int, int] | None = None, with_lora: bool = True,
                 load_weights: bool = True) -> VFMNet:
    """VFMNet at ``img_size`` (default cfg.img_size); LoRA attached unless ``with_lora`` is False.

    With ``cfg.refine`` set the model also carries MGRNet (``refine_head``) on the same backbone.
    """
    size = tuple(img_size or cfg.img_size)
    b = cfg.backbone
    vit = create_vit(b.name, size, weights=b.weights if load_weights else "", overrides=b.overrides)
    if with_lora and b.lora is not None:
        lora = b.lora
        if not lora.targets:  # the backbone's own attention input projections (qkv; q/k/v for EVA02)
            entry = find_entry(b.name)
            lora = replace(lora, targets=list(entry.lora_targets if entry else ("qkv",)))
        add_lora(vit, lora)
    # The catalog's taps ([7, 11, 15, 23] for the 24-block ViT-Ls, as the official code), else quarter depths.
    indices = b.out_indices or default_out_indices(b.name, len(vit.blocks))
    backbone = ViTBackbone(vit, indices)
    in_channels = backbone.embed_dim * len(indices)
    head = DeconvHead(in_channels, cfg.num_classes, tuple(cfg.head.channels), cfg.head.dropout)
    refine_head = None
    if cfg.refine is not None:
        r = cfg.refine
        if len(r.mask_channels) != 2:
            raise ValueError(f"model.refine.mask_channels needs two widths, got {r.mask_channels}")
        refine_head = MGRNet(in_channels, cfg.num_classes, r.dim, r.depth, r.heads, r.head_dim, r.ffn_dim,
                             (int(r.mask_channels[0]), int(r.mask_channels[1])), r.dropout, r.mask_ratio)
    return VFMNet(backbone, head, refine_head)
