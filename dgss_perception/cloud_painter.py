"""The node's LiDAR painting: a camera's labels attached to the LiDAR points that fall into its image.

Per camera (parameter ``painting``): subscribes ``pointcloud_topic`` (sensor_msgs/PointCloud2) while
``<cam>/labels/points`` has a subscriber (always, with ``lazy`` off) and publishes the points in front
of the camera and inside its image with fields x, y, z (as received), confidence and label. The
LiDAR → camera transform comes from the parameter ``lidar_to_camera`` when it is set, else from TF
(tf2_ros, part of a ROS 2 install) at the cloud's stamp. A cloud is matched to the label image of
the same instant (``painting_stamp_tolerance``); one without a match is counted, never painted with
another frame's labels. The numerical work is in :mod:`dgss_perception.painting`.
"""

from __future__ import annotations

import array
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField

from .painting import (CameraModel, CloudError, StampMatcher, apply_transform, cloud_xyz, paint, painted_cloud_fields,
                       transform_matrix)

try:  # tf2_ros is part of a ROS 2 install, not of the pip wheels.
    import tf2_ros
    from rclpy.duration import Duration
    from rclpy.time import Time
except ImportError:  # pragma: no cover - depends on the environment
    tf2_ros = None
TF_AVAILABLE = tf2_ros is not None

# Each received cloud ends in exactly one of these (or waits for its label frame).
COUNTERS = ("received", "painted", "unmatched", "no_camera_info", "no_transform", "malformed", "errors", "idle")


def stamp_ns(header: Any) -> int:
    """A header's stamp in nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def quaternion_matrix(translation: Any, rotation: Any) -> np.ndarray:
    """4×4 transform from a geometry_msgs Transform's translation and rotation (x, y, z, w)."""
    m = transform_matrix([translation.x, translation.y, translation.z, rotation.x, rotation.y, rotation.z, rotation.w])
    return np.eye(4) if m is None else m


class TransformSource:
    """LiDAR frame → camera optical frame: a fixed matrix (parameter) or TF lookups at the cloud's stamp."""

    def __init__(self, node: Any, fixed: np.ndarray | None) -> None:
        self.fixed = fixed
        self.buffer = self.listener = None
        if fixed is None:
            if tf2_ros is None:
                raise ValueError("painting needs the LiDAR → camera transform: set lidar_to_camera, or install "
                                 "tf2_ros (part of a ROS 2 install) to take it from TF")
            # The listener's subscriptions are spun by the node's executor; lookups never wait (they run in
            # the worker and the subscription callbacks), so a transform not yet received counts as missing.
            self.buffer = tf2_ros.Buffer()
            self.listener = tf2_ros.TransformListener(self.buffer, node)

    def lookup(self, camera_frame: str, lidar_frame: str, header: Any) -> np.ndarray:
        """The 4×4 matrix taking points of ``lidar_frame`` to ``camera_frame``; LookupError naming why not."""
        if self.fixed is not None:
            return self.fixed
        try:
            t = self.buffer.lookup_transform(camera_frame, lidar_frame, Time.from_msg(header.stamp),
                                             timeout=Duration(seconds=0.0))
        except Exception as exc:  # tf2 raises LookupException, ExtrapolationException, … with no common base
            raise LookupError(f"no transform {lidar_frame} → {camera_frame}: {exc}") from exc
        return quaternion_matrix(t.transform.translation, t.transform.rotation)

    def close(self) -> None:
        if self.listener is not None and hasattr(self.listener, "unregister"):
            self.listener.unregister()
        self.listener = None


@dataclass
class LabelFrame:
    """A published label image kept for matching: its header, labels (h, w) uint8, confidence (h, w) float16."""

    header: Any
    labels: np.ndarray
    confidence: np.ndarray | None


