"""Training objectives: what one batch costs, per model family.

A model without a refine head (VFMNet alone) is trained on one view: the whole crop at the
network size. A model with one (VFMNet + MGRNet, the VFMSeg model) is trained on two views of
a larger crop (``two_view_losses``). MFuser is trained with tqdm's mask classification losses on
every prediction set plus the pixel-text alignment loss (``mfuser_losses``); DepthForge and Rein with
Mask2Former's Hungarian-matched mask classification losses (``maskformer_losses``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from dgss_perception.labels import IGNORE_INDEX

from .config import MaskLossConfig, TrainConfig
from .mask_losses import identity_targets, mask_classification_loss, pixel_text_alignment_loss
from .models.depthforge import DepthForge
from .models.mfuser import MFuser

# Corners of the high-resolution window lie on multiples of this many pixels (the official
# crop_coord_divisible); with a 2× crop the context box then halves to whole pixels.
CROP_ALIGN = 32


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


def random_crop_box(height: int, width: int, window: int, align: int = CROP_ALIGN,
                    generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A random window×window box (y0, y1, x0, x1) inside height×width, y0 and x0 multiples of ``align``.

    Every aligned position that fits is equally likely, the last one included. Draws from
    ``generator`` (a CPU generator), or from the global torch RNG, so a seeded run repeats.

    Raises:
        ValueError: the window does not fit, or window/align are not positive.
    """
    if window <= 0 or align <= 0:
        raise ValueError(f"window and align must be positive, got {window} and {align}")
    if window > height or window > width:
        raise ValueError(f"the {window}-pixel high-resolution window does not fit in the {height}x{width} crop")
    y0 = int(torch.randint(0, (height - window) // align + 1, (1,), generator=generator)) * align
    x0 = int(torch.randint(0, (width - window) // align + 1, (1,), generator=generator)) * align
    return y0, y0 + window, x0, x0 + window


def _scaled_span(start: int, end: int, scale: float, limit: int) -> tuple[int, int]:
    """[start, end) in one image's pixels → the nearest whole-pixel span (≥ 1 pixel) in another scaled by scale."""
    a = min(max(math.floor(start * scale + 0.5), 0), limit - 1)
    b = min(max(math.floor(end * scale + 0.5), a + 1), limit)
    return a, b


def two_view_losses(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """VFMSeg's content and detail losses (L_c, L_d) of one batch.

    - Low view: the whole crop resized (bilinear) to ``model.img_size`` → ``model.coarse`` →
      logits upsampled to that size; L_c against the labels resized to it with nearest
      neighbour (the official ``resize(label, scale_factor=0.5, mode="nearest")``: at exactly
      2× both pick every second pixel, source index ⌊i·S/s⌋).
    - High view: one random window×window box per batch at full resolution, corners on
      multiples of :data:`CROP_ALIGN` → ``model.refine`` with the context = the upsampled
      low-view logits, **detached**, cropped to the same box in low-view pixels (box//2 at 2×;
      rounded to whole pixels at other scales); L_d of the refined logits upsampled to the
      window against the labels' crop.

    Args:
        model: a VFMNet with a refine head, built at ``cfg.model.img_size``.
        images: normalised crops (N,3,H,W), H and W ≥ window (2 × img_size by default).
        labels: train ids (N,H,W) int64, 255 ignored.
        cfg: the training config (``model.refine`` and ``optim.loss_norm`` are read).
        generator: CPU generator for the window position; None: the global torch RNG.

    Returns:
        L_c and L_d, scalar tensors, each ``segmentation_loss`` with ``optim.loss_norm``.

    Raises:
        ValueError: no refine config, bad shapes, a window that is not the network size or does
            not fit in the crop.
    """
    refine = cfg.model.refine
    if refine is None:
        raise ValueError("two-view training needs model.refine in the config")
    if getattr(model, "refine_head", None) is None:
        raise ValueError("two-view training needs a model with a refine head (build it with model.refine set)")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N,3,H,W), got {tuple(images.shape)}")
    n, _, height, width = images.shape
    if tuple(labels.shape) != (n, height, width):
        raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
    low = (int(cfg.model.img_size[0]), int(cfg.model.img_size[1]))
    window = int(refine.window)
    # Both views run through the one backbone, built (positional embedding included) for img_size.
    if low != (window, window):
        raise ValueError(f"two-view training runs the {window}-pixel window through the backbone built for "
                         f"model.img_size {list(low)}; they must agree (img_size [{window}, {window}])")
    norm = cfg.optim.loss_norm

    low_images = images if (height, width) == low else F.interpolate(
        images, size=low, mode="bilinear", align_corners=False)
    coarse = F.interpolate(model.coarse(low_images).float(), size=low, mode="bilinear", align_corners=False)
    low_labels = labels if (height, width) == low else F.interpolate(
        labels[:, None].float(), size=low, mode="nearest")[:, 0].long()
    loss_coarse = segmentation_loss(coarse, low_labels, norm)

    y0, y1, x0, x1 = random_crop_box(height, width, window, generator=generator)
    ly0, ly1 = _scaled_span(y0, y1, low[0] / height, low[0])
    lx0, lx1 = _scaled_span(x0, x1, low[1] / width, low[1])
    # Detached: L_d trains MGRNet and the shared backbone, never VFMNet's head through its prior.
    context = coarse.detach()[:, :, ly0:ly1, lx0:lx1]
    fine = model.refine(images[:, :, y0:y1, x0:x1], context)
    loss_refine = segmentation_loss(fine.float(), labels[:, y0:y1, x0:x1], norm)
    return loss_coarse, loss_refine


def compute_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch: images (N,3,H,W) normalised, labels (N,H,W) int64 → (loss, logged parts).

    Without a refine head the whole crop runs through the model at its size (VFMNet's single
    view); with one, L_c + ``model.refine.loss_weight`` × L_d of :func:`two_view_losses`.
    """
    if isinstance(model, MFuser):
        return mfuser_losses(model, images, labels, cfg)
    if isinstance(model, DepthForge):
        return maskformer_losses(model, images, labels, cfg)
    if getattr(model, "refine_head", None) is not None:
        loss_coarse, loss_refine = two_view_losses(model, images, labels, cfg)
        loss = loss_coarse + cfg.model.refine.loss_weight * loss_refine
        return loss, {"loss_coarse": float(loss_coarse.detach()), "loss_refine": float(loss_refine.detach())}
    if cfg.model.refine is not None:
        raise ValueError("the config sets model.refine but the model has no refine head")
    logits = model(images)
    loss = segmentation_loss(logits.float(), labels, cfg.optim.loss_norm)
    return loss, {"loss_coarse": float(loss.detach())}


def loss_settings(cfg: MaskLossConfig) -> dict[str, float]:
    """``mask_classification_loss``'s keyword arguments from a family's loss settings."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(MaskLossConfig)}


def mean_mask_count(labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """The ground-truth masks (present classes) of this batch averaged over the ranks; None on one process.

    Every rank then divides its mask terms by the same count (the official reduce_mean); on one process
    the loss counts the batch's masks itself.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    count = identity_targets(labels, num_classes).present.sum().float().to(labels.device)
    torch.distributed.all_reduce(count)
    return count / torch.distributed.get_world_size()


def mfuser_losses(model: MFuser, images: torch.Tensor, labels: torch.Tensor,
                  cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """MFuser's objective: Σ over the prediction sets of 2·CE + 5·BCE + 5·Dice, plus L_reg^VL.

    The mask terms are divided by the number of present classes, averaged over the ranks of a
    distributed run (every rank then divides by the same count, as the official reduce_mean).
    """
    m = cfg.model.mfuser
    out = model.forward_train(images)
    num_masks = mean_mask_count(labels.to(images.device), cfg.model.num_classes)
    mask_losses = mask_classification_loss(
        [c.float() for c in out.class_logits], [k.float() for k in out.mask_logits], labels,
        num_classes=cfg.model.num_classes, num_masks=num_masks, **loss_settings(m))
    align = pixel_text_alignment_loss(out.score_map, labels, tau=m.tau, weight=m.align_weight)
    loss = mask_losses["loss"] + align
    parts = {k: float(mask_losses[k].detach()) for k in ("loss_cls", "loss_mask", "loss_dice")}
    parts["loss_align"] = float(align.detach())
    return loss, parts


def maskformer_losses(model: DepthForge, images: torch.Tensor, labels: torch.Tensor,
                      cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """DepthForge's and Rein's objective: Σ over the prediction sets of 2·CE + 5·BCE + 5·Dice, Hungarian-matched.

    Every set is matched to the image's present classes by its own Hungarian assignment (costs 2/5/5 on
    uniformly sampled points); the losses use PointRend's uncertain points, as Mask2Former.
    """
    d = cfg.model.depthforge
    out = model.forward_train(images)
    losses = mask_classification_loss(
        [c.float() for c in out.class_logits], [k.float() for k in out.mask_logits], labels,
        num_classes=cfg.model.num_classes, num_masks=mean_mask_count(labels.to(images.device), cfg.model.num_classes),
        matching="hungarian", class_cost=d.class_cost, mask_cost=d.mask_cost, dice_cost=d.dice_cost,
        **loss_settings(d))
    return losses["loss"], {k: float(losses[k].detach()) for k in ("loss_cls", "loss_mask", "loss_dice")}
