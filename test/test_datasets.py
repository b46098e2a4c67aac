"""Dataset readers on tiny files written in each dataset's real on-disk layout."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from training.data import label_maps as lm
from training.data.datasets import (
    LAYOUTS,
    Sample,
    bdd100k_samples,
    cityscapes_samples,
    find_samples,
    gtav_samples,
    load_labels,
    load_sample,
    mapillary_samples,
    read_rgb,
    synthia_samples,
)

H, W = 8, 12


# --- writers for the stored formats ---------------------------------------------------------------

def write_rgb(path: Path, seed: int = 0) -> np.ndarray:
    """A random colour image as PNG or JPEG (by suffix); returns the rgb written."""
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def write_gray(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), ids.astype(np.uint8))


def write_palettised(path: Path, ids: np.ndarray) -> None:
    """A palettised PNG whose indices are ``ids`` and whose colours are not (as GTAV and Mapillary store them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8))
    # Colours unrelated to the indices: a reader that expands the palette cannot get the ids back by accident.
    img.putpalette([(7 * i + 50) % 256 for i in range(256) for _ in range(3)])
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "P"


def write_synthia_label(path: Path, class_ids: np.ndarray, instance_ids: np.ndarray) -> None:
    """SYNTHIA GT/LABELS: 16-bit 3-channel PNG, class id in the first (R) channel, instance id in the second."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = np.zeros((*class_ids.shape, 3), np.uint16)
    bgr[..., 2] = class_ids  # OpenCV writes BGR arrays: index 2 is the PNG's first channel
    bgr[..., 1] = instance_ids
    bgr[..., 0] = 3  # a valid SYNTHIA id (road), so reading the wrong channel would pass validation
    assert cv2.imwrite(str(path), bgr)


def grid(values: list[int]) -> np.ndarray:
    """An H×W id image whose rows cycle through ``values`` (one value per row)."""
    return np.repeat(np.resize(np.asarray(values, np.uint16), H)[:, None], W, axis=1)


def expect(values: list[int]) -> np.ndarray:
    return grid(values).astype(np.uint8)


# --- tables ---------------------------------------------------------------------------------------

def test_cityscapes_table_is_the_official_one():
    # cityscapesscripts/helpers/labels.py: the 19 evaluated ids and their trainIds.
    official = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    assert lm.CITYSCAPES_ID_TO_TRAIN_ID == official
    assert lm.CITYSCAPES_ID_LUT.tolist()[:34] == [official.get(i, 255) for i in range(34)]
    assert (lm.CITYSCAPES_ID_LUT[34:] == lm.INVALID).all()


def test_mapillary_table():
    names = lm.MAPILLARY_V12_CLASSES
    assert len(names) == 66 and len(set(names)) == 66
    assert names[0] == "animal--bird" and names[13] == "construction--flat--road"
    assert names[23] == "marking--crosswalk-zebra" and names[55] == "object--vehicle--car"
    assert names[65] == "void--unlabeled"
    ids = lm.MAPILLARY_V12_ID_TO_TRAIN_ID
    # The indices shared with HRDA's converter (ids written as numbers there) agree.
    hrda = {13: 0, 24: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8, 29: 9, 27: 10,
            19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18}
    assert {k: ids[k] for k in hrda} == hrda
    assert ids[7] == ids[8] == ids[10] == ids[14] == ids[23] == 0  # bike lane, crosswalk, parking, service lane
    assert ids[9] == ids[11] == 1 and ids[44] == 5 and ids[49] == 7  # curb cut, pedestrian area, street light, back
    assert ids[46] == 7  # sign frame → traffic sign, as the DGSS benchmarks' conversion
    for unmapped in (12, 16, 18, 41, 56, 60, 64, 65):  # rail track, bridge, tunnel, manhole, ...
        assert unmapped not in ids
    assert sorted(set(ids.values())) == list(range(19))


def test_synthia_table_matches_daformer():
    daformer = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
                18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
    assert lm.SYNTHIA_ID_TO_TRAIN_ID == daformer
    assert len(lm.SYNTHIA_LUT) == 65536 and lm.SYNTHIA_LUT[22] == 255 and lm.SYNTHIA_LUT[23] == lm.INVALID


def test_apply_lut_reports_invalid_ids():
    raw = np.array([[7, 40, 41], [7, 40, 0]], np.uint8)
    with pytest.raises(ValueError, match=r"label some/file\.png holds ids \[40, 41\] outside the ids"):
        lm.apply_lut(raw, lm.CITYSCAPES_ID_LUT, "some/file.png", "the ids")
    many = np.arange(34, 64, dtype=np.uint8)[None]
    with pytest.raises(ValueError, match=r"\(30 in all\)"):
        lm.apply_lut(many, lm.CITYSCAPES_ID_LUT, "f.png", "the ids")
    # 16-bit values beyond an 8-bit table are invalid too, not an IndexError.
    with pytest.raises(ValueError, match=r"holds ids \[300\]"):
        lm.apply_lut(np.array([[7, 300]], np.uint16), lm.CITYSCAPES_ID_LUT, "f.png", "the ids")
    with pytest.raises(ValueError, match="expected 8- or 16-bit"):
        lm.apply_lut(np.zeros((2, 2), np.int32), lm.CITYSCAPES_ID_LUT, "f.png", "the ids")
    with pytest.raises(ValueError, match="not among the dataset's classes"):
        lm.ids_by_name(("a", "b"), {"c": "road"})
    with pytest.raises(ValueError, match="not Cityscapes train classes"):
        lm.ids_by_name(("a", "b"), {"a": "parking"})


# --- layouts --------------------------------------------------------------------------------------

CS_IDS = [0, 7, 8, 9, 10, 24, 26, 33]
CS_TRAIN = [255, 0, 1, 255, 255, 11, 13, 18]


def make_cityscapes_frame(root: Path, split: str, city: str, stem: str, train_ids: np.ndarray | None,
                          label_ids: np.ndarray | None) -> None:
    write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
    gt = root / "gtFine" / split / city
    if train_ids is not None:
        write_gray(gt / f"{stem}_gtFine_labelTrainIds.png", train_ids)
    if label_ids is not None:
        write_gray(gt / f"{stem}_gtFine_labelIds.png", label_ids)


def test_cityscapes_train_ids_and_label_ids(tmp_path):
    root = tmp_path / "cityscapes"
    # Frame 0 has both files (trainIds wins), frame 1 only labelIds (mapped with the official table).
    make_cityscapes_frame(root, "val", "lindau", "lindau_000000_000019", expect([0, 5, 255]), grid(CS_IDS))
    make_cityscapes_frame(root, "val", "munster", "munster_000001_000019", None, grid(CS_IDS))
    samples = find_samples("cityscapes", root, "val")
    assert [(s.domain, s.label_format) for s in samples] == [("cityscapes", "trainids"),
                                                             ("cityscapes", "cityscapes_ids")]
    assert samples[0].label.name == "lindau_000000_000019_gtFine_labelTrainIds.png"
    assert np.array_equal(load_labels(samples[0]), expect([0, 5, 255]))
    rgb, labels = load_sample(samples[1])
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    assert labels.dtype == np.uint8 and np.array_equal(labels, expect(CS_TRAIN))

    write_gray(samples[1].label, grid([7, 34, 7]))
    with pytest.raises(ValueError, match=r"munster_000001_000019_gtFine_labelIds\.png holds ids \[34\] outside"):
        load_labels(samples[1])
    write_gray(samples[0].label, grid([0, 19]))
    with pytest.raises(ValueError, match=r"lindau_000000_000019_gtFine_labelTrainIds\.png holds ids \[19\]"):
        load_labels(samples[0])

    write_rgb(root / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    with pytest.raises(FileNotFoundError, match=r"label missing for .*ulm_000000_000019_leftImg8bit\.png"):
        cityscapes_samples(root, "val")
    with pytest.raises(FileNotFoundError, match="no Cityscapes images"):
        cityscapes_samples(root, "test")


def make_gtav(root: Path, names: list[str], ids: np.ndarray) -> None:
    for i, name in enumerate(names):
        write_rgb(root / "images" / name, seed=i)
        write_palettised(root / "labels" / name, ids)


def test_gtav_palettised_labels_and_splits(tmp_path):
    root = tmp_path / "gta"
    make_gtav(root, ["00001.png", "00002.png", "00003.png"], grid(CS_IDS))
    samples = gtav_samples(root, "all")
    assert [s.image.name for s in samples] == ["00001.png", "00002.png", "00003.png"]
    assert {(s.domain, s.label_format) for s in samples} == {("gtav", "cityscapes_ids")}
    assert all(s.label == root / "labels" / s.image.name for s in samples)
    rgb, labels = load_sample(samples[0])
    assert np.array_equal(rgb, write_rgb(tmp_path / "same_seed.png", seed=0))
    assert np.array_equal(labels, expect(CS_TRAIN))

    # Split files list names or stems; blank lines and folder prefixes are tolerated.
    (root / "train.txt").write_text("00003.png\n\nimages/00001\n")
    assert [s.image.name for s in find_samples("gtav", root, "train")] == ["00003.png", "00001.png"]
    with pytest.raises(FileNotFoundError, match=r"gta/val\.txt"):
        gtav_samples(root, "val")
    (root / "bad.txt").write_text("00001\n09999\n")
    with pytest.raises(FileNotFoundError, match=r"bad\.txt names 1 images that do not exist, e\.g\. .*09999\.png"):
        gtav_samples(root, "bad")

    write_palettised(root / "labels" / "00002.png", grid([7, 40, 7]))
    with pytest.raises(ValueError, match=r"labels/00002\.png holds ids \[40\] outside the Cityscapes label ids"):
        load_labels(samples[1])
    write_rgb(root / "images" / "00004.png")
    with pytest.raises(FileNotFoundError, match=r"label missing for .*images/00004\.png"):
        gtav_samples(root, "all")


def test_bdd100k_both_layouts(tmp_path):
    new = tmp_path / "bdd_new"
    for stem in ("7d06fefd-f7be05a6", "7d128593-0ccfea4c"):
        write_rgb(new / "images" / "10k" / "val" / f"{stem}.jpg")
        write_gray(new / "labels" / "sem_seg" / "masks" / "val" / f"{stem}.png", expect([0, 18, 255, 10]))
    samples = find_samples("bdd100k", new, "val")
    assert len(samples) == 2 and {(s.domain, s.label_format) for s in samples} == {("bdd100k", "trainids")}
    rgb, labels = load_sample(samples[1])
    assert rgb.shape == (H, W, 3) and np.array_equal(labels, expect([0, 18, 255, 10]))
    write_gray(samples[0].label, grid([0, 19, 200]))
    with pytest.raises(ValueError, match=r"masks/val/7d06fefd-f7be05a6\.png holds ids \[19, 200\]"):
        load_labels(samples[0])
    write_rgb(new / "images" / "10k" / "val" / "80a9e37d-e4548ac1.jpg")
    with pytest.raises(FileNotFoundError, match=r"label missing for .*80a9e37d-e4548ac1\.jpg"):
        bdd100k_samples(new, "val")

    old = tmp_path / "bdd_old"
    write_rgb(old / "seg" / "images" / "train" / "0a0a0b1a-7c39d841.jpg")
    write_gray(old / "seg" / "labels" / "train" / "0a0a0b1a-7c39d841_train_id.png", expect([13, 255]))
    (sample,) = bdd100k_samples(old, "train")
    assert sample.label.name == "0a0a0b1a-7c39d841_train_id.png"
    assert np.array_equal(load_labels(sample), expect([13, 255]))
    with pytest.raises(FileNotFoundError, match="no BDD100K images"):
        bdd100k_samples(old, "val")


def test_mapillary_v12(tmp_path):
    root = tmp_path / "vistas"
    raw = [13, 24, 2, 46, 55, 65, 58, 12]  # road, marking, curb, sign frame, car, unlabeled, on rails, rail track
    for split in ("training", "validation"):
        write_rgb(root / split / "images" / "__CRyFzoDOXn6unQ6a3DnQ.jpg")
        write_palettised(root / split / "v1.2" / "labels" / "__CRyFzoDOXn6unQ6a3DnQ.png", grid(raw))
    for alias, folder in (("train", "training"), ("val", "validation"), ("validation", "validation")):
        (sample,) = find_samples("mapillary", root, alias)
        assert sample.image.parent.parent.name == folder
        assert (sample.domain, sample.label_format) == ("mapillary", "mapillary_v1.2")
    rgb, labels = load_sample(sample)
    assert rgb.shape == (H, W, 3)
    assert np.array_equal(labels, expect([0, 0, 1, 7, 13, 255, 16, 255]))

    write_palettised(sample.label, grid([13, 66, 99]))
    with pytest.raises(ValueError, match=r"__CRyFzoDOXn6unQ6a3DnQ\.png holds ids \[66, 99\] outside the Mapillary"):
        load_labels(sample)
    with pytest.raises(ValueError, match="unknown Mapillary split 'testing'"):
        mapillary_samples(root, "testing")
    write_rgb(root / "training" / "images" / "zzz.jpg")
    with pytest.raises(FileNotFoundError, match=r"label missing for .*training/images/zzz\.jpg"):
        mapillary_samples(root, "train")


def test_acdc_conditions(tmp_path):
    root = tmp_path / "acdc"
    for cond, seq in (("night", "GOPR0351"), ("fog", "GOPR0475")):
        write_rgb(root / "rgb_anon" / cond / "val" / seq / f"{seq}_frame_000001_rgb_anon.png")
        write_gray(root / "gt" / cond / "val" / seq / f"{seq}_frame_000001_gt_labelTrainIds.png", expect([2, 255]))
    samples = find_samples("acdc", root, "val")
    assert [(s.domain, s.label_format) for s in samples] == [("acdc/fog", "trainids"), ("acdc/night", "trainids")]
    assert np.array_equal(load_labels(samples[0]), expect([2, 255]))
    assert [s.domain for s in find_samples("acdc", root, "val", ["night"])] == ["acdc/night"]
    with pytest.raises(ValueError, match="unknown ACDC condition 'dusk'"):
        find_samples("acdc", root, "val", ["dusk"])


def test_synthia_16bit_labels(tmp_path):
    root = tmp_path / "RAND_CITYSCAPES"
    # void, sky, road, pedestrian, lanemarking, road-work, wall, bicycle
    class_ids, train_ids = grid([0, 1, 3, 10, 22, 14, 21, 11]), expect([255, 10, 0, 11, 255, 255, 3, 18])
    for name in ("0000000.png", "0000001.png"):
        write_rgb(root / "RGB" / name)
        write_synthia_label(root / "GT" / "LABELS" / name, class_ids, instance_ids=grid([0, 0, 0, 700]))
    # Independent of OpenCV's channel order: Pillow reads the PNG's channels in file order (high bytes).
    with Image.open(root / "GT" / "LABELS" / "0000000.png") as img:
        assert np.array_equal(np.array(img)[..., 0], (class_ids >> 8).astype(np.uint8))
        assert np.array_equal(np.array(img)[..., 1], (grid([0, 0, 0, 700]) >> 8).astype(np.uint8))
    samples = synthia_samples(root, "all")
    assert [s.image.name for s in samples] == ["0000000.png", "0000001.png"]
    assert {(s.domain, s.label_format) for s in samples} == {("synthia", "synthia")}
    rgb, labels = load_sample(samples[0])
    assert rgb.shape == (H, W, 3) and np.array_equal(labels, train_ids)

    (root / "val.txt").write_text("0000001\n")
    assert [s.image.name for s in find_samples("synthia", root, "val")] == ["0000001.png"]
    with pytest.raises(FileNotFoundError, match=r"SYNTHIA has no official 'train' split"):
        synthia_samples(root, "train")

    write_synthia_label(samples[1].label, grid([3, 23, 300]), grid([0]))
    with pytest.raises(ValueError, match=r"LABELS/0000001\.png holds ids \[23, 300\] outside the SYNTHIA class ids"):
        load_labels(samples[1])
    write_gray(samples[1].label, grid([3]))
    with pytest.raises(ValueError, match=r"0000001\.png must be a 3- or 4-channel SYNTHIA label PNG"):
        load_labels(samples[1])


# --- dispatch and failures ------------------------------------------------------------------------

def test_find_samples_dispatch_errors(tmp_path):
    assert LAYOUTS == ("cityscapes", "gtav", "bdd100k", "mapillary", "acdc", "synthia")
    with pytest.raises(ValueError, match="unknown dataset layout 'kitti'.*cityscapes, gtav, bdd100k, mapillary, acdc"):
        find_samples("kitti", tmp_path, "train")
    with pytest.raises(ValueError, match="apply to the acdc layout only"):
        find_samples("gtav", tmp_path, "all", ["night"])
    with pytest.raises(FileNotFoundError, match="no GTAV images"):
        find_samples("gtav", tmp_path, "all")


def test_file_failures_name_the_file(tmp_path):
    image = tmp_path / "img.png"
    write_rgb(image)
    label = tmp_path / "lab.png"
    with pytest.raises(FileNotFoundError, match=r"label file missing: .*lab\.png"):
        load_labels(Sample(image, label, "x"))
    with pytest.raises(FileNotFoundError, match=r"image file missing: .*nothing\.jpg"):
        read_rgb(tmp_path / "nothing.jpg")
    label.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"cannot read label .*lab\.png"):
        load_labels(Sample(image, label, "x", "cityscapes_ids"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg"):
        read_rgb(tmp_path / "broken.jpg")
    # A colour-coded label (e.g. a Cityscapes *_color.png) is not a label-id file.
    cv2.imwrite(str(label), np.zeros((H, W, 3), np.uint8))
    with pytest.raises(ValueError, match=r"lab\.png must be a single-channel or palettised 8-bit PNG, got mode RGB"):
        load_labels(Sample(image, label, "x"))
    with pytest.raises(ValueError, match="unknown label format 'colour'"):
        load_labels(Sample(image, label, "x", "colour"))
    small = tmp_path / "small.png"
    write_gray(small, np.zeros((H, W - 1), np.uint8))
    with pytest.raises(ValueError, match=r"image .*img\.png is 12×8 but its label .*small\.png is 11×8"):
        load_sample(Sample(image, small, "x"))
