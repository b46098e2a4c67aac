"""Rare-class sampling (RCS), DAFormer's scheme with VFMSeg's settings.

A training sample is chosen by first drawing a class c with probability
P(c) = softmax((1 − f_c) / T), f_c being c's share of all labelled pixels of the training
set, then a file uniformly among those with at least ``min_pixels`` pixels of c. Rare classes
(small f_c) are drawn far more often at a low temperature T. After augmentation the crop is
re-drawn from the same file while it holds too little of c (see ``crop_has_class``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .class_stats import NUM_CLASSES, relative_key
from .datasets import Sample


def _examples(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:n])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def class_probabilities(class_pixels: Sequence[int] | np.ndarray, temperature: float) -> np.ndarray:
    """P(c) = softmax((1 − f_c) / T) over the classes with pixels; 0 for classes without any.

    Args:
        class_pixels: pixel count per class.
        temperature: T; smaller concentrates the draws on the rarest classes.

    Returns:
        float64 probabilities, one per class, summing to 1.
    """
    if temperature <= 0:
        raise ValueError(f"rare-class temperature must be positive, got {temperature}")
    pixels = np.asarray(class_pixels, dtype=np.float64)
    present = pixels > 0
    if not present.any():
        raise ValueError("class statistics hold no labelled pixels")
    freq = pixels / pixels.sum()
    logits = (1.0 - freq[present]) / temperature
    weights = np.exp(logits - logits.max())  # shifted: exp of 100-ish logits would overflow at T = 0.01
    probs = np.zeros(len(pixels))
    probs[present] = weights / weights.sum()
    return probs


class RareClassSampler:
    """Draws (sample index, class) pairs by rare-class sampling.

    Args:
        stats: a class statistics dict (``class_stats.load_stats``).
        samples: the training samples; the statistics must cover exactly these files.
        temperature: T of the class softmax (VFMSeg: 0.01).
        min_pixels: a file is a candidate for class c with at least this many pixels of c.
        seed: seed of the generator ``draw`` uses when none is given.
        min_crop_ratio: a crop is accepted when it holds at least min_pixels × this pixels of the class;
            0 or less turns re-cropping off.
        max_recrops: re-crops at most this many times, then keeps the last crop.
        root: dataset root the statistics' paths are relative to; default the root stored in them.

    Raises:
        ValueError: the statistics do not match the samples (another dataset or split), or are malformed.
    """

    def __init__(self, stats: dict[str, Any], samples: list[Sample], temperature: float = 0.01,
                 min_pixels: int = 3000, seed: int = 0, *, min_crop_ratio: float = 2.0, max_recrops: int = 10,
                 root: str | Path | None = None) -> None:
        self.temperature = float(temperature)
        self.min_pixels = int(min_pixels)
        self.min_crop_ratio = float(min_crop_ratio)
        self.max_recrops = int(max_recrops)
        self._rng = np.random.default_rng(seed)
        counts = self._match(stats, samples, root)

        self.class_pixels = counts.sum(axis=0)
        stored = stats.get("class_pixels")
        if stored is not None and list(map(int, stored)) != self.class_pixels.tolist():
            raise ValueError("class statistics are inconsistent: class_pixels differs from the sum over files")
        probs = class_probabilities(self.class_pixels, self.temperature)

        # Candidate files per class; a class with pixels but no file reaching min_pixels cannot be sampled.
        self.candidates: dict[int, np.ndarray] = {}
        dropped = []
        for c in np.flatnonzero(probs > 0):
            files = np.flatnonzero(counts[:, c] >= self.min_pixels)
            if len(files):
                self.candidates[int(c)] = files
            else:
                dropped.append(int(c))
        if not self.candidates:
            raise ValueError(f"no file has {self.min_pixels} pixels of any class; lower rcs.min_pixels")
        if dropped:
            # DAFormer asserts here; small or partial datasets meet this legitimately, so warn and
            # renormalise the softmax over the classes that can be drawn.
            warnings.warn(f"rare-class sampling: classes {dropped} have no file with {self.min_pixels} pixels "
                          "of them and are never drawn", stacklevel=2)
            probs[dropped] = 0.0
            probs /= probs.sum()
        self.probabilities = probs

    @staticmethod
    def _match(stats: dict[str, Any], samples: list[Sample], root: str | Path | None) -> np.ndarray:
        """Counts (N samples × 19) in sample order; the statistics' files must be exactly the samples'."""
        files = stats.get("files")
        if not isinstance(files, dict):
            raise ValueError("class statistics have no 'files' mapping")
        root = root if root is not None else stats.get("root")
        if root is None:
            raise ValueError("class statistics name no dataset root; pass root=")
        keys = [relative_key(s.image, root) for s in samples]
        missing = [k for k in keys if k not in files]
        extra = sorted(set(files) - set(keys))
        if missing or extra:
            what = f"{stats.get('layout', '?')} split {stats.get('split', '?')} under {stats.get('root', '?')}"
            parts = []
            if missing:
                parts.append(f"{len(missing)} training samples have no statistics (e.g. {_examples(missing)})")
            if extra:
                parts.append(f"{len(extra)} files in the statistics are not training samples "
                             f"(e.g. {_examples(extra)})")
            raise ValueError(f"class statistics ({what}) do not match the training samples: " + "; ".join(parts)
                             + ". Regenerate them with python -m training.data.class_stats for this dataset/split.")
        counts = np.asarray([files[k] for k in keys], dtype=np.int64)
        if counts.ndim != 2 or counts.shape[1] != NUM_CLASSES:
            raise ValueError(f"class statistics must hold {NUM_CLASSES} counts per file")
        return counts

    def draw(self, rng: np.random.Generator | None = None) -> tuple[int, int]:
        """Draw a class from ``probabilities``, then one of its candidate files uniformly.

        Args:
            rng: randomness source; None uses the sampler's own seeded generator.

        Returns:
            (index into the samples, class id).
        """
        rng = self._rng if rng is None else rng
        c = int(rng.choice(NUM_CLASSES, p=self.probabilities))
        files = self.candidates[c]
        return int(files[rng.integers(len(files))]), c

    def crop_has_class(self, labels: np.ndarray, class_id: int) -> bool:
        """Whether an augmented crop holds enough of the drawn class to keep it (always, if re-cropping is off)."""
        if self.min_crop_ratio <= 0:
            return True
        return int(np.count_nonzero(labels == class_id)) >= self.min_pixels * self.min_crop_ratio
