"""Training augmentation on numpy arrays (image uint8 H×W×3 RGB, labels uint8 H×W trainIds).

The training pipeline follows mmseg's, as VFMNet/VFMSeg train with it: random resize,
random crop (optionally re-drawn while one class dominates, ``cat_max_ratio``), horizontal
flip, ``PhotoMetricDistortion``, then padding to the crop size (image 0, labels 255). Every
random choice comes from the numpy Generator passed in, so a seed reproduces a sample.
Labels are only ever resized with nearest-neighbour interpolation: no new ids appear.
"""

from __future__ import annotations

import cv2
import numpy as np

from dgss_perception.labels import IGNORE_INDEX

# mmseg PhotoMetricDistortion defaults.
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18
# mmseg RandomCrop re-draws a dominated crop at most this many times, then keeps the last one.
CAT_MAX_TRIES = 10


def random_resize(image: np.ndarray, labels: np.ndarray, size: tuple[int, int], scale_range: tuple[float, float],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resize by a random factor of the scale at which the image just covers ``size`` (H, W).

    Args:
        image: uint8 H×W×3.
        labels: uint8 H×W.
        size: crop (H, W) the scale refers to.
        scale_range: (low, high) of the uniform factor; below 1 the image ends up smaller than the crop.
        rng: randomness source.

    Returns:
        The resized image (bilinear) and labels (nearest).
    """
    h, w = size
    base = max(h / image.shape[0], w / image.shape[1])
    scale = base * rng.uniform(*scale_range)
    nh, nw = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    labels = cv2.resize(labels, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return image, labels


def _crop_box(shape: tuple[int, ...], size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    # Offsets as mmseg draws them: uniform over the margin, 0 where the image is smaller than the crop.
    y = int(rng.integers(0, max(shape[0] - size[0], 0) + 1))
    x = int(rng.integers(0, max(shape[1] - size[1], 0) + 1))
    return y, min(y + size[0], shape[0]), x, min(x + size[1], shape[1])


def _dominated(labels: np.ndarray, cat_max_ratio: float) -> bool:
    counts = np.bincount(labels.ravel(), minlength=256)
    counts[IGNORE_INDEX] = 0
    counts = counts[counts > 0]
    # mmseg accepts a crop only with at least two labelled classes, none above the ratio.
    return not (len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio)


def random_crop(image: np.ndarray, labels: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
                cat_max_ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Crop at most ``size`` (H, W) at a random place; no padding (see ``pad_to``).

    Args:
        image: uint8 H×W×3.
        labels: uint8 H×W.
        size: crop (H, W); a smaller image is kept whole along that side.
        rng: randomness source.
        cat_max_ratio: below 1, re-draw the crop (up to 10 times, then keep the last) while one class
            covers at least this share of the crop's labelled pixels or fewer than two classes are present,
            as mmseg's ``RandomCrop``. 1.0 (default) turns it off.

    Returns:
        The cropped image and labels (views of the inputs).
    """
    y0, y1, x0, x1 = _crop_box(labels.shape, size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(CAT_MAX_TRIES):
            if not _dominated(labels[y0:y1, x0:x1], cat_max_ratio):
                break
            y0, y1, x0, x1 = _crop_box(labels.shape, size, rng)
    return image[y0:y1, x0:x1], labels[y0:y1, x0:x1]


def pad_to(image: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right up to ``size`` (H, W): image with 0, labels with the ignore index 255."""
    ph, pw = max(0, size[0] - image.shape[0]), max(0, size[1] - image.shape[1])
    if ph or pw:
        image = cv2.copyMakeBorder(np.ascontiguousarray(image), 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
        labels = cv2.copyMakeBorder(np.ascontiguousarray(labels), 0, ph, 0, pw, cv2.BORDER_CONSTANT,
                                    value=IGNORE_INDEX)
    return image, labels


def random_scale_crop(image: np.ndarray, labels: np.ndarray, size: tuple[int, int],
                      scale_range: tuple[float, float], rng: np.random.Generator,
                      cat_max_ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Random resize, random crop of ``size`` (H, W), padding with 0 / ignore where the image falls short."""
    image, labels = random_resize(image, labels, size, scale_range, rng)
    image, labels = random_crop(image, labels, size, rng, cat_max_ratio)
    return pad_to(image, labels, size)


def _scale(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # As mmseg's ``convert``: float maths, clip, then truncate back to uint8 after every step.
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on an RGB uint8 image.

    Brightness ±32, then contrast ×[0.5, 1.5] either first or last (a fair coin), saturation ×[0.5, 1.5]
    and hue ±18 (OpenCV's 0–179 scale); each step happens with probability 0.5. Contrast scales pixel
    values (no mean subtraction), as in mmseg. HSV of RGB equals HSV of BGR, so running on RGB is the same.

    Args:
        image: uint8 H×W×3 RGB.
        rng: randomness source.

    Returns:
        A new uint8 H×W×3 image.
    """
    img = np.ascontiguousarray(image)
    if rng.integers(2):
        img = _scale(img, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        img = _scale(img, alpha=rng.uniform(*CONTRAST_RANGE))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _scale(hsv[..., 1], alpha=rng.uniform(*SATURATION_RANGE))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        # numpy's high bound is exclusive, as in mmseg: shifts in [-18, 17].
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(-HUE_DELTA, HUE_DELTA))) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        img = _scale(img, alpha=rng.uniform(*CONTRAST_RANGE))
    if img is image:
        img = img.copy()
    return img


def train_transform(image: np.ndarray, labels: np.ndarray, size: tuple[int, int], scale_range: tuple[float, float],
                    flip: bool, photometric_aug: bool, rng: np.random.Generator,
                    cat_max_ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The training augmentation: resize, crop, flip, photometric distortion, pad; output exactly ``size``.

    Args:
        image: uint8 H×W×3 RGB.
        labels: uint8 H×W trainIds (255 ignore).
        size: output (H, W).
        scale_range: random resize factor range (see ``random_resize``).
        flip: horizontal flip with probability 0.5.
        photometric_aug: apply ``photometric``.
        rng: randomness source.
        cat_max_ratio: mmseg's ``RandomCrop`` option; 1.0 is off.

    Returns:
        Contiguous uint8 image (H, W, 3) and labels (H, W).
    """
    image, labels = random_resize(image, labels, size, scale_range, rng)
    image, labels = random_crop(image, labels, size, rng, cat_max_ratio)
    if flip and rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if photometric_aug:
        image = photometric(image, rng)
    # Padding comes last, as in mmseg, so the distortion never touches the padded border.
    image, labels = pad_to(image, labels, size)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def eval_transform(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Stretch to the network size, as the runtime does."""
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
