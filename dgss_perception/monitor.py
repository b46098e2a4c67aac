"""Domain-shift monitor (numpy only, no rclpy): is the model seeing conditions it was not trained for?

A segmentation model that drives into a domain it never saw (night, snow, another city) usually
becomes less sure of itself. The engine already returns the max softmax per pixel
(``SegmentResult.network_confidence``, float32 h×w on the network's grid), so the monitor
needs no logits: per frame it takes

    low_confidence_share   share of pixels whose max softmax lies below a pixel threshold
    mean_confidence        mean max softmax over the frame

(entropy would need every class's probability, which the graphs do not return: it is not used),
smooths both with a moving average over ``window`` frames, and compares the smoothed figures with
thresholds measured on a reference drive of the training domain (:func:`calibrate`, the
``dgss-perception calibrate`` command). Its level is OK, WARN or ERROR with hysteresis: a higher
level is entered after ``enter_frames`` consecutive frames beyond its threshold, and left after
``leave_frames`` consecutive frames back inside a *clear* level that lies between the threshold
and the reference's median, so a figure hovering at a threshold does not make the level flicker.

Without a calibration the figures are still computed (pixel threshold
:data:`DEFAULT_PIXEL_THRESHOLD`), but there is nothing to judge them against: the level stays OK
and the report says "uncalibrated".
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
OK, WARN, ERROR = 0, 1, 2  # the values of diagnostic_msgs/DiagnosticStatus OK, WARN, ERROR
LEVEL_NAMES = ("OK", "WARN", "ERROR")
FIGURES = ("low_confidence_share", "mean_confidence")
DEFAULT_PIXEL_THRESHOLD = 0.5
DEFAULT_WINDOW = 10
HISTOGRAM_BINS = 1000  # reference histograms: pixel thresholds are chosen on this grid of [0, 1]
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


class CalibrationError(ValueError):
    """A calibration file that cannot be used (unreadable, wrong schema, other model, bad values)."""


def model_checksum(checksums: Mapping[str, str]) -> str:
    """One sha256 over a model package's graph checksums (card ``checksums``: file name → sha256)."""
    text = json.dumps(dict(sorted(checksums.items())), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class FigureThresholds:
    """Thresholds of one figure. ``higher_is_worse``: the share (True) or the mean confidence (False).

    Ordered from the reference outwards: clear_warn before warn, clear_error between warn and error.
    """

    warn: float
    error: float
    clear_warn: float  # leave WARN (for OK) once back on the reference's side of this
    clear_error: float  # leave ERROR (for WARN) once back on the reference's side of this
    higher_is_worse: bool = True

    def validate(self, name: str) -> None:
        values = (self.clear_warn, self.warn, self.clear_error, self.error)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise CalibrationError(f"{name}: thresholds must be numbers in [0, 1], got {values}")
        ordered = values if self.higher_is_worse else values[::-1]
        if list(ordered) != sorted(ordered):
            side = "increase" if self.higher_is_worse else "decrease"
            raise CalibrationError(f"{name}: clear_warn, warn, clear_error, error must {side} in that order, "
                                   f"got {values}")

    def beyond(self, value: float, threshold: float) -> bool:
        return value >= threshold if self.higher_is_worse else value <= threshold

    def level(self, value: float) -> int:
        """The level this value calls for: ERROR beyond ``error``, WARN beyond ``warn``, else OK."""
        if self.beyond(value, self.error):
            return ERROR
        return WARN if self.beyond(value, self.warn) else OK

    def held(self, value: float) -> int:
        """The highest level this value still holds: ERROR beyond ``clear_error``, WARN beyond ``clear_warn``."""
        if self.beyond(value, self.clear_error):
            return ERROR
        return WARN if self.beyond(value, self.clear_warn) else OK


@dataclass
class Calibration:
    """What a reference drive of the training domain says about a model's confidence (a small JSON file).

    ``reference`` holds, per figure, the quantiles (``QUANTILES``) of its smoothed values over the
    reference frames; ``thresholds`` the levels derived from them (see :func:`calibrate`).
    """

    model: str
    model_checksum: str
    confidence_threshold: float  # a pixel with max softmax below this counts as low confidence
    window: int  # frames of the moving average
    thresholds: dict[str, FigureThresholds]
    enter_frames: int = 3
    leave_frames: int = 10
    inference_mode: str = ""
    reference: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def validate(self) -> None:
        if not 0.0 < self.confidence_threshold <= 1.0:
            raise CalibrationError(f"confidence_threshold must lie in (0, 1], got {self.confidence_threshold}")
        for name, value in (("window", self.window), ("enter_frames", self.enter_frames),
                            ("leave_frames", self.leave_frames)):
            if not isinstance(value, int) or value < 1:
                raise CalibrationError(f"{name} must be an integer ≥ 1, got {value!r}")
        unknown = set(self.thresholds) - set(FIGURES)
        if unknown or not self.thresholds:
            raise CalibrationError(f"thresholds must be given for some of {FIGURES}, got {sorted(self.thresholds)}")
        for name, t in self.thresholds.items():
            if t.higher_is_worse != (name == "low_confidence_share"):
                raise CalibrationError(f"{name}: higher_is_worse must be {name == 'low_confidence_share'}")
            t.validate(name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        order = ("schema_version", "model", "model_checksum", "inference_mode", "confidence_threshold", "window",
                 "enter_frames", "leave_frames", "thresholds", "reference")
        return {k: data[k] for k in order}

    def save(self, path: str | Path) -> None:
        self.validate()
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        if not isinstance(data, dict):
            raise CalibrationError("a calibration is a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise CalibrationError(f"calibration schema_version {data.get('schema_version')!r} is not "
                                   f"{SCHEMA_VERSION}: calibrate again with this version")
        try:
            thresholds = {name: FigureThresholds(**t) for name, t in data["thresholds"].items()}
            calibration = cls(model=str(data["model"]), model_checksum=str(data["model_checksum"]),
                              confidence_threshold=float(data["confidence_threshold"]), window=data["window"],
                              thresholds=thresholds, enter_frames=data.get("enter_frames", 3),
                              leave_frames=data.get("leave_frames", 10),
                              inference_mode=str(data.get("inference_mode", "")),
                              reference=dict(data.get("reference", {})))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"malformed calibration: {type(exc).__name__}: {exc}") from None
        calibration.validate()
        return calibration

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalibrationError(f"calibration file {path} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"cannot read calibration {path}: {exc}") from None
        try:
            return cls.from_dict(data)
        except CalibrationError as exc:
            raise CalibrationError(f"calibration {path}: {exc}") from None

    def check_model(self, name: str, checksums: Mapping[str, str]) -> None:
        """Raise CalibrationError unless this calibration was made for that model package."""
        if self.model != name or self.model_checksum != model_checksum(checksums):
            raise CalibrationError(f"the calibration was made for model {self.model} "
                                   f"(graphs {self.model_checksum[:12]}), not {name} "
                                   f"(graphs {model_checksum(checksums)[:12]}): run dgss-perception calibrate "
                                   "for this model")


def frame_figures(confidence: np.ndarray, threshold: float) -> dict[str, float]:
    """confidence: max softmax, float (h, w) → {low_confidence_share, mean_confidence} of the frame."""
    if confidence.ndim != 2 or confidence.size == 0:
        raise ValueError(f"expected a non-empty (h, w) confidence map, got shape {confidence.shape}")
    # Counting with a boolean sum avoids a float64 copy of the map.
    low = int(np.count_nonzero(confidence < np.float64(threshold)))
    return {"low_confidence_share": low / confidence.size,
            "mean_confidence": float(confidence.mean(dtype=np.float64))}


class MovingAverage:
    """Mean of the last ``window`` values of each figure (of fewer until ``window`` frames were seen)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be ≥ 1, got {window}")
        self.window = window
        self._values: dict[str, deque[float]] = {}

    def update(self, figures: Mapping[str, float]) -> dict[str, float]:
        out = {}
        for name, value in figures.items():
            values = self._values.setdefault(name, deque(maxlen=self.window))
            values.append(float(value))
            out[name] = sum(values) / len(values)
        return out


@dataclass(frozen=True)
class MonitorReport:
    """One frame's figures, their smoothed values, and the monitor's level after it."""

    level: int
    figures: dict[str, float]
    smoothed: dict[str, float]
    frames: int
    calibrated: bool

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]

    def values(self) -> dict[str, str]:
        """Named values as text (DiagnosticStatus KeyValues)."""
        out = {"level": self.level_name, "calibrated": str(self.calibrated).lower(), "frames": str(self.frames)}
        out.update({name: f"{v:.4f}" for name, v in self.figures.items()})
        out.update({f"{name}_smoothed": f"{v:.4f}" for name, v in self.smoothed.items()})
        return out


class ShiftMonitor:
    """Per-camera state: figures per frame → smoothed → OK/WARN/ERROR with hysteresis.

    Args:
        calibration: thresholds from :func:`calibrate`; None = figures only, level always OK.
        window: moving-average frames; 0 = the calibration's (or :data:`DEFAULT_WINDOW`). Another
            window than the calibration's changes how far the smoothed figures scatter, so the
            thresholds no longer mean what was measured: keep 0 unless calibrating again.
    """

    def __init__(self, calibration: Calibration | None = None, window: int = 0) -> None:
        if window < 0:
            raise ValueError(f"window must be ≥ 0, got {window}")
        self.calibration = calibration
        self.window = window or (calibration.window if calibration else DEFAULT_WINDOW)
        self.confidence_threshold = calibration.confidence_threshold if calibration else DEFAULT_PIXEL_THRESHOLD
        self._average = MovingAverage(self.window)
        self.level = OK
        self.frames = 0
        self._up = 0  # consecutive frames calling for a higher level
        self._down = 0  # consecutive frames holding only a lower level
        self.last: MonitorReport | None = None

    def update(self, confidence: np.ndarray) -> MonitorReport:
        """Take one frame's max-softmax map (float (h, w)) and return the report after it."""
        return self.update_figures(frame_figures(confidence, self.confidence_threshold))

    def update_figures(self, figures: Mapping[str, float]) -> MonitorReport:
        """:meth:`update` from figures already computed (:func:`frame_figures`)."""
        smoothed = self._average.update(figures)
        self.frames += 1
        cal = self.calibration
        if cal is not None:
            judged = [(t, smoothed[name]) for name, t in cal.thresholds.items() if name in smoothed]
            target = max((t.level(v) for t, v in judged), default=OK)
            held = max((t.held(v) for t, v in judged), default=OK)
            self._step(target, held, cal.enter_frames, cal.leave_frames)
        self.last = MonitorReport(self.level, dict(figures), smoothed, self.frames, cal is not None)
        return self.last

    def _step(self, target: int, held: int, enter: int, leave: int) -> None:
        """Hysteresis: up to ``target`` after ``enter`` frames calling for it; down to ``held`` after ``leave``."""
        if target > self.level:
            self._up, self._down = self._up + 1, 0
            if self._up >= enter:
                self.level, self._up = target, 0
        elif held < self.level:
            self._up, self._down = 0, self._down + 1
            if self._down >= leave:
                self.level, self._down = held, 0
        else:
            self._up = self._down = 0

    def describe(self) -> str:
        """One line for /diagnostics: the level and why."""
        report = self.last
        if report is None:
            return "no frame yet"
        share = report.smoothed["low_confidence_share"]
        figures = (f"{100 * share:.1f}% of pixels below confidence {self.confidence_threshold:.3f}, "
                   f"mean confidence {report.smoothed['mean_confidence']:.3f} over {min(report.frames, self.window)} "
                   "frames")
        if self.calibration is None:
            return f"uncalibrated (monitor_calibration not set): {figures}"
        t = self.calibration.thresholds.get("low_confidence_share")
        limits = f" (warn at {100 * t.warn:.1f}%, error at {100 * t.error:.1f}%)" if t else ""
        state = {OK: "in domain", WARN: "domain shift", ERROR: "strong domain shift"}[self.level]
        return f"{state}: {figures}{limits}"


# --- calibration -------------------------------------------------------------------------------------------


class ReferenceStats:
    """Per-frame confidence histograms of a reference drive, per camera (topic), in arrival order.

    A histogram of HISTOGRAM_BINS bins per frame (4 kB) instead of the map itself: the pixel threshold
    is chosen after all frames are seen, and each frame's share below it is then read off its histogram.
    """

    def __init__(self) -> None:
        self.histograms: dict[str, list[np.ndarray]] = {}
        self.means: dict[str, list[float]] = {}

    def add(self, camera: str, confidence: np.ndarray) -> None:
        """One frame's max-softmax map, float (h, w), values in [0, 1]."""
        if confidence.ndim != 2 or confidence.size == 0:
            raise ValueError(f"expected a non-empty (h, w) confidence map, got shape {confidence.shape}")
        # Bin k holds [k/B, (k+1)/B): then "below edge k" is exactly the sum of the bins before k.
        bins = np.clip((confidence.astype(np.float64) * HISTOGRAM_BINS).astype(np.int64), 0, HISTOGRAM_BINS - 1)
        self.histograms.setdefault(camera, []).append(np.bincount(bins.ravel(), minlength=HISTOGRAM_BINS))
        self.means.setdefault(camera, []).append(float(confidence.mean(dtype=np.float64)))

    @property
    def frames(self) -> int:
        return sum(len(h) for h in self.histograms.values())

    def pixel_quantile(self, q: float) -> float:
        """The bin edge below which a share ≥ q of all reference pixels lies (at least one bin up)."""
        total = np.sum([h.sum(axis=0) for h in map(np.stack, self.histograms.values())], axis=0)
        cumulative = np.cumsum(total) / total.sum()
        k = int(np.searchsorted(cumulative, q, side="left")) + 1
        return min(k, HISTOGRAM_BINS) / HISTOGRAM_BINS

    def figures(self, threshold: float) -> dict[str, list[dict[str, float]]]:
        """Per camera, per frame: {low_confidence_share, mean_confidence} at pixel ``threshold``.

        ``threshold`` on the bin grid gives the share exactly; elsewhere the bin holding it counts as above.
        """
        k = int(math.floor(threshold * HISTOGRAM_BINS + 1e-9))
        out = {}
        for camera, hists in self.histograms.items():
            stacked = np.stack(hists)
            shares = stacked[:, :k].sum(axis=1) / stacked.sum(axis=1)
            out[camera] = [{"low_confidence_share": float(s), "mean_confidence": m}
                           for s, m in zip(shares, self.means[camera])]
        return out


def _quantiles(values: Iterable[float]) -> dict[str, float]:
    array = np.asarray(list(values), dtype=np.float64)
    out = {f"q{round(100 * q):02d}": float(np.quantile(array, q)) for q in QUANTILES}
    out.update(min=float(array.min()), max=float(array.max()), mean=float(array.mean()))
    return out


def figure_thresholds(quantiles: Mapping[str, float], higher_is_worse: bool, tail: str = "q99",
                      min_margin: float = 0.02) -> FigureThresholds:
    """Thresholds of one figure from its reference quantiles.

    With ``d`` = the distance from the reference's median to its ``tail`` quantile (how far in-domain
    smoothed values stray; at least ``min_margin``, since a short reference underestimates it):

        warn  = tail + d         (twice as far from the median as the reference's own tail)
        error = warn + 2·d       (four times as far)
        clear_warn  = median + d (a WARN ends back at the reference's tail)
        clear_error = warn + d   (an ERROR ends halfway back to warn)

    all clipped to [0, 1]. ``tail`` is the reference's quantile on the worse side (q99 for the share;
    for the mean confidence, where lower is worse, its mirror q01 is used).
    """
    median = quantiles["q50"]
    if not higher_is_worse:
        tail = f"q{100 - int(tail[1:]):02d}"
    edge = quantiles[tail]
    d = max(abs(edge - median), min_margin)
    sign = 1.0 if higher_is_worse else -1.0

    def at(x: float) -> float:
        return float(min(1.0, max(0.0, x)))

    warn = at(edge + sign * d)
    return FigureThresholds(warn=warn, error=at(warn + sign * 2 * d), clear_warn=at(median + sign * d),
                            clear_error=at(warn + sign * d), higher_is_worse=higher_is_worse)


def calibrate(stats: ReferenceStats, *, model: str, checksums: Mapping[str, str], inference_mode: str = "",
              window: int = DEFAULT_WINDOW, confidence_threshold: float | None = None, pixel_quantile: float = 0.1,
              tail: str = "q99", min_margin: float = 0.02, enter_frames: int = 3,
              leave_frames: int = 10) -> Calibration:
    """Thresholds from a reference drive of the training domain (see :func:`figure_thresholds`).

    Args:
        stats: the reference frames' confidence (:class:`ReferenceStats`), per camera.
        window: moving-average frames, as the node will use them; each camera is smoothed on its own.
        confidence_threshold: pixel threshold of the share; None = the ``pixel_quantile`` quantile of
            all reference pixels' confidence, so that in the training domain about that share of pixels
            counts as low confidence whatever the model's typical sharpness (a fixed 0.5 says nothing
            for a model that is always above it, or always below it).
        tail: the reference quantile (of the smoothed figures) that ``warn`` is set beyond.
    """
    if stats.frames == 0:
        raise ValueError("the reference holds no frames to calibrate on")
    if not 0.0 < pixel_quantile < 1.0:
        raise ValueError(f"pixel_quantile must lie in (0, 1), got {pixel_quantile}")
    if tail not in {f"q{round(100 * q):02d}" for q in QUANTILES if q > 0.5}:
        raise ValueError(f"tail must be one of q75, q95, q99, got {tail!r}")
    threshold = stats.pixel_quantile(pixel_quantile) if confidence_threshold is None else float(confidence_threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"confidence_threshold must lie in (0, 1], got {threshold}")
    smoothed: dict[str, list[float]] = {name: [] for name in FIGURES}
    for frames in stats.figures(threshold).values():
        average = MovingAverage(window)
        for figures in frames:
            for name, value in average.update(figures).items():
                smoothed[name].append(value)
    reference = {name: _quantiles(values) for name, values in smoothed.items()}
    reference["frames"] = stats.frames
    reference["cameras"] = len(stats.histograms)
    thresholds = {name: figure_thresholds(reference[name], name == "low_confidence_share", tail, min_margin)
                  for name in FIGURES}
    calibration = Calibration(model=model, model_checksum=model_checksum(checksums),
                              confidence_threshold=threshold, window=window, thresholds=thresholds,
                              enter_frames=enter_frames, leave_frames=leave_frames, inference_mode=inference_mode,
                              reference=reference)
    calibration.validate()
    return calibration
