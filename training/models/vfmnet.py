"""VFMNet: a LoRA-tuned ViT backbone and the deconvolution decoder."""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.vit import ViTBackbone
from .deconv_head import DeconvHead


class VFMNet(nn.Module):
    """Backbone features → DeconvHead logits at 4/p of the input (1/4 for patch 16)."""

    def __init__(self, backbone: ViTBackbone, head: DeconvHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,3,H,W) normalised → logits (N,C,4H/p,4W/p)."""
        return self.head(self.backbone(x))
