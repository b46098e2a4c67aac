"""ROS 2 nodes: camera images in, label images out.

``segment_node`` starts working at once; ``segment_lifecycle_node`` is the managed
variant (configure loads and warms up the model, activate subscribes, deactivate
stops work, cleanup releases the model).

Topics per camera (relative, remappable; ``<cam>/`` is empty for a single camera):
    in   <cam>/image (sensor_msgs/Image) or <cam>/image/compressed (sensor_msgs/CompressedImage)
         <cam>/camera_info            optional (parameter camera_info)
    out  <cam>/labels                 mono8 trainIds, header copied from the input
         <cam>/labels/color           rgb8 palette colours   (only while subscribed)
         <cam>/labels/overlay         rgb8 blend over input  (only while subscribed)
         <cam>/labels/confidence      mono8 max softmax ×255 (only while subscribed)
         <cam>/labels/compressed      the labels as lossless PNG, CompressedImage (only while subscribed)
         <cam>/labels/camera_info     camera_info matching the label image
         <cam>/labels/points          PointCloud2 x, y, z, confidence, label (parameter painting; only while
                                      subscribed): the LiDAR points (in pointcloud_topic) inside the image
         label_info                   vision_msgs/LabelInfo, transient local (where vision_msgs exists)
         <cam>/labels/domain_shift    diagnostic_msgs/DiagnosticArray, header copied from the input: the
                                      domain-shift monitor's figures and level per frame (only while subscribed)
         /diagnostics                 rate, latency, drops, errors; per camera a silent input (no frame for
                                      silent_camera_warn_s / _error_s while subscribed) and the domain-shift level

Subscription callbacks store the newest message per camera; a worker thread segments,
encodes and publishes. A frame that arrives while the worker is idle is also decoded and
resized to the network in its callback (it goes next, and its buffer is still in that
core's cache); one that arrives while the worker is busy is stored as it came and decoded
by the worker if it is still the newest when taken. A frame replaced before the worker
took it is dropped and counted ("latest frame wins"). With ``lazy`` (default), a
camera's input is unsubscribed while nothing subscribes to any of its outputs.
"""

from __future__ import annotations

import array
import json
import re
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from .backends import BackendError, parse_device
from .card import CardError, ModelCard
from .cloud_painter import TF_AVAILABLE, CloudPainter, TransformSource
from .codec import FrameError, compressed_to_rgb, encode_image_fields, image_to_rgb
from .engine import BACKENDS, OUTPUT_RESOLUTIONS, PRECISIONS, Segmenter
from .label_codec import LABELS_FORMAT, encode_labels_png
from .labels import colorize, confidence_to_mono8, overlay, palette_lut
from .monitor import Calibration, MonitorReport, ShiftMonitor, frame_figures
from .painting import transform_matrix
from .torch_export import COMPILE_MODES

try:  # vision_msgs is part of a ROS 2 install, not of the pip wheels.
    from vision_msgs.msg import LabelInfo, VisionClass
except ImportError:  # pragma: no cover - depends on the environment
    LabelInfo = VisionClass = None

T = TypeVar("T")
TRANSPORTS = ("raw", "compressed")
RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
INFERENCE_MODES = ("", "whole", "slide", "coarse", "coarse_to_fine")
MONITOR_OUTPUT = "labels/domain_shift"  # the domain-shift monitor's figures per frame
OUTPUTS = ("labels", "labels/color", "labels/overlay", "labels/confidence", "labels/compressed", "labels/camera_info",
           MONITOR_OUTPUT)
OUTPUT_TYPES = {"labels/camera_info": CameraInfo, "labels/compressed": CompressedImage,
                MONITOR_OUTPUT: DiagnosticArray}  # others: Image
LEVELS = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR)  # monitor levels 0, 1, 2 as bytes

