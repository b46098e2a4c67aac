"""VFMNet: a LoRA-tuned ViT backbone and the deconvolution decoder; with MGRNet, the VFMSeg model."""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.vit import ViTBackbone
from .deconv_head import DeconvHead
from .mgrnet import MGRNet


class VFMNet(nn.Module):
    """Backbone features → DeconvHead logits at 4/p of the input (1/4 for patch 16).

    With a refine head this is the whole VFMSeg model: VFMNet's coarse prediction and MGRNet's
    refinement share the one backbone. Without it the state dict holds only ``backbone.*`` and
    ``head.*`` (what VFMNet-only packages carry); the refine head adds ``refine_head.*``.

    Args:
        backbone: the (LoRA-tuned) ViT feature extractor.
        head: VFMNet's deconvolution decoder.
        refine_head: MGRNet, or None for VFMNet alone.
    """

    def __init__(self, backbone: ViTBackbone, head: DeconvHead, refine_head: MGRNet | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.refine_head = refine_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,3,H,W) normalised → coarse logits (N,C,4H/p,4W/p); the same as :meth:`coarse`."""
        return self.coarse(x)

    def coarse(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,3,H,W) normalised → VFMNet logits (N,C,4H/p,4W/p)."""
        return self.head(self.backbone(x))

    def refine(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """MGRNet on a high-resolution window.

        Args:
            x: the window (N,3,H,W), normalised, at the size the backbone is built for.
            context: the window's coarse logits (N,C,H',W'), any size.

        Returns:
            Refined logits (N,C,H/p,W/p).
        """
        if self.refine_head is None:
            raise RuntimeError("this model has no refine head (model.refine is not set in its config)")
        return self.refine_head(self.backbone(x), context)
