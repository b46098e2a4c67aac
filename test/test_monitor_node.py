"""The domain-shift monitor and the silent-camera check in segment_node, over real DDS."""

from __future__ import annotations

import array
import time

import numpy as np
import pytest
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from dgss_perception.bag import write_image_bag
from dgss_perception.calibrate import calibrate_bag
from dgss_perception.engine import Segmenter
from dgss_perception.monitor import ERROR, OK, WARN, ShiftMonitor

from monitorutil import day_frame, make_brightness_package
from rosutil import RELIABLE, Collector, Spinner, init_context, start_node_process, stop_process, wait_for

LEVEL = {DiagnosticStatus.OK: OK, DiagnosticStatus.WARN: WARN, DiagnosticStatus.ERROR: ERROR}


def image(stamp: int, rgb: np.ndarray) -> Image:
    h, w, _ = rgb.shape
    return Image(header=Header(stamp=Time(sec=stamp), frame_id="cam"), height=h, width=w, encoding="rgb8",
                 step=3 * w, data=array.array("B", rgb.tobytes()))


def darker(seed: int, factor: float) -> np.ndarray:
    return (day_frame(seed) * factor).astype(np.uint8)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The brightness model and its calibration on a bag of 30 day frames (window 3, enter 2, leave 3)."""
    work = tmp_path_factory.mktemp("monitor_node")
    model = make_brightness_package(work / "package")
    write_image_bag(work / "day", "/cam/image", ((10**9 * (i + 1), day_frame(i)) for i in range(30)), storage="mcap")
    calibration, _ = calibrate_bag(model, work / "day", window=3, enter_frames=2, leave_frames=3, min_margin=0.1)
    calibration.save(work / "day.json")
    return work, model, calibration


class Driver:
    def __init__(self, work, model, params: list[str]) -> None:
        self.log = work / "node.log"
        args = ["-p", f"model:={model}", "-p", "qos_reliability:=reliable", "-p", "diagnostics_period:=0.2",
                "-r", "__ns:=/cam"]
        self.proc = start_node_process(args + [a for p in params for a in ("-p", p)], self.log)
        self.context = init_context()
        self.node = rclpy.create_node("monitor_test_driver", context=self.context)
        self.pub = self.node.create_publisher(Image, "/cam/image", RELIABLE)
        self.shift = Collector(self.node, DiagnosticArray, "/cam/labels/domain_shift")
        self.diag = Collector(self.node, DiagnosticArray, "/diagnostics")
        self.spinner = Spinner(self.node)
        wait_for(lambda: self.proc.poll() is None and self.pub.get_subscription_count() > 0, 60,
                 f"segment_node to subscribe (log: {self.log.read_text()})")

    def send(self, stamp: int, rgb: np.ndarray) -> DiagnosticStatus:
        """Publish a frame and return the monitor's status for it (matched by the copied header stamp)."""
        self.pub.publish(image(stamp, rgb))
        ours = lambda m: m.header.stamp.sec == stamp  # noqa: E731
        wait_for(lambda: self.shift.find(ours) is not None, 20, f"domain-shift figures for stamp {stamp}")
        return self.shift.find(ours).status[0]

    def latest(self, name_part: str) -> DiagnosticStatus | None:
        with self.diag.lock:
            for msg in reversed(self.diag.messages):
                for status in msg.status:
                    if name_part in status.name:
                        return status
        return None

    def close(self) -> int:
        self.spinner.stop()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        return stop_process(self.proc)


