"""Fuzzing the frame conversion, and a running node, with malformed images.

Two levels:

* property-based tests (hypothesis) on :func:`image_to_rgb` and :func:`compressed_to_rgb`: any
  Image-like or CompressedImage-like input either converts to an RGB uint8 frame of the right size
  (checked against an independent reference) or raises :class:`FrameError`;
* a seeded stream of malformed frames published over real DDS at segment_node in a subprocess,
  interleaved with valid frames: the node stays up, counts every frame, keeps segmenting the
  valid ones and does not grow in memory.
"""

from __future__ import annotations

import array
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import psutil
import pytest
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from dgss_perception.codec import ENCODINGS, FrameError, compressed_to_rgb, image_to_rgb

from rosutil import RELIABLE, Collector, Spinner, init_context, start_node_process, stop_process, wait_for

UINT32_MAX = 2**32 - 1
SUPPORTED = tuple(ENCODINGS)
# Real ROS encodings the codec does not convert, plus strings that only look like encodings.
UNSUPPORTED = ("yuv422", "yuv422_yuy2", "uyvy", "nv21", "bayer_rggb8", "bayer_bggr16", "8UC1", "8UC3", "8UC4",
               "16UC1", "16SC1", "32SC1", "32FC1", "64FC1", "rgb16", "rgba16", "jpeg", "", " rgb8", "rgb8\x00")
GUARD_BYTE = 0xA5
# Keeps generated payloads small; geometry alone still reaches the huge cases.
PAYLOAD_CAP = 48 * 1024

# No example database: nothing is written into the checkout; a failure prints its reproducing example.
PROPERTY_SETTINGS = settings(max_examples=1500, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


# -- reference conversion, written independently of the codec -------------------------------------------------------
def reference_rgb(height: int, width: int, step: int, encoding: str, bigendian: bool, payload: bytes) -> np.ndarray:
    """Rows cut out of the payload by hand, channels converted by OpenCV."""
    channels, depth = ENCODINGS[encoding.lower()]
    row = width * channels * depth
    rows = b"".join(payload[r * step: r * step + row] for r in range(height))
    assert len(rows) == height * row
    if depth == 2:
        values = np.frombuffer(rows, dtype=">u2" if bigendian else "<u2").reshape(height, width)
        # v·255/65535 = v/257 never lies exactly halfway, so round-half-up is unambiguous.
        gray = np.floor(values.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    pixels = np.frombuffer(rows, np.uint8)
    if channels == 1:
        return cv2.cvtColor(pixels.reshape(height, width), cv2.COLOR_GRAY2RGB)
    pixels = pixels.reshape(height, width, channels)
    code = {"rgb8": None, "bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB,
            "bgra8": cv2.COLOR_BGRA2RGB}[encoding.lower()]
    return pixels.copy() if code is None else cv2.cvtColor(np.ascontiguousarray(pixels), code)


def wrap_payload(payload: bytes, container: str) -> Any:
    """The payload in one of the buffer types messages carry (rclpy: array.array, rosbags: numpy)."""
    if container == "bytes":
        return payload
    if container == "bytearray":
        return bytearray(payload)
    if container == "array":
        return array.array("B", payload)
    if container == "numpy":
        return np.frombuffer(payload, np.uint8).copy()
    # A view into a larger buffer with guard bytes either side: reading past the view would pick them up.
    guarded = bytes([GUARD_BYTE]) * 64 + payload + bytes([GUARD_BYTE]) * 64
    return memoryview(guarded)[64: 64 + len(payload)]


# -- strategies --------------------------------------------------------------------------------------------------------
# Supported encodings twice over: near-valid frames (off by one byte or one row) are the interesting ones.
encodings = st.one_of(st.sampled_from(SUPPORTED), st.sampled_from(SUPPORTED), st.sampled_from(SUPPORTED).map(str.upper),
                      st.sampled_from(UNSUPPORTED), st.text(max_size=12))
CONTAINERS = ("bytes", "bytearray", "array", "numpy", "guarded")


def dims(signed: bool) -> st.SearchStrategy[int]:
    """Mostly small sizes, plus zero and the huge values that overflow naive size arithmetic."""
    huge = st.sampled_from([16384, 16385, 65535, 100000, 2**31, UINT32_MAX])
    options = [st.integers(0, 40), st.integers(1, 40), st.integers(1, 3), huge]
    if signed:
        options.append(st.integers(-3, -1))
    return st.one_of(*options)


@st.composite
def image_fields(draw: st.DrawFn, signed: bool) -> dict[str, Any]:
    """Field values of an Image: consistent, nearly consistent or arbitrary."""
    encoding = draw(encodings)
    channels, depth = ENCODINGS.get(encoding.lower(), (draw(st.integers(1, 4)), draw(st.integers(1, 2))))
    height, width = draw(dims(signed)), draw(dims(signed))
    row = width * channels * depth
    step_options = [st.just(row), st.integers(1, 9).map(lambda p: row + p), st.just(row - 1),
                    st.integers(0, UINT32_MAX)]
    if signed:
        step_options += [st.integers(-(2**40), -1), st.just(2**63)]
    step = draw(st.one_of(*step_options))
    if not signed:
        step = min(max(step, 0), UINT32_MAX)
    expected = step * height
    size_options = [st.integers(0, 4096)]
    if 0 <= expected <= PAYLOAD_CAP:
        size_options += [st.just(expected), st.just(expected), st.integers(0, expected),
                         st.integers(1, 64).map(lambda k: expected + k)]
    size = draw(st.one_of(*size_options))
    seed = draw(st.integers(0, UINT32_MAX))
    payload = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    bigendian = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 255)) if not signed
                     else st.one_of(st.booleans(), st.integers(-2, 300)))
    return {"height": height, "width": width, "step": step, "encoding": encoding, "is_bigendian": bigendian,
            "payload": payload}


