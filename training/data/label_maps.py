"""Label tables of the source datasets and their mapping to the 19 Cityscapes trainIds.

Each table is written as a readable dict and turned into a lookup table (LUT): an int16
array indexed by the raw pixel value, holding the trainId (0–18), 255 for ids that are
valid in the dataset but not among the 19 classes, and ``INVALID`` (-1) for values the
dataset never uses. ``apply_lut`` maps a raw label image and reports invalid values
with the file they came from, so a wrongly decoded or foreign label file fails loudly
instead of training on garbage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from dgss_perception.labels import CITYSCAPES_CLASSES, IGNORE_INDEX

INVALID = -1
NUM_TRAIN_IDS = len(CITYSCAPES_CLASSES)


def build_lut(id_to_train_id: Mapping[int, int], valid_ids: Iterable[int], size: int = 256) -> np.ndarray:
    """A read-only int16 LUT of ``size`` entries: mapped ids → trainId, other valid ids → 255, the rest INVALID."""
    valid = set(valid_ids)
    if any(not 0 <= i < size for i in valid):
        raise ValueError(f"valid ids must lie in [0, {size}), got {sorted(valid)}")
    lut = np.full(size, INVALID, dtype=np.int16)
    lut[sorted(valid)] = IGNORE_INDEX
    for raw, train_id in id_to_train_id.items():
        if raw not in valid:
            raise ValueError(f"id {raw} is mapped but not among the valid ids")
        if not (0 <= train_id < NUM_TRAIN_IDS or train_id == IGNORE_INDEX):
            raise ValueError(f"id {raw} maps to {train_id}, not a trainId (0–{NUM_TRAIN_IDS - 1} or 255)")
        lut[raw] = train_id
    lut.setflags(write=False)
    return lut


def ids_by_name(names: tuple[str, ...], to_cityscapes: Mapping[str, str]) -> dict[int, int]:
    """{dataset id: trainId} from a name → Cityscapes class name table; unknown names are an error."""
    unknown = sorted(set(to_cityscapes) - set(names))
    if unknown:
        raise ValueError(f"names {unknown} are not among the dataset's classes")
    bad = sorted(set(to_cityscapes.values()) - set(CITYSCAPES_CLASSES))
    if bad:
        raise ValueError(f"names {bad} are not Cityscapes train classes")
    return {names.index(src): CITYSCAPES_CLASSES.index(dst) for src, dst in to_cityscapes.items()}


def apply_lut(raw: np.ndarray, lut: np.ndarray, path: str | Path, what: str) -> np.ndarray:
    """Raw label ids (uint8 or uint16 H×W) → uint8 trainIds; ids the LUT marks invalid are a ValueError.

    Args:
        raw: the label image as stored.
        lut: a table from ``build_lut``.
        path: the file the labels came from, named in the error.
        what: the valid set in words, e.g. "the Cityscapes label ids 0–33".
    """
    if raw.dtype not in (np.uint8, np.uint16) or raw.ndim != 2:
        raise ValueError(f"label {path}: expected 8- or 16-bit H×W ids, got {raw.dtype} {raw.shape}")
    if raw.size and int(raw.max()) >= len(lut):
        # Beyond the table: report them all together with any in-table invalid ids.
        values = np.unique(raw)
        bad = [int(v) for v in values if v >= len(lut) or lut[v] == INVALID]
        raise ValueError(f"label {path} holds ids {_short(bad)} outside {what}")
    mapped = lut[raw]
    invalid = mapped == INVALID
    if invalid.any():
        raise ValueError(f"label {path} holds ids {_short(np.unique(raw[invalid]).tolist())} outside {what}")
    return mapped.astype(np.uint8)


def _short(ids: list[int]) -> str:
    return str(ids[:10]) + (f" ({len(ids)} in all)" if len(ids) > 10 else "")


# --- trainIds (Cityscapes *_labelTrainIds.png, ACDC, BDD100K masks) -------------------------------

TRAIN_ID_LUT = build_lut({i: i for i in range(NUM_TRAIN_IDS)}, [*range(NUM_TRAIN_IDS), IGNORE_INDEX])
TRAIN_ID_WHAT = "the 19 trainIds and 255"

# --- Cityscapes label ids (gtFine *_labelIds.png; GTAV labels use the same ids) -------------------

# Names of the label ids 0–33, in id order, as in cityscapesscripts/helpers/labels.py. "license plate" (id -1) is
# left out: json2labelImg skips negative ids, so it never appears in a labelIds PNG.
CITYSCAPES_ID_NAMES: tuple[str, ...] = (
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic", "ground",
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
    "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
# The 19 evaluated classes keep their names as trainId classes; every other id (parking, guard rail, caravan, …)
# has trainId 255 in labels.py. This yields 7→0, 8→1, 11→2, 12→3, 13→4, 17→5, 19→6, 20→7, 21→8, 22→9, 23→10,
# 24→11, 25→12, 26→13, 27→14, 28→15, 31→16, 32→17, 33→18.
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = ids_by_name(
    CITYSCAPES_ID_NAMES, {name: name for name in CITYSCAPES_ID_NAMES if name in CITYSCAPES_CLASSES})
CITYSCAPES_ID_LUT = build_lut(CITYSCAPES_ID_TO_TRAIN_ID, range(len(CITYSCAPES_ID_NAMES)))
CITYSCAPES_ID_WHAT = "the Cityscapes label ids 0–33"

# --- Mapillary Vistas v1.2 ------------------------------------------------------------------------

# The 66 v1.2 classes in the order of config_v1.2.json["labels"]; a label PNG's pixel value is the index here.
MAPILLARY_V12_CLASSES: tuple[str, ...] = (
    "animal--bird", "animal--ground-animal",
    "construction--barrier--curb", "construction--barrier--fence", "construction--barrier--guard-rail",
    "construction--barrier--other-barrier", "construction--barrier--wall",
    "construction--flat--bike-lane", "construction--flat--crosswalk-plain", "construction--flat--curb-cut",
    "construction--flat--parking", "construction--flat--pedestrian-area", "construction--flat--rail-track",
    "construction--flat--road", "construction--flat--service-lane", "construction--flat--sidewalk",
    "construction--structure--bridge", "construction--structure--building", "construction--structure--tunnel",
    "human--person", "human--rider--bicyclist", "human--rider--motorcyclist", "human--rider--other-rider",
    "marking--crosswalk-zebra", "marking--general",
    "nature--mountain", "nature--sand", "nature--sky", "nature--snow", "nature--terrain", "nature--vegetation",
    "nature--water",
    "object--banner", "object--bench", "object--bike-rack", "object--billboard", "object--catch-basin",
    "object--cctv-camera", "object--fire-hydrant", "object--junction-box", "object--mailbox", "object--manhole",
    "object--phone-booth", "object--pothole", "object--street-light", "object--support--pole",
    "object--support--traffic-sign-frame", "object--support--utility-pole", "object--traffic-light",
    "object--traffic-sign--back", "object--traffic-sign--front", "object--trash-can",
    "object--vehicle--bicycle", "object--vehicle--boat", "object--vehicle--bus", "object--vehicle--car",
    "object--vehicle--caravan", "object--vehicle--motorcycle", "object--vehicle--on-rails",
    "object--vehicle--other-vehicle", "object--vehicle--trailer", "object--vehicle--truck",
    "object--vehicle--wheeled-slow",
    "void--car-mount", "void--ego-vehicle", "void--unlabeled",
)
# Vistas class → Cityscapes class; every class not listed becomes 255. Cityscapes counts markings, bike lanes and
# parking spaces on the carriageway as road, and curbs and pedestrian areas as sidewalk; rail track is its own
# (ignored) Cityscapes class, so it stays 255.
# This is the conversion the DGSS benchmarks use (openseg.pytorch's Mapillary generator, reused by Rein's
# tools/convert_datasets/mapillary2cityscape.py), sign frames included, so Mapillary scores compare with the
# published ones. HRDA/MIC's converter is narrower: road ← road, marking--general, manhole only;
# sidewalk ← curb, sidewalk; pole ← pole, utility pole; traffic sign ← front only.
MAPILLARY_V12_TO_CITYSCAPES: dict[str, str] = {
    "construction--flat--road": "road",
    "construction--flat--bike-lane": "road",
    "construction--flat--crosswalk-plain": "road",
    "construction--flat--parking": "road",
    "construction--flat--service-lane": "road",
    "marking--crosswalk-zebra": "road",
    "marking--general": "road",
    "construction--flat--sidewalk": "sidewalk",
    "construction--barrier--curb": "sidewalk",
    "construction--flat--curb-cut": "sidewalk",
    "construction--flat--pedestrian-area": "sidewalk",
    "construction--structure--building": "building",
    "construction--barrier--wall": "wall",
    "construction--barrier--fence": "fence",
    "object--support--pole": "pole",
    "object--support--utility-pole": "pole",
    "object--street-light": "pole",
    "object--traffic-light": "traffic light",
    "object--traffic-sign--front": "traffic sign",
    "object--traffic-sign--back": "traffic sign",
    "object--support--traffic-sign-frame": "traffic sign",
    "nature--vegetation": "vegetation",
    "nature--terrain": "terrain",
    "nature--sky": "sky",
    "human--person": "person",
    "human--rider--bicyclist": "rider",
    "human--rider--motorcyclist": "rider",
    "human--rider--other-rider": "rider",
    "object--vehicle--car": "car",
    "object--vehicle--truck": "truck",
    "object--vehicle--bus": "bus",
    "object--vehicle--on-rails": "train",
    "object--vehicle--motorcycle": "motorcycle",
    "object--vehicle--bicycle": "bicycle",
}
MAPILLARY_V12_ID_TO_TRAIN_ID: dict[int, int] = ids_by_name(MAPILLARY_V12_CLASSES, MAPILLARY_V12_TO_CITYSCAPES)
MAPILLARY_V12_LUT = build_lut(MAPILLARY_V12_ID_TO_TRAIN_ID, range(len(MAPILLARY_V12_CLASSES)))
MAPILLARY_V12_WHAT = "the Mapillary Vistas v1.2 class indices 0–65"

# --- SYNTHIA-RAND-CITYSCAPES ----------------------------------------------------------------------

# Class ids 0–22 from the dataset's README, in id order. Parking-slot, road-work and lanemarking have no Cityscapes
# train class; terrain, truck and train are defined but never occur in the images.
SYNTHIA_CLASSES: tuple[str, ...] = (
    "void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car", "traffic sign",
    "pedestrian", "bicycle", "motorcycle", "parking-slot", "road-work", "traffic light", "terrain", "rider",
    "truck", "bus", "train", "wall", "lanemarking",
)
# Same table as DAFormer's tools/convert_datasets/synthia.py (3→0, 4→1, 2→2, 21→3, 5→4, 7→5, 15→6, 9→7, 6→8,
# 16→9, 1→10, 10→11, 17→12, 8→13, 18→14, 19→15, 20→16, 12→17, 11→18), the one the SYNTHIA→Cityscapes
# benchmarks use; lanemarking stays 255 there too.
SYNTHIA_TO_CITYSCAPES: dict[str, str] = {
    "road": "road", "sidewalk": "sidewalk", "building": "building", "wall": "wall", "fence": "fence",
    "pole": "pole", "traffic light": "traffic light", "traffic sign": "traffic sign", "vegetation": "vegetation",
    "terrain": "terrain", "sky": "sky", "pedestrian": "person", "rider": "rider", "car": "car", "truck": "truck",
    "bus": "bus", "train": "train", "motorcycle": "motorcycle", "bicycle": "bicycle",
}
SYNTHIA_ID_TO_TRAIN_ID: dict[int, int] = ids_by_name(SYNTHIA_CLASSES, SYNTHIA_TO_CITYSCAPES)
# 16-bit label PNGs: the table spans every uint16 value so any stored value indexes it.
SYNTHIA_LUT = build_lut(SYNTHIA_ID_TO_TRAIN_ID, range(len(SYNTHIA_CLASSES)), size=65536)
SYNTHIA_WHAT = "the SYNTHIA class ids 0–22"
