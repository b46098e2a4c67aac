"""``dgss-perception demo``: the whole workflow on synthetic road scenes.

No real weights or datasets can be assumed, so the demo makes its own: road
scenes drawn procedurally (Cityscapes trainIds), clear-day scenes for
training, and the same kind of scenes rendered at night and in snow for
testing. It then runs the product exactly as on a car:

1. render the data (``python -m training.data.synthetic``) in Cityscapes/ACDC layouts;
2. train a tiny VFMNet on the day scenes (``python -m training.train``; reused when done);
3. export it (``python -m training.export``) to ``<out>/model``;
4. write a day → night → snow drive as a rosbag (``<out>/drive``);
5. start ``segment_node`` and play the bag to it over ROS 2 (``dgss-perception play``),
   recording the labels, their lossless PNG form (``labels/compressed``) and overlays it publishes;
6. write overlays (PNG) and a mIoU report per condition to ``<out>``, with the compressed labels'
   size and whether each decodes to exactly the raw labels.

The domain-shift monitor is calibrated before step 5 on a reference drive of held-out day scenes
(``<out>/reference_day``, ``dgss-perception calibrate``); the node runs with that calibration and
the report shows its figures and level per condition.

Steps 1–3 need the source checkout (``training/``); steps 4–6 only the runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from .codec import FrameError
from .label_codec import decode_labels_png
from .labels import CITYSCAPES_CLASSES, colorize, palette_lut
from .metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

CONDITIONS = ("day", "night", "snow")
TOPIC = "/camera/image_raw"
MONITOR_TOPIC = "/camera/labels/domain_shift"
# The drive runs at a few frames per second, so the monitor smooths over 3 frames and changes level after 2
# (up) or 3 (down); a 30 Hz camera would keep calibrate's defaults (10 frames, 3 up, 10 down).
MONITOR_WINDOW, MONITOR_ENTER, MONITOR_LEAVE = 3, 2, 3
# Seeds of the reference drive's day scenes: neither training scenes (0, 1, …) nor the drive's (1 000 000, …).
REFERENCE_SEED = 2_000_000
CHECKOUT = Path(__file__).resolve().parents[1]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="train, export, deploy and replay on synthetic day/night/snow scenes")
    p.add_argument("--out", default="demo_output", help="output directory (default demo_output)")
    p.add_argument("--config", default=str(CHECKOUT / "training" / "configs" / "demo_tiny.yaml"),
                   help="training config of the demo model")
    p.add_argument("--iters", type=int, default=None, help="override the training iterations")
    p.add_argument("--train-scenes", type=int, default=400)
    p.add_argument("--test-scenes", type=int, default=12, help="scenes per condition in the drive")
    p.add_argument("--rate", type=float, default=4.0, help="frames per second of the drive")
    p.add_argument("--reference-scenes", type=int, default=24,
                   help="held-out day scenes the domain-shift monitor is calibrated on")
    p.add_argument("--retrain", action="store_true", help="train again even if a trained model exists")
    p.set_defaults(func=run_demo)


def _run(cmd: list[str], log: Path | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(cmd, cwd=CHECKOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"step failed ({result.returncode}): {' '.join(cmd)}")


def _drive_frames(data: Path, count: int) -> list[tuple[str, Path, Path]]:
    """(condition, image, label) in drive order: the same val scenes by day, at night, in snow."""
    day = sorted((data / "cityscapes" / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))[:count]
    frames = [("day", p, data / "cityscapes" / "gtFine" / "val" / p.parent.name /
               p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")) for p in day]
    for cond in ("night", "snow"):
        for p in sorted((data / "acdc" / "rgb_anon" / cond / "val").glob("*/*_rgb_anon.png"))[:count]:
            frames.append((cond, p, data / "acdc" / "gt" / cond / "val" / p.parent.name /
                           p.name.replace("_rgb_anon.png", "_gt_labelTrainIds.png")))
    return frames


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _prepare_model(args: argparse.Namespace, out: Path, work: Path) -> Path:
    if not (CHECKOUT / "training").is_dir():
        raise FileNotFoundError("the demo trains its model with training/ from the source checkout, "
                                f"which is not beside {CHECKOUT / 'dgss_perception'}")
    data = work / "data"
    if not (data / "done").is_file():
        _run([sys.executable, "-m", "training.data.synthetic", "--out", str(data), "--train", str(args.train_scenes),
              "--val", str(args.test_scenes)])
        (data / "done").write_text("ok\n")

    cfg = yaml.safe_load(Path(args.config).read_text())
    cfg.setdefault("data", {})["root"] = str(data / "cityscapes")
    for val_set in cfg["data"].get("val", []):
        val_set["root"] = str(data / val_set["layout"])
    if args.iters is not None:
        cfg.setdefault("optim", {})["iters"] = args.iters
    run_dir = work / "run"
    cfg_path = work / "demo_config.yaml"
    cfg_text = yaml.safe_dump(cfg, sort_keys=False)
    trained = (run_dir / "model.safetensors").is_file() and cfg_path.is_file() and cfg_path.read_text() == cfg_text
    if args.retrain or not trained:
        cfg_path.write_text(cfg_text)
        _run([sys.executable, "-m", "training.train", "--config", str(cfg_path), "--run-dir", str(run_dir),
              "--no-resume"])
    else:
        print(f"reusing the trained model in {run_dir} (--retrain to train again)")
    model = out / "model"
    _run([sys.executable, "-m", "training.export", "--run", str(run_dir), "--out", str(model), "--overwrite"])
    return model


def _replay(model: Path, bag: Path, work: Path, expected: int, timeout: float, calibration: Path | None = None,
            shift: dict[int, tuple[int, dict[str, str]]] | None = None) -> tuple[dict, dict, dict, dict]:
    """Run segment_node against ``play`` of the bag.

    ``calibration``: the node's monitor_calibration; ``shift`` receives, by stamp, the monitor's level and
    figures it publishes per frame.

    Returns labels, overlays and compressed labels ((format, PNG bytes)) by stamp, and diagnostics.
    """
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image

    from .play import play_bag

    log = open(work / "node.log", "w")
    node_proc = subprocess.Popen(
        [sys.executable, "-m", "dgss_perception.node", "--ros-args", "-p", f"model:={model}",
         "-p", "qos_reliability:=reliable", "-p", "qos_depth:=10", "-p", "use_sim_time:=true",
         "-r", f"image:={TOPIC}", "-r", "labels:=/camera/labels", "-r", "labels/overlay:=/camera/labels/overlay",
         "-r", "labels/color:=/camera/labels/color", "-r", "labels/confidence:=/camera/labels/confidence",
         "-r", "labels/compressed:=/camera/labels/compressed", "-r", f"labels/domain_shift:={MONITOR_TOPIC}",
         *(["-p", f"monitor_calibration:={calibration}"] if calibration else [])],
        stdout=log, stderr=subprocess.STDOUT)
    labels: dict[int, np.ndarray] = {}
    overlays: dict[int, np.ndarray] = {}
    compressed: dict[int, tuple[str, bytes]] = {}
    diag: dict[str, str] = {}
    lock = threading.Lock()

    def stamp_ns(msg: Any) -> int:
        return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec

    def on_labels(msg: Image) -> None:
        with lock:
            labels[stamp_ns(msg)] = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width)

    def on_overlay(msg: Image) -> None:
        with lock:
            overlays[stamp_ns(msg)] = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)

    def on_compressed(msg: CompressedImage) -> None:
        with lock:
            compressed[stamp_ns(msg)] = (msg.format, bytes(msg.data))

    def on_diag(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.endswith("segmentation"):
                diag.update({kv.key: kv.value for kv in status.values})

    rclpy.init()
    recorder = rclpy.create_node("demo_recorder")
    qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    sub = recorder.create_subscription(Image, "/camera/labels", on_labels, qos)
    recorder.create_subscription(Image, "/camera/labels/overlay", on_overlay, qos)
    recorder.create_subscription(CompressedImage, "/camera/labels/compressed", on_compressed, qos)
    recorder.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    if shift is not None:
        recorder.create_subscription(DiagnosticArray, MONITOR_TOPIC, lambda m: _record_shift(m, shift, lock), qos)
    executor = SingleThreadedExecutor()
    executor.add_node(recorder)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        deadline = time.monotonic() + 120
        while sub.get_publisher_count() == 0:
            if node_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"segment_node did not start; see {work / 'node.log'}")
            time.sleep(0.1)
        print(f"segment_node is up; playing {bag} on {TOPIC}", flush=True)
        play_bag(bag, rate=1.0, clock=True, qos_reliability="reliable", start_delay=0.5, wait_for_subscribers=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if len(labels) >= expected and len(overlays) >= expected and len(compressed) >= expected:
                    break
            time.sleep(0.1)
        time.sleep(1.5)  # one more diagnostics period
    finally:
        executor.shutdown(timeout_sec=2)
        recorder.destroy_node()
        rclpy.shutdown()
        node_proc.send_signal(2)
        try:
            node_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        log.close()
    return labels, overlays, compressed, diag


def _compressed_line(c: dict[str, Any]) -> str:
    """One sentence on labels/compressed for the report."""
    if not c["frames"]:
        return "No compressed labels (labels/compressed) were received."
    return (f"Compressed labels ({c['topic']}, lossless PNG): {c['png_bytes_mean'] / 1024:.1f} KB per frame on "
            f"average (max {c['png_bytes_max'] / 1024:.1f} KB) against {c['raw_bytes'] / 1024:.0f} KB raw; "
            f"decoded identical to the raw labels: {c['decode_identical_to_labels']}; the PNGs are in labels/.")


def _record_shift(msg: Any, shift: dict[int, tuple[int, dict[str, str]]], lock: threading.Lock) -> None:
    """Keep a labels/domain_shift message: its frame's stamp → (level 0–2, named values)."""
    status = msg.status[0]
    with lock:
        shift[msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec] = (
            ord(status.level), {kv.key: kv.value for kv in status.values})


