"""The node end to end over real DDS: segment_node in a subprocess, a test node here."""

from __future__ import annotations

import array
from pathlib import Path

import numpy as np
import pytest
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from dgss_perception.codec import encode_jpeg, image_to_rgb, compressed_to_rgb
from dgss_perception.engine import Segmenter
from dgss_perception.node import image_message

from rosutil import RELIABLE, Collector, Spinner, init_context, start_node_process, stop_process, wait_for

rng = np.random.default_rng(7)
STATS_WINDOW = 5


def make_image(stamp: int, width: int, height: int, encoding: str, pad: int = 0) -> Image:
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2}[encoding]
    step = width * channels + pad
    data = rng.integers(0, 256, size=step * height, dtype=np.uint8)
    # Smooth structure so the labels vary over the image, not only noise.
    msg = Image(header=Header(stamp=Time(sec=stamp, nanosec=123), frame_id="camera_optical"),
                height=height, width=width, encoding=encoding, is_bigendian=0, step=step)
    msg.data = array.array("B", data.tobytes())
    return msg


class Harness:
    def __init__(self, tmp: Path, model: Path, transport: str, extra: list[str] = (), ns: str = "/cam") -> None:
        self.proc = start_node_process(
            ["-p", f"model:={model}", "-p", f"image_transport:={transport}", "-p", "qos_reliability:=reliable",
             "-p", "diagnostics_period:=0.3", "-p", "backend:=onnx", "-r", f"__ns:={ns}", *extra],
            tmp / f"node_{transport}.log")
        self.log = tmp / f"node_{transport}.log"
        self.context = init_context()
        self.node = rclpy.create_node("node_test_driver", context=self.context)
        msg_type = CompressedImage if transport == "compressed" else Image
        topic = f"{ns}/image/compressed" if transport == "compressed" else f"{ns}/image"
        self.pub = self.node.create_publisher(msg_type, topic, RELIABLE)
        self.labels = Collector(self.node, Image, f"{ns}/labels")
        self.color = Collector(self.node, Image, f"{ns}/labels/color")
        self.confidence = Collector(self.node, Image, f"{ns}/labels/confidence")
        self.diag = Collector(self.node, DiagnosticArray, "/diagnostics")
        self.spinner = Spinner(self.node)
        wait_for(lambda: self.proc.poll() is None and self.pub.get_subscription_count() > 0
                 and self.labels.sub.get_publisher_count() > 0, 60,
                 f"segment_node to start (log: {self.log.read_text()})")

    def send(self, msg, timeout: float = 20.0) -> Image:
        stamp = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        self.pub.publish(msg)
        match = lambda m: (m.header.stamp.sec, m.header.stamp.nanosec) == stamp  # noqa: E731
        wait_for(lambda: self.labels.find(match) is not None, timeout, f"labels for stamp {stamp}")
        return self.labels.find(match)

    def diagnostics_value(self, key: str) -> int:
        last = self.diag.messages[-1].status[0]
        return int({kv.key: kv.value for kv in last.values}[key])

    def close(self) -> int:
        self.spinner.stop()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        return stop_process(self.proc)


@pytest.fixture(scope="module")
def raw_node(tmp_path_factory, tiny_model_dir, ros_domain_id):
    h = Harness(tmp_path_factory.mktemp("raw"), tiny_model_dir, "raw", ["-p", f"stats_window:={STATS_WINDOW}"])
    yield h
    assert h.close() == 0, h.log.read_text()


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Segmenter(tiny_model_dir, backend="onnx")


def labels_array(msg: Image) -> np.ndarray:
    assert msg.encoding == "mono8" and msg.step == msg.width
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width)


@pytest.mark.parametrize("encoding,width,height,pad", [
    ("rgb8", 97, 61, 0), ("bgr8", 333, 127, 5), ("rgba8", 64, 48, 0), ("bgra8", 50, 31, 2),
    ("mono8", 101, 77, 3), ("mono16", 80, 45, 0), ("rgb8", 1920, 1080, 0),
])
def test_labels_equal_engine_and_header_copied(raw_node, engine, encoding, width, height, pad):
    msg = make_image(1000 + width, width, height, encoding, pad)
    out = raw_node.send(msg)
    assert out.header.frame_id == "camera_optical"
    assert (out.header.stamp.sec, out.header.stamp.nanosec) == (msg.header.stamp.sec, msg.header.stamp.nanosec)
    assert (out.height, out.width) == (height, width)
    expected = engine.segment(image_to_rgb(msg)).labels
    np.testing.assert_array_equal(labels_array(out), expected)


def test_same_size_frames_each_get_their_own_labels(raw_node, engine):
    """The label message's buffer is refilled per frame: consecutive frames of one size never mix."""
    for stamp in (7001, 7002, 7003):
        msg = make_image(stamp, 160, 90, "rgb8")
        out = raw_node.send(msg)
        assert out.header.stamp.sec == stamp
        np.testing.assert_array_equal(labels_array(out), engine.segment(image_to_rgb(msg)).labels)


