"""fp16 packages: half-precision graphs behind the same uint8-in, float32-out interface, checked against fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_C2F_CONFIG, TINY_CONFIG, make_tiny_depthforge_weights, make_tiny_weights
from dgss_perception.card import load_card
from dgss_perception.engine import Segmenter
from training.config import config_from_dict
from training.export import ParityError, at_precision, export_package, label_agreement
from training.export_wrappers import HalfPrecision


def _weight_types(path) -> set[int]:
    """Element types of an ONNX graph's float weights (more than 3 values: not the normalisation constants)."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    return {t.data_type for t in onnx.load(str(path)).graph.initializer
            if t.data_type in floats and int(np.prod(t.dims)) > 3}


@pytest.fixture(scope="module")
def fp16_whole_dir(tmp_path_factory, tiny_model_dir):
    """The tiny VFMNet of ``tiny_model_dir`` exported again in fp16."""
    out = tmp_path_factory.mktemp("fp16") / "package"
    export_package(config_from_dict(TINY_CONFIG), tiny_model_dir.parent / "weights.safetensors", out,
                   precision="fp16")
    return out


def test_fp16_package_card_graphs_and_agreement(fp16_whole_dir):
    import onnx

    card = load_card(fp16_whole_dir)
    assert card.precision == "fp16" and card.export["min_label_agreement"] == 0.98
    records = card.export["parity"]
    assert {r["graph"] for r in records} == {"onnx", "torchscript"}
    assert all(r["ok"] and r["label_agreement_fp32"] >= 0.98 for r in records)
    # Weights are half precision; the interface stays uint8 in, uint8 labels and float32 confidence out.
    assert _weight_types(fp16_whole_dir / "whole.onnx") == {onnx.TensorProto.FLOAT16}
    graph = onnx.load(str(fp16_whole_dir / "whole.onnx")).graph
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.UINT8]
    assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT]


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_fp16_runtime_labels_agree_with_fp32(fp16_whole_dir, tiny_model_dir, backend):
    frame = np.random.default_rng(5).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    half = Segmenter(fp16_whole_dir, backend=backend, device="cpu").segment(frame)
    full = Segmenter(tiny_model_dir, backend=backend, device="cpu").segment(frame)
    assert half.labels.dtype == np.uint8 and half.confidence.dtype == np.float32
    assert label_agreement(half.labels, full.labels) >= 0.98
    np.testing.assert_allclose(half.confidence, full.confidence, atol=2e-2)
    assert not np.array_equal(half.confidence, full.confidence)  # it did run in half precision


def test_fp16_coarse_to_fine_records_agreement_of_both_graphs(tmp_path):
    cfg = make_tiny_weights(tmp_path / "w.safetensors", seed=3, config=TINY_C2F_CONFIG, sharpen=20.0)
    card = export_package(cfg, tmp_path / "w.safetensors", tmp_path / "package", precision="fp16",
                          formats=("onnx",))
    records = card["export"]["parity"]
    assert [r["graph"] for r in records] == ["coarse/onnx", "refine/onnx", "refine/onnx"]
    assert all(r["ok"] and r["label_agreement_fp32"] >= 0.98 for r in records)
    frame = np.random.default_rng(2).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    result = Segmenter(tmp_path / "package", theta=0.999999, c_tau=1.0).segment(frame)
    assert result.windows_refined > 0 and result.labels.shape == (100, 130)


def test_label_agreement_below_the_minimum_fails_the_export(tmp_path):
    """A tiny random DepthForge loses labels in fp16 (its masked attention flips): no card, a report instead."""
    cfg = make_tiny_depthforge_weights(tmp_path / "w.safetensors")
    out = tmp_path / "package"
    # Either the fp32 agreement falls short, or (attention decisions near their threshold) the graph's
    # labels are held to the same minimum against eager fp16 and fall short first.
    with pytest.raises(ParityError, match="agree with the fp32 model's labels|differ from eager PyTorch"):
        export_package(cfg, tmp_path / "w.safetensors", out, precision="fp16", formats=("onnx",),
                       min_label_agreement=0.999)
    assert not (out / "card.json").exists()
    report = json.loads((out / "parity_report.json").read_text())
    assert report and all(0.0 < r["label_agreement_fp32"] < 0.999 for r in report)


def test_half_precision_wrapper_and_refusals(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    wrapped = at_precision(model, "fp16")
    assert isinstance(wrapped, HalfPrecision) and wrapped.model[0].weight.dtype == torch.float16
    out = wrapped(torch.rand(1, 3, 5, 5))
    assert out.dtype == torch.float32 and out.shape == (1, 4, 5, 5)
    assert at_precision(torch.nn.Identity(), "fp32").__class__ is torch.nn.Identity
    with pytest.raises(ValueError, match="precision"):
        at_precision(torch.nn.Identity(), "int8")
    make_tiny_weights(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="min_label_agreement"):
        export_package(config_from_dict(TINY_CONFIG), tmp_path / "w.safetensors", tmp_path / "p",
                       precision="fp16", min_label_agreement=1.5)