# name → (default, description); declared up front, validated in read_parameters.
PARAMETERS: dict[str, tuple[Any, str]] = {
    "model": ("", "model package directory (holds card.json)"),
    "backend": ("auto", "auto | onnx | torchscript | pt2"),
    "device": ("auto", "auto | cpu | cuda | cuda:N (the N-th GPU); the log and /diagnostics say which was taken"),
    "precision": ("auto", "torchscript/pt2 arithmetic: auto (GPU: the card's checked torch_gpu_precision; CPU: fp32) | "
                          "fp32 | bf16 | fp16; ONNX Runtime takes auto or the card's precision"),
    "torch_compile": ("auto", "pt2 backend: auto (GPU: inductor; CPU: none) | none | inductor (torch.compile at "
                              "start) | aoti (AOTInductor, compiled at the first start on this machine and cached)"),
    "cameras": ([""], "camera namespaces served by this node; [''] = the node's own namespace"),
    "image_transport": ("raw", "raw (subscribe 'image') | compressed (subscribe 'image/compressed')"),
    "camera_info": (False, "subscribe '<cam>/camera_info' and republish it as '<cam>/labels/camera_info'"),
    "painting": (False, "publish '<cam>/labels/points': the points of pointcloud_topic inside the camera's image "
                        "with the label and confidence under them (needs '<cam>/camera_info')"),
    "pointcloud_topic": ("points", "painting: the LiDAR sensor_msgs/PointCloud2 topic (shared by all cameras)"),
    "painting_stamp_tolerance": (0.05, "painting: seconds a cloud's stamp may differ from its label image's; "
                                       "clouds without such a label image are counted, never painted"),
    "lidar_to_camera": ([0.0] * 7, "painting: LiDAR frame → camera optical frame as [x, y, z, qx, qy, qz, qw] or a "
                                   "row-major 4x4 (16 numbers); all zeros = from TF (tf2_ros) at the cloud's stamp"),
    "painting_rectified": (False, "painting: the images are rectified (project with camera_info's P, no "
                                  "distortion) instead of raw (K and the distortion D)"),
    "painting_min_depth": (0.1, "painting: points closer than this in front of the camera (metres) are dropped"),
    "lazy": (True, "no decoding or inference while nothing subscribes to a camera's outputs"),
    "qos_reliability": ("best_effort", "input QoS reliability: best_effort | reliable"),
    "qos_depth": (5, "input QoS history depth"),
    "output_qos_reliability": ("reliable", "output QoS reliability: reliable | best_effort"),
    "output_resolution": ("input", "labels at the input's size (input) or the network's (network)"),
    "overlay_alpha": (0.5, "weight of the colour mask in labels/overlay, 0–1"),
    "inference_mode": ("", "empty = the model card's mode; whole | slide | coarse | coarse_to_fine where the card "
                           "offers it"),
    "confidence_threshold": (0.968, "coarse_to_fine: max-softmax threshold θ for a confident pixel"),
    "refine_fraction": (0.8, "coarse_to_fine: refine a window when its confident fraction is below this (C_τ)"),
    "window_batch": (0, "slide: windows per run of the window graph (0 = all of a frame's at once; fewer bound "
                        "GPU memory)"),
    "threads": (0, "CPU inference threads (0 = runtime default)"),
    "spin_wait": (False, "ONNX Runtime CPU threads busy-wait between operators (slightly faster inference; the "
                         "cores stay busy after each run, slowing the node's own work and other processes)"),
    "cuda_graph": (False, "ONNX Runtime's CUDA provider (instead of TensorRT's) captures each graph's run per input "
                          "shape as a CUDA graph and replays it (graphs it cannot capture run without; the log says "
                          "why)"),
    "diagnostics_period": (1.0, "seconds between /diagnostics messages"),
    "stats_window": (300, "frames over which /diagnostics takes its latency, inference and overhead statistics"),
    "monitor_calibration": ("", "domain-shift monitor thresholds written by 'dgss-perception calibrate' (JSON); empty "
                                "= the figures are published but not judged (level OK, 'uncalibrated')"),
    "monitor_window": (0, "frames the domain-shift figures are averaged over; 0 = the calibration's window (10 "
                          "without one)"),
    "silent_camera_warn_s": (2.0, "seconds without a frame on a subscribed camera input before /diagnostics warns "
                                  "(0 = never)"),
    "silent_camera_error_s": (10.0, "seconds without a frame on a subscribed camera input before /diagnostics "
                                    "reports an error (0 = never)"),
}


