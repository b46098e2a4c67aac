"""The runtime's GPU-facing choices, checked on the CPU: precision, device by index, slide merge on the device.

Each test pins a property that would only show on a GPU otherwise: the PyTorch path's autocast and its
float32 outputs, the card's checked GPU precision and its rule for older cards, ``cuda:N`` reaching every
provider and binding, the windows of a slide package merged in torch where the backend left them, and a
model that loads but cannot run stopping the node with one clear line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import TINY_CONFIG, edited_copy, make_tiny_weights
from dgss_perception import backends
from dgss_perception.backends import BackendError, TorchScriptBackend, onnx_providers, parse_device
from dgss_perception.card import CardError, load_card, sha256_file
from dgss_perception.engine import Segmenter, gpu_precision
from training.export import _add_bf16_agreement, export_package, label_agreement, torch_gpu_precision

# bf16 keeps 8 bits of mantissa: on the tiny random models a few pixels near a class boundary change label.
BF16_MIN_AGREEMENT = 0.95

SLIDE_CONFIG = {
    **TINY_CONFIG,
    "name": "tiny_slide_gpu_test",
    "model": {**TINY_CONFIG["model"], "img_size": [56, 56]},
    "inference": {"mode": "slide", "test_size": [112, 150], "window": 56, "stride": 37},
}


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VFMNet slide package (12 windows of 56 px over 112×150), without --slide-in-graph."""
    work = tmp_path_factory.mktemp("gpu_slide")
    cfg = make_tiny_weights(work / "weights.safetensors", seed=5, config=SLIDE_CONFIG, sharpen=30.0)
    export_package(cfg, work / "weights.safetensors", work / "package", mode="slide")
    return work / "package"


def frame(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Smooth colour blobs with noise, so labels vary over the frame."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).permute(2, 0, 1)[None].float()
    big = torch.nn.functional.interpolate(small, size=shape, mode="bilinear", align_corners=False)[0]
    return np.clip(big.permute(1, 2, 0).numpy() + rng.normal(0, 10, (*shape, 3)), 0, 255).astype(np.uint8)


# -- precision -------------------------------------------------------------------------------------------------
def test_export_records_bf16_agreement_and_the_gpu_precision(tiny_model_dir, tiny_c2f_dir):
    for package in (tiny_model_dir, tiny_c2f_dir):
        card = load_card(package)
        records = card.export["parity"]
        ts = [r for r in records if r["graph"].endswith("torchscript")]
        assert ts and all(0.0 < r["label_agreement_bf16"] <= 1.0 for r in ts)
        assert not any("label_agreement_bf16" in r for r in records if r["graph"].endswith("onnx"))
        # The card's precision follows the worst graph against the export's bar.
        worst = min(r["label_agreement_bf16"] for r in ts)
        assert card.torch_gpu_precision == ("bf16" if worst >= card.export["min_label_agreement"] else "fp32")
    # Both coarse-to-fine graphs are checked, the refine graph on each window set.
    assert [r["graph"] for r in load_card(tiny_c2f_dir).export["parity"] if "label_agreement_bf16" in r] == [
        "coarse/torchscript", "refine/torchscript", "refine/torchscript"]


def test_gpu_precision_rule():
    records = [{"graph": "torchscript", "label_agreement_bf16": 0.995}, {"graph": "onnx"}]
    assert torch_gpu_precision(records, "fp32", 0.98) == "bf16"
    assert torch_gpu_precision([*records, {"graph": "refine/torchscript", "label_agreement_bf16": 0.97}],
                               "fp32", 0.98) == "fp32"
    assert torch_gpu_precision([{"graph": "onnx"}], "fp32", 0.98) == "fp32"  # nothing checked: not bf16
    assert torch_gpu_precision(records, "fp16", 0.98) == "fp16"


def test_a_graph_that_fails_under_autocast_is_recorded_not_raised(tmp_path):
    """Accumulating a bf16 product into a float32 buffer (index_put) fails under autocast: the card says fp32."""
    class Accumulate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 5))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            scores = torch.mm(image.float().reshape(16, 3), self.weight)  # (16, 5), bf16 under autocast
            total = torch.zeros(16, 5)
            total[torch.arange(16)] = scores
            return total.t().reshape(1, 5, 4, 4)

    path = tmp_path / "accumulate.ts"
    example = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    torch.jit.trace(Accumulate(), example).save(str(path))
    image = np.random.default_rng(0).integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)
    record: dict = {}
    _add_bf16_agreement(record, path, [image], np.zeros((1, 4, 4), np.int64), "logits")
    assert record["label_agreement_bf16"] == 0.0 and "dtype" in record["bf16_error"]
    assert torch_gpu_precision([record], "fp32", 0.98) == "fp32"


