r"""Evaluate trained weights on labelled datasets: mIoU per domain, a JSON report and charts.

Usage::

    python -m training.evaluate --run runs/vfmnet --mode slide --out runs/vfmnet/eval_slide
    python -m training.evaluate --config cfg.yaml --weights model.safetensors \\
        --layout acdc --root data/acdc --split val --conditions night snow --out eval_acdc

Every sample is predicted with :class:`training.inference.Predictor` at its own size
and compared with its label (19 classes, 255 ignored). Confusion matrices are summed
per domain (``Sample.domain``: each ACDC condition apart) and per evaluation set;
``report.json`` holds the metrics and the matrices, the PNG charts a row-normalised
confusion matrix per domain and the IoU per class of all domains side by side.

Exit status: 0 done, 2 bad arguments or missing/unreadable files (one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dgss_perception.labels import IGNORE_INDEX
from dgss_perception.metrics import confusion_matrix, iou_per_class, mean_iou

from . import report as rp
from .config import EvalSetConfig, TrainConfig, load_config
from .data import datasets
from .data.datasets import Sample, find_samples
from .inference import MODES, Predictor

REPORT_FILE = "report.json"
IOU_CHART = "iou_per_class.png"


class EvalError(Exception):
    """A bad argument or an unusable input; the message says which."""


def _load(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(rgb, trainIds) of a sample, through ``datasets.load_sample`` where the dataset module has it."""
    loader = getattr(datasets, "load_sample", None)
    if loader is not None:
        return loader(sample)
    rgb, labels = datasets.read_rgb(sample.image), datasets.read_train_ids(sample.label)
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"image {sample.image} is {rgb.shape[1]}×{rgb.shape[0]} but its label {sample.label} "
                         f"is {labels.shape[1]}×{labels.shape[0]}")
    return rgb, labels


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Tally:
    """What one domain (or one whole set) accumulates."""

    confusion: np.ndarray
    images: int = 0
    windows_total: int = 0
    windows_refined: int = 0
    seconds: float = 0.0

    @classmethod
    def empty(cls, num_classes: int) -> Tally:
        return cls(np.zeros((num_classes, num_classes), dtype=np.int64))

    def add(self, other: Tally) -> None:
        self.confusion += other.confusion
        self.images += other.images
        self.windows_total += other.windows_total
        self.windows_refined += other.windows_refined
        self.seconds += other.seconds

    def summary(self, names: list[str], mode: str) -> dict[str, Any]:
        out: dict[str, Any] = {"images": self.images, "seconds": round(self.seconds, 3)}
        out.update(rp.metrics_summary(self.confusion, names))
        if mode == "coarse_to_fine":
            out["windows_total"] = self.windows_total
            out["windows_refined"] = self.windows_refined
            out["refined_share"] = rp.json_float(self.windows_refined / self.windows_total
                                                 if self.windows_total else float("nan"))
        return out


