"""Losses of the Mask2Former-style mask decoders, and the pixel-text alignment loss.

Targets (semantic segmentation): in each image a class present in the label map (255 excluded) is one
ground-truth instance with mask label == k. Predictions are assigned to them in one of two ways:

* identity (tqdm / MFuser text-query decoder, Q = C queries): query k predicts class k, no matching.
  A present class's query has class target k and mask target label == k; an absent class's query has
  the "no object" target (index num_classes) and no mask loss.
* Hungarian (Mask2Former, e.g. Rein / DepthForge, any Q ≥ 1, 100 at full size): every prediction set
  is matched to the ground truth of each image separately by ``linear_sum_assignment`` on
  2·C_cls + 5·C_bce + 5·C_dice, evaluated at num_points points drawn uniformly once per image (the
  same points for every query and ground truth). A matched query takes its ground truth's class and
  mask; the others are "no object". With Q < G some ground truths stay unmatched (no mask loss).

Given the assignment, per prediction set, as the official heads configure it (mmseg/mmdet losses):

* class: 2 · cross-entropy over all N·Q queries with class weights [1]·C + [0.1], averaged by the
  summed weights of the targets (Σ w_y·CE / Σ w_y, which is PyTorch's weighted mean);
* mask: 5 · BCE-with-logits and 5 · Dice on point samples of the matched queries' masks: per mask,
  num_points points, most of them where the prediction is least certain (PointRend sampling); BCE
  summed over masks and points / (num_masks · num_points), Dice 1 − (2Σpt + 1)/(Σp + Σt + 1) on
  sigmoid probabilities summed over masks / num_masks, where num_masks is the number of ground-truth
  masks (present classes) in the batch (averaged over ranks in distributed training), at least 1.

The ground-truth masks stay at label resolution and the predictions at mask-feature resolution: both
are sampled at the same normalised points. Pixels labelled 255 belong to no class, so they are
negatives of every present-class mask (as in the official head and Mask2Former); they only leave the
class targets and the alignment loss untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from dgss_perception.labels import IGNORE_INDEX


class IdentityTargets(NamedTuple):
    """Targets of the identity assignment for a batch.

    Attributes:
        classes: (N, C) int64, k where class k is present in image n, else C ("no object").
        present: (N, C) bool, class k present in image n.
        masks: (M, H, W) float, label == k for each present (n, k) in row-major order (the order of
            ``mask_logits[present]``), M = present.sum().
    """

    classes: torch.Tensor
    present: torch.Tensor
    masks: torch.Tensor


def identity_targets(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> IdentityTargets:
    """Class and mask targets of query k ↔ class k.

    Args:
        labels: (N, H, W) integer train ids in [0, num_classes) or ``ignore_index``.
        num_classes: number of classes C (= queries).
        ignore_index: the label of unlabelled pixels.

    Returns:
        The targets (see :class:`IdentityTargets`).

    Raises:
        ValueError: labels of the wrong rank, or a value that is neither a class nor ignore_index (a
            label set that does not match the model fails here rather than training on garbage).
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (N, H, W), got {tuple(labels.shape)}")
    labels = labels.long()
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        values = torch.unique(labels[bad]).tolist()[:10]
        raise ValueError(f"labels hold values outside [0, {num_classes}) and {ignore_index}: {values}")
    n = labels.shape[0]
    # Ignored pixels go to an extra bin that is dropped, so presence is one scatter per image.
    index = torch.where(ignored, torch.full_like(labels, num_classes), labels).flatten(1)
    present = torch.zeros(n, num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, index, True)
    present = present[:, :num_classes]
    arange = torch.arange(num_classes, device=labels.device).expand(n, num_classes)
    classes = torch.where(present, arange, torch.full_like(arange, num_classes))
    image_idx, class_idx = present.nonzero(as_tuple=True)
    masks = (labels[image_idx] == class_idx[:, None, None]).float()
    return IdentityTargets(classes, present, masks)


class Assignment(NamedTuple):
    """Which predictions are matched to which ground truths, for one prediction set of a batch.

    Attributes:
        classes: (N, Q) int64 class target per query, C ("no object") for an unmatched query.
        image_index: (M,) int64 image of each matched query.
        query_index: (M,) int64 query of each matched query; pairs sorted by (image, query).
        target_index: (M,) int64 row of ``IdentityTargets.masks`` each matched query is matched to.
    """

    classes: torch.Tensor
    image_index: torch.Tensor
    query_index: torch.Tensor
    target_index: torch.Tensor


