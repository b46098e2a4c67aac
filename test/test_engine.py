"""The engine on a tiny exported model: backends agree, card validated, sizes kept."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from dgss_perception.card import CardError, load_card
from dgss_perception.engine import Segmenter, resize_labels

rng = np.random.default_rng(1)


@pytest.fixture(scope="module")
def frames():
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((56, 84), (61, 97), (480, 640), (1080, 1920))]


def test_labels_at_input_resolution(tiny_model_dir, frames):
    seg = Segmenter(tiny_model_dir, backend="onnx")
    for rgb in frames:
        r = seg.segment(rgb)
        assert r.labels.shape == rgb.shape[:2] and r.labels.dtype == np.uint8
        assert r.labels.max() < seg.card.num_classes
        assert r.confidence.shape == rgb.shape[:2]
        assert r.confidence.min() >= 1.0 / seg.card.num_classes - 1e-6 and r.confidence.max() <= 1.0 + 1e-6
        assert set(r.timings_ms) == {"preprocess", "inference", "postprocess"}


def test_network_resolution(tiny_model_dir, frames):
    seg = Segmenter(tiny_model_dir, backend="onnx", output_resolution="network")
    r = seg.segment(frames[3])
    assert r.labels.shape == seg.network_size


def test_spin_wait_reaches_the_session_and_changes_no_result(tiny_model_dir, frames):
    """Busy-waiting is off unless asked for; on or off, the labels are the same."""
    key = "session.intra_op.allow_spinning"
    off = Segmenter(tiny_model_dir, backend="onnx", threads=2)
    on = Segmenter(tiny_model_dir, backend="onnx", threads=2, spin_wait=True)
    assert off.backend.session.get_session_options().get_session_config_entry(key) == "0"
    assert on.backend.session.get_session_options().get_session_config_entry(key) == "1"
    for rgb in frames[:2]:
        assert np.array_equal(off.segment(rgb).labels, on.segment(rgb).labels)


def test_onnx_and_torchscript_agree(tiny_model_dir, frames):
    a = Segmenter(tiny_model_dir, backend="onnx")
    b = Segmenter(tiny_model_dir, backend="torchscript")
    for rgb in frames[:3]:
        ra, rb = a.segment(rgb), b.segment(rgb)
        assert np.abs(ra.confidence - rb.confidence).max() < 1e-4
        assert (ra.labels != rb.labels).mean() < 1e-3


def test_labels_depend_on_image(tiny_model_dir):
    seg = Segmenter(tiny_model_dir)
    a = seg.segment(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)).labels
    b = seg.segment(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)).labels
    assert not np.array_equal(a, b)
    assert len(np.unique(a)) > 3  # a degenerate constant output would make equality tests meaningless


def test_bad_arguments(tiny_model_dir):
    with pytest.raises(ValueError, match="backend"):
        Segmenter(tiny_model_dir, backend="tensorflow")
    with pytest.raises(ValueError, match="device"):
        Segmenter(tiny_model_dir, device="tpu")
    with pytest.raises(ValueError, match="RGB uint8"):
        Segmenter(tiny_model_dir).segment(np.zeros((10, 10), np.uint8))


def copy_package(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(schema_version=99), "schema_version 99"),
    (lambda c: c.update(family="yolo"), "unknown family"),
    (lambda c: c["input"].update(height=57), "input must be uint8"),
    (lambda c: c["palette"].pop(), "palette"),
    (lambda c: c["inference"].update(mode="slide"), "inference mode"),
    (lambda c: c.pop("graphs"), "missing field 'graphs'"),
    (lambda c: c["input"].update(channel_order="RGBA"), "channel_order"),
])
def test_card_mismatch_refused(tiny_model_dir, tmp_path, edit, message):
    pkg = copy_package(tiny_model_dir, tmp_path / "pkg")
    card = json.loads((pkg / "card.json").read_text())
    edit(card)
    (pkg / "card.json").write_text(json.dumps(card))
    with pytest.raises(CardError, match=message):
        Segmenter(pkg)


def test_corrupt_or_missing_files_refused(tiny_model_dir, tmp_path):
    pkg = copy_package(tiny_model_dir, tmp_path / "pkg")
    with open(pkg / "whole.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(CardError, match="checksum"):
        load_card(pkg)
    (pkg / "whole.onnx").unlink()
    with pytest.raises(CardError, match="missing"):
        load_card(pkg)
    (pkg / "card.json").write_text("{not json")
    with pytest.raises(CardError, match="not valid JSON"):
        load_card(pkg)
    with pytest.raises(CardError, match="not found"):
        load_card(tmp_path / "nowhere")


def test_trt_cache_is_keyed_by_graph_gpu_and_precision(tmp_path, monkeypatch):
    """TensorRT engines of different graphs, GPUs or precisions never share a cache directory."""
    import subprocess

    from dgss_perception import backends

    a = backends.trt_cache_dir(tmp_path, "sha256:" + "ab" * 32, "nvidia-h100-80gb-hbm3-9.0", "fp32")
    assert a == tmp_path / f"{'ab' * 8}-nvidia-h100-80gb-hbm3-9.0-fp32"
    assert a == backends.trt_cache_dir(tmp_path, "sha256:" + "ab" * 32, "nvidia-h100-80gb-hbm3-9.0", "fp32")
    others = {backends.trt_cache_dir(tmp_path, "sha256:" + "cd" * 32, "nvidia-h100-80gb-hbm3-9.0", "fp32"),
              backends.trt_cache_dir(tmp_path, "sha256:" + "ab" * 32, "nvidia-geforce-rtx-4090-8.9", "fp32"),
              backends.trt_cache_dir(tmp_path, "sha256:" + "ab" * 32, "nvidia-h100-80gb-hbm3-9.0", "fp16")}
    assert a not in others and len(others) == 3

    class Done:
        stdout = "NVIDIA H100 80GB HBM3, 9.0\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    assert backends.gpu_identity() == "nvidia-h100-80gb-hbm3-9.0"

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    assert backends.gpu_identity() == "unknown-gpu"


def test_resize_in_graph(in_graph_package):
    """A package that resizes inside the graph takes any frame size and returns labels at that size."""
    host_dir, graph_dir, card = in_graph_package
    assert card["input"]["resize"] == "stretch_in_graph"
    assert card["graphs"]["whole"]["inputs"][0]["shape"] == [1, -1, -1, 3]
    assert all(r["ok"] for r in card["export"]["parity"])
    rng = np.random.default_rng(4)
    for backend in ("onnx", "torchscript"):
        graph = Segmenter(graph_dir, backend=backend)
        host = Segmenter(host_dir, backend=backend)
        assert graph.resizes_in_graph and not host.resizes_in_graph
        for h, w in ((56, 84), (97, 203), (1080, 1920)):
            small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            frame = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)  # smooth: labels vary by region
            a, b = graph.segment(frame), host.segment(frame)
            assert a.labels.shape == (h, w) and a.network_confidence.shape == (56, 84)
            # The same model; only the resize differs (torch's bilinear in the graph, OpenCV's on the host).
            assert (a.labels == b.labels).mean() > 0.9, (backend, h, w)
            assert len(np.unique(a.labels)) > 1
            out = np.zeros((h, w), np.uint8)  # labels already at the frame's size: copied into the buffer
            assert graph.segment(frame, out=out).labels is out and np.array_equal(out, a.labels)
        network = Segmenter(graph_dir, backend=backend, output_resolution="network").segment(frame)
        assert network.labels.shape == (56, 84)
    frames = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in ((40, 60, 3), (70, 90, 3))]
    assert [r.labels.shape for r in Segmenter(graph_dir).segment_batch(frames[:1])] == [(40, 60)]
    with pytest.raises(ValueError, match="1 to 1 frames"):
        Segmenter(graph_dir).segment_batch(frames)


def test_read_only_frames(in_graph_package, recwarn):
    """The node hands the engine read-only views of its messages; every backend takes them as they are."""
    host_dir, graph_dir, _ = in_graph_package
    frame = np.random.default_rng(0).integers(0, 256, size=(90, 160, 3), dtype=np.uint8)
    frame.flags.writeable = False
    for package in (host_dir, graph_dir):
        for backend in ("onnx", "torchscript"):
            assert Segmenter(package, backend=backend).segment(frame).labels.shape == (90, 160)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_resize_labels_equals_opencv_nearest():
    """The row-sharing label resize gives OpenCV's INTER_NEAREST exactly, enlarging and shrinking."""
    gen = np.random.default_rng(7)
    sizes = [((112, 224), (1080, 1920)), ((512, 1024), (1080, 1920)), ((64, 64), (128, 256)),
             ((60, 80), (480, 640)), ((1080, 1920), (112, 224)), ((7, 5), (7, 9)), ((1, 1), (3, 4))]
    sizes += [(tuple(gen.integers(1, 300, 2)), tuple(gen.integers(1, 2100, 2))) for _ in range(200)]
    for (sh, sw), (h, w) in sizes:
        labels = gen.integers(0, 256, (sh, sw), dtype=np.uint8)
        got = resize_labels(labels, (int(h), int(w)))
        want = cv2.resize(labels, (int(w), int(h)), interpolation=cv2.INTER_NEAREST)
        assert got.shape == want.shape and got.dtype == np.uint8
        assert np.array_equal(got, want), ((sh, sw), (h, w))
        # Into a given buffer (stale contents first): the same labels, in that buffer.
        out = np.full((int(h), int(w)), 77, np.uint8)
        assert resize_labels(labels, (int(h), int(w)), out) is out
        assert np.array_equal(out, want), ((sh, sw), (h, w))
    same = gen.integers(0, 19, (30, 40), dtype=np.uint8)
    assert resize_labels(same, (30, 40)) is same
    out = np.zeros((30, 40), np.uint8)
    assert resize_labels(same, (30, 40), out) is out and np.array_equal(out, same)
    for bad in (np.zeros((30, 41), np.uint8), np.zeros((30, 40), np.int32), np.zeros((40, 30), np.uint8).T):
        with pytest.raises(ValueError, match="C-contiguous uint8"):
            resize_labels(same, (30, 40), bad)


