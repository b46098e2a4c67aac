"""``dgss-perception bench``: how fast a model package runs, in the engine and in the node, against floors.

One run reports, for one package, backend and frame size (all times in milliseconds of wall
clock; percentiles by linear interpolation; frames are smooth random images, a pool of a few):

Engine stages, in this process, sequentially over ``--frames`` frames after ``--warmup``:
    decode       message fields → rgb array: ``codec.image_to_rgb`` (rgb8, bgr8; an rgb8 frame
                 in place, as the node) or ``codec.compressed_to_rgb`` (jpeg)
    preprocess   ``SegmentResult.timings_ms`` (resize to the network size)
    inference    ``SegmentResult.timings_ms`` (the graph or graphs)
    postprocess  ``SegmentResult.timings_ms`` (labels back to the frame size, straight into
                 the one message buffer refilled each frame, as the node)
    encode       labels → mono8 Image fields (``codec.encode_image_fields``)
    total        wall time of one whole iteration (the stages and the loop between them)
    throughput   frames / summed totals, in frames/s
    For coarse-to-fine packages also the mean number of windows refined per frame.

Node end to end over DDS (``--node``, the default): ``segment_node`` in a subprocess with the same
backend, device, threads and inference mode (reliable input QoS, ``lazy`` as by default), fed
from this process, which also receives the labels. After a closed-loop warm-up:
    max throughput   closed loop, the next frame goes out when the previous labels arrive:
                     frames / (last labels − first publish), and its latency
    latency at rate  ``--node-frames`` frames published every 1/``--rate`` s; latency =
                     publish → labels received here; labels received vs frames sent, and where
                     the others went: never reached the node (when the transport falls behind,
                     a reliable KEEP_LAST writer overwrites frames not yet acknowledged),
                     replaced in the node by a newer frame (it keeps only the newest), or
                     labels overwritten on the way back the same way
    node latency     the node's own ``latency_median_ms`` from /diagnostics: a message's receipt
                     in its subscription callback → its labels published, over its last
                     ``stats_window`` frames (set to ``--node-frames``: one phase), read once the
                     node has counted every frame of the closed loop
    node overhead    the node's ``overhead_median_ms`` (same diagnostics): per frame, its latency
                     − its inference, the median; also read after the fixed-rate phase
These are the two figures ros2_benchmark reports: max throughput (fps) and latency at 30 Hz.

Raw floor, measured in the same run: per frame the work any node must do at these sizes without
a model. View the message buffer as an array (``np.frombuffer`` + reshape; for jpeg, decoding it),
``cv2.resize`` to the network size (bilinear), resize a network-size uint8 label map to the
frame size (nearest, by the engine's own ``resize_labels``) straight into the buffer of a mono8
Image (one message refilled each frame, as the node does) and publish it (rclpy publisher,
reliable, one subscriber in another process, as the node's labels have). These steps run in the
subscription callback of frames that arrive over DDS from another process (a peer process sends
back each frame this process sends it) and are timed from the callback's start, as the node's
latency starts at receipt: a frame just received is not in the cache, as a frame built and
reused in this process is. The next frame goes out once the peer has the previous labels.
``overhead_ratio`` = node overhead / raw floor median. Both sides end at ``publish()`` returning,
so neither counts the delivery itself. Beside it: the same steps on messages built in this
process (``prebuilt_ms``) and that with the labels' subscriber in this process, where Fast DDS
skips its transport (``subscriber_in_process_ms``).

Compute floor: FLOPs per frame from the card's ``export.flops`` (``whole``; ``coarse``;
``coarse`` + mean windows refined × ``refine_per_window`` for coarse-to-fine; the card's windows ×
``window`` for slide), divided by the
device's matrix throughput for the package's precision: measured here (best of several large
matmuls: numpy fp32 on CPU, torch fp32/tf32/fp16/bf16 on CUDA) or ``--peak-gflops``. Ratio =
engine inference median / floor. A card without ``export.flops`` gives null figures.

Exit status: 0 when the run completed (a report, not a verdict); 2 for bad arguments, a missing
or unusable model package, or a ``--json`` path that exists; 1 when the node did not start or
produced no labels (the engine figures are still printed and written).
"""

from __future__ import annotations

import argparse
import array
import datetime
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np

from .benchutil import child_env, device_info, log_tail, make_frames, start_node, stop_node, summarize_ms
from .codec import MAX_PIXELS, compressed_to_rgb, encode_image_fields, encode_jpeg, image_to_rgb
from .engine import BACKENDS, PRECISIONS, device_arg, resize_labels
from .torch_export import COMPILE_MODES

ENCODINGS = ("rgb8", "bgr8", "jpeg")
# Environment that changes how DDS moves large messages; recorded in each report.
DDS_ENV = ("RMW_IMPLEMENTATION", "FASTDDS_BUILTIN_TRANSPORTS", "FASTDDS_DEFAULT_PROFILES_FILE",
           "FASTRTPS_DEFAULT_PROFILES_FILE", "CYCLONEDDS_URI", "ROS_LOCALHOST_ONLY", "ROS_AUTOMATIC_DISCOVERY_RANGE")
INFERENCE_MODES = ("whole", "coarse", "coarse_to_fine", "slide")
IO_BINDING = {"auto": None, "on": True, "off": False}  # --io-binding → Segmenter(io_binding=…)
STAGES = ("decode", "preprocess", "inference", "postprocess", "encode")
POOL_SIZE = 4  # distinct frames cycled through
JPEG_QUALITY = 90
NAMESPACE = "/bench"
FIRST_STAMP = 1_000_000  # header stamps (seconds) identify frames; far from 0, so no default header matches
NODE_WARMUP_MAX = 20  # closed-loop frames before the node's figures: its first frames at this size pay for setup
NODE_START_TIMEOUT_S = 120.0
FRAME_TIMEOUT_S = 60.0  # a frame's labels later than this: the node is not segmenting
FLOOR_WARMUP = 5
FLOOR_MATCH_TIMEOUT_S = 30.0
SCHEMA = "dgss_perception.bench/1"
# The CPU goal this run informs: node overhead per frame within this factor of the raw floor.
OVERHEAD_GOAL = 1.5


class BenchError(RuntimeError):
    """The node part of a run failed (did not start, died, or sent no labels); the message says why."""


