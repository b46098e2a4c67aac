"""Offline segmentation of rosbag2 bags (sqlite3 or mcap), without rclpy.

:func:`process_bag` reads a bag read-only and writes a new one that holds every
input message unchanged (topic, type, bag timestamp and serialized bytes) plus
one label topic per image topic (``sensor_msgs/msg/Image`` and
``sensor_msgs/msg/CompressedImage``). Topics named as labels (``…/labels``,
``…/labels/compressed``) are not segmented unless selected by name.

Label topic naming rule: take the image topic, remove one trailing
``/compressed``, then append ``/labels``::

    /cam/image_raw             -> /cam/image_raw/labels
    /cam/image_raw/compressed  -> /cam/image_raw/labels

A label message is a mono8 ``sensor_msgs/msg/Image`` of Cityscapes trainIds
(255 = ignore) at the input frame's resolution, carrying the input message's
header unchanged, written at the input message's bag timestamp. With
``labels="compressed"`` or ``"both"`` the same labels go (instead or also) to
``<label topic>/compressed`` as a ``sensor_msgs/msg/CompressedImage``: lossless
PNG, format "mono8; png compressed mono8" (:mod:`dgss_perception.label_codec`),
about 1/200 of the raw size. A label topic that already exists in the bag, or
two image topics that map to the same label topic, is an error raised before
anything is written.

Evaluation against ground truth (``gt_topics``): a ground-truth topic holds mono8
``sensor_msgs/msg/Image`` trainIds (255 = ignore), or the same as mono8 PNG
``sensor_msgs/msg/CompressedImage`` (compressed labels). It is copied like any other
topic but never segmented. A segmented frame is paired with the ground-truth
message of the same header stamp (exact match, in whatever order the two were
recorded); frames without one count as unmatched, ground truth of another size
or encoding as mismatched, and the confusion matrix, mIoU, per-class IoU and
pixel accuracy are reported per image topic (:meth:`BagReport.evaluation_dict`).
Only frames whose stamp occurs on the ground-truth topic are held in memory
until their partner arrives; a ground-truth message waits for its frame the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rosbags.interfaces import Connection, ConnectionExtRosbag2, MessageDefinitionFormat
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer, WriterError
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm
import yaml

from .codec import FrameError, compressed_to_rgb, encode_image_fields, encode_jpeg, image_to_rgb
from .engine import BACKENDS, device_arg, resize_labels
from .label_codec import LABELS_FORMAT, announces_labels, compressed_labels_to_array, encode_labels_png
from .labels import CITYSCAPES_CLASSES, IGNORE_INDEX
from .metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

if TYPE_CHECKING:
    from rosbags.typesys.store import Typestore

    from .engine import Segmenter

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
STORAGES = ("sqlite3", "mcap")
LABEL_SUFFIX = "/labels"
COMPRESSED_SUFFIX = "/compressed"
# Which label topics a bag gets: mono8 Image, PNG CompressedImage, or both.
LABEL_MODES = ("raw", "compressed", "both")

# Metadata version 8 keeps QoS profiles as the integer-enum YAML string that
# Humble's rosbag2 parses; version 9 (string enums) is only read by newer releases.
BAG_VERSION = 8

# How many per-frame failure reasons a report keeps (the counts are always complete).
MAX_ERRORS_KEPT = 50

# Ground-truth label encodings: one byte per pixel holding a trainId.
GT_ENCODINGS = ("mono8", "8uc1")
EVAL_COUNTS = ("frames", "matched", "unmatched", "mismatched", "gt_unused")


def _typestore() -> Typestore:
    # Humble is the oldest distribution supported. Image, CompressedImage,
    # Header and Time are identical (same definitions, same RIHS01 hashes) in
    # the Humble, Jazzy and Kilted stores, so what is written here reads the
    # same on all three; the Humble store just makes that the floor.
    return get_typestore(Stores.ROS2_HUMBLE)


class BagError(ValueError):
    """A bag that cannot be processed as asked; the message says why."""


def _json_float(value: float) -> float | None:
    """NaN (an undefined score) as JSON null."""
    value = float(value)
    return value if np.isfinite(value) else None


def metrics_dict(conf: np.ndarray, classes: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """mIoU, pixel accuracy, labelled pixels, IoU per class name and the confusion matrix (rows: ground truth).

    Scores are fractions in [0, 1]; a class absent from both ground truth and prediction has IoU
    None and is left out of the mean (as :func:`dgss_perception.metrics.mean_iou`).
    """
    ious = iou_per_class(conf)
    return {"miou": _json_float(mean_iou(conf)), "pixel_accuracy": _json_float(pixel_accuracy(conf)),
            "pixels": int(conf.sum()), "iou": {name: _json_float(v) for name, v in zip(classes, ious)},
            "confusion": np.asarray(conf, dtype=np.int64).tolist()}


@dataclass
class TopicEvaluation:
    """Ground-truth evaluation of one image topic's labels."""

    gt_topic: str
    confusion: np.ndarray
    matched: int = 0  # frames compared with their ground truth
    unmatched: int = 0  # segmented frames without a ground-truth message of the same stamp
    mismatched: int = 0  # frames whose ground truth could not be compared (other size, not mono8, malformed)
    gt_unused: int = 0  # ground-truth messages no segmented frame took (no such frame, or unreadable)
    issues: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return self.matched + self.unmatched + self.mismatched

    def note(self, text: str) -> None:
        if len(self.issues) < MAX_ERRORS_KEPT:
            self.issues.append(text)

    def counts(self) -> dict[str, int]:
        return {"frames": self.frames, "matched": self.matched, "unmatched": self.unmatched,
                "mismatched": self.mismatched, "gt_unused": self.gt_unused}


