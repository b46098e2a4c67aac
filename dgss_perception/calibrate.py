"""``dgss-perception calibrate``: the domain-shift monitor's thresholds from a reference bag (no rclpy).

Reads the image topics of a rosbag2 bag (sqlite3 or mcap) recorded in the training domain (the
weather, light and places the model was trained for), segments every frame with the model package
the node will run, and writes the confidence figures' reference distribution and the thresholds
derived from it (:func:`dgss_perception.monitor.calibrate`) as a small JSON file for the node's
``monitor_calibration`` parameter. Each image topic counts as one camera: its frames are smoothed
in recorded order, as the node smooths each camera's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .engine import BACKENDS, device_arg
from .monitor import DEFAULT_WINDOW, Calibration, ReferenceStats, calibrate


def reference_frames(bag: Path, topics: list[str] | None) -> Iterator[tuple[str, Any]]:
    """(topic, rgb uint8 H×W×3) of a bag's image topics in recorded order; malformed frames yield (topic, None)."""
    from rosbags.rosbag2 import Reader, ReaderError

    from .bag import IMAGE_TYPES, BagError, _decode_frame, _typestore, bag_storage
    from .codec import FrameError

    bag_storage(bag)  # BagError naming what is missing
    typestore = _typestore()
    try:
        reader = Reader(bag)
        reader.open()
    except (ReaderError, FileNotFoundError, OSError) as exc:
        raise BagError(f"cannot read bag {bag}: {exc}") from exc
    try:
        types = {c.topic: c.msgtype for c in reader.connections}
        images = [t for t in sorted(types) if types[t] in IMAGE_TYPES]
        for topic in topics or []:
            if topic not in images:
                raise BagError(f"topic {topic} is not an image topic of {bag} (image topics: "
                               f"{', '.join(images) or 'none'})")
        selected = list(dict.fromkeys(topics)) if topics else images
        if not selected:
            raise BagError(f"bag {bag} has no image topic ({' or '.join(IMAGE_TYPES)})")
        connections = [c for c in reader.connections if c.topic in selected]
        for conn, _, raw in reader.messages(connections=connections):
            try:
                yield conn.topic, _decode_frame(typestore, conn.msgtype, raw)[1]
            except FrameError:
                yield conn.topic, None
    finally:
        reader.close()


def calibrate_bag(model: str | Path, bag: str | Path, *, topics: list[str] | None = None, backend: str = "auto",
                  device: str = "auto", inference_mode: str | None = None, progress: bool = False,
                  **options: Any) -> tuple[Calibration, int]:
    """Segment a reference bag and calibrate on it; returns the calibration and the malformed frames skipped.

    ``options`` go to :func:`dgss_perception.monitor.calibrate` (window, confidence_threshold, …).
    """
    from tqdm import tqdm

    from .engine import Segmenter

    segmenter = Segmenter(model, backend=backend, device=device, inference_mode=inference_mode,
                          output_resolution="network")
    stats = ReferenceStats()
    malformed = 0
    for topic, rgb in tqdm(reference_frames(Path(bag), topics), unit="frame", disable=not progress,
                           desc="calibrating"):
        if rgb is None:
            malformed += 1
            continue
        # The network grid's confidence, as the node's monitor reads it (never resized to the frame).
        stats.add(topic, segmenter.segment(rgb).network_confidence)
    card = segmenter.card
    calibration = calibrate(stats, model=card.name, checksums=card.checksums, inference_mode=segmenter.mode,
                            **options)
    return calibration, malformed


def add_parser(subparsers: Any) -> None:
    """Add the ``calibrate`` sub-command."""
    p = subparsers.add_parser(
        "calibrate", help="measure the domain-shift monitor's thresholds on a reference bag of the training domain",
        description="Segment the image topics of a rosbag2 bag recorded in the training domain and write the "
                    "domain-shift monitor's thresholds for the node's monitor_calibration parameter.")
    p.add_argument("bag", type=Path, help="reference bag directory (read-only)")
    p.add_argument("--model", type=Path, required=True, help="model package directory (the one the node runs)")
    p.add_argument("--out", type=Path, required=True, help="calibration file to write (JSON)")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="image topics to use (default: all)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"frames of the moving average, as the node will smooth (default {DEFAULT_WINDOW})")
    p.add_argument("--confidence-threshold", type=float, default=None,
                   help="pixel max-softmax threshold of the low-confidence share (default: the "
                        "--pixel-quantile quantile of the reference's pixels)")
    p.add_argument("--pixel-quantile", type=float, default=0.1,
                   help="share of the reference's pixels that count as low confidence when "
                        "--confidence-threshold is not given (default 0.1)")
    p.add_argument("--tail", choices=("q75", "q95", "q99"), default="q99",
                   help="the reference quantile of the smoothed figures that warn is set beyond (default q99)")
    p.add_argument("--min-margin", type=float, default=0.02,
                   help="least distance of warn from the reference's median (default 0.02)")
    p.add_argument("--enter-frames", type=int, default=3, help="frames beyond a threshold to raise the level")
    p.add_argument("--leave-frames", type=int, default=10, help="frames back inside to lower it again")
    p.add_argument("--inference-mode", default=None, help="the node's inference_mode (default: the card's)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    """Run the ``calibrate`` sub-command; 0 on success, 2 on bad input (one line on stderr)."""
    from .bag import BagError
    from .card import CardError

    try:
        if args.out.exists() and not args.overwrite:
            raise ValueError(f"{args.out} exists (--overwrite to replace it)")
        calibration, malformed = calibrate_bag(
            args.model, args.bag, topics=args.topics, backend=args.backend, device=args.device,
            inference_mode=args.inference_mode, progress=args.progress, window=args.window,
            confidence_threshold=args.confidence_threshold, pixel_quantile=args.pixel_quantile, tail=args.tail,
            min_margin=args.min_margin, enter_frames=args.enter_frames, leave_frames=args.leave_frames)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        calibration.save(args.out)
    except (BagError, CardError, ValueError, FileNotFoundError) as exc:
        print(f"dgss-perception calibrate: error: {exc}", file=sys.stderr)
        return 2
    ref, t = calibration.reference, calibration.thresholds["low_confidence_share"]
    share = ref["low_confidence_share"]
    skipped = f", {malformed} malformed skipped" if malformed else ""
    print(f"{ref['frames']} reference frames ({ref['cameras']} camera(s){skipped}); "
          f"pixel threshold {calibration.confidence_threshold:.3f}; smoothed low-confidence share median "
          f"{share['q50']:.3f}, q99 {share['q99']:.3f} → warn {t.warn:.3f}, error {t.error:.3f}")
    if t.warn >= 1.0:
        print("warning: the reference is already mostly low confidence, so the share can never warn; "
              "is this the training domain, or is --confidence-threshold too high?", file=sys.stderr)
    print(f"calibration: {args.out}")
    return 0
