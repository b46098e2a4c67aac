"""Training objectives: what one batch costs, per model family."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgss_perception.labels import IGNORE_INDEX

from .config import TrainConfig


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, norm: str = "all") -> torch.Tensor:
    """Cross-entropy on logits (N,C,h,w) upsampled to labels (N,H,W); 255 ignored.

    ``norm`` "all" divides by every pixel, ignored ones included (mmseg's default, the
    official setting); "valid" by the labelled pixels only.
    """
    if norm not in ("all", "valid"):
        raise ValueError(f"loss_norm must be all or valid, got {norm!r}")
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if norm == "valid":
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / labels.numel()


def compute_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch: images (N,3,H,W) normalised, labels (N,H,W) int64 → (loss, logged parts).

    The whole crop runs through the model at its size (VFMNet's single view).
    """
    logits = model(images)
    loss = segmentation_loss(logits.float(), labels, cfg.optim.loss_norm)
    return loss, {"loss_coarse": float(loss.detach())}