def evaluate_samples(predictor: Predictor, samples: list[Sample], num_classes: int, *,
                     progress: bool = False, desc: str = "evaluating") -> dict[str, Tally]:
    """Predict every sample and sum its confusion matrix into its domain's tally.

    Raises:
        EvalError: a sample that cannot be read, or a frame the mode cannot predict, naming the file.
    """
    tallies: dict[str, Tally] = {}
    for sample in tqdm(samples, desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
        try:
            rgb, gt = _load(sample)
        except (FileNotFoundError, ValueError) as exc:
            raise EvalError(str(exc)) from exc
        total, refined = predictor.windows_total, predictor.windows_refined
        t0 = time.perf_counter()
        try:
            pred, _ = predictor.predict(rgb)
        except ValueError as exc:  # e.g. a frame smaller than the slide window
            raise EvalError(f"{sample.image}: {exc}") from exc
        tally = tallies.setdefault(sample.domain, Tally.empty(num_classes))
        tally.seconds += time.perf_counter() - t0
        tally.confusion += confusion_matrix(pred, gt, num_classes)
        tally.images += 1
        tally.windows_total += predictor.windows_total - total
        tally.windows_refined += predictor.windows_refined - refined
    return tallies


# --- command line --------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--run", type=Path, help="training run directory (config.yaml and model.safetensors)")
    src.add_argument("--config", type=Path, help="training config YAML (default: RUN/config.yaml)")
    src.add_argument("--weights", type=Path,
                     help="weights, .safetensors or a torch checkpoint (default: RUN/model.safetensors)")
    src.add_argument("--device", default=None, help="torch device (default: the config's, auto = cuda if available)")
    inf = p.add_argument_group("inference (default: the config's inference section)")
    inf.add_argument("--mode", choices=MODES)
    inf.add_argument("--window", type=_positive_int, help="slide window (pixels)")
    inf.add_argument("--stride", type=_positive_int, help="slide stride (pixels)")
    inf.add_argument("--theta", type=_unit_float, help="coarse_to_fine: confident-pixel threshold")
    inf.add_argument("--c-tau", dest="c_tau", type=_unit_float,
                     help="coarse_to_fine: refine windows whose confident share is below this")
    inf.add_argument("--test-size", type=_positive_int, nargs=2, metavar=("H", "W"),
                     help="resize frames to H×W before inference (scores stay at the label's size)")
    inf.add_argument("--coarse-size", type=_positive_int, nargs=2, metavar=("H", "W"), help="coarse stage input size")
    data = p.add_argument_group("data (default: the config's data.val sets)")
    data.add_argument("--root", type=Path, help="evaluate this dataset instead of data.val")
    data.add_argument("--layout", help="dataset layout of --root (default: cityscapes)")
    data.add_argument("--split", help="split of --root (default: val)")
    data.add_argument("--conditions", nargs="+", metavar="COND", help="ACDC conditions of --root (default: all)")
    data.add_argument("--limit", type=_positive_int, metavar="N",
                      help="only the first N samples of every domain (smoke tests)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="report directory (default: RUN/eval_<mode>; must be empty)")
    out.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing a report")
    out.add_argument("--no-charts", dest="charts", action="store_false", help="report.json only")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _eval_sets(args: argparse.Namespace, cfg: TrainConfig) -> list[EvalSetConfig]:
    if args.root is None:
        if args.layout or args.split or args.conditions:
            raise EvalError("--layout, --split and --conditions describe --root; give --root as well")
        if not cfg.data.val:
            raise EvalError("the config has no data.val sets; name a dataset with --root (and --layout, --split)")
        return list(cfg.data.val)
    return [EvalSetConfig(layout=args.layout or "cityscapes", root=str(args.root), split=args.split or "val",
                          conditions=list(args.conditions or []))]


def _set_names(sets: list[EvalSetConfig]) -> list[str]:
    """Unique report keys: layout/split, numbered where two sets share them."""
    names: list[str] = []
    for s in sets:
        base = f"{s.layout}/{s.split}"
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def _first_per_domain(samples: list[Sample], limit: int) -> list[Sample]:
    """The first ``limit`` samples of each domain, so a smoke test still sees every ACDC condition."""
    seen: dict[str, int] = {}
    kept = []
    for sample in samples:
        seen[sample.domain] = seen.get(sample.domain, 0) + 1
        if seen[sample.domain] <= limit:
            kept.append(sample)
    return kept


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty directory unless overwrite."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EvalError(f"--out {out} exists and is not empty (pass --overwrite to write into it)")


def _remove_previous(out: Path) -> None:
    """Delete the report and charts an earlier run wrote to ``out`` (what its report.json lists, nothing else).

    Stale charts of domains no longer evaluated would otherwise sit beside the new report.
    """
    old = out / REPORT_FILE
    try:
        charts = json.loads(old.read_text()).get("charts", []) if old.is_file() else []
    except (OSError, ValueError, AttributeError):
        charts = []
    for name in [*charts, REPORT_FILE]:
        target = out / Path(str(name)).name
        if target.is_file():
            target.unlink()


def _resolve_model(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.run is not None and not args.run.is_dir():
        raise EvalError(f"run directory not found: {args.run}")
    config = args.config or (args.run / "config.yaml" if args.run else None)
    weights = args.weights or (args.run / "model.safetensors" if args.run else None)
    if config is None or weights is None:
        raise EvalError("give --run RUN_DIR, or both --config and --weights")
    for what, path in (("config", config), ("weights file", weights)):
        if not path.is_file():
            raise EvalError(f"{what} not found: {path}")
    return config, weights


def _device(name: str) -> Any:
    """A torch device; ``auto`` is CUDA where available, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise EvalError(f"unknown device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device {name} asked for, but CUDA is not available")
    return device


def _print_table(sets: dict[str, Any], mode: str) -> None:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    rows = [("set", "domain", "images", "mIoU %", "pixel acc %") + (("refined %",) if mode == "coarse_to_fine" else ())]
    for set_name, entry in sets.items():
        parts = list(entry["domains"].items())
        if len(parts) > 1:
            parts.append(("(all)", entry["overall"]))
        for domain, m in parts:
            row = (set_name, domain, str(m["images"]), pct(m["miou"]), pct(m["pixel_accuracy"]))
            if mode == "coarse_to_fine":
                row += (pct(m.get("refined_share")),)
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Evaluate as the parsed arguments say; returns the report and the directory holding it."""
    import torch

    from .checkpoint import load_state_dict_file

    config_path, weights_path = _resolve_model(args)
    try:
        cfg = load_config(config_path)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalError(f"config {config_path}: {exc}") from exc
    mode = args.mode or cfg.inference.mode
    out = args.out or (args.run / f"eval_{mode}" if args.run else None)
    if out is None:
        raise EvalError("give --out DIR for the report")
    # Cheap refusals first: nothing long runs before the output and the charts are known to work.
    _check_out(out, args.overwrite)
    if args.charts and not rp.charts_available():
        raise EvalError(rp.MISSING_MATPLOTLIB)
    sets = _eval_sets(args, cfg)
    names = _set_names(sets)
    samples: dict[str, list[Sample]] = {}
    for name, s in zip(names, sets):
        try:
            found = find_samples(s.layout, s.root, s.split, s.conditions or None)
        except (FileNotFoundError, ValueError) as exc:
            raise EvalError(f"evaluation set {name} ({s.root}): {exc}") from exc
        samples[name] = _first_per_domain(found, args.limit) if args.limit else found

    overrides = {k: getattr(args, k) for k in ("window", "stride", "theta", "c_tau") if getattr(args, k) is not None}
    for key in ("test_size", "coarse_size"):
        if getattr(args, key) is not None:
            overrides[key] = list(getattr(args, key))
    try:
        state = load_state_dict_file(weights_path)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalError(str(exc)) from exc
    device = _device(args.device or cfg.device)
    try:
        predictor = Predictor(cfg, state, device, mode=mode, **overrides)
        p = predictor.params
        first = {"whole": cfg.model.img_size, "slide": [p.window, p.window]}.get(mode, p.coarse_size)
        predictor.model(tuple(first))  # a checkpoint that does not fit the config fails here, not mid-run
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: tensor shapes unlike the config's
        raise EvalError(f"cannot build the predictor from {weights_path}: {exc}") from exc

    num_classes = cfg.model.num_classes
    classes = rp.class_names(num_classes)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": str(config_path.resolve()),
        "name": cfg.name,
        "weights": {"path": str(weights_path.resolve()), "sha256": sha256_file(weights_path)},
        "device": str(device),
        "torch": torch.__version__,
        "mode": mode,
        "inference": dataclasses.asdict(p),
        "network_size": list(cfg.model.img_size),
        "num_classes": num_classes,
        "classes": classes,
        "ignore_index": IGNORE_INDEX,
        "limit": args.limit,
        "sets": {},
    }
    tallies: dict[str, dict[str, Tally]] = {}
    for name, s in zip(names, sets):
        domains = evaluate_samples(predictor, samples[name], num_classes, progress=args.progress, desc=name)
        overall = Tally.empty(num_classes)
        for tally in domains.values():
            overall.add(tally)
        tallies[name] = domains
        report["sets"][name] = {
            "layout": s.layout, "root": str(s.root), "split": s.split, "conditions": list(s.conditions),
            "overall": overall.summary(classes, mode),
            "domains": {d: t.summary(classes, mode) for d, t in sorted(domains.items())},
        }
    report["seconds"] = round(time.perf_counter() - started, 3)
    # The old report goes only now: a run that fails half-way leaves it as it was.
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous(out)
    report["charts"] = _charts(out, tallies, classes) if args.charts else []
    tmp = out / (REPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / REPORT_FILE)
    return report, out


def _charts(out: Path, tallies: dict[str, dict[str, Tally]], classes: list[str]) -> list[str]:
    """A confusion heatmap per domain and one grouped IoU chart of every domain; file names relative to out."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    all_domains = [d for domains in tallies.values() for d in domains]
    ious: dict[str, np.ndarray] = {}
    mious: dict[str, float | None] = {}
    for set_name, domains in tallies.items():
        for domain, tally in sorted(domains.items()):
            # The set prefixes the label only when one domain occurs in two sets (e.g. two Cityscapes splits).
            label = domain if all_domains.count(domain) == 1 else f"{set_name}: {domain}"
            name = f"confusion_{rp.slug(set_name)}_{rp.slug(domain)}.png"
            rp.plot_confusion(tally.confusion, classes, out / name, title=f"{label}: confusion (row-normalised, %)")
            files.append(name)
            ious[label] = iou_per_class(tally.confusion)
            mious[label] = rp.json_float(mean_iou(tally.confusion))
    if ious:
        rp.plot_iou_bars(ious, classes, out / IOU_CHART, title="IoU per class and domain", mious=mious)
        files.append(IOU_CHART)
    return files


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; 0 done, 2 bad arguments or files."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message; keep main() returning a status
        return int(exc.code or 0)
    try:
        report, out = run(args)
    except (EvalError, rp.ChartError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print()
    _print_table(report["sets"], report["mode"])
    print(f"\nreport: {out / REPORT_FILE}" + (f" (+ {len(report['charts'])} charts)" if report["charts"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
