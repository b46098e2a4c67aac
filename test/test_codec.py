"""Image message conversion: every accepted encoding, and malformed frames refused clearly."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from dgss_perception import codec
from dgss_perception.codec import FrameError, compressed_to_rgb, encode_image_fields, encode_jpeg, image_to_rgb

rng = np.random.default_rng(0)


def msg_from(pixels: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False) -> SimpleNamespace:
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1)
    if pixels.dtype == np.uint16:
        row = pixels.astype(">u2" if bigendian else "<u2").view(np.uint8).reshape(h, -1)
    padded = np.zeros((h, row.shape[1] + pad), np.uint8)
    padded[:, : row.shape[1]] = row
    return SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian),
                           step=row.shape[1] + pad, data=padded.tobytes())


@pytest.mark.parametrize("pad", [0, 3])
def test_colour_encodings_give_rgb(pad):
    rgb = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (7, 11, 1), dtype=np.uint8)
    cases = {
        "rgb8": rgb, "bgr8": rgb[:, :, ::-1], "rgba8": np.concatenate([rgb, alpha], 2),
        "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], 2),
    }
    for encoding, pixels in cases.items():
        out = image_to_rgb(msg_from(np.ascontiguousarray(pixels), encoding, pad), use_cv_bridge=False)
        np.testing.assert_array_equal(out, rgb, err_msg=encoding)


def test_mono_encodings():
    mono = rng.integers(0, 256, (5, 9), dtype=np.uint8)
    out = image_to_rgb(msg_from(mono, "mono8", 1), use_cv_bridge=False)
    assert out.shape == (5, 9, 3) and all(np.array_equal(out[:, :, c], mono) for c in range(3))
    mono16 = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    for big in (False, True):
        out = image_to_rgb(msg_from(mono16, "mono16", bigendian=big), use_cv_bridge=False)
        np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128])


@pytest.mark.parametrize("mutate,reason", [
    (lambda m: setattr(m, "step", m.step - 1), "step"),
    (lambda m: setattr(m, "data", m.data[:-1]), "data size"),
    (lambda m: setattr(m, "data", m.data + b"\0"), "data size"),
    (lambda m: setattr(m, "encoding", "yuv422"), "unsupported encoding"),
    (lambda m: setattr(m, "encoding", ""), "unsupported encoding"),
    (lambda m: (setattr(m, "height", 0), setattr(m, "data", b"")), "empty"),
    (lambda m: (setattr(m, "width", 10**6), setattr(m, "height", 10**6)), "too large"),
])
def test_malformed_images_raise_frame_error(mutate, reason):
    m = msg_from(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8), "rgb8")
    mutate(m)
    with pytest.raises(FrameError, match=reason):
        image_to_rgb(m, use_cv_bridge=False)


def test_compressed_round_trip_and_corrupt():
    rgb = np.zeros((33, 47, 3), np.uint8)
    rgb[:, :20] = (200, 30, 10)
    out = compressed_to_rgb(SimpleNamespace(format="jpeg", data=encode_jpeg(rgb, 95)))
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 3
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    np.testing.assert_array_equal(compressed_to_rgb(SimpleNamespace(format="png", data=png.tobytes())), rgb)
    for data in (b"", b"not an image", encode_jpeg(rgb)[:20]):
        with pytest.raises(FrameError):
            compressed_to_rgb(SimpleNamespace(format="jpeg", data=data))


def test_encode_fields():
    f = encode_image_fields(np.zeros((3, 5), np.uint8), "mono8")
    assert (f["height"], f["width"], f["step"], f["data"].size) == (3, 5, 5, 15)
    f = encode_image_fields(np.zeros((3, 5, 3), np.uint8), "rgb8")
    assert (f["step"], f["data"].size) == (15, 45)
    with pytest.raises(ValueError):
        encode_image_fields(np.zeros((3, 5), np.float32), "mono8")


@pytest.mark.skipif(codec._CvBridge is None, reason="cv_bridge comes with a ROS 2 install")
def test_cv_bridge_agrees_with_numpy_path():
    rgb = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    for encoding, pixels in {"rgb8": rgb, "bgr8": rgb[:, :, ::-1]}.items():
        m = msg_from(np.ascontiguousarray(pixels), encoding, 2)
        np.testing.assert_array_equal(image_to_rgb(m, use_cv_bridge=True), image_to_rgb(m, use_cv_bridge=False))