def test_image_message_refills_a_matching_message():
    gen = np.random.default_rng(3)
    first, second = (gen.integers(0, 19, (6, 10), dtype=np.uint8) for _ in range(2))
    a = image_message(Header(frame_id="a"), first, "mono8")
    b = image_message(Header(frame_id="b"), second, "mono8", reuse=a)
    assert b is a and b.header.frame_id == "b"
    np.testing.assert_array_equal(np.frombuffer(b.data, np.uint8).reshape(6, 10), second)
    # Another size or encoding: a new message, the old one untouched.
    c = image_message(Header(), second[:5], "mono8", reuse=b)
    d = image_message(Header(), np.stack([second] * 3, axis=-1), "rgb8", reuse=b)
    assert c is not b and d is not b and (c.height, d.encoding) == (5, "rgb8")
    np.testing.assert_array_equal(np.frombuffer(b.data, np.uint8).reshape(6, 10), second)


def test_diagnostics_report_latency_inference_and_overhead_over_the_window(raw_node):
    for stamp in range(7101, 7101 + STATS_WINDOW + 2):
        raw_node.send(make_image(stamp, 96, 64, "rgb8"))
    seen = len(raw_node.diag.messages)
    wait_for(lambda: len(raw_node.diag.messages) > seen + 1, 10, "diagnostics after the frames")
    values = {kv.key: kv.value for kv in raw_node.diag.messages[-1].status[0].values}
    assert int(values["stats_frames"]) == STATS_WINDOW  # the window, not every frame so far
    latency, inference = float(values["latency_median_ms"]), float(values["inference_median_ms"])
    overhead = float(values["overhead_median_ms"])
    # Per frame, latency = inference + overhead, so the overhead's median lies below the latency's.
    assert 0 < inference < latency and 0 < overhead < latency
    # Which device, providers and arithmetic the node took (device auto on a machine without a GPU provider).
    if values["backend"] == "onnxruntime/cpu":
        assert values["device"] == "cpu (ONNX Runtime providers: CPUExecutionProvider)"
    assert values["device"].startswith(values["backend"].split("/")[1] + " (") and values["precision"] == "fp32"
    assert f"model tiny_test on {values['device']}" in raw_node.log.read_text()


def test_colour_and_confidence_published_when_subscribed(raw_node):
    wait_for(lambda: raw_node.color.sub.get_publisher_count() > 0, 10, "color publisher")
    msg = make_image(5000, 64, 40, "rgb8")
    raw_node.send(msg)
    stamp = lambda m: m.header.stamp.sec == 5000  # noqa: E731
    wait_for(lambda: raw_node.color.find(stamp) and raw_node.confidence.find(stamp), 10, "color and confidence")
    color = raw_node.color.find(stamp)
    assert color.encoding == "rgb8" and (color.height, color.width) == (40, 64)


def test_malformed_frames_are_counted_and_survived(raw_node):
    bad = []
    m = make_image(6001, 32, 32, "rgb8")
    m.step = 50  # step × height no longer matches the data
    bad.append(m)
    m = make_image(6002, 32, 32, "rgb8")
    m.encoding = "yuv422_yuy2"
    bad.append(m)
    m = make_image(6003, 32, 32, "rgb8")
    m.height, m.width, m.step, m.data = 0, 0, 0, array.array("B")
    bad.append(m)
    m = make_image(6004, 32, 32, "rgb8")
    m.data = m.data[:100]  # truncated
    bad.append(m)
    wait_for(lambda: raw_node.diag.messages, 20, "diagnostics")
    before = raw_node.diagnostics_value("frames_malformed")
    for i, msg in enumerate(bad, 1):
        # One at a time: frames sent back to back may be dropped by "latest frame wins" instead.
        raw_node.pub.publish(msg)
        wait_for(lambda: raw_node.diagnostics_value("frames_malformed") >= before + i, 20,
                 f"diagnostics counting malformed frame {i}")
    assert raw_node.proc.poll() is None
    out = raw_node.send(make_image(6100, 40, 30, "bgr8"))  # still alive and segmenting
    assert (out.width, out.height) == (40, 30)
    assert not any(raw_node.labels.find(lambda x, s=s: x.header.stamp.sec == s) for s in (6001, 6002, 6003, 6004))


def test_compressed_input(tmp_path, tiny_model_dir, engine, ros_domain_id):
    h = Harness(tmp_path, tiny_model_dir, "compressed")
    try:
        rgb = rng.integers(0, 256, size=(71, 133, 3), dtype=np.uint8)
        msg = CompressedImage(header=Header(stamp=Time(sec=7000), frame_id="cam_front"), format="jpeg")
        msg.data = array.array("B", encode_jpeg(rgb))
        out = h.send(msg)
        assert out.header.frame_id == "cam_front" and (out.width, out.height) == (133, 71)
        np.testing.assert_array_equal(labels_array(out), engine.segment(compressed_to_rgb(msg)).labels)
        corrupt = CompressedImage(header=Header(stamp=Time(sec=7001)), format="jpeg")
        corrupt.data = array.array("B", encode_jpeg(rgb)[:40] + b"\x00" * 30)
        h.pub.publish(corrupt)
        wait_for(lambda: h.diag.messages and h.diagnostics_value("frames_malformed") >= 1, 20, "corrupt JPEG counted")
        out = h.send(CompressedImage(header=Header(stamp=Time(sec=7002)), format="jpeg",
                                     data=array.array("B", encode_jpeg(rgb))))
        assert out.header.stamp.sec == 7002
    finally:
        assert h.close() == 0, h.log.read_text()


