"""ROS 2 node: camera images in, label images out.

Topics (relative, remappable):
    in   image (sensor_msgs/Image) or image/compressed (sensor_msgs/CompressedImage)
    out  labels             mono8 trainIds, header copied from the input
         labels/color       rgb8 palette colours   (only while subscribed)
         labels/overlay     rgb8 blend over input  (only while subscribed)
         labels/confidence  mono8 max softmax ×255 (only while subscribed)
         /diagnostics       rate, latency, drops, errors

The subscription callback only stores the newest message; a worker thread
decodes, segments, encodes and publishes it. A frame replaced before the
worker took it is dropped and counted ("latest frame wins").
"""

from __future__ import annotations

import array
import statistics
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from .backends import BackendError
from .card import CardError
from .codec import FrameError, compressed_to_rgb, encode_image_fields, image_to_rgb
from .engine import BACKENDS, DEVICES, OUTPUT_RESOLUTIONS, Segmenter
from .labels import colorize, confidence_to_mono8, overlay, palette_lut

TRANSPORTS = ("raw", "compressed")
RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
INFERENCE_MODES = ("", "whole", "coarse", "coarse_to_fine")

# name → (default, description); declared up front, validated in _read_parameters.
PARAMETERS: dict[str, tuple[Any, str]] = {
    "model": ("", "model package directory (holds card.json)"),
    "backend": ("auto", "auto | onnx | torchscript"),
    "device": ("auto", "auto | cpu | cuda"),
    "image_transport": ("raw", "raw (subscribe 'image') | compressed (subscribe 'image/compressed')"),
    "qos_reliability": ("best_effort", "input QoS reliability: best_effort | reliable"),
    "qos_depth": (5, "input QoS history depth"),
    "output_qos_reliability": ("reliable", "output QoS reliability: reliable | best_effort"),
    "output_resolution": ("input", "labels at the input's size (input) or the network's (network)"),
    "overlay_alpha": (0.5, "weight of the colour mask in labels/overlay, 0–1"),
    "inference_mode": ("", "empty = the model card's mode; whole | coarse | coarse_to_fine where the card offers it"),
    "confidence_threshold": (0.968, "coarse_to_fine: max-softmax threshold θ for a confident pixel"),
    "refine_fraction": (0.8, "coarse_to_fine: refine a window when its confident fraction is below this (C_τ)"),
    "threads": (0, "CPU inference threads (0 = runtime default)"),
    "diagnostics_period": (1.0, "seconds between /diagnostics messages"),
}


