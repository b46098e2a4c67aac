"""Sine positional encoding of a feature map (DETR / mmcv ``SinePositionalEncoding``, no padding mask).

For a map of h × w, row i and column j get the normalised coordinates y = (i + 1)/(h + eps)·scale and
x = (j + 1)/(w + eps)·scale (the cumulative sums of an all-valid mask, as the padded-batch form computes
them). Each is expanded over ``num_feats`` channels with frequencies temperature^(2⌊k/2⌋/num_feats),
sin on even and cos on odd channels; the y channels come first, then the x channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.models.portable import arange_like


def sine_position_encoding(x: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0,
                           normalize: bool = True, scale: float = 2 * math.pi, eps: float = 1e-6) -> torch.Tensor:
    """Positional encoding for the spatial grid of ``x``.

    Only x's shape, dtype and device are used; its sizes are read as Python ints, so a traced graph holds
    the encoding as a constant of the traced size.

    Args:
        x: (N, C, H, W) feature map.
        num_feats: channels per axis; the output has 2·num_feats.
        temperature: base of the frequency progression.
        normalize: scale the coordinates to (0, scale] before the frequencies are applied.
        scale: the range the coordinates are normalised to.
        eps: added to the extent in the normalisation (kept for parity with the padded-mask form).

    Returns:
        (N, 2·num_feats, H, W), in x's dtype.
    """
    n, _, h, w = x.shape
    ctype = torch.promote_types(x.dtype, torch.float32)  # angles up to 2π·… lose too much in half precision
    y_embed = arange_like(x, 1, h + 1, dtype=ctype)
    x_embed = arange_like(x, 1, w + 1, dtype=ctype)
    if normalize:
        y_embed = y_embed / (h + eps) * scale
        x_embed = x_embed / (w + eps) * scale
    k = arange_like(x, num_feats, dtype=ctype)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)

    def expand(coord: torch.Tensor) -> torch.Tensor:
        angles = coord[:, None] / dim_t  # (L, num_feats); channels 2m and 2m + 1 share a frequency
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1).flatten(1)

    pos_y = expand(y_embed)[:, None, :].expand(h, w, num_feats)
    pos_x = expand(x_embed)[None, :, :].expand(h, w, num_feats)
    pos = torch.cat([pos_y, pos_x], dim=-1).permute(2, 0, 1)  # (2·num_feats, H, W)
    return pos.to(x.dtype).unsqueeze(0).expand(n, -1, -1, -1)


class SinePositionEncoding(nn.Module):
    """Module form of ``sine_position_encoding`` (no parameters).

    Args:
        num_feats: channels per axis; the output has 2·num_feats.
        temperature: base of the frequency progression.
        normalize: scale the coordinates to (0, scale].
        scale: the range the coordinates are normalised to.
        eps: added to the extent in the normalisation.
    """

    def __init__(self, num_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi, eps: float = 1e-6) -> None:
        super().__init__()
        if num_feats % 2:
            raise ValueError(f"SinePositionEncoding: num_feats must be even (sin/cos pairs), got {num_feats}")
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode the grid of ``x``.

        Args:
            x: (N, C, H, W).

        Returns:
            (N, 2·num_feats, H, W), in x's dtype.
        """
        return sine_position_encoding(x, self.num_feats, self.temperature, self.normalize, self.scale, self.eps)
