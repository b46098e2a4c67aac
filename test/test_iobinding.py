"""ONNX Runtime IO binding and device-resident intermediates: same results as plain runs, on CPU."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dgss_perception.backends import OnnxRuntimeBackend
from dgss_perception.cli import main
from dgss_perception.engine import Segmenter


def smooth_frame(height: int, width: int, seed: int) -> np.ndarray:
    """A frame of colour blobs with noise, so labels and confidence vary over the image."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
    big = torch.nn.functional.interpolate(small.permute(2, 0, 1)[None].float(), size=(height, width),
                                          mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.clip(big + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def image_batch(segmenter: Segmenter, seed: int) -> np.ndarray:
    """A (1, H, W, 3) uint8 batch at the package's network size."""
    return smooth_frame(*segmenter.network_size, seed)[None]


def test_whole_package_outputs_equal_plain_run(tiny_model_dir):
    plain = Segmenter(tiny_model_dir, backend="onnx", device="cpu", io_binding=False)
    bound = Segmenter(tiny_model_dir, backend="onnx", device="cpu", io_binding=True)
    assert bound.backend.io_binding is True and plain.backend.io_binding is False
    batch = image_batch(plain, seed=1)
    batch.flags.writeable = False  # frames viewed in their message are read-only
    want, got = plain.backend.run([batch]), bound.backend.run([batch])
    assert len(got) == len(want) >= 1
    for w, g in zip(want, got):
        assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g, w)
    frame = smooth_frame(90, 130, seed=2)
    a, b = plain.segment(frame), bound.segment(frame)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.network_confidence, b.network_confidence)
    assert len(np.unique(a.labels)) >= 2, "constant labels would prove little"


def test_outputs_of_consecutive_runs_are_distinct(tiny_model_dir):
    """A result the caller still holds is not overwritten by the next run."""
    segmenter = Segmenter(tiny_model_dir, backend="onnx", device="cpu", io_binding=True)
    first = segmenter.backend.run([image_batch(segmenter, seed=3)])
    kept = [o.copy() for o in first]
    second = segmenter.backend.run([image_batch(segmenter, seed=4)])
    assert any(not np.array_equal(k, s) for k, s in zip(kept, second)), "the frames should give different outputs"
    for f, k, s in zip(first, kept, second):
        assert np.array_equal(f, k)
        assert not np.shares_memory(f, s)


def c2f_gate(package, frame: np.ndarray) -> tuple[float, float]:
    """θ at the median coarse confidence and C_τ between two of the windows' confident fractions."""
    coarse = Segmenter(package, backend="onnx", device="cpu", inference_mode="coarse", io_binding=False)
    theta = float(np.median(coarse.segment(frame).network_confidence))
    batch = np.ascontiguousarray(coarse.preprocess(frame))[None]
    fractions = np.unique(coarse.backend.run([batch, np.array([theta], np.float32)])[3])
    assert len(fractions) >= 2, "every window equally confident: no gate splits them"
    middle = len(fractions) // 2
    return theta, float((fractions[middle - 1] + fractions[middle]) / 2)


def test_coarse_to_fine_equals_plain_run(tiny_c2f_dir):
    frame = smooth_frame(112, 224, seed=11)
    theta, c_tau = c2f_gate(tiny_c2f_dir, frame)
    plain = Segmenter(tiny_c2f_dir, backend="onnx", device="cpu", theta=theta, c_tau=c_tau, io_binding=False)
    bound = Segmenter(tiny_c2f_dir, backend="onnx", device="cpu", theta=theta, c_tau=c_tau, io_binding=True)
    assert all(b.io_binding for b in bound.backends.values())
    want, got = plain.segment(frame), bound.segment(frame)
    assert 0 < got.windows_refined < plain.windows_total, "the gate should refine some windows and keep others"
    assert got.windows_refined == want.windows_refined
    assert np.array_equal(got.labels, want.labels)
    assert np.allclose(got.confidence, want.confidence, rtol=0, atol=1e-6)
    coarse = Segmenter(tiny_c2f_dir, backend="onnx", device="cpu", inference_mode="coarse", io_binding=True)
    assert (coarse.segment(frame).labels != got.labels).any(), "refinement changed nothing: the test proves little"


@pytest.mark.parametrize("backend, io_binding, kept_type", [
    ("onnx", True, ort.OrtValue),
    ("onnx", False, np.ndarray),
    ("torchscript", None, torch.Tensor),
])
def test_keep_on_device(tiny_c2f_dir, backend, io_binding, kept_type):
    """Coarse logits kept on the device go into the refine graph as they are and give the host copy's result."""
    seg = Segmenter(tiny_c2f_dir, backend=backend, device="cpu", io_binding=io_binding)
    batch = image_batch(seg, seed=5)
    labels, confidence, logits, fractions = seg.backend.run([batch, np.array([0.5], np.float32)], keep_on_device=(2,))
    assert isinstance(logits, kept_type)
    assert all(isinstance(o, np.ndarray) for o in (labels, confidence, fractions))
    host = np.array(logits if isinstance(logits, np.ndarray) else logits.numpy())
    assert host.dtype == np.float32 and host.ndim == 4 and host.shape[1] == seg.card.num_classes
    windows = np.arange(fractions.shape[-1], dtype=np.int64)
    refine = seg.backends["refine"]
    from_device = refine.run([batch, logits, windows])
    from_host = refine.run([batch, host, windows])
    for d, h in zip(from_device, from_host):
        assert isinstance(d, np.ndarray) and np.array_equal(d, h)
    if io_binding:  # a graph that does not bind takes the device tensor too
        unbound = Segmenter(tiny_c2f_dir, backend="onnx", device="cpu", io_binding=False).backends["refine"]
        assert all(np.array_equal(u, h) for u, h in zip(unbound.run([batch, logits, windows]), from_host))
    # The logits the refine graph was given matter: others give other labels.
    shuffled = refine.run([batch, np.ascontiguousarray(host[:, ::-1]), windows])
    assert not np.array_equal(shuffled[0], from_host[0])


def test_default_is_off_on_cpu(tiny_model_dir):
    card = Segmenter(tiny_model_dir, backend="onnx", device="cpu").card
    spec, path = card.graphs["whole"], card.graph_path("whole", "onnx")
    names = ([i.name for i in spec.inputs], [o.name for o in spec.outputs])
    assert OnnxRuntimeBackend(path, *names, device="cpu").io_binding is False
    assert OnnxRuntimeBackend(path, *names, device="cpu", io_binding=True).io_binding is True
    assert Segmenter(tiny_model_dir, backend="onnx", device="cpu").backend.io_binding is False
    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        auto = OnnxRuntimeBackend(path, *names, device="auto")
        assert auto.providers[0] == "CPUExecutionProvider" and auto.io_binding is False


@pytest.mark.parametrize("flag, state", [("on", True), ("off", False)])
def test_bench_records_io_binding(tmp_path, tiny_model_dir, ros_domain_id, flag, state):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(tiny_model_dir), "--width", "96", "--height", "64", "--frames", "2",
                 "--warmup", "0", "--no-node", "--peak-gflops", "50", "--io-binding", flag, "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["backend"]["io_binding"] is state
    assert f"--io-binding {flag}" in report["command"]
