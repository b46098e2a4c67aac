"""Every exported ONNX graph runs wholly on ONNX Runtime's CUDA provider (checked without a GPU).

A node the CUDA provider has no kernel for runs on the CPU with copies across the bus around it, and a
session asked for CUDA graphs is refused; on a CPU machine the same graph runs fine, so only a check of
the graph against the provider's kernel table (``training.onnx_cuda``) can see it here. Two such nodes
existed: float16 GridSample in the deformable attention of fp16 DepthForge / MFuser packages, and uint8
GatherND in the label upsampling of resize-in-graph packages.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from training.models.ms_deform_attn import ms_deform_attn_reference, ms_deform_attn_sample
from training.onnx_cuda import CUDA_KERNELS, cuda_provider_gaps


def one_node(op: str, inputs: list[tuple[str, int, list[int]]], out_type: int, opset: int = 18,
             domain: str = "", **attrs: object) -> onnx.ModelProto:
    """A graph of one ``op`` node over typed inputs (name, element type, shape), one output of ``out_type``."""
    node = helper.make_node(op, [name for name, _, _ in inputs], ["y"], domain=domain, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info("y", out_type, None)])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


def grid_sample(dtype: int) -> onnx.ModelProto:
    return one_node("GridSample", [("x", dtype, [1, 2, 4, 4]), ("grid", dtype, [1, 3, 3, 2])], dtype)


def test_grid_sample_is_covered_in_float32_only() -> None:
    assert cuda_provider_gaps(grid_sample(TensorProto.FLOAT)) == []
    (gap,) = cuda_provider_gaps(grid_sample(TensorProto.FLOAT16))
    assert gap.op_type == "GridSample" and gap.element_type == "FLOAT16" and "FLOAT only" in gap.reason


def test_gather_nd_has_no_uint8_kernel_and_gather_has() -> None:
    nd = one_node("GatherND", [("x", TensorProto.UINT8, [4, 5]), ("i", TensorProto.INT64, [3, 1])], TensorProto.UINT8)
    (gap,) = cuda_provider_gaps(nd)
    assert gap.op_type == "GatherND" and gap.element_type == "UINT8"
    gather = one_node("Gather", [("x", TensorProto.UINT8, [4, 5]), ("i", TensorProto.INT64, [3])], TensorProto.UINT8)
    assert cuda_provider_gaps(gather) == []


def test_the_deciding_input_and_the_opset_range() -> None:
    """Where's kernels are registered by the type of its values (input 1), and bfloat16 only from opset 16."""
    def where(opset: int) -> onnx.ModelProto:
        return one_node("Where", [("c", TensorProto.BOOL, [3]), ("a", TensorProto.BFLOAT16, [3]),
                                  ("b", TensorProto.BFLOAT16, [3])], TensorProto.BFLOAT16, opset=opset)
    assert cuda_provider_gaps(where(16)) == []
    (gap,) = cuda_provider_gaps(where(15))
    assert gap.element_type == "BFLOAT16"
    # ConstantOfShape is decided by its int64 shape input, whatever it fills with.
    fill = one_node("ConstantOfShape", [("s", TensorProto.INT64, [2])], TensorProto.FLOAT)
    assert cuda_provider_gaps(fill) == []


def test_operators_nobody_checked_and_other_domains_are_reported() -> None:
    (unknown,) = cuda_provider_gaps(one_node("Hardmax", [("x", TensorProto.FLOAT, [2, 3])], TensorProto.FLOAT))
    assert "not in the checked table" in unknown.reason
    (contrib,) = cuda_provider_gaps(one_node("FusedGemm", [("a", TensorProto.FLOAT, [2, 2]),
                                                           ("b", TensorProto.FLOAT, [2, 2])], TensorProto.FLOAT,
                                             domain="com.microsoft"))
    assert contrib.op_type == "com.microsoft.FusedGemm"
    assert "Hardmax" not in CUDA_KERNELS


def test_control_flow_is_reported_as_it_rules_out_cuda_graphs() -> None:
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    (gap,) = cuda_provider_gaps(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert gap.op_type == "If" and "CUDA graph" in gap.reason


def test_types_are_inferred_through_the_graph_and_weights(tmp_path: Path) -> None:
    """A float16 GridSample fed by a Cast and an fp16 initializer is found (types from inference, no data)."""
    weight = helper.make_tensor("w", TensorProto.FLOAT16, [1, 2, 4, 4], np.zeros(32, np.float16).tobytes(), raw=True)
    nodes = [helper.make_node("Cast", ["g32"], ["g16"], to=TensorProto.FLOAT16),
             helper.make_node("GridSample", ["w", "g16"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("g32", TensorProto.FLOAT, [1, 3, 3, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], initializer=[weight])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    (gap,) = cuda_provider_gaps(path)
    assert gap.op_type == "GridSample" and gap.element_type == "FLOAT16"


def test_half_precision_sampling_runs_in_float32() -> None:
    """fp16 deformable attention samples in float32: the same as sampling the fp32 values, rounded once."""
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 8), (3, 4)]
    value = torch.randn(1, sum(h * w for h, w in shapes), 2, 4, generator=g)
    locations = torch.rand(1, 5, 2, 2, 3, 2, generator=g)
    weights = torch.rand(1, 5, 2, 2, 3, generator=g)
    want = ms_deform_attn_reference(value.half().float(), shapes, locations.half().float(), weights.half().float())
    got = ms_deform_attn_sample(value.half(), shapes, locations.half(), weights.half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


def package_gaps(package: Path) -> dict[str, list[str]]:
    """Each ONNX graph of a package with its gaps, after checking the card recorded the same (none)."""
    card = json.loads((package / "card.json").read_text())
    assert card["export"]["onnx_cuda_gaps"] == {}
    return {path.name: [str(g) for g in cuda_provider_gaps(path)] for path in sorted(package.glob("*.onnx"))}


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_c2f_dir", "tiny_mfuser_dir", "tiny_depthforge_dir"])
def test_every_family_runs_wholly_on_the_cuda_provider(fixture: str, request: pytest.FixtureRequest) -> None:
    gaps = package_gaps(request.getfixturevalue(fixture))
    assert gaps and all(not g for g in gaps.values()), gaps


def test_resize_in_graph_labels_gather_on_the_gpu(in_graph_package: tuple[Path, Path, dict]) -> None:
    """The resize-in-graph package upsamples uint8 labels with Gather (the uint8 GatherND it had is CPU-only)."""
    _, graph_dir, _ = in_graph_package
    assert package_gaps(graph_dir) == {"whole.onnx": []}
    ops = {n.op_type for n in onnx.load(str(graph_dir / "whole.onnx"), load_external_data=False).graph.node}
    assert "GatherND" not in ops and "Gather" in ops


def test_fp16_depthforge_samples_in_float32(tmp_path: Path) -> None:
    """The fp16 DepthForge window graph: fp16 everywhere but its GridSample nodes, which take float32."""
    from conftest import make_tiny_depthforge_weights
    from training.export import export_package

    cfg = make_tiny_depthforge_weights(tmp_path / "w.safetensors")
    export_package(cfg, tmp_path / "w.safetensors", tmp_path / "package", formats=("onnx",), precision="fp16",
                   min_label_agreement=0.0, parity_seed=0)
    assert package_gaps(tmp_path / "package") == {"window.onnx": []}
    model = onnx.load(str(tmp_path / "package" / "window.onnx"), load_external_data=False)
    assert sum(n.op_type == "GridSample" for n in model.graph.node) == 6  # 2 pixel-decoder layers × 3 levels
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
