"""Segmentation datasets read from their real on-disk layouts.

Every sample is (rgb uint8 H×W×3, labels uint8 H×W of Cityscapes trainIds,
255 = ignore). Each ``Sample`` names how its label file is decoded
(``label_format``); ``load_labels`` decodes and validates it: an id outside the
set the dataset defines is an error naming the file and the ids.

Layouts (``root`` is the folder the dataset unpacks to):

- cityscapes: leftImg8bit/<split>/<city>/*_leftImg8bit.png,
  gtFine/<split>/<city>/*_gtFine_labelTrainIds.png, else *_gtFine_labelIds.png.
- gtav: images/*.png, labels/*.png (Cityscapes label ids, palettised).
- bdd100k: images/10k/<split>/*.jpg, labels/sem_seg/masks/<split>/*.png (trainIds);
  or the older seg/images/<split>/*.jpg, seg/labels/<split>/*_train_id.png.
- mapillary: <split>/images/*.jpg, <split>/v1.2/labels/*.png (v1.2 class indices).
- acdc: rgb_anon/<cond>/<split>/<seq>/*_rgb_anon.png, gt/<cond>/<split>/<seq>/*_gt_labelTrainIds.png.
- synthia: RGB/*.png, GT/LABELS/*.png (16-bit, class id in the first channel).

GTAV and SYNTHIA have no official splits: split "all" takes every image,
any other split reads <root>/<split>.txt (one image file name or stem per line).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from dgss_perception.labels import IGNORE_INDEX

from . import label_maps as lm

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
LAYOUTS = ("cityscapes", "gtav", "bdd100k", "mapillary", "acdc", "synthia")
MAPILLARY_SPLITS = {"training": "training", "validation": "validation", "train": "training", "val": "validation"}
VALID_TRAIN_IDS = frozenset(range(lm.NUM_TRAIN_IDS)) | {IGNORE_INDEX}


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path
    domain: str  # e.g. "cityscapes" or "acdc/night"
    label_format: str = "trainids"  # a key of LABEL_FORMATS: how the label file is decoded


# --- reading files --------------------------------------------------------------------------------

def read_rgb(path: Path) -> np.ndarray:
    """An image file → rgb uint8 H×W×3; a missing or unreadable file is an error naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file missing: {path}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_index_png(path: Path) -> np.ndarray:
    """The stored values of a single-channel or palettised 8-bit label PNG, uint8 H×W.

    Pillow, not OpenCV: OpenCV expands a palettised PNG to its colours, losing the
    indices, which are the class ids (GTAV, Mapillary).
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise ValueError(f"label {path} must be a single-channel or palettised 8-bit PNG, got mode {img.mode}")
            return np.array(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file missing: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # Pillow reports some corrupt PNGs as SyntaxError
        raise ValueError(f"cannot read label {path}: {exc}") from exc


def read_train_ids(path: Path) -> np.ndarray:
    """A trainId label PNG → uint8 H×W; ids outside 0–18 and 255 are an error naming the file."""
    return lm.apply_lut(read_index_png(path), lm.TRAIN_ID_LUT, path, lm.TRAIN_ID_WHAT)


def read_cityscapes_ids(path: Path) -> np.ndarray:
    """A Cityscapes label-id PNG (gtFine labelIds, GTAV labels) → trainIds; ids above 33 are an error."""
    return lm.apply_lut(read_index_png(path), lm.CITYSCAPES_ID_LUT, path, lm.CITYSCAPES_ID_WHAT)


def read_mapillary_v12(path: Path) -> np.ndarray:
    """A Mapillary Vistas v1.2 label PNG (class indices 0–65) → trainIds."""
    return lm.apply_lut(read_index_png(path), lm.MAPILLARY_V12_LUT, path, lm.MAPILLARY_V12_WHAT)


def read_synthia(path: Path) -> np.ndarray:
    """A SYNTHIA-RAND-CITYSCAPES GT/LABELS PNG → trainIds.

    The 16-bit PNG stores the class id in its first channel and the instance id in
    the second (the dataset's README). OpenCV returns channels reversed (BGR or
    BGRA), so the class channel is index 2 — the channel DAFormer's converter reads
    as ``[:, :, -1]`` and imageio-based loaders as ``[:, :, 0]``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"label file missing: {path}")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError(f"cannot read label {path}")
    if raw.ndim != 3 or raw.shape[2] not in (3, 4):
        raise ValueError(f"label {path} must be a 3- or 4-channel SYNTHIA label PNG, got shape {raw.shape}")
    return lm.apply_lut(raw[:, :, 2], lm.SYNTHIA_LUT, path, lm.SYNTHIA_WHAT)