@dataclass
class BagReport:
    """What :func:`process_bag` did."""

    output_path: Path
    storage: str
    messages_copied: int = 0
    label_topics: dict[str, str] = field(default_factory=dict)
    frames_segmented: dict[str, int] = field(default_factory=dict)
    frames_failed: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    evaluation: dict[str, TopicEvaluation] = field(default_factory=dict)  # image topic → its ground-truth scores
    classes: tuple[str, ...] = CITYSCAPES_CLASSES
    labels: str = "raw"  # which label topics were written: raw, compressed or both (see label_outputs)

    @property
    def total_segmented(self) -> int:
        return sum(self.frames_segmented.values())

    @property
    def total_failed(self) -> int:
        return sum(self.frames_failed.values())

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"wrote {self.output_path} ({self.storage}): {self.messages_copied} messages copied"]
        for image_topic, label_topic in self.label_topics.items():
            written = " + ".join(t for t, _ in label_outputs(label_topic, self.labels))
            lines.append(f"  {image_topic} -> {written}: {self.frames_segmented.get(image_topic, 0)} segmented, "
                         f"{self.frames_failed.get(image_topic, 0)} failed")
        lines.extend(f"  skipped: {e}" for e in self.errors[:5])
        if len(self.errors) > 5:
            lines.append(f"  ... and {self.total_failed - 5} more skipped frames")
        for image_topic, ev in self.evaluation.items():
            lines.append(f"  eval {image_topic} vs {ev.gt_topic}: {self._scores(ev.confusion)} over {ev.matched} "
                         f"matched frames ({ev.unmatched} without ground truth, {ev.mismatched} mismatched, "
                         f"{ev.gt_unused} ground-truth messages unused)")
            lines.extend(f"    {issue}" for issue in ev.issues[:3])
        if len(self.evaluation) > 1:
            lines.append(f"  eval overall: {self._scores(self._overall())}")
        return "\n".join(lines)

    @staticmethod
    def _scores(conf: np.ndarray) -> str:
        miou, acc = mean_iou(conf), pixel_accuracy(conf)
        return (f"mIoU {100 * miou:.2f} %" if np.isfinite(miou) else "mIoU n/a") + (
            f", pixel accuracy {100 * acc:.2f} %" if np.isfinite(acc) else "")

    def _overall(self) -> np.ndarray:
        return sum((ev.confusion for ev in self.evaluation.values()),
                   np.zeros((len(self.classes),) * 2, dtype=np.int64))

    def evaluation_dict(self) -> dict[str, Any] | None:
        """The ground-truth evaluation as JSON-ready data (None when no ground truth was given)."""
        if not self.evaluation:
            return None
        topics = {topic: {"gt_topic": ev.gt_topic, **ev.counts(), **metrics_dict(ev.confusion, self.classes),
                          "issues": list(ev.issues)}
                  for topic, ev in self.evaluation.items()}
        totals = {k: sum(ev.counts()[k] for ev in self.evaluation.values()) for k in EVAL_COUNTS}
        return {"output": str(self.output_path), "classes": list(self.classes), "ignore_index": IGNORE_INDEX,
                "topics": topics, "overall": {**totals, **metrics_dict(self._overall(), self.classes)}}


def label_topic_for(image_topic: str) -> str:
    """The label topic for an image topic (see the module docstring)."""
    base = image_topic[: -len("/compressed")] if image_topic.endswith("/compressed") else image_topic
    return base + LABEL_SUFFIX