def check_image_conversion(msg: Any, fields: dict[str, Any]) -> None:
    """The property: a correct RGB frame or FrameError; the message is left untouched."""
    before = bytes(memoryview(msg.data).cast("B"))
    try:
        rgb = image_to_rgb(msg, use_cv_bridge=False)
    except FrameError as exc:
        event(f"FrameError: {str(exc).split(' ')[0]}")  # --hypothesis-show-statistics shows the mix of outcomes
        assert bytes(memoryview(msg.data).cast("B")) == before
        return
    event("converted")
    assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8
    assert rgb.shape == (fields["height"], fields["width"], 3)
    expected = reference_rgb(fields["height"], fields["width"], fields["step"], fields["encoding"],
                             bool(fields["is_bigendian"]), fields["payload"])
    np.testing.assert_array_equal(rgb, expected)
    assert bytes(memoryview(msg.data).cast("B")) == before


@PROPERTY_SETTINGS
@given(fields=image_fields(signed=True), container=st.sampled_from(CONTAINERS))
def test_image_like_object_converts_or_raises_frame_error(fields: dict[str, Any], container: str) -> None:
    msg = SimpleNamespace(header=None, **{k: v for k, v in fields.items() if k != "payload"},
                          data=wrap_payload(fields["payload"], container))
    check_image_conversion(msg, fields)


@PROPERTY_SETTINGS
@given(fields=image_fields(signed=False))
def test_real_image_message_converts_or_raises_frame_error(fields: dict[str, Any]) -> None:
    msg = Image(height=fields["height"], width=fields["width"], step=fields["step"], encoding=fields["encoding"],
                is_bigendian=fields["is_bigendian"])
    msg.data = array.array("B", fields["payload"])
    check_image_conversion(msg, fields)


@settings(max_examples=200, deadline=None, database=None)
@given(encoding=st.sampled_from(SUPPORTED), height=st.integers(1, 24), width=st.integers(1, 24),
       pad=st.integers(0, 7), seed=st.integers(0, UINT32_MAX), bigendian=st.booleans())
