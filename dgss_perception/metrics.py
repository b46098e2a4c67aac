"""Confusion matrices and mIoU (numpy only; used by the demo, bag evaluation and training)."""

from __future__ import annotations

import numpy as np

from .labels import IGNORE_INDEX


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows ground truth, columns prediction (int64 C×C); ignore pixels and out-of-range ids skipped."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    keep = (gt != IGNORE_INDEX) & (gt < num_classes) & (pred < num_classes)
    idx = gt[keep] * num_classes + pred[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU per class from a confusion matrix; NaN for classes absent from both."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """Mean over classes present in ground truth or prediction (NaN-aware), in [0, 1]."""
    ious = iou_per_class(conf)
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")
