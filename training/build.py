"""Builds models from their configs (the one place names turn into modules)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from dgss_perception.labels import CITYSCAPES_CLASSES

from .backbones.catalog import default_out_indices, find_entry
from .backbones.lora import add_lora
from .backbones.vit import ViTBackbone, create_vit
from .config import ModelConfig
from .models.deconv_head import DeconvHead
from .models.fused_encoder import FusedEncoder, FuserProjections
from .models.depthforge import DepthForge, MaskFormerHead
from .models.mask_decoder import MaskedQueryDecoder, TextQueryDecoder
from .models.mfuser import MFuser, TextQueryHead
from .models.mgrnet import MGRNet
from .models.mvfuser import MVFuser
from .models.pixel_decoder import DeformPixelDecoder, TextPixelDecoder
from .models.query_correction import QueryCorrection
from .models.rein_encoder import ReinEncoder
from .models.rein_tokens import ReinTokens
from .models.simple_fpn import SimpleFPN
from .models.text_encoder import PromptTextEncoder, build_text_tower, name_tokenizer
from .models.text_enhancer import ContextDecoder
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


def build_mfuser(cfg: ModelConfig, img_size: tuple[int, int] | None = None, load_weights: bool = True) -> MFuser:
    """MFuser at ``img_size`` (default cfg.img_size; the official model sees exactly 512×512 windows).

    ``cfg.backbone`` is the DINOv2 tower, ``cfg.mfuser`` everything else (VLM vision and text towers,
    fusers, MTEnhancer, head). Tower weights load from ``weights`` ("" random, "hub" or a local file).
    """
    m = cfg.mfuser
    if m is None:
        raise ValueError("model.family mfuser needs a model.mfuser section")
    size = tuple(img_size or cfg.img_size)
    b = cfg.backbone
    dino = create_vit(b.name, size, weights=b.weights if load_weights else "", overrides=b.overrides)
    vlm = create_vit(m.vlm.name, size, weights=m.vlm.weights if load_weights else "", overrides=m.vlm.overrides,
                     num_classes=m.vlm.embed_dim)
    depth, width = len(vlm.blocks), int(vlm.embed_dim)
    projections = None
    if m.projections or (m.projections is None and int(dino.embed_dim) != width):
        projections = FuserProjections(int(dino.embed_dim), width, depth)
    fusers = nn.ModuleList(MVFuser(width, d_state=m.d_state, d_conv=m.d_conv, dt_rank=m.dt_rank,
                                   proj_drop=m.fuser_dropout, chunk=m.scan_chunk) for _ in range(depth))
    channels = int(dino.embed_dim) + width
    vlm_entry = find_entry(m.vlm.name)
    stats = {} if vlm_entry is None else {"vlm_mean": vlm_entry.mean, "vlm_std": vlm_entry.std}
    encoder = FusedEncoder(dino, vlm, fusers, SimpleFPN(channels), out_indices=b.out_indices,
                           projections=projections, **stats)

    text = m.text
    tower = build_text_tower(text.name, weights=text.weights if load_weights else "",
                             context_length=text.context_length, overrides=text.overrides)
    class_names = list(CITYSCAPES_CLASSES) if cfg.num_classes == 19 else [f"class {i}" for i in range(cfg.num_classes)]
    text_encoder = PromptTextEncoder(tower, class_names, n_ctx=text.n_ctx, tokenizer=name_tokenizer(text.name))
    embed = text_encoder.out_dim
    if embed != encoder.joint_dim:
        raise ValueError(f"the text tower's output ({embed}) must match the vision head's (mfuser.vlm.embed_dim "
                         f"{encoder.joint_dim})")
    context_decoder = ContextDecoder(embed, m.enhancer_width, m.enhancer_heads, m.enhancer_layers,
                                     m.enhancer_dropout, d_state=m.d_state, dt_rank=math.ceil(m.enhancer_width / 16))
    pixel_decoder = TextPixelDecoder([channels] * 4, text_dim=embed, num_texts=cfg.num_classes,
                                     conv_dim=m.conv_dim, mask_dim=m.mask_dim, num_layers=m.pixel_decoder_layers,
                                     num_heads=m.heads, num_points=m.points, ffn_dim=m.ffn_dim)
    decoder = TextQueryDecoder(text_dim=embed, hidden_dim=m.conv_dim, num_queries=cfg.num_classes,
                               num_heads=m.heads, num_layers=m.decoder_layers, ffn_dim=m.ffn_dim,
                               mask_dim=m.mask_dim)
    gamma = torch.empty(embed)
    if m.gamma_init is None:
        nn.init.trunc_normal_(gamma)  # the released code's effective init (its 1e-4 fill is overwritten)
    else:
        nn.init.constant_(gamma, m.gamma_init)
    return MFuser(encoder, text_encoder, context_decoder, TextQueryHead(pixel_decoder, decoder), gamma)


def build_depthforge(cfg: ModelConfig, img_size: tuple[int, int] | None = None,
                     load_weights: bool = True) -> DepthForge:
    """DepthForge (family depthforge) or its Rein baseline (family rein) at ``img_size`` (default cfg.img_size).

    ``cfg.backbone`` is the frozen visual tower (DINOv2-L at patch 16 for the official 512² windows),
    ``cfg.depthforge`` the depth tower, the tokens and the head. Tower weights load from their ``weights``.
    """
    d = cfg.depthforge
    if d is None:
        raise ValueError(f"model.family {cfg.family} needs a model.depthforge section")
    if cfg.family == "depthforge" and d.depth is None:
        raise ValueError("model.family depthforge needs model.depthforge.depth (the Depth Anything V2 encoder)")
    if cfg.family == "rein" and (d.depth is not None or d.dqcm):
        raise ValueError("model.family rein is DepthForge without depth: set model.depthforge.depth: null and "
                         "dqcm: false (or use family depthforge)")
    size = tuple(img_size or cfg.img_size)
    b = cfg.backbone
    visual = create_vit(b.name, size, weights=b.weights if load_weights else "", overrides=b.overrides)
    depth = None
    if d.depth is not None:
        depth = create_vit(d.depth.name, size, weights=d.depth.weights if load_weights else "",
                           overrides=d.depth.overrides)
    width = int(visual.embed_dim)
    patch = int(visual.patch_embed.patch_size[0])
    reins = ReinTokens(len(visual.blocks), width, patch_size=patch, token_length=d.token_length, rank=d.rank,
                       query_dim=d.conv_dim, scale_init=d.scale_init)
    stats = {}
    for prefix, name in (("", b.name), ("depth_", d.depth.name if d.depth is not None else "")):
        entry = find_entry(name) if name else None
        if entry is not None:
            stats.update({f"{prefix}mean": entry.mean, f"{prefix}std": entry.std})
    encoder = ReinEncoder(visual, reins, depth, out_indices=b.out_indices or default_out_indices(b.name, len(
        visual.blocks)), scales=d.scales, **stats)
    num_maps = len(encoder.out_indices)
    pixel_decoder = DeformPixelDecoder([width] * num_maps, conv_dim=d.conv_dim, mask_dim=d.mask_dim,
                                       num_layers=d.pixel_decoder_layers, num_heads=d.heads, num_points=d.points,
                                       ffn_dim=d.pixel_ffn_dim)
    decoder = MaskedQueryDecoder(hidden_dim=d.conv_dim, num_queries=d.token_length, num_classes=cfg.num_classes,
                                 num_heads=d.heads, num_layers=d.decoder_layers, ffn_dim=d.ffn_dim,
                                 mask_dim=d.mask_dim)
    correction = QueryCorrection(width, num_maps, d.dqcm_reduction) if d.dqcm else None
    return DepthForge(encoder, MaskFormerHead(pixel_decoder, decoder, correction))


def build_model(cfg: ModelConfig, img_size: tuple[int, int] | None = None, with_lora: bool = True,
                load_weights: bool = True) -> nn.Module:
    """The model of ``cfg.family`` (vfmnet_mgrnet, mfuser, depthforge or rein)."""
    if cfg.family == "mfuser":
        return build_mfuser(cfg, img_size, load_weights)
    if cfg.family in ("depthforge", "rein"):
        return build_depthforge(cfg, img_size, load_weights)
    if cfg.family == "vfmnet_mgrnet":
        return build_vfmnet(cfg, img_size, with_lora, load_weights)
    raise ValueError(f"model.family {cfg.family!r} cannot be built here (known: vfmnet_mgrnet, mfuser, depthforge, "
                     "rein)")