@pytest.mark.parametrize("value", ["int8", "BF16", 16])
def test_card_field_validated(tiny_model_dir, tmp_path, value):
    bad = edited_copy(tiny_model_dir, tmp_path / "bad", lambda d: d.update(torch_gpu_precision=value))
    with pytest.raises(CardError, match="torch_gpu_precision"):
        load_card(bad)


def test_cards_without_the_field_load_and_follow_the_documented_rule(tiny_model_dir, tmp_path):
    old = edited_copy(tiny_model_dir, tmp_path / "old", lambda d: d.pop("torch_gpu_precision", None))
    card = load_card(old)
    assert card.torch_gpu_precision is None
    precision, note = gpu_precision(card)
    assert precision == "bf16" and "torch_gpu_precision" in note and "fp32" in note
    assert gpu_precision(dataclasses.replace(card, precision="fp16")) == ("fp16", "")
    assert gpu_precision(dataclasses.replace(card, torch_gpu_precision="fp32")) == ("fp32", "")
    # The note is about the GPU: on the CPU auto is fp32 and nothing is said.
    seg = Segmenter(old, backend="torchscript", device="cpu")
    assert seg.precision == "fp32" and seg.precision_note == ""


def test_torchscript_bf16_on_cpu_agrees_with_fp32_and_returns_float32(tiny_model_dir):
    fp32 = Segmenter(tiny_model_dir, backend="torchscript", device="cpu")
    auto = Segmenter(tiny_model_dir, backend="torchscript", device="cpu", precision="auto")
    bf16 = Segmenter(tiny_model_dir, backend="torchscript", device="cpu", precision="bf16")
    assert fp32.precision == auto.precision == "fp32" and bf16.precision == "bf16"
    assert auto.device_report == "cpu (TorchScript, fp32 graph)"
    assert bf16.device_report == "cpu (TorchScript, bf16 autocast)"
    for seed in range(2):
        rgb = frame((60, 90), seed)
        want, got = fp32.segment(rgb), bf16.segment(rgb)
        assert got.labels.dtype == np.uint8 and got.network_confidence.dtype == np.float32
        assert got.confidence.dtype == np.float32
        assert label_agreement(got.labels, want.labels) >= BF16_MIN_AGREEMENT
        assert np.abs(got.network_confidence - want.network_confidence).max() < 0.05
        assert not np.array_equal(got.network_confidence, want.network_confidence)  # it did run in bf16
        assert np.array_equal(auto.segment(rgb).network_confidence, want.network_confidence)


def test_bf16_over_an_fp16_package_is_refused(tiny_model_dir, tmp_path):
    """Seen on an H200: bf16 autocast feeds an fp16 graph's fp16 weights bf16 inputs, a dtype error at run."""
    half = edited_copy(tiny_model_dir, tmp_path / "half", lambda d: d.update(precision="fp16"))
    with pytest.raises(ValueError, match="fp16 package"):
        Segmenter(half, backend="torchscript", device="cpu", precision="bf16")


