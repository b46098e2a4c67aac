"""Offline bag processing: byte-exact copies, label topics, path safety, command line."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from dgss_perception.bag import (
    BagError,
    add_parser,
    bag_storage,
    label_topic_for,
    parse_gt_topics,
    plan_label_topics,
    process_bag,
    read_image_topic,
    write_image_bag,
)
from dgss_perception.codec import compressed_to_rgb, encode_image_fields, encode_jpeg, image_to_rgb
from dgss_perception.engine import Segmenter
from dgss_perception.labels import CITYSCAPES_CLASSES
from dgss_perception.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

TS = get_typestore(Stores.ROS2_HUMBLE)
RAW_TOPIC = "/cam/image_raw"
JPEG_TOPIC = "/cam2/image_raw/compressed"
TEXT_TOPIC = "/chatter"
LATCHED = Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL,
              QosTime(0, 0), QosTime(0, 0), QosLiveliness.AUTOMATIC, QosTime(0, 0), False)
T0 = 1_700_000_000_123_456_789


def _header(stamp_ns: int, frame_id: str) -> object:
    stamp = TS.types["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    return TS.types["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)


def _frame(seed: int, height: int, width: int) -> np.ndarray:
    # Smooth gradients so JPEG keeps the content recognisable and labels vary.
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xx * 255 // width + seed * 40) % 256, yy * 255 // height, (xx + yy + seed * 17) % 256], axis=2)
    return rgb.astype(np.uint8)


def _write_source_bag(path: Path, storage: str) -> None:
    """Raw frames (one malformed), JPEG frames and a text topic, interleaved in time."""
    image_t, jpeg_t, text_t = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "std_msgs/msg/String")
    with Writer(path, version=8, storage_plugin=StoragePlugin[storage.upper()]) as writer:
        raw = writer.add_connection(RAW_TOPIC, image_t, typestore=TS)
        jpeg = writer.add_connection(JPEG_TOPIC, jpeg_t, typestore=TS)
        text = writer.add_connection(TEXT_TOPIC, text_t, typestore=TS, offered_qos_profiles=[LATCHED])
        writer.write(text, T0, TS.serialize_cdr(TS.types[text_t](data="hello"), text_t))
        for i in range(4):
            t = T0 + (i + 1) * 50_000_000
            if i == 1:
                # data shorter than step × height: must be counted and skipped, not fatal
                bad = TS.types[image_t](header=_header(t, "cam_bad"), height=61, width=97, encoding="rgb8",
                                        is_bigendian=0, step=97 * 3, data=np.zeros(100, np.uint8))
                writer.write(raw, t, TS.serialize_cdr(bad, image_t))
            else:
                fields = encode_image_fields(_frame(i, 61, 97), "rgb8")
                msg = TS.types[image_t](header=_header(t + 7, f"cam_{i}"), **fields)
                writer.write(raw, t, TS.serialize_cdr(msg, image_t))
            if i < 2:
                data = np.frombuffer(encode_jpeg(_frame(i + 5, 33, 45)), np.uint8)
                msg = TS.types[jpeg_t](header=_header(t + 3, "cam2"), format="jpeg", data=data)
                writer.write(jpeg, t + 1, TS.serialize_cdr(msg, jpeg_t))
        writer.write(text, T0 + 10**9, TS.serialize_cdr(TS.types[text_t](data="bye"), text_t))


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _messages(path: Path) -> list[tuple[str, str, int, bytes]]:
    with Reader(path) as reader:
        return [(c.topic, c.msgtype, t, bytes(raw)) for c, t, raw in reader.messages()]


def _qos(path: Path) -> dict[str, list]:
    with Reader(path) as reader:
        return {c.topic: list(c.ext.offered_qos_profiles) for c in reader.connections}


@pytest.fixture(scope="module")
def segmenter(tiny_model_dir: Path) -> Segmenter:
    return Segmenter(tiny_model_dir, backend="onnx", device="cpu")


@pytest.fixture(params=["sqlite3", "mcap"])
def source_bag(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / f"source_{request.param}"
    _write_source_bag(path, request.param)
    return path


def test_round_trip(source_bag: Path, tmp_path: Path, segmenter: Segmenter) -> None:
    before = _tree_hash(source_bag)
    out = tmp_path / "out"
    report = process_bag(source_bag, out, segmenter, progress=False)

    assert _tree_hash(source_bag) == before  # the input is never written to
    storage = bag_storage(source_bag)
    assert report.storage == storage and bag_storage(out) == storage and report.output_path == out

    inputs, outputs = _messages(source_bag), _messages(out)
    labels = {RAW_TOPIC: "/cam/image_raw/labels", JPEG_TOPIC: "/cam2/image_raw/labels"}
    assert report.label_topics == labels
    assert [m for m in outputs if m[0] not in labels.values()] == inputs  # byte-identical, same order and time
    assert report.messages_copied == len(inputs) == 8
    assert report.frames_segmented == {RAW_TOPIC: 3, JPEG_TOPIC: 2}
    assert report.frames_failed == {RAW_TOPIC: 1, JPEG_TOPIC: 0}
    assert len(report.errors) == 1 and "data size" in report.errors[0]
    assert _qos(out)[TEXT_TOPIC] == [LATCHED]

    for image_topic, label_topic in labels.items():
        label_msgs = list(read_image_topic(out, label_topic))
        frames = [(t, raw) for topic, _, t, raw in inputs if topic == image_topic]
        if image_topic == RAW_TOPIC:
            frames = [f for f in frames if f[0] != T0 + 2 * 50_000_000]  # the malformed one
        assert [t for t, _, _ in label_msgs] == [t for t, _ in frames]
        for (t, header, labels_arr), (_, raw) in zip(label_msgs, frames):
            msg = TS.deserialize_cdr(raw, "sensor_msgs/msg/CompressedImage" if image_topic == JPEG_TOPIC
                                     else "sensor_msgs/msg/Image")
            rgb = compressed_to_rgb(msg) if image_topic == JPEG_TOPIC else image_to_rgb(msg)
            assert header.stamp.sec == msg.header.stamp.sec and header.stamp.nanosec == msg.header.stamp.nanosec
            assert header.frame_id == msg.header.frame_id
            assert labels_arr.dtype == np.uint8 and labels_arr.shape == rgb.shape[:2]
            np.testing.assert_array_equal(labels_arr, segmenter.segment(rgb).labels)

    with Reader(out) as reader:
        label_conns = [c for c in reader.connections if c.topic in labels.values()]
        assert {c.msgtype for c in label_conns} == {"sensor_msgs/msg/Image"}
        first = next(reader.messages(connections=label_conns[:1]))
        assert TS.deserialize_cdr(first[2], "sensor_msgs/msg/Image").encoding == "mono8"


def test_storage_conversion_and_topic_selection(tmp_path: Path, segmenter: Segmenter) -> None:
    src = tmp_path / "src"
    _write_source_bag(src, "sqlite3")
    out = tmp_path / "out"
    report = process_bag(src, out, segmenter, topics=[JPEG_TOPIC], storage="mcap", progress=False)
    assert bag_storage(out) == "mcap" and report.storage == "mcap"
    assert report.label_topics == {JPEG_TOPIC: "/cam2/image_raw/labels"}
    assert report.frames_segmented == {JPEG_TOPIC: 2} and report.frames_failed == {JPEG_TOPIC: 0}
    outputs = _messages(out)
    assert [m for m in outputs if m[0] != "/cam2/image_raw/labels"] == _messages(src)
    assert len([m for m in outputs if m[0] == "/cam2/image_raw/labels"]) == 2


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_write_and_read_image_bag(tmp_path: Path, storage: str) -> None:
    frames = [(T0 + k * 10**8, _frame(k, 21, 31)) for k in range(3)]
    write_image_bag(tmp_path / "raw", "/img", frames, frame_id="f", storage=storage)
    write_image_bag(tmp_path / "jpg", "/img/compressed", frames, storage=storage, compressed=True)
    got = list(read_image_topic(tmp_path / "raw", "/img"))
    assert [t for t, _, _ in got] == [t for t, _ in frames]
    for (t, header, rgb), (_, want) in zip(got, frames):
        assert header.frame_id == "f" and header.stamp.sec * 10**9 + header.stamp.nanosec == t
        np.testing.assert_array_equal(rgb, want)
    jpgs = list(read_image_topic(tmp_path / "jpg", "/img/compressed"))
    assert len(jpgs) == 3 and jpgs[0][1].frame_id == "camera"
    assert jpgs[0][2].shape == (21, 31, 3)
    assert np.abs(jpgs[0][2].astype(int) - frames[0][1]).mean() < 12
    with pytest.raises(BagError):
        list(read_image_topic(tmp_path / "raw", "/nope"))


def test_existing_output_refused_then_overwritten(source_bag: Path, tmp_path: Path, segmenter: Segmenter) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(BagError, match="exists"):
        process_bag(source_bag, out, segmenter, progress=False)
    # Not a bag: even overwrite leaves it alone.
    with pytest.raises(BagError, match="does not look like a bag"):
        process_bag(source_bag, out, segmenter, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

    bag_out = tmp_path / "bag_out"
    process_bag(source_bag, bag_out, segmenter, topics=[RAW_TOPIC], progress=False)
    before = _tree_hash(bag_out)
    with pytest.raises(BagError, match="exists"):
        process_bag(source_bag, bag_out, segmenter, progress=False)
    assert _tree_hash(bag_out) == before
    report = process_bag(source_bag, bag_out, segmenter, overwrite=True, progress=False)
    assert set(report.label_topics) == {RAW_TOPIC, JPEG_TOPIC}
    assert {m[0] for m in _messages(bag_out)} >= {"/cam/image_raw/labels", "/cam2/image_raw/labels"}


def test_output_overlapping_input_refused(source_bag: Path, segmenter: Segmenter) -> None:
    before = _tree_hash(source_bag)
    for out in (source_bag, source_bag / "nested", source_bag / ".." / source_bag.name, source_bag.parent):
        for overwrite in (False, True):
            with pytest.raises(BagError):
                process_bag(source_bag, out, segmenter, overwrite=overwrite, progress=False)
    assert _tree_hash(source_bag) == before
    assert not (source_bag / "nested").exists()


def test_missing_input(tmp_path: Path, segmenter: Segmenter) -> None:
    with pytest.raises(BagError, match="not found"):
        process_bag(tmp_path / "nope", tmp_path / "out", segmenter, progress=False)
    assert not (tmp_path / "out").exists()


def test_label_topic_rule() -> None:
    assert label_topic_for("/cam/image_raw") == "/cam/image_raw/labels"
    assert label_topic_for("/cam/image_raw/compressed") == "/cam/image_raw/labels"
    assert label_topic_for("/compressed_cam/image") == "/compressed_cam/image/labels"
    assert label_topic_for("/cam/compressed/image") == "/cam/compressed/image/labels"
    types = {"/a/image": "sensor_msgs/msg/Image", "/b/image/compressed": "sensor_msgs/msg/CompressedImage",
             "/chatter": "std_msgs/msg/String"}
    assert plan_label_topics(types) == {"/a/image": "/a/image/labels", "/b/image/compressed": "/b/image/labels"}
    assert plan_label_topics(types, ["/a/image"]) == {"/a/image": "/a/image/labels"}
    with pytest.raises(BagError, match="not an image type"):
        plan_label_topics(types, ["/chatter"])
    with pytest.raises(BagError, match="not in the bag"):
        plan_label_topics(types, ["/missing"])
    both = {"/a/image": "sensor_msgs/msg/Image", "/a/image/compressed": "sensor_msgs/msg/CompressedImage"}
    with pytest.raises(BagError, match="both write label topic /a/image/labels"):
        plan_label_topics(both)
    assert plan_label_topics(both, ["/a/image/compressed"]) == {"/a/image/compressed": "/a/image/labels"}
    taken = {"/a/image": "sensor_msgs/msg/Image", "/a/image/labels": "std_msgs/msg/String"}
    with pytest.raises(BagError, match="already exists"):
        plan_label_topics(taken)


def test_collision_in_bag_refused_before_writing(tmp_path: Path, segmenter: Segmenter) -> None:
    src = tmp_path / "src"
    frames = [(T0, _frame(0, 9, 11))]
    with Writer(src, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        pairs = (("/a/image", "sensor_msgs/msg/Image"), ("/a/image/compressed", "sensor_msgs/msg/CompressedImage"))
        for topic, typ in pairs:
            conn = writer.add_connection(topic, typ, typestore=TS)
            for t, rgb in frames:
                if typ.endswith("CompressedImage"):
                    msg = TS.types[typ](header=_header(t, "c"), format="jpeg",
                                        data=np.frombuffer(encode_jpeg(rgb), np.uint8))
                else:
                    msg = TS.types[typ](header=_header(t, "c"), **encode_image_fields(rgb, "rgb8"))
                writer.write(conn, t, TS.serialize_cdr(msg, typ))
    with pytest.raises(BagError, match="/a/image/labels"):
        process_bag(src, tmp_path / "out", segmenter, progress=False)
    assert not (tmp_path / "out").exists()
    # Processing its own output again collides with the label topics already there.
    process_bag(src, tmp_path / "once", segmenter, topics=["/a/image"], progress=False)
    with pytest.raises(BagError, match="already exists"):
        process_bag(tmp_path / "once", tmp_path / "twice", segmenter, topics=["/a/image"], progress=False)


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dgss-perception")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_cli_exit_codes(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    write_image_bag(src, "/cam/image_raw/compressed", [(T0, _frame(0, 17, 23))], storage="sqlite3", compressed=True)
    model = str(tiny_model_dir)

    args = _cli("bag", str(src), str(tmp_path / "out"), "--model", model, "--no-progress", "--storage", "mcap")
    assert args.func(args) == 0
    assert "/cam/image_raw/labels" in capsys.readouterr().out
    assert [t for t, _, _ in read_image_topic(tmp_path / "out", "/cam/image_raw/labels")] == [T0]

    def fails(*argv: str, match: str) -> None:
        a = _cli("bag", *argv, "--no-progress")
        assert a.func(a) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err

    fails(str(tmp_path / "missing"), str(tmp_path / "o1"), "--model", model, match="not found")
    fails(str(src), str(tmp_path / "out"), "--model", model, match="exists")
    fails(str(src), str(src / "inner"), "--model", model, "--overwrite", match="input")
    (tmp_path / "empty_model").mkdir()
    fails(str(src), str(tmp_path / "o2"), "--model", str(tmp_path / "empty_model"), match="card.json")
    fails(str(src), str(tmp_path / "o3"), "--model", model, "--topics", "/nope", match="not in the bag")
    fails(str(tmp_path / "out"), str(tmp_path / "o4"), "--model", model, "--topics", "/cam/image_raw/compressed",
          match="already exists")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "o4"))


# --- evaluation against a ground-truth label topic -------------------------------------------

GT_TOPIC = "/camera/labels_gt"
CAM2_TOPIC = "/cam2/image_raw/compressed"


def _gt_from(pred: np.ndarray) -> np.ndarray:
    """The engine's labels with a block relabelled and a band ignored: imperfect but related ground truth."""
    gt = pred.copy()
    gt[10:30, 20:60] = (gt[10:30, 20:60].astype(int) + 3) % 19
    gt[:4] = 255
    return gt