def test_every_valid_frame_converts(encoding: str, height: int, width: int, pad: int, seed: int,
                                    bigendian: bool) -> None:
    # The random strategy reaches valid frames only now and then; this one checks them all, padding included.
    channels, depth = ENCODINGS[encoding]
    step = width * channels * depth + pad
    payload = np.random.default_rng(seed).integers(0, 256, step * height, dtype=np.uint8).tobytes()
    fields = {"height": height, "width": width, "step": step, "encoding": encoding, "is_bigendian": int(bigendian),
              "payload": payload}
    msg = Image(height=height, width=width, step=step, encoding=encoding, is_bigendian=int(bigendian))
    msg.data = array.array("B", payload)
    rgb = image_to_rgb(msg, use_cv_bridge=False)
    check_image_conversion(msg, fields)
    assert rgb.shape == (height, width, 3)


def test_image_to_rgb_returns_a_new_array() -> None:
    payload = bytes(range(12))
    msg = SimpleNamespace(height=2, width=2, step=6, encoding="rgb8", is_bigendian=0, data=bytearray(payload))
    rgb = image_to_rgb(msg, use_cv_bridge=False)
    assert not np.shares_memory(rgb, np.frombuffer(msg.data, np.uint8))
    view = image_to_rgb(msg, use_cv_bridge=False, copy=False)  # the node's path: no copy, but read-only
    assert np.shares_memory(view, np.frombuffer(msg.data, np.uint8)) and not view.flags.writeable
    np.testing.assert_array_equal(view, rgb)
    padded = SimpleNamespace(height=2, width=2, step=8, encoding="rgb8", is_bigendian=0, data=bytearray(range(16)))
    assert image_to_rgb(padded, use_cv_bridge=False, copy=False).flags.c_contiguous  # padding: a packed copy


# -- compressed frames -------------------------------------------------------------------------------------------------
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff", b"BM", b"P6\n", b"P5\n", b"P6\n30000 30000\n255\n",
         b"P5\n100000 100000\n255\n", b"RIFF\x00\x00\x00\x00WEBP", b"II*\x00", b"MM\x00*", b"GIF89a", b"#?RADIANCE\n",
         b"PF\n", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"v/1\x01")
ENCODERS = (".png", ".jpg", ".bmp", ".webp", ".tiff", ".ppm", ".gif")
LOSSLESS = (".png",)  # of the formats compressed_to_rgb accepts (JPEG, PNG)


def encode_with(ext: str, pixels: np.ndarray) -> bytes:
    """Encode with OpenCV; formats that cannot hold the array fall back to PNG."""
    try:
        ok, buf = cv2.imencode(ext, pixels)
    except cv2.error:
        ok, buf = False, None
    if not ok:
        ok, buf = cv2.imencode(".png", pixels)
    return buf.tobytes()


@st.composite
def compressed_payloads(draw: st.DrawFn) -> tuple[bytes, np.ndarray | None]:
    """(payload, expected RGB where the payload is an intact lossless image, else None)."""
    kind = draw(st.sampled_from(["random", "empty", "magic", "intact", "truncated", "flipped"]))
    rng = np.random.default_rng(draw(st.integers(0, UINT32_MAX)))
    if kind == "empty":
        return b"", None
    if kind == "random":
        return rng.integers(0, 256, draw(st.integers(1, 2048)), dtype=np.uint8).tobytes(), None
    if kind == "magic":
        return draw(st.sampled_from(MAGIC)) + rng.integers(0, 256, draw(st.integers(0, 512)), np.uint8).tobytes(), None
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    channels = draw(st.sampled_from([1, 3, 4]))
    sixteen = draw(st.booleans()) and kind != "intact"
    dtype = np.uint16 if sixteen else np.uint8
    pixels = rng.integers(0, np.iinfo(dtype).max + 1, (height, width, channels), dtype=dtype)
    pixels = pixels[:, :, 0] if channels == 1 else pixels
    ext = draw(st.sampled_from(ENCODERS))
    encoded = encode_with(ext, pixels)
    if kind == "truncated":
        return encoded[: draw(st.integers(0, len(encoded) - 1))], None
    if kind == "flipped":
        corrupt = bytearray(encoded)
        for _ in range(draw(st.integers(1, 8))):
            corrupt[draw(st.integers(0, len(corrupt) - 1))] ^= draw(st.integers(1, 255))
        return bytes(corrupt), None
    expected = None
    if ext not in (".png", ".jpg"):  # other formats are refused (no size check before decoding)
        return encoded, None
    if ext in LOSSLESS and channels == 3:
        expected = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    elif ext in LOSSLESS and channels == 1:
        expected = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    return encoded, (expected if expected is not None else np.empty((height, width, 0), np.uint8))


