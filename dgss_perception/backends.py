"""Inference backends: run one exported graph.

A backend takes the graph's inputs in card order (the first is always the
uint8 NHWC image batch) and returns its outputs in card order as numpy
arrays, or, for the outputs a caller asks to keep, as device tensors that
another graph of the same backend takes as inputs. ONNX Runtime needs no
torch; the TorchScript backend imports torch only when chosen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# An output left where the graph produced it: an ``onnxruntime.OrtValue`` (ONNX Runtime with IO binding) or a
# ``torch.Tensor`` (TorchScript). Opaque to callers, who only pass it on to another graph of the same backend.
DeviceTensor = Any


class Backend(Protocol):
    name: str
    device: str

    def run(self, inputs: Sequence[np.ndarray | DeviceTensor],
            keep_on_device: tuple[int, ...] = ()) -> list[np.ndarray | DeviceTensor]:
        """The graph's inputs in card order → its outputs in card order.

        Inputs are numpy arrays (the image uint8 (N,H,W,3) first, then the graph's other inputs, e.g. a
        float32 (1,) threshold or int64 window indices) or device tensors returned by an earlier run of
        this backend. Outputs are numpy arrays, except those whose index is in ``keep_on_device``: these
        may stay on the device as a :data:`DeviceTensor` (a backend without device residency returns
        numpy for them too, which is as valid an input).
        """


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
                 threads: int = 0, checksum: str | None = None, precision: str = "fp32",
                 io_binding: bool | None = None, spin_wait: bool = False) -> None:
        """Open ``path`` and check its inputs and outputs against the card's names.

        ``io_binding``: bind inputs and outputs explicitly (None = only when the first provider is a GPU
        one, where it lets outputs stay on the device between graphs; on CPU it saves nothing).
        ``spin_wait``: let the CPU thread pool busy-wait for work between and after operators.
        """
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("the onnx backend needs onnxruntime (pip install onnxruntime)") from exc
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Off by default: spinning pool threads hold the cores after a run, while the caller still
        # resizes and publishes on them (and, on a car, other processes want them).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
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
        self.io_binding: bool = self.device != "cpu" if io_binding is None else bool(io_binding)
        # Where bound outputs are allocated: the session's GPU (CUDA and TensorRT run on device 0), else host.
        self._output_device = ("cuda", 0) if self.device == "cuda" else ("cpu", 0)
        self._ortvalue_type = ort.OrtValue

    def run(self, inputs: Sequence[np.ndarray | DeviceTensor],
            keep_on_device: tuple[int, ...] = ()) -> list[np.ndarray | DeviceTensor]:
        """Inputs in card order (numpy or OrtValue) → outputs in card order; see :class:`Backend`."""
        if not self.io_binding:
            # A device tensor from a graph that binds its outputs: to host, as older runtimes' run() wants.
            feeds = {name: value.numpy() if isinstance(value, self._ortvalue_type) else value
                     for name, value in zip(self.input_names, inputs)}
            return self.session.run(self.output_names, feeds)
        # A new binding per run: outputs left bound across runs are written in place by the next run,
        # overwriting results (the last frame's labels) that a caller may still hold.
        binding = self.session.io_binding()
        for name, value in zip(self.input_names, inputs):
            if isinstance(value, self._ortvalue_type):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, *self._output_device)
        self.session.run_with_iobinding(binding)
        return [value if i in keep_on_device else value.numpy() for i, value in enumerate(binding.get_outputs())]


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

    def run(self, inputs: Sequence[np.ndarray | DeviceTensor],
            keep_on_device: tuple[int, ...] = ()) -> list[np.ndarray | DeviceTensor]:
        """Inputs in card order (numpy or torch tensors) → outputs in card order; see :class:`Backend`."""
        torch = self.torch
        with torch.inference_mode():
            out = self.module(*(self._tensor(a) for a in inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o if i in keep_on_device else o.cpu().numpy() for i, o in enumerate(outs)]

    def _tensor(self, value: np.ndarray | DeviceTensor) -> DeviceTensor:
        if isinstance(value, self.torch.Tensor):
            return value.to(self.device)
        # torch cannot wrap a read-only array (a frame viewed in its message): copy those.
        return self.torch.from_numpy(value if value.flags.writeable else value.copy()).to(self.device)