def label_outputs(label_topic: str, labels: str = "raw") -> list[tuple[str, str]]:
    """(topic, message type) written for one label topic: the mono8 Image and/or its PNG CompressedImage."""
    if labels not in LABEL_MODES:
        raise BagError(f"labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    raw = [(label_topic, IMAGE_TYPE)] if labels in ("raw", "both") else []
    return raw + ([(label_topic + COMPRESSED_SUFFIX, COMPRESSED_TYPE)] if labels != "raw" else [])


def is_label_topic(topic: str) -> bool:
    """Whether a topic is named as label output: ``…/labels`` or ``…/labels/compressed``."""
    return topic.endswith(LABEL_SUFFIX) or topic.endswith(LABEL_SUFFIX + COMPRESSED_SUFFIX)


def plan_label_topics(topic_types: dict[str, str], topics: list[str] | None = None,
                      labels: str = "raw") -> dict[str, str]:
    """Image topic → label topic for a bag's ``{topic: type}``; BagError on a bad selection or a collision.

    ``labels`` (raw, compressed, both) says which topics each label topic stands for (:func:`label_outputs`);
    none of them may exist in the bag.
    """
    # Label topics (of an earlier run, or recorded from the node) are outputs, not cameras: left out unless named.
    images = sorted(t for t, typ in topic_types.items() if typ in IMAGE_TYPES and not is_label_topic(t))
    if topics is not None:
        for topic in topics:
            if topic not in topic_types:
                raise BagError(f"topic {topic} is not in the bag (image topics: {', '.join(images) or 'none'})")
            if topic_types[topic] not in IMAGE_TYPES:
                raise BagError(f"topic {topic} has type {topic_types[topic]}, not an image type "
                               f"({' or '.join(IMAGE_TYPES)})")
        images = list(dict.fromkeys(topics))
    plan: dict[str, str] = {}
    owners: dict[str, str] = {}
    for topic in images:
        label = label_topic_for(topic)
        for written, _ in label_outputs(label, labels):
            if written in topic_types:
                raise BagError(f"label topic {written} for {topic} already exists in the bag "
                               f"(select other image topics with --topics)")
        if label in owners:
            raise BagError(f"image topics {owners[label]} and {topic} would both write label topic {label}; "
                           f"select one of them with --topics")
        owners[label] = topic
        plan[topic] = label
    return plan


def plan_ground_truth(topic_types: dict[str, str], topics: list[str] | None,
                      gt_topics: str | Mapping[str, str] | None,
                      labels: str = "raw") -> tuple[dict[str, str], dict[str, str]]:
    """(image topic → label topic, image topic → ground-truth topic) for a bag's ``{topic: type}``.

    ``gt_topics`` is one ground-truth topic (for a bag with exactly one image topic to segment)
    or image topic → ground-truth topic pairs. Ground-truth topics are never segmented. ``labels``:
    which label topics are written (:func:`label_outputs`).

    Raises:
        BagError: a ground-truth topic missing or not an Image or CompressedImage, one paired twice, also selected as
            an image topic, or a pairing that does not name a segmented image topic.
    """
    if not gt_topics:
        return plan_label_topics(topic_types, topics, labels), {}
    named = [gt_topics] if isinstance(gt_topics, str) else list(gt_topics.values())
    for gt in named:
        if gt not in topic_types:
            raise BagError(f"ground-truth topic {gt} is not in the bag")
        if topic_types[gt] not in IMAGE_TYPES:
            raise BagError(f"ground-truth topic {gt} has type {topic_types[gt]}, not {IMAGE_TYPE} (mono8 trainIds) "
                           f"or {COMPRESSED_TYPE} (mono8 PNG)")
        if named.count(gt) > 1:
            raise BagError(f"ground-truth topic {gt} is paired with several image topics")
        if topics and gt in topics:
            raise BagError(f"topic {gt} is selected as an image topic (--topics) and given as ground truth")
    # Ground-truth topics are images too, but references rather than inputs: left out of the default selection.
    plan = plan_label_topics({t: typ for t, typ in topic_types.items() if t not in named}, topics, labels)
    for image_topic, label_topic in plan.items():
        for written, _ in label_outputs(label_topic, labels):
            if written in topic_types:
                raise BagError(f"label topic {written} for {image_topic} already exists in the bag")
    if isinstance(gt_topics, str):
        if len(plan) != 1:
            raise BagError(f"ground-truth topic {gt_topics} without an image topic needs exactly one image topic "
                           f"to segment, found {len(plan)} ({', '.join(plan) or 'none'}); give IMAGE_TOPIC=GT_TOPIC "
                           f"pairs or select one image topic with --topics")
        return plan, {next(iter(plan)): gt_topics}
    for image_topic, gt in gt_topics.items():
        if image_topic not in plan:
            raise BagError(f"image topic {image_topic} (paired with ground truth {gt}) is not among the segmented "
                           f"image topics ({', '.join(plan) or 'none'})")
    return plan, dict(gt_topics)


def parse_gt_topics(values: list[str]) -> str | dict[str, str]:
    """Command-line ground-truth topics: one ``GT_TOPIC``, or ``IMAGE_TOPIC=GT_TOPIC`` pairs."""
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    pairs: dict[str, str] = {}
    for value in values:
        image_topic, sep, gt = value.partition("=")
        if not sep or not image_topic or not gt:
            raise BagError(f"--gt-topic {value!r}: with several ground-truth topics each must be IMAGE_TOPIC=GT_TOPIC")
        if image_topic in pairs:
            raise BagError(f"--gt-topic names image topic {image_topic} twice")
        pairs[image_topic] = gt
    return pairs


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _stamp_text(stamp_ns: int) -> str:
    return f"{stamp_ns // 1_000_000_000}.{stamp_ns % 1_000_000_000:09d}"


def _decode_gt(typestore: Typestore, raw: bytes | memoryview,
               msgtype: str = IMAGE_TYPE) -> tuple[int | None, np.ndarray | str]:
    """(header stamp in ns or None if unreadable, trainIds H×W or the reason they are unusable)."""
    try:
        msg = typestore.deserialize_cdr(raw, msgtype)
    except Exception as exc:  # truncated or corrupt CDR surfaces as assorted struct/index errors
        return None, f"cannot deserialize: {exc}"
    stamp = _stamp_ns(msg.header)
    if msgtype == COMPRESSED_TYPE:
        try:
            return stamp, compressed_labels_to_array(msg)
        except FrameError as exc:
            return stamp, str(exc)
    if str(msg.encoding).lower() not in GT_ENCODINGS:
        return stamp, f"encoding {msg.encoding!r}, expected mono8 trainIds"
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if step < w or len(msg.data) < h * step:
        return stamp, f"malformed mono8 image ({w}x{h}, step {step}, {len(msg.data)} bytes)"
    return stamp, np.asarray(msg.data, dtype=np.uint8)[: h * step].reshape(h, step)[:, :w].copy()


class _GroundTruthMatcher:
    """Pairs segmented frames with ground-truth messages of the same header stamp, in either order."""

    def __init__(self, gt_of: dict[str, str], expected: dict[str, Counter[int]], classes: tuple[str, ...],
                 evaluation: dict[str, TopicEvaluation]) -> None:
        self.image_of = {gt: image for image, gt in gt_of.items()}
        self.expected = expected  # ground-truth topic → stamps still to come (from a first pass)
        self.num_classes = len(classes)
        self.evaluation = evaluation
        for image, gt in gt_of.items():
            evaluation[image] = TopicEvaluation(gt, np.zeros((self.num_classes,) * 2, dtype=np.int64))
        self.frames: dict[tuple[str, int], deque[np.ndarray]] = {}
        self.truths: dict[tuple[str, int], deque[np.ndarray | str]] = {}

    def frame(self, image_topic: str, stamp: int, labels: np.ndarray) -> None:
        ev = self.evaluation[image_topic]
        waiting = self.truths.get((image_topic, stamp))
        if waiting:
            self._compare(ev, stamp, labels, waiting.popleft())
        elif self.expected[ev.gt_topic][stamp] > 0:
            # A copy: the engine may hand out a buffer it reuses for the next frame.
            self.frames.setdefault((image_topic, stamp), deque()).append(labels.copy())
        else:
            ev.unmatched += 1

    def truth(self, gt_topic: str, timestamp: int, raw: bytes | memoryview, typestore: Typestore,
              msgtype: str = IMAGE_TYPE) -> None:
        image_topic = self.image_of[gt_topic]
        ev = self.evaluation[image_topic]
        stamp, gt = _decode_gt(typestore, raw, msgtype)
        if stamp is None:
            ev.gt_unused += 1
            ev.note(f"{gt_topic} @ bag time {timestamp}: {gt}")
            return
        self.expected[gt_topic][stamp] -= 1
        waiting = self.frames.get((image_topic, stamp))
        if waiting:
            self._compare(ev, stamp, waiting.popleft(), gt)
        else:
            self.truths.setdefault((image_topic, stamp), deque()).append(gt)

    def _compare(self, ev: TopicEvaluation, stamp: int, labels: np.ndarray, gt: np.ndarray | str) -> None:
        if isinstance(gt, str):
            ev.mismatched += 1
            ev.note(f"{ev.gt_topic} stamp {_stamp_text(stamp)}: {gt}")
        elif gt.shape != labels.shape:
            ev.mismatched += 1
            ev.note(f"{ev.gt_topic} stamp {_stamp_text(stamp)}: ground truth is {gt.shape[1]}x{gt.shape[0]}, "
                    f"the frame {labels.shape[1]}x{labels.shape[0]}")
        else:
            ev.confusion += confusion_matrix(labels, gt, self.num_classes)
            ev.matched += 1

    def finish(self) -> None:
        """Count what never found its partner."""
        for (image_topic, _), left in self.frames.items():
            self.evaluation[image_topic].unmatched += len(left)
        for (image_topic, _), left in self.truths.items():
            self.evaluation[image_topic].gt_unused += len(left)
        self.frames.clear()
        self.truths.clear()


def _expected_stamps(reader: Reader, typestore: Typestore, gt_of: dict[str, str]) -> dict[str, Counter[int]]:
    """Header stamps per ground-truth topic, read ahead so only frames that will find a partner are kept.

    Raises:
        BagError: a CompressedImage ground-truth topic whose first message is not mono8 PNG (a JPEG
            camera topic, say): refused before anything is written rather than counted frame by frame.
    """
    expected: dict[str, Counter[int]] = {gt: Counter() for gt in gt_of.values()}
    conns = [c for c in reader.connections if c.topic in expected]
    format_checked: set[str] = set()
    for conn, _, raw in reader.messages(connections=conns):
        try:
            msg = typestore.deserialize_cdr(raw, conn.msgtype)
        except Exception:  # unreadable ones are counted (and named) in the main pass
            continue
        if conn.msgtype == COMPRESSED_TYPE and conn.topic not in format_checked:
            format_checked.add(conn.topic)
            if not announces_labels(msg.format) and str(msg.format).strip().lower() != "png":
                raise BagError(f"ground-truth topic {conn.topic} is a {COMPRESSED_TYPE} of format {msg.format!r}, "
                               f"not mono8 PNG trainIds ({LABELS_FORMAT!r})")
        expected[conn.topic][_stamp_ns(msg.header)] += 1
    return expected


def bag_storage(path: Path) -> str:
    """Storage identifier (sqlite3 or mcap) of a bag directory or a single .db3/.mcap file."""
    if path.is_dir():
        meta = path / "metadata.yaml"
        try:
            info = yaml.safe_load(meta.read_text())["rosbag2_bagfile_information"]
            storage = str(info["storage_identifier"])
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
            raise BagError(f"{path} is not a readable rosbag2 directory ({meta}: {exc})") from exc
    else:
        storage = {".db3": "sqlite3", ".mcap": "mcap"}.get(path.suffix, "")
    if storage not in STORAGES:
        raise BagError(f"{path}: unsupported storage {storage!r} (supported: {', '.join(STORAGES)})")
    return storage


def _related(a: Path, b: Path) -> bool:
    """Whether two resolved paths are equal or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def _looks_removable(path: Path) -> bool:
    """Whether ``path`` looks like an earlier output (a bag or a partial one), so overwrite may delete it.

    Keeps a mistyped output path from deleting an unrelated directory tree.
    """
    if not path.is_dir() or path.is_symlink():
        return path.suffix in (".db3", ".mcap") or path.is_symlink()
    if (path / "metadata.yaml").is_file():
        return True
    # An aborted write leaves storage files (and sqlite side files) without metadata.yaml.
    return all(e.is_file() and (e.suffix in (".db3", ".mcap") or ".db3-" in e.name or e.name.startswith("metadata."))
               for e in path.iterdir())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_paths(input_path: Path, output_path: Path, overwrite: bool) -> None:
    """Refuse output paths that would touch the input or an existing path (unless overwrite)."""
    if not input_path.exists():
        raise BagError(f"input bag not found: {input_path}")
    src, dst = input_path.resolve(), output_path.resolve()
    if src == dst:
        raise BagError(f"output {output_path} is the input bag; choose another output path")
    if _related(src, dst):
        raise BagError(f"output {output_path} and input {input_path} contain one another; "
                       f"choose an output outside the input bag")
    if output_path.exists() or output_path.is_symlink():
        if not overwrite:
            raise BagError(f"output {output_path} exists (pass --overwrite to replace it)")
        if not _looks_removable(output_path):
            raise BagError(f"output {output_path} exists and does not look like a bag; refusing to delete it")


def _connection_definition(conn: Connection, typestore: Typestore) -> tuple[str, str]:
    """(message definition, RIHS01 hash) to register a copied connection with."""
    msgdef = conn.msgdef.data if conn.msgdef.format != MessageDefinitionFormat.NONE else ""
    digest = conn.digest
    if msgdef and digest:
        return msgdef, digest
    # Bags recorded by Humble store neither; fill them in where the type is a standard one.
    if conn.msgtype in typestore.fielddefs:
        return (msgdef or typestore.generate_msgdef(conn.msgtype, ros_version=2)[0],
                digest or typestore.hash_rihs01(conn.msgtype))
    raise BagError(f"topic {conn.topic}: type {conn.msgtype} has no definition or hash stored in the bag and is "
                   f"not a standard message type, so it cannot be registered in the new bag")


def _qos_of(conn: Connection) -> list[Any]:
    return list(conn.ext.offered_qos_profiles) if isinstance(conn.ext, ConnectionExtRosbag2) else []


def _decode_frame(typestore: Typestore, msgtype: str, raw: bytes | memoryview) -> tuple[Any, np.ndarray]:
    """(header, rgb) of a serialized image message; raises FrameError for any malformed frame."""
    try:
        msg = typestore.deserialize_cdr(raw, msgtype)
    except Exception as exc:  # truncated or corrupt CDR surfaces as assorted struct/index errors
        raise FrameError(f"cannot deserialize {msgtype}: {exc}") from exc
    rgb = compressed_to_rgb(msg) if msgtype == COMPRESSED_TYPE else image_to_rgb(msg)
    return msg.header, rgb


def _label_message(typestore: Typestore, header: Any, labels: np.ndarray, msgtype: str = IMAGE_TYPE) -> memoryview:
    """Serialized labels (uint8 H×W): a mono8 Image, or a PNG CompressedImage for ``COMPRESSED_TYPE``."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    if msgtype == COMPRESSED_TYPE:
        msg = typestore.types[COMPRESSED_TYPE](header=header, format=LABELS_FORMAT, data=encode_labels_png(labels))
    else:
        msg = typestore.types[IMAGE_TYPE](header=header, **encode_image_fields(labels, "mono8"))
    return typestore.serialize_cdr(msg, msgtype)


def process_bag(input_path: str | Path, output_path: str | Path, segmenter: Segmenter, *,
                topics: list[str] | None = None, storage: str | None = None, overwrite: bool = False,
                progress: bool = True, gt_topics: str | Mapping[str, str] | None = None,
                labels: str = "raw") -> BagReport:
    """Copy a bag and add a label topic per image topic (see the module docstring).

    Args:
        input_path: rosbag2 directory (or a single .db3/.mcap file), opened read-only.
        output_path: new bag directory; must not exist unless ``overwrite``.
        segmenter: anything with ``segment(rgb) -> result.labels``.
        topics: image topics to segment (default: all image topics).
        storage: ``sqlite3`` or ``mcap`` (default: the input's).
        overwrite: replace an existing output (never the input, nor a path inside or around it).
        progress: show a progress bar over messages.
        gt_topics: ground truth to evaluate against: one mono8 trainId topic (a bag with one image
            topic to segment) or image topic → ground-truth topic; scores land in ``report.evaluation``.
        labels: ``raw`` (mono8 Image on ``<label topic>``), ``compressed`` (PNG CompressedImage on
            ``<label topic>/compressed``) or ``both``.

    Raises:
        BagError: missing input, refused output path, bad topic selection, label-topic collision,
            or a bad ground-truth topic (see :func:`plan_ground_truth`).
    """
    src, dst = Path(input_path), Path(output_path)
    check_paths(src, dst, overwrite)
    in_storage = bag_storage(src)
    out_storage = storage or in_storage
    if out_storage not in STORAGES:
        raise BagError(f"unknown storage {out_storage!r} (choose from {', '.join(STORAGES)})")
    label_outputs("", labels)  # a bad mode fails before the bag is opened
    typestore = _typestore()
    report = BagReport(output_path=dst, storage=out_storage, labels=labels)

    try:
        reader = Reader(src)
        reader.open()
    except (ReaderError, FileNotFoundError, OSError) as exc:
        raise BagError(f"cannot read bag {src}: {exc}") from exc
    try:
        topic_types: dict[str, str] = {}
        for conn in reader.connections:
            if topic_types.setdefault(conn.topic, conn.msgtype) != conn.msgtype:
                raise BagError(f"topic {conn.topic} carries several types ({topic_types[conn.topic]}, {conn.msgtype})")
        plan, gt_of = plan_ground_truth(topic_types, topics, gt_topics, labels)
        definitions = {c.id: _connection_definition(c, typestore) for c in reader.connections}
        report.label_topics = dict(plan)
        report.frames_segmented = dict.fromkeys(plan, 0)
        report.frames_failed = dict.fromkeys(plan, 0)
        matcher = None
        if gt_of:
            card = getattr(segmenter, "card", None)
            report.classes = tuple(getattr(card, "classes", None) or CITYSCAPES_CLASSES)
            matcher = _GroundTruthMatcher(gt_of, _expected_stamps(reader, typestore, gt_of), report.classes,
                                          report.evaluation)

        # Everything is validated; only now may an old output go.
        if dst.exists() or dst.is_symlink():
            _remove(dst)
        writer = Writer(dst, version=BAG_VERSION, storage_plugin=StoragePlugin[out_storage.upper()])
        writer.open()
        try:
            _copy_and_segment(reader, writer, typestore, segmenter, plan, definitions, report, progress, matcher)
            writer.close()
        except BaseException:
            # The half-written bag is ours (open() created it); leave nothing misleading behind.
            with suppress(Exception):
                writer.abort()
            shutil.rmtree(dst, ignore_errors=True)
            raise
    except WriterError as exc:
        raise BagError(f"cannot write bag {dst}: {exc}") from exc
    finally:
        reader.close()
    return report


def _copy_and_segment(reader: Reader, writer: Writer, typestore: Typestore, segmenter: Segmenter,
                      plan: dict[str, str], definitions: dict[int, tuple[str, str]], report: BagReport,
                      progress: bool, matcher: _GroundTruthMatcher | None = None) -> None:
    out_conns: dict[int, Connection] = {}
    image_qos: dict[str, list[Any]] = {}
    for conn in reader.connections:
        msgdef, digest = definitions[conn.id]
        ext = conn.ext
        out_conns[conn.id] = writer.add_connection(
            conn.topic, conn.msgtype, msgdef=msgdef, rihs01=digest,
            serialization_format=ext.serialization_format if isinstance(ext, ConnectionExtRosbag2) else "cdr",
            offered_qos_profiles=_qos_of(conn))
        image_qos.setdefault(conn.topic, _qos_of(conn))
    # Reuse the bag's own Image / CompressedImage definition when it has one so the bag stays self-consistent.
    type_defs: dict[str, tuple[str, str]] = {}
    for msgtype in IMAGE_TYPES:
        type_defs[msgtype] = next((definitions[c.id] for c in reader.connections if c.msgtype == msgtype),
                                  None) or (typestore.generate_msgdef(msgtype, ros_version=2)[0],
                                            typestore.hash_rihs01(msgtype))
    label_conns = {
        image_topic: [(writer.add_connection(topic, msgtype, msgdef=type_defs[msgtype][0],
                                             rihs01=type_defs[msgtype][1],
                                             offered_qos_profiles=image_qos.get(image_topic, [])), msgtype)
                      for topic, msgtype in label_outputs(label_topic, report.labels)]
        for image_topic, label_topic in plan.items()
    }

    with tqdm(total=reader.message_count, unit="msg", disable=not progress, desc="segmenting") as bar:
        for conn, timestamp, raw in reader.messages():
            writer.write(out_conns[conn.id], timestamp, raw)
            report.messages_copied += 1
            if conn.topic in plan:
                try:
                    header, rgb = _decode_frame(typestore, conn.msgtype, raw)
                except FrameError as exc:
                    report.frames_failed[conn.topic] += 1
                    if len(report.errors) < MAX_ERRORS_KEPT:
                        report.errors.append(f"{conn.topic} @ {timestamp}: {exc}")
                else:
                    labels = segmenter.segment(rgb).labels
                    if labels.shape != rgb.shape[:2]:
                        # A segmenter set to network resolution: the label topic promises input size.
                        labels = resize_labels(labels, rgb.shape[:2])
                    for label_conn, msgtype in label_conns[conn.topic]:
                        writer.write(label_conn, timestamp, _label_message(typestore, header, labels, msgtype))
                    report.frames_segmented[conn.topic] += 1
                    if matcher is not None and conn.topic in report.evaluation:
                        matcher.frame(conn.topic, _stamp_ns(header), labels)
            elif matcher is not None and conn.topic in matcher.image_of:
                matcher.truth(conn.topic, timestamp, raw, typestore, conn.msgtype)
            bar.update(1)
    if matcher is not None:
        matcher.finish()


# --- helpers for demos and tests -------------------------------------------------------------


def _header(typestore: Typestore, stamp_ns: int, frame_id: str) -> Any:
    time_cls = typestore.types["builtin_interfaces/msg/Time"]
    header_cls = typestore.types["std_msgs/msg/Header"]
    return header_cls(stamp=time_cls(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000)),
                      frame_id=frame_id)