def check_compressed_conversion(msg: Any, expected: np.ndarray | None) -> None:
    """The property: an RGB uint8 H×W×3 frame or FrameError; intact images decode to their size."""
    try:
        rgb = compressed_to_rgb(msg)
    except FrameError:
        event("FrameError")
        assert expected is None, "an intact image was refused"
        return
    event("decoded")
    assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[0] > 0 and rgb.shape[1] > 0
    if expected is not None:
        assert rgb.shape[:2] == expected.shape[:2]
        if expected.shape[2] == 3:  # lossless 8-bit: pixel exact
            np.testing.assert_array_equal(rgb, expected)


@PROPERTY_SETTINGS
@given(case=compressed_payloads(), container=st.sampled_from(CONTAINERS[:4]),
       fmt=st.one_of(st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8", ""]), st.text(max_size=12)))
def test_compressed_like_object_decodes_or_raises_frame_error(case: tuple[bytes, np.ndarray | None], container: str,
                                                              fmt: str) -> None:
    payload, expected = case
    check_compressed_conversion(SimpleNamespace(format=fmt, data=wrap_payload(payload, container)), expected)


@settings(max_examples=600, deadline=None, database=None)
@given(case=compressed_payloads())
def test_real_compressed_message_decodes_or_raises_frame_error(case: tuple[bytes, np.ndarray | None]) -> None:
    payload, expected = case
    msg = CompressedImage(format="jpeg")
    msg.data = array.array("B", payload)
    check_compressed_conversion(msg, expected)


def test_compressed_frame_over_pixel_limit_is_refused() -> None:
    ok, buf = cv2.imencode(".png", np.zeros((20000, 20000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    with pytest.raises(FrameError):
        compressed_to_rgb(SimpleNamespace(format="png", data=buf.tobytes()))
    ok, buf = cv2.imencode(".tiff", np.zeros((20000, 20000), np.uint8))  # decoding it would take ~4 GB
    with pytest.raises(FrameError, match="neither JPEG nor PNG"):
        compressed_to_rgb(SimpleNamespace(format="tiff", data=buf.tobytes()))


# -- a running node ----------------------------------------------------------------------------------------------------
MESSAGE_CAP = 1_000_000  # bytes of data per message: keeps the DDS side of the test fast
# Diagnostics at 20 Hz so waiting for each frame to be counted costs ~50 ms rather than ~300 ms.
DIAG_PERIOD = 0.05
COUNTERS = ("received", "processed", "dropped", "malformed", "errors", "idle")


@dataclass
class FrameSpec:
    """A frame to publish, small until built: geometry, payload length and the seed of its bytes."""

    kind: str
    height: int
    width: int
    step: int
    encoding: str
    is_bigendian: int
    size: int
    seed: int

    def build(self, stamp: int) -> Image:
        msg = Image(header=Header(stamp=Time(sec=stamp, nanosec=stamp % 1000), frame_id=f"fuzz_{self.kind}"),
                    height=self.height, width=self.width, step=self.step, encoding=self.encoding,
                    is_bigendian=self.is_bigendian)
        msg.data = array.array("B", np.random.default_rng(self.seed).bytes(self.size))
        return msg


def valid_spec(rng: np.random.Generator, max_side: int = 400) -> FrameSpec:
    encoding = str(rng.choice(SUPPORTED))
    channels, depth = ENCODINGS[encoding]
    # 1-pixel-wide or -high frames are valid too and must come back at their size.
    height = int(rng.choice([1, 2, int(rng.integers(1, max_side))]))
    width = int(rng.choice([1, 3, int(rng.integers(1, max_side))]))
    step = width * channels * depth + int(rng.integers(0, 8))
    return FrameSpec("valid", height, width, step, encoding, int(rng.integers(0, 2)), step * height,
                     int(rng.integers(2**32)))


def malformed_spec(rng: np.random.Generator) -> FrameSpec:
    """One of several ways to break an Image, with payloads up to MESSAGE_CAP."""
    kind = str(rng.choice(["short_step", "truncated", "extended", "unsupported", "empty", "huge", "overflow"]))
    encoding = str(rng.choice(SUPPORTED))
    channels, depth = ENCODINGS[encoding]
    height, width = int(rng.integers(1, 600)), int(rng.integers(1, 600))
    while height * width * channels * depth > MESSAGE_CAP - 8 * height:
        height = max(1, height // 2)
    row = width * channels * depth
    step = row + int(rng.integers(0, 8))
    size = step * height
    if kind == "short_step":
        step = int(rng.integers(0, row))
    elif kind == "truncated":
        size = int(rng.integers(0, size))
    elif kind == "extended":
        size = min(size + int(rng.integers(1, 4096)), MESSAGE_CAP)
        if size == step * height:
            size -= 1
    elif kind == "unsupported":
        encoding = str(rng.choice(UNSUPPORTED)) if rng.random() < 0.7 else \
            "".join(chr(c) for c in rng.integers(32, 127, int(rng.integers(1, 20))))
    elif kind == "empty":
        height, width = (0, width) if rng.random() < 0.5 else (height, 0)
        step = int(rng.integers(0, 4096))
        size = int(rng.integers(0, 4096))
    elif kind == "huge":
        height, width = int(rng.integers(1, 100001)), int(rng.integers(1, 100001))
        step = min(width * channels * depth, UINT32_MAX)
        size = int(rng.integers(0, MESSAGE_CAP))
    else:  # overflow: step·height far beyond any buffer, near the uint32 limits
        step = int(rng.integers(2**31, UINT32_MAX + 1))
        height = int(rng.integers(1, 100001))
        width = int(rng.integers(1, 100001))
        size = int(rng.integers(0, 65536))
    return FrameSpec(kind, height, width, step, encoding, int(rng.integers(0, 256)), size, int(rng.integers(2**32)))


def image_plan(seed: int, bad: int, valid_every: int) -> list[FrameSpec]:
    """A fixed, seeded sequence: ``bad`` malformed frames with a valid one after every ``valid_every``."""
    rng = np.random.default_rng(seed)
    plan: list[FrameSpec] = []
    for i in range(bad):
        plan.append(malformed_spec(rng))
        if (i + 1) % valid_every == 0:
            plan.append(valid_spec(rng))
    return plan


@dataclass
class CompressedSpec:
    """A compressed frame: its bytes are made from the seed at build time."""

    kind: str
    seed: int

    def payload(self) -> bytes:
        rng = np.random.default_rng(self.seed)
        if self.kind == "empty":
            return b""
        if self.kind == "random":
            return rng.bytes(int(rng.integers(1, MESSAGE_CAP)))
        if self.kind == "magic":
            return bytes(MAGIC[int(rng.integers(len(MAGIC)))]) + rng.bytes(int(rng.integers(0, MESSAGE_CAP - 64)))
        height, width = int(rng.integers(1, 480)), int(rng.integers(1, 640))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ext = ".jpg" if self.kind.endswith("jpeg") else ".png"
        encoded = cv2.imencode(ext, pixels)[1].tobytes()
        if self.kind.startswith("truncated"):
            return encoded[: int(rng.integers(0, len(encoded)))]
        if self.kind.startswith("flipped"):
            corrupt = bytearray(encoded)
            for pos in rng.integers(0, len(corrupt), int(rng.integers(1, 16))):
                corrupt[pos] ^= 0xFF
            return bytes(corrupt)
        return encoded

    def build(self, stamp: int) -> CompressedImage:
        msg = CompressedImage(header=Header(stamp=Time(sec=stamp, nanosec=stamp % 1000), frame_id=f"fuzz_{self.kind}"),
                              format="png" if self.kind.endswith("png") else "jpeg")
        msg.data = array.array("B", self.payload()[:MESSAGE_CAP])
        return msg


def compressed_plan(seed: int, count: int) -> list[CompressedSpec]:
    rng = np.random.default_rng(seed)
    # Weighted towards the large malformed payloads, so that a per-frame leak would show in the RSS.
    kinds = {"empty": 0.04, "random": 0.2, "magic": 0.2, "truncated_jpeg": 0.08, "truncated_png": 0.12,
             "flipped_jpeg": 0.06, "flipped_png": 0.14, "intact_jpeg": 0.08, "intact_png": 0.08}
    names, weights = list(kinds), np.array(list(kinds.values()))
    return [CompressedSpec(str(rng.choice(names, p=weights / weights.sum())), int(rng.integers(2**32)))
            for _ in range(count)]


def expected_size(msg: Any) -> tuple[int, int] | None:
    """(height, width) of the labels the node must publish, or None where it must count the frame malformed."""
    try:
        rgb = compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg, use_cv_bridge=False)
    except FrameError:
        return None
    return rgb.shape[0], rgb.shape[1]


class FuzzHarness:
    """segment_node in a subprocess under /fuzz…, a driver node here that publishes and listens."""

    def __init__(self, tmp: Path, model: Path, transport: str, namespace: str) -> None:
        self.log = tmp / f"{namespace.strip('/')}.log"
        self.proc = start_node_process(
            ["-p", f"model:={model}", "-p", f"image_transport:={transport}", "-p", "qos_reliability:=reliable",
             "-p", f"diagnostics_period:={DIAG_PERIOD}", "-p", "backend:=onnx", "-r", f"__ns:={namespace}"], self.log)
        self.ps = psutil.Process(self.proc.pid)
        self.context = init_context()
        self.node = rclpy.create_node("fuzz_driver", context=self.context)
        msg_type = CompressedImage if transport == "compressed" else Image
        topic = f"{namespace}/image/compressed" if transport == "compressed" else f"{namespace}/image"
        self.pub = self.node.create_publisher(msg_type, topic, RELIABLE)
        # Subscribing to labels is what makes the lazy node subscribe its input.
        self.labels = Collector(self.node, Image, f"{namespace}/labels")
        self.status_name = f"{namespace}/segment_node: segmentation"
        self.counters: dict[str, int] = {}
        self.diag_sub = self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, RELIABLE)
        self.spinner = Spinner(self.node)
        self.sent = 0
        wait_for(lambda: self.alive() and self.pub.get_subscription_count() > 0 and bool(self.counters), 60,
                 f"segment_node to start (log: {self.log.read_text()})")

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == self.status_name:
                values = {kv.key: kv.value for kv in status.values}
                # One snapshot replaces the other whole, so readers never see counters from two messages.
                self.counters = {c: int(values[f"frames_{c}"]) for c in COUNTERS}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def settled(self) -> bool:
        """All sent frames received, and every received frame ended in exactly one counter."""
        c = self.counters
        handled = c["processed"] + c["dropped"] + c["malformed"] + c["errors"] + c["idle"]
        return c["received"] == self.sent and handled == c["received"]

    def publish_and_settle(self, msg: Any, want: tuple[int, int] | None, timeout: float = 30.0) -> None:
        """Publish one frame, wait until it is counted (and its labels arrive where it is valid)."""
        assert self.alive(), f"segment_node died (log: {self.log.read_text()[-3000:]})"
        stamp = msg.header.stamp.sec
        self.pub.publish(msg)
        self.sent += 1
        what = f"frame {stamp} ({msg.header.frame_id}) to be counted"
        wait_for(lambda: self.settled() or not self.alive(), timeout, what)
        assert self.alive(), f"segment_node died on frame {stamp} ({msg.header.frame_id}): " \
                             f"{self.log.read_text()[-3000:]}"
        if want is not None:
            wait_for(lambda: self.labels.find(lambda m: m.header.stamp.sec == stamp) is not None, timeout,
                     f"labels of valid frame {stamp}")
            out = self.labels.find(lambda m: m.header.stamp.sec == stamp)
            assert (out.height, out.width) == want, f"labels {out.width}x{out.height} for a {want[1]}x{want[0]} frame"
            assert out.header.frame_id == msg.header.frame_id
            assert out.header.stamp.nanosec == msg.header.stamp.nanosec
            assert out.encoding == "mono8" and len(out.data) == out.height * out.width

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def close(self) -> int:
        self.spinner.stop()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        return stop_process(self.proc)


def run_plan(h: FuzzHarness, plan: list[Any], first_stamp: int) -> tuple[int, int, int, int]:
    """Send every frame of the plan; returns (bad frames, valid frames, bad bytes, peak RSS)."""
    bad = valid = bad_bytes = peak = 0
    for i, spec in enumerate(plan):
        msg = spec.build(first_stamp + i)
        want = expected_size(msg)
        if want is None:
            bad += 1
            bad_bytes += len(msg.data)
        else:
            valid += 1
        h.publish_and_settle(msg, want)
        peak = max(peak, h.rss())
    return bad, valid, bad_bytes, peak


# A leak that kept each malformed message (or a copy of its data) would grow the node by roughly the bytes
# sent in malformed frames; the plans send at least three times this bound in them, so such a leak fails. What
# the bound allows: allocator pools and ONNX Runtime's arena settling after warm-up (measured: 1-2 MiB).
LEAK_BOUND = 12 * 2**20


def fuzz_node(h: FuzzHarness, warmup: list[Any], plan: list[Any]) -> str:
    """Warm up, fuzz, then check the counters and the memory; returns a summary line."""
    run_plan(h, warmup, 1)
    time.sleep(0.3)  # let the worker finish its bookkeeping before the baseline is read
    base, rss_warm = dict(h.counters), h.rss()
    bad, valid, bad_bytes, peak = run_plan(h, plan, 100_000)
    time.sleep(0.3)
    rss_end, end = h.rss(), dict(h.counters)
    delta = {c: end[c] - base[c] for c in COUNTERS}
    summary = (f"{bad} malformed ({bad_bytes / 2**20:.0f} MiB) + {valid} valid frames: counters {delta}; RSS "
               f"{rss_warm / 2**20:.0f} MiB after warm-up, {rss_end / 2**20:.0f} MiB after, peak {peak / 2**20:.0f}")
    assert h.alive(), summary
    assert delta["received"] == bad + valid, summary
    assert delta["errors"] == 0 and delta["idle"] == 0, summary
    assert delta["processed"] == valid, summary
    # Accounting identity: every bad frame is either malformed or was replaced before the worker took it.
    assert delta["malformed"] + delta["dropped"] == bad, summary
    # Frames go one at a time and each is waited for, so none can be replaced in the latest-frame slot.
    assert delta["dropped"] == 0, summary
    assert bad_bytes >= 3 * LEAK_BOUND, (
        f"the plan sends too few malformed bytes for the leak bound to mean anything: {summary}")
    assert rss_end - rss_warm < LEAK_BOUND, summary
    return summary


@pytest.mark.slow
def test_node_survives_and_counts_malformed_images(tmp_path: Path, tiny_model_dir: Path, ros_domain_id: int) -> None:
    h = FuzzHarness(tmp_path, tiny_model_dir, "raw", "/fuzz")
    try:
        rng = np.random.default_rng(11)
        # Warm-up sees the largest frames and every kind of fault, so later allocations reuse pools.
        warmup = [valid_spec(rng, max_side=570) for _ in range(12)] + image_plan(seed=5, bad=40, valid_every=10)
        plan = image_plan(seed=1234, bad=300, valid_every=10)
        summary = fuzz_node(h, warmup, plan)
        print(summary)
    finally:
        code = h.close()
    assert code == 0, h.log.read_text()[-3000:]


@pytest.mark.slow
def test_node_survives_and_counts_malformed_compressed_images(tmp_path: Path, tiny_model_dir: Path,
                                                              ros_domain_id: int) -> None:
    h = FuzzHarness(tmp_path, tiny_model_dir, "compressed", "/fuzzc")
    try:
        summary = fuzz_node(h, compressed_plan(seed=3, count=30), compressed_plan(seed=77, count=180))
        print(summary)
    finally:
        code = h.close()
    assert code == 0, h.log.read_text()[-3000:]
