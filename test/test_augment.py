"""Training augmentation, class statistics, rare-class sampling and the training dataset."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from training.config import DataConfig, RareClassConfig, config_from_dict, train_crop_size
from training.data.class_stats import NUM_CLASSES, compute_stats, load_stats, main as class_stats_main
from training.data.datasets import Sample, find_samples
from training.data.loader import TrainDataset, build_train_dataset
from training.data.rare_class import RareClassSampler, class_probabilities
from training.data.transforms import (photometric, random_crop, random_scale_crop, train_transform)

ROOT = Path(__file__).resolve().parents[1]


# --- helpers --------------------------------------------------------------------------------------

def write_cityscapes(root: Path, split: str, label_maps: list[np.ndarray], seed: int = 0) -> list[Path]:
    """A Cityscapes-layout split: one random RGB image per label map; returns the label paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, labels in enumerate(label_maps):
        stem = f"bremen_000000_{i:06d}"
        img = root / "leftImg8bit" / split / "bremen" / f"{stem}_leftImg8bit.png"
        lab = root / "gtFine" / split / "bremen" / f"{stem}_gtFine_labelTrainIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        lab.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img), rng.integers(0, 256, (*labels.shape, 3), dtype=np.uint8))
        cv2.imwrite(str(lab), labels.astype(np.uint8))
        paths.append(lab)
    return paths