def read_parameters(node: Node) -> dict[str, Any]:
    """Current parameter values, validated; raises ValueError naming the bad one."""
    p = {name: node.get_parameter(name).value for name in PARAMETERS}
    cams = list(p["cameras"] or [])
    try:
        parse_device(p["device"])
        device_ok, device_problem = True, ""
    except ValueError as exc:
        device_ok, device_problem = False, f"parameter 'device': {exc}"
    checks = [
        (bool(p["model"]), "parameter 'model' must name a model package directory"),
        (p["backend"] in BACKENDS, f"backend must be one of {BACKENDS}, got {p['backend']!r}"),
        (device_ok, device_problem),
        (p["precision"] in PRECISIONS, f"precision must be one of {PRECISIONS}, got {p['precision']!r}"),
        (p["torch_compile"] in COMPILE_MODES,
         f"torch_compile must be one of {COMPILE_MODES}, got {p['torch_compile']!r}"),
        (bool(cams) and len(set(cams)) == len(cams), f"cameras must be distinct namespaces, got {cams}"),
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
        (isinstance(p["threads"], int) and p["threads"] >= 0, "threads must be ≥ 0"),
        (isinstance(p["window_batch"], int) and p["window_batch"] >= 0, "window_batch must be ≥ 0"),
        (isinstance(p["stats_window"], int) and p["stats_window"] >= 1, "stats_window must be ≥ 1"),
        (isinstance(p["monitor_window"], int) and p["monitor_window"] >= 0, "monitor_window must be ≥ 0"),
        (float(p["silent_camera_warn_s"]) >= 0 and float(p["silent_camera_error_s"]) >= 0,
         "silent_camera_warn_s and silent_camera_error_s must be ≥ 0"),
        (not (float(p["silent_camera_warn_s"]) > 0 and 0 < float(p["silent_camera_error_s"])
              < float(p["silent_camera_warn_s"])), "silent_camera_error_s must not be below silent_camera_warn_s"),
        (float(p["painting_stamp_tolerance"]) >= 0, "painting_stamp_tolerance must be ≥ 0"),
        (float(p["painting_min_depth"]) > 0, "painting_min_depth must be positive"),
        (bool(p["pointcloud_topic"]), "pointcloud_topic must name a topic"),
        (not p["painting"] or TF_AVAILABLE or any(p["lidar_to_camera"]),
         "painting needs the LiDAR → camera transform: set lidar_to_camera (tf2_ros, which would take it from TF, "
         "is not importable)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    p["cameras"] = [c.strip("/") for c in cams]
    p["lidar_to_camera_matrix"] = transform_matrix(p["lidar_to_camera"])  # ValueError names the parameter
    p["overlay_alpha"] = float(p["overlay_alpha"])
    return p


def class_table(card: ModelCard) -> str:
    """The class table as JSON: [{"id", "name", "color"}], 255 = ignore."""
    rows = zip(card.classes, card.palette)
    return json.dumps([{"id": i, "name": n, "color": list(c)} for i, (n, c) in enumerate(rows)])


@dataclass
class Prepared:
    """A frame decoded and resized to the network where it arrived, with its outputs' subscriber state."""

    rgb: np.ndarray
    network_input: np.ndarray | None  # None: the worker resizes it
    wanted: dict[str, bool]


@dataclass
class Camera:
    """One camera's topics and its latest-frame slot."""

    prefix: str  # "" or "front/"
    publishers: dict[str, Any]
    subscription: Any = None
    info_subscription: Any = None
    camera_info: CameraInfo | None = None
    painter: CloudPainter | None = None  # parameter painting
    monitor: ShiftMonitor | None = None  # domain shift, updated by the worker under the node's lock
    subscribed_at: float | None = None  # monotonic time the input was subscribed; None while it is not
    last_frame: float | None = None  # monotonic time of the last frame received (well-formed or not)
    pending: tuple[Any, float, Prepared | None] | None = None
    sent: dict[str, Image] = field(default_factory=dict)  # per image output, its last message (buffer reused)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("received", "processed", "dropped", "malformed", "errors", "idle"), 0))

    def wanted(self) -> bool:
        return any(self.wanted_outputs().values())

    def wanted_outputs(self) -> dict[str, bool]:
        """Per output, whether anything subscribes to it now."""
        return {name: pub.get_subscription_count() > 0 for name, pub in self.publishers.items()}

    def label_buffer(self, size: tuple[int, int]) -> np.ndarray | None:
        """The last published label message's buffer as a writable (h, w) array when it has that size.

        Publishing converts a message synchronously, so its buffer is free once ``publish`` returns; the
        engine writes the next labels straight into it and nothing copies them again.
        """
        msg = self.sent.get("labels")
        h, w = size
        if msg is None or (msg.height, msg.width, msg.step, msg.encoding) != (h, w, w, "mono8"):
            return None
        return np.frombuffer(msg.data, np.uint8).reshape(h, w)


class SegmentationMixin:
    """Model, topics, worker and diagnostics shared by the plain and the managed node."""

    def declare_segmentation_parameters(self) -> None:
        for name, (default, description) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=description))
        self.segmenter: Segmenter | None = None
        self._internal_set = False
        self.add_on_set_parameters_callback(self._on_set_parameters)

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Parameters apply at configure: refuse changes while a model is loaded, with the reason."""
        if self._internal_set or self.segmenter is None:
            return SetParametersResult(successful=True)
        fixed = [p.name for p in params if p.name in PARAMETERS or p.name == "class_table"]
        if fixed:
            return SetParametersResult(successful=False, reason=(
                f"{', '.join(fixed)} take effect when the model loads: restart the node "
                "(or, for the managed node, deactivate, clean up, set and configure again)"))
        return SetParametersResult(successful=True)

    # -- configure / cleanup ------------------------------------------------------------------
    def load_model(self) -> None:
        """Read parameters, load and warm up the model, create publishers and the worker."""
        p = self.params = read_parameters(self)
        self.segmenter = Segmenter(p["model"], backend=p["backend"], device=p["device"],
                                   output_resolution=p["output_resolution"], threads=p["threads"],
                                   inference_mode=p["inference_mode"] or None, theta=p["confidence_threshold"],
                                   c_tau=p["refine_fraction"], window_batch=p["window_batch"],
                                   spin_wait=bool(p["spin_wait"]), cuda_graph=bool(p["cuda_graph"]),
                                   precision=p["precision"], torch_compile=p["torch_compile"])
        card = self.segmenter.card
        self.lut = palette_lut(card.palette)
        self.get_logger().info(f"model {card.name} on {self.segmenter.device_report}")
        if self.segmenter.precision_note:
            self.get_logger().warning(self.segmenter.precision_note)
        # Warm-up outside the stream: the first real frame must not pay for lazy initialisation.
        # (CUDA graphs: also the runs before capture and the capture itself, at the network's size.)
        try:
            for _ in range(self.segmenter.warmup_runs):
                self.segmenter.segment(np.zeros((*self.segmenter.network_size, 3), np.uint8))
        except Exception as exc:  # torch (device mismatch, out of memory) and ONNX Runtime errors share no base
            # The model loaded but cannot run here: a startup error like a bad package, not a crash.
            raise BackendError(f"warm-up inference of {card.name} on {self.segmenter.device_report} failed: "
                               f"{one_line(exc)}") from exc
        for graph, why in self.segmenter.cuda_graph_notes.items():
            self.get_logger().warning(f"cuda_graph, {graph} graph: {why}")
        self.calibration = None
        if p["monitor_calibration"]:
            # A calibration of another model says nothing about this one's confidence: refused like a bad package.
            self.calibration = Calibration.load(p["monitor_calibration"])
            self.calibration.check_model(card.name, card.checksums)
            if self.calibration.inference_mode and self.calibration.inference_mode != self.segmenter.mode:
                self.get_logger().warning(
                    f"monitor_calibration was measured in inference mode {self.calibration.inference_mode}, the node "
                    f"runs {self.segmenter.mode}: its confidence differs, calibrate again in this mode")
        table = Parameter("class_table", value=class_table(card))
        self._internal_set = True
        try:
            if self.has_parameter("class_table"):
                self.set_parameters([table])
            else:
                self.declare_parameter("class_table", table.value, ParameterDescriptor(
                    description="classes of the loaded model as JSON [{id, name, color}]; 255 = ignore"))
        finally:
            self._internal_set = False

        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p["qos_depth"],
                             reliability=RELIABILITY[p["output_qos_reliability"]])
        self.cameras: list[Camera] = []
        for name in p["cameras"]:
            prefix = f"{name}/" if name else ""
            pubs = {o: self.create_publisher(OUTPUT_TYPES.get(o, Image), prefix + o, out_qos) for o in OUTPUTS}
            self.cameras.append(Camera(prefix, pubs))
        for cam in self.cameras:
            cam.monitor = ShiftMonitor(self.calibration, p["monitor_window"])
        self._setup_painting(out_qos)
        self.label_info_pub = None
        if LabelInfo is not None:
            latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                                 reliability=ReliabilityPolicy.RELIABLE)
            self.label_info_pub = self.create_publisher(LabelInfo, "label_info", latched)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        self._cv = threading.Condition()
        self._stopping = False
        self._busy = False  # the worker is processing frames it has taken
        self._active = False
        window = p["stats_window"]
        self._latencies: deque[float] = deque(maxlen=window)
        self._inference: deque[float] = deque(maxlen=window)
        self._overhead: deque[float] = deque(maxlen=window)  # per frame: its latency − its inference
        self._done_times: deque[float] = deque(maxlen=300)
        self._batches: deque[int] = deque(maxlen=window)
        self._last_problem = ""
        self._worker = threading.Thread(target=self._work, name="segment_worker", daemon=True)
        self._worker.start()
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        # Wall-clock timers: diagnostics and lazy subscription keep working when /clock pauses.
        self._timers = [self.create_timer(p["diagnostics_period"], self._publish_diagnostics, clock=steady),
                        self.create_timer(0.2, self._update_subscriptions, clock=steady)]

    def release_model(self) -> None:
        """Stop the worker and destroy what load_model created."""
        self.stop_work()
        self._stop_worker()
        for t in self._timers:
            self.destroy_timer(t)
        for cam in self.cameras:
            for pub in cam.publishers.values():
                self.destroy_publisher(pub)
        if self.transforms is not None:
            self.transforms.close()
        for pub in (self.label_info_pub, self.diag_pub):
            if pub is not None:
                self.destroy_publisher(pub)
        self.cameras = []
        self.segmenter = None

    # -- activate / deactivate ----------------------------------------------------------------
    def start_work(self) -> None:
        self._active = True
        self._publish_label_info()
        self._update_subscriptions()
        card = self.segmenter.card
        self.get_logger().info(
            f"segmenting {', '.join(self._input_topic(c) for c in self.cameras)} with {card.name} ({card.family}, "
            f"{self.segmenter.backend.name} on {self.segmenter.backend.device}, network {card.input_width}x"
            f"{card.input_height}) → {', '.join(c.publishers['labels'].topic_name for c in self.cameras)}")

    def stop_work(self) -> None:
        self._active = False
        for cam in self.cameras:
            self._unsubscribe(cam)
        with self._cv:
            for cam in self.cameras:
                cam.pending = None

    def _input_topic(self, cam: Camera) -> str:
        suffix = "image/compressed" if self.params["image_transport"] == "compressed" else "image"
        return self.resolve_topic_name(cam.prefix + suffix)

    def _update_subscriptions(self) -> None:
        """Subscribe each camera's input while it is wanted (always, unless lazy)."""
        for cam in self.cameras:
            want = self._active and (not self.params["lazy"] or cam.wanted())
            if want and cam.subscription is None:
                self._subscribe(cam)
            elif not want and cam.subscription is not None:
                self._unsubscribe(cam)
            if cam.painter is not None:  # the cloud only while its painted cloud is wanted (always, unless lazy)
                cam.painter.update(self._active and (not self.params["lazy"] or cam.painter.wanted()))

    def _input_qos(self) -> QoSProfile:
        p = self.params
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p["qos_depth"],
                          reliability=RELIABILITY[p["qos_reliability"]])

    def _setup_painting(self, out_qos: QoSProfile) -> None:
        """Parameter painting: per camera, the labels/points publisher and its cloud painter."""
        p = self.params
        self.transforms = TransformSource(self, p["lidar_to_camera_matrix"]) if p["painting"] else None
        for cam in self.cameras if p["painting"] else []:
            pub = cam.publishers["labels/points"] = self.create_publisher(PointCloud2, cam.prefix + "labels/points",
                                                                          out_qos)
            cam.painter = CloudPainter(self, cam.prefix, pub, lambda c=cam: c.camera_info, self.transforms, p,
                                       self._input_qos())

    def _subscribe(self, cam: Camera) -> None:
        p = self.params
        qos = self._input_qos()
        msg_type = CompressedImage if p["image_transport"] == "compressed" else Image
        suffix = "image/compressed" if msg_type is CompressedImage else "image"
        cam.subscription = self.create_subscription(msg_type, cam.prefix + suffix,
                                                    lambda m, c=cam: self._on_frame(c, m), qos)
        with self._cv:
            cam.subscribed_at = time.monotonic()  # silence is counted from here (or from the last frame)
        if p["camera_info"] or p["painting"]:
            cam.info_subscription = self.create_subscription(
                CameraInfo, cam.prefix + "camera_info", lambda m, c=cam: setattr(c, "camera_info", m), qos)

    def _unsubscribe(self, cam: Camera) -> None:
        for attr in ("subscription", "info_subscription"):
            sub = getattr(cam, attr)
            if sub is not None:
                self.destroy_subscription(sub)
                setattr(cam, attr, None)
        with self._cv:
            cam.subscribed_at = None  # nothing is expected from an input not subscribed
        if cam.painter is not None:
            cam.painter.update(False)

    def _publish_label_info(self) -> None:
        if self.label_info_pub is None:
            return
        card = self.segmenter.card
        msg = LabelInfo(class_map=[VisionClass(class_id=i, class_name=n) for i, n in enumerate(card.classes)],
                        threshold=0.0)
        msg.header.stamp = self.get_clock().now().to_msg()
        self.label_info_pub.publish(msg)

    # -- subscription side: cheap, never blocks on inference -----------------------------------
    def _on_frame(self, cam: Camera, msg: Any) -> None:
        received = time.monotonic()
        with self._cv:
            cam.counters["received"] += 1
            cam.last_frame = received
            idle = not self._busy and not any(c.pending for c in self.cameras)
        prepared = None
        if idle:
            # This frame goes next: decode and resize it here, on the thread that has just written it (still in
            # this core's cache), while the executor has nothing else to do; the worker is woken with a small
            # network input. A busy worker gets the raw message instead: a frame replaced before it is taken
            # must cost nothing.
            wanted = cam.wanted_outputs()
            rgb = self._decode(cam, msg, wanted)
            if rgb is None:
                return  # counted as malformed or idle
            try:
                prepared = Prepared(rgb, self.segmenter.preprocess(rgb), wanted)
            except Exception as exc:
                self._problem(cam, "errors", f"preprocessing failed: {type(exc).__name__}: {exc}")
                return
        with self._cv:
            if cam.pending is not None:
                cam.counters["dropped"] += 1
            cam.pending = (msg, received, prepared)
            self._cv.notify()
        # Hand the interpreter to the woken worker now: otherwise it waits until this executor thread has
        # rebuilt its wait set and blocks (0.3 ms median per frame measured on a 2-core machine).
        time.sleep(0)

    # -- worker: decode → engine → encode → publish --------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not any(c.pending for c in self.cameras):
                    self._cv.wait()
                if self._stopping:
                    return
                # The frames waiting longest first, so no camera starves another; as many cameras
                # as the model's batch takes go into one inference.
                ready = sorted((c for c in self.cameras if c.pending), key=lambda c: c.pending[1])
                taken = []
                for cam in ready[: self.segmenter.batch_size]:
                    taken.append((cam, *cam.pending))
                    cam.pending = None
                self._busy = True
            try:
                self._process(taken)
            finally:
                with self._cv:
                    self._busy = False

    def _decode(self, cam: Camera, msg: Any, wanted: dict[str, bool]) -> np.ndarray | None:
        if not any(wanted.values()):  # only with lazy off, or between a subscriber leaving and the next check
            self._count(cam, "idle")
            return None
        try:
            # The node owns each received message and never changes it: an rgb8 frame is used in place.
            return compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg, copy=False)
        except FrameError as exc:
            self._problem(cam, "malformed", f"skipped a malformed frame on {self._input_topic(cam)}: {exc}")
            return None

    def _process(self, taken: list[tuple[Camera, Any, float, Prepared | None]]) -> None:
        """decode → engine (one batch) → encode → publish, per camera."""
        frames, inputs = [], []
        for cam, msg, received, prepared in taken:
            if prepared is None:
                wanted = cam.wanted_outputs()  # once per frame: each count is a call into the middleware
                rgb = self._decode(cam, msg, wanted)
                if rgb is None:
                    continue
                prepared = Prepared(rgb, None, wanted)
            frames.append((cam, msg, received, prepared.rgb, prepared.wanted))
            inputs.append(prepared.network_input)
        if not frames:
            return
        out = [cam.label_buffer(self.segmenter.output_size(rgb.shape[:2])) if wanted["labels"] else None
               for cam, _, _, rgb, wanted in frames]
        try:
            results = self.segmenter.segment_batch([f[3] for f in frames], out, inputs)
            with self._cv:
                self._batches.append(len(frames))
        except Exception as exc:  # the node outlives any single bad batch
            for cam, *_ in frames:
                self._problem(cam, "errors", f"segmentation failed: {type(exc).__name__}: {exc}")
            return
        for (cam, msg, received, rgb, wanted), result in zip(frames, results):
            try:
                self._publish(cam, msg.header, rgb, result, wanted)
                self._update_monitor(cam, msg.header, result, wanted)
            except Exception as exc:
                self._problem(cam, "errors", f"publishing failed: {type(exc).__name__}: {exc}")
                continue
            now = time.monotonic()
            latency, inference = (now - received) * 1e3, result.timings_ms["inference"]
            with self._cv:
                cam.counters["processed"] += 1
                self._latencies.append(latency)
                self._inference.append(inference)
                self._overhead.append(latency - inference)
                self._done_times.append(now)

    def _publish(self, cam: Camera, header: Any, rgb: np.ndarray, result: Any, wanted: dict[str, bool]) -> None:
        for output in [o for o in cam.sent if not wanted[o]]:
            del cam.sent[output]  # its buffer (up to 6 MB at 1080p) is not kept for an output nobody reads
        labels = result.labels
        if wanted["labels"]:
            self._publish_image(cam, "labels", header, labels, "mono8")
        if wanted["labels/color"] or wanted["labels/overlay"]:
            color = colorize(labels, self.lut)
            if wanted["labels/color"]:
                self._publish_image(cam, "labels/color", header, color, "rgb8")
            if wanted["labels/overlay"]:
                base = rgb if color.shape == rgb.shape else _resize_like(rgb, color)
                self._publish_image(cam, "labels/overlay", header, overlay(base, color, self.params["overlay_alpha"]),
                                    "rgb8")
        if wanted["labels/confidence"]:
            self._publish_image(cam, "labels/confidence", header, confidence_to_mono8(result.confidence), "mono8")
        if wanted["labels/compressed"]:
            cam.publishers["labels/compressed"].publish(compressed_labels_message(header, labels))
        info = cam.camera_info
        if info is not None and wanted["labels/camera_info"]:
            cam.publishers["labels/camera_info"].publish(scaled_camera_info(info, header, *labels.shape))
        if cam.painter is not None and wanted["labels/points"]:
            cam.painter.on_labels(header, labels, result.confidence)  # paints the clouds this frame decides

    def _update_monitor(self, cam: Camera, header: Any, result: Any, wanted: dict[str, bool]) -> None:
        """The domain-shift figures of a segmented frame (its network-grid confidence); published while wanted."""
        figures = frame_figures(result.network_confidence, cam.monitor.confidence_threshold)
        with self._cv:
            before = cam.monitor.level
            report = cam.monitor.update_figures(figures)
        if report.level != before:
            # rclpy fixes a call site's severity at its first call: one site per severity.
            line = f"{self._input_topic(cam)}: domain-shift level {report.level_name} ({cam.monitor.describe()})"
            if report.level > before:
                self.get_logger().warning(line)
            else:
                self.get_logger().info(line)
        if wanted[MONITOR_OUTPUT]:
            msg = DiagnosticArray(header=header, status=[self._monitor_status(cam, report)])
            cam.publishers[MONITOR_OUTPUT].publish(msg)

    def _monitor_status(self, cam: Camera, report: MonitorReport | None) -> DiagnosticStatus:
        """The camera's domain-shift level, why, and its figures (``report``: the last frame's, None before one)."""
        monitor = cam.monitor
        values = report.values() if report is not None else {"level": "OK", "frames": "0"}
        values.update(confidence_threshold=f"{monitor.confidence_threshold:.4f}", window=str(monitor.window))
        for name, t in (monitor.calibration.thresholds.items() if monitor.calibration else ()):
            values.update({f"{name}_warn": f"{t.warn:.4f}", f"{name}_error": f"{t.error:.4f}"})
        topic = self._input_topic(cam)
        return DiagnosticStatus(level=LEVELS[report.level if report else 0], name=f"{self.get_fully_qualified_name()}: "
                                f"domain shift {topic}", message=monitor.describe(), hardware_id=topic,
                                values=[KeyValue(key=k, value=v) for k, v in values.items()])

    def _silence_status(self, cam: Camera, now: float, subscribed_at: float | None,
                        last_frame: float | None) -> DiagnosticStatus:
        """OK while frames arrive; WARN, then ERROR, when a subscribed input has had none for that long."""
        p = self.params
        topic = self._input_topic(cam)
        level, values = 0, {"subscribed": str(subscribed_at is not None).lower()}
        if subscribed_at is None:
            message = "not subscribed (" + ("inactive" if not self._active else "no output has a subscriber") + ")"
        else:
            quiet = now - max(subscribed_at, last_frame or subscribed_at)
            values["seconds_without_frame"] = f"{quiet:.1f}"
            warn_s, error_s = float(p["silent_camera_warn_s"]), float(p["silent_camera_error_s"])
            level = 2 if 0 < error_s <= quiet else 1 if 0 < warn_s <= quiet else 0
            message = (f"silent: no frame on {topic} for {quiet:.1f} s" if level
                       else f"receiving (last frame {quiet:.1f} s ago)" if last_frame and last_frame >= subscribed_at
                       else f"subscribed {quiet:.1f} s ago, waiting for the first frame")
        return DiagnosticStatus(level=LEVELS[level], name=f"{self.get_fully_qualified_name()}: input {topic}",
                                message=message, hardware_id=topic,
                                values=[KeyValue(key=k, value=v) for k, v in values.items()])

    def _publish_image(self, cam: Camera, output: str, header: Any, pixels: np.ndarray, encoding: str) -> None:
        """Publish pixels on one of the camera's image outputs, in the message buffer that output used last."""
        msg = cam.sent[output] = image_message(header, pixels, encoding, cam.sent.get(output))
        cam.publishers[output].publish(msg)

    def _count(self, cam: Camera, counter: str) -> None:
        with self._cv:
            cam.counters[counter] += 1

    def _problem(self, cam: Camera, counter: str, message: str) -> None:
        with self._cv:
            cam.counters[counter] += 1
            self._last_problem = message
        self.get_logger().warning(message, throttle_duration_sec=5.0)

    def _publish_diagnostics(self) -> None:
        with self._cv:
            per_camera = {c.prefix.rstrip("/"): dict(c.counters) for c in self.cameras}
            latencies, inference, done = list(self._latencies), list(self._inference), list(self._done_times)
            overhead = list(self._overhead)
            batches = list(self._batches)
            problem = self._last_problem
        counters = {k: sum(c[k] for c in per_camera.values()) for k in next(iter(per_camera.values()))}
        now = time.monotonic()
        recent = [t for t in done if now - t <= 5.0]
        rate = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: segmentation",
                                  hardware_id=self.segmenter.card.name)
        bad = counters["malformed"] + counters["errors"]
        status.level = DiagnosticStatus.WARN if bad else DiagnosticStatus.OK
        status.message = (f"{'active' if self._active else 'inactive'}: {counters['processed']} frames, {bad} bad, "
                          f"{counters['dropped']} dropped" + (f"; last problem: {problem}" if problem else ""))
        values = {f"frames_{k}": str(v) for k, v in counters.items()}
        if len(per_camera) > 1:
            values.update({f"{cam}/frames_{k}": str(v) for cam, c in per_camera.items() for k, v in c.items()})
        values.update(
            rate_hz=f"{rate:.2f}",
            latency_median_ms=f"{statistics.median(latencies):.2f}" if latencies else "nan",
            latency_max_ms=f"{max(latencies):.2f}" if latencies else "nan",
            inference_median_ms=f"{statistics.median(inference):.2f}" if inference else "nan",
            overhead_median_ms=f"{statistics.median(overhead):.3f}" if overhead else "nan",
            stats_frames=str(len(latencies)),
            batch_mean=f"{statistics.mean(batches):.2f}" if batches else "nan",
            backend=f"{self.segmenter.backend.name}/{self.segmenter.backend.device}",
            device=self.segmenter.device_report,
            precision=self.segmenter.precision,
            inference_mode=self.segmenter.mode,
        )
        if self.segmenter.windows_total:
            values["windows_refined_share"] = f"{self.segmenter.windows_refined / self.segmenter.windows_total:.3f}"
        for cam in self.cameras:
            if cam.painter is not None:
                values.update(cam.painter.diagnostic_values())
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        with self._cv:
            per_input = [(c, c.subscribed_at, c.last_frame, c.monitor.last) for c in self.cameras]
        # The segmentation status first (readers take status[0]), then per camera its input and its domain shift.
        extra = [s for c, since, last, report in per_input
                 for s in (self._silence_status(c, now, since, last), self._monitor_status(c, report))]
        msg = DiagnosticArray(status=[status, *extra])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)

    def destroy_node(self) -> None:
        self._stop_worker()
        super().destroy_node()

    def _stop_worker(self) -> None:
        """Stop the worker (waits for the frame in progress)."""
        worker = getattr(self, "_worker", None)
        if worker is None:
            return
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        worker.join(timeout=5.0)
        self._worker = None


