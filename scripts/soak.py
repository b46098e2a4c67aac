#!/usr/bin/env python3
"""Soak test of segment_node at its maximum rate.

Starts segment_node in a subprocess (reliable input QoS, latest-frame-wins as always) and feeds it
frames from this process as fast as it takes them: the next frame goes out as soon as the labels of
the previous one arrive (``--inflight 1``, the default), so every frame is segmented and latency is
the node's end-to-end time without queueing. ``--inflight 2`` keeps a second frame waiting in the
node's latest-frame slot so the worker never idles on the round trip; but labels then often come back
in pairs, the two next frames go out a fraction of a millisecond apart, and the first is replaced
before the worker takes it (dropped, by design). On a 2-core machine that gained no throughput and
dropped about a fifth of the frames, so it is not the default.

Records the node's resident memory (RSS) after warm-up, periodically and at the end, the node's own
counters from /diagnostics, throughput and latency percentiles; prints a summary and writes JSON.

Exit status: 0 when the run is clean; 1 when RSS grew by ``--max-rss-growth`` percent or more after
warm-up, any frame was malformed or failed with an error, labels came back wrong, the counters do not
account for every frame, or the node did not survive or shut down cleanly; 2 when the node did not start.

Usage (from the repository root):
    .venv/bin/python scripts/soak.py --model DIR --frames 10000 [--width 640 --height 480]
        [--warmup 200] [--inflight 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import array
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout, the package need not be installed
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import rclpy  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from dgss_perception.benchutil import device_string, log_tail, make_frames, percentile, stop_node  # noqa: E402
from dgss_perception.benchutil import start_node as start_node_process  # noqa: E402

COUNTERS = ("received", "processed", "dropped", "malformed", "errors", "idle")
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
FIRST_STAMP = 1_000_000  # stamps identify frames; far from 0 so no default header is mistaken for one
POOL_SIZE = 8  # distinct frames cycled through: varied content without generating a frame per send


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="model package directory (holds card.json)")
    parser.add_argument("--frames", type=int, default=10000, help="frames to send, warm-up included")
    parser.add_argument("--warmup", type=int, default=200, help="first frames left out of the figures")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--inflight", type=int, default=1, choices=(1, 2),
                        help="frames outstanding at once (see the module docstring)")
    parser.add_argument("--backend", default="auto", help="node parameter backend: auto | onnx | torchscript")
    parser.add_argument("--namespace", default="/soak", help="namespace of the node under test")
    parser.add_argument("--sample-period", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--frame-timeout", type=float, default=30.0,
                        help="seconds to wait for a frame's labels before counting it lost")
    parser.add_argument("--stall-ms", type=float, default=1000.0,
                        help="list frames slower than this in the report, with where the time went")
    parser.add_argument("--max-rss-growth", type=float, default=5.0,
                        help="fail when RSS grows by this many percent or more after warm-up")
    parser.add_argument("--node-arg", action="append", default=[], metavar="NAME:=VALUE",
                        help="extra node parameter, e.g. --node-arg threads:=2 (repeatable)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--log", type=Path, help="node log file (default: a temporary file)")
    args = parser.parse_args(argv)
    if args.frames <= args.warmup:
        parser.error("--frames must exceed --warmup")
    if args.width < 1 or args.height < 1:
        parser.error("--width and --height must be positive")
    return args


def make_pool(width: int, height: int, count: int, seed: int = 0) -> list[array.array]:
    """rgb8 frames with smooth structure (gradients, blobs) plus noise, so the labels vary."""
    return [array.array("B", frame.tobytes()) for frame in make_frames(width, height, count, seed)]


@dataclass
class Run:
    """What the driver observed; filled by callbacks and the send loop."""

    width: int
    height: int
    status_name: str
    outstanding: dict[int, float] = field(default_factory=dict)  # stamp → publish time, while unanswered
    sent_at: dict[int, float] = field(default_factory=dict)  # stamp → publish time
    latencies_ms: dict[int, float] = field(default_factory=dict)  # stamp → publish → labels
    done_at: dict[int, float] = field(default_factory=dict)  # stamp → labels received
    lost: list[int] = field(default_factory=list)
    late: int = 0
    last_label: float = 0.0  # monotonic time of the latest labels, 0 before the first
    wrong_labels: int = 0
    diagnostics: dict[str, str] = field(default_factory=dict)
    diagnostics_count: int = 0
    # (time, frames received, frames processed) per diagnostics message: places a slow frame in the pipeline
    history: list[tuple[float, int, int]] = field(default_factory=list)

    def on_labels(self, msg: Image) -> None:
        now = time.monotonic()
        stamp = msg.header.stamp.sec
        sent = self.outstanding.pop(stamp, None)
        if sent is None:
            self.late += 1  # arrived after its timeout
            return
        if (msg.height, msg.width) != (self.height, self.width) or msg.encoding != "mono8" or \
                len(msg.data) != msg.height * msg.width or msg.header.frame_id != "soak_camera":
            self.wrong_labels += 1
        self.latencies_ms[stamp] = (now - sent) * 1e3
        self.done_at[stamp] = now
        self.last_label = now
        # The node never reorders frames: an older frame still outstanding was dropped (or failed).
        for older in [s for s in self.outstanding if s < stamp]:
            del self.outstanding[older]
            self.lost.append(older)

    def on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == self.status_name:
                self.diagnostics = {kv.key: kv.value for kv in status.values}
                self.diagnostics_count += 1
                self.history.append((time.monotonic(), int(self.diagnostics.get("frames_received", "0")),
                                     int(self.diagnostics.get("frames_processed", "0"))))

    def counters(self) -> dict[str, int]:
        return {c: int(self.diagnostics.get(f"frames_{c}", "0")) for c in COUNTERS}


def start_node(args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    """segment_node as ``ros2 run`` would start it, importable from the checkout."""
    params = [f"model:={args.model}", "qos_reliability:=reliable", "diagnostics_period:=0.5",
              f"backend:={args.backend}", *args.node_arg]
    return start_node_process(params, args.namespace, log_path, cwd=ROOT)


def soak(args: argparse.Namespace, proc: subprocess.Popen, run: Run, node: Any, executor: Any,
         publisher: Any) -> dict[str, Any]:
    """The send loop; returns timing and memory figures."""
    ps = psutil.Process(proc.pid)
    pool = make_pool(args.width, args.height, POOL_SIZE)
    step = args.width * 3
    samples: list[dict[str, float]] = []
    rss_warm: int | None = None
    t_warm: float | None = None
    sent = 0
    last_warm_stamp = FIRST_STAMP + args.warmup - 1
    t0 = time.monotonic()
    next_sample = next_report = t0
    while True:
        now = time.monotonic()
        while len(run.outstanding) < args.inflight and sent < args.frames:
            stamp = FIRST_STAMP + sent
            msg = Image(header=Header(stamp=Time(sec=stamp), frame_id="soak_camera"), height=args.height,
                        width=args.width, encoding="rgb8", is_bigendian=0, step=step, data=pool[sent % POOL_SIZE])
            run.outstanding[stamp] = run.sent_at[stamp] = time.monotonic()
            publisher.publish(msg)
            sent += 1
        if sent == args.frames and not run.outstanding:
            break
        executor.spin_once(timeout_sec=0.05)
        now = time.monotonic()
        if proc.poll() is not None:
            raise RuntimeError(f"segment_node exited with {proc.returncode} after {sent} frames:\n"
                               f"{log_tail(args.log)}")
        for stamp, t_sent in list(run.outstanding.items()):
            if now - t_sent > args.frame_timeout:
                del run.outstanding[stamp]
                run.lost.append(stamp)
        last_progress = run.last_label or t0
        if now - last_progress > 2 * args.frame_timeout:
            # Frames keep timing out one by one: the node is alive but not segmenting; stop rather than crawl on.
            raise RuntimeError(f"no labels for {now - last_progress:.0f} s after {sent} frames sent:\n"
                               f"{log_tail(args.log)}")
        if rss_warm is None and all(s > last_warm_stamp for s in run.outstanding) and sent > args.warmup:
            # Every warm-up frame is answered (or lost): the steady state starts here.
            rss_warm, t_warm = ps.memory_info().rss, now
        done = len(run.done_at)
        if now >= next_sample:
            samples.append({"t_s": round(now - t0, 2), "frames": done,
                            "rss_mb": round(ps.memory_info().rss / 2**20, 2)})
            next_sample = now + args.sample_period
        if now >= next_report:
            rate = done / (now - t0) if now > t0 else 0.0
            print(f"  {done}/{args.frames} frames, {rate:.1f} fps overall, RSS {ps.memory_info().rss / 2**20:.1f} MB",
                  flush=True)
            next_report = now + 10.0
    t_end = time.monotonic()
    rss_end = ps.memory_info().rss
    samples.append({"t_s": round(t_end - t0, 2), "frames": len(run.done_at), "rss_mb": round(rss_end / 2**20, 2)})
    return {"sent": sent, "t0": t0, "t_warm": t_warm, "t_end": t_end, "rss_warm": rss_warm, "rss_end": rss_end,
            "samples": samples}


def wait_for_counters(run: Run, executor: Any, sent: int, timeout: float = 10.0) -> bool:
    """Spin until the node's diagnostics count every sent frame, each in exactly one outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = run.counters()
        if c["received"] >= sent and c["received"] == sum(c[k] for k in COUNTERS if k != "received"):
            return True
        executor.spin_once(timeout_sec=0.1)
    return False