LABEL_FORMATS: dict[str, Callable[[Path], np.ndarray]] = {
    "trainids": read_train_ids,
    "cityscapes_ids": read_cityscapes_ids,
    "mapillary_v1.2": read_mapillary_v12,
    "synthia": read_synthia,
}


def load_labels(sample: Sample) -> np.ndarray:
    """A sample's label file decoded by its ``label_format`` → uint8 H×W trainIds (255 = ignore)."""
    reader = LABEL_FORMATS.get(sample.label_format)
    if reader is None:
        raise ValueError(f"unknown label format {sample.label_format!r} for {sample.label} "
                         f"(known: {', '.join(LABEL_FORMATS)})")
    return reader(sample.label)


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(rgb uint8 H×W×3, trainIds uint8 H×W); an image and label of different sizes are an error naming both."""
    rgb = read_rgb(sample.image)
    labels = load_labels(sample)
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"image {sample.image} is {rgb.shape[1]}×{rgb.shape[0]} but its label {sample.label} "
                         f"is {labels.shape[1]}×{labels.shape[0]}")
    return rgb, labels


# --- layouts --------------------------------------------------------------------------------------

def _require_label(image: Path, label: Path) -> Path:
    if not label.is_file():
        raise FileNotFoundError(f"label missing for {image}: expected {label}")
    return label


def _split_images(root: Path, image_dir: Path, split: str, suffix: str, dataset: str) -> list[Path]:
    """Images of a dataset without official splits: every image for "all", else those <root>/<split>.txt names."""
    if split == "all":
        images = sorted(image_dir.glob(f"*{suffix}"))
        if not images:
            raise FileNotFoundError(f"no {dataset} images (*{suffix}) under {image_dir}")
        return images
    split_file = root / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"{dataset} has no official {split!r} split: expected a split file {split_file} "
                                f"(one image name per line), or use split 'all'")
    images, missing = [], []
    for line in split_file.read_text().splitlines():
        name = Path(line.strip()).name  # tolerate "images/00001.png" as well as "00001.png" or "00001"
        if not name:
            continue
        image = image_dir / (name if name.endswith(suffix) else name + suffix)
        (images if image.is_file() else missing).append(image)
    if missing:
        raise FileNotFoundError(f"split file {split_file} names {len(missing)} images that do not exist, "
                                f"e.g. {missing[0]}")
    if not images:
        raise FileNotFoundError(f"split file {split_file} names no images")
    return list(dict.fromkeys(images))


def cityscapes_samples(root: str | Path, split: str) -> list[Sample]:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/<split>/<city>/*_gtFine_labelTrainIds.png.

    Where a frame has no labelTrainIds file (createTrainIdLabelImgs not run), its
    *_gtFine_labelIds.png is used and mapped with the cityscapesscripts table.
    """
    root = Path(root)
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(f"no Cityscapes images under {root / 'leftImg8bit' / split}")
    samples = []
    for img in images:
        stem = img.name[: -len("_leftImg8bit.png")]
        gt = root / "gtFine" / split / img.parent.name
        train_ids, label_ids = gt / f"{stem}_gtFine_labelTrainIds.png", gt / f"{stem}_gtFine_labelIds.png"
        if train_ids.is_file():
            samples.append(Sample(img, train_ids, "cityscapes", "trainids"))
        elif label_ids.is_file():
            samples.append(Sample(img, label_ids, "cityscapes", "cityscapes_ids"))
        else:
            raise FileNotFoundError(f"label missing for {img}: expected {train_ids} or {label_ids}")
    return samples


