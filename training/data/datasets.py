"""Segmentation datasets read from their real on-disk layouts.

Every sample is (rgb uint8 H×W×3, labels uint8 H×W of Cityscapes trainIds,
255 = ignore). Labels are validated on load: an id outside the expected set
is an error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dgss_perception.labels import IGNORE_INDEX

VALID_TRAIN_IDS = frozenset(range(19)) | {IGNORE_INDEX}
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path
    domain: str  # e.g. "cityscapes" or "acdc/night"


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_train_ids(path: Path) -> np.ndarray:
    """A trainId label PNG → uint8 H×W; ids outside 0–18 and 255 are an error naming the file."""
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise ValueError(f"cannot read label {path}")
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"label {path} must be a single-channel 8-bit PNG, got {labels.dtype} {labels.shape}")
    bad = sorted(set(np.unique(labels).tolist()) - VALID_TRAIN_IDS)
    if bad:
        raise ValueError(f"label {path} holds ids {bad[:10]} outside the 19 trainIds and 255")
    return labels


def cityscapes_samples(root: str | Path, split: str) -> list[Sample]:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/<split>/<city>/*_gtFine_labelTrainIds.png."""
    root = Path(root)
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(f"no Cityscapes images under {root / 'leftImg8bit' / split}")
    samples = []
    for img in images:
        stem = img.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if not label.is_file():
            raise FileNotFoundError(f"label missing for {img}: expected {label}")
        samples.append(Sample(img, label, "cityscapes"))
    return samples


def acdc_samples(root: str | Path, split: str,
                 conditions: list[str] | tuple[str, ...] = ACDC_CONDITIONS) -> list[Sample]:
    """rgb_anon/<cond>/<split>/<seq>/*_rgb_anon.png with gt/<cond>/<split>/<seq>/*_gt_labelTrainIds.png."""
    root = Path(root)
    samples = []
    for cond in conditions:
        if cond not in ACDC_CONDITIONS:
            raise ValueError(f"unknown ACDC condition {cond!r} (known: {', '.join(ACDC_CONDITIONS)})")
        for img in sorted((root / "rgb_anon" / cond / split).glob("*/*_rgb_anon.png")):
            stem = img.name[: -len("_rgb_anon.png")]
            label = root / "gt" / cond / split / img.parent.name / f"{stem}_gt_labelTrainIds.png"
            if not label.is_file():
                raise FileNotFoundError(f"label missing for {img}: expected {label}")
            samples.append(Sample(img, label, f"acdc/{cond}"))
    if not samples:
        raise FileNotFoundError(f"no ACDC images for {list(conditions)} under {root / 'rgb_anon'}")
    return samples


def find_samples(layout: str, root: str | Path, split: str, conditions: list[str] | None = None) -> list[Sample]:
    if layout == "cityscapes":
        return cityscapes_samples(root, split)
    if layout == "acdc":
        return acdc_samples(root, split, conditions or ACDC_CONDITIONS)
    raise ValueError(f"unknown dataset layout {layout!r} (known: cityscapes, acdc)")
