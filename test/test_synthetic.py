"""Tests for the procedural road-scene generator (training/data/synthetic.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.data import synthetic as syn  # noqa: E402
from training.data.synthetic import (  # noqa: E402
    BUILDING, CAR, CONDITIONS, ROAD, SIDEWALK, SKY, TERRAIN, VEGETATION,
    apply_condition, main, render_scene, write_acdc_layout, write_cityscapes_layout,
)

SEEDS = list(range(10))
H, W = 256, 512


@pytest.fixture(scope="module")
def scenes() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {seed: render_scene(seed, H, W) for seed in SEEDS}


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _read_label(path: Path) -> np.ndarray:
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert lab is not None, path
    return lab


# --------------------------------------------------------------------------- #
# day scenes
# --------------------------------------------------------------------------- #


def test_conditions_constant():
    assert CONDITIONS == ("day", "night", "snow")


@pytest.mark.parametrize("size", [(256, 512), (64, 128), (100, 100), (48, 300)])
def test_shapes_and_dtypes(size):
    h, w = size
    rgb, lab = render_scene(3, h, w)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    assert lab.shape == (h, w) and lab.dtype == np.uint8
    assert lab.max() <= 18


def test_default_size():
    rgb, lab = render_scene(0)
    assert rgb.shape == (256, 512, 3) and lab.shape == (256, 512)


def test_same_seed_identical(scenes):
    rgb, lab = render_scene(4, H, W)
    assert np.array_equal(rgb, scenes[4][0])
    assert np.array_equal(lab, scenes[4][1])


def test_different_seeds_differ(scenes):
    for a, b in zip(SEEDS, SEEDS[1:]):
        assert not np.array_equal(scenes[a][0], scenes[b][0])
        assert not np.array_equal(scenes[a][1], scenes[b][1])


def test_label_values_are_train_ids(scenes):
    for _, lab in scenes.values():
        assert set(np.unique(lab).tolist()) <= set(range(19))


def test_major_classes_present_in_most_scenes(scenes):
    for cls in (ROAD, SIDEWALK, BUILDING, SKY, CAR):
        hits = sum(bool((lab == cls).any()) for _, lab in scenes.values())
        assert hits >= 0.8 * len(scenes), (syn.CLASS_NAMES[cls], hits)


def test_minor_classes_present_somewhere(scenes):
    seen = set()
    for _, lab in scenes.values():
        seen |= set(np.unique(lab).tolist())
    minor = {syn.WALL, syn.FENCE, syn.POLE, syn.TRAFFIC_LIGHT, syn.TRAFFIC_SIGN, VEGETATION,
             TERRAIN, syn.PERSON, syn.RIDER, syn.TRUCK, syn.BUS, syn.MOTORCYCLE, syn.BICYCLE}
    assert {syn.POLE, VEGETATION, syn.PERSON, syn.TRAFFIC_SIGN} <= seen
    assert len(minor & seen) >= 9, sorted(minor & seen)


def test_large_classes_dominate(scenes):
    big = [ROAD, SIDEWALK, BUILDING, VEGETATION, SKY]
    fractions = [np.isin(lab, big).mean() for _, lab in scenes.values()]
    assert np.mean(fractions) > 0.6


def test_image_content_matches_labels(scenes):
    """Coarse colour statistics per class agree with what the class should look like."""
    for rgb, lab in scenes.values():
        px = rgb.astype(np.float32)
        sky = px[lab == SKY]
        if len(sky):
            assert sky[:, 2].mean() > sky[:, 0].mean() + 10  # blue sky
        veg = px[lab == VEGETATION]
        if len(veg) > 100:
            assert veg[:, 1].mean() > veg[:, 2].mean()  # green foliage
        road = px[lab == ROAD]
        assert np.ptp(road, axis=1).mean() < 20  # grey asphalt / white markings


def test_image_is_textured(scenes):
    rgb, lab = scenes[0]
    road = rgb[lab == ROAD].astype(np.float32).mean(axis=1)
    assert road.std() > 3.0  # not a flat fill


def test_invalid_size_rejected():
    with pytest.raises(ValueError):
        render_scene(0, 8, 8)


# --------------------------------------------------------------------------- #
# conditions
# --------------------------------------------------------------------------- #


def test_day_condition_returns_equal_copy(scenes):
    rgb, lab = scenes[0]
    out = apply_condition(rgb, lab, "day", 0)
    assert np.array_equal(out, rgb)
    assert not np.shares_memory(out, rgb)


@pytest.mark.parametrize("condition", ["fog", "rain", "dusk", ""])
def test_unknown_condition_raises(scenes, condition):
    rgb, lab = scenes[0]
    with pytest.raises(ValueError):
        apply_condition(rgb, lab, condition, 0)


def test_mismatched_inputs_raise(scenes):
    rgb, lab = scenes[0]
    with pytest.raises(ValueError):
        apply_condition(rgb, lab[:-1], "night", 0)


@pytest.mark.parametrize("condition", ["night", "snow"])
def test_condition_keeps_inputs_and_shape(scenes, condition):
    rgb, lab = scenes[1]
    rgb0, lab0 = rgb.copy(), lab.copy()
    out = apply_condition(rgb, lab, condition, 1)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.array_equal(rgb, rgb0) and np.array_equal(lab, lab0)
    assert not np.array_equal(out, rgb)


@pytest.mark.parametrize("condition", ["night", "snow"])
def test_condition_deterministic(scenes, condition):
    rgb, lab = scenes[2]
    a = apply_condition(rgb, lab, condition, 7)
    b = apply_condition(rgb, lab, condition, 7)
    c = apply_condition(rgb, lab, condition, 8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_night_is_dark_and_bluish(scenes):
    ratios = []
    for seed, (rgb, lab) in scenes.items():
        night = apply_condition(rgb, lab, "night", seed).astype(np.float32)
        ratios.append(night.mean() / rgb.mean())
        dark = night.mean(axis=2) < 60  # unlit parts of the scene
        assert night[dark][:, 2].mean() > night[dark][:, 0].mean()
    assert max(ratios) < 0.6
    assert np.mean(ratios) < 0.45


def test_night_has_light_sources(scenes):
    rgb, lab = scenes[3]
    night = apply_condition(rgb, lab, "night", 3)
    assert (night.max(axis=2) > 230).sum() > 20  # glare / lamps / lit windows


def test_snow_brighter_ground_lower_contrast(scenes):
    lower_day, lower_snow = [], []
    for seed, (rgb, lab) in scenes.items():
        snow = apply_condition(rgb, lab, "snow", seed).astype(np.float32)
        day = rgb.astype(np.float32)
        road = lab == ROAD
        assert snow[road].mean() > day[road].mean() + 40
        assert snow.std() < day.std()
        lower_day.append(day[H // 2:].mean(axis=2).std())
        lower_snow.append(snow[H // 2:].mean(axis=2).std())
    assert np.mean(lower_snow) < np.mean(lower_day)


def test_snow_is_desaturated(scenes):
    rgb, lab = scenes[5]
    snow = apply_condition(rgb, lab, "snow", 5).astype(np.float32)
    sat = lambda im: np.ptp(im, axis=2).mean()  # noqa: E731
    assert sat(snow) < sat(rgb.astype(np.float32))


# --------------------------------------------------------------------------- #
# writers and CLI
# --------------------------------------------------------------------------- #


def _all_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def test_write_cityscapes_layout(tmp_path):
    paths = write_cityscapes_layout(tmp_path, "val", 3, 11, 64, 128, city="town")
    expected_imgs = [Path(f"leftImg8bit/val/town/town_000000_{i:06d}_leftImg8bit.png") for i in range(3)]
    expected_gts = [Path(f"gtFine/val/town/town_000000_{i:06d}_gtFine_labelTrainIds.png") for i in range(3)]
    assert paths == [tmp_path / p for p in expected_imgs]
    assert _all_files(tmp_path) == set(expected_imgs) | set(expected_gts)
    for i in range(3):
        rgb, lab = render_scene(11 + i, 64, 128)
        assert np.array_equal(_read_rgb(tmp_path / expected_imgs[i]), rgb)
        gt = _read_label(tmp_path / expected_gts[i])
        assert gt.dtype == np.uint8 and gt.ndim == 2
        assert np.array_equal(gt, lab)


def test_write_cityscapes_default_city(tmp_path):
    paths = write_cityscapes_layout(tmp_path, "train", 1, 0, 32, 64)
    assert paths == [tmp_path / "leftImg8bit/train/synthtown/synthtown_000000_000000_leftImg8bit.png"]
    assert (tmp_path / "gtFine/train/synthtown/synthtown_000000_000000_gtFine_labelTrainIds.png").is_file()


@pytest.mark.parametrize("condition", ["night", "snow"])
def test_write_acdc_layout(tmp_path, condition):
    paths = write_acdc_layout(tmp_path, condition, "val", 2, 5, 64, 128)
    base_img = Path("rgb_anon") / condition / "val" / "GOPR0000"
    base_gt = Path("gt") / condition / "val" / "GOPR0000"
    expected_imgs = [base_img / f"GOPR0000_frame_{i:06d}_rgb_anon.png" for i in range(2)]
    expected_gts = [base_gt / f"GOPR0000_frame_{i:06d}_gt_labelTrainIds.png" for i in range(2)]
    assert paths == [tmp_path / p for p in expected_imgs]
    assert _all_files(tmp_path) == set(expected_imgs) | set(expected_gts)
    for i in range(2):
        rgb, lab = render_scene(5 + i, 64, 128)
        adverse = apply_condition(rgb, lab, condition, 5 + i)
        assert np.array_equal(_read_rgb(tmp_path / expected_imgs[i]), adverse)
        assert np.array_equal(_read_label(tmp_path / expected_gts[i]), lab)


@pytest.mark.parametrize("condition", ["fog", "rain", "day", "ref"])
def test_write_acdc_rejects_unsupported_condition(tmp_path, condition):
    with pytest.raises(ValueError):
        write_acdc_layout(tmp_path, condition, "val", 1, 0, 32, 64)
    assert not any(tmp_path.iterdir())


def test_main_writes_both_layouts(tmp_path, capsys):
    out = tmp_path / "synth"
    rc = main(["--out", str(out), "--train", "2", "--val", "2", "--height", "48", "--width", "96", "--seed", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cityscapes" in printed and "night" in printed and "snow" in printed
    cs = out / "cityscapes"
    assert len(list((cs / "leftImg8bit" / "train" / "synthtown").glob("*_leftImg8bit.png"))) == 2
    assert len(list((cs / "leftImg8bit" / "val" / "synthtown").glob("*_leftImg8bit.png"))) == 2
    assert len(list((cs / "gtFine" / "train" / "synthtown").glob("*_gtFine_labelTrainIds.png"))) == 2
    val_gts = sorted((cs / "gtFine" / "val" / "synthtown").glob("*_gtFine_labelTrainIds.png"))
    assert len(val_gts) == 2
    day_val = sorted((cs / "leftImg8bit" / "val" / "synthtown").glob("*.png"))
    for condition in ("night", "snow"):
        imgs = sorted((out / "acdc" / "rgb_anon" / condition / "val" / "GOPR0000").glob("*_rgb_anon.png"))
        gts = sorted((out / "acdc" / "gt" / condition / "val" / "GOPR0000").glob("*_gt_labelTrainIds.png"))
        assert len(imgs) == 2 and len(gts) == 2
        for gt, cs_gt, img, day in zip(gts, val_gts, imgs, day_val):
            # same scenes as the Cityscapes val split, rendered under another condition
            assert np.array_equal(_read_label(gt), _read_label(cs_gt))
            assert not np.array_equal(_read_rgb(img), _read_rgb(day))
    # train and val scenes are different scenes
    train_gt = sorted((cs / "gtFine" / "train" / "synthtown").glob("*.png"))[0]
    assert not np.array_equal(_read_label(train_gt), _read_label(val_gts[0]))
    assert not (out / "acdc" / "rgb_anon" / "fog").exists()
