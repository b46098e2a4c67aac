"""Training augmentation on numpy arrays (image uint8 H×W×3, labels uint8 H×W)."""

from __future__ import annotations

import cv2
import numpy as np

from dgss_perception.labels import IGNORE_INDEX


def random_scale_crop(image: np.ndarray, labels: np.ndarray, size: tuple[int, int],
                      scale_range: tuple[float, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the crop covers a random share of the image, then crop ``size`` (H, W); pad with ignore."""
    h, w = size
    base = max(h / image.shape[0], w / image.shape[1])
    scale = base * rng.uniform(*scale_range)
    nh, nw = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    labels = cv2.resize(labels, (nw, nh), interpolation=cv2.INTER_NEAREST)
    ph, pw = max(0, h - nh), max(0, w - nw)
    if ph or pw:
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
        labels = cv2.copyMakeBorder(labels, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=IGNORE_INDEX)
    y = int(rng.integers(0, image.shape[0] - h + 1))
    x = int(rng.integers(0, image.shape[1] - w + 1))
    return image[y:y + h, x:x + w], labels[y:y + h, x:x + w]


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast, saturation and hue, each applied with probability 0.5."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img += rng.uniform(-32, 32)
    if rng.random() < 0.5:
        img = (img - img.mean()) * rng.uniform(0.5, 1.5) + img.mean()
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.5 or rng.random() < 0.5:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int16)
        if rng.random() < 0.5:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if rng.random() < 0.5:
            hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-9, 10))) % 180
        img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return img


def train_transform(image: np.ndarray, labels: np.ndarray, size: tuple[int, int], scale_range: tuple[float, float],
                    flip: bool, photometric_aug: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image, labels = random_scale_crop(image, labels, size, scale_range, rng)
    if flip and rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if photometric_aug:
        image = photometric(image, rng)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def eval_transform(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Stretch to the network size, as the runtime does."""
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
