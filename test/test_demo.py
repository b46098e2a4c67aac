"""The demo end to end at toy size: data → training → export → bag → node over DDS → report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, ros_domain_id):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dgss_perception.cli", "demo", "--out", str(out), "--iters", "4",
           "--train-scenes", "8", "--test-scenes", "2", "--rate", "8"]
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
    # A second run reuses the trained model.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reusing the trained model" in again.stdout
