"""Input normalisation shared by training and the exported graphs."""

from __future__ import annotations

import torch
from torch import nn


def pixel_statistics(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std scaled to 0–255 pixels: two (1,3,1,1) tensors."""
    m = torch.tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1) * 255.0
    return m, s


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """x float (N,3,H,W) in 0–255 → (x/255 − mean)/std per channel."""
    m, s = pixel_statistics(mean, std, x.dtype, x.device)
    return (x - m) / s


class Normalize(nn.Module):
    """:func:`normalize` with the statistics held as buffers: float32 (N,3,H,W) in 0–255 → normalised.

    A traced graph reads buffers from the module, so the statistics follow it to any device; statistics
    made in ``forward`` would be stored in the graph as constants on the device it was traced on.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        m, s = pixel_statistics(mean, std)
        # Not persistent: derived from the card's mean and std, never learned state.
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float32 (N,3,H,W) in 0–255 → (x/255 − mean)/std per channel, (N,3,H,W)."""
        return (x - self.mean) / self.std
