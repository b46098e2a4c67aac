"""Domain-shift monitor (numpy) and ``dgss-perception calibrate`` on bags in the real on-disk layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dgss_perception.bag import write_image_bag
from dgss_perception.cli import main as cli_main
from dgss_perception.engine import Segmenter
from dgss_perception.monitor import (ERROR, OK, WARN, Calibration, CalibrationError, FigureThresholds,
                                     MovingAverage, ReferenceStats, ShiftMonitor, calibrate, figure_thresholds,
                                     frame_figures, model_checksum)

from monitorutil import day_frame, make_brightness_package, night_frame

CHECKSUMS = {"whole.onnx": "sha256:abc"}


def share_calibration(warn: float = 0.3, error: float = 0.6, clear_warn: float = 0.2, clear_error: float = 0.5,
                      enter: int = 3, leave: int = 4, window: int = 1) -> Calibration:
    return Calibration(model="m", model_checksum=model_checksum(CHECKSUMS), confidence_threshold=0.5, window=window,
                       thresholds={"low_confidence_share": FigureThresholds(warn, error, clear_warn, clear_error)},
                       enter_frames=enter, leave_frames=leave)


def conf_with_share(share: float, size: int = 100) -> np.ndarray:
    """A (10, 10) confidence map with exactly ``share`` of its pixels below 0.5."""
    low = round(share * size)
    return np.array([0.2] * low + [0.9] * (size - low), np.float32).reshape(10, 10)


@pytest.fixture(scope="module")
def brightness_model(tmp_path_factory):
    return make_brightness_package(tmp_path_factory.mktemp("brightness") / "package")


def test_frame_figures():
    conf = np.array([[0.1, 0.4], [0.6, 0.9]], np.float32)
    figures = frame_figures(conf, 0.5)
    assert figures["low_confidence_share"] == 0.5
    assert figures["mean_confidence"] == pytest.approx(0.5)
    assert frame_figures(conf, 0.05)["low_confidence_share"] == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        frame_figures(np.zeros((0, 3), np.float32), 0.5)


def test_moving_average_over_the_window():
    average = MovingAverage(3)
    out = [average.update({"x": v})["x"] for v in (1.0, 2.0, 3.0, 10.0)]
    assert out == [1.0, 1.5, 2.0, 5.0]  # fewer frames at the start, then the last three
    with pytest.raises(ValueError):
        MovingAverage(0)


def test_hysteresis_enter_after_n_frames_leave_after_m_below_clear():
    monitor = ShiftMonitor(share_calibration(enter=3, leave=4))
    levels = [monitor.update(conf_with_share(s)).level for s in [0.1] * 3 + [0.4] * 3]
    assert levels == [OK] * 5 + [WARN]  # the third frame beyond warn raises the level
    # Between clear_warn (0.2) and warn (0.3): stays WARN however long.
    assert {monitor.update(conf_with_share(0.25)).level for _ in range(20)} == {WARN}
    # Below clear_warn: back to OK after four frames, and a single frame above resets the count.
    levels = [monitor.update(conf_with_share(s)).level for s in (0.1, 0.1, 0.1, 0.25, 0.1, 0.1, 0.1, 0.1)]
    assert levels == [WARN] * 7 + [OK]


def test_error_and_its_own_clear_level():
    monitor = ShiftMonitor(share_calibration(enter=2, leave=2))
    assert [monitor.update(conf_with_share(0.8)).level for _ in range(2)] == [OK, ERROR]  # straight to ERROR
    # 0.55 is above clear_error: ERROR holds; 0.4 is below it but above clear_warn: WARN.
    assert [monitor.update(conf_with_share(s)).level for s in (0.55, 0.55, 0.4, 0.4)] == [ERROR] * 3 + [WARN]
    assert [monitor.update(conf_with_share(0.0)).level for _ in range(2)] == [WARN, OK]


def test_smoothing_suppresses_a_single_outlier_frame():
    monitor = ShiftMonitor(share_calibration(enter=1, leave=1, window=5))
    levels = [monitor.update(conf_with_share(s)).level for s in (0.1, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1)]
    # One frame at 0.9 moves the five-frame mean to 0.26: below warn.
    assert levels == [OK] * 7
    assert monitor.last.smoothed["low_confidence_share"] == pytest.approx(0.26)


def test_mean_confidence_thresholds_lower_is_worse():
    cal = share_calibration(enter=1, leave=1)
    cal.thresholds = {"mean_confidence": FigureThresholds(0.5, 0.3, 0.6, 0.4, higher_is_worse=False)}
    cal.validate()
    monitor = ShiftMonitor(cal)
    levels = [monitor.update(np.full((4, 4), v, np.float32)).level for v in (0.8, 0.45, 0.2, 0.35, 0.55, 0.7)]
    assert levels == [OK, WARN, ERROR, ERROR, WARN, OK]


def test_uncalibrated_monitor_reports_figures_but_stays_ok():
    monitor = ShiftMonitor(None)
    report = monitor.update(np.full((4, 4), 0.1, np.float32))
    assert report.level == OK and not report.calibrated and report.figures["low_confidence_share"] == 1.0
    assert "uncalibrated" in monitor.describe() and monitor.window == 10
    assert report.values()["level"] == "OK" and report.values()["low_confidence_share"] == "1.0000"


def test_calibration_file_round_trip_and_refusals(tmp_path):
    cal = share_calibration()
    path = tmp_path / "cal.json"
    cal.save(path)
    loaded = Calibration.load(path)
    assert loaded == cal
    loaded.check_model("m", CHECKSUMS)
    with pytest.raises(CalibrationError, match="made for model m"):
        loaded.check_model("m", {"whole.onnx": "sha256:other"})
    data = json.loads(path.read_text())
    for edit, message in ((lambda d: d.update(schema_version=99), "schema_version"),
                          (lambda d: d.pop("thresholds"), "malformed"),
                          (lambda d: d["thresholds"]["low_confidence_share"].update(warn=0.9), "in that order"),
                          (lambda d: d.update(window=0), "window"),
                          (lambda d: d["thresholds"].update(entropy=d["thresholds"]["low_confidence_share"]),
                           "thresholds must be given")):
        bad = json.loads(json.dumps(data))
        edit(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(CalibrationError, match=message):
            Calibration.load(path)
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="cannot read"):
        Calibration.load(path)
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.load(tmp_path / "missing.json")


def test_reference_histograms_give_the_monitors_share_exactly():
    rng = np.random.default_rng(0)
    maps = [rng.random((30, 40), dtype=np.float32) ** (1 + i % 3) for i in range(6)]
    stats = ReferenceStats()
    for m in maps:
        stats.add("/cam", m)
    t = stats.pixel_quantile(0.1)
    assert t * 1000 == round(t * 1000)  # on the histogram grid
    pixels = np.concatenate([m.ravel() for m in maps])
    assert (pixels < t).mean() >= 0.1 > (pixels < t - 1e-3).mean()
    for frame, m in zip(stats.figures(t)["/cam"], maps):
        assert frame["low_confidence_share"] == pytest.approx(frame_figures(m, t)["low_confidence_share"], abs=1e-12)
        assert frame["mean_confidence"] == pytest.approx(frame_figures(m, t)["mean_confidence"])


def test_figure_thresholds_lie_beyond_the_reference():
    q = {"q01": 0.05, "q50": 0.10, "q99": 0.16}
    t = figure_thresholds(q, higher_is_worse=True)
    assert (t.clear_warn, t.warn, t.clear_error, t.error) == pytest.approx((0.16, 0.22, 0.28, 0.34))
    t = figure_thresholds({"q01": 0.70, "q50": 0.80, "q99": 0.85}, higher_is_worse=False)
    assert (t.clear_warn, t.warn, t.clear_error, t.error) == pytest.approx((0.70, 0.60, 0.50, 0.40))
    t = figure_thresholds({"q01": 0.5, "q50": 0.5, "q99": 0.5}, higher_is_worse=True, min_margin=0.05)
    assert t.warn == pytest.approx(0.55)  # a reference without spread still leaves a margin
    assert figure_thresholds({"q01": 0.9, "q50": 0.95, "q99": 0.99}, True).error == 1.0  # clipped


def test_calibrate_keeps_the_reference_quiet_and_fires_on_a_shift():
    rng = np.random.default_rng(1)
    day = [np.clip(rng.normal(0.8 + 0.03 * np.sin(i / 3), 0.15, (20, 30)), 0, 1).astype(np.float32)
           for i in range(60)]
    night = [np.clip(rng.normal(0.45, 0.2, (20, 30)), 0, 1).astype(np.float32) for _ in range(30)]
    stats = ReferenceStats()
    for i, m in enumerate(day):
        stats.add(f"/cam{i % 2}", m)  # two cameras, each smoothed on its own
    cal = calibrate(stats, model="m", checksums=CHECKSUMS, window=5, enter_frames=3, leave_frames=5)
    assert cal.reference["frames"] == 60 and cal.reference["cameras"] == 2
    share = cal.thresholds["low_confidence_share"]
    assert share.warn > cal.reference["low_confidence_share"]["q99"]
    assert cal.thresholds["mean_confidence"].warn < cal.reference["mean_confidence"]["q01"]
    monitor = ShiftMonitor(cal)
    assert {monitor.update(m).level for m in day} == {OK}
    levels = [monitor.update(m).level for m in night]
    assert levels[-1] in (WARN, ERROR) and levels[:2] == [OK, OK]
    assert [monitor.update(m).level for m in day][-1] == OK
    with pytest.raises(ValueError, match="no frames"):
        calibrate(ReferenceStats(), model="m", checksums=CHECKSUMS)


def write_bag(path, frames, topic="/cam/image_raw", compressed=False):
    write_image_bag(path, topic, ((1_000_000_000 * (i + 1), f) for i, f in enumerate(frames)), storage="mcap",
                    compressed=compressed)


def test_calibrate_command_on_a_bag(tmp_path, brightness_model, capsys):
    bag = tmp_path / "day"
    write_bag(bag, [day_frame(i) for i in range(30)])
    out = tmp_path / "day.json"
    rc = cli_main(["calibrate", str(bag), "--model", str(brightness_model), "--out", str(out), "--window", "4",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    cal = Calibration.load(out)
    assert cal.model == "brightness_test" and cal.window == 4 and cal.inference_mode == "whole"
    assert cal.reference["frames"] == 30
    seg = Segmenter(brightness_model)
    cal.check_model(seg.card.name, seg.card.checksums)
    # The pixel threshold is the reference pixels' 10 % quantile (on the 1/1000 grid).
    confidences = np.concatenate([seg.segment(day_frame(i)).network_confidence.ravel() for i in range(30)])
    assert 0.1 <= (confidences < cal.confidence_threshold).mean() < 0.1 + 0.02
    # The day frames keep the monitor quiet; the same scenes at night make it fire, and day clears it again.
    monitor = ShiftMonitor(cal)
    assert {monitor.update(seg.segment(day_frame(100 + i)).network_confidence).level for i in range(20)} == {OK}
    night = [monitor.update(seg.segment(night_frame(i)).network_confidence) for i in range(10)]
    assert night[-1].level == ERROR and night[-1].figures["low_confidence_share"] > 0.9
    day = [monitor.update(seg.segment(day_frame(200 + i)).network_confidence).level for i in range(20)]
    assert day[-1] == OK
    assert "reference frames" in capsys.readouterr().out
    # An existing file is kept unless --overwrite.
    assert cli_main(["calibrate", str(bag), "--model", str(brightness_model), "--out", str(out),
                     "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(["calibrate", str(bag), "--model", str(brightness_model), "--out", str(out), "--overwrite",
                     "--window", "2", "--no-progress"]) == 0
    assert Calibration.load(out).window == 2


def test_calibrate_command_topics_and_bad_input(tmp_path, brightness_model, capsys):
    bag = tmp_path / "jpeg"
    write_bag(bag, [day_frame(i) for i in range(5)], topic="/front/image_raw/compressed", compressed=True)
    out = tmp_path / "c.json"
    assert cli_main(["calibrate", str(bag), "--model", str(brightness_model), "--out", str(out), "--topics",
                     "/front/image_raw/compressed", "--no-progress"]) == 0
    assert Calibration.load(out).reference["frames"] == 5
    assert cli_main(["calibrate", str(bag), "--model", str(brightness_model), "--out", str(tmp_path / "d.json"),
                     "--topics", "/rear/image", "--no-progress"]) == 2
    assert "not an image topic" in capsys.readouterr().err
    assert cli_main(["calibrate", str(tmp_path / "nothing"), "--model", str(brightness_model), "--out",
                     str(tmp_path / "e.json"), "--no-progress"]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "e.json").exists()
