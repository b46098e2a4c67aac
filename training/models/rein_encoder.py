"""Rein's and DepthForge's encoder: a frozen ViT whose every block output is refined by learnable tokens.

For an input x (N, 3, H, W) normalised with the visual tower's statistics:

1. The visual tower (DINOv2 or EVA02) embeds x. With a depth tower (DepthForge: the encoder of Depth
   Anything V2, a DINOv2-shaped ViT built at the same patch size and image size, so both give the same
   h×w grid), x is re-normalised to the depth tower's statistics and embedded there too.
2. For every block i, in lockstep: v ← visual.blocks[i](v); d ← depth.blocks[i](d);
   v ← tokens(v, i, depth = d's patch tokens). The depth tower runs unchanged (frozen, never refined); only
   its raw block outputs steer the tokens' attention. Without a depth tower (Rein) the tokens see v alone.
3. The patch tokens after the tapped blocks (raw block outputs, no final norm) become four (N, D, h, w) maps,
   resized (bilinear) by ``scales`` — ×4, ×2, ×1, ×½ by default, strides 4/8/16/32 of a patch-16 tower — for
   the Mask2Former head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.catalog import IMAGENET_MEAN, IMAGENET_STD
from ..backbones.vit import quarter_depth_indices
from .rein_tokens import ReinTokens
from .tower_steps import check_tower, embed_tokens, run_block

Stats = tuple[float, float, float]
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


class ReinEncoder(nn.Module):
    """Frozen visual tower + Rein tokens (+ the frozen depth tower): (N, 3, H, W) → four maps (N, D, s·h, s·w).

    Args:
        visual: the visual tower (timm VisionTransformer or Eva), built at the working image size.
        reins: the learnable tokens, one set per visual block, at the visual width.
        depth: the depth tower (a timm ViT of the same width, depth and token grid), or None for Rein.
        out_indices: blocks tapped (default: quarter depths; [7, 11, 15, 23] for the 24-block ViT-Ls).
        scales: resize factor of each tapped map, in tap order.
        mean, std: the statistics the input is normalised with (the visual tower's).
        depth_mean, depth_std: the depth tower's statistics (Depth Anything V2: ImageNet's).

    Raises:
        ValueError: towers that do not line up (width, depth, grid), tokens of the wrong size, bad taps.
    """

    def __init__(self, visual: nn.Module, reins: ReinTokens, depth: nn.Module | None = None,
                 out_indices: Sequence[int] | None = None, scales: Sequence[float] = PYRAMID_SCALES,
                 mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD, depth_mean: Stats = IMAGENET_MEAN,
                 depth_std: Stats = IMAGENET_STD) -> None:
        super().__init__()
        check_tower("ReinEncoder", "visual", visual)
        blocks, width = len(visual.blocks), int(visual.embed_dim)
        if (reins.num_layers, reins.embed_dim) != (blocks, width):
            raise ValueError(f"ReinEncoder: tokens for {reins.num_layers} layers of width {reins.embed_dim}, but the "
                             f"visual tower has {blocks} blocks of width {width}")
        if depth is not None:
            check_tower("ReinEncoder", "depth", depth)
            if (len(depth.blocks), int(depth.embed_dim)) != (blocks, width):
                raise ValueError(f"ReinEncoder: the depth tower ({len(depth.blocks)} blocks, width {depth.embed_dim}) "
                                 f"must match the visual tower ({blocks} blocks, width {width})")
            grids = tuple(visual.patch_embed.grid_size), tuple(depth.patch_embed.grid_size)
            if grids[0] != grids[1]:
                raise ValueError(f"ReinEncoder: token grids differ, visual {grids[0]} vs depth {grids[1]}; build both "
                                 "at the same image size and patch size")
        indices = list(out_indices) if out_indices else quarter_depth_indices(blocks)
        if any(not 0 <= i < blocks for i in indices) or sorted(set(indices)) != indices:
            raise ValueError(f"ReinEncoder: out_indices {indices} must be increasing block indices in [0, {blocks})")
        if len(scales) != len(indices):
            raise ValueError(f"ReinEncoder: {len(indices)} taps but {len(scales)} scales")
        self.visual = visual
        self.depth = depth
        self.reins = reins
        self.out_indices = indices
        self.scales = tuple(float(s) for s in scales)
        self.grid_size = tuple(int(g) for g in visual.patch_embed.grid_size)
        self.visual_prefix = int(visual.num_prefix_tokens)
        self.depth_prefix = 0 if depth is None else int(depth.num_prefix_tokens)
        for name, value in (("mean", mean), ("std", std), ("depth_mean", depth_mean), ("depth_std", depth_std)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        """Channels D of every map."""
        return int(self.visual.embed_dim)

    def depth_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """x re-normalised from the visual statistics to the depth tower's, (N, 3, H, W)."""
        return (x * self.std + self.mean - self.depth_mean) / self.depth_std

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, P + h·w, D) → (N, D, h, w)."""
        h, w = self.grid_size
        return tokens[:, self.visual_prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tapped block outputs after refinement, (N, D, h, w) each, before resizing."""
        v, v_rope = embed_tokens(self.visual, x)
        d = d_rope = None
        if self.depth is not None:
            d, d_rope = embed_tokens(self.depth, self.depth_pixels(x))
        outs = []
        for i in range(self.out_indices[-1] + 1):
            v = run_block(self.visual, i, v, v_rope)
            depth_patches = None
            if d is not None:
                d = run_block(self.depth, i, d, d_rope)
                depth_patches = d[:, self.depth_prefix:]
            v = self.reins(v, i, depth_patches, num_prefix=self.visual_prefix)
            if i in self.out_indices:
                outs.append(self._grid(v))
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, 3, H, W) → maps (N, D, s·h, s·w) for each scale s, in tap order (highest resolution first)."""
        h, w = self.grid_size
        maps = []
        for m, s in zip(self.taps(x), self.scales):
            if s != 1.0:
                # Sizes from the fixed grid, not the tensor's shape: constants in a traced graph.
                size = (max(1, round(h * s)), max(1, round(w * s)))
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            maps.append(m)
        return maps
