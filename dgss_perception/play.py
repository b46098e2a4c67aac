"""Publish a rosbag2 bag over ROS 2, for machines without ``ros2 bag play``.

Messages are published as the serialized bytes stored in the bag (no
deserialization), at their recorded timing scaled by ``rate``: message i goes
out at wall time ``start + (t_i - t_0) / rate``, where t_0 is the bag time of
the first message played. With ``clock`` the bag time is published on
``/clock`` (rosgraph_msgs/Clock) before each message and at about 100 Hz in
between, so nodes with ``use_sim_time`` follow the bag.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rosbags.interfaces import Connection, ConnectionExtRosbag2, QosDurability
from rosbags.rosbag2 import Reader, ReaderError

from .bag import BagError

CLOCK_TOPIC = "/clock"
CLOCK_PERIOD_S = 0.01
RELIABILITIES = ("reliable", "best_effort")
# Deep enough that a reliable subscriber that briefly lags does not lose messages
# of a burst; acknowledged samples are freed, so memory only grows under backpressure.
QUEUE_DEPTH = 100
NODE_NAME = "dgss_bag_player"


@dataclass
class PlayReport:
    """What :func:`play_bag` published."""

    messages_published: int = 0
    per_topic: dict[str, int] = field(default_factory=dict)
    clock_messages: int = 0
    loops_completed: int = 0
    skipped_topics: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    wall_time_s: float = 0.0

    def summary(self) -> str:
        """A few human-readable lines."""
        state = " (interrupted)" if self.interrupted else ""
        lines = [f"published {self.messages_published} messages in {self.wall_time_s:.2f} s, "
                 f"{self.loops_completed} full pass(es){state}"]
        lines.extend(f"  {topic}: {count}" for topic, count in sorted(self.per_topic.items()))
        if self.clock_messages:
            lines.append(f"  {CLOCK_TOPIC}: {self.clock_messages}")
        lines.extend(f"  skipped {topic}: {why}" for topic, why in sorted(self.skipped_topics.items()))
        return "\n".join(lines)


def message_class(type_name: str) -> Any:
    """Import the Python class of a ROS message type named ``pkg/msg/Name``."""
    parts = type_name.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise BagError(f"cannot interpret message type name {type_name!r}")
    pkg, kind, name = parts
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError) as exc:
        raise BagError(f"message type {type_name} is not installed ({exc})") from exc


def parse_remap(items: list[str] | None) -> dict[str, str]:
    """``["FROM:=TO", ...]`` → ``{FROM: TO}``; raises ValueError on a malformed item."""
    remap: dict[str, str] = {}
    for item in items or []:
        src, sep, dst = item.partition(":=")
        if not sep or not src or not dst:
            raise ValueError(f"remap {item!r} is not of the form FROM:=TO")
        remap[src] = dst
    return remap


def open_bag(path: str | Path) -> Reader:
    """An opened rosbags Reader; raises BagError for a missing or unreadable bag."""
    bag = Path(path)
    if not bag.exists():
        raise BagError(f"bag not found: {bag}")
    try:
        reader = Reader(bag)
        reader.open()
    except (ReaderError, FileNotFoundError, OSError) as exc:
        raise BagError(f"cannot read bag {bag}: {exc}") from exc
    return reader


def _transient_local(conn: Connection) -> bool:
    # Latched topics (/tf_static, maps) must stay latched for late subscribers.
    profiles = conn.ext.offered_qos_profiles if isinstance(conn.ext, ConnectionExtRosbag2) else []
    return bool(profiles) and all(p.durability == QosDurability.TRANSIENT_LOCAL for p in profiles)


def _validate(rate: float, start_delay: float, qos_reliability: str) -> None:
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive number, got {rate}")
    if not (math.isfinite(start_delay) and start_delay >= 0):
        raise ValueError(f"start_delay must be >= 0, got {start_delay}")
    if qos_reliability not in RELIABILITIES:
        raise ValueError(f"qos_reliability must be one of {', '.join(RELIABILITIES)}, got {qos_reliability!r}")


class _Player:
    """Publishers and the timing loop of one :func:`play_bag` call."""

    def __init__(self, node: Any, reader: Reader, plan: dict[str, tuple[str, Any, bool]], *, rate: float,
                 clock: bool, reliability: str, should_stop: Callable[[], bool],
                 wait: Callable[[float], None], report: PlayReport) -> None:
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        self.node, self.reader, self.rate, self.report = node, reader, rate, report
        self.should_stop, self.wait = should_stop, wait
        rel = ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
        self.publishers: dict[str, Any] = {}
        self.out_topic: dict[str, str] = {}
        for topic, (out_topic, msg_cls, latched) in plan.items():
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=QUEUE_DEPTH, reliability=rel,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
            self.publishers[topic] = node.create_publisher(msg_cls, out_topic, qos)
            self.out_topic[topic] = out_topic
        self.clock_pub = None
        if clock:
            from builtin_interfaces.msg import Time
            from rosgraph_msgs.msg import Clock

            self._clock_cls, self._time_cls = Clock, Time
            # Reliable offers match both reliable and best-effort (rclpy's TimeSource) subscribers.
            self.clock_pub = node.create_publisher(
                Clock, CLOCK_TOPIC, QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self.connections = [c for c in reader.connections if c.topic in plan]

    def publish_clock(self, stamp_ns: int) -> None:
        if self.clock_pub is None:
            return
        msg = self._clock_cls(clock=self._time_cls(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000))
        self.clock_pub.publish(msg)
        self.report.clock_messages += 1

    def wait_until(self, target: float, start: float, t0: int, t_next: int) -> bool:
        """Sleep until wall time ``target`` publishing the clock; False when asked to stop."""
        last_clock = -math.inf
        while True:
            if self.should_stop():
                return False
            now = time.monotonic()
            if now >= target:
                return True
            if self.clock_pub is not None and now - last_clock >= CLOCK_PERIOD_S:
                self.publish_clock(min(t_next, t0 + int((now - start) * self.rate * 1e9)))
                last_clock = now
            self.wait(min(target - now, CLOCK_PERIOD_S))

    def play_once(self) -> tuple[bool, int]:
        """One pass over the bag: (finished without being stopped, messages published)."""
        start, t0, published = 0.0, 0, 0
        for conn, timestamp, raw in self.reader.messages(connections=self.connections):
            if published == 0:
                start, t0 = time.monotonic(), timestamp
            if not self.wait_until(start + (timestamp - t0) / 1e9 / self.rate, start, t0, timestamp):
                return False, published
            self.publish_clock(timestamp)
            # Publisher.publish takes serialized CDR as bytes (memoryview is not accepted).
            self.publishers[conn.topic].publish(raw if isinstance(raw, bytes) else bytes(raw))
            published += 1
            self.report.messages_published += 1
            out = self.out_topic[conn.topic]
            self.report.per_topic[out] = self.report.per_topic.get(out, 0) + 1
        return True, published

    def destroy(self, flush_timeout: float = 2.0) -> None:
        """Destroy the publishers, first letting reliable subscribers acknowledge what is in flight.

        Without the wait, the last messages of a bag are lost when the publisher goes away
        before the DDS layer delivered them.
        """
        from rclpy.duration import Duration

        for pub in [*self.publishers.values(), self.clock_pub]:
            if pub is not None:
                with suppress(Exception):
                    pub.wait_for_all_acked(Duration(seconds=flush_timeout))
                with suppress(Exception):
                    self.node.destroy_publisher(pub)


def _plan(reader: Reader, topics: list[str] | None, remap: dict[str, str], clock: bool,
          report: PlayReport) -> dict[str, tuple[str, Any, bool]]:
    """bag topic → (published topic, message class, latched); raises BagError on a bad selection."""
    by_topic: dict[str, list[Connection]] = {}
    for conn in reader.connections:
        by_topic.setdefault(conn.topic, []).append(conn)
    if topics is not None:
        missing = [t for t in topics if t not in by_topic]
        if missing:
            raise BagError(f"topic(s) {', '.join(missing)} not in the bag (it has: {', '.join(sorted(by_topic))})")
    unknown = [t for t in remap if t not in by_topic]
    if unknown:
        raise BagError(f"remap source(s) {', '.join(unknown)} not in the bag")
    selected = list(dict.fromkeys(topics)) if topics is not None else sorted(by_topic)
    plan: dict[str, tuple[str, Any, bool]] = {}
    out_types: dict[str, str] = {}
    for topic in selected:
        conns = by_topic[topic]
        msgtype = conns[0].msgtype
        if any(c.msgtype != msgtype for c in conns):
            raise BagError(f"topic {topic} carries several message types")
        try:
            msg_cls = message_class(msgtype)
        except BagError as exc:
            if topics is not None:
                raise
            # Playing the rest beats refusing the whole bag over one custom type.
            report.skipped_topics[topic] = str(exc)
            continue
        out = remap.get(topic, topic)
        if out_types.setdefault(out, msgtype) != msgtype:
            raise BagError(f"topic {out} would carry both {out_types[out]} and {msgtype}")
        if clock and out == CLOCK_TOPIC:
            raise BagError(f"the bag has its own {CLOCK_TOPIC}; play with --no-clock or remap it")
        plan[topic] = (out, msg_cls, all(_transient_local(c) for c in conns))
    return plan


def play_bag(path: str | Path, *, rate: float = 1.0, loop: bool = False, clock: bool = True,
             topics: list[str] | None = None, qos_reliability: str = "reliable", start_delay: float = 0.5,
             remap: dict[str, str] | None = None, node: Any = None,
             stop_event: threading.Event | None = None, wait_for_subscribers: float = 0.0) -> PlayReport:
    """Publish a bag's messages at their recorded timing (see the module docstring).

    Args:
        path: rosbag2 directory (or a single .db3/.mcap file).
        rate: playback speed factor (2.0 = twice as fast).
        loop: start over at the end until ``stop_event`` is set or Ctrl-C.
        clock: publish the bag time on ``/clock``.
        topics: bag topics to play (default: all).
        qos_reliability: ``reliable`` or ``best_effort`` for the message publishers.
        start_delay: seconds to wait after creating publishers so subscribers can match.
        wait_for_subscribers: wait up to this many seconds (before ``start_delay``) until every
            played topic has a subscriber, so no message goes out before anyone listens.
        remap: bag topic → published topic.
        node: an rclpy node to publish from; without one, a node is created (and rclpy
            initialised and shut down again if it was not running).
        stop_event: set it to stop playback early.

    Raises:
        BagError: missing or unreadable bag, unknown topic, conflicting remap.
        ValueError: bad rate, start_delay or qos_reliability.
    """
    _validate(rate, start_delay, qos_reliability)
    report = PlayReport()
    reader = open_bag(path)
    owns_init = False
    owns_node = node is None
    player: _Player | None = None
    began = time.monotonic()
    try:
        plan = _plan(reader, topics, remap or {}, clock, report)
        import rclpy

        if owns_node:
            if not rclpy.ok():
                rclpy.init()
                owns_init = True
            node = rclpy.create_node(NODE_NAME)
        context = node.context
        event = stop_event or threading.Event()

        def should_stop() -> bool:
            # rclpy's SIGINT handler shuts the context down; treat that like a stop request.
            return event.is_set() or not context.ok()

        player = _Player(node, reader, plan, rate=rate, clock=clock, reliability=qos_reliability,
                         should_stop=should_stop, wait=event.wait, report=report)
        deadline = time.monotonic() + wait_for_subscribers
        while (time.monotonic() < deadline and not should_stop()
               and any(pub.get_subscription_count() == 0 for pub in player.publishers.values())):
            event.wait(0.05)
        event.wait(start_delay)
        began = time.monotonic()
        while not should_stop():
            finished, published = player.play_once()
            if not finished:
                break
            report.loops_completed += 1
            if not loop or published == 0:
                break
        report.interrupted = should_stop()
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        report.wall_time_s = time.monotonic() - began
        if player is not None:
            player.destroy()
        if owns_node and node is not None:
            with suppress(Exception):
                node.destroy_node()
        if owns_init:
            import rclpy

            with suppress(Exception):
                if rclpy.ok():
                    rclpy.shutdown()
        reader.close()
    return report


# --- command line ----------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Add the ``play`` sub-command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "play", help="publish a rosbag2 bag over ROS 2 (serialized, at recorded timing)",
        description="Publish every message of a rosbag2 bag (sqlite3 or mcap) at its recorded timing, "
                    "with the bag time on /clock.")
    p.add_argument("bag", type=Path, help="bag directory")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    p.add_argument("--loop", action="store_true", help="start over at the end until Ctrl-C")
    p.add_argument("--no-clock", dest="clock", action="store_false", help="do not publish /clock")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="topics to play (default: all)")
    p.add_argument("--qos-reliability", choices=RELIABILITIES, default="reliable")
    p.add_argument("--start-delay", type=float, default=0.5,
                   help="seconds to wait for subscribers to match before playing (default 0.5)")
    p.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS until every played topic has a subscriber (default 0)")
    p.add_argument("--remap", nargs="+", metavar="FROM:=TO", help="publish bag topic FROM as TO")
    p.set_defaults(func=run_play)


def run_play(args: argparse.Namespace) -> int:
    """Run the ``play`` sub-command; 0 on success, 2 on bad input (one line on stderr)."""
    try:
        remap = parse_remap(args.remap)
        _validate(args.rate, args.start_delay, args.qos_reliability)
        open_bag(args.bag).close()  # refuse a bad bag before starting ROS
    except (BagError, ValueError) as exc:
        print(f"dgss-perception play: error: {exc}", file=sys.stderr)
        return 2

    import rclpy

    try:
        rclpy.init()
    except KeyboardInterrupt:
        return 130
    try:
        report = play_bag(args.bag, rate=args.rate, loop=args.loop, clock=args.clock, topics=args.topics,
                          qos_reliability=args.qos_reliability, start_delay=args.start_delay, remap=remap,
                          wait_for_subscribers=args.wait_for_subscribers)
    except (BagError, ValueError) as exc:
        print(f"dgss-perception play: error: {exc}", file=sys.stderr)
        return 2
    finally:
        with suppress(Exception):
            if rclpy.ok():
                rclpy.shutdown()
    print(report.summary())
    return 0
