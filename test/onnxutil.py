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
