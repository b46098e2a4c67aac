"""Export wrappers: the graph the runtime runs, around an eager model.

They move the runtime's per-frame work into the graph (uint8 NHWC in,
normalisation, upsampling, softmax, argmax), so only uint8 labels and a
confidence map leave the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models.preprocess import normalize


class SegmentationGraph(nn.Module):
    """uint8 (N,H,W,3) RGB → labels uint8 (N,H,W) + max-softmax float32 (N,H,W), or logits (N,C,H,W)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 output_kind: str = "labels_confidence") -> None:
        super().__init__()
        if output_kind not in ("labels_confidence", "logits"):
            raise ValueError(f"unknown output kind {output_kind!r}")
        self.model = model
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.output_kind = output_kind

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = normalize(image.permute(0, 3, 1, 2).float(), self.mean, self.std)
        logits = self.model(x)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.output_kind == "logits":
            return (logits,)
        confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
        return labels.to(torch.uint8), confidence
