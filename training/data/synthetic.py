"""Procedurally drawn road scenes with exact Cityscapes trainId labels.

Scenes are painted with a pinhole camera looking down a straight street:
ground-plane geometry (road, sidewalks, markings), facades parallel to the
road, and upright objects (vehicles, people, poles, trees, ...) drawn from
far to near so that occlusion is consistent.  Every primitive is rasterised
into the RGB image and the label image with identical geometry (no
anti-aliasing), so the label describes exactly what was drawn.  Texture noise
and a slight blur are applied to the RGB image only afterwards.

The same scene can be re-rendered as "night" or "snow" with
:func:`apply_condition`; labels never change.

Command line::

    python -m training.data.synthetic --out DIR [--train N] [--val N]
        [--height H] [--width W] [--seed S]
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

__all__ = [
    "CONDITIONS",
    "ADVERSE_CONDITIONS",
    "CLASS_NAMES",
    "NUM_CLASSES",
    "IGNORE_INDEX",
    "PALETTE",
    "VAL_SEED_OFFSET",
    "render_scene",
    "apply_condition",
    "colorize_labels",
    "write_cityscapes_layout",
    "write_acdc_layout",
    "main",
]

CONDITIONS = ("day", "night", "snow")
ADVERSE_CONDITIONS = ("night", "snow")

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN,
 VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE,
 BICYCLE) = range(NUM_CLASSES)

#: Official Cityscapes colours for trainIds 0..18 (RGB), used for visualisation.
PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
        (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
        (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
        (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100),
        (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)

#: Scene seeds of validation images are offset by this much from the base seed.
VAL_SEED_OFFSET = 1_000_000

_SHIFT = 2  # sub-pixel bits used for every cv2 drawing call
_ONE = 1 << _SHIFT
_VEHICLES = (CAR, TRUCK, BUS)

# Per-class luminance noise amplitudes (fine grain, coarse blotches), in 8-bit units.
_GRAIN_FINE = np.zeros(256, np.float32)
_GRAIN_COARSE = np.zeros(256, np.float32)
for _cls, _fine, _coarse in (
    (ROAD, 5.0, 3.5), (SIDEWALK, 5.0, 4.0), (BUILDING, 4.5, 8.0), (WALL, 6.0, 8.0),
    (FENCE, 4.0, 2.0), (POLE, 3.0, 3.0), (TRAFFIC_LIGHT, 2.0, 0.0),
    (TRAFFIC_SIGN, 2.0, 0.0), (VEGETATION, 15.0, 12.0), (TERRAIN, 11.0, 12.0),
    (SKY, 1.0, 0.0), (PERSON, 4.0, 3.0), (RIDER, 4.0, 3.0), (CAR, 3.0, 3.0),
    (TRUCK, 4.0, 4.0), (BUS, 4.0, 4.0), (TRAIN, 4.0, 4.0), (MOTORCYCLE, 3.0, 3.0),
    (BICYCLE, 3.0, 3.0),
):
    _GRAIN_FINE[_cls] = _fine
    _GRAIN_COARSE[_cls] = _coarse

_FACADE_COLOURS = (
    (196, 180, 152), (212, 202, 182), (172, 122, 96), (150, 84, 64), (142, 140, 132),
    (190, 170, 122), (202, 162, 142), (122, 112, 102), (182, 176, 162), (160, 150, 122),
    (206, 192, 170), (112, 98, 88), (188, 188, 180), (168, 150, 138),
)
# Vehicle bodies stay <= 195 per channel and red ones <= 185 so that lamps
# (near-white / saturated red) can be told apart from paint.
_CAR_COLOURS = (
    (198, 198, 196), (165, 168, 172), (30, 31, 35), (70, 72, 76), (172, 30, 32),
    (40, 62, 140), (30, 40, 80), (42, 92, 62), (196, 168, 44), (182, 166, 132),
    (120, 124, 130), (95, 40, 50), (150, 150, 152),
)
_SKIN = ((232, 190, 160), (205, 160, 120), (160, 110, 80), (110, 75, 55), (240, 205, 180))
_CLOTHES = (
    (40, 40, 45), (60, 70, 110), (150, 40, 40), (200, 200, 195), (90, 110, 70),
    (120, 90, 60), (30, 50, 90), (170, 150, 60), (110, 60, 120), (80, 80, 85),
    (190, 110, 60), (60, 110, 140),
)
_HAIR = ((30, 25, 20), (80, 55, 35), (150, 120, 70), (60, 60, 60), (190, 170, 120))
_GREENS = ((62, 96, 40), (48, 84, 36), (80, 110, 48), (56, 90, 56), (92, 118, 44))

_LAMP_LENS = (252, 250, 244)  # street-lamp lens, min channel > 205 (poles stay darker)
_HEADLIGHT = (252, 252, 246)  # vehicle headlights, min channel > 226 (paint stays darker)
_TAIL_LIGHT = (250, 34, 26)   # vehicle tail lights, R > 200 and G, B < 100
_GLASS_DARK = (50, 66, 92)    # building glass: B - R >= 22
_GLASS_LIGHT = (112, 134, 160)


# --------------------------------------------------------------------------- #
# painter
# --------------------------------------------------------------------------- #


class _Painter:
    """Image + label canvas with a pinhole camera (X right, Y up, Z forward)."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.h, self.w = height, width
        self.img = np.zeros((height, width, 3), np.uint8)
        self.lab = np.zeros((height, width), np.uint8)
        self.f = min(width, 2 * height) * rng.uniform(0.72, 0.92)
        self.yh = height * rng.uniform(0.36, 0.50)
        self.xv = width * (0.5 + rng.uniform(-0.06, 0.06))
        self.hc = rng.uniform(1.45, 2.1)
        self.z_bottom = self.f * self.hc / (height - self.yh)
        self.z_near = 0.9 * self.z_bottom
        self.visibility = rng.uniform(260.0, 600.0)
        self.haze = np.array([206.0, 214.0, 226.0])

    # -- colours ---------------------------------------------------------- #
    def tone(self, rgb: Sequence[float], z: float, shade: float = 1.0) -> tuple[int, int, int]:
        a = 1.0 - math.exp(-max(z, 0.0) / self.visibility)
        return tuple(
            int(min(255.0, max(0.0, c * shade * (1.0 - a) + hz * a)))
            for c, hz in zip(rgb, self.haze)
        )

    # -- projection ------------------------------------------------------- #
    def poly(self, pts: Sequence[tuple[float, float, float]]) -> np.ndarray:
        """World points (X, Y, Z) -> int32 (N, 2) polygon in shifted pixel units."""
        out = []
        for x, y, z in pts:
            q = self.f / z
            out.append((round((self.xv + x * q) * _ONE), round((self.yh + (self.hc - y) * q) * _ONE)))
        return np.array(out, np.int32)

    def ground(self, x0: float, x1: float, z0: float, z1: float) -> np.ndarray:
        return self.poly([(x0, 0.0, z0), (x1, 0.0, z0), (x1, 0.0, z1), (x0, 0.0, z1)])

    def xplane(self, x: float, y0: float, y1: float, z0: float, z1: float) -> np.ndarray:
        return self.poly([(x, y0, z0), (x, y1, z0), (x, y1, z1), (x, y0, z1)])

    def zplane(self, x0: float, x1: float, y0: float, y1: float, z: float) -> np.ndarray:
        return self.poly([(x0, y0, z), (x1, y0, z), (x1, y1, z), (x0, y1, z)])

    def xplane_quads(self, x: float, y0, y1, z0, z1, min_px: float = 0.7) -> list[np.ndarray]:
        """Many quads on the plane X = x (arrays of equal length); tiny ones are dropped."""
        y0, y1, z0, z1 = (np.asarray(a, np.float64) for a in (y0, y1, z0, z1))
        if y0.size == 0:
            return []
        zs = np.stack([z0, z0, z1, z1], 1)
        ys = np.stack([y0, y1, y1, y0], 1)
        q = self.f / zs
        px = self.xv + x * q
        py = self.yh + (self.hc - ys) * q
        keep = np.abs(px[:, 0] - px[:, 2]) >= min_px
        pts = np.rint(np.stack([px, py], -1)[keep] * _ONE).astype(np.int32)
        return list(pts)

    def zplane_quads(self, x0, x1, y0, y1, z: float, min_px: float = 0.7) -> list[np.ndarray]:
        x0, x1, y0, y1 = (np.asarray(a, np.float64) for a in (x0, x1, y0, y1))
        if x0.size == 0:
            return []
        q = self.f / z
        xs = self.xv + np.stack([x0, x1, x1, x0], 1) * q
        ys = self.yh + (self.hc - np.stack([y0, y0, y1, y1], 1)) * q
        keep = np.abs(xs[:, 1] - xs[:, 0]) >= min_px
        pts = np.rint(np.stack([xs, ys], -1)[keep] * _ONE).astype(np.int32)
        return list(pts)

    def anchor(self, x: float, z: float) -> tuple[float, float, float]:
        """Pixel position of ground point (x, 0, z) and pixels per metre there."""
        q = self.f / z
        return self.xv + x * q, self.yh + self.hc * q, q

    @staticmethod
    def local(ox: float, oy: float, q: float, uv: Sequence[tuple[float, float]]) -> np.ndarray:
        """Front-parallel local metres (u right, v up) around an anchor -> polygon."""
        return np.array([(round((ox + u * q) * _ONE), round((oy - v * q) * _ONE)) for u, v in uv], np.int32)

    # -- rasterisation (image and label share geometry) -------------------- #
    def fill(self, polys: list[np.ndarray], colour: tuple[int, int, int], label: int | None) -> None:
        if not polys:
            return
        cv2.fillPoly(self.img, polys, colour, cv2.LINE_8, _SHIFT)
        if label is not None:
            cv2.fillPoly(self.lab, polys, int(label), cv2.LINE_8, _SHIFT)

    def circle(self, cx: float, cy: float, r: float, colour, label: int | None, thickness: int = -1) -> None:
        c = (round(cx * _ONE), round(cy * _ONE))
        rr = max(0, round(r * _ONE))
        cv2.circle(self.img, c, rr, colour, thickness, cv2.LINE_8, _SHIFT)
        if label is not None:
            cv2.circle(self.lab, c, rr, int(label), thickness, cv2.LINE_8, _SHIFT)

    def ellipse(self, cx, cy, ax, ay, colour, label: int | None, angle: float = 0.0,
                start: float = 0.0, end: float = 360.0) -> None:
        c = (round(cx * _ONE), round(cy * _ONE))
        axes = (max(0, round(ax * _ONE)), max(0, round(ay * _ONE)))
        cv2.ellipse(self.img, c, axes, angle, start, end, colour, -1, cv2.LINE_8, _SHIFT)
        if label is not None:
            cv2.ellipse(self.lab, c, axes, angle, start, end, int(label), -1, cv2.LINE_8, _SHIFT)

    def line(self, p0, p1, colour, label: int | None, thickness: float) -> None:
        a = (round(p0[0] * _ONE), round(p0[1] * _ONE))
        b = (round(p1[0] * _ONE), round(p1[1] * _ONE))
        t = max(1, int(round(thickness)))
        cv2.line(self.img, a, b, colour, t, cv2.LINE_8, _SHIFT)
        if label is not None:
            cv2.line(self.lab, a, b, int(label), t, cv2.LINE_8, _SHIFT)

    def blend(self, polys: list[np.ndarray], colour, alpha: float, label: int | None = None) -> None:
        """Alpha-blend a colour into the polygons (image); label drawn opaque."""
        mask = np.zeros((self.h, self.w), np.uint8)
        cv2.fillPoly(mask, polys, 1, cv2.LINE_8, _SHIFT)
        m = mask.astype(bool)
        if m.any():
            px = self.img[m].astype(np.float32)
            self.img[m] = (px * (1.0 - alpha) + np.asarray(colour, np.float32) * alpha).astype(np.uint8)
        if label is not None:
            cv2.fillPoly(self.lab, polys, int(label), cv2.LINE_8, _SHIFT)

    def box(self, x0, x1, y0, y1, z0, z1, colour, label: int, side_shade=0.78, top_shade=1.1) -> str | None:
        """Axis-aligned box: draws its visible faces; returns which side face is visible."""
        side = None
        zm = 0.5 * (z0 + z1)
        if x0 > 0.0:
            side = "left"
            self.fill([self.xplane(x0, y0, y1, z0, z1)], self.tone(colour, zm, side_shade), label)
        elif x1 < 0.0:
            side = "right"
            self.fill([self.xplane(x1, y0, y1, z0, z1)], self.tone(colour, zm, side_shade), label)
        if y1 < self.hc:
            top = self.poly([(x0, y1, z0), (x1, y1, z0), (x1, y1, z1), (x0, y1, z1)])
            self.fill([top], self.tone(colour, zm, top_shade), label)
        self.fill([self.zplane(x0, x1, y0, y1, z0)], self.tone(colour, z0), label)
        return side


