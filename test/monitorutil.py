"""A stand-in model package whose confidence is the frame's brightness, for the domain-shift tests.

Random-weight test models are about equally unsure of every input, so they cannot show a shift. This
package's single ONNX graph returns, per pixel, confidence = 0.05 + 0.9 · (mean of R, G, B) / 255 and
labels = (brightness > 0.5): a model that, like the demo's, loses confidence in the dark. Frames of the
"training domain" are bright textured scenes, "night" frames the same scenes darkened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dgss_perception.card import write_card
from dgss_perception.labels import CITYSCAPES_CLASSES, palette_for

HEIGHT, WIDTH = 24, 32


def make_brightness_package(directory: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    directory.mkdir(parents=True, exist_ok=True)
    const = lambda name, value: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[3], keepdims=0),  # (1, H, W)
        const("scale", 0.9 / 255.0), const("offset", 0.05), const("half", 0.5 * 0.9 + 0.05),
        helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["confidence"]),
        helper.make_node("Greater", ["confidence", "half"], ["bright"]),
        helper.make_node("Cast", ["bright"], ["labels"], to=TensorProto.UINT8),
    ]
    graph = helper.make_graph(
        nodes, "brightness",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, HEIGHT, WIDTH, 3])],
        [helper.make_tensor_value_info("labels", TensorProto.UINT8, [1, HEIGHT, WIDTH]),
         helper.make_tensor_value_info("confidence", TensorProto.FLOAT, [1, HEIGHT, WIDTH])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "whole.onnx"))
    classes = list(CITYSCAPES_CLASSES)
    write_card(directory, {
        "name": "brightness_test", "family": "vfmnet_mgrnet", "backbones": ["none"], "classes": classes,
        "palette": [list(c) for c in palette_for(len(classes))], "ignore_index": 255,
        "input": {"height": HEIGHT, "width": WIDTH, "channel_order": "RGB", "layout": "NHWC", "dtype": "uint8",
                  "resize": "stretch", "normalization": "in_graph", "mean": [0.5] * 3, "std": [0.5] * 3},
        "inference": {"mode": "whole", "params": {}},
        "graphs": {"whole": {
            "onnx": "whole.onnx",
            "inputs": [{"name": "image", "dtype": "uint8", "shape": [1, HEIGHT, WIDTH, 3]}],
            "outputs": [{"name": "labels", "dtype": "uint8", "shape": [1, HEIGHT, WIDTH]},
                        {"name": "confidence", "dtype": "float32", "shape": [1, HEIGHT, WIDTH]}],
            "output_kind": "labels_confidence"}},
        "precision": "fp32",
    })
    return directory


def day_frame(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A bright textured frame (uint8 H×W×3): brightness varies from frame to frame and over the frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 170 + 40 * np.sin(x / rng.uniform(3, 9) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(3, 9))
    rgb = base[..., None] + rng.normal(0, 25, (height, width, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def night_frame(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """The same scene darkened to a quarter (uint8 H×W×3)."""
    return (day_frame(seed, height, width) // 4).astype(np.uint8)
