"""Bag playback over real DDS into a subscriber in this process."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from rosgraph_msgs.msg import Clock
from rosutil import Spinner, init_context, wait_for
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from dgss_perception.bag import BagError
from dgss_perception.codec import encode_image_fields, encode_jpeg
from dgss_perception.play import add_parser, parse_remap, play_bag, run_play

TS = get_typestore(Stores.ROS2_HUMBLE)
T0 = 1_700_000_000_000_000_000
QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
TOPICS = {"/cam/image_raw": Image, "/cam/image_raw/compressed": CompressedImage, "/chatter": String}
ROOT = Path(__file__).resolve().parents[1]


def _write_bag(path: Path, storage: str, count: int = 4, period_ns: int = 100_000_000) -> None:
    """Images, JPEGs and strings interleaved, ``period_ns`` apart per topic."""
    header_t, time_t = TS.types["std_msgs/msg/Header"], TS.types["builtin_interfaces/msg/Time"]
    with Writer(path, version=8, storage_plugin=StoragePlugin[storage.upper()]) as writer:
        conns = {topic: writer.add_connection(topic, f"{cls.__module__.split('.')[0]}/msg/{cls.__name__}",
                                              typestore=TS) for topic, cls in TOPICS.items()}
        for k in range(count):
            t = T0 + k * period_ns
            header = header_t(stamp=time_t(sec=t // 10**9, nanosec=t % 10**9), frame_id=f"f{k}")
            rgb = np.full((13, 17, 3), 20 * k, np.uint8)
            image = TS.types["sensor_msgs/msg/Image"](header=header, **encode_image_fields(rgb, "rgb8"))
            jpeg = TS.types["sensor_msgs/msg/CompressedImage"](header=header, format="jpeg",
                                                               data=np.frombuffer(encode_jpeg(rgb), np.uint8))
            text = TS.types["std_msgs/msg/String"](data=f"message {k}")
            writer.write(conns["/cam/image_raw"], t, TS.serialize_cdr(image, "sensor_msgs/msg/Image"))
            writer.write(conns["/cam/image_raw/compressed"], t + 1_000,
                         TS.serialize_cdr(jpeg, "sensor_msgs/msg/CompressedImage"))
            writer.write(conns["/chatter"], t + 2_000, TS.serialize_cdr(text, "std_msgs/msg/String"))


def _bag_messages(path: Path) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    with Reader(path) as reader:
        for conn, _, raw in reader.messages():
            out.setdefault(conn.topic, []).append(bytes(raw))
    return out


class Listener:
    """A node in its own context keeping raw messages per topic and /clock stamps."""

    def __init__(self, topics: dict[str, Any]) -> None:
        self.context = init_context()
        self.node = rclpy.create_node("play_listener", context=self.context)
        self.lock = threading.Lock()
        self.raw: dict[str, list[bytes]] = {t: [] for t in topics}
        self.clock: list[int] = []
        for topic, cls in topics.items():
            self.node.create_subscription(cls, topic, lambda m, t=topic: self._on(t, m), QOS, raw=True)
        self.node.create_subscription(Clock, "/clock", self._on_clock, QOS)
        self.spinner = Spinner(self.node)

    def _on(self, topic: str, msg: bytes) -> None:
        with self.lock:
            self.raw[topic].append(msg)

    def _on_clock(self, msg: Clock) -> None:
        with self.lock:
            self.clock.append(msg.clock.sec * 10**9 + msg.clock.nanosec)

    def count(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.raw.values())

    def close(self) -> None:
        self.spinner.stop()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


@pytest.fixture
def listener(ros_domain_id: int) -> Iterator[Listener]:
    lst = Listener(TOPICS)
    yield lst
    lst.close()


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_all_messages_arrive_in_order(tmp_path: Path, storage: str, listener: Listener) -> None:
    bag = tmp_path / "bag"
    _write_bag(bag, storage)
    want = _bag_messages(bag)
    report = play_bag(bag, start_delay=1.0)

    total = sum(len(v) for v in want.values())
    wait_for(lambda: listener.count() >= total, 10.0, "all played messages")
    time.sleep(0.2)
    with listener.lock:
        assert listener.raw == want  # per topic: same order, byte-identical
        clock = list(listener.clock)
    assert report.messages_published == total and report.loops_completed == 1 and not report.interrupted
    assert report.per_topic == {t: len(v) for t, v in want.items()}
    assert clock and clock == sorted(clock) and clock[0] >= T0 and clock[-1] == T0 + 3 * 100_000_000 + 2_000
    assert not rclpy.ok()  # play_bag initialised rclpy itself, so it shut it down again


def test_rate_scaling_with_given_node(tmp_path: Path, listener: Listener) -> None:
    bag = tmp_path / "bag"
    _write_bag(bag, "mcap", count=5, period_ns=150_000_000)  # 0.6 s of bag time
    context = init_context()
    node = rclpy.create_node("player", context=context)
    try:
        t = time.monotonic()
        report = play_bag(bag, rate=2.0, node=node, start_delay=0.5, clock=False)
        elapsed = time.monotonic() - t - 0.5
        assert context.ok()  # a given node's rclpy is left running
        left = {name for name, _ in node.get_publisher_names_and_types_by_node("player", "/")}
        assert not left & set(TOPICS)  # its publishers are removed from the given node
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)
    expected = 0.6 / 2.0
    assert report.wall_time_s >= 0.8 * expected and elapsed >= 0.8 * expected
    assert report.wall_time_s < expected + 5.0
    assert report.clock_messages == 0
    wait_for(lambda: listener.count() >= 15, 10.0, "played messages")
    with listener.lock:
        assert not listener.clock


def test_loop_until_stopped_with_topics_and_remap(tmp_path: Path, ros_domain_id: int) -> None:
    bag = tmp_path / "bag"
    _write_bag(bag, "sqlite3", count=3, period_ns=20_000_000)
    lst = Listener({"/talk": String})
    stop = threading.Event()
    try:
        def stop_after_two_passes() -> None:
            wait_for(lambda: lst.count() >= 6, 20.0, "two passes")
            stop.set()

        stopper = threading.Thread(target=stop_after_two_passes, daemon=True)
        stopper.start()
        report = play_bag(bag, loop=True, topics=["/chatter"], remap={"/chatter": "/talk"}, start_delay=0.5,
                          stop_event=stop, rate=4.0)
        stopper.join(timeout=5)
        with lst.lock:
            texts = list(lst.raw["/talk"])
    finally:
        stop.set()
        lst.close()
    assert report.interrupted and report.loops_completed >= 2
    assert set(report.per_topic) == {"/talk"}
    want = _bag_messages(bag)["/chatter"]
    assert texts[:6] == want + want


def test_bad_arguments(tmp_path: Path, ros_domain_id: int) -> None:
    bag = tmp_path / "bag"
    _write_bag(bag, "mcap", count=1)
    with pytest.raises(BagError, match="not found"):
        play_bag(tmp_path / "missing")
    with pytest.raises(BagError, match="not in the bag"):
        play_bag(bag, topics=["/nope"])
    with pytest.raises(BagError, match="remap"):
        play_bag(bag, remap={"/nope": "/x"})
    with pytest.raises(ValueError, match="rate"):
        play_bag(bag, rate=0.0)
    with pytest.raises(ValueError, match="qos_reliability"):
        play_bag(bag, qos_reliability="sometimes")
    assert parse_remap(["/a:=/b", "/c:=/d"]) == {"/a": "/b", "/c": "/d"}
    with pytest.raises(ValueError):
        parse_remap(["/a=/b"])
    assert not rclpy.ok()


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dgss-perception")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["play", *argv])


def test_cli_exit_codes(tmp_path: Path, ros_domain_id: int, capsys: pytest.CaptureFixture[str]) -> None:
    bag = tmp_path / "bag"
    _write_bag(bag, "sqlite3", count=2, period_ns=10_000_000)
    for argv, match in (((str(tmp_path / "missing"),), "not found"),
                        ((str(bag), "--remap", "/chatter=/x"), "FROM:=TO"),
                        ((str(bag), "--rate", "-1"), "rate"),
                        ((str(bag), "--topics", "/nope"), "not in the bag")):
        args = _args(*argv)
        assert args.func(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    args = _args(str(bag), "--rate", "5", "--start-delay", "0.2", "--remap", "/chatter:=/talk", "--no-clock")
    assert run_play(args) == 0
    out = capsys.readouterr().out
    assert "published 6 messages" in out and "/talk: 2" in out
    assert not rclpy.ok()


def test_ctrl_c_stops_cleanly(tmp_path: Path, ros_domain_id: int) -> None:
    bag = tmp_path / "bag"
    _write_bag(bag, "mcap", count=3, period_ns=50_000_000)
    code = ("import argparse, sys; from dgss_perception.play import add_parser; "
            "p = argparse.ArgumentParser(); add_parser(p.add_subparsers(dest='c')); "
            "a = p.parse_args(sys.argv[1:]); print('ready', flush=True); sys.exit(a.func(a))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", code, "play", str(bag), "--loop", "--start-delay", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # a few passes
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "(interrupted)" in out and "Traceback" not in out, out


def test_wait_for_subscribers_holds_playback_until_someone_listens(tmp_path: Path, ros_domain_id: int) -> None:
    bag = tmp_path / "bag"
    _write_bag(bag, "mcap")
    want = _bag_messages(bag)
    result: dict[str, Any] = {}
    player = threading.Thread(target=lambda: result.update(
        report=play_bag(bag, start_delay=0.0, wait_for_subscribers=30.0)))
    player.start()
    time.sleep(1.5)  # the player is up and waiting; nobody listens yet
    assert player.is_alive()
    lst = Listener(TOPICS)
    try:
        wait_for(lambda: lst.count() >= sum(len(v) for v in want.values()), 30.0, "all played messages")
        player.join(timeout=10)
        with lst.lock:
            assert lst.raw == want
    finally:
        lst.close()