class SegmentNode(Node):
    """Semantic segmentation of one camera stream with an exported model package."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("segment_node", **kwargs)
        for name, (default, description) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=description))
        p = self._read_parameters()
        self.segmenter = Segmenter(p["model"], backend=p["backend"], device=p["device"],
                                   output_resolution=p["output_resolution"], threads=p["threads"])
        card = self.segmenter.card
        mode = p["inference_mode"] or card.inference_mode
        if mode != card.inference_mode and mode not in card.graphs:
            raise ValueError(f"inference_mode '{mode}' is not offered by model {card.name} "
                             f"(it offers: {', '.join(card.graphs)})")
        self.overlay_alpha = p["overlay_alpha"]
        self.lut = palette_lut(card.palette)
        # Warm-up outside the stream: the first real frame must not pay for lazy initialisation.
        self.segmenter.segment(np.zeros((*self.segmenter.network_size, 3), np.uint8))

        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p["qos_depth"],
                             reliability=RELIABILITY[p["output_qos_reliability"]])
        self.pub_labels = self.create_publisher(Image, "labels", out_qos)
        self.pub_color = self.create_publisher(Image, "labels/color", out_qos)
        self.pub_overlay = self.create_publisher(Image, "labels/overlay", out_qos)
        self.pub_confidence = self.create_publisher(Image, "labels/confidence", out_qos)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        self._cv = threading.Condition()
        self._pending: tuple[Any, float] | None = None
        self._stopping = False
        self.counters = {"received": 0, "processed": 0, "dropped": 0, "malformed": 0, "errors": 0}
        self._latencies: deque[float] = deque(maxlen=300)
        self._inference: deque[float] = deque(maxlen=300)
        self._done_times: deque[float] = deque(maxlen=300)
        self._last_problem = ""
        self._worker = threading.Thread(target=self._work, name="segment_worker", daemon=True)
        self._worker.start()

        in_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p["qos_depth"],
                            reliability=RELIABILITY[p["qos_reliability"]])
        if p["image_transport"] == "compressed":
            self.sub = self.create_subscription(CompressedImage, "image/compressed", self._on_frame, in_qos)
        else:
            self.sub = self.create_subscription(Image, "image", self._on_frame, in_qos)
        # Wall-clock period: diagnostics keep flowing when /clock pauses during bag replay.
        self.create_timer(p["diagnostics_period"], self._publish_diagnostics,
                          clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.get_logger().info(
            f"segmenting {self.sub.topic_name} with {card.name} ({card.family}, {self.segmenter.backend.name} "
            f"on {self.segmenter.backend.device}, network {card.input_width}x{card.input_height}) → "
            f"{self.pub_labels.topic_name}")

    def _read_parameters(self) -> dict[str, Any]:
        p = {name: self.get_parameter(name).value for name in PARAMETERS}
        checks = [
            (bool(p["model"]), "parameter 'model' must name a model package directory"),
            (p["backend"] in BACKENDS, f"backend must be one of {BACKENDS}, got {p['backend']!r}"),
            (p["device"] in DEVICES, f"device must be one of {DEVICES}, got {p['device']!r}"),
            (p["image_transport"] in TRANSPORTS,
             f"image_transport must be raw or compressed, got {p['image_transport']!r}"),
            (p["qos_reliability"] in RELIABILITY,
             f"qos_reliability must be reliable or best_effort, got {p['qos_reliability']!r}"),
            (p["output_qos_reliability"] in RELIABILITY, "output_qos_reliability must be reliable or best_effort"),
            (isinstance(p["qos_depth"], int) and p["qos_depth"] >= 1, f"qos_depth must be ≥ 1, got {p['qos_depth']!r}"),
            (p["output_resolution"] in OUTPUT_RESOLUTIONS,
             f"output_resolution must be input or network, got {p['output_resolution']!r}"),
            (0.0 <= float(p["overlay_alpha"]) <= 1.0, f"overlay_alpha must lie in [0, 1], got {p['overlay_alpha']}"),
            (p["inference_mode"] in INFERENCE_MODES,
             f"inference_mode must be one of {INFERENCE_MODES[1:]}, got {p['inference_mode']!r}"),
            (0.0 < float(p["confidence_threshold"]) < 1.0, "confidence_threshold must lie in (0, 1)"),
            (0.0 <= float(p["refine_fraction"]) <= 1.0, "refine_fraction must lie in [0, 1]"),
            (float(p["diagnostics_period"]) > 0, "diagnostics_period must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        p["overlay_alpha"] = float(p["overlay_alpha"])
        return p

    # -- subscription side: cheap, never blocks on inference -------------------------------------
    def _on_frame(self, msg: Any) -> None:
        with self._cv:
            self.counters["received"] += 1
            if self._pending is not None:
                self.counters["dropped"] += 1
            self._pending = (msg, time.monotonic())
            self._cv.notify()

    # -- worker: decode → engine → encode → publish ----------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                msg, received = self._pending
                self._pending = None
            self._process(msg, received)

    def _process(self, msg: Any, received: float) -> None:
        try:
            rgb = compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg)
        except FrameError as exc:
            self._problem("malformed", f"skipped a malformed frame: {exc}")
            return
        try:
            result = self.segmenter.segment(rgb)
            self.pub_labels.publish(image_message(msg.header, result.labels, "mono8"))
            color = None
            if self.pub_color.get_subscription_count() or self.pub_overlay.get_subscription_count():
                color = colorize(result.labels, self.lut)
            if self.pub_color.get_subscription_count():
                self.pub_color.publish(image_message(msg.header, color, "rgb8"))
            if self.pub_overlay.get_subscription_count():
                base = rgb if color.shape == rgb.shape else _resize_like(rgb, color)
                self.pub_overlay.publish(image_message(msg.header, overlay(base, color, self.overlay_alpha), "rgb8"))
            if self.pub_confidence.get_subscription_count():
                self.pub_confidence.publish(image_message(msg.header, confidence_to_mono8(result.confidence), "mono8"))
        except Exception as exc:  # the node outlives any single bad frame
            self._problem("errors", f"segmentation failed: {type(exc).__name__}: {exc}")
            return
        now = time.monotonic()
        with self._cv:
            self.counters["processed"] += 1
            self._latencies.append((now - received) * 1e3)
            self._inference.append(result.timings_ms["inference"])
            self._done_times.append(now)

    def _problem(self, counter: str, message: str) -> None:
        with self._cv:
            self.counters[counter] += 1
            self._last_problem = message
        self.get_logger().warning(message, throttle_duration_sec=5.0)

    def _publish_diagnostics(self) -> None:
        with self._cv:
            counters = dict(self.counters)
            latencies, inference, done = list(self._latencies), list(self._inference), list(self._done_times)
            problem = self._last_problem
        now = time.monotonic()
        recent = [t for t in done if now - t <= 5.0]
        rate = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: segmentation",
                                  hardware_id=self.segmenter.card.name)
        bad = counters["malformed"] + counters["errors"]
        status.level = DiagnosticStatus.WARN if bad else DiagnosticStatus.OK
        status.message = f"{counters['processed']} frames, {bad} bad, {counters['dropped']} dropped" + (
            f"; last problem: {problem}" if problem else "")
        values = {f"frames_{k}": str(v) for k, v in counters.items()}
        values.update(
            rate_hz=f"{rate:.2f}",
            latency_median_ms=f"{statistics.median(latencies):.2f}" if latencies else "nan",
            latency_max_ms=f"{max(latencies):.2f}" if latencies else "nan",
            inference_median_ms=f"{statistics.median(inference):.2f}" if inference else "nan",
            backend=f"{self.segmenter.backend.name}/{self.segmenter.backend.device}",
        )
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(msg)

    def stop(self) -> None:
        """Stop the worker (waits for the frame in progress)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._worker.join(timeout=5.0)

    def destroy_node(self) -> None:
        self.stop()
        super().destroy_node()


def image_message(header: Any, pixels: np.ndarray, encoding: str) -> Image:
    """A sensor_msgs/Image holding ``pixels`` with ``header`` copied."""
    fields = encode_image_fields(pixels, encoding)
    data = array.array("B")
    data.frombytes(fields.pop("data").data)  # one copy; a list or bytes would be checked per element
    return Image(header=header, data=data, **fields)


def _resize_like(rgb: np.ndarray, like: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(rgb, (like.shape[1], like.shape[0]), interpolation=cv2.INTER_AREA)


def main(args: list[str] | None = None) -> int:
    """``ros2 run dgss_perception segment_node --ros-args -p model:=<package>``."""
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = SegmentNode()
        rclpy.spin(node)
    except (CardError, BackendError, ValueError, FileNotFoundError) as exc:
        rclpy.logging.get_logger("segment_node").fatal(f"cannot start: {exc}")
        code = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
