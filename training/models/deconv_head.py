"""VFMNet's deconvolution decoder (the VFMSeg paper, Fig. 3a).

Concatenated multi-level ViT features at 1/p are fused by a 1×1 conv and
upsampled ×4 by two transposed convolutions before a 1×1 classifier.
"""

from __future__ import annotations

import torch
from torch import nn


def norm_groups(channels: int, wanted: int = 32) -> int:
    """Largest GroupNorm group count ≤ wanted that divides channels (32 at paper sizes, fewer for tiny ones)."""
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


class DeconvHead(nn.Module):
    """1×1 conv (no bias) → GN → ReLU → ConvT×2 → BN → GELU → ConvT×2 → GELU → Dropout2d → 1×1.

    Args:
        in_channels: channels of the concatenated features (4 × embed dim; 4096 for ViT-L).
        channels: widths after the fuse conv and the two deconvolutions (paper: 1024, 512, 256).
        num_classes: output classes.
        dropout: Dropout2d probability before the classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: tuple[int, int, int] = (1024, 512, 256),
                 dropout: float = 0.1) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels, c0, 1, bias=False), nn.GroupNorm(norm_groups(c0), c0), nn.ReLU(inplace=True))
        self.up1 = nn.Sequential(nn.ConvTranspose2d(c0, c1, 2, stride=2), nn.BatchNorm2d(c1), nn.GELU())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(c1, c2, 2, stride=2), nn.GELU())
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(c2, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: maps (N,D,h,w) → logits (N,num_classes,4h,4w)."""
        x = self.fuse(torch.cat(features, dim=1))
        x = self.up2(self.up1(x))
        return self.classifier(self.dropout(x))
