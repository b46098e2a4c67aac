"""Simple feature pyramid of MFuser's fused backbone: four single-scale taps → strides p/4, p/2, p, 2p.

The four taps (residual stream after blocks 7, 11, 15 and 23 of a 24-block ViT, each the channel concatenation
of the two towers' patch grids, (N, C, h, w)) are resampled one branch per tap, as the official backbones do:

* fpn1 on the first (shallowest) tap: ConvTranspose2d(k2, s2) → BatchNorm2d → GELU → ConvTranspose2d(k2, s2), ×4;
* fpn2 on the second tap: ConvTranspose2d(k2, s2), ×2;
* fpn3 on the third tap: identity;
* fpn4 on the fourth (deepest) tap: MaxPool2d(2), ÷2.

So tap i feeds branch i — the pyramid is not built from the last map alone (that is ViTDet's variant).
The official code uses SyncBatchNorm; BatchNorm2d holds the same parameters and buffers, and exports.
Parameter names (``fpn1.0``, ``fpn1.1``, ``fpn1.3``, ``fpn2.0``) follow the checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn


class SimpleFPN(nn.Module):
    """Per-tap resampling to a 4-level pyramid, highest resolution first; channels unchanged.

    Args:
        channels: C of every tap and every output (2048 for two ViT-L towers).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Resample tap i with branch i.

        Args:
            taps: four maps (N, C, h, w), shallowest tap first.

        Returns:
            Four maps: (N, C, 4h, 4w), (N, C, 2h, 2w), (N, C, h, w), (N, C, ⌊h/2⌋, ⌊w/2⌋).

        Raises:
            ValueError: not exactly four taps.
        """
        if len(taps) != 4:
            raise ValueError(f"SimpleFPN takes exactly 4 taps (one per branch), got {len(taps)}")
        return [branch(tap) for branch, tap in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), taps)]
