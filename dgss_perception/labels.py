"""Class tables, palettes and label visualisation (numpy only)."""

from __future__ import annotations

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


def palette_lut(palette: list[list[int]] | tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """256×3 uint8 lookup table; ids without a colour (255 = ignore included) map to black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if len(colours) > 255:
        raise ValueError(f"a palette holds at most 255 colours, got {len(colours)}")
    lut[: len(colours)] = colours
    return lut


def colorize(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """labels uint8 H×W → rgb uint8 H×W×3 through a 256×3 lookup table."""
    return lut[labels]


def overlay(rgb: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """Blend the colour mask over the image: (1-alpha)·rgb + alpha·color, uint8 H×W×3."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must lie in [0, 1], got {alpha}")
    # Integer blend in 8-bit fixed point: exact enough for display, no float image.
    a = int(round(alpha * 256))
    out = (rgb.astype(np.uint16) * (256 - a) + color.astype(np.uint16) * a) >> 8
    return out.astype(np.uint8)


def confidence_to_mono8(confidence: np.ndarray) -> np.ndarray:
    """Max-softmax confidence in [0, 1] (float H×W) → uint8 0–255."""
    return np.clip(confidence * 255.0 + 0.5, 0, 255).astype(np.uint8)
