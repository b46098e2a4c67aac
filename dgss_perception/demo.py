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
   recording the labels and overlays it publishes;
6. write overlays (PNG) and a mIoU report per condition to ``<out>``.

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

from .labels import CITYSCAPES_CLASSES, colorize, palette_lut
from .metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

CONDITIONS = ("day", "night", "snow")
TOPIC = "/camera/image_raw"
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


def _replay(model: Path, bag: Path, work: Path, expected: int, timeout: float) -> tuple[dict, dict, dict]:
    """Run segment_node against ``play`` of the bag; return labels and overlays by stamp, and diagnostics."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from .play import play_bag

    log = open(work / "node.log", "w")
    node_proc = subprocess.Popen(
        [sys.executable, "-m", "dgss_perception.node", "--ros-args", "-p", f"model:={model}",
         "-p", "qos_reliability:=reliable", "-p", "qos_depth:=10", "-p", "use_sim_time:=true",
         "-r", f"image:={TOPIC}", "-r", "labels:=/camera/labels", "-r", "labels/overlay:=/camera/labels/overlay",
         "-r", "labels/color:=/camera/labels/color", "-r", "labels/confidence:=/camera/labels/confidence"],
        stdout=log, stderr=subprocess.STDOUT)
    labels: dict[int, np.ndarray] = {}
    overlays: dict[int, np.ndarray] = {}
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

    def on_diag(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.endswith("segmentation"):
                diag.update({kv.key: kv.value for kv in status.values})

    rclpy.init()
    recorder = rclpy.create_node("demo_recorder")
    qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    sub = recorder.create_subscription(Image, "/camera/labels", on_labels, qos)
    recorder.create_subscription(Image, "/camera/labels/overlay", on_overlay, qos)
    recorder.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
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
                if len(labels) >= expected and len(overlays) >= expected:
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
    return labels, overlays, diag


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

    labels, overlays, diag = _replay(model, bag, work, len(frames), timeout=60 + 2 * len(frames))

    engine = Segmenter(model)
    lut = palette_lut(engine.card.palette)
    n = engine.card.num_classes
    confs = {c: np.zeros((n, n), np.int64) for c in CONDITIONS}
    engine_confs = {c: np.zeros((n, n), np.int64) for c in CONDITIONS}
    received = dict.fromkeys(CONDITIONS, 0)
    sent = dict.fromkeys(CONDITIONS, 0)
    identical = 0
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
        "node_diagnostics": diag,
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
        "Overlays (input | node overlay | ground truth) are in overlays/.\n")
    print(table)
    print(f"\nreport: {out / 'report.md'}  overlays: {out / 'overlays'}  model: {model}")
    missing = sum(sent.values()) - sum(received.values())
    if missing:
        print(f"note: {missing} frame(s) produced no labels (dropped under load); see the node diagnostics",
              file=sys.stderr)
    return 0 if sum(received.values()) else 1
