"""Named vision foundation backbones: the timm model behind each, its size, taps and normalisation.

The catalog adds defaults, not restrictions: any timm ViT name still builds through
``create_vit`` / ``create_backbone``, with taps at quarter depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
from timm.models import split_model_name_tag

from .vit import ViTBackbone, create_vit, quarter_depth_indices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# The DGSS reference configs (VFMSeg / Rein) tap every 24-block ViT-L at these blocks.
VIT_L_TAPS = (7, 11, 15, 23)


@dataclass(frozen=True)
class BackboneEntry:
    """One catalog backbone.

    Attributes:
        key: short name, e.g. ``dinov2_l16``.
        timm_name: timm architecture name without a pretrained tag.
        embed_dim, depth, num_heads, patch_size: the architecture at real size.
        out_indices: default block taps (raw block outputs, no final norm).
        mean, std: RGB normalisation (0–1 scale) the weights were trained with.
        hub_tag: timm pretrained tag for ``weights="hub"``; "" when the weights must come from a
            local file (e.g. the patch-16 conversion).
        timm_kwargs: constructor kwargs beyond timm's defaults for ``timm_name``.
        lora_targets: names of the attention projections LoRA should wrap in this model.
        weights_note: where the reference weights come from.
    """

    key: str
    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    out_indices: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hub_tag: str = ""
    timm_kwargs: tuple[tuple[str, object], ...] = ()
    lora_targets: tuple[str, ...] = ("qkv",)
    weights_note: str = ""

    @property
    def hub_name(self) -> str:
        """timm name with the pretrained tag, e.g. ``vit_large_patch14_dinov2.lvd142m``."""
        return f"{self.timm_name}.{self.hub_tag}" if self.hub_tag else self.timm_name


def _entry(key: str, timm_name: str, dims: tuple[int, int, int, int], mean: tuple[float, float, float],
           std: tuple[float, float, float], hub_tag: str = "", **extra: object) -> BackboneEntry:
    embed_dim, depth, num_heads, patch = dims
    taps = VIT_L_TAPS if depth == 24 else tuple(quarter_depth_indices(depth))
    return BackboneEntry(key, timm_name, embed_dim, depth, num_heads, patch, taps, mean, std, hub_tag, **extra)


def _da_v2_note(size: str, patch: int, img: int) -> str:
    """The conversion command for a Depth Anything V2 encoder (``size``: s, b or l) at ``patch`` and ``img``."""
    extra = f" --patch {patch} --img {img}" if (patch, img) != (16, 512) else ""
    return (f"python -m training.backbones.convert --src depth_anything_v2_vit{size}.pth "
            f"--dst depth_anything_v2_vit{size}{patch}_{img}.safetensors{extra} "
            f"(or --src the Hugging Face Depth-Anything-V2-*-hf model.safetensors)")


# EVA02 in timm has separate q/k/v projections (qkv_fused=False), so LoRA cannot target "qkv" there.
_EVA_LORA = ("q_proj", "k_proj", "v_proj")

CATALOG: dict[str, BackboneEntry] = {e.key: e for e in (
    _entry("dinov2_s14", "vit_small_patch14_dinov2", (384, 12, 6, 14), IMAGENET_MEAN, IMAGENET_STD, "lvd142m"),
    _entry("dinov2_b14", "vit_base_patch14_dinov2", (768, 12, 12, 14), IMAGENET_MEAN, IMAGENET_STD, "lvd142m"),
    _entry("dinov2_l14", "vit_large_patch14_dinov2", (1024, 24, 16, 14), IMAGENET_MEAN, IMAGENET_STD, "lvd142m"),
    _entry("dinov2_g14", "vit_giant_patch14_dinov2", (1536, 40, 24, 14), IMAGENET_MEAN, IMAGENET_STD, "lvd142m"),
    # The VFMSeg/Rein 512-crop setting: ViT-L built with patch 16 (32×32 tokens at 512), its weights made
    # offline from dinov2_vitl14_pretrain.pth by `python -m training.backbones.convert`.
    _entry("dinov2_l16", "vit_large_patch14_dinov2", (1024, 24, 16, 16), IMAGENET_MEAN, IMAGENET_STD, "",
           timm_kwargs=(("patch_size", 16),),
           weights_note="python -m training.backbones.convert --src dinov2_vitl14_pretrain.pth "
                        "--dst dinov2_vitl16_512.safetensors"),
    # The Depth Anything V2 encoders (its DPT depth head unused): DINOv2 ViTs with layer-scale, so timm's DINOv2
    # architectures hold them. timm hosts no such weights; the conversion reads the release .pth or the Hugging
    # Face model.safetensors. At patch 14 and the native 518 it only renames keys.
    _entry("depth_anything_v2_s14", "vit_small_patch14_dinov2", (384, 12, 6, 14), IMAGENET_MEAN, IMAGENET_STD,
           weights_note=_da_v2_note("s", 14, 518)),
    _entry("depth_anything_v2_b14", "vit_base_patch14_dinov2", (768, 12, 12, 14), IMAGENET_MEAN, IMAGENET_STD,
           weights_note=_da_v2_note("b", 14, 518)),
    _entry("depth_anything_v2_l14", "vit_large_patch14_dinov2", (1024, 24, 16, 14), IMAGENET_MEAN, IMAGENET_STD,
           weights_note=_da_v2_note("l", 14, 518)),
    # DepthForge's depth encoder, run in lockstep with dinov2_l16 at the same 32×32 grid at 512.
    _entry("depth_anything_v2_l16", "vit_large_patch14_dinov2", (1024, 24, 16, 16), IMAGENET_MEAN, IMAGENET_STD,
           timm_kwargs=(("patch_size", 16),),
           weights_note=_da_v2_note("l", 16, 512)),
    # EVA02-CLIP-L/14 at 336 (EVA02_CLIP_L_336_psz14_s6B, the DGSS reference EVA02 weights).
    _entry("eva02_l14", "eva02_large_patch14_clip_336", (1024, 24, 16, 14), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
           "merged2b", lora_targets=_EVA_LORA),
    # EVA02-L/14 masked-image-modelling pretraining on Merged-38M.
    _entry("eva02_l14_mim", "eva02_large_patch14_224", (1024, 24, 16, 14), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
           "mim_m38m", lora_targets=_EVA_LORA),
    # OpenAI CLIP ViT-L/14 uses QuickGELU; timm's non-quickgelu name would run it with GELU.
    _entry("clip_l14", "vit_large_patch14_clip_quickgelu_224", (1024, 24, 16, 14), OPENAI_CLIP_MEAN,
           OPENAI_CLIP_STD, "openai"),
    _entry("clip_l14_336", "vit_large_patch14_clip_quickgelu_336", (1024, 24, 16, 14), OPENAI_CLIP_MEAN,
           OPENAI_CLIP_STD, "openai"),
    # SigLIP ViT-L/16 at 384 (WebLI); no class token.
    _entry("siglip_l16", "vit_large_patch16_siglip_384", (1024, 24, 16, 16), SIGLIP_MEAN, SIGLIP_STD, "webli"),
)}


def find_entry(key_or_name: str) -> BackboneEntry | None:
    """The entry for a catalog key or a timm name (tag optional), or None.

    A timm name maps to the entry built from it without extra kwargs (so
    ``vit_large_patch14_dinov2`` is ``dinov2_l14``, never the patch-16 variant). It names timm's own
    weights, so an entry with a hub tag wins over one whose weights come from a local file
    (``dinov2_l14``, not ``depth_anything_v2_l14``, which shares its architecture).
    """
    if key_or_name in CATALOG:
        return CATALOG[key_or_name]
    base, tag = split_model_name_tag(key_or_name)
    matches = [e for e in CATALOG.values()
               if e.timm_name == base and not e.timm_kwargs and (not tag or tag == e.hub_tag)]
    matches.sort(key=lambda e: not e.hub_tag)  # stable: catalog order among equals
    return matches[0] if matches else None


def catalog_entry(key_or_timm_name: str) -> BackboneEntry:
    """The entry for a catalog key or timm name; ValueError listing the known keys otherwise."""
    entry = find_entry(key_or_timm_name)
    if entry is None:
        raise ValueError(f"unknown backbone {key_or_timm_name!r}; catalog keys: {', '.join(CATALOG)} "
                         f"(or their timm names: {', '.join(sorted({e.timm_name for e in CATALOG.values()}))})")
    return entry


def resolve_timm_name(key_or_name: str, hub: bool = False) -> tuple[str, dict]:
    """(timm name to create, constructor kwargs) for a catalog key or a plain timm name.

    Args:
        key_or_name: catalog key, or any timm model name (with or without a pretrained tag).
        hub: the weights come from timm's hub: a catalog key gets its pretrained tag.

    Raises:
        ValueError: neither a catalog key nor a timm model, or ``hub`` for an entry with no hub weights.
    """
    entry = CATALOG.get(key_or_name)
    if entry is not None:
        if hub and not entry.hub_tag:
            raise ValueError(f"backbone {entry.key!r} has no hub weights; make a local file with: {entry.weights_note}")
        # The tag also selects timm's pretrained_cfg, whose input size tells its filter the source grid.
        return entry.hub_name, dict(entry.timm_kwargs)
    if not timm.is_model(key_or_name):
        raise ValueError(f"unknown backbone {key_or_name!r}: not a timm model nor a catalog key "
                         f"({', '.join(CATALOG)})")
    return key_or_name, {}


def default_out_indices(key_or_name: str, depth: int) -> list[int]:
    """The catalog taps when ``depth`` is the entry's real depth, else blocks at quarter depth."""
    entry = find_entry(key_or_name)
    if entry is not None and entry.depth == depth:
        return list(entry.out_indices)
    return quarter_depth_indices(depth)


def create_backbone(key_or_name: str, img_size: tuple[int, int], weights: str = "", overrides: dict | None = None,
                    out_indices: list[int] | None = None) -> ViTBackbone:
    """A ViTBackbone for a catalog key or timm name at ``img_size`` (H, W).

    Args:
        key_or_name: catalog key (``dinov2_l16``, ``eva02_l14``, …) or any timm ViT name.
        weights: "" (random), "hub" (the entry's pretrained tag, needs network) or a local file.
        overrides: timm constructor kwargs applied after the entry's (e.g. a tiny embed_dim/depth).
        out_indices: block taps; default: the entry's taps at its real depth, else quarter depth.

    Returns:
        A backbone mapping (N,3,H,W) to len(out_indices) maps (N,D,H/p,W/p).
    """
    vit = create_vit(key_or_name, img_size, weights=weights, overrides=overrides)
    indices = list(out_indices) if out_indices else default_out_indices(key_or_name, len(vit.blocks))
    return ViTBackbone(vit, indices)