def test_kept_outputs_are_float32_under_autocast(tiny_c2f_dir):
    """The coarse logits stay on the device for the refine graph: float32, as the card says, not bf16."""
    backend = Segmenter(tiny_c2f_dir, backend="torchscript", device="cpu", precision="bf16").backend
    image = frame((112, 224), 3)[None]
    labels, confidence, logits, fractions = backend.run([image, np.array([0.9], np.float32)], keep_on_device=(2,))
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32
    assert labels.dtype == np.uint8 and confidence.dtype == np.float32 and fractions.dtype == np.float32
    result = Segmenter(tiny_c2f_dir, backend="torchscript", device="cpu", precision="bf16", theta=0.999999,
                       c_tau=1.0).segment(frame((100, 130), 4))
    assert result.windows_refined > 0 and result.network_confidence.dtype == np.float32


def test_precision_choices_and_the_onnx_path(tiny_model_dir):
    with pytest.raises(ValueError, match="precision"):
        Segmenter(tiny_model_dir, precision="int8")
    with pytest.raises(ValueError, match="exported precision"):
        Segmenter(tiny_model_dir, backend="onnx", device="cpu", precision="bf16")
    # Asking for bf16 with backend auto means the PyTorch path; the exported precision keeps ONNX Runtime.
    assert Segmenter(tiny_model_dir, device="cpu", precision="bf16").backend.name == "torchscript"
    onnx = Segmenter(tiny_model_dir, device="cpu", precision="fp32")
    assert onnx.backend.name == "onnxruntime" and onnx.precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        TorchScriptBackend(tiny_model_dir / "whole.ts", device="cpu", gpu_precision="auto")


# -- device ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, parsed", [
    ("auto", ("auto", None)), ("cpu", ("cpu", None)), ("cuda", ("cuda", 0)), ("cuda:0", ("cuda", 0)),
    ("cuda:3", ("cuda", 3)), ("cuda:12", ("cuda", 12)),
])
def test_device_forms(text, parsed):
    assert parse_device(text) == parsed


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cuda:1:2", "cpu:0", "auto:1", "CUDA", " cuda", "", 0])
def test_bad_devices_are_refused_clearly(tiny_model_dir, text):
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        parse_device(text)
    with pytest.raises(ValueError, match="device"):
        Segmenter(tiny_model_dir, device=text)


