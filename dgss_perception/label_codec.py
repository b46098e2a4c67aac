"""Label images as lossless PNG, for ``sensor_msgs/CompressedImage`` (``labels/compressed``).

A 1080p mono8 label image is 2 MB raw; as PNG the demo's labels take about 7–13 KB (BENCHMARKS.md),
small enough for Fast DDS's default shared-memory segment and for best-effort subscribers, which
lose messages larger than it. PNG is lossless, so the labels decode to exactly the published ones.

The PNG holds one 8-bit grey channel of trainIds (255 = ignore). Each row is stored with PNG's
"up" filter (the difference to the row above: label maps repeat rows almost everywhere, so most
filtered bytes are 0) and deflated with zlib's run-length strategy; at 1080p that measured about a
fifth larger than OpenCV's default (adaptive filters) at level 9, half its size at levels 1–3, and
4× faster to encode than even level 1 (10–14× faster than level 9).
OpenCV builds before 4.10 cannot choose the filter and use their default adaptive one (slower,
about as small). Any PNG decoder reads the result: image_transport's compressed subscriber and
rqt_image_view take ``format`` "mono8; png compressed mono8" as image_transport's own PNG
publisher writes it for mono8.
"""

from __future__ import annotations

import struct
from typing import Any

import cv2
import numpy as np

from .codec import MAX_PIXELS, FrameError

# image_transport's format string: "<encoding>; png compressed <encoding of the PNG's pixels>".
LABELS_FORMAT = "mono8; png compressed mono8"
# Format strings whose PNG holds mono8 trainIds: image_transport's (also without a target
# encoding, as older releases wrote), and a bare "png" from tools that name only the codec.
_MONO8_ENCODINGS = ("mono8", "8uc1")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_LEVELS = range(0, 10)
DEFAULT_LEVEL = 1  # with the run-length strategy levels 1–9 give the same bytes; 0 stores them raw


def png_params(level: int = DEFAULT_LEVEL) -> list[int]:
    """cv2.imencode parameters for a label PNG at zlib ``level`` (0 = stored, 1–9 compressed)."""
    if level not in PNG_LEVELS:
        raise ValueError(f"PNG compression level must be 0–9, got {level!r}")
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(level), cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV ≥ 4.10
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    return params


def encode_labels_png(labels: np.ndarray, level: int = DEFAULT_LEVEL) -> np.ndarray:
    """trainIds uint8 H×W → PNG bytes as a uint8 array of shape (n,) (8-bit grey, lossless).

    Raises:
        ValueError: not a uint8 H×W array, a bad level, or the encoder failed.
    """
    if labels.dtype != np.uint8 or labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"expected non-empty uint8 H×W labels, got {labels.dtype} {labels.shape}")
    ok, buf = cv2.imencode(".png", labels, png_params(level))
    if not ok:
        raise ValueError(f"PNG encoding of {labels.shape[1]}x{labels.shape[0]} labels failed")
    return buf.reshape(-1)


def png_header(data: bytes) -> tuple[int, int, int, int]:
    """(height, width, bit depth, colour type) from a PNG's IHDR; FrameError if it is no PNG."""
    if len(data) < 29 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise FrameError("compressed labels are not a PNG")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return height, width, depth, colour


def announces_labels(fmt: str) -> bool:
    """Whether a CompressedImage ``format`` names mono8 PNG ("mono8; png compressed …"), as labels have."""
    encoding, sep, rest = str(fmt).strip().lower().partition(";")
    return bool(sep) and encoding.strip() in _MONO8_ENCODINGS and "png" in rest


def check_labels_format(fmt: str) -> None:
    """Raise FrameError unless a CompressedImage ``format`` announces mono8 PNG labels."""
    if not (announces_labels(fmt) or str(fmt).strip().lower() == "png"):
        raise FrameError(f"format {fmt!r} is not mono8 PNG labels (expected {LABELS_FORMAT!r})")


def decode_labels_png(data: Any, fmt: str = LABELS_FORMAT) -> np.ndarray:
    """PNG bytes of labels (bytes, array.array or a uint8 array) → trainIds uint8 H×W.

    Only an 8-bit greyscale PNG is accepted (a colour PNG would be a colour image, not trainIds),
    and its size is read from the header before any decoding allocates it.

    Raises:
        FrameError: ``fmt`` is not mono8 PNG, or the data is not a readable 8-bit grey PNG.
    """
    check_labels_format(fmt)
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    height, width, depth, colour = png_header(buf[:32].tobytes())
    if depth != 8 or colour != 0:
        raise FrameError(f"compressed labels are a PNG of bit depth {depth}, colour type {colour}; "
                         "expected 8-bit greyscale (colour type 0)")
    if height * width == 0 or height * width > MAX_PIXELS:
        raise FrameError(f"compressed labels claim {width}x{height} pixels")
    try:
        labels = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise FrameError(f"could not decode the labels PNG: {exc}") from exc
    if labels is None or labels.shape != (height, width) or labels.dtype != np.uint8:
        raise FrameError(f"could not decode the labels PNG ({buf.size} B, header {width}x{height})")
    return labels


def compressed_labels_to_array(msg: Any) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage`` of labels (rclpy or rosbags) → trainIds uint8 H×W."""
    return decode_labels_png(msg.data, msg.format)