class CloudPainter:
    """One camera's painting: cloud subscription, stamp matching, painted-cloud publisher."""

    def __init__(self, node: Any, prefix: str, publisher: Any, camera_info: Callable[[], CameraInfo | None],
                 transforms: TransformSource, params: dict[str, Any], qos: Any) -> None:
        self.node, self.prefix, self.publisher = node, prefix, publisher
        self.camera_info, self.transforms, self.qos = camera_info, transforms, qos
        self.topic = params["pointcloud_topic"]
        self.rectified = bool(params["painting_rectified"])
        self.min_depth = float(params["painting_min_depth"])
        self.lock = threading.Lock()
        self.matcher: StampMatcher[LabelFrame, tuple[Any, np.ndarray]] = StampMatcher(
            int(round(float(params["painting_stamp_tolerance"]) * 1e9)))
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.subscription = None
        self.last_problem = ""

    # -- subscription ----------------------------------------------------------------------------
    def wanted(self) -> bool:
        return self.publisher.get_subscription_count() > 0

    def update(self, want: bool) -> None:
        """Subscribe the cloud topic while ``want``, unsubscribe otherwise."""
        if want and self.subscription is None:
            self.subscription = self.node.create_subscription(PointCloud2, self.topic, self.on_cloud, self.qos)
        elif not want and self.subscription is not None:
            self.node.destroy_subscription(self.subscription)
            self.subscription = None
            with self.lock:
                self.matcher.pending.clear()  # stale once nobody listens

    def close(self) -> None:
        self.update(False)

    # -- callbacks (thin: decode → match → paint → encode → publish) --------------------------------
    def on_cloud(self, msg: PointCloud2) -> None:
        self._count("received")
        if not self.wanted():
            self._count("idle")
            return
        try:
            xyz = cloud_xyz(msg)
        except CloudError as exc:
            self._problem("malformed", f"skipped a malformed cloud on {self.topic}: {exc}")
            return
        with self.lock:
            decided = self.matcher.add_cloud(stamp_ns(msg.header), (msg.header, xyz))
        self._finish(decided)

    def on_labels(self, header: Any, labels: np.ndarray, confidence: np.ndarray | None) -> None:
        """A label image was published: keep a copy for matching and paint the clouds it decides."""
        frame = LabelFrame(header, labels.copy(), None if confidence is None else confidence.astype(np.float16))
        with self.lock:
            decided = self.matcher.add_frame(stamp_ns(header), frame)
        self._finish(decided)

    def _finish(self, decided: list[tuple[tuple[Any, np.ndarray], LabelFrame | None]]) -> None:
        for (header, xyz), frame in decided:
            if frame is None:
                self._problem("unmatched", f"no label image within the stamp tolerance of the cloud at "
                                           f"{header.stamp.sec}.{header.stamp.nanosec:09d}")
                continue
            try:
                self._paint_and_publish(header, xyz, frame)
            except Exception as exc:  # the node outlives any single bad cloud
                self._problem("errors", f"painting failed: {type(exc).__name__}: {exc}")

    def _paint_and_publish(self, header: Any, xyz: np.ndarray, frame: LabelFrame) -> None:
        info = self.camera_info()
        if info is None:
            self._problem("no_camera_info", f"painting needs {self.prefix}camera_info; none received yet")
            return
        try:
            camera = CameraModel.from_camera_info(info, self.rectified, frame.labels.shape)
        except CloudError as exc:
            self._problem("no_camera_info", f"unusable camera_info: {exc}")
            return
        camera_frame = frame.header.frame_id or info.header.frame_id
        try:
            matrix = self.transforms.lookup(camera_frame, header.frame_id, header)
        except LookupError as exc:
            self._problem("no_transform", str(exc))
            return
        index, labels, confidence = paint(apply_transform(matrix, xyz), camera, frame.labels, frame.confidence,
                                          self.min_depth)
        fields = painted_cloud_fields(xyz[index], labels, confidence)
        data = array.array("B")
        data.frombytes(fields.pop("data").tobytes())
        fields["fields"] = [PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields["fields"]]
        self.publisher.publish(PointCloud2(header=header, data=data, **fields))
        self._count("painted")

    # -- bookkeeping -------------------------------------------------------------------------------
    def _count(self, counter: str) -> None:
        with self.lock:
            self.counters[counter] += 1

    def _problem(self, counter: str, message: str) -> None:
        with self.lock:
            self.counters[counter] += 1
            self.last_problem = message
        self.node.get_logger().warning(message, throttle_duration_sec=5.0)

    def diagnostic_values(self) -> dict[str, str]:
        """Counters for /diagnostics: ``<cam>/clouds_<counter>`` (no prefix for the node's own camera)."""
        with self.lock:
            return {f"{self.prefix}clouds_{k}": str(v) for k, v in self.counters.items()}
