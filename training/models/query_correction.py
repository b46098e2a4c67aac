"""DepthForge's dynamic query correction module (DQCM): the four levels, gated and fused, added to the 1/4 map.

Every level is resized (bilinear, align_corners False) to the highest-resolution map's size and passed
through one attention gate shared by all levels:

    x ← x · σ(W₂ · ReLU(W₁ · x))           channel gate: 1×1 convs C → C/16 → C, per pixel
    x ← x · σ(conv3×3(x))                 spatial gate: one map of weights

The gated levels are concatenated (levels·C channels) and fused by a 1×1 conv back to C; the model adds the
result to the highest-resolution map before the pixel decoder. Names follow the released head
(``attention_gate.channel_attention.{0,2}``, ``attention_gate.spatial_attention``, ``linear_fuse``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# At C 1024, 4 levels, reduction 16: channel gate 1024·64 + 64 + 64·1024 + 1024 = 132,160;
# spatial gate 9·1024 + 1 = 9,217; fuse 4096·1024 + 1024 = 4,195,328 → 4,336,705 (the reported 4.34M).
FULL_SIZE_PARAMS = 4_336_705


class AttentionGate(nn.Module):
    """Channel gate, then spatial gate, on one map.

    Args:
        channels: C.
        reduction: the channel gate's bottleneck is C / reduction.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if channels % reduction:
            raise ValueError(f"AttentionGate: {channels} channels are not divisible by the reduction {reduction}")
        self.channel_attention = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, kernel_size=1), nn.ReLU(),
            nn.Conv2d(channels // reduction, channels, kernel_size=1), nn.Sigmoid())
        self.spatial_attention = nn.Conv2d(channels, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, C, H, W)."""
        x = x * self.channel_attention(x)
        return x * torch.sigmoid(self.spatial_attention(x))


class QueryCorrection(nn.Module):
    """DQCM: (levels × (N, C, H_l, W_l), highest resolution first) → a correction (N, C, H_0, W_0).

    Args:
        channels: C of every level.
        num_levels: maps fused.
        reduction: the gate's channel reduction.
    """

    def __init__(self, channels: int, num_levels: int = 4, reduction: int = 16) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.attention_gate = AttentionGate(channels, reduction)
        self.linear_fuse = nn.Conv2d(num_levels * channels, channels, kernel_size=1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The correction to add to ``maps[0]``; ``maps`` highest resolution first."""
        if len(maps) != self.num_levels:
            raise ValueError(f"QueryCorrection: {self.num_levels} maps expected, got {len(maps)}")
        size = maps[0].shape[-2:]
        gated = [self.attention_gate(m if m.shape[-2:] == size else
                                     F.interpolate(m, size=size, mode="bilinear", align_corners=False))
                 for m in maps]
        return self.linear_fuse(torch.cat(gated, dim=1))
