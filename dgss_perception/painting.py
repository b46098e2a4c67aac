"""Semantic point cloud ("LiDAR painting"), without rclpy: clouds ⇄ numpy, camera projection, stamp matching.

A LiDAR cloud is decoded to x, y, z, moved into the camera's optical frame, projected with the
camera model of its ``camera_info`` (distortion included), and each point in front of the camera
and inside the image takes the label and confidence of the label image under it. The painted
cloud keeps the points' original x, y, z and adds ``confidence`` (float32) and ``label`` (uint8).

Works on any object with the fields of ``sensor_msgs/PointCloud2`` and ``sensor_msgs/CameraInfo``
(rclpy messages, rosbags messages). Where ``sensor_msgs_py`` is importable it reads clouds of the
common layout; the numpy reader here is the equivalent used everywhere else (and for padded rows
or foreign byte order). A malformed cloud raises :class:`CloudError` with a reason.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, Sequence, TypeVar

import numpy as np

try:  # sensor_msgs_py is part of a ROS 2 install, not of the pip wheels.
    from sensor_msgs.msg import PointCloud2 as _PointCloud2
    from sensor_msgs_py import point_cloud2 as _point_cloud2

    if not hasattr(_point_cloud2, "dtype_from_fields"):  # early ports ignore point_step padding: not used
        _point_cloud2 = None
except ImportError:  # pragma: no cover - depends on the environment
    _point_cloud2 = None

# sensor_msgs/PointField datatype → numpy type (little-endian; swapped for is_bigendian clouds).
DATATYPES: dict[int, str] = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)

# The painted cloud's layout: (name, offset, datatype, count); 3 bytes of padding keep points 4-byte aligned.
PAINTED_FIELDS: tuple[tuple[str, int, int, int], ...] = (
    ("x", 0, FLOAT32, 1), ("y", 4, FLOAT32, 1), ("z", 8, FLOAT32, 1),
    ("confidence", 12, FLOAT32, 1), ("label", 16, UINT8, 1))
PAINTED_POINT_STEP = 20

DISTORTION_MODELS = ("plumb_bob", "rational_polynomial", "equidistant")
MAX_POINTS = 64 * 1024 * 1024  # guard against absurd headers before any allocation


class CloudError(ValueError):
    """A cloud (or its camera model) that cannot be used; the message says why."""


# -- PointCloud2 ⇄ numpy -----------------------------------------------------------------------------
def cloud_dtype(fields: Sequence[Any], point_step: int, bigendian: bool, names: Sequence[str] | None = None
                ) -> np.dtype:
    """The structured numpy dtype of one point (itemsize ``point_step``) for the named fields (all by default).

    A field with count > 1 becomes a sub-array of that length.
    """
    by_name = {f.name: f for f in fields}
    wanted = list(names) if names is not None else [f.name for f in fields]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise CloudError(f"cloud has no field {', '.join(missing)} (fields: {', '.join(by_name) or 'none'})")
    formats, offsets = [], []
    for name in wanted:
        f = by_name[name]
        if f.datatype not in DATATYPES:
            raise CloudError(f"field {name!r} has unknown datatype {f.datatype}")
        base = np.dtype(DATATYPES[f.datatype]).newbyteorder(">" if bigendian else "<")
        count = max(int(f.count), 1)
        fmt = base if count == 1 else np.dtype((base, (count,)))
        if f.offset < 0 or f.offset + fmt.itemsize > point_step:
            raise CloudError(f"field {name!r} at offset {f.offset} does not fit a point of {point_step} bytes")
        formats.append(fmt)
        offsets.append(int(f.offset))
    return np.dtype({"names": wanted, "formats": formats, "offsets": offsets, "itemsize": int(point_step)})


def read_fields(cloud: Any, names: Sequence[str] | None = None) -> np.ndarray:
    """The cloud's points as a structured array (height·width,) in native byte order, rows' padding skipped.

    Validates sizes before touching the data: a cloud whose ``data`` is shorter than its header says
    raises :class:`CloudError`.
    """
    height, width, step, row_step = int(cloud.height), int(cloud.width), int(cloud.point_step), int(cloud.row_step)
    if height * width == 0 or height * width > MAX_POINTS or step <= 0:
        raise CloudError(f"implausible cloud: {height}x{width} points of {step} bytes")
    if row_step < width * step:
        raise CloudError(f"row_step {row_step} is shorter than width × point_step = {width * step}")
    data = np.frombuffer(cloud.data, np.uint8) if len(cloud.data) else np.zeros(0, np.uint8)
    if data.size < (height - 1) * row_step + width * step:
        raise CloudError(f"cloud data holds {data.size} bytes; {height} rows of {row_step} need "
                         f"{(height - 1) * row_step + width * step}")
    dtype = cloud_dtype(cloud.fields, step, bool(cloud.is_bigendian), names)
    rows = np.lib.stride_tricks.as_strided(data, shape=(height, width * step), strides=(row_step, 1))
    points = np.ascontiguousarray(rows).view(dtype).reshape(-1)
    native = dtype.newbyteorder("=")
    return points if dtype == native else points.astype(native)


def cloud_xyz(cloud: Any) -> np.ndarray:
    """Finite points of a cloud as float64 (N, 3); points with a NaN or infinite coordinate are dropped.

    Through ``sensor_msgs_py`` where importable and the cloud has dense rows in this machine's byte
    order; the numpy reader otherwise (same result).
    """
    if int(cloud.height) * int(cloud.width) == 0:
        cloud_dtype(cloud.fields, 1 << 16, False, ("x", "y", "z"))  # still refuses a cloud without x, y, z
        return np.zeros((0, 3))
    dense_rows = int(cloud.row_step) == int(cloud.width) * int(cloud.point_step)
    if (_point_cloud2 is not None and isinstance(cloud, _PointCloud2) and dense_rows
            and bool(cloud.is_bigendian) == (sys.byteorder == "big")):
        cloud_dtype(cloud.fields, int(cloud.point_step), bool(cloud.is_bigendian), ("x", "y", "z"))  # validates
        if len(cloud.data) < int(cloud.height) * int(cloud.row_step):
            raise CloudError(f"cloud data holds {len(cloud.data)} bytes, its header says "
                             f"{int(cloud.height) * int(cloud.row_step)}")
        points = _point_cloud2.read_points(cloud, field_names=("x", "y", "z"))
    else:
        points = read_fields(cloud, ("x", "y", "z"))
    xyz = np.stack([points["x"], points["y"], points["z"]], axis=-1).astype(np.float64).reshape(-1, 3)
    return xyz[np.isfinite(xyz).all(axis=1)]


def painted_cloud_fields(xyz: np.ndarray, labels: np.ndarray, confidence: np.ndarray) -> dict[str, Any]:
    """The fields of a painted ``PointCloud2`` (all but header; ``fields`` as (name, offset, datatype, count)).

    xyz: (N, 3) any float; labels: (N,) uint8; confidence: (N,) float. One row of N points, dense,
    little-endian, ``data`` as a bytes-like uint8 array.
    """
    n = len(xyz)
    dtype = cloud_dtype([_Field(*f) for f in PAINTED_FIELDS], PAINTED_POINT_STEP, False)
    points = np.zeros(n, dtype)
    for axis, name in enumerate("xyz"):
        points[name] = xyz[:, axis]
    points["confidence"] = confidence
    points["label"] = labels
    return dict(height=1, width=n, fields=list(PAINTED_FIELDS), is_bigendian=False, point_step=PAINTED_POINT_STEP,
                row_step=PAINTED_POINT_STEP * n, data=points.view(np.uint8).reshape(-1), is_dense=True)


@dataclass
class _Field:
    name: str
    offset: int
    datatype: int
    count: int


# -- transforms -----------------------------------------------------------------------------------
def transform_matrix(values: Sequence[float]) -> np.ndarray | None:
    """A 4×4 rigid transform from a parameter: [x, y, z, qx, qy, qz, qw] or 16 numbers (row-major 4×4).

    All zeros means "not set" (None). Raises ValueError for any other length, a zero quaternion, a
    matrix whose last row is not [0, 0, 0, 1] or whose rotation part is not orthonormal.
    """
    v = np.asarray(list(values), dtype=np.float64)
    if v.size and not np.any(v):
        return None
    if v.size == 7:
        q = v[3:]
        norm = np.linalg.norm(q)
        if not np.isfinite(norm) or norm < 1e-9:
            raise ValueError("lidar_to_camera: the quaternion (qx, qy, qz, qw) must not be zero")
        x, y, z, w = q / norm
        m = np.eye(4)
        m[:3, :3] = [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]
        m[:3, 3] = v[:3]
        return m
    if v.size == 16:
        m = v.reshape(4, 4)
        if not np.allclose(m[3], [0, 0, 0, 1]) or not np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-4):
            raise ValueError("lidar_to_camera: a 4x4 matrix needs an orthonormal rotation and last row 0 0 0 1")
        return m
    raise ValueError(f"lidar_to_camera takes 7 numbers [x, y, z, qx, qy, qz, qw] or 16 (a row-major 4x4), "
                     f"got {v.size}")


def apply_transform(matrix: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Points (N, 3) mapped by a 4×4 rigid transform: R·p + t."""
    return xyz @ matrix[:3, :3].T + matrix[:3, 3]


