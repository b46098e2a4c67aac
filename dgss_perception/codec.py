"""Conversion between ROS image messages and numpy arrays, without rclpy.

Works on any object with the fields of ``sensor_msgs/Image`` or
``sensor_msgs/CompressedImage`` (rclpy messages, rosbags messages). Every frame
is validated before it is touched, so a malformed message raises
:class:`FrameError` with a reason instead of crashing or reading out of
bounds. Where cv_bridge is importable it does the pixel conversion of valid
frames; the numpy path below is the equivalent used everywhere else.
"""

from __future__ import annotations

import struct
from typing import Any

import cv2
import numpy as np

try:  # cv_bridge is part of a ROS 2 install, not of the pip wheels.
    from cv_bridge import CvBridge as _CvBridge
except ImportError:  # pragma: no cover - depends on the environment
    _CvBridge = None

# encoding → (channels, bytes per channel)
ENCODINGS: dict[str, tuple[int, int]] = {
    "rgb8": (3, 1),
    "bgr8": (3, 1),
    "rgba8": (4, 1),
    "bgra8": (4, 1),
    "mono8": (1, 1),
    "mono16": (1, 2),
}

# Guard against absurd headers before any allocation (a 16k×16k rgba8 frame is 1 GiB).
MAX_PIXELS = 16384 * 16384


class FrameError(ValueError):
    """A frame that cannot be decoded; the message says why."""


def _bridge() -> Any:
    global _BRIDGE
    if _BRIDGE is None and _CvBridge is not None:
        _BRIDGE = _CvBridge()
    return _BRIDGE


_BRIDGE = None


def validate_image(msg: Any) -> tuple[int, int]:
    """Check an Image message's geometry and encoding; return (channels, bytes per channel)."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise FrameError(f"empty image ({width}x{height})")
    if height * width > MAX_PIXELS:
        raise FrameError(f"image too large ({width}x{height})")
    encoding = str(msg.encoding).lower()
    if encoding not in ENCODINGS:
        raise FrameError(f"unsupported encoding '{msg.encoding}' (supported: {', '.join(ENCODINGS)})")
    channels, depth = ENCODINGS[encoding]
    row = width * channels * depth
    if step < row:
        raise FrameError(f"step {step} shorter than a row ({width} px × {channels * depth} B = {row} B)")
    size = len(msg.data)
    if size != step * height:
        raise FrameError(f"data size {size} B does not match step × height = {step} × {height} = {step * height} B")
    return channels, depth


def _image_to_rgb_numpy(msg: Any, channels: int, depth: int, copy: bool = True) -> np.ndarray:
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    raw = np.frombuffer(memoryview(msg.data).cast("B"), dtype=np.uint8).reshape(height, step)
    raw = raw[:, : width * channels * depth]
    encoding = str(msg.encoding).lower()
    if depth == 2:
        dtype = np.dtype(">u2" if msg.is_bigendian else "<u2")
        values = np.ascontiguousarray(raw).view(dtype).reshape(height, width)
        # Full 16-bit range onto 8 bit, rounded, as cv::Mat::convertTo(CV_8U, 255/65535).
        mono = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(mono[:, :, None], 3, axis=2)
    pixels = raw.reshape(height, width, channels)
    if encoding == "rgb8":
        if not copy and pixels.flags.c_contiguous:
            view = pixels.view()
            view.flags.writeable = False  # nothing downstream may write into the message
            return view
        return pixels.copy()
    if encoding == "bgr8":
        return np.ascontiguousarray(pixels[:, :, ::-1])
    if encoding == "rgba8":
        return np.ascontiguousarray(pixels[:, :, :3])
    if encoding == "bgra8":
        return np.ascontiguousarray(pixels[:, :, 2::-1])
    return np.repeat(pixels, 3, axis=2)  # mono8


def image_to_rgb(msg: Any, use_cv_bridge: bool = True, copy: bool = True) -> np.ndarray:
    """sensor_msgs/Image → rgb uint8 H×W×3 (a new array). Raises FrameError.

    ``copy=False`` lets an rgb8 frame with no row padding come back as a read-only view of the
    message's buffer (6 MB saved at 1080p), for a caller that owns the message and never changes it.
    """
    channels, depth = validate_image(msg)
    if not copy and str(msg.encoding).lower() == "rgb8" and int(msg.step) == int(msg.width) * 3:
        return _image_to_rgb_numpy(msg, channels, depth, copy=False)  # no conversion to hand to cv_bridge
    bridge = _bridge() if use_cv_bridge else None
    if bridge is not None:
        try:
            return np.ascontiguousarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
        except Exception as exc:  # cv_bridge raises its own error types
            raise FrameError(f"cv_bridge could not convert the frame: {exc}") from exc
    return _image_to_rgb_numpy(msg, channels, depth)


def compressed_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG or JPEG header without decoding; None for other or unreadable data."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                if i + 9 > len(data):
                    return None
                height, width = struct.unpack(">HH", data[i + 5:i + 9])
                return height, width
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG, PNG, …) → rgb uint8 H×W×3. Raises FrameError."""
    data = np.frombuffer(memoryview(msg.data).cast("B"), dtype=np.uint8)
    if data.size == 0:
        raise FrameError("empty compressed image")
    size = compressed_size(data[:65536].tobytes())
    # A few hundred bytes can claim gigapixels and OpenCV would allocate them while decoding, so only
    # formats whose size is read from the header first are accepted: JPEG and PNG, what ROS 2's
    # compressed image transport produces.
    if size is None:
        raise FrameError(f"compressed image is neither JPEG nor PNG with a readable header (format {msg.format!r})")
    if size[0] * size[1] > MAX_PIXELS:
        raise FrameError(f"compressed image too large ({size[1]}x{size[0]})")
    # cv2.imdecode returns None (or raises on some builds) for corrupt data.
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise FrameError(f"could not decode compressed image ({msg.format!r}): {exc}") from exc
    if bgr is None or bgr.size == 0:
        raise FrameError(f"could not decode compressed image (format {msg.format!r}, {data.size} B)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_image_fields(array: np.ndarray, encoding: str) -> dict[str, Any]:
    """Fields of a sensor_msgs/Image for an array: mono8 (H×W uint8) or rgb8 (H×W×3 uint8).

    ``data`` is the contiguous uint8 buffer as a numpy array; callers wrap it as
    their message library wants (array.array for rclpy, the array for rosbags).
    """
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8, got {array.dtype}")
    if encoding == "mono8" and array.ndim == 2:
        channels = 1
    elif encoding == "rgb8" and array.ndim == 3 and array.shape[2] == 3:
        channels = 3
    else:
        raise ValueError(f"cannot encode an array of shape {array.shape} as {encoding}")
    height, width = array.shape[:2]
    return {
        "height": height,
        "width": width,
        "encoding": encoding,
        "is_bigendian": 0,
        "step": width * channels,
        "data": np.ascontiguousarray(array).reshape(-1),
    }


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """rgb uint8 H×W×3 → JPEG bytes (for CompressedImage messages)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
