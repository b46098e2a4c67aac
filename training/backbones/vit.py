"""timm Vision Transformers as multi-level feature extractors.

Any timm ViT name works (DINOv2 by default). The model is built at a fixed
image size, so its positional embedding is resampled once when weights load
and never interpolated in forward — which keeps the graph exportable.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from ..checkpoint import load_state_dict_file


def quarter_depth_indices(depth: int) -> list[int]:
    """Block indices at 1/4, 1/2, 3/4 and full depth (0-based): depth 24 → [5, 11, 17, 23]."""
    return sorted({max(0, round(depth * q) - 1) for q in (0.25, 0.5, 0.75, 1.0)})


class ViTBackbone(nn.Module):
    """A timm ViT returning raw block outputs (no final norm) as NCHW maps.

    Args:
        model: a timm VisionTransformer built at the working image size.
        out_indices: block indices to tap.
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
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N,3,H,W) normalised → len(out_indices) maps (N,D,H/p,W/p)."""
        return self.model.forward_intermediates(
            x, indices=self.out_indices, norm=False, output_fmt="NCHW", intermediates_only=True)


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local timm-format checkpoint into ``model``, resampling the positional embedding.

    Raises ValueError naming missing and unexpected keys when the file does not fit.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = load_state_dict_file(path)
    # timm's filter converts original DINOv2/CLIP layouts and resamples pos_embed / patch kernels.
    state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise ValueError(f"backbone weights {path} do not fit {type(model).__name__}: "
                         f"missing {missing[:8]}{'…' if len(missing) > 8 else ''} ({len(missing)}), "
                         f"unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''} ({len(unexpected)})")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"backbone weights {path}: shape mismatch for {bad[:8]} "
                         f"(expected {[tuple(own[k].shape) for k in bad[:3]]}, "
                         f"found {[tuple(state[k].shape) for k in bad[:3]]})")
    model.load_state_dict(state)


def create_vit(name: str, img_size: tuple[int, int], weights: str = "", overrides: dict | None = None) -> nn.Module:
    """Build a timm ViT at ``img_size``.

    Args:
        name: timm model name, e.g. ``vit_large_patch14_dinov2``.
        weights: "" (random init), "hub" (timm/Hugging Face download, needs network) or a local file
            (.safetensors, .pth/.pt, loaded safely).
        overrides: timm constructor kwargs (embed_dim, depth, num_heads, …) for small variants.
    """
    kwargs = dict(overrides or {})
    model = timm.create_model(name, pretrained=(weights == "hub"), img_size=tuple(img_size),
                              num_classes=0, **kwargs)
    if weights and weights != "hub":
        load_backbone_weights(model, weights)
    return model