def stall_report(run: Run, threshold_ms: float) -> list[dict[str, Any]]:
    """Frames slower than ``threshold_ms``, with where the time went (to the diagnostics period's resolution).

    Frame n (from 0) is the node's (n+1)-th received and, without drops, (n+1)-th processed frame, so the
    first diagnostics message counting it tells when it reached the node and when the node was done with it.
    """
    stalls = []
    for stamp, latency in sorted(run.latencies_ms.items()):
        if latency < threshold_ms:
            continue
        n = stamp - FIRST_STAMP + 1
        t_pub, t_labels = run.sent_at[stamp], run.done_at[stamp]
        received = next((t for t, r, _ in run.history if r >= n), None)
        processed = next((t for t, _, p in run.history if p >= n), None)
        stalls.append({
            "stamp": stamp, "latency_ms": round(latency, 1),
            "counted_received_after_s": None if received is None else round(received - t_pub, 2),
            "counted_processed_after_s": None if processed is None else round(processed - t_pub, 2),
            "labels_after_s": round(t_labels - t_pub, 2),
        })
    return stalls


def build_report(args: argparse.Namespace, argv: list[str], run: Run, figures: dict[str, Any],
                 accounted: bool, node_exit: int | None, card: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the run, and the verdict with its reasons."""
    first_measured = FIRST_STAMP + args.warmup
    measured = sorted(s for s in run.done_at if s >= first_measured)
    lat = [run.latencies_ms[s] for s in measured]
    t_warm = figures["t_warm"] or figures["t_end"]
    span = (run.done_at[measured[-1]] - t_warm) if measured else 0.0
    counters = run.counters()
    rss_warm, rss_end = figures["rss_warm"], figures["rss_end"]
    growth = 100.0 * (rss_end - rss_warm) / rss_warm if rss_warm else float("nan")
    post = [s for s in figures["samples"] if s["t_s"] >= t_warm - figures["t0"]]
    slope = None
    if len(post) >= 3 and post[-1]["frames"] > post[0]["frames"]:
        # Least-squares RSS trend over the steady state, in MB per 1000 frames: a leak shows as a steady slope.
        fit = np.polyfit([s["frames"] for s in post], [s["rss_mb"] for s in post], 1)
        slope = round(float(fit[0]) * 1000, 3)
    reasons = []
    if counters["errors"] or counters["malformed"]:
        reasons.append(f"{counters['errors']} errors, {counters['malformed']} malformed frames")
    if not growth < args.max_rss_growth:
        reasons.append(f"RSS grew {growth:.2f}% after warm-up (limit {args.max_rss_growth}%)")
    if run.wrong_labels:
        reasons.append(f"{run.wrong_labels} label images of the wrong size, encoding or header")
    if not accounted:
        reasons.append(f"node counters do not account for the {figures['sent']} frames sent: {counters}")
    if len(run.done_at) + len(run.lost) != figures["sent"]:
        reasons.append(f"{figures['sent']} sent but {len(run.done_at)} answered and {len(run.lost)} lost")
    if node_exit != 0:
        reasons.append(f"node exit code {node_exit} on SIGINT (None: killed after not stopping)")
    d = run.diagnostics
    return {
        "device": device_string(),
        "backend": d.get("backend", "?"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "scripts/soak.py", *argv]),
        "model": {"dir": str(args.model), "name": card.get("name"),
                  "network": [card.get("input", {}).get("height"), card.get("input", {}).get("width")]},
        "frame": {"width": args.width, "height": args.height, "encoding": "rgb8"},
        "frames": {"requested": args.frames, "warmup": args.warmup, "sent": figures["sent"],
                   "labels_received": len(run.done_at), "lost": len(run.lost), "late": run.late,
                   "wrong_labels": run.wrong_labels, "measured": len(measured)},
        "inflight": args.inflight,
        "node_counters": counters,
        "node_diagnostics": {k: d.get(k) for k in ("rate_hz", "latency_median_ms", "latency_max_ms",
                                                   "inference_median_ms")},
        "throughput_fps": round(len(measured) / span, 2) if span > 0 else None,
        "duration_s": round(figures["t_end"] - figures["t0"], 2),
        "latency_ms": {"median": round(statistics.median(lat), 2) if lat else None,
                       "p90": round(percentile(lat, 90), 2), "p99": round(percentile(lat, 99), 2),
                       "max": round(max(lat), 2) if lat else None, "min": round(min(lat), 2) if lat else None},
        "rss_mb": {"after_warmup": round(rss_warm / 2**20, 2) if rss_warm else None,
                   "end": round(rss_end / 2**20, 2), "peak": max(s["rss_mb"] for s in figures["samples"]),
                   "growth_pct": round(growth, 3), "limit_pct": args.max_rss_growth,
                   "trend_mb_per_1000_frames": slope},
        "stall_threshold_ms": args.stall_ms,
        "stalls": stall_report(run, args.stall_ms),
        "rss_samples": figures["samples"],
        "node_exit_code": node_exit,
        "node_log": str(args.log),
        "passed": not reasons,
        "failures": reasons,
    }


def print_summary(r: dict[str, Any]) -> None:
    f, lat, rss, c = r["frames"], r["latency_ms"], r["rss_mb"], r["node_counters"]
    lines = [
        "",
        f"soak: {r['model']['name']} (network {r['model']['network'][1]}x{r['model']['network'][0]}), "
        f"{r['frame']['width']}x{r['frame']['height']} rgb8, backend {r['backend']}, {r['inflight']} in flight",
        f"  device      {r['device']}",
        f"  frames      sent {f['sent']}, labels {f['labels_received']}, lost {f['lost']}, "
        f"measured {f['measured']} after {f['warmup']} warm-up",
        f"  node        received {c['received']}, processed {c['processed']}, dropped {c['dropped']}, "
        f"malformed {c['malformed']}, errors {c['errors']}, idle {c['idle']}",
        f"  throughput  {r['throughput_fps']} frames/s over {r['duration_s']} s",
        f"  latency     median {lat['median']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms "
        "(publish → labels received)",
        f"  RSS         {rss['after_warmup']} MB after warm-up → {rss['end']} MB at the end "
        f"({rss['growth_pct']:+.2f}%, limit {rss['limit_pct']}%), peak {rss['peak']} MB, "
        f"trend {rss['trend_mb_per_1000_frames']} MB/1000 frames",
        f"  stalls      {len(r['stalls'])} frames slower than {r['stall_threshold_ms']:.0f} ms"
        + "".join(f"\n              stamp {st['stamp']}: {st['latency_ms']} ms (node counted it received after "
                  f"{st['counted_received_after_s']} s, processed after {st['counted_processed_after_s']} s)"
                  for st in r["stalls"][:10]),
        f"  node exit   {r['node_exit_code']}",
        "  result      " + ("PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"])),
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the soak; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # A domain of this run's own unless the caller chose one, so concurrent runs never cross-talk.
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    card_path = args.model / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    if args.log is None:
        args.log = Path(tempfile.mkstemp(prefix="soak_node_", suffix=".log")[1])
    print(f"soak: ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}, node log {args.log}", flush=True)

    proc = start_node(args, args.log)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("soak_driver", context=context)
    run = Run(args.width, args.height, f"{args.namespace.rstrip('/')}/segment_node: segmentation")
    publisher = node.create_publisher(Image, f"{args.namespace.rstrip('/')}/image", RELIABLE)
    # The node is lazy: it subscribes its input only once something subscribes to its labels.
    node.create_subscription(Image, f"{args.namespace.rstrip('/')}/labels", run.on_labels, RELIABLE)
    node.create_subscription(DiagnosticArray, "/diagnostics", run.on_diagnostics, RELIABLE)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    code = 0
    node_exit: int | None = None
    try:
        deadline = time.monotonic() + 120.0
        while not (publisher.get_subscription_count() > 0 and run.diagnostics_count > 0):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"soak: segment_node did not start:\n{log_tail(args.log)}", file=sys.stderr)
                return 2
            executor.spin_once(timeout_sec=0.1)
        figures = soak(args, proc, run, node, executor, publisher)
        accounted = wait_for_counters(run, executor, figures["sent"])
        node_exit = stop_node(proc)
        report = build_report(args, argv, run, figures, accounted, node_exit, card)
        print_summary(report)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"  report      {args.json}")
        code = 0 if report["passed"] else 1
    except RuntimeError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        code = 1
    finally:
        if node_exit is None:
            stop_node(proc)
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.shutdown(context=context)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
