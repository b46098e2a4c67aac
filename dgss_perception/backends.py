"""Inference backends: run one exported graph.

A backend takes the graph's inputs in card order (the first is always the
uint8 NHWC image batch) and returns its outputs in card order as numpy
arrays. ONNX Runtime needs no torch; the TorchScript backend imports torch
only when chosen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str
    device: str

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The graph's inputs in card order (image uint8 (N,H,W,3) first) → its outputs in card order."""


class BackendError(RuntimeError):
    """A backend that cannot be used here (missing library, provider or device)."""


def gpu_identity(device_id: int = 0) -> str:
    """Name and compute capability of a CUDA GPU as a path-safe slug (``nvidia-smi``), or ``unknown-gpu``."""
    import re
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader",
                              "-i", str(device_id)], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown-gpu"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", out.strip()).strip("-").lower()
    return slug or "unknown-gpu"


def trt_cache_dir(base: Path, checksum: str | None, gpu: str, precision: str) -> Path:
    """Where TensorRT engines for one graph live: keyed by the graph's checksum, the GPU and the precision.

    An engine is only valid for the graph, GPU architecture and precision it was built for, so a
    shared cache directory never hands one model's or one GPU's engine to another; a second start
    of the same graph on the same GPU finds its engine and does not rebuild.
    """
    digest = (checksum or "unversioned").split(":")[-1][:16]
    return base / f"{digest}-{gpu}-{precision}"


def onnx_providers(device: str, cache_dir: Path | None, precision: str = "fp32") -> list:
    """Execution providers in preference order for a device (auto | cpu | cuda)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if device == "cpu":
        return ["CPUExecutionProvider"]
    chosen: list = []
    if "TensorrtExecutionProvider" in available:
        options = {"trt_fp16_enable": precision == "fp16"}
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                           trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
        chosen.append(("TensorrtExecutionProvider", options))
    if "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    if device == "cuda" and not chosen:
        raise BackendError("device 'cuda' requested but ONNX Runtime has no CUDA or TensorRT provider "
                           f"(available: {sorted(available)}); install onnxruntime-gpu")
    chosen.append("CPUExecutionProvider")
    return chosen


class OnnxRuntimeBackend:
    """ONNX Runtime with TensorRT → CUDA → CPU providers, as available."""

    name = "onnxruntime"

    def __init__(self, path: Path, input_names: list[str], output_names: list[str], device: str = "auto",
                 threads: int = 0, checksum: str | None = None, precision: str = "fp32") -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("the onnx backend needs onnxruntime (pip install onnxruntime)") from exc
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        cache = None
        if device != "cpu" and "TensorrtExecutionProvider" in ort.get_available_providers():
            base = Path(os.environ.get("DGSS_TRT_CACHE", Path.home() / ".cache" / "dgss_perception" / "trt"))
            cache = trt_cache_dir(base, checksum, gpu_identity(), precision)
        providers = onnx_providers(device, cache, precision)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0] != "CPUExecutionProvider" else "cpu"
        self.providers = self.session.get_providers()
        graph_inputs = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if graph_inputs != list(input_names) or graph_outputs != list(output_names):
            raise BackendError(f"{path}: graph has inputs {graph_inputs} and outputs {graph_outputs}, "
                               f"card says {list(input_names)} and {list(output_names)}")
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, dict(zip(self.input_names, inputs)))


class TorchScriptBackend:
    """A TorchScript graph on CUDA or CPU."""

    name = "torchscript"

    def __init__(self, path: Path, device: str = "auto") -> None:
        try:
            import torch
        except ImportError as exc:
            raise BackendError("the torchscript backend needs torch") from exc
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("device 'cuda' requested but torch sees no CUDA device")
        self.torch = torch
        self.device = device
        self.module = torch.jit.load(str(path), map_location=device).eval()

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            # torch cannot wrap a read-only array (a frame viewed in its message): copy those.
            out = self.module(*(torch.from_numpy(a if a.flags.writeable else a.copy()).to(self.device)
                                for a in inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.cpu().numpy() for o in outs]