def gtav_samples(root: str | Path, split: str = "all") -> list[Sample]:
    """images/*.png with labels/<same name> holding Cityscapes label ids; split "all" or <root>/<split>.txt."""
    root = Path(root)
    return [Sample(img, _require_label(img, root / "labels" / img.name), "gtav", "cityscapes_ids")
            for img in _split_images(root, root / "images", split, ".png", "GTAV")]


def bdd100k_samples(root: str | Path, split: str) -> list[Sample]:
    """BDD100K 10K semantic segmentation: images/10k/<split>/*.jpg with labels/sem_seg/masks/<split>/*.png.

    Falls back to the older release, seg/images/<split>/*.jpg with
    seg/labels/<split>/<stem>_train_id.png. Both hold trainIds already.
    """
    root = Path(root)
    new_images = root / "images" / "10k" / split
    if new_images.is_dir():
        masks = root / "labels" / "sem_seg" / "masks" / split
        images = sorted(new_images.glob("*.jpg"))

        def label_of(img: Path) -> Path:
            return masks / f"{img.stem}.png"
    else:
        old_labels = root / "seg" / "labels" / split
        images = sorted((root / "seg" / "images" / split).glob("*.jpg"))

        def label_of(img: Path) -> Path:
            return old_labels / f"{img.stem}_train_id.png"
    if not images:
        raise FileNotFoundError(f"no BDD100K images under {new_images} or {root / 'seg' / 'images' / split}")
    # Early 10K image archives held a few frames without masks (bdd100k/bdd100k#103); the current archive does not.
    return [Sample(img, _require_label(img, label_of(img)), "bdd100k", "trainids") for img in images]


def mapillary_samples(root: str | Path, split: str) -> list[Sample]:
    """Mapillary Vistas v1.2: <split>/images/*.jpg with <split>/v1.2/labels/*.png.

    Splits are training and validation (train and val are accepted for them); the
    testing split has no labels.
    """
    if split not in MAPILLARY_SPLITS:
        raise ValueError(f"unknown Mapillary split {split!r} (known: {', '.join(MAPILLARY_SPLITS)})")
    base = Path(root) / MAPILLARY_SPLITS[split]
    images = sorted((base / "images").glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no Mapillary images under {base / 'images'}")
    labels = base / "v1.2" / "labels"
    return [Sample(img, _require_label(img, labels / f"{img.stem}.png"), "mapillary", "mapillary_v1.2")
            for img in images]


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
            samples.append(Sample(img, _require_label(img, label), f"acdc/{cond}", "trainids"))
    if not samples:
        raise FileNotFoundError(f"no ACDC images for {list(conditions)} under {root / 'rgb_anon'}")
    return samples


def synthia_samples(root: str | Path, split: str = "all") -> list[Sample]:
    """SYNTHIA-RAND-CITYSCAPES: RGB/*.png with GT/LABELS/<same name>; split "all" or <root>/<split>.txt."""
    root = Path(root)
    return [Sample(img, _require_label(img, root / "GT" / "LABELS" / img.name), "synthia", "synthia")
            for img in _split_images(root, root / "RGB", split, ".png", "SYNTHIA")]


def find_samples(layout: str, root: str | Path, split: str, conditions: list[str] | None = None) -> list[Sample]:
    """The samples of ``layout`` (one of LAYOUTS) under ``root``; ``conditions`` selects ACDC conditions only."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if layout == "acdc":
        return acdc_samples(root, split, conditions or ACDC_CONDITIONS)
    if conditions:
        raise ValueError(f"conditions {conditions} apply to the acdc layout only, not {layout!r}")
    readers: dict[str, Callable[[str | Path, str], list[Sample]]] = {
        "cityscapes": cityscapes_samples, "gtav": gtav_samples, "bdd100k": bdd100k_samples,
        "mapillary": mapillary_samples, "synthia": synthia_samples,
    }
    return readers[layout](root, split)
