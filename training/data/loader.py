"""The training dataset: augmented crops, optionally chosen by rare-class sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DataConfig, TrainConfig, train_crop_size
from .class_stats import load_stats
from .datasets import Sample, find_samples, load_sample
from .rare_class import RareClassSampler
from .transforms import train_transform


class TrainDataset(Dataset):
    """Samples → (image uint8 (3, H, W), labels int64 (H, W)) at ``crop_size`` after augmentation.

    Without a sampler, item i is sample i. With one, the index only seeds the draw: the sampler picks the
    file and class, and the crop is re-augmented from the same file (up to ``sampler.max_recrops`` times)
    while it holds too little of the class; the length stays the number of samples, so an epoch means the
    same amount of data either way.

    Args:
        samples: training samples.
        crop_size: output (H, W).
        data_cfg: augmentation switches (scale_range, flip, photometric, and cat_max_ratio when present).
        seed: base seed; mixed with the index and torch's RNG per item.
        sampler: rare-class sampler over ``samples``, or None.
    """

    def __init__(self, samples: list[Sample], crop_size: tuple[int, int], data_cfg: DataConfig, seed: int,
                 sampler: RareClassSampler | None = None) -> None:
        if not samples:
            raise ValueError("TrainDataset needs at least one sample")
        self.samples = samples
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(data_cfg.scale_range[0]), float(data_cfg.scale_range[1]))
        self.flip = bool(data_cfg.flip)
        self.photometric = bool(data_cfg.photometric)
        # mmseg's RandomCrop option (VFMSeg: 0.75); read only if the config carries it, 1.0 = off.
        self.cat_max_ratio = float(getattr(data_cfg, "cat_max_ratio", 1.0))
        self.seed = int(seed)
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.samples)

    def _augment(self, image: np.ndarray, labels: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return train_transform(image, labels, self.crop_size, self.scale_range, self.flip, self.photometric, rng,
                               cat_max_ratio=self.cat_max_ratio)

    def item_rng(self, index: int) -> np.random.Generator:
        """The generator of one item: seed, index and a draw from torch's RNG.

        torch seeds every DataLoader worker differently (and the main process from torch.manual_seed), so
        repeated epochs, workers and differently seeded ranks draw different augmentations while a run
        stays reproducible.
        """
        return np.random.default_rng([self.seed, int(index), int(torch.randint(0, 2**31 - 1, (1,)))])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} samples")
        rng = self.item_rng(index)
        if self.sampler is None:
            image, labels = self._augment(*load_sample(self.samples[index]), rng)
        else:
            image, labels = self._rare_class_item(rng)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(labels.astype(np.int64))

    def _rare_class_item(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        assert self.sampler is not None
        file_index, class_id = self.sampler.draw(rng)
        # Decoded once; DAFormer reloads and re-runs the whole pipeline per try, which gives the same
        # distribution: every try is a fresh resize, crop, flip and distortion of the same file.
        full_image, full_labels = load_sample(self.samples[file_index])
        image, labels = self._augment(full_image, full_labels, rng)
        for _ in range(self.sampler.max_recrops):
            if self.sampler.crop_has_class(labels, class_id):
                break
            image, labels = self._augment(full_image, full_labels, rng)
        return image, labels


def build_rare_class_sampler(cfg: TrainConfig, samples: list[Sample]) -> RareClassSampler:
    """The sampler of ``cfg.data.rcs`` over ``samples``, its statistics read from ``cfg.data.rcs.stats``.

    Raises:
        FileNotFoundError: the statistics file is not set or missing (the message says how to write it).
        ValueError: the statistics belong to other files.
    """
    rcs = cfg.data.rcs
    assert rcs is not None
    command = (f"python -m training.data.class_stats --layout {cfg.data.layout} --root {cfg.data.root} "
               f"--split {cfg.data.split}"
               + (f" --conditions {' '.join(cfg.data.conditions)}" if cfg.data.conditions else ""))
    if not rcs.stats:
        raise FileNotFoundError(f"data.rcs.stats is not set; write the class statistics with {command} --out "
                                "<file> and set data.rcs.stats to it")
    if not Path(rcs.stats).is_file():
        raise FileNotFoundError(f"class statistics file not found: {rcs.stats} (data.rcs.stats); "
                                f"write it with {command} --out {rcs.stats}")
    return RareClassSampler(load_stats(rcs.stats), samples, rcs.temperature, rcs.min_pixels, cfg.seed,
                            min_crop_ratio=rcs.min_crop_ratio, max_recrops=rcs.max_recrops, root=cfg.data.root)


def build_train_dataset(cfg: TrainConfig) -> TrainDataset:
    """The training dataset of a config: its samples, crop size, augmentation and rare-class sampling."""
    samples = find_samples(cfg.data.layout, cfg.data.root, cfg.data.split, cfg.data.conditions or None)
    sampler = build_rare_class_sampler(cfg, samples) if cfg.data.rcs is not None else None
    return TrainDataset(samples, train_crop_size(cfg), cfg.data, cfg.seed, sampler)
