"""MGRNet, VFMSeg's mask-guided refinement network (the VFMSeg paper, Fig. 3b–d).

High-resolution image features of a window are the queries; the coarse logits of the same
window (from VFMNet on the low-resolution view) are embedded into tokens on the feature grid
and serve as keys and values. In training a share of the query features is replaced by a
learned mask token so that the network cannot ignore the coarse prior (feature masking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .deconv_head import norm_groups
from .mask_embedding import MaskEmbedding
from .semantic_attention import SemanticAttentionBlock


class MGRNet(nn.Module):
    """Fuse → mask features (training) → GN → feature-to-semantics blocks → Dropout2d → 1×1 classifier.

    Args:
        in_channels: channels of the concatenated backbone features (taps × embed dim; 4096 for ViT-L).
        num_classes: classes C of the coarse logits and of the output.
        dim: token width (paper: 256).
        depth: number of attention blocks (paper: 3).
        heads, head_dim: attention heads and their width (paper: 8, 64).
        ffn_dim: GEGLU inner width (paper: 1024).
        mask_channels: widths of the mask embedding's strided convolutions (paper: 64, 128).
        dropout: dropout in the blocks and before the classifier (paper: 0.1).
        mask_ratio: probability that a feature position is replaced by the mask token in training
            (paper: 0.2).
    """

    def __init__(self, in_channels: int, num_classes: int, dim: int = 256, depth: int = 3, heads: int = 8,
                 head_dim: int = 64, ffn_dim: int = 1024, mask_channels: tuple[int, int] = (64, 128),
                 dropout: float = 0.1, mask_ratio: float = 0.2) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        self.num_classes = num_classes
        self.mask_ratio = mask_ratio
        self.fuse = nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.GroupNorm(norm_groups(dim), dim), nn.GELU())
        self.mask_embed = MaskEmbedding(num_classes, tuple(mask_channels), dim)
        self.mask_token = nn.Parameter(torch.randn(1, dim, 1, 1))
        # The queries are normalised after masking, so masked and kept positions share one scale.
        self.norm = nn.GroupNorm(norm_groups(dim), dim, eps=1e-6)
        self.blocks = nn.ModuleList(SemanticAttentionBlock(dim, heads, head_dim, ffn_dim, dropout)
                                    for _ in range(depth))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)
        # A near-zero classifier start, as mmseg initialises its decode heads' conv_seg.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def mask_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,dim,h,w) → x with positions swapped for the mask token, each with probability ``mask_ratio``.

        A position is replaced in all channels at once (a whole token); the draw uses the
        global torch RNG, so seeded runs repeat.
        """
        n, _, h, w = x.shape
        keep = torch.rand(n, 1, h, w, device=x.device) > self.mask_ratio
        return torch.where(keep, x, self.mask_token.to(x.dtype))

    def forward(self, features: list[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        """Refine one window.

        Args:
            features: backbone maps of the window, each (N,D,h,w).
            context: the window's coarse logits (N,C,H',W'), any size; resized to (4h,4w).

        Returns:
            Refined logits (N,C,h,w).
        """
        if not features:
            raise ValueError("MGRNet needs at least one feature map")
        if context.dim() != 4 or context.shape[1] != self.num_classes:
            raise ValueError(f"context must be coarse logits (N,{self.num_classes},H,W), got {tuple(context.shape)}")
        x = self.fuse(torch.cat(features, dim=1))
        h, w = x.shape[-2:]
        if tuple(context.shape[-2:]) != (4 * h, 4 * w):
            context = F.interpolate(context, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
        mask_tokens = self.mask_embed(context).flatten(2).transpose(1, 2)  # (N,h·w,dim)
        if self.training and self.mask_ratio > 0:
            x = self.mask_features(x)
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N,h·w,dim)
        for block in self.blocks:
            tokens = block(tokens, mask_tokens)
        x = tokens.transpose(1, 2).unflatten(-1, (h, w))
        return self.classifier(self.dropout(x))
