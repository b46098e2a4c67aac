"""Input normalisation shared by training and the exported graphs."""

from __future__ import annotations

import torch


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """x float (N,3,H,W) in 0–255 → (x/255 − mean)/std per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x - m) / s
