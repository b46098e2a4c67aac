"""The inference engine: a model package in, labels at input resolution out.

No rclpy here: the node, the bag tool and the command line all call
:class:`Segmenter`, and it is tested with plain pytest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .backends import Backend, BackendError, OnnxRuntimeBackend, TorchScriptBackend
from .card import ModelCard, load_card

BACKENDS = ("auto", "onnx", "torchscript")
DEVICES = ("auto", "cpu", "cuda")
OUTPUT_RESOLUTIONS = ("input", "network")


@dataclass
class SegmentResult:
    """Labels (uint8 H×W, 255 = ignore) and per-stage timings in milliseconds.

    ``confidence`` (max softmax, float32 H×W at the labels' size) is resized from
    the network grid on first access, so callers that never read it pay nothing.
    """

    labels: np.ndarray
    timings_ms: dict[str, float]
    network_confidence: np.ndarray
    _confidence: np.ndarray | None = field(default=None, repr=False)

    @property
    def confidence(self) -> np.ndarray:
        if self._confidence is None:
            h, w = self.labels.shape
            conf = self.network_confidence
            if conf.shape != (h, w):
                conf = cv2.resize(conf, (w, h), interpolation=cv2.INTER_LINEAR)
            self._confidence = conf
        return self._confidence


def _softmax_max_argmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits (C,H,W) → labels uint8 (H,W), max softmax float32 (H,W)."""
    labels = logits.argmax(axis=0)
    top = np.take_along_axis(logits, labels[None], axis=0)[0]
    denom = np.exp(logits - top[None]).sum(axis=0)
    return labels.astype(np.uint8), (1.0 / denom).astype(np.float32)


class Segmenter:
    """Segment RGB frames with an exported model package.

    Args:
        model_dir: directory holding ``card.json`` and the graphs.
        backend: ``auto`` (ONNX Runtime when importable and exported, else TorchScript), ``onnx`` or ``torchscript``.
        device: ``auto``, ``cpu`` or ``cuda``.
        output_resolution: ``input`` (labels at the frame's size) or ``network`` (the graph's grid).
    """

    def __init__(self, model_dir: str | Path, backend: str = "auto", device: str = "auto",
                 output_resolution: str = "input", threads: int = 0) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
        if output_resolution not in OUTPUT_RESOLUTIONS:
            raise ValueError(f"unknown output_resolution {output_resolution!r} "
                             f"(choose from {', '.join(OUTPUT_RESOLUTIONS)})")
        self.card: ModelCard = load_card(model_dir)
        self.output_resolution = output_resolution
        self.graph = self.card.graphs[self.card.inference_mode]
        self.backend: Backend = self._open_backend(backend, device, threads)

    def _open_backend(self, backend: str, device: str, threads: int) -> Backend:
        if backend == "auto":
            try:
                import onnxruntime  # noqa: F401
                backend = "onnx" if self.graph.onnx else "torchscript"
            except ImportError:
                backend = "torchscript"
        path = self.card.graph_path(self.card.inference_mode, backend)
        if backend == "onnx":
            return OnnxRuntimeBackend(path, self.graph.inputs[0].name, [o.name for o in self.graph.outputs],
                                      device=device, threads=threads)
        if backend == "torchscript":
            return TorchScriptBackend(path, device=device)
        raise BackendError(f"unknown backend {backend}")

    @property
    def network_size(self) -> tuple[int, int]:
        """(height, width) of the graph input."""
        return self.card.input_height, self.card.input_width

    @property
    def batch_size(self) -> int:
        """Frames one inference takes (the graph's fixed batch; 1 for most packages)."""
        return self.graph.inputs[0].shape[0]

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """rgb uint8 H×W×3 → uint8 (h, w, 3) at the network size, in the card's channel order."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 H×W×3 frame, got {rgb.dtype} {rgb.shape}")
        h, w = self.network_size
        if rgb.shape[:2] != (h, w):
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        if self.card.channel_order == "BGR":
            rgb = rgb[:, :, ::-1]
        return rgb

    def segment(self, rgb: np.ndarray) -> SegmentResult:
        """Segment one frame: rgb uint8 H×W×3 → labels uint8 at input (or network) resolution."""
        return self.segment_batch([rgb])[0]

    def segment_batch(self, frames: list[np.ndarray]) -> list[SegmentResult]:
        """Segment up to ``batch_size`` frames (any sizes) in one inference; timings are the batch's."""
        if not 1 <= len(frames) <= self.batch_size:
            raise ValueError(f"this model takes 1 to {self.batch_size} frames at once, got {len(frames)}")
        t0 = time.perf_counter()
        batch = np.zeros((self.batch_size, *self.network_size, 3), np.uint8)  # unused slots stay black
        for i, rgb in enumerate(frames):
            batch[i] = self.preprocess(rgb)
        t1 = time.perf_counter()
        outputs = self.backend.run(batch)
        t2 = time.perf_counter()
        results = []
        for i, rgb in enumerate(frames):
            if self.graph.output_kind == "labels_confidence":
                labels = outputs[0][i].astype(np.uint8, copy=False)
                confidence = outputs[1][i].astype(np.float32, copy=False)
            else:
                labels, confidence = _softmax_max_argmax(outputs[0][i].astype(np.float32, copy=False))
            if self.output_resolution == "input" and labels.shape != rgb.shape[:2]:
                labels = cv2.resize(labels, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
            results.append(SegmentResult(labels=labels, timings_ms={}, network_confidence=confidence))
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
        for r in results:
            r.timings_ms = dict(timings)
        return results
