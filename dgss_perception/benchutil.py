"""Helpers shared by the benchmark command (``dgss-perception bench``) and the soak script.

Synthetic camera frames, percentiles, a description of the machine, and starting and stopping
``segment_node`` in a subprocess. No rclpy, psutil or torch here: the command line imports this
module whether or not a ROS 2 stack is present.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# The directory holding the dgss_perception package: put on the node's PYTHONPATH so a checkout
# that is not installed starts the same code as this process runs.
PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def make_frames(width: int, height: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """Rgb uint8 H×W×3 frames with smooth structure (gradients, blobs) plus noise, so the labels vary."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for _ in range(count):
        img = np.zeros((height, width, 3), np.float32)
        for c in range(3):
            fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * np.pi)
            img[:, :, c] = 127 + 100 * np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + phase)
        img += rng.normal(0, 12, img.shape).astype(np.float32)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile of values, by linear interpolation; NaN for none."""
    return float(np.percentile(values, q)) if values else float("nan")


def summarize_ms(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, p90, p99, mean, min, max and count of a list of milliseconds (None where empty)."""
    if not values:
        return {"median": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None, "count": 0}
    return {"median": round(percentile(values, 50), digits), "p90": round(percentile(values, 90), digits),
            "p99": round(percentile(values, 99), digits), "mean": round(float(np.mean(values)), digits),
            "min": round(float(min(values)), digits), "max": round(float(max(values)), digits),
            "count": len(values)}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_string() -> str:
    """Platform and CPU, e.g. 'Linux-6.8-x86_64 | AMD EPYC | 2 cores'."""
    return f"{platform.platform()} | {cpu_model()} | {os.cpu_count()} cores"


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs nvidia-smi lists; empty without one (or without the tool)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        out = subprocess.run([tool, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def device_info() -> dict[str, Any]:
    """The machine, for reports: platform, CPU model, logical cores (all and usable here), GPUs."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"summary": device_string(), "platform": platform.platform(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "cores_usable": usable, "gpus": gpu_names(), "python": platform.python_version()}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with this checkout's package first on PYTHONPATH."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
    return env


def start_node(params: list[str], namespace: str, log_path: Path, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
    """segment_node as ``ros2 run`` would start it, with ``-p`` parameters and a namespace.

    The package this module belongs to goes first on the child's PYTHONPATH, so a checkout
    runs its own node without being installed. ``env`` adds to this process's environment.
    Output goes to ``log_path``.
    """
    cmd = [sys.executable, "-m", "dgss_perception.node", "--ros-args", "-r", f"__ns:={namespace}"]
    for p in params:
        cmd += ["-p", p]
    log = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(env),
                                cwd=None if cwd is None else str(cwd))
    finally:
        log.close()  # the child holds its own descriptor


def stop_node(proc: subprocess.Popen, timeout: float = 20.0) -> int | None:
    """SIGINT (as Ctrl-C), then SIGKILL if it does not exit; the exit code, None when it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


def log_tail(path: Path | None, chars: int = 3000) -> str:
    """The last ``chars`` characters of a log file ('' when unreadable)."""
    if path is None:
        return ""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""