class SegmentNode(SegmentationMixin, Node):
    """Semantic segmentation of one or more camera streams, working from the start."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("segment_node", **kwargs)
        self.declare_segmentation_parameters()
        self.load_model()
        self.start_work()


class LifecycleSegmentNode(SegmentationMixin, LifecycleNode):
    """The managed variant: configure loads, activate subscribes, deactivate stops, cleanup releases."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("segment_node", **kwargs)
        self.declare_segmentation_parameters()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.load_model()
        except (CardError, BackendError, ValueError, FileNotFoundError) as exc:
            self.segmenter = None
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f"configured with {self.segmenter.card.name}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.start_work()
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_work()
        self.get_logger().info("deactivated: input unsubscribed")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release_model()
        self.get_logger().info("cleaned up: model released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.segmenter is not None:
            self.release_model()
        return TransitionCallbackReturn.SUCCESS


def image_message(header: Any, pixels: np.ndarray, encoding: str, reuse: Image | None = None) -> Image:
    """A sensor_msgs/Image holding ``pixels`` with ``header`` copied.

    ``reuse``: an Image published before (publishing converts it synchronously, so it is free again)
    whose buffer is filled in place when its size and encoding match; a fresh 1080p buffer costs
    page faults and an allocation each frame, an in-place copy does not.
    """
    fields = encode_image_fields(pixels, encoding)
    data = fields.pop("data")
    if (reuse is not None and reuse.encoding == encoding and (reuse.height, reuse.width, reuse.step)
            == (fields["height"], fields["width"], fields["step"]) and len(reuse.data) == data.size):
        buffer = np.frombuffer(reuse.data, np.uint8)
        if buffer.ctypes.data != data.ctypes.data:  # pixels written straight into it need no copy
            buffer[:] = data
        reuse.header = header
        return reuse
    buffer = array.array("B")
    buffer.frombytes(data.data)  # one copy; a list or bytes would be checked per element
    return Image(header=header, data=buffer, **fields)


def compressed_labels_message(header: Any, labels: np.ndarray) -> CompressedImage:
    """A sensor_msgs/CompressedImage of trainIds uint8 H×W as lossless PNG, ``header`` copied.

    1080p labels take ~7–13 KB instead of 2 MB (BENCHMARKS.md): within Fast DDS's default shared-memory
    segment, which best-effort subscribers need, and cheap to send between machines.
    """
    data = array.array("B")
    data.frombytes(encode_labels_png(labels).data)
    return CompressedImage(header=header, format=LABELS_FORMAT, data=data)


def scaled_camera_info(info: CameraInfo, header: Any, height: int, width: int) -> CameraInfo:
    """``info`` with the image's header, its intrinsics scaled to a label image of height×width."""
    out = CameraInfo(header=header, distortion_model=info.distortion_model, d=info.d, r=info.r,
                     binning_x=info.binning_x, binning_y=info.binning_y, roi=info.roi)
    sx = width / info.width if info.width else 1.0
    sy = height / info.height if info.height else 1.0
    k = np.array(info.k, dtype=np.float64).reshape(3, 3)
    p = np.array(info.p, dtype=np.float64).reshape(3, 4)
    scale = np.diag([sx, sy, 1.0])
    out.k, out.p = (scale @ k).reshape(-1).tolist(), (scale @ p).reshape(-1).tolist()
    out.width, out.height = width, height
    return out


def one_line(exc: BaseException) -> str:
    """An exception as one line: ``Type: message``.

    A TorchScript error's message is the interpreter's traceback, whose last line is the error itself
    (``RuntimeError: Expected all tensors to be on the same device, …``): that line is the one kept.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if re.match(r"[A-Za-z_.]*(Error|Exception):", last) else f"{type(exc).__name__}: {last}".rstrip(": ")


def _resize_like(rgb: np.ndarray, like: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(rgb, (like.shape[1], like.shape[0]), interpolation=cv2.INTER_AREA)


def until_stopped(run: Callable[[], T]) -> T | None:
    """``run()`` (a process's setup and spin), where Ctrl-C, SIGTERM or a shutdown is a clean stop (None).

    Any other error propagates.
    """
    try:
        return run()
    except (KeyboardInterrupt, ExternalShutdownException):
        return None
    except Exception:
        # A SIGINT/SIGTERM shuts the context down from rclpy's signal handler; if that lands while the
        # executor builds its next wait set, rclpy raises an RCLError ("context is not valid") instead of
        # ExternalShutdownException. That is still the requested clean stop; anything else is a failure.
        if rclpy.ok():
            raise
        return None


def _run(node_class: type, args: list[str] | None) -> int:
    rclpy.init(args=args)
    node = None
    code = 0

    def serve() -> None:
        nonlocal node
        node = node_class()
        rclpy.spin(node)

    try:
        until_stopped(serve)
    except (CardError, BackendError, ValueError, FileNotFoundError) as exc:
        rclpy.logging.get_logger("segment_node").fatal(f"cannot start: {exc}")
        code = 2
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return code


def main(args: list[str] | None = None) -> int:
    """``ros2 run dgss_perception segment_node --ros-args -p model:=<package>``."""
    return _run(SegmentNode, args)


def lifecycle_main(args: list[str] | None = None) -> int:
    """``ros2 run dgss_perception segment_lifecycle_node --ros-args -p model:=<package>``."""
    return _run(LifecycleSegmentNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