def _calibrate_monitor(args: argparse.Namespace, out: Path, work: Path, model: Path) -> tuple[Path, Any]:
    """Held-out day scenes → ``<out>/reference_day`` (a rosbag) → ``<out>/monitor_day.json`` (calibrate)."""
    from .bag import write_image_bag
    from .calibrate import calibrate_bag

    count = args.reference_scenes
    data = work / "reference_data"
    if not (data / "done").is_file() or (data / "done").read_text() != f"{count}\n":
        # Rendered as a "train" split of its own, seeded apart from the training and the drive's scenes.
        _run([sys.executable, "-m", "training.data.synthetic", "--out", str(data), "--train", str(count),
              "--val", "0", "--seed", str(REFERENCE_SEED)])
        (data / "done").write_text(f"{count}\n")
    images = sorted((data / "cityscapes" / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))[:count]
    bag = out / "reference_day"
    if bag.exists():
        import shutil

        shutil.rmtree(bag)
    period = int(1e9 / args.rate)
    write_image_bag(bag, TOPIC, ((1_600_000_000 * 1_000_000_000 + i * period, _read_rgb(p))
                                 for i, p in enumerate(images)), frame_id="camera_optical_frame", storage="mcap")
    calibration, _ = calibrate_bag(model, bag, window=MONITOR_WINDOW, enter_frames=MONITOR_ENTER,
                                   leave_frames=MONITOR_LEAVE)
    path = out / "monitor_day.json"
    calibration.save(path)
    share = calibration.thresholds["low_confidence_share"]
    print(f"calibrated the domain-shift monitor on {len(images)} held-out day scenes ({bag}): pixels below "
          f"confidence {calibration.confidence_threshold:.3f} count as low; warn at {100 * share.warn:.1f}% of "
          f"them, error at {100 * share.error:.1f}% → {path}", flush=True)
    return path, calibration


