"""Helpers for tests that talk to nodes over real DDS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


class Spinner:
    """Spin a node in a background thread."""

    def __init__(self, node: Node) -> None:
        self.executor = SingleThreadedExecutor(context=node.context)
        self.executor.add_node(node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # shutdown while spinning
            pass

    def stop(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.thread.join(timeout=2.0)


def start_node_process(args: list[str], log_path: Path) -> subprocess.Popen:
    """segment_node in its own process (as ``ros2 run`` would start it)."""
    env = dict(os.environ)
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "dgss_perception.node", "--ros-args", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Collector:
    """Keep every message received on a topic."""

    def __init__(self, node: Node, msg_type: Any, topic: str, qos: QoSProfile = RELIABLE) -> None:
        self.messages: list[Any] = []
        self.lock = threading.Lock()
        self.sub = node.create_subscription(msg_type, topic, self._on, qos)

    def _on(self, msg: Any) -> None:
        with self.lock:
            self.messages.append(msg)

    def find(self, predicate: Callable[[Any], bool]) -> Any | None:
        with self.lock:
            for m in self.messages:
                if predicate(m):
                    return m
        return None


def init_context() -> Any:
    context = rclpy.Context()
    rclpy.init(context=context)
    return context
