"""CUDA graphs in ONNX Runtime: fixed buffers per input shape (run here on CPU), and when graphs are asked for.

A captured CUDA graph replays on the addresses it was captured with, so the backend keeps each
input shape's inputs and outputs in buffers of their own and gives each shape a graph id. That
bookkeeping is the same on the CPU, where it is checked against plain runs; only the capture
itself needs a GPU.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from dgss_perception import backends
from dgss_perception.backends import OnnxRuntimeBackend, cuda_graph_refusal, onnx_providers
from dgss_perception.engine import Segmenter
from test_iobinding import c2f_gate, smooth_frame


def fixed(segmenter: Segmenter) -> Segmenter:
    """The segmenter with every ONNX Runtime graph reopened on fixed buffers (what CUDA graphs run on)."""
    card = segmenter.card
    for name in segmenter.backends:
        spec, path = card.graphs[name], card.graph_path(name, "onnx")
        segmenter.backends[name] = OnnxRuntimeBackend(path, [i.name for i in spec.inputs],
                                                      [o.name for o in spec.outputs], device="cpu", fixed_io=True)
    segmenter.backend = segmenter.backends[next(iter(segmenter.backends))]
    return segmenter


def test_fixed_buffers_equal_plain_runs_across_shapes(in_graph_package):
    """Frames of three sizes, interleaved: each size keeps its buffers and graph id, and every result is right."""
    _, graph_dir, _ = in_graph_package
    plain = Segmenter(graph_dir, backend="onnx", device="cpu")
    bound = fixed(Segmenter(graph_dir, backend="onnx", device="cpu"))
    assert bound.backend.fixed_io and bound.backend.io_binding and not bound.backend.cuda_graph
    sizes = [(56, 84), (61, 97), (56, 84), (90, 130), (61, 97), (56, 84), (90, 130)]
    previous = None
    for i, (h, w) in enumerate(sizes):
        frame = smooth_frame(h, w, seed=20 + i)  # a new frame each time: stale buffers would show
        want, got = plain.segment(frame), bound.segment(frame)
        assert np.array_equal(got.labels, want.labels) and got.labels.shape == (h, w)
        assert np.array_equal(got.network_confidence, want.network_confidence)
        if previous is not None:  # the caller's last result is not the buffer the next run writes
            assert not np.shares_memory(previous, got.network_confidence)
        previous = got.network_confidence
    assert bound.backend.fixed_shapes == 3
    ids = [f.run_options.get_run_config_entry(backends.GRAPH_ID) for f in bound.backend._fixed.values()]
    assert ids == ["1", "2", "3"]  # one graph per shape, never ONNX Runtime's own 0
    assert len(np.unique(previous)) > 1


def test_results_held_by_the_caller_survive_the_next_run(tiny_model_dir):
    seg = fixed(Segmenter(tiny_model_dir, backend="onnx", device="cpu"))
    batches = [smooth_frame(*seg.network_size, seed=s)[None] for s in (31, 32, 33)]
    first = seg.backend.run([batches[0]])  # learns the shape
    second = seg.backend.run([batches[1]])  # first run on the fixed buffers
    kept = [o.copy() for o in second]
    third = seg.backend.run([batches[2]])
    assert seg.backend.fixed_shapes == 1
    assert any(not np.array_equal(k, t) for k, t in zip(kept, third)), "the frames should give different outputs"
    for s, k, t in zip(second, kept, third):
        assert np.array_equal(s, k) and not np.shares_memory(s, t)
    plain = Segmenter(tiny_model_dir, backend="onnx", device="cpu").backend
    for batch, outputs in zip(batches, (first, second, third)):
        assert all(np.array_equal(o, p) for o, p in zip(outputs, plain.run([batch])))


def test_read_only_inputs_are_copied_in(tiny_model_dir):
    seg = fixed(Segmenter(tiny_model_dir, backend="onnx", device="cpu"))
    batch = smooth_frame(*seg.network_size, seed=34)[None]
    batch.flags.writeable = False  # a frame viewed in its message
    want = Segmenter(tiny_model_dir, backend="onnx", device="cpu").backend.run([batch])
    for _ in range(2):
        assert all(np.array_equal(g, w) for g, w in zip(seg.backend.run([batch]), want))


def test_shapes_beyond_the_limit_run_unfixed(in_graph_package, monkeypatch):
    monkeypatch.setattr(backends, "MAX_FIXED_SHAPES", 1)
    _, graph_dir, _ = in_graph_package
    plain = Segmenter(graph_dir, backend="onnx", device="cpu")
    bound = fixed(Segmenter(graph_dir, backend="onnx", device="cpu"))
    for i, (h, w) in enumerate([(56, 84), (61, 97), (61, 97), (56, 84)]):
        frame = smooth_frame(h, w, seed=40 + i)
        assert np.array_equal(bound.segment(frame).labels, plain.segment(frame).labels)
    assert bound.backend.fixed_shapes == 1
    assert bound.backend._unfixed_options.get_run_config_entry(backends.GRAPH_ID) == backends.NO_GRAPH


def test_coarse_to_fine_on_fixed_buffers(tiny_c2f_dir):
    """The coarse logits kept on the device are the coarse graph's fixed buffer; the refine graph reads them."""
    frames = [smooth_frame(112, 224, seed=s) for s in (11, 12, 13)]
    theta, c_tau = c2f_gate(tiny_c2f_dir, frames[0])
    plain = Segmenter(tiny_c2f_dir, backend="onnx", device="cpu", theta=theta, c_tau=c_tau, io_binding=True)
    bound = fixed(Segmenter(tiny_c2f_dir, backend="onnx", device="cpu", theta=theta, c_tau=c_tau))
    refined = 0
    for frame in frames + frames[:1]:
        want, got = plain.segment(frame), bound.segment(frame)
        assert got.windows_refined == want.windows_refined
        assert np.array_equal(got.labels, want.labels)
        assert np.allclose(got.confidence, want.confidence, rtol=0, atol=1e-6)
        refined += got.windows_refined
    assert refined > 0, "no window refined: the kept logits were never read"
    assert bound.backends["coarse"].fixed_shapes == 1
    # The refine graph takes a device tensor, so it never runs on fixed buffers.
    assert bound.backends["refine"].fixed_shapes == 0