def write_image_bag(path: str | Path, topic: str, frames: Iterable[tuple[int, np.ndarray]], *,
                    frame_id: str = "camera", storage: str = "mcap", compressed: bool = False) -> None:
    """Write RGB frames as a new bag: rgb8 Image (or JPEG CompressedImage) messages on ``topic``.

    Each frame is ``(stamp_ns, rgb uint8 H×W×3)``; the header stamp and the bag
    timestamp are both ``stamp_ns``.
    """
    if storage not in STORAGES:
        raise BagError(f"unknown storage {storage!r} (choose from {', '.join(STORAGES)})")
    typestore = _typestore()
    msgtype = COMPRESSED_TYPE if compressed else IMAGE_TYPE
    with Writer(Path(path), version=BAG_VERSION, storage_plugin=StoragePlugin[storage.upper()]) as writer:
        conn = writer.add_connection(topic, msgtype, typestore=typestore)
        for stamp_ns, rgb in frames:
            header = _header(typestore, stamp_ns, frame_id)
            if compressed:
                data = np.frombuffer(encode_jpeg(rgb), dtype=np.uint8)
                msg = typestore.types[COMPRESSED_TYPE](header=header, format="jpeg", data=data)
            else:
                msg = typestore.types[IMAGE_TYPE](header=header, **encode_image_fields(rgb, "rgb8"))
            writer.write(conn, int(stamp_ns), typestore.serialize_cdr(msg, msgtype))