def _monitor_summary(shift: dict[int, tuple[int, dict[str, str]]], stamps: list[int],
                     frames: list[tuple[str, Path, Path]], calibration: Any) -> dict[str, Any]:
    """Per condition: the monitor's mean figures, its levels over the frames, and the level at the last one."""
    names = ("OK", "WARN", "ERROR")
    summary: dict[str, Any] = {
        "topic": MONITOR_TOPIC,
        "calibration": {"reference_frames": calibration.reference["frames"],
                        "confidence_threshold": calibration.confidence_threshold, "window": calibration.window,
                        **{f"{fig}_{k}": round(getattr(t, k), 4) for fig, t in calibration.thresholds.items()
                           for k in ("warn", "error")}},
        "conditions": {},
    }
    for cond in CONDITIONS:
        seen = [shift[s] for s, (c, _, _) in zip(stamps, frames) if c == cond and s in shift]
        if not seen:
            summary["conditions"][cond] = {"frames": 0}
            continue
        figures = {k: [float(v[k]) for _, v in seen] for k in ("low_confidence_share", "mean_confidence")}
        summary["conditions"][cond] = {
            "frames": len(seen),
            "low_confidence_share_mean": round(float(np.mean(figures["low_confidence_share"])), 4),
            "mean_confidence_mean": round(float(np.mean(figures["mean_confidence"])), 4),
            "levels": {n: sum(1 for level, _ in seen if level == i) for i, n in enumerate(names)},
            "level_sequence": "".join(names[level][0] for level, _ in seen),
            "level_at_last_frame": names[seen[-1][0]],
        }
    return summary