# --------------------------------------------------------------------------- #
# scene layout and background
# --------------------------------------------------------------------------- #


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _between(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Uniform sample in [lo, hi]; collapses to lo when the interval is empty."""
    return float(rng.uniform(lo, max(lo, hi)))


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: float = 12.0) -> tuple[float, float, float]:
    d = rng.uniform(-amount, amount)
    return tuple(float(np.clip(c + d + rng.uniform(-3, 3), 0, 255)) for c in rgb)


def _draw_sky(p: _Painter, rng: np.random.Generator) -> None:
    h, w = p.h, p.w
    top = np.array([rng.uniform(55, 95), rng.uniform(115, 150), rng.uniform(185, 225)], np.float32)
    hor = np.array([rng.uniform(170, 200), rng.uniform(192, 214), rng.uniform(218, 236)], np.float32)
    t = np.clip(np.arange(h, dtype=np.float32) / max(p.yh, 1.0), 0.0, 1.0) ** 0.8
    grad = top[None, :] * (1.0 - t[:, None]) + hor[None, :] * t[:, None]
    sky = np.broadcast_to(grad[:, None, :], (h, w, 3)).copy()
    n_clouds = int(rng.integers(0, 7))
    if n_clouds:
        sh, sw = max(4, h // 4), max(4, w // 4)
        layer = np.zeros((sh, sw), np.float32)
        for _ in range(n_clouds):
            cx, cy = rng.uniform(0, sw), rng.uniform(0, max(1.0, p.yh / 4 * 0.8))
            for _ in range(int(rng.integers(3, 8))):
                ax, ay = rng.uniform(0.03, 0.09) * sw, rng.uniform(0.015, 0.04) * sw
                c = (int(cx + rng.normal(0, 0.05 * sw)), int(cy + rng.normal(0, 0.01 * sw)))
                cv2.ellipse(layer, c, (max(1, int(ax)), max(1, int(ay))), 0, 0, 360,
                            float(rng.uniform(0.5, 0.9)), -1)
        layer = cv2.GaussianBlur(layer, (0, 0), max(0.8, sw / 80))
        layer = cv2.resize(layer, (w, h), interpolation=cv2.INTER_LINEAR)
        white = np.array([236, 238, 242], np.float32)
        sky += (white - sky) * layer[..., None]
    p.img[:] = sky.astype(np.uint8)
    p.lab[:] = SKY


def _draw_skyline(p: _Painter, rng: np.random.Generator) -> None:
    """Distant buildings / tree line along the horizon."""
    x = -5.0
    z = 450.0
    while x < p.w + 5:
        seg = p.w * rng.uniform(0.015, 0.06)
        if rng.random() < 0.65:
            hgt = p.f * rng.uniform(8.0, 45.0) / z
            col = p.tone(_pick(rng, _FACADE_COLOURS), z * rng.uniform(0.8, 1.4))
            pts = np.array([(x, p.yh + 1), (x + seg, p.yh + 1), (x + seg, p.yh - hgt), (x, p.yh - hgt)])
            p.fill([np.rint(pts * _ONE).astype(np.int32)], col, BUILDING)
        else:
            col = p.tone(_pick(rng, _GREENS), z)
            for _ in range(3):
                r = p.f * rng.uniform(4.0, 10.0) / z
                p.ellipse(x + rng.uniform(0, seg), p.yh, r * 1.3, r, col, VEGETATION)
        x += seg


class _Side:
    """Cross-section of one side of the street (distances are positive)."""

    def __init__(self, sign: int, road_edge: float, rng: np.random.Generator) -> None:
        self.sign = sign
        self.road = road_edge
        self.kerb = 0.22
        self.walk = rng.uniform(2.2, 4.8)
        self.grass = rng.uniform(0.8, 3.0) if rng.random() < 0.4 else 0.0
        self.facade = self.road + self.walk + self.grass
        self.sunny = False


def _layout(p: _Painter, rng: np.random.Generator):
    lane_w = rng.uniform(2.9, 3.6)
    ego = rng.uniform(-0.5, 0.5)
    n_left = int(_pick(rng, (0, 1, 1, 2)))
    n_right = int(_pick(rng, (0, 0, 1)))
    two_way = n_left >= 1 and rng.random() < 0.75
    park_l = rng.random() < 0.55
    park_r = rng.random() < 0.7
    park_w = 2.2
    lanes = []  # (x centre, direction (+1 away, -1 towards camera), kind)
    for i in range(-n_left, n_right + 1):
        direction = -1 if (two_way and i < 0) else 1
        lanes.append((ego + i * lane_w, direction, "drive"))
    left_edge = ego - lane_w / 2 - n_left * lane_w
    right_edge = ego + lane_w / 2 + n_right * lane_w
    lines = []  # (x, style)
    for i in range(-n_left, n_right):
        x = ego + (i + 0.5) * lane_w
        centre = two_way and i == -1
        lines.append((x, "solid" if centre else "dashed"))
    if park_l:
        lanes.append((left_edge - park_w / 2, -1 if two_way else 1, "park"))
        lines.append((left_edge, "thin"))
        left_edge -= park_w
    else:
        lines.append((left_edge + 0.3, "edge"))
    if park_r:
        lanes.append((right_edge + park_w / 2, 1, "park"))
        lines.append((right_edge, "thin"))
        right_edge += park_w
    else:
        lines.append((right_edge - 0.3, "edge"))
    sides = {-1: _Side(-1, -left_edge, rng), 1: _Side(1, right_edge, rng)}
    return lanes, lines, sides, (left_edge, right_edge)


def _draw_ground(p: _Painter, rng, lines, sides, edges) -> dict:
    far = 1e4
    zn = p.z_near
    h, w = p.h, p.w
    # terrain everywhere below the horizon (visible beyond sidewalks and in gaps)
    grass = _jitter(rng, _pick(rng, ((96, 118, 60), (110, 124, 70), (122, 116, 80), (84, 110, 58))), 10)
    yh = int(math.floor(p.yh))
    p.img[yh:] = p.tone(grass, 60.0)
    p.lab[yh:] = TERRAIN
    # sidewalks with kerb stones
    walk_col = _jitter(rng, _pick(rng, ((168, 164, 158), (150, 146, 140), (176, 160, 150), (140, 140, 144))), 8)
    kerb_col = tuple(min(255.0, c * 1.12 + 10) for c in walk_col)
    for s in sides.values():
        g = s.sign
        p.fill([p.ground(g * s.road, g * (s.road + s.walk), zn, far)], p.tone(walk_col, 40.0), SIDEWALK)
        p.fill([p.ground(g * s.road, g * (s.road + s.kerb), zn, far)], p.tone(kerb_col, 40.0), SIDEWALK)
        # paving joints (image only)
        step = rng.uniform(1.2, 2.5)
        zs = np.arange(zn + rng.uniform(0, step), 40.0, step)
        joint = tuple(c * 0.82 for c in walk_col)
        segs = [p.poly([(g * (s.road + s.kerb), 0, z), (g * (s.road + s.walk), 0, z)]) for z in zs]
        for x in np.arange(s.road + s.kerb + 1.2, s.road + s.walk, rng.uniform(1.0, 1.6)):
            segs.append(p.poly([(g * x, 0, zn), (g * x, 0, 60.0)]))
        if segs:
            cv2.polylines(p.img, segs, False, p.tone(joint, 20.0), 1, cv2.LINE_8, _SHIFT)
    # road
    asphalt = _jitter(rng, _pick(rng, ((86, 86, 90), (98, 96, 94), (74, 75, 80), (108, 106, 104))), 8)
    p.fill([p.ground(edges[0], edges[1], zn, far)], p.tone(asphalt, 40.0), ROAD)
    # repaired patches and wheel tracks (image only)
    for _ in range(int(rng.integers(0, 5))):
        x0 = rng.uniform(edges[0], edges[1] - 1.0)
        z0 = rng.uniform(zn, 60.0)
        col = tuple(c * rng.uniform(0.88, 1.08) for c in asphalt)
        p.fill([p.ground(x0, min(edges[1], x0 + rng.uniform(0.8, 2.5)), z0, z0 + rng.uniform(1.0, 5.0))],
               p.tone(col, z0), None)
    marking = (228, 228, 222)
    for x, style in lines:
        wd = 0.12 if style != "thin" else 0.1
        if style == "dashed":
            period, dash = rng.uniform(8.0, 12.0), rng.uniform(2.5, 4.0)
            zs = np.arange(zn - rng.uniform(0, period), 180.0, period)
            polys = [p.ground(x - wd, x + wd, max(z, zn), z + dash) for z in zs if z + dash > zn]
        else:
            polys = [p.ground(x - wd, x + wd, zn, 400.0)]
            if style == "solid" and rng.random() < 0.4:
                polys.append(p.ground(x + 3 * wd, x + 5 * wd, zn, 400.0))
        p.fill(polys, p.tone(marking, 30.0), ROAD)
    extra = {"crossing": None}
    if rng.random() < 0.35:
        zc = _between(rng, max(zn + 3, 10.0), 35.0)
        xs = np.arange(edges[0] + 0.4, edges[1] - 0.5, 1.0)
        polys = [p.ground(x, x + 0.5, zc, zc + 3.0) for x in xs]
        p.fill(polys, p.tone(marking, zc), ROAD)
        p.fill([p.ground(edges[0] + 0.2, edges[1] - 0.2, zc - 1.6, zc - 1.3)], p.tone(marking, zc), ROAD)
        extra["crossing"] = zc
    # shadows cast by the buildings on the shaded side (image only)
    if rng.random() < 0.65:
        shade_side = sides[int(_pick(rng, (-1, 1)))]
        sides[-shade_side.sign].sunny = True
        g = shade_side.sign
        width = rng.uniform(1.5, shade_side.facade + edges[1] - edges[0])
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [p.ground(g * shade_side.facade, g * (shade_side.facade - width), zn, 600.0)],
                     1, cv2.LINE_8, _SHIFT)
        m = mask.astype(bool)
        p.img[m] = (p.img[m] * rng.uniform(0.55, 0.7)).astype(np.uint8)
    else:
        for s in sides.values():
            s.sunny = True
    return extra


# --------------------------------------------------------------------------- #
# buildings and planes parallel to the street
# --------------------------------------------------------------------------- #


def _facade(p: _Painter, rng, side: _Side, z0: float, z1: float, height: float, colour) -> None:
    g = side.sign
    x = g * side.facade
    shade = 1.0 if side.sunny else 0.74
    zm = max(p.z_near, 0.5 * (z0 + z1))
    p.fill([p.xplane(x, 0.0, height, z0, z1)], p.tone(colour, zm, shade), BUILDING)
    gf = rng.uniform(3.4, 4.8)
    floor_h = rng.uniform(2.9, 3.5)
    ww = rng.uniform(1.0, 1.7)
    wh = rng.uniform(1.3, 1.9)
    pitch = rng.uniform(max(ww + 0.7, 2.3), 3.8)
    # cornice and floor bands
    accent = tuple(c * rng.uniform(0.75, 1.15) for c in colour)
    bands = [p.xplane(x, height - 0.5, height, z0, z1)]
    if rng.random() < 0.5:
        ys = np.arange(gf, height - 1.0, floor_h)
        bands += p.xplane_quads(x, ys - 0.15, ys, np.full(ys.shape, z0), np.full(ys.shape, z1), 0.0)
    p.fill(bands, p.tone(accent, zm, shade), BUILDING)
    # ground floor: shop front or plinth
    if rng.random() < 0.5:
        segs = np.arange(z0 + 0.4, z1 - 1.0, rng.uniform(2.5, 4.5))
        glass_z0, glass_z1, door_z0, door_z1 = [], [], [], []
        for zz in segs:
            if rng.random() < 0.25:
                door_z0.append(zz + 0.3)
                door_z1.append(zz + 1.3)
            else:
                glass_z0.append(zz + 0.3)
                glass_z1.append(zz + min(3.0, z1 - zz - 0.4))
        n = len(glass_z0)
        p.fill(p.xplane_quads(x, np.full(n, 0.4), np.full(n, gf - 1.0), glass_z0, glass_z1),
               p.tone(_GLASS_DARK, zm), BUILDING)
        n = len(door_z0)
        p.fill(p.xplane_quads(x, np.zeros(n), np.full(n, 2.3), door_z0, door_z1),
               p.tone((92, 66, 46), zm, shade), BUILDING)
        sign_col = _pick(rng, ((170, 40, 40), (40, 80, 160), (230, 200, 60), (40, 120, 70), (230, 230, 225)))
        sz0 = z0 + rng.uniform(0.5, 3.0)
        p.fill([p.xplane(x, gf - 0.85, gf - 0.3, sz0, min(z1 - 0.3, sz0 + rng.uniform(3.0, 8.0)))],
               p.tone(sign_col, zm), BUILDING)
    else:
        p.fill([p.xplane(x, 0.0, 0.7, z0, z1)], p.tone(colour, zm, shade * 0.8), BUILDING)
        gf = 0.7 + rng.uniform(0.0, 1.0)
    # window grid
    ys = np.arange(gf + 0.8, height - wh - 0.7, floor_h)
    zs = np.arange(z0 + 0.6 + rng.uniform(0, 0.8), z1 - ww - 0.3, pitch)
    if ys.size and zs.size:
        Y, Z = np.meshgrid(ys, zs, indexing="ij")
        Y, Z = Y.ravel(), Z.ravel()
        light = rng.random(Y.size) < rng.uniform(0.1, 0.5)
        for sel, col in ((~light, _GLASS_DARK), (light, _GLASS_LIGHT)):
            p.fill(p.xplane_quads(x, Y[sel], Y[sel] + wh, Z[sel], Z[sel] + ww), p.tone(col, zm), BUILDING)


def _end_face(p: _Painter, rng, side: _Side, z: float, height: float, colour) -> None:
    """Front-parallel wall of a building whose near end is visible."""
    g = side.sign
    depth = rng.uniform(10.0, 20.0)
    xa, xb = sorted((g * side.facade, g * (side.facade + depth)))
    p.fill([p.zplane(xa, xb, 0.0, height, z)], p.tone(colour, z, 0.86), BUILDING)
    if rng.random() < 0.6:
        ys = np.arange(3.5, height - 2.0, 3.2)
        xs = np.arange(xa + 1.0, xb - 1.5, 2.8)
        if ys.size and xs.size:
            Y, X = np.meshgrid(ys, xs, indexing="ij")
            Y, X = Y.ravel(), X.ravel()
            p.fill(p.zplane_quads(X, X + 1.2, Y, Y + 1.5, z), p.tone(_GLASS_DARK, z), BUILDING)


def _wall(p: _Painter, rng, side: _Side, z0: float, z1: float) -> None:
    g = side.sign
    x = g * (side.facade - 0.15)
    hgt = rng.uniform(0.9, 2.5)
    col = _jitter(rng, _pick(rng, ((170, 165, 155), (150, 90, 70), (130, 128, 122), (190, 182, 165))), 8)
    zm = max(p.z_near, 0.5 * (z0 + z1))
    p.fill([p.xplane(x, 0.0, hgt, z0, z1)], p.tone(col, zm, 0.85), WALL)
    if hgt < p.hc:
        p.fill([p.poly([(x, hgt, z0), (x + g * 0.3, hgt, z0), (x + g * 0.3, hgt, z1), (x, hgt, z1)])],
               p.tone(col, zm, 1.1), WALL)
    p.fill([p.zplane(min(x, x + g * 0.3), max(x, x + g * 0.3), 0.0, hgt, z0)], p.tone(col, z0), WALL)


def _fence(p: _Painter, rng, side: _Side, z0: float, z1: float) -> None:
    g = side.sign
    x = g * (side.facade - 0.2)
    hgt = rng.uniform(1.0, 2.0)
    col = _pick(rng, ((60, 64, 60), (120, 122, 118), (40, 70, 50), (150, 120, 90)))
    zm = max(p.z_near, 0.5 * (z0 + z1))
    c = p.tone(col, zm)
    if rng.random() < 0.5:
        # wire mesh: the whole panel is fence, see-through
        p.blend([p.xplane(x, 0.05, hgt, z0, z1)], c, 0.45, FENCE)
    else:
        zs = np.arange(z0, z1, rng.uniform(0.12, 0.2))
        p.fill(p.xplane_quads(x, np.zeros(zs.size), np.full(zs.size, hgt), zs, zs + 0.035, 0.0), c, FENCE)
    zs = np.arange(z0, z1, 2.5)
    p.fill(p.xplane_quads(x, np.zeros(zs.size), np.full(zs.size, hgt + 0.05), zs, zs + 0.08, 0.0), c, FENCE)
    p.fill([p.xplane(x, hgt - 0.06, hgt, z0, z1)], c, FENCE)
    p.fill([p.xplane(x, 0.25, 0.3, z0, z1)], c, FENCE)


def _hedge(p: _Painter, rng, x_abs: float, sign: int, z0: float, z1: float) -> None:
    x = sign * x_abs
    hgt = rng.uniform(0.8, 1.6)
    col = _pick(rng, _GREENS)
    zm = max(p.z_near, 0.5 * (z0 + z1))
    p.fill([p.xplane(x, 0.0, hgt, z0, z1)], p.tone(col, zm, 0.8), VEGETATION)
    if hgt < p.hc:
        p.fill([p.poly([(x, hgt, z0), (x + sign * 0.8, hgt, z0), (x + sign * 0.8, hgt, z1), (x, hgt, z1)])],
               p.tone(col, zm, 1.15), VEGETATION)
    p.fill([p.zplane(min(x, x + sign * 0.8), max(x, x + sign * 0.8), 0.0, hgt, z0)], p.tone(col, z0, 0.9),
           VEGETATION)


# --------------------------------------------------------------------------- #
# upright objects
# --------------------------------------------------------------------------- #


def _wheel_poly(p: _Painter, x: float, zc: float, r: float, yc: float | None = None) -> np.ndarray:
    yc = r if yc is None else yc
    a = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    return p.poly([(x, yc + r * math.sin(t), zc + r * math.cos(t)) for t in a])


def _shadow(p: _Painter, x0, x1, z0, z1, strength: float = 0.5) -> None:
    z0 = max(z0, p.z_near)
    if z1 <= z0:
        return
    poly = p.ground(x0, x1, z0, z1)
    xs, ys = poly[:, 0] >> _SHIFT, poly[:, 1] >> _SHIFT
    bx0, by0 = max(0, int(xs.min())), max(0, int(ys.min()))
    bx1, by1 = min(p.w, int(xs.max()) + 2), min(p.h, int(ys.max()) + 2)
    if bx1 <= bx0 or by1 <= by0:
        return
    mask = np.zeros((by1 - by0, bx1 - bx0), np.uint8)
    off = np.array([bx0 * _ONE, by0 * _ONE], np.int32)
    cv2.fillPoly(mask, [poly - off], 1, cv2.LINE_8, _SHIFT)
    m = mask.astype(bool)
    region = p.img[by0:by1, bx0:bx1]
    region[m] = (region[m] * (1.0 - strength)).astype(np.uint8)


def _lights(p: _Painter, x0, x1, z, y0, y1, facing: int, label: int, inset: float = 0.08, w: float = 0.28):
    col = _HEADLIGHT if facing < 0 else _TAIL_LIGHT
    p.fill(p.zplane_quads([x0 + inset, x1 - inset - w], [x0 + inset + w, x1 - inset], [y0, y0], [y1, y1], z, 0.0),
           col, label)


def _car(p: _Painter, rng, x: float, z: float, facing: int) -> None:
    wdt, lng = rng.uniform(1.68, 1.86), rng.uniform(3.9, 4.7)
    yb0, yb1, yr = 0.3, rng.uniform(0.95, 1.1), rng.uniform(1.38, 1.55)
    x0, x1, z0, z1 = x - wdt / 2, x + wdt / 2, z, z + lng
    body = _jitter(rng, _pick(rng, _CAR_COLOURS), 6)
    body = tuple(min(c, 195.0) for c in body)
    if facing > 0:
        cz0 = z0 + rng.uniform(0.7, 1.0)
    else:
        cz0 = z0 + rng.uniform(1.2, 1.6)
    cz1 = min(z1 - 0.6, cz0 + rng.uniform(1.9, 2.5))
    _shadow(p, x0 - 0.12, x1 + 0.12, z0 - 0.15, z1 + 0.1)
    tyre = p.tone((22, 22, 24), z0)
    p.fill(p.zplane_quads([x0 + 0.05, x1 - 0.3], [x0 + 0.3, x1 - 0.05], [0, 0], [0.4, 0.4], z0 + 0.7, 0.0),
           tyre, CAR)
    side = p.box(x0, x1, yb0, yb1, z0, z1, body, CAR)
    p.box(x0 + 0.1, x1 - 0.1, yb1, yr, cz0, cz1, body, CAR)
    glass = p.tone((42, 50, 60), z0)
    p.fill([p.zplane(x0 + 0.2, x1 - 0.2, yb1 + 0.05, yr - 0.07, cz0)], glass, CAR)
    if side is not None:
        xs = x0 + 0.1 if side == "left" else x1 - 0.1
        zmid = 0.5 * (cz0 + cz1)
        p.fill([p.xplane(xs, yb1 + 0.05, yr - 0.07, cz0 + 0.12, zmid - 0.05),
                p.xplane(xs, yb1 + 0.05, yr - 0.07, zmid + 0.05, cz1 - 0.12)], p.tone((48, 56, 66), z0), CAR)
        xw = x0 if side == "left" else x1
        p.fill([_wheel_poly(p, xw, z0 + 0.8, 0.33), _wheel_poly(p, xw, z1 - 0.8, 0.33)], tyre, CAR)
    p.fill([p.zplane(x0, x1, yb0, yb0 + 0.14, z0)], p.tone(tuple(c * 0.55 for c in body), z0), CAR)
    _lights(p, x0, x1, z0, 0.72, 0.88, facing, CAR)
    if facing < 0:
        p.fill([p.zplane(x - 0.35, x + 0.35, 0.5, 0.68, z0)], p.tone((30, 30, 32), z0), CAR)
    p.fill([p.zplane(x - 0.26, x + 0.26, 0.46, 0.58, z0)], p.tone((212, 212, 204), z0), CAR)


def _bus(p: _Painter, rng, x: float, z: float, facing: int) -> None:
    wdt, lng = 2.55, rng.uniform(10.5, 12.5)
    y0, y1 = 0.32, rng.uniform(2.9, 3.2)
    x0, x1, z0, z1 = x - wdt / 2, x + wdt / 2, z, z + lng
    body = _pick(rng, ((196, 170, 40), (172, 40, 36), (190, 192, 188), (40, 100, 160), (60, 130, 80)))
    _shadow(p, x0 - 0.15, x1 + 0.15, z0 - 0.2, z1 + 0.1)
    tyre = p.tone((22, 22, 24), z0)
    p.fill(p.zplane_quads([x0 + 0.1, x1 - 0.4], [x0 + 0.4, x1 - 0.1], [0, 0], [0.5, 0.5], z0 + 2.0, 0.0),
           tyre, BUS)
    side = p.box(x0, x1, y0, y1, z0, z1, body, BUS)
    glass = p.tone((40, 48, 58), z0)
    wy0 = 0.95 if facing < 0 else 1.5
    p.fill([p.zplane(x0 + 0.12, x1 - 0.12, wy0, y1 - 0.35, z0)], glass, BUS)
    if side is not None:
        xs = x0 if side == "left" else x1
        zs = np.arange(z0 + 0.5, z1 - 1.0, 1.45)
        p.fill(p.xplane_quads(xs, np.full(zs.size, 1.25), np.full(zs.size, y1 - 0.5), zs, zs + 1.3), glass, BUS)
        p.fill([_wheel_poly(p, xs, z0 + 2.2, 0.5), _wheel_poly(p, xs, z1 - 2.6, 0.5)], tyre, BUS)
    if facing < 0:
        p.fill([p.zplane(x0 + 0.3, x1 - 0.3, y1 - 0.32, y1 - 0.08, z0)], p.tone((20, 20, 20), z0), BUS)
    _lights(p, x0, x1, z0, 0.55, 0.78, facing, BUS, 0.1, 0.3)


def _truck(p: _Painter, rng, x: float, z: float, facing: int) -> None:
    wdt = 2.45
    x0, x1 = x - wdt / 2, x + wdt / 2
    lc = rng.uniform(5.5, 8.0)
    hb = rng.uniform(3.2, 3.8)
    cab = _pick(rng, ((190, 190, 188), (172, 40, 36), (40, 62, 140), (196, 168, 44), (60, 64, 70)))
    box_col = _pick(rng, ((190, 190, 186), (150, 150, 146), (120, 130, 140), (180, 170, 150)))
    total = lc + 2.6
    _shadow(p, x0 - 0.15, x1 + 0.15, z - 0.2, z + total + 0.1)
    tyre = p.tone((22, 22, 24), z)
    p.fill(p.zplane_quads([x0 + 0.1, x1 - 0.45], [x0 + 0.45, x1 - 0.1], [0, 0], [0.55, 0.55], z + 0.9, 0.0),
           tyre, TRUCK)
    if facing > 0:
        parts = [("cab", z + lc + 0.3, z + total), ("box", z, z + lc)]
    else:
        parts = [("box", z + 2.6, z + total), ("cab", z, z + 2.3)]
    side = None
    for kind, a, b in parts:
        if kind == "cab":
            side = p.box(x0 + 0.05, x1 - 0.05, 0.5, 2.9, a, b, cab, TRUCK) or side
            if facing < 0:
                p.fill([p.zplane(x0 + 0.2, x1 - 0.2, 1.7, 2.6, a)], p.tone((40, 48, 58), a), TRUCK)
                p.fill([p.zplane(x0 + 0.5, x1 - 0.5, 0.7, 1.3, a)], p.tone((35, 35, 38), a), TRUCK)
        else:
            side = p.box(x0, x1, 0.6, hb, a, b, box_col, TRUCK) or side
    if side is not None:
        xs = x0 if side == "left" else x1
        p.fill([_wheel_poly(p, xs, z + 1.2, 0.5), _wheel_poly(p, xs, z + total - 1.2, 0.5)], tyre, TRUCK)
    _lights(p, x0, x1, z, 0.62 if facing > 0 else 0.9, 0.8 if facing > 0 else 1.1, facing, TRUCK, 0.1, 0.25)


def _person(p: _Painter, rng, x: float, z: float, label: int = PERSON) -> None:
    ox, oy, q = p.anchor(x, z)
    h = rng.uniform(1.55, 1.9)
    if h * q < 3.0:
        return
    skin = p.tone(_pick(rng, _SKIN), z)
    shirt = _pick(rng, _CLOTHES)
    pants = _pick(rng, _CLOTHES[:3] + _CLOTHES[6:7] + _CLOTHES[9:10])
    c_shirt, c_arm = p.tone(shirt, z), p.tone(shirt, z, 0.85)
    c_pants = p.tone(pants, z)
    coat = rng.random() < 0.3
    spread = rng.uniform(0.0, 0.06) * h
    L = p.local
    # legs and shoes
    legs = [L(ox, oy, q, [(-0.085 * h, 0.52 * h), (-0.008 * h, 0.52 * h), (-0.02 * h - spread, 0.03 * h),
                          (-0.078 * h - spread, 0.03 * h)]),
            L(ox, oy, q, [(0.008 * h, 0.52 * h), (0.085 * h, 0.52 * h), (0.078 * h + spread, 0.03 * h),
                          (0.02 * h + spread, 0.03 * h)])]
    p.fill(legs, c_pants, label)
    shoe = p.tone((30, 28, 26), z)
    p.fill([L(ox, oy, q, [(-0.09 * h - spread, 0.04 * h), (-0.015 * h - spread, 0.04 * h),
                          (-0.015 * h - spread, 0.0), (-0.09 * h - spread, 0.0)]),
            L(ox, oy, q, [(0.015 * h + spread, 0.04 * h), (0.09 * h + spread, 0.04 * h),
                          (0.09 * h + spread, 0.0), (0.015 * h + spread, 0.0)])], shoe, label)
    # arms behind the torso
    swing = rng.uniform(-0.03, 0.03) * h
    p.fill([L(ox, oy, q, [(-0.125 * h, 0.81 * h), (-0.16 * h, 0.79 * h), (-0.165 * h + swing, 0.5 * h),
                          (-0.13 * h + swing, 0.5 * h)]),
            L(ox, oy, q, [(0.125 * h, 0.81 * h), (0.16 * h, 0.79 * h), (0.165 * h - swing, 0.5 * h),
                          (0.13 * h - swing, 0.5 * h)])], c_arm, label)
    p.circle(ox + (-0.148 * h + swing) * q, oy - 0.48 * h * q, 0.024 * h * q, skin, label)
    p.circle(ox + (0.148 * h - swing) * q, oy - 0.48 * h * q, 0.024 * h * q, skin, label)
    bottom = 0.34 if coat else 0.5
    p.fill([L(ox, oy, q, [(-0.125 * h, 0.82 * h), (0.125 * h, 0.82 * h), (0.1 * h, bottom * h),
                          (-0.1 * h, bottom * h)])], c_shirt, label)
    # neck, head, hair
    p.fill([L(ox, oy, q, [(-0.025 * h, 0.86 * h), (0.025 * h, 0.86 * h), (0.025 * h, 0.81 * h),
                          (-0.025 * h, 0.81 * h)])], skin, label)
    hx, hy, hr = ox, oy - 0.925 * h * q, 0.068 * h * q
    p.circle(hx, hy, hr, skin, label)
    p.ellipse(hx, hy - 0.1 * hr, hr * 1.05, hr * 1.0, p.tone(_pick(rng, _HAIR), z), label, 0.0, 180.0, 360.0)
    if rng.random() < 0.2:  # bag
        bag = p.tone(_pick(rng, _CLOTHES), z)
        p.fill([L(ox, oy, q, [(0.13 * h, 0.62 * h), (0.22 * h, 0.62 * h), (0.22 * h, 0.45 * h),
                              (0.13 * h, 0.45 * h)])], bag, label)


def _bicycle(p: _Painter, rng, x: float, z: float, d: int, rider: bool) -> None:
    ox, oy, q = p.anchor(x, z)
    if q * 1.0 < 4.0:
        return
    frame = p.tone(_pick(rng, ((30, 30, 34), (160, 30, 30), (40, 70, 140), (200, 200, 196), (40, 110, 60))), z)
    tyre = p.tone((25, 25, 25), z)
    r = 0.34
    t_wheel = max(1.0, 0.06 * q)
    t_frame = max(1.0, 0.04 * q)

    def P(u, v):
        return ox + d * u * q, oy - v * q

    rear, front = P(-0.52, r), P(0.52, r)
    p.circle(*rear, r * q, tyre, BICYCLE, int(round(t_wheel)) or 1)
    p.circle(*front, r * q, tyre, BICYCLE, int(round(t_wheel)) or 1)
    bb, seat, head = P(0.0, 0.3), P(-0.16, 0.86), P(0.4, 0.88)
    for a, b in ((rear, bb), (bb, seat), (seat, rear), (bb, head), (seat, head), (head, front)):
        p.line(a, b, frame, BICYCLE, t_frame)
    p.line(P(0.36, 0.96), P(0.48, 0.98), tyre, BICYCLE, t_frame)
    p.line(P(-0.24, 0.9), P(-0.08, 0.9), tyre, BICYCLE, t_frame * 1.5)
    if rider:
        _rider(p, rng, ox, oy, q, d, z, hip=(-0.18, 0.95), hand=(0.44, 0.98), foot=(0.08, 0.2))


def _motorcycle(p: _Painter, rng, x: float, z: float, d: int, rider: bool) -> None:
    ox, oy, q = p.anchor(x, z)
    if q < 4.0:
        return
    body = p.tone(_pick(rng, ((30, 30, 34), (170, 30, 30), (40, 62, 140), (196, 168, 44), (150, 150, 152))), z)
    dark = p.tone((22, 22, 24), z)
    r = 0.31

    def P(u, v):
        return ox + d * u * q, oy - v * q

    for c in (P(-0.7, r), P(0.7, r)):
        p.circle(*c, r * q, dark, MOTORCYCLE)
        p.circle(*c, 0.12 * q, p.tone((150, 150, 150), z), MOTORCYCLE)
    p.line(P(0.7, r), P(0.5, 1.0), p.tone((120, 120, 120), z), MOTORCYCLE, 0.07 * q)
    L = p.local
    p.fill([L(ox, oy, q, [(d * -0.6, 0.62), (d * -0.05, 0.78), (d * 0.45, 0.86), (d * 0.58, 0.6),
                          (d * 0.15, 0.32), (d * -0.35, 0.38)])], body, MOTORCYCLE)
    p.fill([L(ox, oy, q, [(d * -0.75, 0.78), (d * -0.05, 0.84), (d * -0.05, 0.76), (d * -0.7, 0.7)])],
           dark, MOTORCYCLE)
    p.line(P(0.42, 1.05), P(0.6, 1.0), dark, MOTORCYCLE, 0.05 * q)
    if rider:
        _rider(p, rng, ox, oy, q, d, z, hip=(-0.35, 0.95), hand=(0.48, 1.05), foot=(0.05, 0.45))


def _rider(p: _Painter, rng, ox, oy, q, d, z, hip, hand, foot) -> None:
    """Side-view rider seated at `hip` (local metres), labelled RIDER."""
    def P(u, v):
        return ox + d * u * q, oy - v * q

    skin = p.tone(_pick(rng, _SKIN), z)
    shirt = p.tone(_pick(rng, _CLOTHES), z)
    pants = p.tone(_pick(rng, _CLOTHES[:3] + _CLOTHES[6:7]), z)
    hu, hv = hip
    sh = (hu + 0.28, hv + 0.55)
    knee = (foot[0] + 0.12, (hv + foot[1]) / 2 + 0.12)
    p.line(P(*hip), P(*knee), pants, RIDER, 0.13 * q)
    p.line(P(*knee), P(*foot), pants, RIDER, 0.11 * q)
    p.line(P(*hip), P(*sh), shirt, RIDER, 0.26 * q)
    p.line(P(*sh), P(*hand), shirt, RIDER, 0.08 * q)
    hx, hy = P(sh[0] + 0.08, sh[1] + 0.2)
    p.circle(hx, hy, 0.11 * q, skin, RIDER)
    if rng.random() < 0.6:  # helmet
        p.ellipse(hx, hy - 0.02 * q, 0.125 * q, 0.11 * q, p.tone(_pick(rng, _CLOTHES), z), RIDER, 0.0, 180.0, 360.0)


def _tree(p: _Painter, rng, x: float, z: float) -> None:
    ox, oy, q = p.anchor(x, z)
    trunk_h = rng.uniform(1.8, 3.4)
    crown = rng.uniform(1.3, 2.9)
    if (trunk_h + 2 * crown) * q < 3.0:
        return
    tw = rng.uniform(0.16, 0.32)
    bark = p.tone(_pick(rng, ((92, 74, 58), (80, 70, 62), (110, 96, 80))), z)
    trunk = [(-tw, 0.0), (tw, 0.0), (tw * 0.6, trunk_h + crown * 0.6), (-tw * 0.6, trunk_h + crown * 0.6)]
    p.fill([p.local(ox, oy, q, trunk)],
           bark, VEGETATION)
    base = np.array(_pick(rng, _GREENS), np.float64)
    cu, cv = 0.0, trunk_h + crown * 0.85
    n = int(rng.integers(6, 11))
    for i in range(n):
        k = i / max(1, n - 1)  # later blobs are higher and lighter
        u = cu + rng.normal(0, 0.45) * crown
        v = cv + (k - 0.5) * crown * 0.9 + rng.normal(0, 0.15) * crown
        r = crown * rng.uniform(0.42, 0.7)
        col = p.tone(base * (0.72 + 0.5 * k) + rng.uniform(-6, 6), z)
        p.ellipse(ox + u * q, oy - v * q, r * q * rng.uniform(0.9, 1.2), r * q, col, VEGETATION,
                  float(rng.uniform(0, 180)))


def _street_lamp(p: _Painter, rng, x: float, z: float, toward: int) -> None:
    ox, oy, q = p.anchor(x, z)
    hp = rng.uniform(6.5, 9.0)
    if hp * q < 3.0:
        return
    col = p.tone(_pick(rng, ((110, 112, 116), (70, 74, 72), (140, 140, 138), (60, 70, 64))), z)
    arm = rng.uniform(1.0, 2.0)
    L = p.local
    p.fill([L(ox, oy, q, [(-0.11, 0.0), (0.11, 0.0), (0.06, hp), (-0.06, hp)])], col, POLE)
    t = toward
    p.fill([L(ox, oy, q, [(0.0, hp - 0.12), (t * arm, hp + 0.22), (t * arm, hp + 0.3), (0.0, hp)])], col, POLE)
    hx, hy = ox + t * arm * q, oy - (hp + 0.22) * q
    p.ellipse(hx, hy, 0.38 * q, 0.12 * q, p.tone((58, 60, 62), z), POLE)
    p.ellipse(hx, hy + 0.04 * q, 0.3 * q, 0.12 * q, _LAMP_LENS, POLE, 0.0, 0.0, 180.0)


def _sign(p: _Painter, rng, x: float, z: float) -> None:
    ox, oy, q = p.anchor(x, z)
    hs = rng.uniform(2.2, 3.0)
    if hs * q < 3.0:
        return
    grey = p.tone((150, 150, 152), z)
    p.fill([p.local(ox, oy, q, [(-0.035, 0.0), (0.035, 0.0), (0.035, hs), (-0.035, hs)])], grey, POLE)
    kind = int(rng.integers(5))
    white, red, blue, yellow = (p.tone(c, z) for c in ((235, 235, 232), (196, 32, 36), (30, 80, 170), (236, 196, 30)))
    cx, cy = ox, oy - (hs + 0.32) * q
    if kind == 0:  # prohibition / speed limit
        p.circle(cx, cy, 0.32 * q, red, TRAFFIC_SIGN)
        p.circle(cx, cy, 0.24 * q, white, TRAFFIC_SIGN)
        if q > 25:
            p.fill([p.local(cx, cy, q, [(-0.1, 0.06), (0.1, 0.06), (0.1, -0.06), (-0.1, -0.06)])],
                   p.tone((30, 30, 30), z), TRAFFIC_SIGN)
    elif kind == 1:  # mandatory direction
        p.circle(cx, cy, 0.32 * q, blue, TRAFFIC_SIGN)
        p.fill([p.local(cx, cy, q, [(-0.05, -0.2), (0.05, -0.2), (0.05, 0.05), (0.14, 0.05), (0.0, 0.2),
                                    (-0.14, 0.05), (-0.05, 0.05)])], white, TRAFFIC_SIGN)
    elif kind == 2:  # warning triangle
        p.fill([p.local(cx, cy, q, [(-0.4, -0.3), (0.4, -0.3), (0.0, 0.39)])], red, TRAFFIC_SIGN)
        p.fill([p.local(cx, cy, q, [(-0.27, -0.22), (0.27, -0.22), (0.0, 0.24)])], white, TRAFFIC_SIGN)
    elif kind == 3:  # information / parking
        p.fill([p.local(cx, cy, q, [(-0.3, -0.3), (0.3, -0.3), (0.3, 0.3), (-0.3, 0.3)])], blue, TRAFFIC_SIGN)
        p.fill([p.local(cx, cy, q, [(-0.1, -0.2), (-0.02, -0.2), (-0.02, 0.2), (-0.1, 0.2)]),
                p.local(cx, cy, q, [(-0.02, 0.0), (0.12, 0.0), (0.12, 0.2), (-0.02, 0.2)])], white, TRAFFIC_SIGN)
    else:  # priority diamond
        p.fill([p.local(cx, cy, q, [(0.0, -0.33), (0.33, 0.0), (0.0, 0.33), (-0.33, 0.0)])], white, TRAFFIC_SIGN)
        p.fill([p.local(cx, cy, q, [(0.0, -0.24), (0.24, 0.0), (0.0, 0.24), (-0.24, 0.0)])], yellow, TRAFFIC_SIGN)


def _traffic_light(p: _Painter, rng, x: float, z: float, toward: int) -> None:
    ox, oy, q = p.anchor(x, z)
    overhead = rng.random() < 0.4
    hp = rng.uniform(5.2, 6.0) if overhead else rng.uniform(2.6, 3.2)
    if hp * q < 3.0:
        return
    col = p.tone(_pick(rng, ((70, 72, 70), (110, 110, 112), (150, 150, 150))), z)
    L = p.local
    p.fill([L(ox, oy, q, [(-0.07, 0.0), (0.07, 0.0), (0.07, hp), (-0.07, hp)])], col, POLE)
    hx = 0.0
    top = hp + 0.95
    if overhead:
        arm = rng.uniform(2.5, 5.0)
        p.fill([L(ox, oy, q, [(0.0, hp - 0.08), (toward * arm, hp - 0.08), (toward * arm, hp), (0.0, hp)])],
               col, POLE)
        hx, top = toward * arm, hp - 0.05
    housing = p.tone((34, 34, 36), z)
    bot = top - 0.92
    p.fill([L(ox, oy, q, [(hx - 0.17, bot), (hx + 0.17, bot), (hx + 0.17, top), (hx - 0.17, top)])],
           housing, TRAFFIC_LIGHT)
    lit = int(rng.integers(3))
    on = ((255, 45, 35), (255, 182, 20), (60, 255, 140))
    off = ((84, 36, 32), (84, 70, 28), (28, 76, 50))
    for i in range(3):
        cy = top - 0.16 - i * 0.3
        p.circle(ox + hx * q, oy - cy * q, 0.1 * q, on[i] if i == lit else off[i], TRAFFIC_LIGHT)


# --------------------------------------------------------------------------- #
# scene assembly
# --------------------------------------------------------------------------- #


def _check_size(height: int, width: int) -> None:
    if int(height) < 16 or int(width) < 16:
        raise ValueError(f"image size must be at least 16x16, got {height}x{width}")


def render_scene(seed: int, height: int = 256, width: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Clear-day scene: (rgb uint8 HxWx3, labels uint8 HxW trainIds in 0..18)."""
    _check_size(height, width)
    rng = np.random.default_rng(seed)
    p = _Painter(int(height), int(width), rng)
    _draw_sky(p, rng)
    _draw_skyline(p, rng)
    lanes, lines, sides, edges = _layout(p, rng)
    extra = _draw_ground(p, rng, lines, sides, edges)

    planes: list[tuple[float, int, object]] = []  # (|X| priority, order, draw)
    objects: list[tuple[float, int, object]] = []  # (depth, order, draw)

    def add_plane(key, fn, *args):
        planes.append((key, len(planes), lambda: fn(p, rng, *args)))

    def add_obj(z, fn, *args):
        if z > p.z_near * 0.8:
            objects.append((z, len(objects), lambda: fn(p, rng, *args)))

    # buildings, gaps, low planes along each side
    for s in sides.values():
        g = s.sign
        z = rng.uniform(1.5, 8.0)
        z_end = rng.uniform(140.0, 230.0)
        prev_h = 0.0
        while z < z_end:
            if z > 10.0 and rng.random() < 0.2:
                glen = rng.uniform(6.0, 22.0)
                if rng.random() < 0.6:
                    setback = copy.copy(s)
                    setback.facade = s.facade + rng.uniform(8.0, 20.0)
                    add_plane(setback.facade + 100.0, _facade, setback, z - 5.0, z + glen + 5.0,
                              rng.uniform(8.0, 26.0), _jitter(rng, _pick(rng, _FACADE_COLOURS)))
                kind = rng.random()
                if kind < 0.35:
                    add_plane(s.facade - 0.15, _wall, s, z, z + glen)
                elif kind < 0.7:
                    add_plane(s.facade - 0.2, _fence, s, z, z + glen)
                else:
                    add_plane(s.facade - 0.3, _hedge, s.facade - 1.1, g, z, z + glen)
                for _ in range(int(rng.integers(0, 4))):
                    add_obj(z + rng.uniform(1, glen), _tree, g * (s.facade + rng.uniform(1.5, 6.0)),
                            z + rng.uniform(1, glen))
                z += glen
                prev_h = 0.0
                continue
            length = rng.uniform(8.0, 28.0)
            height_m = rng.uniform(7.0, 27.0) if rng.random() < 0.9 else rng.uniform(28.0, 45.0)
            colour = _jitter(rng, _pick(rng, _FACADE_COLOURS))
            if height_m > prev_h + 1.0 and z > 1.0:
                add_plane(s.facade + 50.0, _end_face, s, z, height_m, colour)
            add_plane(s.facade, _facade, s, z, z + length, height_m, colour)
            z += length
            prev_h = height_m
        if s.grass > 0.6 and rng.random() < 0.5:
            za = _between(rng, p.z_near, 30.0)
            add_plane(s.facade - 0.5, _hedge, s.road + s.walk + 0.1, g, za, za + rng.uniform(5.0, 40.0))

    # street furniture
    for s in sides.values():
        g = s.sign
        xk = g * (s.road + 0.45)
        z = rng.uniform(2.0, 20.0)
        spacing = rng.uniform(18.0, 32.0)
        while z < 160.0:
            add_obj(z, _street_lamp, xk, z, -g)
            z += spacing
        if rng.random() < 0.65:
            z = rng.uniform(4.0, 14.0)
            tx = g * (s.road + s.walk - 0.6) if rng.random() < 0.5 else g * (s.road + 1.0)
            step = rng.uniform(7.0, 16.0)
            while z < 120.0:
                if rng.random() < 0.85:
                    add_obj(z, _tree, tx + rng.uniform(-0.2, 0.2), z)
                z += step
        if s.grass > 0.0:
            for _ in range(int(rng.integers(0, 4))):
                zz = _between(rng, p.z_near, 80.0)
                add_obj(zz, _tree, g * (s.road + s.walk + s.grass * 0.5), zz)
    for _ in range(int(rng.integers(1, 4))):
        g = int(_pick(rng, (-1, 1)))
        s = sides[g]
        z = _between(rng, p.z_near + 1.0, 60.0)
        add_obj(z, _sign, g * (s.road + rng.uniform(0.35, 0.7)), z)
    crossing = extra["crossing"]
    if crossing is not None or rng.random() < 0.4:
        zt = crossing - 2.0 if crossing is not None else rng.uniform(12.0, 60.0)
        for g in (-1, 1):
            if rng.random() < 0.8:
                s = sides[g]
                add_obj(max(zt, p.z_near + 0.5), _traffic_light, g * (s.road + 0.5), max(zt, p.z_near + 0.5), -g)

    # vehicles
    n_vehicles = 0
    for lx, direction, kind in lanes:
        if kind == "park":
            z = _between(rng, p.z_near, 12.0)
            while z < 110.0:
                if rng.random() < 0.65:
                    r = rng.random()
                    if r < 0.92:
                        add_obj(z, _car, lx + rng.uniform(-0.15, 0.15), z, direction)
                        z += 4.5
                    elif r < 0.96:
                        add_obj(z, _truck, lx, z, direction)
                        z += 9.0
                    else:
                        d = int(_pick(rng, (-1, 1)))
                        add_obj(z, _motorcycle, lx, z, d, False)
                        z += 2.0
                    n_vehicles += 1
                z += rng.uniform(0.8, 7.0)
        else:
            ego_lane = abs(lx) < 1.0
            z = _between(rng, 8.0 if ego_lane else p.z_near + 1.0, 30.0)
            density = rng.uniform(0.3, 0.8)
            while z < 130.0:
                if rng.random() < density:
                    r = rng.random()
                    x = lx + rng.uniform(-0.3, 0.3)
                    if r < 0.84:
                        add_obj(z, _car, x, z, direction)
                        z += 4.5
                    elif r < 0.92:
                        add_obj(z, _bus, x, z, direction)
                        z += 12.0
                    else:
                        add_obj(z, _truck, x, z, direction)
                        z += 9.0
                    n_vehicles += 1
                z += rng.uniform(5.0, 30.0)
    if n_vehicles == 0 or rng.random() < 0.3:
        lx, direction, _ = lanes[int(rng.integers(len(lanes)))]
        z = _between(rng, max(9.0, p.z_near + 2.0), 35.0)
        add_obj(z, _car, lx, z, direction)

    # people and two-wheelers
    for s in sides.values():
        g = s.sign
        for _ in range(int(rng.poisson(2.5))):
            z = _between(rng, p.z_near + 0.5, 70.0)
            add_obj(z, _person, g * (s.road + rng.uniform(0.6, s.walk - 0.3)), z)
        if rng.random() < 0.25:
            z = _between(rng, p.z_near + 1.0, 40.0)
            for k in range(int(rng.integers(1, 4))):
                add_obj(z + 0.3 * k, _bicycle, g * (s.road + s.walk - 0.5 - 0.5 * k), z + 0.3 * k,
                        int(_pick(rng, (-1, 1))), False)
    if crossing is not None:
        for _ in range(int(rng.integers(0, 4))):
            z = crossing + rng.uniform(0.5, 2.5)
            add_obj(z, _person, rng.uniform(edges[0] + 0.5, edges[1] - 0.5), z)
    if rng.random() < 0.4:
        g = int(_pick(rng, (-1, 1)))
        s = sides[g]
        z = _between(rng, p.z_near + 1.0, 45.0)
        x = g * (s.road - rng.uniform(0.6, 1.2)) if rng.random() < 0.6 else g * (s.road + s.walk * 0.5)
        add_obj(z, _bicycle, x, z, int(_pick(rng, (-1, 1))), True)
    if rng.random() < 0.15:
        g = int(_pick(rng, (-1, 1)))
        z = _between(rng, p.z_near + 2.0, 45.0)
        add_obj(z, _motorcycle, g * (sides[g].road - 1.0), z, int(_pick(rng, (-1, 1))), True)

    for _, _, draw in sorted(planes, key=lambda t: (-t[0], t[1])):
        draw()
    for _, _, draw in sorted(objects, key=lambda t: (-t[0], t[1])):
        draw()
    return _finish(p, rng), p.lab


def _finish(p: _Painter, rng: np.random.Generator) -> np.ndarray:
    """Soften edges slightly and add per-class luminance texture."""
    h, w = p.h, p.w
    img = cv2.GaussianBlur(p.img, (3, 3), 0.6).astype(np.float32)
    fine = rng.standard_normal((h, w), dtype=np.float32)
    coarse = rng.standard_normal((max(2, h // 8), max(2, w // 8)), dtype=np.float32)
    coarse = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    lum = _GRAIN_FINE[p.lab] * fine + _GRAIN_COARSE[p.lab] * coarse
    img += lum[..., None]
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


# --------------------------------------------------------------------------- #
# adverse conditions
# --------------------------------------------------------------------------- #


def _lowfreq(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    small = rng.standard_normal((max(2, h // cell), max(2, w // cell)), dtype=np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _horizon_row(labels: np.ndarray) -> float:
    h = labels.shape[0]
    rows = np.nonzero((labels == SKY).any(axis=1))[0]
    if rows.size == 0:
        return 0.45 * h
    return float(np.clip(rows.max(), 0.2 * h, 0.8 * h))


def _glow(canvas: np.ndarray, cx: float, cy: float, radius: float, colour, strength: float,
          aspect: float = 1.0) -> None:
    """Add a Gaussian light blob (float canvas HxWx3) around (cx, cy); aspect = height / width."""
    h, w = canvas.shape[:2]
    rx = max(radius, 0.5)
    ry = max(radius * aspect, 0.5)
    ex, ey = int(math.ceil(3.0 * rx)), int(math.ceil(3.0 * ry))
    x0, x1 = max(0, int(cx) - ex), min(w, int(cx) + ex + 1)
    y0, y1 = max(0, int(cy) - ey), min(h, int(cy) + ey + 1)
    if x0 >= x1 or y0 >= y1:
        return
    ys = (np.arange(y0, y1, dtype=np.float32) - cy) / ry
    xs = (np.arange(x0, x1, dtype=np.float32) - cx) / rx
    g = np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2)) * strength
    canvas[y0:y1, x0:x1] += g[..., None] * np.asarray(colour, np.float32)


def _night(rgb: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = labels.shape
    s = h / 256.0
    img = rgb.astype(np.float32) / 255.0
    lin = img ** 2.2
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    lo = rgb.min(axis=2)
    vehicle = np.isin(labels, _VEHICLES)
    glass = (labels == BUILDING) & (b - r >= 22)
    headlights = vehicle & (lo > 226)
    tails = vehicle & (r > 200) & (g < 100) & (b < 100)
    lamps = (labels == POLE) & (lo > 205)
    tl_lamps = (labels == TRAFFIC_LIGHT) & (rgb.max(axis=2) > 200)

    light = np.empty((h, w, 3), np.float32)
    light[:] = np.array([0.012, 0.017, 0.036], np.float32) * rng.uniform(0.7, 1.1)
    pools = np.zeros((h, w, 3), np.float32)
    emit = np.zeros((h, w, 3), np.float32)
    glare = np.zeros((h, w, 3), np.float32)

    # lit windows: a random subset of glass blobs
    n, cc = cv2.connectedComponents(glass.astype(np.uint8), connectivity=4)
    if n > 1:
        on = rng.random(n) < rng.uniform(0.25, 0.5)
        on[0] = False
        warm = np.stack([np.ones(n), rng.uniform(0.7, 0.88, n), rng.uniform(0.35, 0.6, n)], 1)
        warm *= rng.uniform(0.35, 0.8, n)[:, None]
        lit = on[cc]
        emit[lit] = warm[cc[lit]].astype(np.float32)

    # street lamps: light pools on the ground below, glare around the lens
    lamp_col = np.array([1.0, 0.84, 0.6], np.float32) if rng.random() < 0.4 else np.array([0.9, 0.95, 1.0], np.float32)
    n, cc, pstats, _ = cv2.connectedComponentsWithStats((labels == POLE).astype(np.uint8), connectivity=8)
    nl, lcc, lstats, lcent = cv2.connectedComponentsWithStats(lamps.astype(np.uint8), connectivity=8)
    for i in range(1, nl):
        cx, cy = lcent[i]
        area = lstats[i, cv2.CC_STAT_AREA]
        pole_id = cc[min(h - 1, int(round(cy))), min(w - 1, int(round(cx)))]
        if pole_id:
            ground_y = float(pstats[pole_id, cv2.CC_STAT_TOP] + pstats[pole_id, cv2.CC_STAT_HEIGHT] - 1)
        else:
            ground_y = cy + 8.0 * math.sqrt(area)
        height_px = max(2.0, ground_y - cy)
        k = min(1.0, math.sqrt(area) / (3.0 * s))  # distant lamps glare less
        _glow(pools, cx, ground_y, height_px * 0.5, lamp_col, 0.7 * k, 0.3)
        _glow(pools, cx, ground_y - height_px * 0.3, height_px * 0.25, lamp_col, 0.15 * k)
        _glow(glare, cx, cy, s + 1.2 * math.sqrt(area), lamp_col, 1.2 * k)
        _glow(glare, cx, cy, 2.0 * s + 3.0 * math.sqrt(area), lamp_col, 0.25 * k)
    emit[lamps] = lamp_col * 1.2

    # vehicle lamps: headlight beams on the road, glare, red tail glow
    nh, _, hstats, hcent = cv2.connectedComponentsWithStats(headlights.astype(np.uint8), connectivity=8)
    head_col = np.array([1.0, 0.97, 0.88], np.float32)
    for i in range(1, nh):
        cx, cy = hcent[i]
        a = math.sqrt(hstats[i, cv2.CC_STAT_AREA])
        _glow(glare, cx, cy, s + 0.7 * a, head_col, 0.9)
        _glow(glare, cx, cy, 2.0 * s + 2.2 * a, head_col, 0.18)
        _glow(pools, cx, cy + 5.0 * a, 7.0 * a, head_col, 0.4, 0.35)
        yy = int(round(cy))
        streak = max(1, int(round(0.5 * a)))
        half = int(12 * a + 6 * s)
        glare[max(0, yy - streak // 2): yy + streak // 2 + 1, max(0, int(cx) - half): int(cx) + half] += head_col * 0.12
    emit[headlights] = head_col * 1.2
    nt, _, tstats, tcent = cv2.connectedComponentsWithStats(tails.astype(np.uint8), connectivity=8)
    for i in range(1, nt):
        cx, cy = tcent[i]
        a = math.sqrt(tstats[i, cv2.CC_STAT_AREA])
        _glow(glare, cx, cy, s + 1.2 * a, (1.0, 0.12, 0.08), 0.4)
    emit[tails] = np.array([1.0, 0.15, 0.1], np.float32)
    emit[tl_lamps] = img[tl_lamps] * 1.1
    nt, _, tstats, tcent = cv2.connectedComponentsWithStats(tl_lamps.astype(np.uint8), connectivity=8)
    for i in range(1, nt):
        cx, cy = tcent[i]
        a = math.sqrt(tstats[i, cv2.CC_STAT_AREA])
        _glow(glare, cx, cy, s + 2.0 * a, img[int(round(cy)), int(round(cx))], 0.5)

    # pools of light mostly reach the ground; upright surfaces get a fraction
    flat = np.isin(labels, (ROAD, SIDEWALK, TERRAIN))
    light += pools * np.where(flat, 1.0, 0.3).astype(np.float32)[..., None]
    out = lin * light
    # dark night sky, slightly brighter towards the horizon (city glow)
    sky = labels == SKY
    yh = _horizon_row(labels)
    t = np.clip(np.arange(h, dtype=np.float32) / max(yh, 1.0), 0.0, 1.0)[:, None]
    sky_col = np.array([0.001, 0.0015, 0.005], np.float32) * (1 - t) + np.array([0.008, 0.008, 0.013], np.float32) * t
    out[sky] = np.broadcast_to(sky_col[:, None, :], (h, w, 3))[sky]
    has_emit = emit.max(axis=2) > 0
    out[has_emit] = emit[has_emit]
    # bloom around everything bright
    bright = np.clip(out - 0.3, 0.0, 3.0)
    small = cv2.resize(bright, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA)
    bloom = cv2.GaussianBlur(small, (0, 0), max(0.5, 2.0 * s))
    out += 0.6 * cv2.resize(bloom, (w, h), interpolation=cv2.INTER_LINEAR)
    out += glare
    # back to display gamma, bluish grade
    out = np.clip(out, 0.0, 1.0) ** (1 / 2.2)
    out *= np.array([0.8, 0.92, 1.12], np.float32)
    out = cv2.GaussianBlur(out, (0, 0), 0.7 * max(s, 0.5))
    # sensor noise: signal-dependent shot noise + read noise (partly chromatic)
    shot = rng.standard_normal((h, w, 1), dtype=np.float32) * np.sqrt(np.maximum(out, 0.0)) * 0.035
    read = (rng.standard_normal((h, w, 3), dtype=np.float32) * 0.012
            + rng.standard_normal((h, w, 1), dtype=np.float32) * 0.012)
    out = out + shot + read
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _vertical_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For mask pixels: distance from the top of their vertical run, and the run length."""
    h = mask.shape[0]
    idx = np.arange(h, dtype=np.int32)[:, None]
    last_off = np.maximum.accumulate(np.where(mask, -1, idx), axis=0)
    depth = idx - last_off - 1
    nxt = np.where(mask, h, idx)[::-1]
    next_off = np.minimum.accumulate(nxt, axis=0)[::-1]
    run = next_off - last_off - 1
    return depth, run


def _snow(rgb: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = labels.shape
    s = h / 256.0
    img = rgb.astype(np.float32) / 255.0
    yh = _horizon_row(labels)
    # overcast sky
    sky = labels == SKY
    t = np.clip(np.arange(h, dtype=np.float32) / max(yh, 1.0), 0.0, 1.0)[:, None]
    sky_rows = np.array([0.72, 0.74, 0.78], np.float32) * (1 - t) + np.array([0.86, 0.87, 0.89], np.float32) * t
    img[sky] = np.broadcast_to(sky_rows[:, None, :], (h, w, 3))[sky]
    # desaturate and flatten the scene under diffuse light
    grey = img.mean(axis=2, keepdims=True)
    img = 0.55 * img + 0.45 * grey
    img = 0.75 * img + 0.12

    patches = _lowfreq(rng, h, w, max(4, int(12 * s)))
    fine = _lowfreq(rng, h, w, 2)
    cover = np.zeros((h, w), np.float32)
    ground = np.isin(labels, (SIDEWALK, TERRAIN))
    cover[ground] = np.clip(0.88 + 0.18 * patches[ground] + 0.06 * fine[ground], 0.0, 1.0)
    road = labels == ROAD
    road_cover = np.clip(0.78 + 0.22 * patches + 0.05 * fine, 0.0, 1.0)
    # tyre tracks: darker slush converging to the vanishing point
    rows = np.nonzero(road.any(axis=1))[0]
    if rows.size:
        top = int(rows.min())
        vx = float(np.nonzero(road[top])[0].mean())
        bottom_cols = np.nonzero(road[h - 1])[0]
        lo, hi = (bottom_cols.min(), bottom_cols.max()) if bottom_cols.size else (0, w - 1)
        tracks = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(1, 3))):
            cxb = rng.uniform(lo, hi)
            for off in (-0.11 * w, 0.11 * w):
                xb = cxb + off
                wb = 0.035 * w
                pts = np.array([[xb - wb, h + 1], [xb + wb, h + 1], [vx + 0.3, top], [vx - 0.3, top]])
                cv2.fillPoly(tracks, [np.rint(pts * _ONE).astype(np.int32)], 1.0, cv2.LINE_8, _SHIFT)
        tracks = cv2.GaussianBlur(tracks, (0, 0), 1.5 * s + 0.5)
        road_cover *= 1.0 - 0.5 * tracks
    cover[road] = road_cover[road]
    # caps on top of objects (car roofs, foliage, walls, hedges, building tops)
    for classes, frac, px, patchy in (
        (_VEHICLES, 0.16, 2.0, False), ((VEGETATION,), 0.3, 3.0, True), ((WALL, FENCE), 0.15, 2.0, False),
        ((BUILDING,), 0.02, 1.5, False), ((POLE, TRAFFIC_SIGN, TRAFFIC_LIGHT), 0.05, 1.0, False),
    ):
        m = np.isin(labels, classes)
        if not m.any():
            continue
        depth, run = _vertical_runs(m)
        cap = m & (depth < np.maximum(px * s, frac * run))
        val = np.float32(0.95)
        if patchy:
            speck = m & (fine > 0.6)
            cover[speck] = np.maximum(cover[speck], 0.75)
        cover[cap] = np.maximum(cover[cap], val)
    snow_col = np.array([0.93, 0.94, 0.97], np.float32)
    snow = snow_col - 0.05 * np.abs(fine)[..., None] + np.array([0.0, 0.005, 0.02], np.float32) * patches[..., None]
    img = img * (1.0 - cover[..., None]) + snow * cover[..., None]
    # distance haze: strongest around the horizon
    yy = np.arange(h, dtype=np.float32)[:, None]
    haze = 0.22 + 0.5 * np.exp(-np.abs(yy - yh) / (0.2 * h))
    haze_col = np.array([0.82, 0.84, 0.87], np.float32)
    img = img * (1.0 - haze[..., None]) + haze_col * haze[..., None]
    img = cv2.GaussianBlur(img, (0, 0), 0.6 * max(s, 0.5))
    # falling snow: small dots, larger soft flakes and short streaks
    flakes = np.zeros((h, w), np.float32)
    n_dots = int(h * w / rng.uniform(120, 250))
    ys, xs = rng.integers(0, h, n_dots), rng.integers(0, w, n_dots)
    flakes[ys, xs] = rng.uniform(0.4, 1.0, n_dots).astype(np.float32)
    angle = rng.uniform(-0.5, 0.5)
    for _ in range(int(h * w / 900)):
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        r = rng.uniform(0.8, 2.5) * s
        if rng.random() < 0.3:
            ln = rng.uniform(3, 8) * s
            a = (round(x * _ONE), round(y * _ONE))
            bpt = (round((x + math.sin(angle) * ln) * _ONE), round((y + math.cos(angle) * ln) * _ONE))
            cv2.line(flakes, a, bpt, float(rng.uniform(0.4, 0.8)), max(1, int(round(r * 0.7))), cv2.LINE_AA, _SHIFT)
        else:
            cv2.circle(flakes, (round(x * _ONE), round(y * _ONE)), max(1, round(r * _ONE)),
                       float(rng.uniform(0.5, 1.0)), -1, cv2.LINE_AA, _SHIFT)
    flakes = cv2.GaussianBlur(flakes, (0, 0), 0.5 * max(s, 0.5))
    big = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(3, 12))):
        cv2.circle(big, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), max(2, int(rng.uniform(3, 7) * s)),
                   float(rng.uniform(0.3, 0.6)), -1, cv2.LINE_AA)
    big = cv2.GaussianBlur(big, (0, 0), 1.5 * s + 0.5)
    a = np.clip(flakes + big, 0.0, 1.0)[..., None]
    img = img * (1.0 - a) + np.float32(0.97) * a
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * 0.01
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


_CONDITION_SALT = {"night": 1, "snow": 2}


def apply_condition(rgb: np.ndarray, labels: np.ndarray, condition: str, seed: int) -> np.ndarray:
    """Render the scene (rgb uint8 HxWx3, labels uint8 HxW) under `condition`.

    Returns a new uint8 HxWx3 image; "day" returns a copy. Labels are unchanged
    by any condition. Raises ValueError for an unknown condition.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    rgb = np.asarray(rgb)
    labels = np.asarray(labels)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match image {rgb.shape[:2]}")
    if condition == "day":
        return rgb.copy()
    rng = np.random.default_rng([int(seed), _CONDITION_SALT[condition]])
    if condition == "night":
        return _night(rgb, labels, rng)
    return _snow(rgb, labels, rng)


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """trainId map (HxW) -> RGB uint8 HxWx3 with Cityscapes colours; ignore/unknown is black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[np.asarray(labels, np.uint8)]


# --------------------------------------------------------------------------- #
# dataset writers
# --------------------------------------------------------------------------- #


def _imwrite(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def write_cityscapes_layout(root: Path, split: str, count: int, seed: int, height: int, width: int,
                            city: str = "synthtown") -> list[Path]:
    """Write `count` day scenes (scene i uses seed + i) in Cityscapes' on-disk layout.

    root/leftImg8bit/<split>/<city>/<city>_000000_<i:06d>_leftImg8bit.png        (RGB PNG)
    root/gtFine/<split>/<city>/<city>_000000_<i:06d>_gtFine_labelTrainIds.png   (uint8 trainIds)
    Returns the image paths in order.
    """
    root = Path(root)
    paths = []
    for i in range(int(count)):
        rgb, labels = render_scene(seed + i, height, width)
        stem = f"{city}_000000_{i:06d}"
        img_path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        _imwrite(img_path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        _imwrite(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", labels)
        paths.append(img_path)
    return paths


def write_acdc_layout(root: Path, condition: str, split: str, count: int, seed: int, height: int,
                      width: int) -> list[Path]:
    """Write `count` scenes (scene i uses seed + i) under "night" or "snow" in ACDC's layout.

    root/rgb_anon/<condition>/<split>/GOPR0000/GOPR0000_frame_<i:06d>_rgb_anon.png
    root/gt/<condition>/<split>/GOPR0000/GOPR0000_frame_<i:06d>_gt_labelTrainIds.png
    Other conditions (including ACDC's "fog" and "rain") raise ValueError.
    Returns the image paths in order.
    """
    if condition not in ADVERSE_CONDITIONS:
        raise ValueError(f"unsupported ACDC condition {condition!r}; expected one of {ADVERSE_CONDITIONS}")
    root = Path(root)
    paths = []
    for i in range(int(count)):
        scene_seed = seed + i
        rgb, labels = render_scene(scene_seed, height, width)
        rgb = apply_condition(rgb, labels, condition, scene_seed)
        stem = f"GOPR0000_frame_{i:06d}"
        img_path = root / "rgb_anon" / condition / split / "GOPR0000" / f"{stem}_rgb_anon.png"
        _imwrite(img_path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        _imwrite(root / "gt" / condition / split / "GOPR0000" / f"{stem}_gt_labelTrainIds.png", labels)
        paths.append(img_path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Write DIR/cityscapes (day train+val) and DIR/acdc (night+snow val of the same val scenes)."""
    parser = argparse.ArgumentParser(
        prog="python -m training.data.synthetic",
        description="Render synthetic road scenes in Cityscapes and ACDC layouts.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--train", type=int, default=200, help="number of day training scenes")
    parser.add_argument("--val", type=int, default=50, help="number of validation scenes per condition")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="base seed (non-negative)")
    args = parser.parse_args(argv)
    if args.train < 0 or args.val < 0:
        parser.error("--train and --val must be non-negative")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    if args.train >= VAL_SEED_OFFSET:
        parser.error(f"--train must be below {VAL_SEED_OFFSET}")
    try:
        _check_size(args.height, args.width)
    except ValueError as exc:
        parser.error(str(exc))

    val_seed = args.seed + VAL_SEED_OFFSET
    cs_root = args.out / "cityscapes"
    acdc_root = args.out / "acdc"
    n_train = len(write_cityscapes_layout(cs_root, "train", args.train, args.seed, args.height, args.width))
    n_val = len(write_cityscapes_layout(cs_root, "val", args.val, val_seed, args.height, args.width))
    print(f"cityscapes: {n_train} train + {n_val} val day scenes ({args.height}x{args.width}) -> {cs_root}")
    for condition in ADVERSE_CONDITIONS:
        n = len(write_acdc_layout(acdc_root, condition, "val", args.val, val_seed, args.height, args.width))
        print(f"acdc/{condition}: {n} val scenes (same scenes as cityscapes val) -> {acdc_root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