# -- camera model ---------------------------------------------------------------------------------
@dataclass
class CameraModel:
    """A pinhole camera with lens distortion, as ``sensor_msgs/CameraInfo`` describes it.

    ``k``: 3×3 intrinsics; ``d``: distortion coefficients of ``model`` (plumb_bob / rational_polynomial:
    k1, k2, p1, p2, k3[, k4, k5, k6]; equidistant: k1..k4); ``width``, ``height``: the image size the
    intrinsics refer to.
    """

    k: np.ndarray
    d: np.ndarray
    model: str
    width: int
    height: int

    @classmethod
    def from_camera_info(cls, info: Any, rectified: bool = False, size: tuple[int, int] | None = None
                         ) -> "CameraModel":
        """The model of ``info``; ``rectified``: for a rectified image (P's left 3×3, no distortion).

        ``size`` (height, width) stands in for a camera_info without an image size.
        """
        width, height = int(info.width), int(info.height)
        if (width == 0 or height == 0) and size is not None:
            height, width = size
        if width <= 0 or height <= 0:
            raise CloudError("camera_info has no image size")
        if rectified:
            k = np.asarray(info.p, dtype=np.float64).reshape(3, 4)[:, :3].copy()
            return cls(k, np.zeros(0), "plumb_bob", width, height)
        k = np.asarray(info.k, dtype=np.float64).reshape(3, 3)
        d = np.asarray(info.d, dtype=np.float64)
        model = info.distortion_model or "plumb_bob"
        if d.size and np.any(d) and model not in DISTORTION_MODELS:
            raise CloudError(f"distortion model {model!r} is not supported (supported: {', '.join(DISTORTION_MODELS)})")
        if k[0, 0] <= 0 or k[1, 1] <= 0 or k[2, 2] == 0:
            raise CloudError("camera_info has no intrinsics (K's focal lengths must be positive)")
        return cls(k / k[2, 2], d, model, width, height)

    def _coefficients(self) -> np.ndarray:
        n = 4 if self.model == "equidistant" else 8
        return np.concatenate([self.d[:n], np.zeros(max(0, n - self.d.size))])

    def max_valid_radius(self) -> float:
        """The largest normalized radius (tan of the angle off axis) up to which the distortion stays monotonic.

        Beyond it a polynomial lens model folds back: a point far outside the field of view could
        land inside the image. Points beyond it are dropped.
        """
        if not self.d.size or not np.any(self.d):
            return np.inf
        r = np.concatenate([np.linspace(0.0, 2.0, 2001)[1:], np.geomspace(2.0, 1e3, 4000)[1:]])
        if self.model == "equidistant":
            theta = np.arctan(r)
            c = self._coefficients()
            t2 = theta * theta
            distorted = theta * (1 + t2 * (c[0] + t2 * (c[1] + t2 * (c[2] + t2 * c[3]))))
        else:
            distorted = r * self._radial(r * r)
        falling = np.nonzero(np.diff(distorted) <= 0)[0]
        return float(r[falling[0]]) if falling.size else np.inf

    def _radial(self, r2: np.ndarray) -> np.ndarray:
        k1, k2, _, _, k3, k4, k5, k6 = self._coefficients()
        return (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))

    def project(self, points: np.ndarray, min_depth: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates of points in the camera's optical frame (z forward, x right, y down).

        points: (N, 3). Returns uv (N, 2) float64 (pixel centres at integers, as OpenCV) and a mask (N,)
        of the points with z > ``min_depth``, within the lens model's valid radius, whose pixel lies
        inside the image ([-0.5, width - 0.5) × [-0.5, height - 0.5)).
        """
        z = points[:, 2]
        front = z > min_depth
        safe_z = np.where(front, z, 1.0)
        a, b = points[:, 0] / safe_z, points[:, 1] / safe_z
        r2 = a * a + b * b
        valid = front & (r2 <= self.max_valid_radius() ** 2)
        if not self.d.size or not np.any(self.d):
            xd, yd = a, b
        elif self.model == "equidistant":
            c = self._coefficients()
            r = np.sqrt(r2)
            theta = np.arctan(r)
            t2 = theta * theta
            theta_d = theta * (1 + t2 * (c[0] + t2 * (c[1] + t2 * (c[2] + t2 * c[3]))))
            scale = np.where(r > 1e-12, theta_d / np.maximum(r, 1e-12), 1.0)
            xd, yd = a * scale, b * scale
        else:
            _, _, p1, p2 = self._coefficients()[:4]
            radial = self._radial(r2)
            xd = a * radial + 2 * p1 * a * b + p2 * (r2 + 2 * a * a)
            yd = b * radial + p1 * (r2 + 2 * b * b) + 2 * p2 * a * b
        k = self.k
        u = k[0, 0] * xd + k[0, 1] * yd + k[0, 2]
        v = k[1, 1] * yd + k[1, 2]
        inside = (u >= -0.5) & (u < self.width - 0.5) & (v >= -0.5) & (v < self.height - 0.5)
        return np.stack([u, v], axis=-1), valid & inside & np.isfinite(u) & np.isfinite(v)


def paint(points_camera: np.ndarray, camera: CameraModel, labels: np.ndarray, confidence: np.ndarray | None,
          min_depth: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and confidence under each visible point.

    points_camera: (N, 3) in the optical frame; labels: uint8 (h, w) label image of the camera's image,
    at its size or scaled (the node may publish labels at the network's size); confidence: float (h, w)
    or None (NaN then). Returns (indices (M,) of the kept points, labels (M,) uint8, confidence (M,) float32).
    """
    uv, keep = camera.project(points_camera, min_depth)
    h, w = labels.shape
    # A camera pixel's continuous extent [u - 0.5, u + 0.5) maps to the label image by the size ratio.
    col = np.floor((uv[keep, 0] + 0.5) * (w / camera.width)).astype(np.int64).clip(0, w - 1)
    row = np.floor((uv[keep, 1] + 0.5) * (h / camera.height)).astype(np.int64).clip(0, h - 1)
    index = np.nonzero(keep)[0]
    conf = (confidence[row, col].astype(np.float32) if confidence is not None
            else np.full(index.size, np.nan, np.float32))
    return index, labels[row, col], conf


# -- stamp matching -------------------------------------------------------------------------------
F = TypeVar("F")
C = TypeVar("C")


class StampMatcher(Generic[F, C]):
    """Match clouds to label frames of one camera by stamp, within a tolerance; never guess.

    Frames (label images) arrive in stamp order, usually after the cloud of the same instant (inference
    takes time). A cloud waits until a frame at or after its stamp has arrived (no later frame can lie
    closer then); it is matched to the nearest buffered frame within the tolerance, or reported
    unmatched. Clouds waiting beyond ``max_pending`` are reported unmatched, oldest first.
    Not thread-safe: the caller holds a lock.
    """

    def __init__(self, tolerance_ns: int, depth: int = 8, max_pending: int = 8) -> None:
        self.tolerance_ns = int(tolerance_ns)
        self.frames: deque[tuple[int, F]] = deque(maxlen=depth)
        self.pending: deque[tuple[int, C]] = deque()
        self.max_pending = max_pending

    def add_frame(self, stamp_ns: int, frame: F) -> list[tuple[C, F | None]]:
        """Buffer a frame; returns the clouds now decided, each with its frame or None (unmatched)."""
        given_up = []
        if self.frames and stamp_ns < self.frames[-1][0]:
            # Time jumped back (a bag restarted): the frames and the clouds waiting belong to the old timeline.
            self.frames.clear()
            given_up = [(cloud, None) for _, cloud in self.pending]
            self.pending.clear()
        self.frames.append((stamp_ns, frame))
        return given_up + self._decide()

    def add_cloud(self, stamp_ns: int, cloud: C) -> list[tuple[C, F | None]]:
        """Queue a cloud; returns the clouds now decided (this one included when it can be)."""
        self.pending.append((stamp_ns, cloud))
        decided = []
        while len(self.pending) > self.max_pending:
            decided.append((self.pending.popleft()[1], None))
        return decided + self._decide()

    def _decide(self) -> list[tuple[C, F | None]]:
        if not self.frames:
            return []
        newest = self.frames[-1][0]
        decided, waiting = [], deque()
        for stamp, cloud in self.pending:
            if stamp > newest:
                waiting.append((stamp, cloud))
                continue
            best = min(self.frames, key=lambda f: abs(f[0] - stamp))
            decided.append((cloud, best[1] if abs(best[0] - stamp) <= self.tolerance_ns else None))
        self.pending = waiting
        return decided