def _monitor_table(summary: dict[str, Any]) -> str:
    cal = summary["calibration"]
    lines = [f"Domain-shift monitor ({summary['topic']}), calibrated on {cal['reference_frames']} held-out day "
             f"scenes: a pixel below confidence {cal['confidence_threshold']:.3f} is low; the {cal['window']}-frame "
             f"mean of their share warns at {100 * cal['low_confidence_share_warn']:.1f}% and errs at "
             f"{100 * cal['low_confidence_share_error']:.1f}% (mean confidence: "
             f"{cal['mean_confidence_warn']:.3f} / {cal['mean_confidence_error']:.3f}).", "",
             "| condition | low-confidence share | mean confidence | frames OK / WARN / ERROR | per frame | level at "
             "the end |", "| --- | --- | --- | --- | --- | --- |"]
    for cond, c in summary["conditions"].items():
        if not c["frames"]:
            lines.append(f"| {cond} | – | – | no frames | | |")
            continue
        counts = " / ".join(str(c["levels"][n]) for n in ("OK", "WARN", "ERROR"))
        lines.append(f"| {cond} | {100 * c['low_confidence_share_mean']:.1f}% | {c['mean_confidence_mean']:.3f} | "
                     f"{counts} | `{c['level_sequence']}` | {c['level_at_last_frame']} |")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from .bag import write_image_bag
    from .engine import Segmenter

    out = Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    model = _prepare_model(args, out, work)

    frames = _drive_frames(work / "data", args.test_scenes)
    period = int(1e9 / args.rate)
    t0 = 1_700_000_000 * 1_000_000_000
    stamps = [t0 + i * period for i in range(len(frames))]
    bag = out / "drive"
    if bag.exists():
        import shutil

        shutil.rmtree(bag)
    write_image_bag(bag, TOPIC, ((s, _read_rgb(p)) for s, (_, p, _) in zip(stamps, frames)),
                    frame_id="camera_optical_frame", storage="mcap")
    print(f"wrote the drive: {bag} ({len(frames)} frames at {args.rate} Hz on {TOPIC})", flush=True)

    calibration_path, calibration = _calibrate_monitor(args, out, work, model)
    shift: dict[int, tuple[int, dict[str, str]]] = {}
    labels, overlays, compressed, diag = _replay(model, bag, work, len(frames), timeout=60 + 2 * len(frames),
                                                 calibration=calibration_path, shift=shift)

    engine = Segmenter(model)
    lut = palette_lut(engine.card.palette)
    n = engine.card.num_classes
    confs = {c: np.zeros((n, n), np.int64) for c in CONDITIONS}
    engine_confs = {c: np.zeros((n, n), np.int64) for c in CONDITIONS}
    received = dict.fromkeys(CONDITIONS, 0)
    sent = dict.fromkeys(CONDITIONS, 0)
    identical = 0
    png_sizes: list[int] = []
    png_exact = 0
    png_formats: set[str] = set()
    for d in ("overlays", "labels"):
        (out / d).mkdir(exist_ok=True)
    for i, (stamp, (cond, img_path, gt_path)) in enumerate(zip(stamps, frames)):
        sent[cond] += 1
        rgb = _read_rgb(img_path)
        gt = cv2.imread(str(gt_path), cv2.IMREAD_UNCHANGED)
        offline = engine.segment(rgb).labels
        engine_confs[cond] += confusion_matrix(offline, gt, n)
        if stamp not in labels:
            continue
        received[cond] += 1
        pred = labels[stamp]
        identical += int(np.array_equal(pred, offline))
        confs[cond] += confusion_matrix(pred, gt, n)
        name = f"{i:03d}_{cond}"
        if stamp in compressed:
            # labels/compressed is a PNG file as it stands: stored unchanged, after checking it is lossless.
            fmt, png = compressed[stamp]
            png_formats.add(fmt)
            png_sizes.append(len(png))
            try:
                png_exact += int(np.array_equal(decode_labels_png(png, fmt), pred))
            except FrameError as exc:
                print(f"warning: labels/compressed of frame {i} does not decode: {exc}", file=sys.stderr)
            (out / "labels" / f"{name}.png").write_bytes(png)
        else:
            cv2.imwrite(str(out / "labels" / f"{name}.png"), pred)
        if sent[cond] <= 3:
            panel = np.concatenate([rgb, overlays.get(stamp, colorize(pred, lut)), colorize(gt, lut)], axis=1)
            cv2.imwrite(str(out / "overlays" / f"{name}.png"), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))

    report = {
        "what": "tiny VFMNet trained on synthetic clear-day scenes, run by segment_node over ROS 2 on a "
                "day → night → snow drive; mIoU of the labels the node published against ground truth",
        "model": str(model),
        "bag": str(bag),
        "frames_sent": sent,
        "frames_received": received,
        "node_labels_identical_to_engine": f"{identical}/{sum(received.values())}",
        "compressed_labels": {
            "topic": "/camera/labels/compressed",
            "format": sorted(png_formats),
            "frames": len(png_sizes),
            "decode_identical_to_labels": f"{png_exact}/{len(png_sizes)}",
            "png_bytes_mean": round(float(np.mean(png_sizes)), 1) if png_sizes else None,
            "png_bytes_max": max(png_sizes) if png_sizes else None,
            "raw_bytes": int(next(iter(labels.values())).size) if labels else None,
        },
        "node_diagnostics": diag,
        "domain_shift": _monitor_summary(shift, stamps, frames, calibration),
        "conditions": {},
        "elapsed_s": round(time.time() - t_start, 1),
    }
    for cond in CONDITIONS:
        ious = iou_per_class(confs[cond])
        report["conditions"][cond] = {
            "miou": round(100 * mean_iou(confs[cond]), 2),
            "pixel_accuracy": round(100 * pixel_accuracy(confs[cond]), 2),
            "engine_offline_miou": round(100 * mean_iou(engine_confs[cond]), 2),
            "iou_per_class": {CITYSCAPES_CLASSES[k]: round(100 * float(v), 2)
                              for k, v in enumerate(ious) if np.isfinite(v)},
        }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| condition | frames (labels / sent) | mIoU % | pixel acc. % |", "| --- | --- | --- | --- |"]
    for cond in CONDITIONS:
        r = report["conditions"][cond]
        lines.append(f"| {cond} | {received[cond]} / {sent[cond]} | {r['miou']:.1f} | {r['pixel_accuracy']:.1f} |")
    table = "\n".join(lines)
    (out / "report.md").write_text(
        "# dgss_perception demo\n\n" + report["what"] + ".\n\n" + table + "\n\n"
        f"Labels identical to the offline engine: {report['node_labels_identical_to_engine']}.\n"
        f"{_compressed_line(report['compressed_labels'])}\n\n"
        f"{_monitor_table(report['domain_shift'])}\n\n"
        "Overlays (input | node overlay | ground truth) are in overlays/.\n")
    print(table)
    print(_compressed_line(report["compressed_labels"]))
    print("\n" + _monitor_table(report["domain_shift"]))
    print(f"\nreport: {out / 'report.md'}  overlays: {out / 'overlays'}  model: {model}")
    missing = sum(sent.values()) - sum(received.values())
    if missing:
        print(f"note: {missing} frame(s) produced no labels (dropped under load); see the node diagnostics",
              file=sys.stderr)
    return 0 if sum(received.values()) else 1
