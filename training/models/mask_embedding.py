"""MGRNet's mask embedding: coarse class logits → tokens on the image-feature grid (VFMSeg, Fig. 3c).

Two 2×2 stride-2 convolutions bring the coarse logits from 4× the feature grid down to
it, and a 1×1 convolution widens them to the attention width.
"""

from __future__ import annotations

import torch
from torch import nn

from .deconv_head import norm_groups


class MaskEmbedding(nn.Module):
    """Conv 2×2/2 → GN → GELU → Conv 2×2/2 → GN → GELU → Conv 1×1 → GN.

    Args:
        num_classes: channels C of the coarse logits.
        channels: widths of the two strided convolutions (paper: 64, 128).
        dim: output width, the attention token width (paper: 256).
    """

    def __init__(self, num_classes: int, channels: tuple[int, int] = (64, 128), dim: int = 256) -> None:
        super().__init__()
        c1, c2 = channels
        self.down1 = nn.Sequential(
            nn.Conv2d(num_classes, c1, 2, stride=2), nn.GroupNorm(norm_groups(c1), c1), nn.GELU())
        self.down2 = nn.Sequential(nn.Conv2d(c1, c2, 2, stride=2), nn.GroupNorm(norm_groups(c2), c2), nn.GELU())
        # No activation after the last norm: the tokens feed key/value projections directly.
        self.proj = nn.Sequential(nn.Conv2d(c2, dim, 1), nn.GroupNorm(norm_groups(dim), dim))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (N,C,4h,4w) → embedding (N,dim,h,w)."""
        return self.proj(self.down2(self.down1(logits)))
