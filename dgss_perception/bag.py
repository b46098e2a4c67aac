"""Offline segmentation of rosbag2 bags (sqlite3 or mcap), without rclpy.

:func:`process_bag` reads a bag read-only and writes a new one that holds every
input message unchanged (topic, type, bag timestamp and serialized bytes) plus
one label topic per image topic (``sensor_msgs/msg/Image`` and
``sensor_msgs/msg/CompressedImage``).

Label topic naming rule: take the image topic, remove one trailing
``/compressed``, then append ``/labels``::

    /cam/image_raw             -> /cam/image_raw/labels
    /cam/image_raw/compressed  -> /cam/image_raw/labels

A label message is a mono8 ``sensor_msgs/msg/Image`` of Cityscapes trainIds
(255 = ignore) at the input frame's resolution, carrying the input message's
header unchanged, written at the input message's bag timestamp. A label topic
that already exists in the bag, or two image topics that map to the same label
topic, is an error raised before anything is written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from rosbags.interfaces import Connection, ConnectionExtRosbag2, MessageDefinitionFormat
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer, WriterError
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm
import yaml

from .codec import FrameError, compressed_to_rgb, encode_image_fields, encode_jpeg, image_to_rgb
from .engine import BACKENDS, DEVICES

if TYPE_CHECKING:
    from rosbags.typesys.store import Typestore

    from .engine import Segmenter

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
STORAGES = ("sqlite3", "mcap")
LABEL_SUFFIX = "/labels"

# Metadata version 8 keeps QoS profiles as the integer-enum YAML string that
# Humble's rosbag2 parses; version 9 (string enums) is only read by newer releases.
BAG_VERSION = 8

# How many per-frame failure reasons a report keeps (the counts are always complete).
MAX_ERRORS_KEPT = 50


def _typestore() -> Typestore:
    # Humble is the oldest distribution supported. Image, CompressedImage,
    # Header and Time are identical (same definitions, same RIHS01 hashes) in
    # the Humble, Jazzy and Kilted stores, so what is written here reads the
    # same on all three; the Humble store just makes that the floor.
    return get_typestore(Stores.ROS2_HUMBLE)


class BagError(ValueError):
    """A bag that cannot be processed as asked; the message says why."""


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
            lines.append(f"  {image_topic} -> {label_topic}: {self.frames_segmented.get(image_topic, 0)} segmented, "
                         f"{self.frames_failed.get(image_topic, 0)} failed")
        lines.extend(f"  skipped: {e}" for e in self.errors[:5])
        if len(self.errors) > 5:
            lines.append(f"  ... and {self.total_failed - 5} more skipped frames")
        return "\n".join(lines)


def label_topic_for(image_topic: str) -> str:
    """The label topic for an image topic (see the module docstring)."""
    base = image_topic[: -len("/compressed")] if image_topic.endswith("/compressed") else image_topic
    return base + LABEL_SUFFIX


def plan_label_topics(topic_types: dict[str, str], topics: list[str] | None = None) -> dict[str, str]:
    """Image topic → label topic for a bag's ``{topic: type}``; BagError on a bad selection or a collision."""
    images = sorted(t for t, typ in topic_types.items() if typ in IMAGE_TYPES)
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
        if label in topic_types:
            raise BagError(f"label topic {label} for {topic} already exists in the bag "
                           f"(select other image topics with --topics)")
        if label in owners:
            raise BagError(f"image topics {owners[label]} and {topic} would both write label topic {label}; "
                           f"select one of them with --topics")
        owners[label] = topic
        plan[topic] = label
    return plan


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


def _label_message(typestore: Typestore, header: Any, labels: np.ndarray) -> memoryview:
    fields = encode_image_fields(np.ascontiguousarray(labels, dtype=np.uint8), "mono8")
    msg = typestore.types[IMAGE_TYPE](header=header, **fields)
    return typestore.serialize_cdr(msg, IMAGE_TYPE)


def process_bag(input_path: str | Path, output_path: str | Path, segmenter: Segmenter, *,
                topics: list[str] | None = None, storage: str | None = None, overwrite: bool = False,
                progress: bool = True) -> BagReport:
    """Copy a bag and add a label topic per image topic (see the module docstring).

    Args:
        input_path: rosbag2 directory (or a single .db3/.mcap file), opened read-only.
        output_path: new bag directory; must not exist unless ``overwrite``.
        segmenter: anything with ``segment(rgb) -> result.labels``.
        topics: image topics to segment (default: all image topics).
        storage: ``sqlite3`` or ``mcap`` (default: the input's).
        overwrite: replace an existing output (never the input, nor a path inside or around it).
        progress: show a progress bar over messages.

    Raises:
        BagError: missing input, refused output path, bad topic selection or label-topic collision.
    """
    src, dst = Path(input_path), Path(output_path)
    check_paths(src, dst, overwrite)
    in_storage = bag_storage(src)
    out_storage = storage or in_storage
    if out_storage not in STORAGES:
        raise BagError(f"unknown storage {out_storage!r} (choose from {', '.join(STORAGES)})")
    typestore = _typestore()
    report = BagReport(output_path=dst, storage=out_storage)

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
        plan = plan_label_topics(topic_types, topics)
        definitions = {c.id: _connection_definition(c, typestore) for c in reader.connections}
        report.label_topics = dict(plan)
        report.frames_segmented = dict.fromkeys(plan, 0)
        report.frames_failed = dict.fromkeys(plan, 0)

        # Everything is validated; only now may an old output go.
        if dst.exists() or dst.is_symlink():
            _remove(dst)
        writer = Writer(dst, version=BAG_VERSION, storage_plugin=StoragePlugin[out_storage.upper()])
        writer.open()
        try:
            _copy_and_segment(reader, writer, typestore, segmenter, plan, definitions, report, progress)
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
                      progress: bool) -> None:
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
    # Reuse the bag's own Image definition when it has one so the bag stays self-consistent.
    image_def = next((definitions[c.id] for c in reader.connections if c.msgtype == IMAGE_TYPE), None)
    if image_def is None:
        image_def = (typestore.generate_msgdef(IMAGE_TYPE, ros_version=2)[0], typestore.hash_rihs01(IMAGE_TYPE))
    label_conns = {
        image_topic: writer.add_connection(label_topic, IMAGE_TYPE, msgdef=image_def[0], rihs01=image_def[1],
                                           offered_qos_profiles=image_qos.get(image_topic, []))
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
                        labels = cv2.resize(labels, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
                    writer.write(label_conns[conn.topic], timestamp, _label_message(typestore, header, labels))
                    report.frames_segmented[conn.topic] += 1
            bar.update(1)


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

    The array is H×W uint8 for mono8 images (labels) and RGB H×W×3 otherwise.
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
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="image topics to segment (default: all)")
    p.add_argument("--storage", choices=STORAGES, help="output storage (default: same as the input)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output bag")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_bag)


def run_bag(args: argparse.Namespace) -> int:
    """Run the ``bag`` sub-command; 0 on success, 2 on bad input (one line on stderr)."""
    from .card import CardError
    from .engine import Segmenter

    try:
        # Path checks first: a refused output should not wait for a model to load.
        check_paths(args.input, args.output, args.overwrite)
        bag_storage(args.input)
        segmenter = Segmenter(args.model, backend=args.backend, device=args.device, output_resolution="input")
        report = process_bag(args.input, args.output, segmenter, topics=args.topics, storage=args.storage,
                             overwrite=args.overwrite, progress=args.progress)
    except (BagError, CardError, ValueError, FileNotFoundError) as exc:
        print(f"dgss-perception bag: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