def read_image_topic(path: str | Path, topic: str) -> Iterator[tuple[int, Any, np.ndarray]]:
    """Yield ``(bag timestamp ns, header, array)`` for an image topic.

    The array is H×W uint8 for labels (mono8 Images and mono8 PNG CompressedImages, as the node's
    ``labels/compressed`` and the ``bag`` command's ``<label topic>/compressed``) and RGB H×W×3 otherwise.
    """
    typestore = _typestore()
    with Reader(Path(path)) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        if not conns:
            raise BagError(f"topic {topic} is not in {path}")
        for conn, timestamp, raw in reader.messages(connections=conns):
            if conn.msgtype not in IMAGE_TYPES:
                raise BagError(f"topic {topic} has type {conn.msgtype}, not an image type")
            msg = typestore.deserialize_cdr(raw, conn.msgtype)
            if conn.msgtype == IMAGE_TYPE and str(msg.encoding).lower() == "mono8":
                h, w, step = int(msg.height), int(msg.width), int(msg.step)
                if len(msg.data) != h * step or step < w:
                    raise FrameError(f"malformed mono8 frame on {topic} @ {timestamp}")
                array = np.asarray(msg.data, dtype=np.uint8).reshape(h, step)[:, :w].copy()
            elif conn.msgtype == IMAGE_TYPE:
                array = image_to_rgb(msg)
            elif announces_labels(msg.format):
                array = compressed_labels_to_array(msg)
            else:
                array = compressed_to_rgb(msg)
            yield timestamp, msg.header, array


