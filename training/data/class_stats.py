"""Per-file class pixel counts of a training set, for rare-class sampling.

    python -m training.data.class_stats --layout gtav --root /data/gta --split all --out gtav_stats.json

writes {"layout", "root", "split", "conditions", "num_classes": 19,
"files": {<image path relative to root>: [19 pixel counts]}, "class_pixels": [19 totals]}.
Files are keyed by their image path relative to the dataset root, so the statistics stay valid
when the dataset moves, and a file of another dataset or split is recognised as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Sample, find_samples, load_labels

NUM_CLASSES = 19


def relative_key(path: str | Path, root: str | Path) -> str:
    """The POSIX path of ``path`` relative to ``root``, the key of a file in a statistics file.

    Raises:
        ValueError: the file is not under the root.
    """
    path, root = Path(path), Path(root)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        pass
    try:  # the same place spelled differently (relative vs absolute, symlinks)
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not under the dataset root {root}") from None


def class_counts(sample: Sample) -> list[int]:
    """Pixel count of each trainId 0–18 in a sample's labels (ignored pixels are not counted)."""
    labels = load_labels(sample)
    return np.bincount(labels.ravel(), minlength=256)[:NUM_CLASSES].tolist()


def _progress(items: Iterable[Any], total: int, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience only
        return items
    return tqdm(items, total=total, unit="file", desc="class statistics")


def compute_stats(layout: str, root: str | Path, split: str, conditions: list[str] | None = None,
                  workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """Count the class pixels of every sample of a dataset split.

    Args:
        layout: dataset layout as ``find_samples`` knows it.
        root: dataset root.
        split: split name.
        conditions: e.g. ACDC conditions; None for all.
        workers: processes reading labels in parallel (1: in this process).
        progress: show a tqdm bar when tqdm is installed.

    Returns:
        The statistics dict described in the module docstring.
    """
    samples = find_samples(layout, root, split, conditions or None)
    keys = [relative_key(s.image, root) for s in samples]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{layout} {split} under {root}: several samples share an image path")
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(_progress(pool.map(class_counts, samples, chunksize=16), len(samples), progress))
    else:
        rows = list(_progress(map(class_counts, samples), len(samples), progress))
    totals = np.sum(np.asarray(rows, dtype=np.int64).reshape(-1, NUM_CLASSES), axis=0)
    return {
        "layout": layout,
        "root": str(root),
        "split": split,
        "conditions": list(conditions or []),
        "num_classes": NUM_CLASSES,
        "files": dict(zip(keys, rows)),
        "class_pixels": totals.tolist(),
    }


def load_stats(path: str | Path) -> dict[str, Any]:
    """Read and check a statistics file written by this tool.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a statistics file of 19 classes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class statistics file not found: {path} "
                                f"(write it with python -m training.data.class_stats)")
    with path.open() as f:
        stats = json.load(f)
    if not isinstance(stats, dict) or not isinstance(stats.get("files"), dict):
        raise ValueError(f"{path} is not a class statistics file (no 'files' mapping)")
    if stats.get("num_classes") != NUM_CLASSES:
        raise ValueError(f"{path}: num_classes is {stats.get('num_classes')!r}, expected {NUM_CLASSES}")
    for key, row in stats["files"].items():
        if not isinstance(row, list) or len(row) != NUM_CLASSES:
            raise ValueError(f"{path}: counts of {key!r} are not a list of {NUM_CLASSES} numbers")
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """JSON text with one line per file, so the file stays readable and diffable."""
    head = json.dumps({k: v for k, v in stats.items() if k != "files"}, indent=1)
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in stats["files"].items())
    return f'{head[:-2]},\n "files": {{\n{rows}\n }}\n}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data.class_stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", required=True, help="dataset layout (cityscapes, gtav, acdc, …)")
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--split", required=True, help="split, e.g. train or all")
    parser.add_argument("--conditions", nargs="*", default=None, help="ACDC conditions (default: all)")
    parser.add_argument("--out", required=True, help="output JSON; never overwritten")
    parser.add_argument("--workers", type=int, default=1, help="parallel label readers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    out = Path(args.out)
    # Checked before the (long) count and again when writing: statistics are never replaced silently.
    if out.exists():
        print(f"error: {out} exists; remove it or choose another --out", file=sys.stderr)
        return 2
    try:
        stats = compute_stats(args.layout, args.root, args.split, args.conditions, max(1, args.workers),
                              progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with out.open("x") as f:  # exclusive: fails if --out appeared meanwhile
            f.write(format_stats(stats))
    except FileExistsError:
        print(f"error: {out} exists; remove it or choose another --out", file=sys.stderr)
        return 2
    totals = np.asarray(stats["class_pixels"], dtype=np.float64)
    share = totals / max(totals.sum(), 1)
    print(f"{len(stats['files'])} files, class shares: " + " ".join(f"{s:.4f}" for s in share))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