def test_coarse_to_fine_package(tmp_path, tiny_c2f_dir, ros_domain_id):
    """A coarse-to-fine package runs unchanged in the node; mode and thresholds are parameters."""
    frame = make_image(8000, 300, 150, "rgb8")
    rgb = image_to_rgb(frame)
    for mode, theta, c_tau in (("coarse_to_fine", 0.9, 1.0), ("coarse", 0.9, 1.0)):
        params = [f"inference_mode:={mode}", f"confidence_threshold:={theta}", f"refine_fraction:={c_tau}"]
        # CUDA graphs asked for where there is no CUDA provider: each graph runs without, and the log says why.
        params += ["cuda_graph:=true"] if mode == "coarse" else []
        h = Harness(tmp_path, tiny_c2f_dir, "raw", [arg for p in params for arg in ("-p", p)], ns="/c2f")
        try:
            out = h.send(frame)
            engine = Segmenter(tiny_c2f_dir, backend="onnx", inference_mode=mode, theta=theta, c_tau=c_tau)
            expected = engine.segment(rgb)
            assert (mode == "coarse") == (expected.windows_refined == 0)
            np.testing.assert_array_equal(labels_array(out), expected.labels)

            def ours(msg, mode=mode):  # the module's other node publishes /diagnostics too
                values = {kv.key: kv.value for kv in msg.status[0].values}
                return msg.status[0].hardware_id == "tiny_c2f_test" and values.get("inference_mode") == mode

            wait_for(lambda: h.diag.find(ours) is not None, 20, "diagnostics with the mode")
            values = {kv.key: kv.value for kv in h.diag.find(ours).status[0].values}
            assert ("windows_refined_share" in values) == (mode == "coarse_to_fine")
        finally:
            assert h.close() == 0, h.log.read_text()
        log = h.log.read_text()
        assert ("cuda_graph, coarse graph: " in log) == (mode == "coarse")


@pytest.mark.parametrize("package", ["tiny_mfuser_dir", "tiny_depthforge_dir"], ids=["mfuser", "depthforge"])
def test_slide_package(tmp_path, package, request, ros_domain_id):
    """Slide packages (MFuser; DepthForge with DINOv2 and Depth Anything V2 in one graph) run unchanged."""
    directory = request.getfixturevalue(package)
    frame = make_image(9000, 200, 130, "rgb8")
    h = Harness(tmp_path, directory, "raw", ["-p", "window_batch:=4"], ns="/" + package.split("_")[1])
    try:
        out = h.send(frame)
        assert (out.width, out.height) == (200, 130) and out.header.frame_id == "camera_optical"
        expected = Segmenter(directory, backend="onnx").segment(image_to_rgb(frame))
        np.testing.assert_array_equal(labels_array(out), expected.labels)
        assert len(np.unique(expected.labels)) >= 2
    finally:
        assert h.close() == 0, h.log.read_text()


def test_bad_model_exits_with_clear_error(tmp_path, ros_domain_id):
    proc = start_node_process(["-p", f"model:={tmp_path / 'missing'}"], tmp_path / "log.txt")
    proc.wait(timeout=60)
    assert proc.returncode == 2
    assert "model package not found" in (tmp_path / "log.txt").read_text()


def test_burst_latest_frame_wins_and_every_frame_is_accounted_for(raw_node):
    wait_for(lambda: raw_node.diag.messages, 20, "diagnostics")
    frames = [make_image(8000 + i, 1280, 720, "rgb8") for i in range(20)]
    for msg in frames:  # back to back, faster than the worker segments them
        raw_node.pub.publish(msg)
    last = frames[-1].header.stamp.sec
    wait_for(lambda: raw_node.labels.find(lambda m: m.header.stamp.sec == last) is not None, 30,
             "labels of the newest frame")

    def balanced() -> bool:
        status = {kv.key: int(kv.value) for kv in raw_node.diag.messages[-1].status[0].values
                  if kv.key.startswith("frames_")}
        return status["frames_received"] == (status["frames_processed"] + status["frames_dropped"]
                                             + status["frames_malformed"] + status["frames_errors"]
                                             + status["frames_idle"])
    wait_for(balanced, 10, "received = processed + dropped + malformed + errors + idle")
    burst = [m for m in raw_node.labels.messages if 8000 <= m.header.stamp.sec < 8020]
    stamps = [m.header.stamp.sec for m in burst]
    assert stamps == sorted(stamps)  # newest-first never reorders
