"""Label visualisation: the OpenCV-backed colour lookup and blend against their plain numpy forms."""

from __future__ import annotations

import numpy as np
import pytest

from dgss_perception.labels import CITYSCAPES_PALETTE, colorize, overlay, palette_lut

rng = np.random.default_rng(11)


def test_colorize_equals_the_table_lookup():
    lut = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    for shape in ((1, 1), (37, 53), (1080, 1920)):
        labels = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(colorize(labels, lut), lut[labels])
    labels = np.array([[0, 18, 19, 255]], np.uint8)
    colours = colorize(labels, palette_lut(CITYSCAPES_PALETTE))
    assert colours[0, 0].tolist() == list(CITYSCAPES_PALETTE[0])
    assert colours[0, 1].tolist() == list(CITYSCAPES_PALETTE[18])
    assert colours[0, 2].tolist() == colours[0, 3].tolist() == [0, 0, 0]  # no colour, ignore: black
    with pytest.raises(ValueError, match="uint8"):
        colorize(labels.astype(np.int32), palette_lut(CITYSCAPES_PALETTE))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_is_the_rounded_blend(alpha):
    rgb = rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)
    color = rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)
    out = overlay(rgb, color, alpha)
    want = (1.0 - alpha) * rgb.astype(np.float64) + alpha * color.astype(np.float64)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert np.abs(out - want).max() <= 0.5 + 1e-6  # rounded to the nearest level
    if alpha in (0.0, 1.0):
        np.testing.assert_array_equal(out, rgb if alpha == 0.0 else color)


def test_overlay_refuses_bad_input():
    rgb = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="alpha"):
        overlay(rgb, rgb, 1.5)
    with pytest.raises(ValueError, match="differ"):
        overlay(rgb, np.zeros((4, 6, 3), np.uint8), 0.5)