def values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def test_calibrated_node_flags_a_shift_and_clears_it(calibrated, ros_domain_id):
    work, model, calibration = calibrated
    engine = Segmenter(model)
    offline = ShiftMonitor(calibration)
    # Day, dusk (90 % brightness), night (25 %), day again: the same scenes' figures shift with the light.
    drive = ([day_frame(100 + i) for i in range(5)] + [darker(200 + i, 0.9) for i in range(6)]
             + [darker(300 + i, 0.25) for i in range(6)] + [day_frame(400 + i) for i in range(8)])
    expected = [offline.update(engine.segment(rgb).network_confidence) for rgb in drive]
    levels = [r.level for r in expected]
    # The calibration sees dusk as a shift and night as a strong one (checked offline, before the node).
    assert levels[:5] == [OK] * 5 and WARN in levels[5:11] and levels[16] == ERROR and levels[-1] == OK

    driver = Driver(work, model, [f"monitor_calibration:={work / 'day.json'}"])
    try:
        got = [driver.send(1000 + i, rgb) for i, rgb in enumerate(drive)]
        assert [LEVEL[s.level] for s in got] == levels  # the same figures and hysteresis as the engine's
        for status, report in zip(got, expected):
            v = values(status)
            assert float(v["low_confidence_share"]) == pytest.approx(report.figures["low_confidence_share"], abs=1e-4)
            assert float(v["mean_confidence_smoothed"]) == pytest.approx(report.smoothed["mean_confidence"],
                                                                         abs=1e-4)
            assert v["calibrated"] == "true" and v["window"] == "3"
        assert "domain shift" in got[6].message or "domain shift" in got[10].message
        # /diagnostics carries the level too: after the last day frame it is OK again, and at night it was ERROR.
        wait_for(lambda: (s := driver.latest("domain shift /cam/image")) is not None and s.level == DiagnosticStatus.OK
                 and values(s)["frames"] == str(len(drive)), 10, "the domain-shift status after the drive")
        assert "in domain" in driver.latest("domain shift /cam/image").message
        with driver.diag.lock:
            night = [s for m in driver.diag.messages for s in m.status
                     if "domain shift" in s.name and s.level == DiagnosticStatus.ERROR]
        assert night and "strong domain shift" in night[0].message
        log = driver.log.read_text()
        assert "domain-shift level ERROR" in log and "domain-shift level OK" in log
    finally:
        assert driver.close() == 0, driver.log.read_text()


def test_silent_camera_warns_then_errors_and_recovers(calibrated, ros_domain_id):
    work, model, _ = calibrated
    driver = Driver(work, model, ["silent_camera_warn_s:=0.6", "silent_camera_error_s:=1.5"])
    try:
        name = "input /cam/image"
        driver.send(1, day_frame(1))
        wait_for(lambda: (s := driver.latest(name)) is not None and s.level == DiagnosticStatus.OK
                 and s.message.startswith("receiving"), 10, "input OK, receiving")
        t0 = time.monotonic()
        wait_for(lambda: driver.latest(name).level == DiagnosticStatus.WARN, 10, "silent camera WARN")
        wait_for(lambda: driver.latest(name).level == DiagnosticStatus.ERROR, 10, "silent camera ERROR")
        assert time.monotonic() - t0 >= 1.0  # not before error_s (minus the first diagnostics period)
        status = driver.latest(name)
        assert "no frame on /cam/image" in status.message and float(values(status)["seconds_without_frame"]) >= 1.5
        # Uncalibrated: the figures are published and reported, the level stays OK.
        shift = driver.latest("domain shift /cam/image")
        assert shift.level == DiagnosticStatus.OK and "uncalibrated" in shift.message
        driver.send(2, day_frame(2))
        wait_for(lambda: driver.latest(name).level == DiagnosticStatus.OK, 10, "input OK again after a frame")
    finally:
        assert driver.close() == 0, driver.log.read_text()


def test_calibration_of_another_model_is_refused(calibrated, tmp_path, ros_domain_id):
    work, model, calibration = calibrated
    calibration.model = "another_model"
    calibration.save(tmp_path / "other.json")
    proc = start_node_process(["-p", f"model:={model}", "-p", f"monitor_calibration:={tmp_path / 'other.json'}"],
                              tmp_path / "log.txt")
    proc.wait(timeout=60)
    assert proc.returncode == 2
    assert "made for model another_model" in (tmp_path / "log.txt").read_text()
