"""ONNX helpers shared by the tests."""

from __future__ import annotations

from typing import Any


def _graph_op_types(graph: Any) -> set[str]:
    import onnx

    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops |= _graph_op_types(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    ops |= _graph_op_types(sub)
    return ops


def op_types(model: Any) -> set[str]:
    """Op types anywhere in an ONNX model: its graph, subgraphs (If/Loop/Scan bodies) and functions."""
    ops = _graph_op_types(model.graph)
    for function in model.functions:
        ops |= _graph_op_types(function)
    return ops


def export_and_run(module: Any, args: tuple, input_names: list[str], output_names: list[str],
                   feeds: list[Any]) -> tuple[Any, list[Any]]:
    """Export ``module`` on ``args`` with the dynamo exporter (opset 18), check the model, run it in ONNX Runtime.

    ``feeds`` are the tensors bound to ``input_names`` (flattened the way the exporter flattens ``args``).
    Returns the ONNX model and ONNX Runtime's outputs (numpy arrays).
    """
    import warnings

    import onnx
    import onnxruntime as ort
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=18, input_names=input_names,
                                    output_names=output_names)
    model = program.model_proto
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return model, session.run(None, {name: t.numpy() for name, t in zip(input_names, feeds)})