def test_onnx_providers_are_given_the_gpu_index(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    trt, cuda, cpu = onnx_providers("cuda:2", None)
    assert trt[0] == "TensorrtExecutionProvider" and trt[1]["device_id"] == "2"
    assert cuda == ("CUDAExecutionProvider", {"device_id": "2"}) and cpu == "CPUExecutionProvider"
    assert onnx_providers("cuda:1", None, cuda_graph=True)[0] == (
        "CUDAExecutionProvider", {"device_id": "1", "enable_cuda_graph": "1"})
    assert all(p[1]["device_id"] == "0" for p in onnx_providers("auto", None)[:2])
    assert onnx_providers("cpu", None) == ["CPUExecutionProvider"]


class GpuLookingSession:
    """A real CPU session that reports the providers it was asked for, as a started GPU session does."""

    asked: list = []
    real = ort.InferenceSession

    def __init__(self, path, sess_options=None, providers=None, enable_fallback=1) -> None:
        GpuLookingSession.asked.append(providers)
        self._session = self.real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    def get_providers(self) -> list[str]:
        return [p if isinstance(p, str) else p[0] for p in self.asked[-1]]

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def test_onnx_session_binding_and_report_on_gpu_n(tiny_model_dir, monkeypatch):
    """cuda:3 reaches the providers, the TensorRT cache key, the bound outputs and the device report."""
    identities: list[int] = []
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", GpuLookingSession)
    monkeypatch.setattr(backends, "gpu_identity", lambda device_id=0: identities.append(device_id) or "fake-gpu")
    monkeypatch.setattr(backends, "gpu_name", lambda device_id=0: f"Fake GPU {device_id}")
    monkeypatch.setenv("DGSS_TRT_CACHE", str(tiny_model_dir.parent / "trt_cache_test"))
    GpuLookingSession.asked.clear()
    seg = Segmenter(tiny_model_dir, backend="onnx", device="cuda:3")
    trt, cuda = GpuLookingSession.asked[0][:2]
    assert trt[1]["device_id"] == "3" and cuda[1]["device_id"] == "3" and identities == [3]
    assert seg.backend.device == "cuda:3" and seg.backend._output_device == ("cuda", 3) and seg.backend.io_binding
    assert seg.device_report == ("cuda:3 (Fake GPU 3, ONNX Runtime providers: TensorrtExecutionProvider, "
                                 "CUDAExecutionProvider, CPUExecutionProvider)")


def test_gpu_index_beyond_the_devices_is_an_error(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(BackendError, match=r"cuda:2.*2 CUDA device\(s\)"):
        TorchScriptBackend(tiny_model_dir / "whole.ts", device="cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where torch sees no GPU")
def test_cuda_without_a_gpu_names_the_device(tiny_model_dir):
    with pytest.raises(BackendError, match="cuda:1"):
        Segmenter(tiny_model_dir, backend="torchscript", device="cuda:1")


def test_cpu_device_report(tiny_model_dir):
    assert Segmenter(tiny_model_dir, backend="onnx", device="cpu").device_report == (
        "cpu (ONNX Runtime providers: CPUExecutionProvider)")
    assert Segmenter(tiny_model_dir, backend="onnx", device="auto").device_report.startswith(
        "cuda:0 (" if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers())
        else "cpu (")


# -- slide merge on the device ----------------------------------------------------------------------------------
@pytest.mark.parametrize("window_batch", [0, 5])
def test_torch_merge_equals_the_host_merge(slide_dir, window_batch):
    host = Segmenter(slide_dir, backend="torchscript", device="cpu", output_resolution="network",
                     window_batch=window_batch)
    device = Segmenter(slide_dir, backend="torchscript", device="cpu", output_resolution="network",
                       window_batch=window_batch, merge_on_device=True)
    assert not host.merge_on_device and device.merge_on_device  # on the CPU the host merge is the default
    calls = []
    run = device.backend.run
    device.backend.run = lambda inputs, keep_on_device=(): calls.append(keep_on_device) or run(inputs, keep_on_device)
    for seed in range(3):
        rgb = frame((112, 150), seed)
        want, got = host.segment(rgb), device.segment(rgb)
        assert got.labels.dtype == np.uint8 and got.network_confidence.dtype == np.float32
        assert np.array_equal(got.labels, want.labels)
        assert np.abs(got.network_confidence - want.network_confidence).max() <= 1e-6
        assert len(np.unique(want.labels)) >= 2
    # Every run kept its scores where the backend made them.
    assert calls and all(kept == (0,) for kept in calls)
    assert len(calls) == 3 * (1 if window_batch == 0 else 3)


def test_device_merge_in_bf16_and_its_refusal_on_onnx(slide_dir):
    rgb = frame((90, 170), 7)
    want = Segmenter(slide_dir, backend="onnx", device="cpu").segment(rgb)
    got = Segmenter(slide_dir, backend="torchscript", device="cpu", precision="bf16", merge_on_device=True,
                    window_batch=4).segment(rgb)
    assert got.labels.shape == (90, 170) and got.confidence.dtype == np.float32
    assert label_agreement(got.labels, want.labels) >= BF16_MIN_AGREEMENT
    with pytest.raises(ValueError, match="merge_on_device needs the torchscript backend"):
        Segmenter(slide_dir, backend="onnx", device="cpu", merge_on_device=True)
    assert not Segmenter(slide_dir, backend="onnx", device="cpu").merge_on_device


# -- node: a model that cannot run stops it with one line ---------------------------------------------------------
class Broken(torch.nn.Module):
    """Loads anywhere, fails on its first run as a graph bound to another device does."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[0] > 0:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               "cuda:0 and cuda:1!")
        return image[..., 0], image[..., 0].float()


@pytest.fixture()
def broken_package(tiny_model_dir, tmp_path) -> Path:
    package = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, package)
    torch.jit.script(Broken()).save(str(package / "whole.ts"))
    card = json.loads((package / "card.json").read_text())
    card["checksums"]["whole.ts"] = sha256_file(package / "whole.ts")
    (package / "card.json").write_text(json.dumps(card))
    return package


def test_warm_up_failure_ends_the_node_with_one_clear_line(broken_package, tmp_path, ros_domain_id):
    from rosutil import start_node_process

    log = tmp_path / "log.txt"
    proc = start_node_process(["-p", f"model:={broken_package}", "-p", "backend:=torchscript"], log)
    proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    (line,) = [line for line in text.splitlines() if "cannot start" in line]
    assert "warm-up inference of tiny_test on cpu (TorchScript, fp32 graph) failed" in line
    assert "Expected all tensors to be on the same device" in line
    assert "on cpu (TorchScript, fp32 graph)" in text  # the device taken, logged before the warm-up


@pytest.mark.parametrize("param, message", [("device:=gpu0", "device"), ("device:=cuda:x", "device"),
                                            ("precision:=int8", "precision")])
def test_node_refuses_bad_device_and_precision(tiny_model_dir, tmp_path, ros_domain_id, param, message):
    from rosutil import start_node_process

    log = tmp_path / "log.txt"
    proc = start_node_process(["-p", f"model:={tiny_model_dir}", "-p", param], log)
    proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode == 2, text
    assert "cannot start" in text and message in text.split("cannot start")[1]


# -- bench and command line -------------------------------------------------------------------------------------
def test_bench_reports_device_and_precision(tiny_model_dir, tmp_path, ros_domain_id):
    from dgss_perception.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_model_dir), "--backend", "torchscript", "--device", "cpu",
                 "--precision", "bf16", "--width", "96", "--height", "64", "--frames", "2", "--warmup", "1",
                 "--no-node", "--peak-gflops", "50", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    backend = report["backend"]
    assert backend["device_report"] == "cpu (TorchScript, bf16 autocast)" and backend["precision"] == "bf16"
    assert backend["precision_note"] is None and backend["merge_on_device"] is None  # a whole package
    assert "--precision bf16" in report["command"] and report["compute_floor"]["precision"] == "bf16"


@pytest.mark.parametrize("argv", [["bench", "--device", "gpu"], ["segment", "x.png", "--device", "cuda:"]])
def test_command_line_refuses_bad_devices(tiny_model_dir, argv, capsys):
    from dgss_perception.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*argv, "--model", str(tiny_model_dir)])
    assert exc.value.code == 2 and "auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_cuda_libraries_preloaded_once_and_only_for_a_gpu_build(monkeypatch):
    """onnxruntime-gpu finds pip's CUDA wheels only through preload_dlls: called once, never on a CPU build."""
    from dgss_perception import backends

    calls = []

    class FakeOrt:
        @staticmethod
        def preload_dlls():
            calls.append(1)

    monkeypatch.setattr(backends, "_PRELOADED", [])
    assert not backends.preload_cuda_libraries(FakeOrt, ["CPUExecutionProvider"])
    assert backends.preload_cuda_libraries(FakeOrt, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not backends.preload_cuda_libraries(FakeOrt, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert calls == [1]

    class FailingOrt:
        @staticmethod
        def preload_dlls():
            raise OSError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(backends, "_PRELOADED", [])
    assert backends.preload_cuda_libraries(FailingOrt, ["TensorrtExecutionProvider"])  # logged, not raised
