"""Evaluation reports: the metrics of a confusion matrix as JSON-ready data, and charts as PNG.

Scores are fractions in [0, 1]. A class absent from both the ground truth and the
prediction has no IoU (``None`` in JSON) and is left out of the mean, as
:func:`dgss_perception.metrics.mean_iou` does. Charts use matplotlib's Agg
renderer through :class:`matplotlib.figure.Figure` (no pyplot, no display, no
global backend switch), imported only when a chart is drawn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dgss_perception.labels import CITYSCAPES_CLASSES
from dgss_perception.metrics import iou_per_class, mean_iou, pixel_accuracy

MISSING_MATPLOTLIB = "charts need matplotlib (pip install matplotlib, or the training extra); or pass --no-charts"


class ChartError(RuntimeError):
    """A chart cannot be drawn (matplotlib missing)."""


def class_names(num_classes: int) -> list[str]:
    """Cityscapes names for the 19-class set, ``class_<i>`` otherwise."""
    if num_classes == len(CITYSCAPES_CLASSES):
        return list(CITYSCAPES_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]


def json_float(value: float) -> float | None:
    """A float for JSON: NaN and infinities (undefined scores) become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def metrics_summary(conf: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """mIoU, pixel accuracy, labelled pixels, IoU per class name and the confusion matrix (rows: ground truth)."""
    if conf.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix {conf.shape} does not fit {len(names)} classes")
    ious = iou_per_class(conf)
    return {
        "miou": json_float(mean_iou(conf)),
        "pixel_accuracy": json_float(pixel_accuracy(conf)),
        "pixels": int(conf.sum()),
        "iou": {name: json_float(v) for name, v in zip(names, ious)},
        "confusion": np.asarray(conf, dtype=np.int64).tolist(),
    }


def slug(text: str) -> str:
    """A file-name-safe form of a set or domain name ("acdc/night" → "acdc_night")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ChartError(MISSING_MATPLOTLIB) from exc
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def charts_available() -> bool:
    """Whether matplotlib can be imported (checked before a long evaluation, not after)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_confusion(conf: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix heatmap: each ground-truth row sums to 1; rows without pixels are grey."""
    conf = np.asarray(conf, dtype=np.float64)
    rows = conf.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(rows > 0, conf / np.maximum(rows, 1), np.nan)
    n = len(names)
    fig = _figure(2.0 + 0.42 * n, 1.6 + 0.4 * n)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["Blues"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the ground-truth class")
    ax.set_xticks(range(n), labels=list(names), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=list(names), fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    # Values only where they are legible and matter: small shares would clutter the grid.
    for i in range(n):
        for j in range(n):
            v = norm[i, j]
            if np.isfinite(v) and v >= 0.01:
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.6 else "black")
    ax.set_title(title or "confusion matrix (row-normalised, %)")
    path = Path(path)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_iou_bars(ious: Mapping[str, np.ndarray], names: Sequence[str], path: str | Path, title: str = "",
                  mious: Mapping[str, float | None] | None = None) -> Path:
    """Per-class IoU (%) as grouped bars, one colour per series (e.g. domain); undefined IoUs draw no bar."""
    if not ious:
        raise ValueError("no IoU series to plot")
    n, groups = len(names), len(ious)
    width = 0.8 / groups
    fig = _figure(min(24.0, max(8.0, 0.12 * n * groups + 4.0)), 4.8)
    ax = fig.add_subplot()
    x = np.arange(n)
    for k, (label, values) in enumerate(ious.items()):
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"series {label!r} has {values.shape} IoUs for {n} classes")
        miou = (mious or {}).get(label)
        legend = f"{label} (mIoU {100 * miou:.1f})" if miou is not None else label
        ax.bar(x - 0.4 + width * (k + 0.5), np.nan_to_num(values * 100, nan=0.0), width, label=legend)
    ax.set_xticks(x, labels=list(names), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.6, n - 0.4)
    ax.grid(axis="y", alpha=0.3)
    # Beside the axes: inside, it would hide the tallest bars.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "IoU per class")
    path = Path(path)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path
