"""The demo end to end at toy size: data → training → export → bag → node over DDS → report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from dgss_perception.monitor import Calibration

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, ros_domain_id):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dgss_perception.cli", "demo", "--out", str(out), "--iters", "4",
           "--train-scenes", "8", "--test-scenes", "2", "--rate", "8", "--reference-scenes", "4"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["frames_sent"] == {"day": 2, "night": 2, "snow": 2}
    assert report["frames_received"] == report["frames_sent"]
    assert report["node_labels_identical_to_engine"] == "6/6"
    assert set(report["conditions"]) == {"day", "night", "snow"}
    assert all(0 <= c["miou"] <= 100 for c in report["conditions"].values())
    assert (out / "model" / "card.json").is_file() and (out / "drive" / "metadata.yaml").is_file()
    panels = sorted((out / "overlays").glob("*.png"))
    assert len(panels) == 6 and cv2.imread(str(panels[0])).shape[1] == 3 * 512
    assert len(list((out / "labels").glob("*.png"))) == 6
    # labels/compressed: every frame's PNG received, decoding to exactly the raw labels, far smaller than them.
    packed = report["compressed_labels"]
    assert packed["format"] == ["mono8; png compressed mono8"] and packed["decode_identical_to_labels"] == "6/6"
    assert packed["raw_bytes"] == 512 * 256 and 0 < packed["png_bytes_max"] < packed["raw_bytes"] / 4
    assert "Compressed labels (/camera/labels/compressed, lossless PNG)" in (out / "report.md").read_text()
    stored = cv2.imread(str(sorted((out / "labels").glob("*.png"))[0]), cv2.IMREAD_UNCHANGED)
    assert stored.shape == (256, 512) and stored.dtype == "uint8"
    # The domain-shift monitor, calibrated on held-out day scenes: the node's figures and level for every frame
    # (a 4-iteration model separates nothing; the full demo's report shows day against night and snow).
    calibration = Calibration.load(out / "monitor_day.json")
    assert calibration.reference["frames"] == 4 and (out / "reference_day" / "metadata.yaml").is_file()
    shift = report["domain_shift"]
    assert set(shift["conditions"]) == {"day", "night", "snow"}
    for c in shift["conditions"].values():
        assert c["frames"] == 2 and len(c["level_sequence"]) == 2 and sum(c["levels"].values()) == 2
        assert 0 <= c["low_confidence_share_mean"] <= 1 and 0 < c["mean_confidence_mean"] <= 1
    assert "Domain-shift monitor" in (out / "report.md").read_text()
    # A second run reuses the trained model.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reusing the trained model" in again.stdout
