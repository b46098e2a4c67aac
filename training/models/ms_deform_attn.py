"""Multi-scale deformable attention (Deformable DETR) in plain, exportable torch.

Each query attends, per head, to ``num_points`` locations on each of ``num_levels`` feature maps: the
locations are its reference point plus learned offsets (in pixels of the level), the values there are read
by bilinear interpolation, and a softmax over the levels × points of a head weighs them.

The core is written with ``F.grid_sample`` (ONNX GridSample, opset ≥ 16), in place of mmcv's CUDA kernel;
``ms_deform_attn_reference`` spells the same interpolation out with gathers, to check it.
Sampling follows Deformable DETR / mmcv: a location (x, y) in [0, 1]² spans the map edge to edge (so pixel
(i, j) has its centre at ((j + 0.5)/w, (i + 0.5)/h)), interpolation is bilinear with align_corners=False
and everything outside the map reads as zero.

``MSDeformAttn`` is the bare attention: query in, attended values out. The residual connection, dropout and
query positional embedding that mmcv's ``MultiScaleDeformableAttention`` folds into its forward belong to
the caller (the pixel-decoder layer adds them, with the same arithmetic).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.models.portable import values_like


def _check_shapes(value: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
                  sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> None:
    num_values = sum(int(h) * int(w) for h, w in spatial_shapes)
    if value.dim() != 4 or value.shape[1] != num_values:
        raise ValueError(f"value must be (N, {num_values}, heads, head_dim) for spatial_shapes {list(spatial_shapes)}, "
                         f"got {tuple(value.shape)}")
    n, _, heads, _ = value.shape
    levels = len(spatial_shapes)
    if sampling_locations.dim() != 6 or sampling_locations.shape[0] != n or sampling_locations.shape[2] != heads \
            or sampling_locations.shape[3] != levels or sampling_locations.shape[5] != 2:
        raise ValueError(f"sampling_locations must be (N, Lq, {heads}, {levels}, points, 2), "
                         f"got {tuple(sampling_locations.shape)}")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights must be {tuple(sampling_locations.shape[:-1])}, "
                         f"got {tuple(attention_weights.shape)}")


def _grid_sample(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear ``grid_sample`` (zeros outside, align_corners=False), computed in float32 for half inputs.

    value (B, C, h, w), grid (B, Lq, P, 2) → (B, C, Lq, P) in value's dtype. ONNX Runtime's CUDA provider has
    GridSample kernels for float32 only: a float16 node would run on the CPU with copies across the bus
    around it (and refuse CUDA graphs), so half-precision graphs sample in float32, as autocast does.
    """
    if value.dtype in (torch.float16, torch.bfloat16):
        out = F.grid_sample(value.float(), grid.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.to(value.dtype)
    return F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def ms_deform_attn_sample(value: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
                          sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention core, with one ``grid_sample`` per level.

    Args:
        value: (N, S, heads, head_dim), the levels' maps flattened row-major and concatenated in the order of
            ``spatial_shapes``, S = Σ h_l·w_l.
        spatial_shapes: the (h, w) of each level, as Python ints (static, so an exported graph has no
            data-dependent shapes).
        sampling_locations: (N, Lq, heads, levels, points, 2), (x, y) with [0, 1] spanning each map.
        attention_weights: (N, Lq, heads, levels, points), used as given (normally a softmax over
            levels × points).

    Returns:
        (N, Lq, heads·head_dim): per head, Σ over levels and points of weight × bilinear sample.
    """
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    n, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    value_list = value.split(sizes, dim=1)
    # grid_sample's (-1, -1)…(1, 1) covers the map edge to edge with align_corners=False, as [0, 1]² does here.
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (N, h·w, heads, head_dim) → (N·heads, head_dim, h, w): every head samples its own channels.
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(n * heads, head_dim, int(h), int(w))
        # (N, Lq, heads, points, 2) → (N·heads, Lq, points, 2): an Lq × points "image" of locations.
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(_grid_sample(value_l, grid_l))
    # (N·heads, head_dim, Lq, levels·points), weighted over the last axis.
    samples = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, num_queries, levels * points)
    out = (samples * weights).sum(-1)  # (N·heads, head_dim, Lq)
    return out.view(n, heads * head_dim, num_queries).transpose(1, 2)


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
                             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Compute the same operation with the bilinear interpolation written out (corners, weights, gathers).

    Slow and memory-hungry; kept to check ``ms_deform_attn_sample`` (outputs and gradients).

    Args:
        value: (N, S, heads, head_dim).
        spatial_shapes: the (h, w) of each level.
        sampling_locations: (N, Lq, heads, levels, points, 2) as (x, y).
        attention_weights: (N, Lq, heads, levels, points).

    Returns:
        (N, Lq, heads·head_dim).
    """
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    n, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    value_list = value.split(sizes, dim=1)
    out = value.new_zeros(n, num_queries, heads, head_dim)
    for level, (h, w) in enumerate(spatial_shapes):
        # (N, heads, h·w, head_dim), gathered along h·w.
        value_l = value_list[level].permute(0, 2, 1, 3)
        # Pixel coordinates with pixel centres at integers (align_corners=False).
        x = sampling_locations[:, :, :, level, :, 0] * w - 0.5  # (N, Lq, heads, points)
        y = sampling_locations[:, :, :, level, :, 1] * h - 0.5
        x0, y0 = torch.floor(x), torch.floor(y)
        # x − floor(x) keeps the gradient with respect to the location (floor's own gradient is zero).
        fx, fy = x - x0, y - y0
        weight = attention_weights[:, :, :, level]
        for cx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            for cy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
                index = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long()  # (N, Lq, heads, points)
                index = index.permute(0, 2, 1, 3).reshape(n, heads, num_queries * points, 1)
                corner = torch.gather(value_l, 2, index.expand(-1, -1, -1, head_dim))
                corner = corner.view(n, heads, num_queries, points, head_dim).permute(0, 2, 1, 3, 4)
                coeff = (wx * wy * inside.to(value.dtype) * weight).unsqueeze(-1)  # (N, Lq, heads, points, 1)
                out = out + (coeff * corner).sum(3)
    return out.reshape(n, num_queries, heads * head_dim)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR), (N, Lq, C) queries → (N, Lq, C).

    Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``) are those
    of mmcv's ``MultiScaleDeformableAttention``, so trained weights load by name.

    Args:
        embed_dim: channel width C of queries, values and output.
        num_heads: attention heads; C must be divisible by it.
        num_levels: feature levels sampled.
        num_points: sampling points per head and level.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 3, num_points: int = 4) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MSDeformAttn: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of directions, one per head; uniform weights.

        Head k's points start along direction 2πk/heads (scaled so the larger component is 1), point p at
        p + 1 pixels, on every level; zero offset and attention weights make that start independent of the
        query, and the attention uniform over levels × points.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], dim=-1)
        grid = grid / grid.abs().max(dim=-1, keepdim=True).values
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_input: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Attend from every query to its sampling points on all levels.

        Args:
            query: (N, Lq, C), with any positional embedding already added (it steers offsets and weights).
            reference_points: (N, Lq, levels, 2), (x, y) in [0, 1] per level.
            value_input: (N, S, C), the levels' maps flattened and concatenated in the order of
                ``spatial_shapes`` (S = Σ h_l·w_l); normally without positional embedding.
            spatial_shapes: the (h, w) of each level as Python ints.

        Returns:
            (N, Lq, C), after the output projection (no residual).
        """
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(f"MSDeformAttn: {self.num_levels} levels expected, got {len(spatial_shapes)}")
        n, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(n, value_input.shape[1], heads, self.embed_dim // heads)
        offsets = self.sampling_offsets(query).view(n, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(n, num_queries, heads, levels * points).softmax(-1)
        weights = weights.view(n, num_queries, heads, levels, points)
        # Offsets are in pixels of their level: divide by (w, h) to move in the [0, 1] frame.
        normalizer = values_like(query, [(w, h) for h, w in spatial_shapes])  # (levels, 2)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_sample(value, spatial_shapes, locations, weights))