# --- command line ----------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Add the ``bag`` sub-command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "bag", help="segment the image topics of a rosbag2 bag into a new bag",
        description="Copy a rosbag2 bag (sqlite3 or mcap) and add a mono8 label topic per image topic: "
                    "<topic without trailing /compressed>/labels.")
    p.add_argument("input", type=Path, help="input bag directory (read-only)")
    p.add_argument("output", type=Path, help="output bag directory (must not exist unless --overwrite)")
    p.add_argument("--model", type=Path, required=True, help="model package directory (holds card.json)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="image topics to segment (default: all)")
    p.add_argument("--storage", choices=STORAGES, help="output storage (default: same as the input)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output bag")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--labels", choices=LABEL_MODES, default="raw",
                   help="label topics to write: raw (mono8 Image on <topic>/labels, default), compressed "
                        "(lossless PNG CompressedImage on <topic>/labels/compressed, ~1/200 of the size) or both")
    # One value per flag (repeat it for pairs): a list-valued option would swallow the positional bags.
    p.add_argument("--gt-topic", dest="gt_topics", action="append", metavar="[IMAGE_TOPIC=]GT_TOPIC",
                   help="evaluate against mono8 trainId labels on GT_TOPIC, paired with frames by header stamp; "
                        "a bare GT_TOPIC needs exactly one image topic to segment, otherwise repeat "
                        "--gt-topic IMAGE_TOPIC=GT_TOPIC per evaluated image topic")
    p.add_argument("--eval-out", type=Path, metavar="REPORT.json",
                   help="write the evaluation (confusion matrices, mIoU, per-class IoU, pixel accuracy, "
                        "matched/unmatched frames per image topic) as JSON; never overwrites")
    p.set_defaults(func=run_bag)


