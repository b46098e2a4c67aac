#!/usr/bin/env python3
"""Size and encode/decode time of label images as PNG (the node's ``labels/compressed``) at 1080p.

Labels are the demo's: synthetic road scenes (training/data/synthetic.py), as ground truth rendered
at 1920×1080 ("scene 1080p") and as the node publishes them from a network of 512×256 resized to a
1080p input by nearest neighbour ("network → 1080p"). Uniformly random trainIds ("noise") bound
the worst case: PNG cannot shrink them. Each PNG setting is checked to decode to exactly its
labels. Times are medians over the repeats of one encode (cv2.imencode) or decode (cv2.imdecode)
on this machine, single-threaded; sizes are per frame, mean and max over the scenes.

Usage (from the repository root):
    .venv/bin/python scripts/bench_label_codec.py [--scenes 8] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout, the package need not be installed
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from dgss_perception.label_codec import decode_labels_png, encode_labels_png, png_params  # noqa: E402
from training.data.synthetic import render_scene  # noqa: E402

HEIGHT, WIDTH = 1080, 1920
NETWORK = (256, 512)  # the demo model's input (height, width)


def settings() -> dict[str, list[int] | None]:
    """Name → cv2.imencode parameters; None = the node's own encoder (label_codec)."""
    out: dict[str, list[int] | None] = {"node: up filter + RLE (label_codec)": None}
    for level in (1, 3, 6, 9):  # image_transport's png_level defaults to 3
        out[f"OpenCV defaults, level {level}"] = [cv2.IMWRITE_PNG_COMPRESSION, level]
    # What an OpenCV before 4.10 (no filter choice) makes of label_codec's parameters.
    out["RLE, adaptive filters (OpenCV < 4.10)"] = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY,
                                                    cv2.IMWRITE_PNG_STRATEGY_RLE]
    return out


def label_sets(scenes: int) -> dict[str, list[np.ndarray]]:
    """Kind → 1080p label images (uint8 H×W trainIds)."""
    rng = np.random.default_rng(0)
    sets: dict[str, list[np.ndarray]] = {"scene 1080p": [], "network → 1080p": [], "noise (worst case)": []}
    for i in range(scenes):
        sets["scene 1080p"].append(render_scene(1000 + i, HEIGHT, WIDTH)[1])
        small = render_scene(1000 + i, *NETWORK)[1]
        sets["network → 1080p"].append(cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_NEAREST))
    sets["noise (worst case)"] = [rng.integers(0, 19, (HEIGHT, WIDTH), dtype=np.uint8) for _ in range(2)]
    return sets


def measure(labels: list[np.ndarray], params: list[int] | None, repeats: int) -> dict[str, float]:
    sizes, enc, dec = [], [], []
    for lab in labels:
        for _ in range(repeats):
            t = time.perf_counter()
            buf = encode_labels_png(lab) if params is None else cv2.imencode(".png", lab, params)[1].reshape(-1)
            enc.append(time.perf_counter() - t)
        for _ in range(repeats):
            t = time.perf_counter()
            back = decode_labels_png(buf)
            dec.append(time.perf_counter() - t)
        if not np.array_equal(back, lab):
            raise AssertionError("a PNG did not decode to its labels")
        sizes.append(buf.size)
    return {"kb_mean": statistics.mean(sizes) / 1024, "kb_max": max(sizes) / 1024,
            "encode_ms": 1e3 * statistics.median(enc), "decode_ms": 1e3 * statistics.median(dec)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=8, help="synthetic scenes per label kind (default 8)")
    parser.add_argument("--repeats", type=int, default=15, help="encodes and decodes timed per image (default 15)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    sets = label_sets(args.scenes)
    raw_kb = HEIGHT * WIDTH / 1024
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {platform.processor() or '?'}",
        "opencv": cv2.__version__, "python": platform.python_version(), "size": f"{WIDTH}x{HEIGHT}",
        "raw_kb": raw_kb, "node_params": png_params(), "rows": []}
    print(f"{WIDTH}x{HEIGHT} mono8 labels, raw {raw_kb:.0f} KB; OpenCV {cv2.__version__}")
    print("| labels | PNG setting | KB mean (max) | encode ms | decode ms |")
    print("| --- | --- | --- | --- | --- |")
    for kind, labels in sets.items():
        for name, params in settings().items():
            if kind.startswith("noise") and not name.startswith("node"):
                continue
            row = {"labels": kind, "setting": name, "frames": len(labels), **measure(labels, params, args.repeats)}
            results["rows"].append(row)
            print(f"| {kind} | {name} | {row['kb_mean']:.1f} ({row['kb_max']:.1f}) | {row['encode_ms']:.1f} | "
                  f"{row['decode_ms']:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
