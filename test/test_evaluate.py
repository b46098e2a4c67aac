"""Offline evaluation: report.json numbers against a hand computation, charts, refusals and exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import make_tiny_weights
from dgss_perception.labels import CITYSCAPES_CLASSES
from dgss_perception.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from training.checkpoint import load_state_dict_file
from training.config import EvalSetConfig, config_to_dict
from training.data.datasets import find_samples, read_rgb, read_train_ids
from training.evaluate import main
from training.inference import Predictor
from training.report import metrics_summary, plot_confusion, plot_iou_bars

CS_SIZE = (56, 84)  # the tiny network's own size: whole mode runs without resampling
ACDC_SIZE = (56, 112)  # two 56-pixel windows wide, so slide mode overlaps (stride 28: three windows)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _labels(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Bands of sky, building, road with a car, plus ignored pixels: a few classes present, most absent."""
    h, w = size
    labels = np.full((h, w), 2, np.uint8)
    labels[: h // 4] = 10
    labels[h // 2:] = 0
    x = int(rng.integers(0, w // 2))
    labels[h // 2: h - 4, x: x + w // 4] = 13
    labels[-2:] = 255
    return labels


def _image(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Colour per class plus noise, so predictions vary across the frame."""
    base = np.array([(i * 53) % 256 for i in range(256)], np.uint8)[labels]
    noise = rng.integers(0, 60, (*labels.shape, 3))
    return np.clip(base[..., None].astype(int) + noise, 0, 255).astype(np.uint8)


def _make_data(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    cs, acdc = root / "cityscapes", root / "acdc"
    for i in range(2):
        stem = f"aachen_000000_{i:06d}"
        labels = _labels(rng, CS_SIZE)
        _write(cs / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png", _image(rng, labels))
        _write(cs / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_labelTrainIds.png", labels)
    for cond in ("night", "snow"):
        for i in range(2):
            stem = f"GOPR0351_frame_{i:06d}"
            labels = _labels(rng, ACDC_SIZE)
            _write(acdc / "rgb_anon" / cond / "val" / "GOPR0351" / f"{stem}_rgb_anon.png", _image(rng, labels))
            _write(acdc / "gt" / cond / "val" / "GOPR0351" / f"{stem}_gt_labelTrainIds.png", labels)
    return cs, acdc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as training leaves it: config.yaml (with Cityscapes and ACDC val sets) and weights."""
    root = tmp_path_factory.mktemp("eval")
    cs, acdc = _make_data(root / "data")
    run = root / "run"
    run.mkdir()
    cfg = make_tiny_weights(run / "model.safetensors")
    cfg.data.val = [EvalSetConfig(layout="cityscapes", root=str(cs)),
                    EvalSetConfig(layout="acdc", root=str(acdc), conditions=["night", "snow"])]
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return run


def _hand(run: Path, layout: str, root: str, conditions: list[str] | None, limit: int | None = None,
          **predictor_args: object) -> dict[str, np.ndarray]:
    """Confusion per domain computed here: Predictor directly, metrics from dgss_perception."""
    from training.config import load_config

    cfg = load_config(run / "config.yaml")
    predictor = Predictor(cfg, load_state_dict_file(run / "model.safetensors"), "cpu", **predictor_args)
    confs: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for sample in find_samples(layout, root, "val", conditions):
        counts[sample.domain] = counts.get(sample.domain, 0) + 1
        if limit is not None and counts[sample.domain] > limit:
            continue
        pred, _ = predictor.predict(read_rgb(sample.image))
        gt = read_train_ids(sample.label)
        confs[sample.domain] = confs.get(sample.domain, 0) + confusion_matrix(pred, gt, 19)
    return confs


def _check_entry(entry: dict, conf: np.ndarray, images: int) -> None:
    assert entry["images"] == images
    assert np.array_equal(np.array(entry["confusion"]), conf)
    assert entry["miou"] == pytest.approx(mean_iou(conf), abs=1e-12)
    assert entry["pixel_accuracy"] == pytest.approx(pixel_accuracy(conf), abs=1e-12)
    ious = iou_per_class(conf)
    assert list(entry["iou"]) == list(CITYSCAPES_CLASSES)
    for name, want in zip(CITYSCAPES_CLASSES, ious):
        if np.isnan(want):  # absent from ground truth and prediction: null, left out of the mean
            assert entry["iou"][name] is None
        else:
            assert entry["iou"][name] == pytest.approx(want, abs=1e-12)


def _check_charts(out: Path, report: dict, expected: int) -> None:
    assert len(report["charts"]) == expected and "iou_per_class.png" in report["charts"]
    for name in report["charts"]:
        image = cv2.imread(str(out / name))
        assert image is not None and image.size > 0, name


def test_whole_mode_config_sets(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "whole"
    assert main(["--run", str(run_dir), "--mode", "whole", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "acdc/night" in printed and "mIoU" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "whole" and report["inference"]["mode"] == "whole"
    assert report["weights"]["path"] == str((run_dir / "model.safetensors").resolve())
    import hashlib

    assert report["weights"]["sha256"] == hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    assert set(report["sets"]) == {"cityscapes/val", "acdc/val"}
    assert set(report["sets"]["cityscapes/val"]["domains"]) == {"cityscapes"}
    assert set(report["sets"]["acdc/val"]["domains"]) == {"acdc/night", "acdc/snow"}
    assert "refined_share" not in report["sets"]["acdc/val"]["overall"]

    val = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["val"]
    cs = _hand(run_dir, "cityscapes", val[0]["root"], None, mode="whole")
    acdc = _hand(run_dir, "acdc", val[1]["root"], ["night", "snow"], mode="whole")
    _check_entry(report["sets"]["cityscapes/val"]["domains"]["cityscapes"], cs["cityscapes"], 2)
    _check_entry(report["sets"]["cityscapes/val"]["overall"], cs["cityscapes"], 2)
    for domain in ("acdc/night", "acdc/snow"):
        _check_entry(report["sets"]["acdc/val"]["domains"][domain], acdc[domain], 2)
    _check_entry(report["sets"]["acdc/val"]["overall"], acdc["acdc/night"] + acdc["acdc/snow"], 4)
    # Three domains: three heatmaps and the shared bar chart.
    _check_charts(out, report, 4)

    # An existing report is not overwritten without --overwrite; with it, it is replaced.
    before = (out / "report.json").read_bytes()
    assert main(["--run", str(run_dir), "--mode", "whole", "--out", str(out), "--no-progress", "--no-charts"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before
    assert main(["--run", str(run_dir), "--mode", "whole", "--out", str(out), "--no-progress", "--no-charts",
                 "--overwrite"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["charts"] == [] and not list(out.glob("*.png"))  # the old report's charts went with it
    assert again["sets"]["acdc/val"]["overall"]["confusion"] == report["sets"]["acdc/val"]["overall"]["confusion"]


def test_slide_mode_command_line_set(run_dir: Path, tmp_path: Path) -> None:
    acdc = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["val"][1]["root"]
    out = tmp_path / "slide"
    weights = tmp_path / "weights.safetensors"
    shutil.copy(run_dir / "model.safetensors", weights)
    assert main(["--config", str(run_dir / "config.yaml"), "--weights", str(weights), "--mode", "slide",
                 "--window", "56", "--stride", "28", "--layout", "acdc", "--root", acdc, "--split", "val",
                 "--conditions", "night", "snow", "--limit", "1", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "slide"
    assert report["inference"]["window"] == 56 and report["inference"]["stride"] == 28
    assert list(report["sets"]) == ["acdc/val"] and report["limit"] == 1
    hand = _hand(run_dir, "acdc", acdc, ["night", "snow"], limit=1, mode="slide", window=56, stride=28)
    for domain in ("acdc/night", "acdc/snow"):
        _check_entry(report["sets"]["acdc/val"]["domains"][domain], hand[domain], 1)
    _check_charts(out, report, 3)


def test_bad_arguments_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(run_dir / "config.yaml")

    def fails(*argv: str, match: str) -> None:
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err

    fails("--config", config, "--weights", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o1"),
          match="weights file not found")
    fails("--run", str(tmp_path / "no_run"), match="run directory not found")
    fails("--config", config, "--out", str(tmp_path / "o2"), match="--weights")
    fails("--run", str(run_dir), "--layout", "acdc", "--out", str(tmp_path / "o3"), match="--root")
    fails("--run", str(run_dir), "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o4"),
          match="no Cityscapes images")
    fails("--run", str(run_dir), "--mode", "bogus", match="invalid choice")
    fails("--run", str(run_dir), "--mode", "coarse_to_fine", "--out", str(tmp_path / "o5"), match="refine head")
    (tmp_path / "not_weights.safetensors").write_bytes(b"garbage")
    fails("--config", config, "--weights", str(tmp_path / "not_weights.safetensors"), "--out", str(tmp_path / "o6"),
          match="not a readable safetensors file")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


def test_report_helpers(tmp_path: Path) -> None:
    conf = np.zeros((19, 19), np.int64)
    conf[0, 0], conf[0, 1], conf[13, 13] = 30, 10, 5
    summary = metrics_summary(conf, CITYSCAPES_CLASSES)
    assert summary["iou"]["road"] == pytest.approx(0.75) and summary["iou"]["sidewalk"] == 0.0
    assert summary["iou"]["sky"] is None and summary["pixels"] == 45
    assert summary["miou"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert json.loads(json.dumps(summary)) == summary  # plain JSON, no NaN
    heat = plot_confusion(conf, CITYSCAPES_CLASSES, tmp_path / "c.png")
    bars = plot_iou_bars({"a": iou_per_class(conf), "b": iou_per_class(conf.T)}, CITYSCAPES_CLASSES,
                         tmp_path / "b.png", mious={"a": 0.5, "b": None})
    for path in (heat, bars):
        assert cv2.imread(str(path)) is not None


def test_coarse_to_fine_mode(tmp_path, tiny_c2f_dir):
    """A VFMNet + MGRNet run evaluated coarse-to-fine: scores equal the reference's, refined share reported."""
    from conftest import TINY_C2F_CONFIG
    from training.config import config_from_dict

    rng = np.random.default_rng(9)
    acdc = tmp_path / "acdc"
    for i in range(2):
        stem = f"GOPR0400_frame_{i:06d}"
        labels = _labels(rng, (100, 230))  # not the working size: resized to test_size and scored at its own
        _write(acdc / "rgb_anon" / "night" / "val" / "GOPR0400" / f"{stem}_rgb_anon.png", _image(rng, labels))
        _write(acdc / "gt" / "night" / "val" / "GOPR0400" / f"{stem}_gt_labelTrainIds.png", labels)
    cfg = config_from_dict(TINY_C2F_CONFIG)
    weights = tiny_c2f_dir.parent / "weights.safetensors"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    out = tmp_path / "report"
    assert main(["--config", str(config), "--weights", str(weights), "--mode", "coarse_to_fine", "--theta", "0.9",
                 "--c-tau", "0.9", "--layout", "acdc", "--root", str(acdc), "--conditions", "night",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "coarse_to_fine" and report["inference"]["theta"] == 0.9
    (entry,) = report["sets"].values()
    night = entry["domains"]["acdc/night"]
    predictor = Predictor(cfg, load_state_dict_file(weights), mode="coarse_to_fine", theta=0.9, c_tau=0.9)
    conf = sum(confusion_matrix(predictor.predict(read_rgb(s.image))[0], read_train_ids(s.label), 19)
               for s in find_samples("acdc", acdc, "val", ["night"]))
    assert np.array_equal(np.array(night["confusion"]), conf)
    assert night["miou"] == pytest.approx(mean_iou(conf))
    assert night["windows_total"] == 2 * 18 and night["windows_refined"] == predictor.windows_refined
    assert night["refined_share"] == pytest.approx(predictor.windows_refined / 36)
    assert all((out / name).is_file() for name in report["charts"])
