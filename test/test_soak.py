"""A short run of the soak script (scripts/soak.py): its report, no frame lost, memory bounded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_soak(tmp_path, tiny_model_dir, ros_domain_id):
    report_path = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--model", str(tiny_model_dir),
                          "--frames", "300", "--warmup", "100", "--width", "320", "--height", "240",
                          "--json", str(report_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["passed"] and not report["failures"]
    assert report["frames"]["sent"] == report["frames"]["labels_received"] == 300 and report["frames"]["lost"] == 0
    counters = report["node_counters"]
    assert counters["errors"] == counters["malformed"] == 0
    assert counters["received"] == counters["processed"] + counters["dropped"] + counters["idle"]
    # The same 5 % bound as the long run: a short run grows well under 1 % after warm-up here.
    assert report["rss_mb"]["growth_pct"] < report["rss_mb"]["limit_pct"] == 5.0
    assert report["throughput_fps"] > 0 and report["latency_ms"]["median"] > 0
    assert report["node_exit_code"] == 0