def _write_gt_bag(path: Path, storage: str, segmenter: Segmenter) -> dict[int, np.ndarray]:
    """Five raw frames with ground truth on GT_TOPIC, in every situation matching has to handle.

    Frame 0 has its ground truth after it, frame 1 before it, frame 2 none, frame 3 one of the
    wrong size, frame 4 after it; one more ground-truth message has no frame. Header stamps
    differ from bag times (matching is by header stamp). A JPEG topic adds a second image topic.
    Returns the comparable ground truth by header stamp.
    """
    image_t, jpeg_t = "sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage"
    truths: dict[int, np.ndarray] = {}
    with Writer(path, version=8, storage_plugin=StoragePlugin[storage.upper()]) as writer:
        raw = writer.add_connection(RAW_TOPIC, image_t, typestore=TS)
        gt_conn = writer.add_connection(GT_TOPIC, image_t, typestore=TS)
        jpeg = writer.add_connection(CAM2_TOPIC, jpeg_t, typestore=TS)

        def write_gt(bag_time: int, stamp: int, labels: np.ndarray) -> None:
            msg = TS.types[image_t](header=_header(stamp, "cam"), **encode_image_fields(labels, "mono8"))
            writer.write(gt_conn, bag_time, TS.serialize_cdr(msg, image_t))

        for i in range(5):
            t = T0 + (i + 1) * 50_000_000
            stamp = t + 7
            rgb = _frame(i, 61, 97)
            gt = _gt_from(segmenter.segment(rgb).labels)
            if i == 1:
                write_gt(t - 1, stamp, gt)
                truths[stamp] = gt
            frame = TS.types[image_t](header=_header(stamp, "cam"), **encode_image_fields(rgb, "rgb8"))
            writer.write(raw, t, TS.serialize_cdr(frame, image_t))
            if i in (0, 4):
                write_gt(t + 1, stamp, gt)
                truths[stamp] = gt
            elif i == 3:
                write_gt(t + 1, stamp, gt[:30, :40].copy())
        write_gt(T0 + 10**9, T0 + 10**9, np.zeros((61, 97), np.uint8))  # no frame has this stamp
        data = np.frombuffer(encode_jpeg(_frame(9, 33, 45)), np.uint8)
        writer.write(jpeg, T0, TS.serialize_cdr(TS.types[jpeg_t](header=_header(T0, "cam2"), format="jpeg",
                                                                 data=data), jpeg_t))
    return truths