def test_labels_written_into_given_buffers(tiny_model_dir, frames):
    """segment(out=…) puts the labels into the caller's array (a message buffer) and nothing else changes."""
    seg = Segmenter(tiny_model_dir, backend="onnx")
    for rgb in frames:
        want = seg.segment(rgb)
        out = np.full(seg.output_size(rgb.shape[:2]), 200, np.uint8)
        got = seg.segment(rgb, out=out)
        assert got.labels is out
        np.testing.assert_array_equal(out, want.labels)
        np.testing.assert_allclose(got.confidence, want.confidence)
    network = Segmenter(tiny_model_dir, backend="onnx", output_resolution="network")
    assert network.output_size((1080, 1920)) == network.network_size
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        seg.segment(frames[0], out=np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="2 arrays for 1 frames"):
        seg.segment_batch([frames[0]], [None, None])


def test_frames_preprocessed_by_the_caller(tiny_model_dir, frames):
    """segment_batch(inputs=…) takes a caller's preprocess() of the frame: the same result as without it."""
    seg = Segmenter(tiny_model_dir, backend="onnx")
    for rgb in frames:
        want = seg.segment(rgb)
        (got,) = seg.segment_batch([rgb], inputs=[seg.preprocess(rgb)])
        np.testing.assert_array_equal(got.labels, want.labels)
        (got,) = seg.segment_batch([rgb], inputs=[None])  # None: the engine preprocesses
        np.testing.assert_array_equal(got.labels, want.labels)
    with pytest.raises(ValueError, match="inputs holds 2 arrays for 1 frames"):
        seg.segment_batch([frames[0]], inputs=[None, None])