def test_slide_windows_on_fixed_buffers(tiny_depthforge_dir):
    """Windows in batches of two: three windows make two shapes (2 and 1), each on its own buffers."""
    frame = smooth_frame(120, 200, seed=50)
    plain = Segmenter(tiny_depthforge_dir, backend="onnx", device="cpu", window_batch=2)
    bound = fixed(Segmenter(tiny_depthforge_dir, backend="onnx", device="cpu", window_batch=2))
    windows = len(plain._windows)
    for _ in range(2):
        want, got = plain.segment(frame), bound.segment(frame)
        assert np.array_equal(got.labels, want.labels)
        assert np.allclose(got.network_confidence, want.network_confidence, rtol=0, atol=1e-6)
    assert bound.backend.fixed_shapes == len({min(2, windows - s) for s in range(0, windows, 2)})


def test_providers_ask_the_cuda_provider_for_graphs(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    graphs = [("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    assert onnx_providers("cuda", None, cuda_graph=True) == graphs
    assert onnx_providers("cuda", None) == [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]
    assert onnx_providers("cpu", None, cuda_graph=True) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    # TensorRT keeps one graph per session whatever the shapes: asking for graphs means the CUDA provider.
    assert onnx_providers("cuda", None, cuda_graph=True) == graphs
    assert [p if isinstance(p, str) else p[0] for p in onnx_providers("cuda", None)] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("device, available, version, reason", [
    ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], "1.31.1", ""),
    ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], "1.18.0", ""),
    ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], "1.31.1", "on the CPU"),
    ("auto", ["CPUExecutionProvider"], "1.31.1", "no CUDA provider"),
    ("cuda", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "1.31.1", ""),
    ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], "1.17.3", "1.18 or later"),
])
def test_when_graphs_can_be_asked_for(device, available, version, reason):
    refusal = cuda_graph_refusal(device, available, version)
    assert (refusal == "") if not reason else (reason in refusal)


def test_asked_for_on_cpu_runs_without_and_says_why(tiny_c2f_dir):
    seg = Segmenter(tiny_c2f_dir, backend="onnx", device="cpu", cuda_graph=True)
    assert not seg.cuda_graphs and seg.warmup_runs == 1
    assert set(seg.cuda_graph_notes) == {"coarse", "refine"}
    assert all("CPU" in why for why in seg.cuda_graph_notes.values())
    assert not any(b.fixed_io for b in seg.backends.values())
    assert Segmenter(tiny_c2f_dir, backend="onnx", device="cpu").cuda_graph_notes == {}
    seg.backends["coarse"].cuda_graph = True  # as a CUDA session would be: captures then need warm-up runs
    assert seg.cuda_graphs and seg.warmup_runs == 4
    ts = Segmenter(tiny_c2f_dir, backend="torchscript", device="cpu", cuda_graph=True)
    assert not ts.cuda_graphs and all("ONNX Runtime" in why for why in ts.cuda_graph_notes.values())


