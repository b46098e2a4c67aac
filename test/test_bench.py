"""``dgss-perception bench``: the report's structure and consistency (never timing thresholds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgss_perception import bench
from dgss_perception.cli import main

STAGES = ("decode", "preprocess", "inference", "postprocess", "encode", "total")


def run(argv: list[str]) -> int:
    return main(["bench", *argv])


def check_summary(s: dict, count: int) -> None:
    assert s["count"] == count
    assert 0 <= s["min"] <= s["median"] <= s["p90"] <= s["p99"] <= s["max"]


def check_engine(report: dict, frames: int) -> None:
    eng = report["engine"]
    assert eng["frames"] == frames
    for stage in STAGES:
        check_summary(eng["stages_ms"][stage], frames)
    # One iteration's wall time holds every stage, so on average it is at least their sum (3-decimal rounding).
    means = [eng["stages_ms"][s]["mean"] for s in STAGES[:-1]]
    assert eng["stages_ms"]["total"]["mean"] >= sum(means) - 0.01
    # Throughput of the sequential loop is the inverse of the mean total.
    assert eng["throughput_fps"] > 0
    assert eng["throughput_fps"] == pytest.approx(1000.0 / eng["stages_ms"]["total"]["mean"], rel=0.01)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8"])
def test_engine_only(tmp_path, tiny_model_dir, ros_domain_id, capsys, encoding):
    out = tmp_path / "bench.json"
    code = run(["--model", str(tiny_model_dir), "--width", "320", "--height", "240", "--encoding", encoding,
                "--frames", "8", "--warmup", "2", "--no-node", "--peak-gflops", "50", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["schema"] == bench.SCHEMA and report["error"] is None
    assert report["input"] == {"width": 320, "height": 240, "encoding": encoding, "jpeg_quality": None,
                               "pool": bench.POOL_SIZE}
    pkg = report["package"]
    assert pkg["name"] == "tiny_test" and pkg["mode"] == "whole" and pkg["precision"] == "fp32"
    assert report["backend"]["name"] == "onnxruntime" and report["backend"]["device"] == "cpu"
    assert report["device"]["cores"] >= 1 and report["device"]["cpu"]
    assert "--no-node" in report["command"] and "--encoding " + encoding in report["command"]
    check_engine(report, 8)
    assert report["engine"]["windows_refined_mean"] is None
    floor = report["raw_floor"]
    for form in ("ms", "prebuilt_ms", "subscriber_in_process_ms"):  # received over DDS; built here; both here
        check_summary(floor[form], 8)
    # Every frame came back from the peer process and its labels were acknowledged there.
    assert floor["delivered"] == floor["published"] == 8 + floor["warmup"]
    assert "received from another process" in floor["steps"][0] and "another process" in floor["steps"][-1]
    cf = report["compute_floor"]
    assert cf["peak_source"] == "given" and cf["peak_gflops_used"] == 50
    flops = json.loads((tiny_model_dir / "card.json").read_text())["export"].get("flops")
    if flops:  # FLOPs at 50 GFLOP/s, against the engine's inference median
        assert cf["flops_per_frame"] == flops["whole"]
        assert cf["floor_ms"] == pytest.approx(flops["whole"] / 50e9 * 1e3, rel=1e-3)
        assert cf["ratio"] == pytest.approx(report["engine"]["stages_ms"]["inference"]["median"] / cf["floor_ms"],
                                            rel=1e-2)
    assert report["node"] is None
    assert report["summary"]["node_max_throughput_fps"] is None
    assert set(report["definitions"]) >= {"engine", "raw_floor", "node_overhead", "compute_floor"}
    printed = capsys.readouterr().out
    assert "inference" in printed and "raw floor" in printed and "not run (--no-node)" in printed


def test_engine_1080p_jpeg_measures_peak(tmp_path, tiny_model_dir, ros_domain_id):
    out = tmp_path / "bench.json"
    code = run(["--model", str(tiny_model_dir), "--encoding", "jpeg", "--frames", "3", "--warmup", "1",
                "--no-node", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["input"]["width"] == 1920 and report["input"]["height"] == 1080
    assert report["input"]["jpeg_quality"] == bench.JPEG_QUALITY
    check_engine(report, 3)
    assert report["raw_floor"]["steps"][0].startswith("decode the jpeg")
    assert report["raw_floor"]["delivered"] == report["raw_floor"]["published"]  # compressed frames echoed too
    cf = report["compute_floor"]
    assert cf["peak_source"] == "measured" and cf["peak_gflops"]["fp32"] > 0


def test_coarse_to_fine_reports_windows_refined(tmp_path, tiny_c2f_dir, ros_domain_id):
    out = tmp_path / "bench.json"
    code = run(["--model", str(tiny_c2f_dir), "--width", "320", "--height", "240", "--frames", "5",
                "--warmup", "1", "--no-node", "--peak-gflops", "50", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["package"]["mode"] == "coarse_to_fine"
    assert report["backend"]["graphs"] == ["coarse", "refine"]
    check_engine(report, 5)
    eng = report["engine"]
    assert eng["windows_per_frame"] == 18
    assert 0 <= eng["windows_refined_mean"] <= eng["windows_per_frame"]
    flops = json.loads((tiny_c2f_dir / "card.json").read_text())["export"].get("flops")
    if flops:  # coarse + mean windows refined × refine_per_window
        cf = report["compute_floor"]
        assert cf["flops_per_frame"] == pytest.approx(
            flops["coarse"] + eng["windows_refined_mean"] * flops["refine_per_window"])
        assert cf["floor_ms"] == pytest.approx(cf["flops_per_frame"] / 50e9 * 1e3, rel=1e-3)


@pytest.mark.parametrize("flops", [{"whole": 2.0e9, "batch": 1}, None])
def test_compute_floor_from_card_flops(tmp_path, tiny_model_dir, ros_domain_id, flops):
    package = tmp_path / "package"
    shutil.copytree(tiny_model_dir, package)
    card = json.loads((package / "card.json").read_text())
    card["export"].pop("flops", None)  # the checksums cover the graphs, not the card
    if flops:
        card["export"]["flops"] = flops
    (package / "card.json").write_text(json.dumps(card))
    out = tmp_path / "bench.json"
    assert run(["--model", str(package), "--width", "320", "--height", "240", "--frames", "4", "--warmup", "1",
                "--no-node", "--peak-gflops", "100", "--json", str(out)]) == 0
    cf = json.loads(out.read_text())["compute_floor"]
    assert cf["peak_gflops"] == {"fp32": 100} and cf["model_ms"] > 0
    if flops:
        assert cf["flops_per_frame"] == 2.0e9 and cf["flops_terms"] == {"whole": 2.0e9}
        assert cf["floor_ms"] == pytest.approx(20.0)  # 2 GFLOP at 100 GFLOP/s
        assert cf["ratio"] == pytest.approx(cf["model_ms"] / 20.0, abs=0.01)
    else:  # a card without FLOPs: null figures, the peak still reported
        assert cf["flops_per_frame"] is None and cf["floor_ms"] is None and cf["ratio"] is None and cf["flops_note"]


def test_flops_per_frame():
    flops = {"flops": {"coarse": 10.0, "refine_per_window": 4.0, "whole": 7}}
    assert bench.flops_per_frame(flops, "coarse_to_fine", 2.5)["total"] == 20.0
    assert bench.flops_per_frame(flops, "coarse", 2.5)["total"] == 10.0
    assert bench.flops_per_frame(flops, "whole", None)["total"] == 7.0
    assert bench.flops_per_frame({}, "whole", None) is None
    assert bench.flops_per_frame({"flops": {"coarse": 10.0}}, "coarse_to_fine", 1.0) is None
    assert bench.flops_per_frame({"flops": {"whole": True}}, "whole", None) is None
    assert bench.flops_per_frame({"flops": "n/a"}, "whole", None) is None
    # A fixed batch of 4 runs whole for one frame: it costs the whole batch's FLOPs.
    assert bench.flops_per_frame({"flops": {"whole": 8.0, "batch": 4}}, "whole", None) == {
        "total": 8.0, "terms": {"whole": 8.0, "batch": 4}}
    # Slide: every window of the card's grid runs the window graph once.
    assert bench.flops_per_frame({"flops": {"window": 3.0}}, "slide", None, 18) == {
        "total": 54.0, "terms": {"window": 3.0, "windows": 18}}
    assert bench.flops_per_frame({"flops": {"window": 3.0}}, "slide", None, None) is None


def test_measure_peak_gflops_cpu():
    peak = bench.measure_peak_gflops("cpu", size=256, budget_s=0.05)
    assert set(peak) == {"fp32"} and peak["fp32"] > 0


def test_with_node(tmp_path, tiny_model_dir, ros_domain_id, capsys):
    out = tmp_path / "bench.json"
    code = run(["--model", str(tiny_model_dir), "--width", "320", "--height", "240", "--frames", "5",
                "--warmup", "2", "--rate", "10", "--node-frames", "20", "--threads", "1", "--peak-gflops", "50",
                "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    report = json.loads(out.read_text())
    assert report["error"] is None
    check_engine(report, 5)
    node = report["node"]
    assert node["error"] is None and node["exit_code"] == 0 and node["log"] is None and node["wrong_labels"] == 0
    assert "threads:=1" in node["params"] and "qos_reliability:=reliable" in node["params"]
    assert "stats_window:=20" in node["params"]  # one phase per window
    mt = node["max_throughput"]
    assert mt["sent"] == mt["received"] == 20 and mt["throughput_fps"] > 0
    check_summary(mt["latency_ms"], 20)
    rate = node["latency_at_rate"]
    # A tiny model at 10 Hz keeps up: every frame reaches the node and comes back.
    assert rate["rate_hz"] == 10 and rate["sent"] == rate["received"] == rate["node_received"] == 20
    assert rate["lost"] == rate["lost_before_node"] == rate["node_dropped"] == rate["lost_after_node"] == 0
    assert rate["node_processed"] == 20
    check_summary(rate["latency_ms"], 20)
    after, end = node["diagnostics_after_max_throughput"], node["diagnostics_end"]
    assert after["complete"] and end["complete"]
    assert after["frames_received"] == after["frames_processed"] == 20 + node["warmup_frames"]
    assert end["frames_received"] == end["frames_processed"] == 40 + node["warmup_frames"]
    ov = node["overhead"]
    assert ov["node_latency_median_ms"] == after["latency_median_ms"] > 0
    assert ov["node_inference_median_ms"] == after["inference_median_ms"] > 0
    # Per frame latency − inference, its median: below the latency's median, over the closed loop's 20 frames.
    assert 0 < ov["overhead_ms"] == after["overhead_median_ms"] < ov["node_latency_median_ms"]
    assert ov["frames"] == after["stats_frames"] == 20
    assert ov["raw_floor_median_ms"] == report["raw_floor"]["ms"]["median"] > 0
    assert ov["prebuilt_floor_median_ms"] == report["raw_floor"]["prebuilt_ms"]["median"] > 0
    assert ov["ratio_to_raw_floor"] == pytest.approx(ov["overhead_ms"] / ov["raw_floor_median_ms"], rel=1e-2)
    assert ov["ratio_to_prebuilt_floor"] == pytest.approx(ov["overhead_ms"] / ov["prebuilt_floor_median_ms"], rel=1e-2)
    at_rate = ov["at_rate"]
    assert at_rate["overhead_ms"] == end["overhead_median_ms"] > 0 and at_rate["frames_from_phase"] == 20
    assert at_rate["ratio_to_raw_floor"] == pytest.approx(at_rate["overhead_ms"] / ov["raw_floor_median_ms"], rel=1e-2)
    summary = report["summary"]
    assert summary["node_max_throughput_fps"] == mt["throughput_fps"]
    assert summary["node_latency_at_rate_ms"] == rate["latency_ms"]["median"] and summary["rate_hz"] == 10
    assert "max throughput" in printed.out and "latency at 10 Hz" in printed.out
    assert report["dds"]["rmw"] and isinstance(report["dds"]["env"], dict)


def test_large_image_profile_loads_and_carries_the_node(tmp_path, tiny_model_dir, ros_domain_id):
    """The shipped Fast DDS profile parses, the bench and its node run under it, and the report says so."""
    profile = Path(__file__).resolve().parents[1] / "config" / "fastdds_large_images.xml"
    out = tmp_path / "bench.json"
    # A fresh process: Fast DDS reads its profiles once per process.
    env = {**os.environ, "FASTDDS_DEFAULT_PROFILES_FILE": str(profile), "FASTRTPS_DEFAULT_PROFILES_FILE": str(profile)}
    proc = subprocess.run([sys.executable, "-m", "dgss_perception.cli", "bench", "--model", str(tiny_model_dir),
                           "--width", "640", "--height", "480", "--frames", "3", "--warmup", "1",
                           "--node-frames", "10", "--rate", "10", "--threads", "1", "--peak-gflops", "50",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "XMLPARSER" not in proc.stdout + proc.stderr  # Fast DDS reports a profile it cannot read this way
    report = json.loads(out.read_text())
    assert report["dds"]["env"]["FASTDDS_DEFAULT_PROFILES_FILE"] == str(profile)
    node = report["node"]
    assert node["error"] is None and node["max_throughput"]["received"] == 10
    assert node["latency_at_rate"]["received"] == 10


def test_node_that_does_not_start_exits_1(tmp_path, tiny_model_dir, ros_domain_id, monkeypatch):
    def fake_node(params, namespace, log_path, cwd=None, env=None):
        import subprocess

        log_path.write_text("")
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    monkeypatch.setattr(bench, "start_node", fake_node)
    out = tmp_path / "bench.json"
    code = run(["--model", str(tiny_model_dir), "--width", "64", "--height", "48", "--frames", "2", "--warmup", "0",
                "--peak-gflops", "50", "--json", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    assert "exited with 3" in report["error"] and report["node"]["exit_code"] == 3
    assert report["node"]["log"] and Path(report["node"]["log"]).is_file()  # kept for a failed run
    Path(report["node"]["log"]).unlink()
    check_engine(report, 2)  # the engine figures are still reported


def test_raw_floor_reports_a_dead_peer_process(tmp_path, tiny_model_dir, ros_domain_id, monkeypatch):
    """The floor's peer in another process fails: a clear error with its output, no hang, exit 1."""
    dead = [sys.executable, "-c", "print('peer cannot start'); raise SystemExit(3)"]
    monkeypatch.setattr(bench, "floor_peer_command", lambda prefix, compressed: dead)
    out = tmp_path / "bench.json"
    code = run(["--model", str(tiny_model_dir), "--width", "64", "--height", "48", "--frames", "2", "--warmup", "0",
                "--no-node", "--peak-gflops", "50", "--json", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    assert report["raw_floor"] is None
    assert "peer process exited with 3" in report["error"] and "peer cannot start" in report["error"]
    check_engine(report, 2)


def test_json_is_never_overwritten(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "bench.json"
    out.write_text("keep me")
    assert run(["--model", str(tiny_model_dir), "--no-node", "--json", str(out)]) == 2
    assert out.read_text() == "keep me"
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/package"], "not found"),
    (["--frames", "0"], "--frames"),
    (["--rate", "0"], "--rate"),
    (["--width", "0"], "--width"),
])
def test_bad_arguments_exit_2(tiny_model_dir, capsys, argv, message):
    if "--model" not in argv:
        argv = ["--model", str(tiny_model_dir), *argv]
    assert run([*argv, "--no-node"]) == 2
    assert message in capsys.readouterr().err


def test_unavailable_device_exits_2(tiny_model_dir, capsys):
    import onnxruntime

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(onnxruntime.get_available_providers()):
        pytest.skip("ONNX Runtime has a GPU provider here")
    assert run(["--model", str(tiny_model_dir), "--backend", "onnx", "--device", "cuda", "--no-node"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_unknown_encoding_is_an_argparse_error(tiny_model_dir):
    with pytest.raises(SystemExit) as exc:
        run(["--model", str(tiny_model_dir), "--encoding", "mono16"])
    assert exc.value.code == 2


def test_embedded_matmul_graph_computes_a_matmul():
    """The CPU peak runs ONNX Runtime's own GEMM through a graph embedded as bytes: check it is a @ b."""
    import numpy as np
    import onnxruntime as ort

    from dgss_perception.bench import _MATMUL_ONNX

    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 7), dtype=np.float32)
    b = rng.standard_normal((7, 3), dtype=np.float32)
    (c,) = ort.InferenceSession(_MATMUL_ONNX, providers=["CPUExecutionProvider"]).run(None, {"a": a, "b": b})
    np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)