def identity_assignment(targets: IdentityTargets, num_classes: int) -> Assignment:
    """Query k ↔ class k: the present classes' queries are matched, in the order of ``targets.masks``.

    Args:
        targets: the batch's targets (Q = C queries).
        num_classes: C.

    Returns:
        The assignment (see :class:`Assignment`).
    """
    if targets.present.shape[1] != num_classes:
        raise ValueError(f"targets hold {targets.present.shape[1]} classes, expected {num_classes}")
    image_index, query_index = targets.present.nonzero(as_tuple=True)
    target_index = torch.arange(image_index.shape[0], device=image_index.device)
    return Assignment(targets.classes, image_index, query_index, target_index)


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of x at normalised points (align_corners False, zero outside).

    Args:
        x: (M, C, H, W).
        coords: (M, P, 2) points (x, y) in [0, 1]², 0 and 1 being the outer edges of the map.

    Returns:
        (M, C, P).
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(x.dtype)  # (M, P, 1, 2) in grid_sample's [-1, 1]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def _rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) on ``device``, drawn from ``generator`` (on its own device) when one is given."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


@torch.no_grad()
def uncertain_point_coords(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float = 3.0,
                           importance_sample_ratio: float = 0.75,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """PointRend's training points: the most uncertain of an oversampled random set, plus uniform ones.

    ⌊num_points·oversample_ratio⌋ candidates are drawn uniformly; the ⌊importance_sample_ratio·num_points⌋
    with the largest uncertainty −|logit| (logit sampled bilinearly at the candidate, not taken from the
    nearest cell) are kept, and the rest of the num_points are drawn uniformly afresh. The candidates are
    drawn first, then the fill, both from ``generator``.

    Args:
        mask_logits: (M, 1, h, w) or (M, h, w) mask logits.
        num_points: points per mask.
        oversample_ratio: candidates per point, ≥ 1.
        importance_sample_ratio: share of the points chosen by uncertainty, in [0, 1].
        generator: random source; None uses the global RNG of the logits' device.

    Returns:
        (M, num_points, 2) points (x, y) in [0, 1]².
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be at least 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    if mask_logits.dim() == 3:
        mask_logits = mask_logits.unsqueeze(1)
    m, device = mask_logits.shape[0], mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = _rand((m, num_sampled, 2), device, generator)
    uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()  # (M, num_sampled)
    idx = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, idx[..., None].expand(-1, -1, 2))
    fill = _rand((m, num_points - num_uncertain, 2), device, generator)
    return torch.cat([chosen, fill], dim=1)


def dice_loss(point_logits: torch.Tensor, point_targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask Dice loss on sigmoid probabilities, first powers in the denominator ("naive" Dice).

    Args:
        point_logits: (M, P) logits.
        point_targets: (M, P) targets in [0, 1].
        eps: added to numerator and denominator (the official 1.0).

    Returns:
        (M,) 1 − (2Σ p·t + eps) / (Σ p + Σ t + eps).
    """
    p = point_logits.sigmoid().flatten(1)
    t = point_targets.flatten(1)
    return 1.0 - (2.0 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def match_cost(class_logits_q: torch.Tensor, point_logits: torch.Tensor, gt_classes: torch.Tensor,
               point_targets: torch.Tensor, class_cost: float = 2.0, mask_cost: float = 5.0,
               dice_cost: float = 5.0) -> torch.Tensor:
    """Matching cost of every query against every ground truth of one image, in float32.

    class_cost·(−softmax probability of the gt class) + mask_cost·(mean point BCE-with-logits)
    + dice_cost·(1 − (2Σpt + 1)/(Σp + Σt + 1)), p the sigmoid of the point logits.

    Args:
        class_logits_q: (Q, C+1) class logits.
        point_logits: (Q, P) mask logits at the points.
        gt_classes: (G,) int64 ground-truth classes.
        point_targets: (G, P) ground-truth masks at the same points, in [0, 1].
        class_cost: weight of the class term.
        mask_cost: weight of the BCE term.
        dice_cost: weight of the Dice term.

    Returns:
        (Q, G) cost.
    """
    x = point_logits.float()
    t = point_targets.float()
    num_points = x.shape[1]
    cost_cls = -class_logits_q.float().softmax(-1)[:, gt_classes]
    # Σ_p BCE(x, t) splits into a positive and a negative part, each one matrix product over the points.
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    cost_bce = (pos @ t.T + neg @ (1.0 - t).T) / num_points
    p = x.sigmoid()
    cost_dice = 1.0 - (2.0 * (p @ t.T) + 1.0) / (p.sum(1)[:, None] + t.sum(1)[None, :] + 1.0)
    return class_cost * cost_cls + mask_cost * cost_bce + dice_cost * cost_dice


# Stands in for a non-finite cost so the solver still runs; the loss of such logits is non-finite itself,
# so the step is still seen as bad (e.g. skipped by a gradient scaler) rather than crashing here.
_INVALID_COST = 1e8


@torch.no_grad()
def hungarian_assignment(class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: IdentityTargets,
                         num_points: int = 12544, class_cost: float = 2.0, mask_cost: float = 5.0,
                         dice_cost: float = 5.0, generator: torch.Generator | None = None) -> Assignment:
    """Minimum-cost one-to-one matching of queries to ground truths, per image (Mask2Former).

    For each image in turn num_points points are drawn uniformly in [0, 1]² (one (1, P, 2) draw, also
    for an image without ground truth), the predicted and ground-truth masks are sampled there, and
    ``linear_sum_assignment`` minimises :func:`match_cost`. min(Q, G) pairs are matched per image;
    with Q < G the remaining ground truths stay unmatched. An image without ground truth has none.

    Args:
        class_logits: (N, Q, C+1) class logits.
        mask_logits: (N, Q, h, w) mask logits.
        targets: the batch's targets (C classes, ``targets.masks`` (M, H, W)).
        num_points: points per image.
        class_cost: weight of the class cost.
        mask_cost: weight of the BCE cost.
        dice_cost: weight of the Dice cost.
        generator: random source for the points; None uses the global RNG of the logits' device.

    Returns:
        The assignment (see :class:`Assignment`), on the logits' device.

    Raises:
        ValueError: shapes that do not fit each other or the targets, or num_points < 1.
    """
    n, num_classes = targets.present.shape
    if class_logits.dim() != 3 or mask_logits.dim() != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(f"expected class logits (N, Q, C+1) and mask logits (N, Q, h, w), got "
                         f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}")
    if class_logits.shape[0] != n or class_logits.shape[2] != num_classes + 1 or class_logits.shape[1] < 1:
        raise ValueError(f"expected class logits (N={n}, Q ≥ 1, {num_classes + 1}), got {tuple(class_logits.shape)}")
    if num_points < 1:
        raise ValueError(f"num_points must be at least 1, got {num_points}")
    q, device = class_logits.shape[1], class_logits.device
    present = targets.present.to(device)
    gt_classes = present.nonzero(as_tuple=True)[1]  # class of each row of targets.masks
    gt_masks = targets.masks.to(device)
    counts = present.sum(1).tolist()
    starts = [sum(counts[:i]) for i in range(n)]
    costs = []
    for i in range(n):
        coords = _rand((1, num_points, 2), device, generator)
        g = counts[i]
        if g == 0:
            continue
        rows = slice(starts[i], starts[i] + g)
        # Queries (and ground truths) as the channels of one map: one grid_sample at shared points.
        point_logits = point_sample(mask_logits[i:i + 1].float(), coords)[0]  # (Q, P)
        point_targets = point_sample(gt_masks[None, rows].float(), coords)[0]  # (G, P)
        cost = match_cost(class_logits[i], point_logits, gt_classes[rows], point_targets, class_cost, mask_cost,
                          dice_cost)
        costs.append(cost.flatten())
    classes = torch.full((n, q), num_classes, dtype=torch.long, device=device)
    if not costs:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Assignment(classes, empty, empty.clone(), empty.clone())
    # One device-to-host copy for the whole batch rather than one per image.
    flat = torch.nan_to_num(torch.cat(costs), nan=_INVALID_COST, posinf=_INVALID_COST,
                            neginf=-_INVALID_COST).cpu().numpy()
    image_index, query_index, target_index = [], [], []
    offset = 0
    for i in range(n):
        g = counts[i]
        if g == 0:
            continue
        rows, cols = linear_sum_assignment(flat[offset:offset + q * g].reshape(q, g))
        offset += q * g
        # Rows come back sorted, so the pairs are ordered by (image, query) as the reference's positives.
        image_index += [i] * len(rows)
        query_index += rows.tolist()
        target_index += (starts[i] + cols).tolist()
    image_index_t = torch.tensor(image_index, dtype=torch.long, device=device)
    query_index_t = torch.tensor(query_index, dtype=torch.long, device=device)
    target_index_t = torch.tensor(target_index, dtype=torch.long, device=device)
    classes[image_index_t, query_index_t] = gt_classes[target_index_t]
    return Assignment(classes, image_index_t, query_index_t, target_index_t)


def _set_losses(class_logits: torch.Tensor, mask_logits: torch.Tensor, assignment: Assignment,
                gt_masks: torch.Tensor, class_weights: torch.Tensor, num_masks: torch.Tensor, num_points: int,
                oversample_ratio: float, importance_sample_ratio: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unweighted (class CE, point BCE, Dice) of one prediction set under an assignment.

    ``gt_masks`` (M', H, W) are the rows ``assignment.target_index`` points into.
    """
    n, q, _ = class_logits.shape
    loss_cls = F.cross_entropy(class_logits.float().reshape(n * q, -1), assignment.classes.reshape(-1),
                               weight=class_weights)
    pred = mask_logits.float()[assignment.image_index, assignment.query_index]  # (M, h, w)
    if pred.shape[0] == 0:
        # No class in the batch: nothing to segment, but keep the graph connected (DDP expects every
        # output to take part in backward).
        zero = mask_logits.sum() * 0.0
        return loss_cls, zero, zero
    with torch.no_grad():
        coords = uncertain_point_coords(pred.unsqueeze(1), num_points, oversample_ratio, importance_sample_ratio,
                                        generator)
        point_targets = point_sample(gt_masks[assignment.target_index].unsqueeze(1), coords)[:, 0]
    point_logits = point_sample(pred.unsqueeze(1), coords)[:, 0]
    loss_mask = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="sum")
    loss_mask = loss_mask / (num_masks * num_points)
    loss_dice = dice_loss(point_logits, point_targets).sum() / num_masks
    return loss_cls, loss_mask, loss_dice


def mask_classification_loss(
    class_logits: list[torch.Tensor],
    mask_logits: list[torch.Tensor],
    labels: torch.Tensor,
    num_classes: int = 19,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    no_object_weight: float = 0.1,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
    num_masks: float | torch.Tensor | None = None,
    matching: str = "identity",
    class_cost: float = 2.0,
    mask_cost: float = 5.0,
    dice_cost: float = 5.0,
) -> dict[str, torch.Tensor]:
    """Class, mask and Dice losses of every prediction set of a mask-classification decoder.

    Each set draws its own sample points; under Hungarian matching the set's matching points are drawn
    (per image, see :func:`hungarian_assignment`) before its loss points. The returned terms are
    already multiplied by their weights.

    Args:
        class_logits: per set (N, Q, C+1) class logits, initial queries first; Q = C under identity
            matching, any Q ≥ 1 under Hungarian matching.
        mask_logits: per set (N, Q, h, w) mask logits.
        labels: (N, H, W) train ids, 255 ignored.
        num_classes: C.
        class_weight: weight of the class cross-entropy.
        mask_weight: weight of the point BCE.
        dice_weight: weight of the point Dice.
        no_object_weight: class weight of the "no object" target in the cross-entropy.
        num_points: sample points per mask (and per image for the matching).
        oversample_ratio: candidate points per sample point (uncertainty sampling).
        importance_sample_ratio: share of the points chosen by uncertainty.
        generator: random source for the points; None uses the global RNG.
        num_masks: the mask count the mask terms are divided by; None counts this batch's ground-truth
            masks (present classes; under Hungarian matching this is mmdet's num_total_pos when Q ≥ G,
            and still counts the ground truths left unmatched when Q < G). In distributed training
            pass the mean over ranks of the local counts (the official reduce_mean), so every rank
            divides by the same number. Clamped to at least 1.
        matching: "identity" (query k ↔ class k) or "hungarian" (each set matched per image).
        class_cost: weight of the class term of the matching cost (Hungarian only).
        mask_cost: weight of the BCE term of the matching cost (Hungarian only).
        dice_cost: weight of the Dice term of the matching cost (Hungarian only).

    Returns:
        ``loss_cls``, ``loss_mask``, ``loss_dice`` of the last set, ``d{i}.loss_cls``,
        ``d{i}.loss_mask``, ``d{i}.loss_dice`` of set i of the others (d0 = initial queries), and
        ``loss``, the sum of all of them.

    Raises:
        ValueError: mismatched set lists or shapes, bad label values, or an unknown matching.
    """
    if matching not in ("identity", "hungarian"):
        raise ValueError(f"matching must be 'identity' or 'hungarian', got {matching!r}")
    if len(class_logits) != len(mask_logits) or not class_logits:
        raise ValueError(f"need as many class as mask sets (≥ 1), got {len(class_logits)} and {len(mask_logits)}")
    n = labels.shape[0]
    for cls, masks in zip(class_logits, mask_logits):
        if matching == "identity":
            if tuple(cls.shape) != (n, num_classes, num_classes + 1) or tuple(masks.shape[:2]) != (n, num_classes):
                raise ValueError(f"expected class logits (N={n}, {num_classes}, {num_classes + 1}) and mask logits "
                                 f"(N, {num_classes}, h, w), got {tuple(cls.shape)} and {tuple(masks.shape)}")
        elif (cls.dim() != 3 or masks.dim() != 4 or cls.shape[0] != n or cls.shape[1] < 1
              or cls.shape[2] != num_classes + 1 or masks.shape[:2] != cls.shape[:2]):
            raise ValueError(f"expected class logits (N={n}, Q ≥ 1, {num_classes + 1}) and mask logits "
                             f"(N, Q, h, w), got {tuple(cls.shape)} and {tuple(masks.shape)}")
    device = class_logits[-1].device
    targets = identity_targets(labels.to(device), num_classes)
    weights = torch.ones(num_classes + 1, device=device)
    weights[-1] = no_object_weight
    count = targets.present.sum().float() if num_masks is None else torch.as_tensor(num_masks, device=device)
    count = count.float().clamp_min(1.0)
    fixed = identity_assignment(targets, num_classes) if matching == "identity" else None

    losses: dict[str, torch.Tensor] = {}
    last = len(class_logits) - 1
    for i, (cls, masks) in enumerate(zip(class_logits, mask_logits)):
        assignment = fixed
        if assignment is None:
            assignment = hungarian_assignment(cls, masks, targets, num_points, class_cost, mask_cost, dice_cost,
                                              generator)
        loss_cls, loss_mask, loss_dice = _set_losses(cls, masks, assignment, targets.masks, weights, count,
                                                     num_points, oversample_ratio, importance_sample_ratio,
                                                     generator)
        prefix = "" if i == last else f"d{i}."
        losses[f"{prefix}loss_cls"] = class_weight * loss_cls
        losses[f"{prefix}loss_mask"] = mask_weight * loss_mask
        losses[f"{prefix}loss_dice"] = dice_weight * loss_dice
    losses["loss"] = torch.stack(list(losses.values())).sum()
    return losses


def pixel_text_alignment_loss(score_map: torch.Tensor, labels: torch.Tensor, tau: float = 0.07,
                              weight: float = 1.0) -> torch.Tensor:
    """Pixel-text alignment (L_reg^VL): cross-entropy of the cosine score map at temperature tau.

    As the official identity head: score_map / tau upsampled bilinearly (align_corners False) to the
    labels, cross-entropy with 255 ignored, divided by every pixel, ignored ones included (mmseg's
    mean without avg_non_ignore).

    Args:
        score_map: (N, C, h, w) cosine similarities of pixel and class-text embeddings.
        labels: (N, H, W) train ids, 255 ignored.
        tau: temperature.
        weight: loss weight.

    Returns:
        Scalar loss.
    """
    logits = F.interpolate(score_map.float() / tau, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    return weight * ce / labels.numel()