def _hand_confusion(out: Path, truths: dict[int, np.ndarray]) -> np.ndarray:
    """The confusion of the labels the output bag holds against the comparable ground truth."""
    conf = np.zeros((19, 19), np.int64)
    for _, header, labels in read_image_topic(out, "/cam/image_raw/labels"):
        stamp = header.stamp.sec * 10**9 + header.stamp.nanosec
        if stamp in truths:
            conf += confusion_matrix(labels, truths.pop(stamp), 19)
    assert not truths
    return conf


def _check_scores(entry: dict, conf: np.ndarray) -> None:
    assert np.array_equal(np.array(entry["confusion"]), conf)
    assert entry["miou"] == pytest.approx(mean_iou(conf), abs=1e-12)
    assert entry["pixel_accuracy"] == pytest.approx(pixel_accuracy(conf), abs=1e-12)
    assert 0 < entry["miou"] < 1 and entry["pixels"] == conf.sum()
    for name, want in zip(CITYSCAPES_CLASSES, iou_per_class(conf)):
        assert entry["iou"][name] is None if np.isnan(want) else entry["iou"][name] == pytest.approx(want)


def test_gt_evaluation_cli(tmp_path: Path, tiny_model_dir: Path, segmenter: Segmenter,
                           capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    truths = _write_gt_bag(src, "mcap", segmenter)
    before = _tree_hash(src)
    model = str(tiny_model_dir)
    report_path = tmp_path / "eval" / "report.json"
    args = _cli("bag", str(src), str(tmp_path / "out"), "--model", model, "--no-progress",
                "--gt-topic", f"{RAW_TOPIC}={GT_TOPIC}", "--eval-out", str(report_path))
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"eval {RAW_TOPIC} vs {GT_TOPIC}: mIoU" in printed and "3 matched frames" in printed
    assert _tree_hash(src) == before

    out = tmp_path / "out"
    # The ground truth is copied like any topic and never segmented; both image topics are.
    assert [m for m in _messages(out) if not m[0].endswith("/labels")] == _messages(src)
    label_topics = {m[0] for m in _messages(out) if m[0].endswith("/labels")}
    assert label_topics == {"/cam/image_raw/labels", "/cam2/image_raw/labels"}
    report = json.loads(report_path.read_text())
    assert set(report["topics"]) == {RAW_TOPIC}
    entry = report["topics"][RAW_TOPIC]
    assert entry["gt_topic"] == GT_TOPIC
    assert {k: entry[k] for k in ("frames", "matched", "unmatched", "mismatched", "gt_unused")} == {
        "frames": 5, "matched": 3, "unmatched": 1, "mismatched": 1, "gt_unused": 1}
    assert len(entry["issues"]) == 1 and "ground truth is 40x30, the frame 97x61" in entry["issues"][0]
    assert f"{(T0 + 4 * 50_000_000 + 7) // 10**9}." in entry["issues"][0]  # names the stamp
    conf = _hand_confusion(out, dict(truths))
    _check_scores(entry, conf)
    _check_scores(report["overall"], conf)
    assert report["classes"] == list(CITYSCAPES_CLASSES) and report["overall"]["matched"] == 3

    def fails(*argv: str, match: str) -> None:
        a = _cli("bag", str(src), *argv, "--model", model, "--no-progress")
        assert a.func(a) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err

    fails(str(tmp_path / "o1"), "--gt-topic", GT_TOPIC, "--eval-out", str(report_path), match="never overwritten")
    fails(str(tmp_path / "o2"), "--gt-topic", GT_TOPIC, match="exactly one image topic")
    fails(str(tmp_path / "o3"), "--gt-topic", "/nope", "--topics", RAW_TOPIC, match="not in the bag")
    fails(str(tmp_path / "o4"), "--gt-topic", f"{RAW_TOPIC}={CAM2_TOPIC}", match="not mono8 PNG trainIds")
    fails(str(tmp_path / "o5"), "--gt-topic", f"{RAW_TOPIC}={GT_TOPIC}", "--topics", CAM2_TOPIC,
          match="not among the segmented")
    fails(str(tmp_path / "o6"), "--gt-topic", GT_TOPIC, "--topics", GT_TOPIC, match="given as ground truth")
    fails(str(tmp_path / "o7"), "--eval-out", str(tmp_path / "r.json"), match="--gt-topic")
    fails(str(tmp_path / "o8"), "--gt-topic", GT_TOPIC, "--eval-out", str(src / "r.json"), "--topics", RAW_TOPIC,
          match="input bag")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9)) and not (tmp_path / "r.json").exists()


