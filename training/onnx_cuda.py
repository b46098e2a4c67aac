"""Which nodes of an exported ONNX graph ONNX Runtime's CUDA provider has no kernel for.

ONNX Runtime places a node the CUDA provider cannot run (an operator it lacks, or one it has only for
other element types) on the CPU, with copies across the bus before and after it. The session still
runs, so no CPU test notices; on the GPU the frame pays those copies, and a session asked for CUDA
graphs is refused outright (ONNX Runtime captures a graph only when no copy node exists). Known cases:
``GridSample`` has CUDA kernels for float32 only (a float16 package's deformable attention would leave
the GPU six times per window), ``GatherND`` has none for uint8. Control flow (If, Loop, Scan) runs on
the GPU but also rules out CUDA graphs, so it is reported the same way.

:data:`CUDA_KERNELS` lists, for the operators this project's graphs use (and their near relatives), the
element types ONNX Runtime's CUDA provider registers per opset range (its generated kernel table,
``docs/OperatorKernels.md``, as of the 1.31 release line the ``gpu`` extra pins). An operator missing
from the table is reported as unchecked, so a new operator in an export shows up until someone looks
it up and adds it. The check needs only ``onnx`` (shape inference for the element types), no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Element-type sets as ONNX Runtime's table spells them (TensorProto names).
_ALL = frozenset("BFLOAT16 BOOL DOUBLE FLOAT FLOAT16 INT16 INT32 INT64 INT8 UINT16 UINT32 UINT64 UINT8".split())
_FP = frozenset("DOUBLE FLOAT FLOAT16".split())
_FPB = _FP | {"BFLOAT16"}
_NUM = frozenset("BFLOAT16 DOUBLE FLOAT FLOAT16 INT16 INT32 INT64 INT8 UINT16 UINT32 UINT64 UINT8".split())
_NUM13 = frozenset("BFLOAT16 DOUBLE FLOAT FLOAT16 INT32 INT64 UINT32 UINT64".split())
_NUM7 = _NUM13 - {"BFLOAT16"}
_CMP = frozenset("DOUBLE FLOAT FLOAT16 INT32 INT64 UINT32 UINT64".split())
_BOOL = frozenset({"BOOL"})

Ranges = tuple[tuple[int, int | None, frozenset[str]], ...]  # (first opset, last opset or None, element types)


def _arith() -> tuple[int, Ranges]:
    return 0, ((14, None, _NUM), (13, 13, _NUM13), (7, 12, _NUM7))


# operator → (index of the input whose element type the kernel is registered for, ranges).
CUDA_KERNELS: dict[str, tuple[int, Ranges]] = {
    "Abs": (0, ((13, None, _NUM), (6, 12, _NUM - {"BFLOAT16"}))),
    "Add": _arith(), "Sub": _arith(), "Mul": _arith(), "Div": _arith(),
    "And": (0, ((7, None, _BOOL),)), "Or": (0, ((7, None, _BOOL),)), "Xor": (0, ((7, None, _BOOL),)),
    "Not": (0, ((1, None, _BOOL),)),
    "ArgMax": (0, ((1, None, _FP),)), "ArgMin": (0, ((1, None, _FP),)),
    "AveragePool": (0, ((22, None, _FPB), (7, 21, _FP))),
    "BatchNormalization": (0, ((7, None, _FP),)),
    "Cast": (0, ((13, None, _ALL), (6, 12, _ALL - {"BFLOAT16"}))),
    "Ceil": (0, ((6, None, _FP),)), "Floor": (0, ((6, None, _FP),)), "Round": (0, ((11, None, _FP),)),
    "Clip": (0, ((12, None, frozenset("DOUBLE FLOAT FLOAT16 INT64 INT8 UINT64 UINT8".split())),
                 (6, 11, frozenset({"FLOAT"})))),
    "Concat": (0, ((4, None, _ALL),)),
    "ConstantOfShape": (0, ((9, None, frozenset({"INT64"})),)),  # the shape input; any output type
    "Conv": (0, ((22, None, _FPB), (1, 21, _FP))),
    "ConvTranspose": (0, ((1, None, _FP),)),
    "Cos": (0, ((7, None, _FP),)), "Sin": (0, ((7, None, _FP),)),
    "CumSum": (0, ((14, None, _CMP), (11, 13, _CMP - {"FLOAT16"}))),
    "Einsum": (0, ((12, None, _FP),)),
    "Equal": (0, ((11, None, _CMP | _BOOL),)),
    "Erf": (0, ((13, None, _FPB), (9, 12, _FP))),
    "Exp": (0, ((13, None, _FPB), (6, 12, _FP))),
    "Log": (0, ((6, None, _FP),)),
    "Expand": (0, ((8, None, _ALL),)),
    "Flatten": (0, ((1, None, _ALL),)),
    "Gather": (0, ((1, None, _ALL),)), "GatherElements": (0, ((11, None, _ALL),)),
    "GatherND": (0, ((13, None, frozenset("BFLOAT16 BOOL DOUBLE FLOAT FLOAT16 INT64".split())),
                     (11, 12, frozenset("BOOL DOUBLE FLOAT FLOAT16 INT64".split())))),
    "Gelu": (0, ((20, None, _FPB),)),
    "Gemm": (0, ((13, None, _FPB), (7, 12, _FP))),
    "GlobalAveragePool": (0, ((1, None, _FP),)), "GlobalMaxPool": (0, ((1, None, _FP),)),
    "Greater": (0, ((9, None, _CMP),)), "Less": (0, ((9, None, _CMP),)),
    "GreaterOrEqual": (0, ((12, None, _CMP),)), "LessOrEqual": (0, ((12, None, _CMP),)),
    "GridSample": (0, ((16, None, frozenset({"FLOAT"})),)),
    "Identity": (0, ((1, None, _ALL),)),
    "InstanceNormalization": (0, ((6, None, _FP),)),
    "LayerNormalization": (0, ((17, None, _FPB),)),
    "LeakyRelu": (0, ((6, None, _FP),)),
    "MatMul": (0, ((13, None, _FPB), (1, 12, _FP))),
    "Max": (0, ((12, None, _NUM13), (6, 11, _FPB))), "Min": (0, ((12, None, _NUM13), (6, 11, _FPB))),
    "MaxPool": (0, ((12, None, _FP | {"INT8", "UINT8"}), (1, 11, _FP))),
    "Mod": (0, ((13, None, _NUM13), (10, 12, _NUM7))),
    "Neg": (0, ((13, None, frozenset("BFLOAT16 DOUBLE FLOAT FLOAT16 INT16 INT32 INT64 INT8".split())),
                (6, 12, frozenset("DOUBLE FLOAT FLOAT16 INT16 INT32 INT64 INT8".split())))),
    "NonZero": (0, ((9, None, frozenset("BOOL FLOAT FLOAT16 INT32 INT64 UINT8".split())),)),
    "Pad": (0, ((13, None, _FP | _BOOL), (2, 12, _FP))),
    "Pow": (0, ((13, None, _FPB | {"INT32", "INT64"}), (12, 12, _FP | {"INT32", "INT64"}), (7, 11, _FP))),
    "Range": (0, ((11, None, frozenset("DOUBLE FLOAT INT16 INT32 INT64".split())),)),
    "Reciprocal": (0, ((6, None, _FP),)),
    "ReduceMax": (0, ((1, None, _FP | {"INT32", "INT64"}),)),
    "ReduceMean": (0, ((1, None, _FP | {"INT32"}),)),
    "ReduceMin": (0, ((1, None, _FP | {"INT32", "INT64", "INT8", "UINT8"}),)),
    "ReduceSum": (0, ((13, None, _FPB | {"INT32", "INT64"}), (1, 12, _FP | {"INT32", "INT64"}))),
    "Relu": (0, ((13, None, _FPB), (6, 12, _FP))),
    "Reshape": (0, ((5, None, _ALL),)),
    "Resize": (0, ((10, None, _FP | {"INT32", "UINT8"}),)),
    "ScatterElements": (0, ((11, None, _ALL),)), "ScatterND": (0, ((11, None, _ALL),)),
    "Shape": (0, ((1, None, _ALL),)), "Size": (0, ((1, None, _ALL),)),
    "Sigmoid": (0, ((13, None, _FPB), (6, 12, _FP))),
    "Slice": (0, ((1, None, _ALL),)),
    "Softmax": (0, ((13, None, _FPB), (1, 12, _FP))),
    "Softplus": (0, ((1, None, _FP),)),
    "Split": (0, ((2, None, _ALL),)),
    "Sqrt": (0, ((13, None, _FPB), (6, 12, _FP))),
    "Squeeze": (0, ((1, None, _ALL),)), "Unsqueeze": (0, ((1, None, _ALL),)),
    "Sum": (0, ((6, None, _FPB),)),
    "Tanh": (0, ((13, None, _FPB), (6, 12, _FP))),
    "Tile": (0, ((13, None, _FPB | {"INT32", "INT64"}), (6, 12, _FP | {"INT32", "INT64"}))),
    "TopK": (0, ((1, None, _FP | {"INT32", "INT64"}),)),
    "Transpose": (0, ((1, None, _ALL),)),
    "Trilu": (0, ((14, None, _ALL),)),
    "Where": (1, ((16, None, _FPB | {"INT32", "INT64", "UINT8"}), (9, 15, _FP | {"INT32", "INT64", "UINT8"}))),
}


@dataclass(frozen=True)
class Gap:
    """A node the CUDA provider cannot run: its name, operator, the element type it got, and why."""

    node: str
    op_type: str
    element_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} {self.node!r} ({self.element_type}): {self.reason}"


# Operators the CUDA provider runs, but whose presence makes ONNX Runtime refuse to capture a CUDA graph.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


def _covered(op_type: str, opset: int, element_type: str) -> str:
    """Empty when the CUDA provider has a kernel for ``op_type`` at ``opset`` taking ``element_type``, else why not."""
    if op_type in CONTROL_FLOW:
        return "control flow: ONNX Runtime captures no CUDA graph of a graph that has it"
    entry = CUDA_KERNELS.get(op_type)
    if entry is None:
        return "operator not in the checked table (look it up in ONNX Runtime's CUDA kernel table and add it)"
    for first, last, types in entry[1]:
        if first <= opset and (last is None or opset <= last):
            if element_type in types:
                return ""
            return f"the CUDA kernel takes {', '.join(sorted(types))} only"
    return f"no CUDA kernel at opset {opset}"


def cuda_provider_gaps(model: Any) -> list[Gap]:
    """The nodes of ``model`` (an ``onnx.ModelProto`` or a path) ONNX Runtime's CUDA provider would not run.

    Element types come from ONNX shape inference; a node whose deciding input has no inferred type is
    reported too (nothing can vouch for it).
    """
    import onnx
    from onnx import TensorProto, shape_inference

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    model = shape_inference.infer_shapes(_without_weights(model))
    graph = model.graph
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    types: dict[str, str] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = TensorProto.DataType.Name(value.type.tensor_type.elem_type)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = TensorProto.DataType.Name(attr.t.data_type)
    gaps = []
    for node in graph.node:
        domain = node.domain or "ai.onnx"
        if node.op_type == "Constant" and domain == "ai.onnx":
            continue  # folded into an initializer by ONNX Runtime
        if domain != "ai.onnx":
            gaps.append(Gap(node.name, f"{domain}.{node.op_type}", "-", "operator outside the ONNX domain"))
            continue
        index = CUDA_KERNELS.get(node.op_type, (0, ()))[0]
        inputs = [name for name in node.input]
        name = inputs[index] if index < len(inputs) else ""
        element_type = types.get(name, "unknown") if name else "none"
        reason = _covered(node.op_type, opset[domain], element_type)
        if reason:
            gaps.append(Gap(node.name, node.op_type, element_type, reason))
    return gaps


def _without_weights(model: Any) -> Any:
    """A copy of ``model`` whose initializers are typed inputs instead: types infer the same, without the weights.

    A ViT-L graph carries over a gigabyte of weights inline; shape inference would serialise all of it.
    """
    from onnx import helper

    graph = model.graph
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    slim = helper.make_graph(list(graph.node), graph.name, [*graph.input, *weights], list(graph.output),
                             value_info=list(graph.value_info))
    return helper.make_model(slim, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             functions=list(model.functions))


def gap_lines(path: Path) -> list[str]:
    """:func:`cuda_provider_gaps` of the graph at ``path`` as one line per node (what a card records)."""
    return [str(gap) for gap in cuda_provider_gaps(path)]