def test_a_graph_the_runtime_cannot_capture_opens_without(tiny_model_dir, monkeypatch):
    """ONNX Runtime refuses a session with graphs when a node is off the CUDA provider: it is reopened without."""
    real = ort.InferenceSession
    asked: list[list] = []

    def session(path, sess_options=None, providers=None, enable_fallback=1):
        asked.append(providers)
        if "enable_cuda_graph" in str(providers):
            # Its own fallback would have retried on the CPU alone, with no error to see.
            assert enable_fallback == 0
            raise RuntimeError("This session cannot use the graph capture feature as requested by the user as all "
                               "compute graph nodes have not been partitioned to the CUDAExecutionProvider")
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    seg = Segmenter(tiny_model_dir, backend="onnx", device="auto", cuda_graph=True)
    assert len(asked) == 2 and "enable_cuda_graph" in str(asked[0]) and "enable_cuda_graph" not in str(asked[1])
    assert not seg.cuda_graphs and not seg.backend.fixed_io
    assert "cannot capture" in seg.cuda_graph_notes["whole"] and "partitioned" in seg.cuda_graph_notes["whole"]
    frame = smooth_frame(56, 84, seed=60)
    monkeypatch.setattr(ort, "InferenceSession", real)
    assert np.array_equal(seg.segment(frame).labels, Segmenter(tiny_model_dir, backend="onnx").segment(frame).labels)


def test_a_corrupt_graph_still_fails_clearly(tiny_model_dir, tmp_path, monkeypatch):
    """The retry without graphs is for capture only: a graph that cannot be opened at all still raises."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)protobuf|parse|load"):
        OnnxRuntimeBackend(bad, ["image"], ["labels"], device="auto", cuda_graph=True)


def test_bench_records_the_request_and_why_it_was_not_met(tmp_path, tiny_model_dir, ros_domain_id, capsys):
    import json

    from dgss_perception.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_model_dir), "--width", "96", "--height", "64", "--frames", "2",
                 "--warmup", "0", "--no-node", "--peak-gflops", "50", "--cuda-graph", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "--cuda-graph" in report["command"]
    assert report["backend"]["cuda_graph"] is False and set(report["backend"]["cuda_graph_notes"]) == {"whole"}
    assert "CUDA graphs, whole graph: " in capsys.readouterr().out


def test_a_capture_that_fails_in_the_run_leaves_that_shape_without_a_graph(in_graph_package):
    """The first replayed run of a shape fails (as a capture that synchronises would): that frame still gets
    its labels, the shape runs unfixed from then on, and the other shapes keep graphs of ids never reused."""
    _, graph_dir, _ = in_graph_package
    plain = Segmenter(graph_dir, backend="onnx", device="cpu")
    seg = fixed(Segmenter(graph_dir, backend="onnx", device="cpu"))
    backend = seg.backend
    backend.cuda_graph = True  # as on a CUDA session; the run below fails where a capture would
    session_run = backend.session.run_with_iobinding
    failing = {"1"}

    def run_with_iobinding(binding, run_options=None):
        if run_options is not None and run_options.get_run_config_entry(backends.GRAPH_ID) in failing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return session_run(binding, run_options)

    backend.session.run_with_iobinding = run_with_iobinding
    for i, (h, w) in enumerate([(56, 84), (56, 84), (56, 84), (61, 97), (61, 97), (56, 84)]):
        frame = smooth_frame(h, w, seed=70 + i)
        assert np.array_equal(seg.segment(frame).labels, plain.segment(frame).labels)
    assert backend.fixed_shapes == 1 and backend._refused == {(((1, 56, 84, 3), "|u1"),)}
    (kept,) = backend._fixed.values()
    assert kept.run_options.get_run_config_entry(backends.GRAPH_ID) == "2"
    assert "56, 84" in backend.cuda_graph_note and "capture failed" in backend.cuda_graph_note
    backend.cuda_graph = False  # without graphs a failing run is an error, not a fallback
    failing.add("2")
    with pytest.raises(RuntimeError, match="capturing"):
        seg.segment(smooth_frame(61, 97, seed=80))


def test_a_gpu_provider_that_cannot_start_is_an_error_when_cuda_was_asked_for(tiny_model_dir, monkeypatch):
    """Listed but not startable (no CUDA libraries): ONNX Runtime would run on the CPU with a warning."""
    card = Segmenter(tiny_model_dir, backend="onnx", device="cpu").card
    spec, path = card.graphs["whole"], card.graph_path("whole", "onnx")
    names = ([i.name for i in spec.inputs], [o.name for o in spec.outputs])
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(backends.BackendError, match="could not start a GPU provider"):
        OnnxRuntimeBackend(path, *names, device="cuda")
    auto = OnnxRuntimeBackend(path, *names, device="auto")  # auto takes what there is
    assert auto.device == "cpu" and auto.providers == ["CPUExecutionProvider"]