def road_and_car(h: int = 64, w: int = 96) -> np.ndarray:
    labels = np.zeros((h, w), np.uint8)  # road
    labels[h // 2:] = 13  # car
    labels[:2] = 255
    return labels


def fake_samples(root: Path, n: int) -> list[Sample]:
    """Samples whose files are never read (the sampler only needs their paths)."""
    return [Sample(root / "images" / f"{i:05d}.png", root / "labels" / f"{i:05d}.png", "gtav") for i in range(n)]


def stats_for(root: Path, samples: list[Sample], rows: list[list[int]]) -> dict:
    files = {s.image.relative_to(root).as_posix(): row for s, row in zip(samples, rows)}
    return {"layout": "gtav", "root": str(root), "split": "all", "num_classes": NUM_CLASSES, "files": files,
            "class_pixels": np.sum(rows, axis=0).tolist()}


def row(**counts: int) -> list[int]:
    r = [0] * NUM_CLASSES
    for key, n in counts.items():
        r[int(key[1:])] = n
    return r


# --- augmentation ---------------------------------------------------------------------------------

def test_crop_shapes_across_scales():
    rng = np.random.default_rng(0)
    for shape in [(40, 60), (100, 30), (17, 200)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        labels = rng.integers(0, 19, shape, dtype=np.uint8)
        for size in [(32, 32), (48, 64), (64, 24)]:
            for _ in range(5):
                img, lab = train_transform(image, labels, size, (0.5, 2.0), True, True, rng, cat_max_ratio=0.75)
                assert img.shape == (*size, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
                assert lab.shape == size and lab.dtype == np.uint8 and lab.flags.c_contiguous
                img, lab = random_scale_crop(image, labels, size, (0.5, 2.0), rng)
                assert img.shape == (*size, 3) and lab.shape == size


def test_padding_uses_ignore_and_black():
    image = np.full((20, 30, 3), 200, np.uint8)
    labels = np.full((20, 30), 7, np.uint8)
    # The image covers the crop at scale 2.4; half of that leaves a 24×36 image in a 48×64 crop.
    for photo in (False, True):
        img, lab = train_transform(image, labels, (48, 64), (0.5, 0.5), True, photo, np.random.default_rng(1))
        assert (lab[:24, :36] == 7).all()
        assert (lab[24:] == 255).all() and (lab[:, 36:] == 255).all()
        # Padding comes after the photometric distortion, so the border stays exactly 0.
        assert (img[24:] == 0).all() and (img[:, 36:] == 0).all()


def test_labels_are_never_interpolated():
    # One-pixel stripes of 3 and 7: any interpolation other than nearest would create other ids (e.g. 5).
    labels = np.zeros((50, 70), np.uint8)
    labels[:, ::2] = 3
    labels[:, 1::2] = 7
    labels[::2] = 18
    labels[:3] = 255
    image = np.zeros((50, 70, 3), np.uint8)
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(40):
        _, lab = train_transform(image, labels, (40, 40), (0.3, 2.5), True, True, rng)
        seen |= set(np.unique(lab).tolist())
    assert seen <= {3, 7, 18, 255} and {3, 7, 18} <= seen


def test_flip_mirrors_image_and_labels_together():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    labels = rng.integers(0, 19, (32, 48), dtype=np.uint8)
    flipped = kept = 0
    for seed in range(30):
        # Image size == crop size at scale 1: the only change left is the flip.
        img, lab = train_transform(image, labels, (32, 48), (1.0, 1.0), True, False, np.random.default_rng(seed))
        if np.array_equal(lab, labels):
            assert np.array_equal(img, image)
            kept += 1
        else:
            assert np.array_equal(lab, labels[:, ::-1]) and np.array_equal(img, image[:, ::-1])
            flipped += 1
    assert flipped > 5 and kept > 5
    for seed in range(10):
        img, lab = train_transform(image, labels, (32, 48), (1.0, 1.0), False, False, np.random.default_rng(seed))
        assert np.array_equal(img, image) and np.array_equal(lab, labels)


def test_photometric_changes_image_not_labels():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    labels = rng.integers(0, 19, (40, 60), dtype=np.uint8)
    changed = 0
    for seed in range(20):
        img_on, lab_on = train_transform(image, labels, (32, 32), (0.8, 1.5), True, True,
                                         np.random.default_rng(seed))
        img_off, lab_off = train_transform(image, labels, (32, 32), (0.8, 1.5), True, False,
                                           np.random.default_rng(seed))
        assert img_on.dtype == np.uint8 and img_on.shape == img_off.shape
        assert np.array_equal(lab_on, lab_off)  # same crop and flip; the distortion leaves labels alone
        changed += not np.array_equal(img_on, img_off)
    assert changed >= 12  # unchanged only when all four coins say no (1/16)
    before = image.copy()
    out = photometric(image, np.random.default_rng(0))
    assert np.array_equal(image, before) and out is not image and out.dtype == np.uint8


def test_photometric_matches_mmseg_ranges_on_grey():
    # A grey image has no saturation, so saturation and hue leave it grey: only brightness (±32)
    # and contrast (×0.5–1.5, no mean subtraction) act, each with probability 1/2.
    grey = np.full((4, 4, 3), 128, np.uint8)
    values, unchanged = [], 0
    for seed in range(2000):
        out = photometric(grey, np.random.default_rng(seed))
        assert (out == out[0, 0, 0]).all()
        values.append(int(out[0, 0, 0]))
        unchanged += int(out[0, 0, 0]) == 128
    assert 48 <= min(values) < 70 and 200 < max(values) <= 240
    assert 0.18 < unchanged / 2000 < 0.32


def test_photometric_hue_shift_is_bounded():
    hsv = np.zeros((1, 1, 3), np.uint8)
    hsv[..., :] = (60, 255, 150)  # mid green: brightness and contrast never clip a channel, so hue survives
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    shifts = set()
    for seed in range(1000):
        out = cv2.cvtColor(photometric(rgb, np.random.default_rng(seed)), cv2.COLOR_RGB2HSV)
        if out[0, 0, 1] > 120:  # hue stays well defined
            shifts.add(int(out[0, 0, 0]) - 60)
    assert min(shifts) >= -19 and max(shifts) <= 18 and len(shifts) > 30


def test_cat_max_ratio_redraws_dominated_crops():
    labels = np.zeros((200, 200), np.uint8)
    labels[:70, :70] = 1  # a minority block in one corner
    image = np.zeros((200, 200, 3), np.uint8)

    def mixed_share(ratio: float) -> float:
        rng = np.random.default_rng(5)
        mixed = 0
        for _ in range(400):
            _, lab = random_crop(image, labels, (50, 50), rng, cat_max_ratio=ratio)
            counts = np.bincount(lab.ravel(), minlength=2)
            mixed += counts.max() / counts.sum() < 0.75
        return mixed / 400

    off, on = mixed_share(1.0), mixed_share(0.75)
    assert off < 0.1 and on > 0.4
    # A single-class label can never satisfy it: the crop is still returned after ten re-draws.
    img, lab = random_crop(image, np.zeros((200, 200), np.uint8), (50, 50), np.random.default_rng(0), 0.75)
    assert img.shape == (50, 50, 3) and lab.shape == (50, 50)
    # Ignored pixels do not count as a class: road + ignore is still dominated.
    ignore = np.full((200, 200), 255, np.uint8)
    ignore[:, :100] = 0
    rng = np.random.default_rng(6)
    for _ in range(50):
        _, lab = random_crop(image, ignore, (50, 50), rng, cat_max_ratio=0.75)
        assert set(np.unique(lab).tolist()) <= {0, 255}


# --- class statistics -----------------------------------------------------------------------------

def stats_dataset(root: Path) -> list[Path]:
    a = road_and_car()
    b = road_and_car()
    b[10:20, 10:30] = 11  # person
    c = np.full((64, 96), 2, np.uint8)
    c[:, :5] = 255
    c[40:, 80:] = 18
    return write_cityscapes(root, "train", [a, b, c])


def test_class_stats_cli_counts_and_refuses_overwrite(tmp_path, capsys):
    labels = stats_dataset(tmp_path / "cs")
    out = tmp_path / "stats" / "cs.json"
    assert class_stats_main(["--layout", "cityscapes", "--root", str(tmp_path / "cs"), "--split", "train",
                             "--out", str(out), "--no-progress"]) == 0
    stats = json.loads(out.read_text())
    assert stats["layout"] == "cityscapes" and stats["split"] == "train" and stats["num_classes"] == 19
    assert len(stats["files"]) == 3
    total = np.zeros(19, np.int64)
    for lab in labels:
        key = (Path("leftImg8bit") / "train" / "bremen"
               / lab.name.replace("_gtFine_labelTrainIds", "_leftImg8bit")).as_posix()
        expected = np.bincount(cv2.imread(str(lab), cv2.IMREAD_UNCHANGED).ravel(), minlength=256)[:19]
        assert stats["files"][key] == expected.tolist()
        total += expected
    assert stats["class_pixels"] == total.tolist()
    assert load_stats(out)["files"] == stats["files"]

    before = out.read_text()
    assert class_stats_main(["--layout", "cityscapes", "--root", str(tmp_path / "cs"), "--split", "train",
                             "--out", str(out), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == before


def test_class_stats_cli_missing_dataset(tmp_path, capsys):
    code = class_stats_main(["--layout", "cityscapes", "--root", str(tmp_path / "nowhere"), "--split", "train",
                             "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert code == 2 and "no Cityscapes images" in err and "nowhere" in err
    assert not (tmp_path / "s.json").exists()


def test_class_stats_module_with_workers(tmp_path):
    stats_dataset(tmp_path / "cs")
    out = tmp_path / "s.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "training.data.class_stats", "--layout", "cityscapes", "--root",
                    str(tmp_path / "cs"), "--split", "train", "--out", str(out), "--workers", "2"],
                   check=True, cwd=tmp_path, env=env, capture_output=True)
    serial = compute_stats("cityscapes", tmp_path / "cs", "train")
    assert json.loads(out.read_text())["files"] == serial["files"]


# --- rare-class sampling --------------------------------------------------------------------------

def test_probabilities_match_hand_computation(tmp_path):
    samples = fake_samples(tmp_path, 3)
    rows = [row(c0=600_000, c2=5_000), row(c0=300_000, c13=90_000), row(c2=1_000, c18=4_000)]
    sampler = RareClassSampler(stats_for(tmp_path, samples, rows), samples, temperature=0.01, min_pixels=3000)
    total = 600_000 + 300_000 + 5_000 + 1_000 + 90_000 + 4_000
    pixels = {0: 900_000, 2: 6_000, 13: 90_000, 18: 4_000}
    logits = {c: (1 - n / total) / 0.01 for c, n in pixels.items()}
    z = sum(math.exp(v - max(logits.values())) for v in logits.values())
    for c in range(19):
        expected = math.exp(logits[c] - max(logits.values())) / z if c in pixels else 0.0
        assert sampler.probabilities[c] == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert sampler.probabilities.sum() == pytest.approx(1.0)
    # Rarer classes are drawn more often.
    p = sampler.probabilities
    assert p[18] > p[2] > p[13] > p[0]
    assert np.allclose(class_probabilities(sampler.class_pixels, 0.01), p)


def test_draws_follow_probabilities_and_candidates(tmp_path):
    samples = fake_samples(tmp_path, 6)
    rows = [row(c0=50_000, c1=2_999), row(c0=40_000, c1=3_000), row(c0=30_000, c1=20_000),
            row(c0=60_000, c5=3_500), row(c0=10_000, c5=100), row(c0=20_000, c1=10_000, c5=4_000)]
    sampler = RareClassSampler(stats_for(tmp_path, samples, rows), samples, temperature=0.5, min_pixels=3000)
    assert sorted(sampler.candidates) == [0, 1, 5]
    assert sampler.candidates[1].tolist() == [1, 2, 5]  # 3000 counts, 2999 does not
    assert sampler.candidates[5].tolist() == [3, 5]
    rng = np.random.default_rng(7)
    n = 20_000
    classes = np.zeros(19)
    files: dict[int, np.ndarray] = {c: np.zeros(6) for c in sampler.candidates}
    for _ in range(n):
        i, c = sampler.draw(rng)
        assert rows[i][c] >= 3000
        classes[c] += 1
        files[c][i] += 1
    p = sampler.probabilities
    assert p[0] > 0.05 and p[1] > p[0] and p[5] > p[1]  # a temperature at which every class is drawn
    assert np.abs(classes / n - p).max() < 0.02
    for c, counts in files.items():  # uniform among a class's candidates
        share = counts[sampler.candidates[c]] / counts.sum()
        assert np.abs(share - 1 / len(sampler.candidates[c])).max() < 0.05
    # The sampler's own generator is seeded: two samplers with one seed agree.
    again = RareClassSampler(stats_for(tmp_path, samples, rows), samples, temperature=0.3, min_pixels=3000, seed=3)
    other = RareClassSampler(stats_for(tmp_path, samples, rows), samples, temperature=0.3, min_pixels=3000, seed=3)
    assert [again.draw() for _ in range(20)] == [other.draw() for _ in range(20)]


def test_class_without_candidates_is_dropped_with_warning(tmp_path):
    samples = fake_samples(tmp_path, 2)
    rows = [row(c0=50_000, c7=100), row(c0=50_000, c7=200, c9=5_000)]
    with pytest.warns(UserWarning, match=r"classes \[7\]"):
        sampler = RareClassSampler(stats_for(tmp_path, samples, rows), samples, 0.01, 3000)
    assert sampler.probabilities[7] == 0 and sampler.probabilities.sum() == pytest.approx(1.0)
    assert sorted(sampler.candidates) == [0, 9]


def test_stats_and_samples_must_match(tmp_path):
    root = tmp_path / "gta"
    samples = fake_samples(root, 4)
    rows = [row(c0=10_000)] * 4
    stats = stats_for(root, samples, rows)
    with pytest.raises(ValueError, match=r"1 training samples have no statistics \(e.g. images/00004.png\)"):
        RareClassSampler(stats, fake_samples(root, 5), 0.01, 3000)
    with pytest.raises(ValueError, match=r"2 files in the statistics are not training samples "
                                         r"\(e.g. images/00002.png, images/00003.png\)"):
        RareClassSampler(stats, samples[:2], 0.01, 3000)
    bad = dict(stats, class_pixels=[1] * 19)
    with pytest.raises(ValueError, match="inconsistent"):
        RareClassSampler(bad, samples, 0.01, 3000)
    # The statistics' own root is the default; a moved dataset passes its new root.
    moved = [Sample(tmp_path / "moved" / s.image.relative_to(root), s.label, s.domain) for s in samples]
    with pytest.raises(ValueError, match="not under the dataset root"):
        RareClassSampler(stats, moved, 0.01, 3000)
    assert RareClassSampler(stats, moved, 0.01, 3000, root=tmp_path / "moved").candidates[0].tolist() == [0, 1, 2, 3]


# --- the training dataset -------------------------------------------------------------------------

def rare_corner_dataset(root: Path) -> None:
    maps = [road_and_car() for _ in range(6)]
    maps[4][52:64, 84:96] = 18  # 144 bicycle pixels in the bottom-right corner of one image
    write_cityscapes(root, "train", maps)


def test_rare_class_sampling_finds_the_rare_corner(tmp_path):
    rare_corner_dataset(tmp_path / "cs")
    samples = find_samples("cityscapes", tmp_path / "cs", "train")
    stats = compute_stats("cityscapes", tmp_path / "cs", "train")
    data = DataConfig(scale_range=[1.0, 1.0], flip=True, photometric=True)
    # The 64×96 frame is resized to 32×48; a 32×32 crop holds at least one column (6 pixels) of the
    # 6×6 corner in 6 of its 17 positions, so eleven tries nearly always find it.
    sampler = RareClassSampler(stats, samples, temperature=0.01, min_pixels=100, seed=0, min_crop_ratio=0.06,
                               max_recrops=10)
    assert sampler.probabilities[18] > 0.99
    plain = TrainDataset(samples, (32, 32), data, seed=0)
    rcs = TrainDataset(samples, (32, 32), data, seed=0, sampler=sampler)
    assert len(rcs) == len(plain) == 6
    torch.manual_seed(0)
    n = 120
    with_plain = sum(bool((plain[i % 6][1] == 18).any()) for i in range(n))
    with_rcs = sum(int((rcs[i % 6][1] == 18).sum()) >= 6 for i in range(n))
    assert with_plain < 0.15 * n and with_rcs > 0.9 * n


def test_recrop_off_keeps_first_crop(tmp_path):
    rare_corner_dataset(tmp_path / "cs")
    samples = find_samples("cityscapes", tmp_path / "cs", "train")
    stats = compute_stats("cityscapes", tmp_path / "cs", "train")
    data = DataConfig(scale_range=[1.0, 1.0], flip=True, photometric=False)
    sampler = RareClassSampler(stats, samples, 0.01, 100, min_crop_ratio=0.0)
    rcs = TrainDataset(samples, (32, 32), data, seed=0, sampler=sampler)
    torch.manual_seed(0)
    hits = sum(bool((rcs[i % 6][1] == 18).any()) for i in range(90))
    assert 0.1 * 90 < hits < 0.7 * 90  # always the rare file, but the crop is not re-drawn


def test_train_dataset_output_and_reproducibility(tmp_path):
    write_cityscapes(tmp_path / "cs", "train", [road_and_car(), road_and_car(40, 50)])
    samples = find_samples("cityscapes", tmp_path / "cs", "train")
    ds = TrainDataset(samples, (48, 56), DataConfig(), seed=3)
    torch.manual_seed(0)
    first = [ds[i] for i in range(2)]
    for image, labels in first:
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 56)
        assert labels.dtype == torch.int64 and labels.shape == (48, 56)
        assert set(labels.unique().tolist()) <= {0, 13, 255}
    torch.manual_seed(0)
    again = [ds[i] for i in range(2)]
    for (a, b), (c, d) in zip(first, again):
        assert torch.equal(a, c) and torch.equal(b, d)
    other = TrainDataset(samples, (48, 56), DataConfig(), seed=4)
    torch.manual_seed(0)
    assert not torch.equal(other[0][0], first[0][0])
    # Another draw of the same index is another augmentation (torch's stream moved on).
    assert not torch.equal(ds[0][0], first[0][0])
    with pytest.raises(IndexError):
        ds[2]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 48, 56) and labels.shape == (2, 48, 56)


def test_build_train_dataset(tmp_path):
    rare_corner_dataset(tmp_path / "cs")
    cfg = config_from_dict({"seed": 1, "model": {"img_size": [32, 32]},
                            "data": {"layout": "cityscapes", "root": str(tmp_path / "cs"), "split": "train"}})
    ds = build_train_dataset(cfg)
    assert ds.sampler is None and len(ds) == 6 and ds.crop_size == train_crop_size(cfg) == (32, 32)
    assert ds[0][0].shape == (3, 32, 32)

    stats_path = tmp_path / "cs_stats.json"
    cfg.data.rcs = RareClassConfig(stats=str(stats_path), min_pixels=100)
    with pytest.raises(FileNotFoundError, match=r"cs_stats.json.*python -m training.data.class_stats "
                                                r"--layout cityscapes"):
        build_train_dataset(cfg)
    cfg.data.rcs.stats = ""
    with pytest.raises(FileNotFoundError, match="data.rcs.stats is not set"):
        build_train_dataset(cfg)
    cfg.data.rcs.stats = str(stats_path)
    assert class_stats_main(["--layout", "cityscapes", "--root", str(tmp_path / "cs"), "--split", "train",
                             "--out", str(stats_path), "--no-progress"]) == 0
    ds = build_train_dataset(cfg)
    assert ds.sampler is not None and ds.sampler.min_pixels == 100 and ds.sampler.max_recrops == 10
    assert ds.sampler.probabilities[18] > 0.99
    image, labels = ds[0]
    assert image.shape == (3, 32, 32) and labels.dtype == torch.int64
    # Statistics of another split are refused.
    write_cityscapes(tmp_path / "cs", "val", [road_and_car()])
    cfg.data.split = "val"
    with pytest.raises(ValueError, match="do not match the training samples"):
        build_train_dataset(cfg)
