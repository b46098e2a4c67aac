"""timm Vision Transformers as multi-level feature extractors.

Any timm ViT name works (DINOv2 by default), and so does a key of the backbone catalog
(``training.backbones.catalog``), which adds constructor defaults such as patch 16 for
DINOv2-L at 512. The model is built at a fixed image size, so its positional embedding is
resampled once when weights load and never interpolated in forward — which keeps the
graph exportable.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from ..checkpoint import load_state_dict_file

StateDict = dict[str, torch.Tensor]


def quarter_depth_indices(depth: int) -> list[int]:
    """Block indices at 1/4, 1/2, 3/4 and full depth (0-based): depth 24 → [5, 11, 17, 23]."""
    return sorted({max(0, round(depth * q) - 1) for q in (0.25, 0.5, 0.75, 1.0)})


class ViTBackbone(nn.Module):
    """A timm ViT (VisionTransformer or Eva) returning raw block outputs as NCHW maps.

    The taps are the residual stream right after the chosen blocks: no final norm, prefix
    tokens (class, registers) dropped. Blocks after the last tap are not run.

    Args:
        model: a timm VisionTransformer or Eva built at the working image size.
        out_indices: block indices to tap (0-based).
    """

    def __init__(self, model: nn.Module, out_indices: list[int]) -> None:
        super().__init__()
        depth = len(model.blocks)
        if not out_indices or any(not 0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {out_indices} must lie in [0, {depth})")
        self.model = model
        self.out_indices = list(out_indices)

    @property
    def embed_dim(self) -> int:
        """Channels D of every tapped map."""
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> int:
        """Stride p of the tapped maps relative to the input."""
        return int(self.model.patch_embed.patch_size[0])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N,3,H,W) normalised → len(out_indices) maps (N,D,H/p,W/p)."""
        return self.model.forward_intermediates(
            x, indices=self.out_indices, norm=False, stop_early=True, output_fmt="NCHW", intermediates_only=True)


def _listing(keys: list[str], limit: int) -> str:
    more = f", … {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}"[:-1] + more + "]"


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], limit: int = 8) -> str:
    """Say how ``found`` fails to fit ``expected`` (keys and shapes); "" when it fits exactly.

    Lists expected-but-missing and found-but-unexpected keys (first ``limit`` of each, with
    counts) and shape mismatches as "key expected (…) found (…)".
    """
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    shapes = [k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {_listing(missing, limit)} ({len(missing)} keys)")
    if unexpected:
        parts.append(f"unexpected {_listing(unexpected, limit)} ({len(unexpected)} keys)")
    if shapes:
        listed = "; ".join(f"{k} expected {tuple(expected[k].shape)} found {tuple(found[k].shape)}"
                           for k in shapes[:limit])
        parts.append(f"shape mismatch ({len(shapes)}): {listed}{'; …' if len(shapes) > limit else ''}")
    return ", ".join(parts)


def checkpoint_filter_for(model: nn.Module) -> Callable[[StateDict, nn.Module], StateDict]:
    """timm's checkpoint filter of the module that defines ``model``'s class.

    vision_transformer's filter converts original DINOv2/CLIP layouts; eva's converts EVA-CLIP
    and MIM layouts and skips the rope buffers. Both resample pos_embed / patch kernels to the
    model. A class from elsewhere gets the identity.
    """
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None) if type(model).__module__.startswith("timm.") else None
    return fn if callable(fn) else (lambda state, _model: state)


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model`` through timm's filter for its module.

    Raises:
        FileNotFoundError: the file does not exist (named).
        ValueError: the file is unreadable, or its keys/shapes do not fit (missing, unexpected and
            mismatched shapes listed).
    """
    state = load_state_dict_file(path)
    try:
        state = checkpoint_filter_for(model)(state, model)
    except Exception as exc:  # timm's resampling asserts on odd token counts and the like
        raise ValueError(f"backbone weights {path} cannot be adapted to {type(model).__name__}: {exc}") from exc
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise ValueError(f"backbone weights {path} do not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state)


def create_vit(name: str, img_size: tuple[int, int], weights: str = "", overrides: dict | None = None,
               num_classes: int = 0) -> nn.Module:
    """Build a timm ViT at ``img_size`` (H, W).

    Args:
        name: a timm model name (optionally with a pretrained tag), e.g. ``vit_large_patch14_dinov2``,
            or a catalog key such as ``dinov2_l16`` (its constructor defaults apply first).
        weights: "" (random init), "hub" (timm/Hugging Face download, needs network) or a local file
            (.safetensors, .pth/.pt, loaded safely).
        overrides: timm constructor kwargs (embed_dim, depth, num_heads, …) for small variants.
        num_classes: width of timm's ``head``; 0 (default) leaves no head. A CLIP vision tower keeps its
            image-text projection there (768 for EVA02-CLIP-L and OpenAI CLIP-L), so its weights load too.
    """
    from .catalog import resolve_timm_name

    timm_name, kwargs = resolve_timm_name(name, hub=weights == "hub")
    kwargs.update(overrides or {})
    model = timm.create_model(timm_name, pretrained=(weights == "hub"), img_size=tuple(img_size),
                              num_classes=num_classes, **kwargs)
    if weights and weights != "hub":
        load_backbone_weights(model, weights)
    return model