def check_eval_out(eval_out: Path, input_path: Path, output_path: Path) -> None:
    """Refuse an evaluation report path that exists or lies inside the input or output bag."""
    if eval_out.exists() or eval_out.is_symlink():
        raise BagError(f"evaluation report {eval_out} exists; choose another path (it is never overwritten)")
    target = eval_out.resolve()
    for what, bag in (("input", input_path), ("output", output_path)):
        if _related(target, bag.resolve()):
            raise BagError(f"evaluation report {eval_out} lies in the {what} bag {bag}; choose a path outside it")


def write_eval_report(data: dict[str, Any], path: Path) -> None:
    """Write the evaluation JSON to a new file (mode "x": a file that appeared meanwhile is not replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
    except FileExistsError:
        raise BagError(f"evaluation report {path} exists; choose another path (it is never overwritten)") from None


def run_bag(args: argparse.Namespace) -> int:
    """Run the ``bag`` sub-command; 0 on success, 2 on bad input (one line on stderr)."""
    from .card import CardError
    from .engine import Segmenter

    gt_topics_arg = getattr(args, "gt_topics", None)
    eval_out = getattr(args, "eval_out", None)
    try:
        # Path checks first: a refused output should not wait for a model to load.
        check_paths(args.input, args.output, args.overwrite)
        gt_topics = parse_gt_topics(gt_topics_arg) if gt_topics_arg else None
        if eval_out is not None:
            if gt_topics is None:
                raise BagError("--eval-out needs ground truth to evaluate against (--gt-topic)")
            check_eval_out(eval_out, args.input, args.output)
        bag_storage(args.input)
        segmenter = Segmenter(args.model, backend=args.backend, device=args.device, output_resolution="input")
        report = process_bag(args.input, args.output, segmenter, topics=args.topics, storage=args.storage,
                             overwrite=args.overwrite, progress=args.progress, gt_topics=gt_topics,
                             labels=getattr(args, "labels", "raw"))
        evaluation = report.evaluation_dict()
        if eval_out is not None and evaluation is not None:
            write_eval_report({"input": str(args.input), "model": str(args.model), **evaluation}, eval_out)
    except (BagError, CardError, ValueError, FileNotFoundError) as exc:
        print(f"dgss-perception bag: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if eval_out is not None:
        print(f"evaluation report: {eval_out}")
    return 0