def test_gt_evaluation_single_topic(tmp_path: Path, segmenter: Segmenter) -> None:
    src = tmp_path / "src"
    truths = _write_gt_bag(src, "sqlite3", segmenter)
    report = process_bag(src, tmp_path / "out", segmenter, topics=[RAW_TOPIC], gt_topics=GT_TOPIC, progress=False)
    assert report.label_topics == {RAW_TOPIC: "/cam/image_raw/labels"}
    ev = report.evaluation[RAW_TOPIC]
    assert (ev.matched, ev.unmatched, ev.mismatched, ev.gt_unused) == (3, 1, 1, 1)
    np.testing.assert_array_equal(ev.confusion, _hand_confusion(tmp_path / "out", dict(truths)))
    assert "eval /cam/image_raw vs /camera/labels_gt" in report.summary()
    # Without ground truth nothing is evaluated and nothing changes in what is written.
    plain = process_bag(src, tmp_path / "plain", segmenter, topics=[RAW_TOPIC], progress=False)
    assert plain.evaluation == {} and plain.evaluation_dict() is None
    assert _messages(tmp_path / "plain") == _messages(tmp_path / "out")


def test_parse_gt_topics() -> None:
    assert parse_gt_topics(["/gt"]) == "/gt"
    assert parse_gt_topics(["/a=/gt_a", "/b=/gt_b"]) == {"/a": "/gt_a", "/b": "/gt_b"}
    assert parse_gt_topics(["/a=/gt_a"]) == {"/a": "/gt_a"}
    for bad in (["/gt", "/a=/gt_a"], ["/a="], ["=/gt"], ["/a=/x", "/a=/y"]):
        with pytest.raises(BagError):
            parse_gt_topics(bad)