# -- arguments ------------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> None:
    """Add the ``bench`` sub-command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "bench", help="benchmark a model package: engine stages, node over DDS, raw and compute floors",
        description="Time a model package stage by stage in the engine, end to end through segment_node "
                    "over DDS (max throughput and latency at a fixed input rate, as ros2_benchmark), and "
                    "against a raw floor and a compute floor measured in the same run.",
        epilog=(__doc__ or "").partition("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model package directory (holds card.json)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto | cpu | cuda | cuda:N (default auto); the report's backend.device_report says which "
                        "device, GPU and providers were taken")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="torchscript and pt2 arithmetic, in the engine and the node (default auto: the card's checked "
                        "GPU precision on a GPU, fp32 on the CPU); ONNX Runtime takes auto or the card's precision")
    p.add_argument("--torch-compile", choices=COMPILE_MODES, default="auto",
                   help="pt2 backend, in the engine and the node: none (eager), inductor (torch.compile at load) or "
                        "aoti (AOTInductor, compiled once and cached); default auto: inductor on a GPU, none on the "
                        "CPU")
    p.add_argument("--threads", type=int, default=0, help="CPU inference threads (0 = runtime default)")
    p.add_argument("--spin-wait", action="store_true",
                   help="let ONNX Runtime's CPU threads busy-wait between operators, in the engine and the node "
                        "(default: off, as the node's spin_wait parameter)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="ONNX Runtime's CUDA provider replays captured CUDA graphs, in the engine and the node "
                        "(as the node's cuda_graph parameter; the report says where it could not)")
    p.add_argument("--io-binding", choices=IO_BINDING, default="auto",
                   help="ONNX Runtime IO binding (default auto: on for CUDA/TensorRT, off on CPU)")
    p.add_argument("--inference-mode", choices=INFERENCE_MODES, default=None,
                   help="inference mode where the package offers it (default: the card's)")
    p.add_argument("--width", type=int, default=1920, help="frame width (default 1920)")
    p.add_argument("--height", type=int, default=1080, help="frame height (default 1080)")
    p.add_argument("--encoding", choices=ENCODINGS, default="rgb8",
                   help="input: sensor_msgs/Image rgb8 or bgr8, or CompressedImage jpeg (default rgb8)")
    p.add_argument("--frames", type=int, default=200, help="engine frames measured (default 200)")
    p.add_argument("--warmup", type=int, default=20,
                   help=f"engine frames before measuring; the node gets min(this, {NODE_WARMUP_MAX}) (default 20)")
    p.add_argument("--node", action=argparse.BooleanOptionalAction, default=True,
                   help="also run segment_node over DDS (default: yes)")
    p.add_argument("--rate", type=float, default=30.0, help="node input rate in Hz for latency (default 30)")
    p.add_argument("--node-frames", type=int, default=200, help="frames per node phase (default 200)")
    p.add_argument("--peak-gflops", type=float, default=None, metavar="X",
                   help="device matrix throughput in GFLOP/s for the package's precision (default: measure)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json",
                   help="write the report here (never overwrites)")
    p.set_defaults(func=run_bench)


def _check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first bad argument."""
    checks = [
        (args.frames >= 1, f"--frames must be ≥ 1, got {args.frames}"),
        (args.warmup >= 0, f"--warmup must be ≥ 0, got {args.warmup}"),
        (args.width >= 1 and args.height >= 1,
         f"--width and --height must be positive, got {args.width}x{args.height}"),
        (args.width * args.height <= MAX_PIXELS, f"frame {args.width}x{args.height} is larger than the node accepts"),
        (args.threads >= 0, f"--threads must be ≥ 0, got {args.threads}"),
        (math.isfinite(args.rate) and args.rate > 0, f"--rate must be positive, got {args.rate}"),
        (args.node_frames >= 1, f"--node-frames must be ≥ 1, got {args.node_frames}"),
        (args.peak_gflops is None or (math.isfinite(args.peak_gflops) and args.peak_gflops > 0),
         f"--peak-gflops must be positive, got {args.peak_gflops}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if args.json is not None and (args.json.exists() or args.json.is_symlink()):
        raise FileExistsError(f"{args.json} exists; choose another path (a report is never overwritten)")


def command_line(args: argparse.Namespace) -> str:
    """The run as one explicit command line, defaults included, so a report says exactly what ran."""
    parts = ["dgss-perception", "bench", "--model", str(args.model), "--backend", args.backend, "--device",
             args.device, "--precision", args.precision, "--torch-compile", args.torch_compile, "--threads",
             str(args.threads), "--io-binding", args.io_binding]
    if args.spin_wait:
        parts.append("--spin-wait")
    if args.cuda_graph:
        parts.append("--cuda-graph")
    if args.inference_mode:
        parts += ["--inference-mode", args.inference_mode]
    parts += ["--width", str(args.width), "--height", str(args.height), "--encoding", args.encoding,
              "--frames", str(args.frames), "--warmup", str(args.warmup), "--node" if args.node else "--no-node"]
    if args.node:
        parts += ["--rate", f"{args.rate:g}", "--node-frames", str(args.node_frames)]
    if args.peak_gflops is not None:
        parts += ["--peak-gflops", f"{args.peak_gflops:g}"]
    if args.json is not None:
        parts += ["--json", str(args.json)]
    return shlex.join(parts)


# -- engine ---------------------------------------------------------------------------------------------
def frame_messages(frames: list[np.ndarray], encoding: str) -> list[SimpleNamespace]:
    """The fields of sensor_msgs Image (rgb8, bgr8) or CompressedImage (jpeg) messages for frames, without rclpy.

    ``data`` is an ``array.array('B')``, the type rclpy hands a subscription callback.
    """
    messages = []
    for rgb in frames:
        if encoding == "jpeg":
            messages.append(SimpleNamespace(format="jpeg", data=array.array("B", encode_jpeg(rgb, JPEG_QUALITY))))
            continue
        pixels = rgb if encoding == "rgb8" else np.ascontiguousarray(rgb[:, :, ::-1])
        height, width = rgb.shape[:2]
        messages.append(SimpleNamespace(height=height, width=width, encoding=encoding, is_bigendian=0,
                                        step=width * 3, data=array.array("B", pixels.tobytes())))
    return messages


def bench_engine(segmenter: Any, messages: list[Any], encoding: str, frames: int, warmup: int) -> dict[str, Any]:
    """Decode → segment → encode, sequentially, as the node does; per-stage and total times of the measured frames."""
    # As the node: an rgb8 frame is used in place, and the labels go straight into one message buffer.
    decode = compressed_to_rgb if encoding == "jpeg" else functools.partial(image_to_rgb, copy=False)
    times: dict[str, list[float]] = {s: [] for s in (*STAGES, "total")}
    windows: list[int] = []
    perf = time.perf_counter
    buffer = array.array("B")
    for i in range(warmup + frames):
        msg = messages[i % len(messages)]
        t0 = perf()
        rgb = decode(msg)
        t1 = perf()
        size = segmenter.output_size(rgb.shape[:2])
        out = np.frombuffer(buffer, np.uint8).reshape(size) if len(buffer) == size[0] * size[1] else None
        result = segmenter.segment(rgb, out=out)
        t2 = perf()
        fields = encode_image_fields(result.labels, "mono8")
        if out is None:  # the first frame: the message buffer the later ones are written into
            buffer = array.array("B")
            buffer.frombytes(fields["data"].data)
        t3 = perf()
        if i < warmup:
            continue
        times["decode"].append((t1 - t0) * 1e3)
        for stage in ("preprocess", "inference", "postprocess"):
            times[stage].append(result.timings_ms[stage])
        times["encode"].append((t3 - t2) * 1e3)
        times["total"].append((t3 - t0) * 1e3)
        windows.append(result.windows_refined)
    spent_s = sum(times["total"]) / 1e3
    report: dict[str, Any] = {
        "frames": frames, "warmup": warmup,
        "stages_ms": {s: summarize_ms(times[s]) for s in (*STAGES, "total")},
        "throughput_fps": round(frames / spent_s, 3) if spent_s > 0 else None,
        "windows_refined_mean": None, "windows_per_frame": None,
    }
    if segmenter.mode == "coarse_to_fine":
        report["windows_refined_mean"] = round(float(np.mean(windows)), 3)
        report["windows_per_frame"] = len(segmenter.card.inference_params.get("windows", []))
    return report


# -- compute floor --------------------------------------------------------------------------------------
def flops_per_frame(export: dict[str, Any], mode: str, windows_refined_mean: float | None,
                    slide_windows: int | None = None) -> dict[str, Any] | None:
    """FLOPs one frame costs from the card's ``export.flops``; None when the card does not say.

    ``whole`` and ``coarse`` read their graph's figure (for a package of a fixed batch of N, the
    FLOPs of the whole batch: a single frame runs in a padded batch); ``coarse_to_fine`` is ``coarse``
    plus the mean number of windows refined times ``refine_per_window``; ``slide`` is the number of
    windows of a frame (``slide_windows``) times ``window``, the graph's cost per window.
    """
    flops = export.get("flops")
    if not isinstance(flops, dict):
        return None

    def value(key: str) -> float | None:
        v = flops.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        return float(v) if ok else None

    if mode in ("whole", "coarse"):
        total = value(mode)
        if total is None:
            return None
        terms = {mode: total}
        if isinstance(flops.get("batch"), int) and flops["batch"] > 1:
            terms["batch"] = flops["batch"]  # one frame runs the whole fixed batch: it costs all of it
        return {"total": total, "terms": terms}
    if mode == "slide":
        window = value("window")
        if window is None or not slide_windows:
            return None
        return {"total": window * slide_windows, "terms": {"window": window, "windows": slide_windows}}
    coarse, refine = value("coarse"), value("refine_per_window")
    if coarse is None or refine is None or windows_refined_mean is None:
        return None
    return {"total": coarse + windows_refined_mean * refine,
            "terms": {"coarse": coarse, "refine_per_window": refine, "windows_refined_mean": windows_refined_mean}}


# A one-node ONNX graph c = a @ b with symbolic sizes (IR 7, opset 13), serialized once with onnx.helper:
# the runtime measures its own GEMM without needing the onnx package.
_MATMUL_ONNX = (b'\x08\x07\x12\x0fdgss_perception:`\n\x11\n\x01a\n\x01b\x12\x01c"\x06MatMul\x12\x06matmulZ\x15'
                b'\n\x01a\x12\x10\n\x0e\x08\x01\x12\n\n\x03\x12\x01m\n\x03\x12\x01kZ\x15\n\x01b\x12\x10\n\x0e\x08\x01'
                b'\x12\n\n\x03\x12\x01k\n\x03\x12\x01nb\x15\n\x01c\x12\x10\n\x0e\x08\x01\x12\n\n\x03\x12\x01m\n'
                b'\x03\x12\x01nB\x04\n\x00\x10\r')


def _best_seconds(run: Any, budget_s: float, tries: int = 20) -> float:
    """Fastest of several calls of ``run`` after one warm-up, within about ``budget_s``."""
    run()  # warm-up: thread pools and caches
    best = math.inf
    start = time.perf_counter()
    for i in range(tries):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return best


def measure_peak_gflops(device: str, size: int | None = None, budget_s: float = 1.5) -> dict[str, float]:
    """Matrix throughput of the device in GFLOP/s per precision: the best of several square matmuls.

    cpu: fp32, the faster of numpy's BLAS and ONNX Runtime's own GEMM (MLAS, which the CPU backend
    runs; on this project's 2-core test VM it is ~1.8× numpy's), ``size`` 2048 by default.
    cuda, cuda:N: torch fp32 (TF32 off), tf32, fp16 and bf16 on that GPU, ``size`` 8192 by default; empty
    when torch sees no CUDA device.
    """
    if device.startswith("cuda"):
        return _peak_cuda(size or 8192, budget_s, device)
    n = size or 2048
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty_like(a)
    best = _best_seconds(lambda: np.matmul(a, b, out=out), budget_s / 2)
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(_MATMUL_ONNX, providers=["CPUExecutionProvider"])
        best = min(best, _best_seconds(lambda: session.run(None, {"a": a, "b": b}), budget_s / 2))
    except Exception:  # noqa: BLE001 - numpy's figure stands when ONNX Runtime cannot run the graph
        pass
    return {"fp32": round(2.0 * n ** 3 / best / 1e9, 2)}


def _peak_cuda(n: int, budget_s: float, device: str = "cuda") -> dict[str, float]:
    try:
        import torch  # only here: the runtime never needs torch otherwise
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    results: dict[str, float] = {}
    saved = torch.backends.cuda.matmul.allow_tf32
    # Events record on the current GPU's stream: make it the measured one.
    with torch.cuda.device(torch.device(device)):
        try:
            for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                                      ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                a = torch.randn(n, n, device=device, dtype=dtype)
                b = torch.randn(n, n, device=device, dtype=dtype)
                torch.matmul(a, b)
                torch.cuda.synchronize(device)
                best = math.inf
                start = time.perf_counter()
                for i in range(10):
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    for _ in range(5):  # several per timing: one launch is too short to time alone
                        torch.matmul(a, b)
                    end.record()
                    end.synchronize()
                    best = min(best, begin.elapsed_time(end) / 1e3 / 5)
                    if i >= 2 and time.perf_counter() - start > budget_s:
                        break
                results[name] = round(2.0 * n ** 3 / best / 1e9, 2)
                del a, b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
    return results


def compute_floor(card: Any, mode: str, engine: dict[str, Any], device: str,
                  peak_given: float | None, precision: str | None = None) -> dict[str, Any]:
    """FLOPs per frame, the device's peak and the floor they give, against the engine's inference median.

    ``precision``: the arithmetic the engine ran at (bf16 under the torchscript backend's autocast; default
    the card's), whose peak sets the floor.
    """
    windows = card.inference_params.get("windows") if mode == "slide" else None
    flops = flops_per_frame(card.export, mode, engine["windows_refined_mean"], len(windows) if windows else None)
    precision = precision or card.precision
    if peak_given is not None:
        peaks, source = {precision: peak_given}, "given"
    else:
        peaks, source = measure_peak_gflops(device), "measured"
    peak = peaks.get(precision)
    model_ms = engine["stages_ms"]["inference"]["median"]
    floor_ms = flops["total"] / (peak * 1e9) * 1e3 if flops and peak else None
    return {
        "flops_per_frame": None if flops is None else flops["total"],
        "flops_terms": None if flops is None else flops["terms"],
        "flops_note": None if flops is not None else "the card's export section has no usable 'flops' for this mode",
        "flops_convention": card.export.get("flops_convention"),
        "device": device, "precision": precision, "peak_gflops": peaks, "peak_source": source,
        "peak_gflops_used": peak,
        "floor_ms": None if floor_ms is None else round(floor_ms, 4),
        "model_ms": model_ms,
        "ratio": round(model_ms / floor_ms, 2) if floor_ms and model_ms is not None else None,
    }


# -- rclpy parts: raw floor and node ----------------------------------------------------------------------
def ros_messages(frames: list[np.ndarray], encoding: str) -> list[Any]:
    """rclpy Image (rgb8, bgr8) or CompressedImage (jpeg) messages for frames; stamps are set when sent."""
    from sensor_msgs.msg import CompressedImage, Image

    messages = []
    for fields in frame_messages(frames, encoding):
        if encoding == "jpeg":
            msg = CompressedImage(format=fields.format)
        else:
            msg = Image(height=fields.height, width=fields.width, encoding=fields.encoding, is_bigendian=0,
                        step=fields.step)
        msg.data = fields.data
        msg.header.frame_id = "bench_camera"
        messages.append(msg)
    return messages


def bench_raw_floor(context: Any, messages: list[Any], encoding: str, width: int, height: int,
                    network: tuple[int, int], frames: int, domain_id: int) -> dict[str, Any]:
    """The raw floor per frame (see the module docstring), over ``frames`` frames after a short warm-up each.

    Its steps are timed three ways, one frame in flight each: on frames received over DDS from another
    process in the subscription callback, from its start (as the node's latency starts at receipt) — the
    figure the node is held to; on messages built in this process (``prebuilt_ms``, warm in cache, which
    received frames never are); and the latter with the labels' subscriber in this process, which Fast
    DDS serves without its transport (``subscriber_in_process_ms``). The labels go to a subscriber in
    another process in the first two, as the node's do.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import Header

    from .node import image_message

    node = rclpy.create_node("bench_floor", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    qos = _reliable()
    net_h, net_w = network
    labels = np.random.default_rng(1).integers(0, 19, size=(net_h, net_w), dtype=np.uint8)
    perf = time.perf_counter
    label_msg: list[Any] = [None]  # the one label message, refilled each frame

    def steps(msg: Any, publisher: Any) -> None:
        if encoding == "jpeg":
            pixels = cv2.imdecode(np.frombuffer(msg.data, np.uint8), cv2.IMREAD_COLOR)
        else:
            pixels = np.frombuffer(msg.data, np.uint8).reshape(height, width, 3)
        cv2.resize(pixels, (net_w, net_h), interpolation=cv2.INTER_LINEAR)
        # As the node: the labels are resized straight into the last published message's buffer.
        sent = label_msg[0]
        out = None if sent is None else np.frombuffer(sent.data, np.uint8).reshape(height, width)
        full = resize_labels(labels, (height, width), out)
        label_msg[0] = image_message(msg.header, full, "mono8", sent)
        publisher.publish(label_msg[0])

    def timed_steps(publisher: Any, times: list[float]) -> Any:
        """A handler of one frame: ``steps`` on it, their time appended to ``times``."""
        def handle(msg: Any) -> None:
            t0 = perf()
            steps(msg, publisher)
            times.append((perf() - t0) * 1e3)
        return handle

    def wait_for(done: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if peer_proc is not None and peer_proc.poll() is not None:
                raise BenchError(f"the raw floor's peer process exited with {peer_proc.returncode}:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError(what + (f":\n{log_tail(log)}" if peer_proc is not None else ""))
            executor.spin_once(timeout_sec=0.05)

    def drive(send: Any, delivered: list[int], publishers: list[Any]) -> None:
        """``send`` each frame, the next once ``delivered`` counts the previous one's labels."""
        # A fresh interpreter importing rclpy and discovering on a loaded small machine: allow it time.
        wait_for(lambda: all(p.get_subscription_count() > 0 for p in publishers),
                 f"the raw floor's subscribers did not match within {FLOOR_MATCH_TIMEOUT_S:.0f} s",
                 FLOOR_MATCH_TIMEOUT_S)
        delivered[0] = 0
        for i in range(FLOOR_WARMUP + frames):
            send(messages[i % len(messages)])
            # One frame in flight, as the node's closed loop: the transport's background work for this frame
            # (and the subscriber taking it) ends outside the timed part instead of slowing the next frame.
            # A lost frame or acknowledgement would make every later wait time out too.
            wait_for(lambda: delivered[0] > i, f"the raw floor's subscriber received {delivered[0]} of {i + 1} "
                     "frames within 5 s of the last", 5.0)

    here, there = [0], [0]
    in_process: list[float] = []
    prebuilt: list[float] = []
    over_dds: list[float] = []
    peer_proc = None
    fd, log_name = tempfile.mkstemp(prefix="bench_floor_peer_", suffix=".log")
    os.close(fd)
    log = Path(log_name)
    failed = True
    try:
        topic = f"{NAMESPACE}_floor/labels"
        publisher = node.create_publisher(Image, topic, qos)
        node.create_subscription(Image, topic, lambda _: here.__setitem__(0, here[0] + 1), qos)
        drive(timed_steps(publisher, in_process), here, [publisher])
        peer = f"{NAMESPACE}_floor/peer"
        to_peer = node.create_publisher(Image, f"{peer}/labels", qos)
        node.create_subscription(Header, f"{peer}/labels_received", lambda _: there.__setitem__(0, there[0] + 1), qos)
        frame_type, suffix = (CompressedImage, "/compressed") if encoding == "jpeg" else (Image, "")
        # Frames the peer sends back: the steps run, timed, in their subscription callback.
        node.create_subscription(frame_type, f"{peer}/echo{suffix}", timed_steps(to_peer, over_dds), qos)
        source = node.create_publisher(frame_type, f"{peer}/image{suffix}", qos)
        with open(log, "w") as out:
            peer_proc = subprocess.Popen(floor_peer_command(peer, encoding == "jpeg"),
                                         env=child_env({"ROS_DOMAIN_ID": str(domain_id)}), stdout=out,
                                         stderr=subprocess.STDOUT)
        drive(timed_steps(to_peer, prebuilt), there, [to_peer])
        drive(source.publish, there, [to_peer, source])
        failed = False
    finally:
        if peer_proc is not None:
            stop_node(peer_proc)
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        if not failed:
            log.unlink(missing_ok=True)  # kept only when something went wrong
    first = "decode the jpeg" if encoding == "jpeg" else "view the message buffer (np.frombuffer, reshape)"
    over_dds, prebuilt, in_process = (t[FLOOR_WARMUP:] for t in (over_dds, prebuilt, in_process))
    return {"frames": frames, "warmup": FLOOR_WARMUP, "ms": summarize_ms(over_dds),
            "steps": [f"{first}, in the subscription callback of a frame received from another process",
                      f"cv2.resize to the network size {net_w}x{net_h} (bilinear)",
                      f"resize a {net_w}x{net_h} uint8 label map to {width}x{height} (nearest, engine.resize_labels) "
                      "straight into the buffer of the one mono8 Image refilled each frame, as the node does",
                      "publish it (reliable, one subscriber in another process, as the node's labels)"],
            "published": FLOOR_WARMUP + frames, "delivered": there[0],
            "prebuilt_ms": summarize_ms(prebuilt), "subscriber_in_process_ms": summarize_ms(in_process)}


def floor_peer_command(prefix: str, compressed: bool) -> list[str]:
    """The command line of the raw floor's peer process (:func:`floor_peer`)."""
    return [sys.executable, "-m", "dgss_perception.bench", "--floor-peer", prefix] + (["--compressed"] * compressed)


def floor_peer(prefix: str, compressed: bool = False) -> int:
    """The raw floor's peer in another process.

    Acknowledges each label image on ``<prefix>/labels`` with its header on ``<prefix>/labels_received``
    and sends each frame on ``<prefix>/image`` (``image/compressed``) back on ``<prefix>/echo``
    (``echo/compressed``), so the bench receives frames from another process as the node does.
    """
    import rclpy
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import Header

    from .node import until_stopped

    rclpy.init()
    node = rclpy.create_node("bench_floor_peer")
    parent = os.getppid()
    frame_type, suffix = (CompressedImage, "/compressed") if compressed else (Image, "")

    def serve() -> int:
        ack = node.create_publisher(Header, f"{prefix}/labels_received", _reliable())
        echo = node.create_publisher(frame_type, f"{prefix}/echo{suffix}", _reliable())
        # Subscribed only once what they send has a reader: a message sent before that is lost.
        while ack.get_subscription_count() < 1 or echo.get_subscription_count() < 1:
            if os.getppid() != parent:
                return 1
            rclpy.spin_once(node, timeout_sec=0.05)
        node.create_subscription(Image, f"{prefix}/labels", lambda msg: ack.publish(msg.header), _reliable())
        node.create_subscription(frame_type, f"{prefix}/image{suffix}", echo.publish, _reliable())

        def orphaned() -> None:  # the bench was killed without stopping this process
            if os.getppid() != parent:
                raise SystemExit(1)

        node.create_timer(1.0, orphaned)
        rclpy.spin(node)
        return 0

    try:
        code = until_stopped(serve)
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0 if code is None else code


def _reliable() -> Any:
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


DIAG_FLOATS = ("rate_hz", "latency_median_ms", "latency_max_ms", "inference_median_ms", "overhead_median_ms",
               "batch_mean", "windows_refined_share")
COUNTERS = ("received", "processed", "dropped", "malformed", "errors", "idle")


def parse_diagnostics(values: dict[str, str]) -> dict[str, Any]:
    """The node's diagnostics key/values with numbers as numbers ('nan' → None)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in DIAG_FLOATS:
            number = float(value)
            out[key] = None if math.isnan(number) else number
        elif key.startswith("frames_") or key == "stats_frames":
            out[key] = int(value)
        else:
            out[key] = value
    return out


class NodeDriver:
    """This process's side of the node run: publishes frames, receives labels and diagnostics."""

    def __init__(self, context: Any, proc: Any, log: Path, messages: list[Any], encoding: str,
                 width: int, height: int) -> None:
        import rclpy
        from builtin_interfaces.msg import Time
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import CompressedImage, Image

        self.proc, self.log, self.messages = proc, log, messages
        self.size = (height, width)
        self.time_type = Time
        self.node = rclpy.create_node("bench_driver", context=context)
        qos = _reliable()
        in_type, suffix = (CompressedImage, "image/compressed") if encoding == "jpeg" else (Image, "image")
        self.publisher = self.node.create_publisher(in_type, f"{NAMESPACE}/{suffix}", qos)
        # The node is lazy: it subscribes its input once something subscribes to its labels.
        self.node.create_subscription(Image, f"{NAMESPACE}/labels", self._on_labels, qos)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, qos)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.status_name = f"{NAMESPACE}/segment_node: segmentation"
        self.next_stamp = FIRST_STAMP
        self.sent_at: dict[int, float] = {}
        self.outstanding: set[int] = set()
        self.latency_ms: dict[int, float] = {}
        self.done_at: dict[int, float] = {}
        self.wrong_labels = 0
        self.diagnostics: dict[str, str] = {}
        self.diagnostics_count = 0

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()

    # callbacks
    def _on_labels(self, msg: Any) -> None:
        now = time.monotonic()
        stamp = msg.header.stamp.sec
        if stamp not in self.outstanding:
            return
        self.outstanding.discard(stamp)
        if (msg.height, msg.width) != self.size or msg.encoding != "mono8":
            self.wrong_labels += 1
        self.latency_ms[stamp] = (now - self.sent_at[stamp]) * 1e3
        self.done_at[stamp] = now
        # The node never reorders frames: an older frame still unanswered never will be (replaced in the
        # node, or overwritten on the way there or back).
        self.outstanding = {s for s in self.outstanding if s > stamp}

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if status.name == self.status_name:
                self.diagnostics = {kv.key: kv.value for kv in status.values}
                self.diagnostics_count += 1

    # driving
    def _spin(self, timeout: float) -> None:
        self.executor.spin_once(timeout_sec=max(0.0, timeout))
        if self.proc.poll() is not None:
            raise BenchError(f"segment_node exited with {self.proc.returncode}:\n{log_tail(self.log)}")

    def wait_ready(self, timeout: float = NODE_START_TIMEOUT_S) -> None:
        """Until the node subscribes our input and has published diagnostics."""
        deadline = time.monotonic() + timeout
        while not (self.publisher.get_subscription_count() > 0 and self.diagnostics_count > 0):
            if time.monotonic() > deadline:
                raise BenchError(f"segment_node did not start within {timeout:.0f} s:\n{log_tail(self.log)}")
            self._spin(0.1)

    def send(self) -> int:
        stamp = self.next_stamp
        self.next_stamp += 1
        msg = self.messages[stamp % len(self.messages)]
        msg.header.stamp = self.time_type(sec=stamp)
        self.outstanding.add(stamp)
        self.sent_at[stamp] = time.monotonic()
        self.publisher.publish(msg)
        return stamp

    def _wait_answered(self, stamp: int, timeout: float = FRAME_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while stamp in self.outstanding:
            if time.monotonic() > deadline:
                got = "no labels at all" if not self.done_at else f"labels for {len(self.done_at)} earlier frames"
                raise BenchError(f"no labels for frame {stamp - FIRST_STAMP} within {timeout:.0f} s ({got}):\n"
                                 f"{log_tail(self.log)}")
            self._spin(0.05)

    def closed_loop(self, frames: int) -> dict[str, Any]:
        """Frames one at a time, each as soon as the previous labels arrived."""
        stamps = []
        for _ in range(frames):
            stamp = self.send()
            stamps.append(stamp)
            self._wait_answered(stamp)
        done = [s for s in stamps if s in self.done_at]
        span = self.done_at[stamps[-1]] - self.sent_at[stamps[0]] if done else 0.0
        return {"sent": frames, "received": len(done),
                "throughput_fps": round(len(done) / span, 3) if span > 0 else None,
                "latency_ms": summarize_ms([self.latency_ms[s] for s in done])}

    def at_rate(self, frames: int, rate: float) -> dict[str, Any]:
        """Frames published every 1/rate s, whatever the node does; then wait for the last labels."""
        stamps = []
        t0 = time.monotonic()
        for i in range(frames):
            target = t0 + i / rate
            while (now := time.monotonic()) < target:
                self._spin(min(target - now, 0.01))
            stamps.append(self.send())
        self._wait_answered(stamps[-1])  # the last frame is never replaced, so its labels always come
        done = [s for s in stamps if s in self.done_at]
        first, last = self.sent_at[stamps[0]], self.sent_at[stamps[-1]]
        return {"rate_hz": rate, "achieved_rate_hz": round((frames - 1) / (last - first), 3) if last > first else None,
                "sent": frames, "received": len(done), "lost": frames - len(done),
                "latency_ms": summarize_ms([self.latency_ms[s] for s in done])}

    def counted(self, timeout: float = 10.0) -> dict[str, Any]:
        """The node's diagnostics once they account for every frame it received, each in one outcome.

        Done when the node counts every frame sent so far, or when two diagnostics messages after this
        call agree on a count short of that: frames lost on the way (a reliable writer's KEEP_LAST
        history overwrites what the reader has not acknowledged) never reach it.
        """
        sent = self.next_stamp - FIRST_STAMP
        deadline = time.monotonic() + timeout
        seen, previous = self.diagnostics_count, None
        while time.monotonic() < deadline:
            c = {k: int(self.diagnostics.get(f"frames_{k}", "0")) for k in COUNTERS}
            accounted = c["received"] == sum(c[k] for k in COUNTERS if k != "received")
            if accounted and c["received"] >= sent:
                return {**parse_diagnostics(self.diagnostics), "complete": True}
            if self.diagnostics_count > seen:
                seen = self.diagnostics_count
                if accounted and previous == c["received"]:
                    return {**parse_diagnostics(self.diagnostics), "complete": True}
                previous = c["received"]
            self._spin(0.05)
        return {**parse_diagnostics(self.diagnostics), "complete": False}


def node_params(args: argparse.Namespace, model: Path) -> list[str]:
    """segment_node's parameters for this run."""
    # The statistics window is one phase long, so each phase's figures are its own when the node keeps up.
    params = [f"model:={model}", "qos_reliability:=reliable", "diagnostics_period:=0.5",
              f"stats_window:={args.node_frames}",
              f"backend:={args.backend}", f"device:={args.device}", f"precision:={args.precision}",
              f"torch_compile:={args.torch_compile}", f"threads:={args.threads}",
              f"spin_wait:={str(args.spin_wait).lower()}", f"cuda_graph:={str(args.cuda_graph).lower()}"]
    if args.encoding == "jpeg":
        params.append("image_transport:=compressed")
    if args.inference_mode:
        params.append(f"inference_mode:={args.inference_mode}")
    return params


def node_overhead(diag: dict[str, Any], floor: dict[str, Any] | None) -> dict[str, Any]:
    """The node's own overhead from its diagnostics (per frame: receipt → publish − inference, median) vs the floors."""
    overhead = diag.get("overhead_median_ms")

    def ratio(key: str) -> float | None:
        median = ((floor or {}).get(key) or {}).get("median")
        return round(overhead / median, 3) if overhead is not None and median else None

    return {"node_latency_median_ms": diag.get("latency_median_ms"),
            "node_inference_median_ms": diag.get("inference_median_ms"), "overhead_ms": overhead,
            "frames": diag.get("stats_frames"),
            "ratio_to_raw_floor": ratio("ms"), "ratio_to_prebuilt_floor": ratio("prebuilt_ms")}


def bench_node(args: argparse.Namespace, context: Any, messages: list[Any], model: Path,
               domain_id: int, raw_floor: dict[str, Any] | None) -> dict[str, Any]:
    """Start segment_node, run the closed loop and the fixed-rate phase, read its diagnostics, stop it."""
    params = node_params(args, model)
    fd, log_name = tempfile.mkstemp(prefix="bench_node_", suffix=".log")
    os.close(fd)
    log = Path(log_name)
    proc = start_node(params, NAMESPACE, log, env={"ROS_DOMAIN_ID": str(domain_id)})
    driver = None
    report: dict[str, Any] = {"namespace": NAMESPACE, "domain_id": domain_id, "params": params,
                              "qos": "reliable; here KEEP_LAST 10, the node's input and labels KEEP_LAST 5",
                              "warmup_frames": min(args.warmup, NODE_WARMUP_MAX), "log": str(log)}
    report["error"] = None
    try:
        driver = NodeDriver(context, proc, log, messages, args.encoding, args.width, args.height)
        driver.wait_ready()
        print("bench: node started; closed loop …", flush=True)
        if report["warmup_frames"]:
            driver.closed_loop(report["warmup_frames"])
        report["max_throughput"] = driver.closed_loop(args.node_frames)
        report["diagnostics_after_max_throughput"] = driver.counted()
        print(f"bench: {args.node_frames} frames at {args.rate:g} Hz …", flush=True)
        report["latency_at_rate"] = rate = driver.at_rate(args.node_frames, args.rate)
        report["diagnostics_end"] = end = driver.counted()
        before = report["diagnostics_after_max_throughput"]
        # Where the phase's missing frames went: never reached the node, or replaced there by a newer one.
        rate["node_received"] = end.get("frames_received", 0) - before.get("frames_received", 0)
        rate["node_dropped"] = end.get("frames_dropped", 0) - before.get("frames_dropped", 0)
        rate["node_processed"] = end.get("frames_processed", 0) - before.get("frames_processed", 0)
        rate["lost_before_node"] = rate["sent"] - rate["node_received"]
        rate["lost_after_node"] = rate["node_processed"] - rate["received"]  # labels overwritten on the way back
        report["wrong_labels"] = driver.wrong_labels
        at_rate = node_overhead(end, raw_floor)
        # The window holds the last stats_window frames: all from this phase only when the node took them all.
        at_rate["frames_from_phase"] = min(rate["node_processed"], args.node_frames)
        report["overhead"] = {
            **node_overhead(before, raw_floor), "at_rate": at_rate,
            "raw_floor_median_ms": ((raw_floor or {}).get("ms") or {}).get("median"),
            "prebuilt_floor_median_ms": ((raw_floor or {}).get("prebuilt_ms") or {}).get("median"),
            "goal_ratio": OVERHEAD_GOAL,
        }
    except BenchError as exc:
        report["error"] = str(exc)
    finally:
        if driver is not None:
            driver.close()
        report["exit_code"] = stop_node(proc)
        if report["error"] is None:
            log.unlink(missing_ok=True)  # kept only when something went wrong
            report["log"] = None
    return report


# -- the run --------------------------------------------------------------------------------------------
def run_bench(args: argparse.Namespace) -> int:
    """Run the ``bench`` sub-command; the exit status as the module docstring says."""
    from .backends import BackendError
    from .card import CardError
    from .engine import Segmenter

    try:
        _check_args(args)
        model = args.model.resolve()
        segmenter = Segmenter(model, backend=args.backend, device=args.device, threads=args.threads,
                              inference_mode=args.inference_mode, io_binding=IO_BINDING[args.io_binding],
                              spin_wait=args.spin_wait, cuda_graph=args.cuda_graph, precision=args.precision,
                              torch_compile=args.torch_compile)
    except (ValueError, FileExistsError, CardError, BackendError) as exc:  # CardError is a ValueError
        print(f"dgss-perception bench: error: {exc}", file=sys.stderr)
        return 2
    card = segmenter.card
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(args),
        "device": device_info(),
        "package": {"dir": str(model), "name": card.name, "family": card.family, "backbones": list(card.backbones),
                    "mode": segmenter.mode, "precision": card.precision, "batch": segmenter.batch_size,
                    "network": {"height": card.input_height, "width": card.input_width}},
        "input": {"width": args.width, "height": args.height, "encoding": args.encoding,
                  "jpeg_quality": JPEG_QUALITY if args.encoding == "jpeg" else None, "pool": POOL_SIZE},
        "backend": {"name": segmenter.backend.name, "device": segmenter.backend.device,
                    "device_report": segmenter.device_report, "precision": segmenter.precision,
                    "precision_note": segmenter.precision_note or None,
                    "merge_on_device": segmenter.merge_on_device if segmenter.mode == "slide" else None,
                    "providers": getattr(segmenter.backend, "providers", None), "threads": args.threads,
                    "spin_wait": args.spin_wait,
                    "io_binding": getattr(segmenter.backend, "io_binding", None),
                    "cuda_graph": segmenter.cuda_graphs, "cuda_graph_notes": segmenter.cuda_graph_notes,
                    "graphs": list(segmenter.backends),
                    # pt2: loading and compiling its programs (torch.compile / AOTInductor on the target), per graph
                    "compile_seconds": {g: round(b.compile_seconds, 3) for g, b in segmenter.backends.items()
                                        if hasattr(b, "compile_seconds")} or None},
        "definitions": definitions(),
    }
    print(f"bench: {card.name} on {segmenter.backend.name}/{segmenter.backend.device}, "
          f"{args.width}x{args.height} {args.encoding}; engine …", flush=True)
    frames = make_frames(args.width, args.height, POOL_SIZE)
    report["engine"] = bench_engine(segmenter, frame_messages(frames, args.encoding), args.encoding,
                                    args.frames,
                                    # Captures happen in warm-up, never in a measured frame.
                                    max(args.warmup, segmenter.warmup_runs) if segmenter.cuda_graphs else args.warmup)
    report["backend"]["cuda_graph_notes"] = segmenter.cuda_graph_notes  # with any capture that failed in a run
    mode, device, precision = segmenter.mode, segmenter.backend.device, segmenter.precision
    # Released before the peak measurement (its runtime's threads would compete) and before the node loads its own.
    del segmenter
    report["compute_floor"] = compute_floor(card, mode, report["engine"], device, args.peak_gflops, precision)
    code = 0
    report["raw_floor"] = report["node"] = report["dds"] = None
    report["error"] = None
    try:
        import rclpy
    except ImportError as exc:
        report["error"] = f"rclpy is not importable ({exc}): no raw floor and no node figures"
        code = 1 if args.node else 0
    else:
        # The transport's settings decide the DDS figures as much as the node does (config/fastdds_large_images.xml).
        report["dds"] = {"rmw": rclpy.get_rmw_implementation_identifier(),
                         "env": {k: os.environ[k] for k in DDS_ENV if os.environ.get(k)}}
        domain_id = int(os.environ.get("ROS_DOMAIN_ID", "") or 1 + os.getpid() % 100)
        context = rclpy.Context()
        rclpy.init(context=context, domain_id=domain_id)
        try:
            messages = ros_messages(frames, args.encoding)
            try:
                report["raw_floor"] = bench_raw_floor(context, messages, args.encoding, args.width, args.height,
                                                      (card.input_height, card.input_width), args.frames, domain_id)
            except BenchError as exc:
                report["error"] = f"raw floor: {exc}"
                code = 1
            if args.node:
                print(f"bench: starting segment_node (ROS_DOMAIN_ID={domain_id}) …", flush=True)
                report["node"] = bench_node(args, context, messages, model, domain_id, report["raw_floor"])
                if report["node"]["error"]:
                    report["error"] = report["node"]["error"]
                    code = 1
        finally:
            rclpy.shutdown(context=context)
    report["summary"] = summary(report)
    print(format_table(report), flush=True)
    if report["error"]:
        print(f"dgss-perception bench: {report['error']}", file=sys.stderr)
    if args.json is not None:
        write_report(report, args.json)
        print(f"report: {args.json}")
    return code


def definitions() -> dict[str, str]:
    """The figures' definitions, carried in every report."""
    return {
        "engine": "sequential loop in this process, as the node: decode = message fields → rgb (codec; rgb8 in "
                  "place), preprocess/inference/postprocess = SegmentResult.timings_ms (labels resized into one "
                  "message buffer refilled each frame), encode = labels → mono8 Image fields, "
                  "total = one iteration's wall time, throughput = frames / summed totals",
        "node_max_throughput": "closed loop over DDS, next frame when the previous labels arrive: frames / "
                               "(last labels − first publish); latency = publish → labels received",
        "node_latency_at_rate": "frames published every 1/rate s; latency = publish → labels received; frames "
                                "the node replaced by newer ones count as lost",
        "node_overhead": "the node's overhead_median_ms: per frame, receipt in its callback → labels published "
                         "minus that frame's inference, the median over the closed loop (at_rate: over the "
                         "fixed-rate phase), from its diagnostics",
        "raw_floor": "per frame, no model, in the subscription callback of a frame received over DDS from "
                     "another process: view the message buffer (jpeg: decode), resize to the network size "
                     "(bilinear), resize a network-size uint8 label map to the frame size (nearest, resize_labels) "
                     "into the buffer of one mono8 Image refilled each frame, and publish it (reliable, one "
                     "subscriber in another process, as the node's labels); prebuilt_ms: the same steps on "
                     "messages built in this process; subscriber_in_process_ms: that with the subscriber here too",
        "overhead_ratio": "node overhead / raw floor median",
        "compute_floor": "FLOPs per frame (card export.flops; coarse + mean windows refined × refine_per_window "
                         "for coarse_to_fine) / device matrix throughput at the package's precision; "
                         "ratio = engine inference median / floor",
    }


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: ros2_benchmark's pair, the overhead ratio and the compute-floor ratio."""
    node = report.get("node") or {}
    rate = node.get("latency_at_rate") or {}
    return {
        "engine_throughput_fps": report["engine"]["throughput_fps"],
        "engine_total_median_ms": report["engine"]["stages_ms"]["total"]["median"],
        "node_max_throughput_fps": (node.get("max_throughput") or {}).get("throughput_fps"),
        "node_latency_at_rate_ms": (rate.get("latency_ms") or {}).get("median"),
        "rate_hz": rate.get("rate_hz"),
        "overhead_ratio": (node.get("overhead") or {}).get("ratio_to_raw_floor"),
        "compute_floor_ratio": report["compute_floor"]["ratio"],
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(r: dict[str, Any]) -> str:
    """The report as a readable table."""
    pkg, inp, be, eng = r["package"], r["input"], r["backend"], r["engine"]
    dev = r["device"]
    lines = [
        "",
        f"bench  {pkg['name']} ({pkg['family']}, {pkg['mode']}, {pkg['precision']}, network "
        f"{pkg['network']['width']}x{pkg['network']['height']}) · {inp['width']}x{inp['height']} {inp['encoding']}"
        f" · {be['name']}/{be['device']}" + (f" ({', '.join(be['providers'])})" if be["providers"] else "")
        + f", threads {be['threads'] or 'default'}" + (", spin-wait" if be.get("spin_wait") else "")
        + (", CUDA graphs" if be.get("cuda_graph") else ""),
        f"device {dev['summary']}; GPU: {', '.join(dev['gpus']) or 'none'}",
        *([f"ran on {be['device_report']}, precision {be.get('precision')}"] if be.get("device_report") else []),
        *([f"warning: {be['precision_note']}"] if be.get("precision_note") else []),
        *(f"CUDA graphs, {graph} graph: {why}" for graph, why in be.get("cuda_graph_notes", {}).items()),
        f"date   {r['date']}",
        "",
        f"engine ({eng['frames']} frames after {eng['warmup']} warm-up)   median      p90      p99   (ms)",
    ]
    for stage in (*STAGES, "total"):
        s = eng["stages_ms"][stage]
        lines.append(f"  {stage:<34}{_fmt(s['median']):>8} {_fmt(s['p90']):>8} {_fmt(s['p99']):>8}")
    lines.append(f"  throughput {_fmt(eng['throughput_fps'], 1)} frames/s (sequential loop)")
    if eng["windows_refined_mean"] is not None:
        lines.append(f"  windows refined: mean {_fmt(eng['windows_refined_mean'])} of {eng['windows_per_frame']} "
                     "per frame")
    floor = r["raw_floor"]
    lines.append("")
    if floor:
        f = floor["ms"]
        lines.append(f"raw floor (no model; {floor['frames']} frames)        median {_fmt(f['median'])} ms, "
                     f"p90 {_fmt(f['p90'])} ms, p99 {_fmt(f['p99'])} ms")
        lines += [f"  {i + 1}. {step}" for i, step in enumerate(floor["steps"])]
        here = floor["subscriber_in_process_ms"]["median"]
        lines.append(f"  the same on messages built here (warm): {_fmt(floor['prebuilt_ms']['median'])} ms; "
                     f"and with the labels' subscriber here too: {_fmt(here)} ms")
    else:
        lines.append("raw floor  n/a")
    cf = r["compute_floor"]
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in cf["peak_gflops"].items()) or "n/a"
    lines += [
        "",
        f"compute floor  FLOPs/frame {_fmt(cf['flops_per_frame'], 0) if cf['flops_per_frame'] is not None else 'n/a'}"
        f"; device peak GFLOP/s ({cf['peak_source']}): {peaks}",
        f"  floor {_fmt(cf['floor_ms'], 3)} ms at {cf['precision']}; inference median {_fmt(cf['model_ms'])} ms; "
        f"ratio {_fmt(cf['ratio'])}" + (f"  ({cf['flops_note']})" if cf["flops_note"] else ""),
    ]
    node = r["node"]
    lines.append("")
    if node and "max_throughput" in node:
        mt, ar, ov = node["max_throughput"], node["latency_at_rate"], node["overhead"]
        lat_mt, lat_ar = mt["latency_ms"], ar["latency_ms"]
        dds = r.get("dds") or {}
        settings = ", ".join(f"{k}={v}" for k, v in dds.get("env", {}).items()) or "default transports"
        lines += [
            f"node over DDS ({node['qos']}, {node['warmup_frames']} warm-up frames; {dds.get('rmw')}, {settings})",
            f"  max throughput     {_fmt(mt['throughput_fps'], 1)} frames/s closed loop; latency median "
            f"{_fmt(lat_mt['median'])}, p90 {_fmt(lat_mt['p90'])}, p99 {_fmt(lat_mt['p99'])} ms "
            f"({mt['received']}/{mt['sent']} frames)",
            f"  latency at {ar['rate_hz']:g} Hz   median {_fmt(lat_ar['median'])}, p90 {_fmt(lat_ar['p90'])}, "
            f"p99 {_fmt(lat_ar['p99'])} ms; labels for {ar['received']}/{ar['sent']} frames "
            f"(sent at {_fmt(ar['achieved_rate_hz'], 1)} Hz)",
            f"                     {ar['node_received']} frames reached the node, {ar['node_dropped']} replaced there "
            f"by newer ones, {ar['lost_after_node']} labels lost on the way back",
            f"  node's own         latency (receipt → publish) median {_fmt(ov['node_latency_median_ms'])} ms, "
            f"inference median {_fmt(ov['node_inference_median_ms'])} ms (closed loop, {ov['frames']} frames)",
            f"  node overhead      {_fmt(ov['overhead_ms'], 3)} ms per frame = {_fmt(ov['ratio_to_raw_floor'])} × raw "
            f"floor (CPU goal ≤ {ov['goal_ratio']}×), {_fmt(ov['ratio_to_prebuilt_floor'])} × its warm form",
            f"                     at {ar['rate_hz']:g} Hz: {_fmt(ov['at_rate']['overhead_ms'], 3)} ms = "
            f"{_fmt(ov['at_rate']['ratio_to_raw_floor'])} × raw floor ({ov['at_rate']['frames_from_phase']} of its "
            f"{ov['at_rate']['frames']} frames from that phase)",
            f"  ros2_benchmark     {_fmt(mt['throughput_fps'], 1)} fps max throughput / "
            f"{_fmt(lat_ar['median'])} ms latency at {ar['rate_hz']:g} Hz",
            f"  node exit code     {node['exit_code']}",
        ]
    elif node is None and not r["error"]:
        lines.append("node   not run (--no-node)")
    if r["error"]:
        lines.append(f"error  {r['error'].splitlines()[0]}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the JSON report to a new file (mode "x": a file that appeared meanwhile is not replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":  # the raw floor's peer process: python -m dgss_perception.bench --floor-peer PREFIX
    if sys.argv[1:2] != ["--floor-peer"] or len(sys.argv) not in (3, 4) or sys.argv[3:] not in ([], ["--compressed"]):
        sys.exit("usage: python -m dgss_perception.bench --floor-peer PREFIX [--compressed] "
                 "(dgss-perception bench runs the benchmark)")
    sys.exit(floor_peer(sys.argv[2], sys.argv[3:] == ["--compressed"]))
