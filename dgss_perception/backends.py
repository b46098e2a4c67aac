"""Inference backends: run one exported graph.

A backend takes the graph's inputs in card order (the first is always the
uint8 NHWC image batch) and returns its outputs in card order as numpy
arrays, or, for the outputs a caller asks to keep, as device tensors that
another graph of the same backend takes as inputs. ONNX Runtime needs no
torch; the PyTorch backends (TorchScript, torch.export) import torch only when chosen.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# ONNX Runtime keeps one captured CUDA graph per run-option id ("gpu_graph_id") from 1.18 on; before, one per
# session, which a second input shape would replay wrongly. -1 runs without capture or replay.
CUDA_GRAPH_MIN_ORT = (1, 18)
GRAPH_ID = "gpu_graph_id"
NO_GRAPH = "-1"
# Input shapes per graph given fixed buffers (and a captured CUDA graph each); further shapes run unbound.
MAX_FIXED_SHAPES = 8

# An output left where the graph produced it: an ``onnxruntime.OrtValue`` (ONNX Runtime with IO binding) or a
# ``torch.Tensor`` (TorchScript, torch.export). Callers pass it on to another graph of the same backend; the
# engine also reads the torch tensors of a backend that ``holds_device_results`` (slide windows merged on that GPU).
DeviceTensor = Any


class Backend(Protocol):
    name: str
    device: str
    cuda_graph: bool  # runs replay captured CUDA graphs
    cuda_graph_note: str  # why not, when they were asked for
    holds_device_results: bool  # outputs kept on the device are torch tensors on a GPU

    def describe(self) -> str:
        """Device, GPU name and how the graph runs there, as one line for logs and reports."""

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


# The device forms every entry point takes: auto (a GPU where the backend finds one, else the CPU), cpu,
# cuda (= cuda:0) and cuda:N (the N-th GPU as CUDA numbers them, i.e. after CUDA_VISIBLE_DEVICES).
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def parse_device(device: str) -> tuple[str, int | None]:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → (kind, GPU index); cuda is index 0, auto and cpu have None.

    Raises ValueError naming the accepted forms for anything else (``gpu``, ``cuda:``, ``cpu:1``, ``cuda:-1``).
    """
    match = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"unknown device {device!r} (choose {DEVICE_FORMS}, N the GPU index)")
    kind = match.group(1)
    return kind, (int(match.group(2) or 0) if kind == "cuda" else None)


def gpu_name(device_id: int = 0) -> str:
    """The marketing name of a CUDA GPU (``nvidia-smi``), e.g. ``NVIDIA H200``, or ``unknown GPU``."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", str(device_id)],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"
    return out.strip().splitlines()[0].strip() if out.strip() else "unknown GPU"


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


def onnx_providers(device: str, cache_dir: Path | None, precision: str = "fp32", cuda_graph: bool = False) -> list:
    """Execution providers in preference order for a device (auto | cpu | cuda | cuda:N).

    The GPU providers are given the device's index (``device_id``; 0 for auto and cuda).
    ``cuda_graph``: the CUDA provider capturing CUDA graphs, and not the TensorRT provider, which
    keeps one graph per session whatever the input shapes.
    """
    import onnxruntime as ort

    kind, index = parse_device(device)
    available = set(ort.get_available_providers())
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    device_id = str(index or 0)
    chosen: list = []
    if "TensorrtExecutionProvider" in available and not cuda_graph:
        options = {"device_id": device_id, "trt_fp16_enable": precision == "fp16"}
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                           trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
        chosen.append(("TensorrtExecutionProvider", options))
    if "CUDAExecutionProvider" in available:
        cuda_options = {"device_id": device_id, **({"enable_cuda_graph": "1"} if cuda_graph else {})}
        chosen.append(("CUDAExecutionProvider", cuda_options))
    if kind == "cuda" and not chosen:
        raise BackendError(f"device {device!r} requested but ONNX Runtime has no CUDA or TensorRT provider "
                           f"(available: {sorted(available)}); install onnxruntime-gpu")
    chosen.append("CPUExecutionProvider")
    return chosen


def cuda_graph_refusal(device: str, available: Sequence[str], version: str) -> str:
    """Why CUDA graphs cannot be asked of ONNX Runtime here ("" when they can)."""
    if parse_device(device)[0] == "cpu":
        return "the session runs on the CPU"
    if "CUDAExecutionProvider" not in available:
        return "ONNX Runtime has no CUDA provider here"
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release < CUDA_GRAPH_MIN_ORT:
        return (f"ONNX Runtime {version} keeps one CUDA graph per session; "
                f"{'.'.join(map(str, CUDA_GRAPH_MIN_ORT))} or later is needed")
    return ""


@dataclass
class FixedBinding:
    """Inputs and outputs of one input shape bound to buffers that keep their address from run to run.

    A captured CUDA graph replays its kernels on the addresses it saw, so every run of that shape
    copies its inputs into the same buffers and finds its outputs in the same buffers.
    """

    binding: Any
    inputs: list[Any]  # OrtValue per graph input
    outputs: list[Any]  # OrtValue per graph output
    run_options: Any  # carries this shape's CUDA graph id


_PRELOADED: list[bool] = []  # preload_cuda_libraries ran in this process


def preload_cuda_libraries(ort: Any, available: Sequence[str]) -> bool:
    """Load the CUDA and cuDNN libraries of the pip wheels (the ``gpu`` extra) before a GPU session opens.

    ``onnxruntime-gpu`` finds them only on the library path, where pip's ``nvidia-*`` wheels are not; torch
    loads its own copies when imported, but the ONNX path runs without torch. ``onnxruntime.preload_dlls``
    (1.21+) loads them from the wheels; libraries already loaded, or a system CUDA, are left as they are.
    Returns whether it was called (once per process, and only where a GPU provider is built in).
    """
    if _PRELOADED or not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(available):
        return False
    _PRELOADED.append(True)
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # the nvidia wheels' folders in site-packages, then the library path
        except Exception as exc:  # a missing wheel is not fatal: the system's libraries may serve
            import logging

            logging.getLogger(__name__).warning("onnxruntime.preload_dlls failed (%s); relying on the "
                                                "library path for CUDA and cuDNN", exc)
    return True


class OnnxRuntimeBackend:
    """ONNX Runtime with TensorRT → CUDA → CPU providers, as available."""

    name = "onnxruntime"
    # Outputs it keeps on the device are OrtValues, which only ONNX Runtime reads: merging slide windows there
    # would need torch (or a merge graph of its own), so the engine merges this backend's windows on the host.
    holds_device_results = False

    def __init__(self, path: Path, input_names: list[str], output_names: list[str], device: str = "auto",
                 threads: int = 0, checksum: str | None = None, precision: str = "fp32",
                 io_binding: bool | None = None, spin_wait: bool = False, cuda_graph: bool = False,
                 fixed_io: bool | None = None) -> None:
        """Open ``path`` and check its inputs and outputs against the card's names.

        ``io_binding``: bind inputs and outputs explicitly (None = only when the first provider is a GPU
        one, where it lets outputs stay on the device between graphs; on CPU it saves nothing).
        ``spin_wait``: let the CPU thread pool busy-wait for work between and after operators.
        ``cuda_graph``: let the CUDA provider (instead of TensorRT's) capture each input shape's run as a
        CUDA graph and replay it (one launch instead of one per kernel). Where ONNX Runtime cannot (see
        :func:`cuda_graph_refusal`, or a graph with nodes off the CUDA provider) the session runs
        without; ``cuda_graph_note`` then says why.
        ``fixed_io``: bind each input shape's inputs and outputs to buffers kept from run to run, as CUDA
        graphs need (None = exactly when they are on).
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
        kind, index = parse_device(device)
        gpu = index or 0  # the GPU the CUDA and TensorRT providers are given (auto: the first)
        available = ort.get_available_providers()
        if kind != "cpu":
            preload_cuda_libraries(ort, available)
        self.cuda_graph_note = cuda_graph_refusal(device, available, ort.__version__) if cuda_graph else ""
        graphs = cuda_graph and not self.cuda_graph_note

        def trt_cache() -> Path | None:
            if kind == "cpu" or "TensorrtExecutionProvider" not in available:
                return None
            base = Path(os.environ.get("DGSS_TRT_CACHE", Path.home() / ".cache" / "dgss_perception" / "trt"))
            return trt_cache_dir(base, checksum, gpu_identity(gpu), precision)

        providers = onnx_providers(device, None if graphs else trt_cache(), precision, graphs)
        try:
            # No fallback of ONNX Runtime's own: where its CUDA provider refuses, it would retry on the CPU alone.
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers,
                                                enable_fallback=0 if graphs else 1)
        except Exception as exc:  # onnxruntime's own error types (Fail, InvalidGraph, …) share no base but this
            if not graphs:
                raise
            # Capture needs every node on the CUDA provider (no control flow, no shape work on the CPU); a
            # graph that has such nodes cannot be opened with graphs at all, so it is opened without.
            self.cuda_graph_note = f"ONNX Runtime cannot capture this graph ({exc})"
            graphs = False
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=onnx_providers(device, trt_cache(), precision))
        self.device = f"cuda:{gpu}" if self.session.get_providers()[0] != "CPUExecutionProvider" else "cpu"
        self.providers = self.session.get_providers()
        if kind == "cuda" and self.device == "cpu":
            # A GPU provider that is listed but cannot start (missing CUDA or cuDNN libraries, or no GPU of that
            # index) leaves ONNX Runtime on the CPU with only a warning: asked for the GPU, that is an error, not
            # a 100× slower node.
            raise BackendError(f"device {device!r} requested but ONNX Runtime could not start a GPU provider for "
                               f"{path} (it runs on {self.providers}; its log says why)")
        self.cuda_graph: bool = graphs and self.providers[0] == "CUDAExecutionProvider"
        if graphs and not self.cuda_graph:
            self.cuda_graph_note = f"the session runs on {self.providers[0]}"
        graph_inputs = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if graph_inputs != list(input_names) or graph_outputs != list(output_names):
            raise BackendError(f"{path}: graph has inputs {graph_inputs} and outputs {graph_outputs}, "
                               f"card says {list(input_names)} and {list(output_names)}")
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.fixed_io: bool = self.cuda_graph if fixed_io is None else bool(fixed_io)
        self.io_binding: bool = (self.device != "cpu" if io_binding is None else bool(io_binding)) or self.fixed_io
        # Where bound outputs are allocated: the GPU the session's providers were given, else host.
        self._output_device = ("cuda", gpu) if self.device != "cpu" else ("cpu", 0)
        self._ort = ort
        self._fixed: dict[tuple, FixedBinding] = {}
        self._refused: set[tuple] = set()  # input shapes whose capture failed: they run without a graph
        # Runs outside the fixed buffers must neither capture nor replay a CUDA graph.
        self._unfixed_options = ort.RunOptions()
        if self.fixed_io:
            self._unfixed_options.add_run_config_entry(GRAPH_ID, NO_GRAPH)

    def describe(self) -> str:
        """Where this session runs, e.g. ``cuda:1 (NVIDIA H200, ONNX Runtime providers: CUDAExecutionProvider, …)``."""
        gpu = f"{gpu_name(self._output_device[1])}, " if self.device != "cpu" else ""
        return f"{self.device} ({gpu}ONNX Runtime providers: {', '.join(self.providers)})"

    @property
    def fixed_shapes(self) -> int:
        """Input shapes given fixed buffers so far (each a CUDA graph of its own when graphs are on)."""
        return len(self._fixed)

    def run(self, inputs: Sequence[np.ndarray | DeviceTensor],
            keep_on_device: tuple[int, ...] = ()) -> list[np.ndarray | DeviceTensor]:
        """Inputs in card order (numpy or OrtValue) → outputs in card order; see :class:`Backend`.

        With ``fixed_io``, an output kept on the device is the fixed buffer of its input shape: valid
        until this backend's next run of that shape.
        """
        if not self.io_binding:
            # A device tensor from a graph that binds its outputs: to host, as older runtimes' run() wants.
            feeds = {name: value.numpy() if isinstance(value, self._ort.OrtValue) else value
                     for name, value in zip(self.input_names, inputs)}
            return self.session.run(self.output_names, feeds)
        learn = None  # an input shape to give fixed buffers after this run
        if self.fixed_io and all(isinstance(value, np.ndarray) for value in inputs):
            key = tuple((value.shape, value.dtype.str) for value in inputs)
            fixed = self._fixed.get(key)
            if fixed is not None:
                try:
                    return self._run_fixed(fixed, inputs, keep_on_device)
                except Exception as exc:  # onnxruntime's own error types
                    if not self.cuda_graph:
                        raise
                    # A capture can also fail in the run (a kernel that synchronises or allocates while captured):
                    # that shape then runs without a graph, as shapes beyond the limit do, and the others keep theirs.
                    del self._fixed[key]
                    self._refused.add(key)
                    self.cuda_graph_note = (f"inputs of shapes {[list(v.shape) for v in inputs]} run without a CUDA "
                                            f"graph: its capture failed ({exc})")
            elif key not in self._refused and len(self._fixed) + len(self._refused) < MAX_FIXED_SHAPES:
                learn = key  # the first run of a shape learns its outputs' shapes, the buffers' sizes
        outputs = self._run_bound(inputs)
        if learn is not None:
            self._fixed[learn] = self._fix(inputs, outputs)
        return [value if i in keep_on_device else value.numpy() for i, value in enumerate(outputs)]

    def _run_bound(self, inputs: Sequence[np.ndarray | DeviceTensor]) -> list[DeviceTensor]:
        """One run with a new binding; every output as the OrtValue the run allocated."""
        # A new binding per run: outputs left bound across runs are written in place by the next run,
        # overwriting results (the last frame's labels) that a caller may still hold.
        binding = self.session.io_binding()
        for name, value in zip(self.input_names, inputs):
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, *self._output_device)
        self.session.run_with_iobinding(binding, self._unfixed_options)
        return binding.get_outputs()

    def _fix(self, inputs: Sequence[np.ndarray], outputs: Sequence[DeviceTensor]) -> FixedBinding:
        """Buffers for one input shape on the session's device, bound once, with a CUDA graph id of their own."""
        new = self._ort.OrtValue.ortvalue_from_shape_and_type
        device, index = self._output_device
        fixed = FixedBinding(binding=self.session.io_binding(),
                             inputs=[new(list(a.shape), a.dtype, device, index) for a in inputs],
                             outputs=[new(v.shape(), v.element_type(), device, index) for v in outputs],
                             run_options=self._ort.RunOptions())
        for name, value in zip(self.input_names, fixed.inputs):
            fixed.binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.output_names, fixed.outputs):
            fixed.binding.bind_ortvalue_output(name, value)
        # Never reused, also after a failed capture; 0 is ONNX Runtime's own.
        fixed.run_options.add_run_config_entry(GRAPH_ID, str(len(self._fixed) + len(self._refused) + 1))
        return fixed

    def _run_fixed(self, fixed: FixedBinding, inputs: Sequence[np.ndarray],
                   keep_on_device: tuple[int, ...]) -> list[np.ndarray | DeviceTensor]:
        for value, array in zip(fixed.inputs, inputs):
            value.update_inplace(np.ascontiguousarray(array))
        self.session.run_with_iobinding(fixed.binding, fixed.run_options)
        # A host buffer's numpy() is a view of it, which the next run would overwrite under the caller.
        on_host = self._output_device[0] == "cpu"
        return [value if i in keep_on_device else value.numpy().copy() if on_host else value.numpy()
                for i, value in enumerate(fixed.outputs)]


# Arithmetic precisions of the PyTorch path on a GPU: fp32 runs the graph as exported; bf16 and fp16 run it
# under autocast (matrix products and convolutions in half precision, reductions such as softmax in float32).
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")


class TorchBackend:
    """What the PyTorch backends share: device and precision choice, autocast, and the run contract.

    A subclass loads its graph in ``__init__`` after calling this one's, and implements :meth:`_forward`
    (the graph on tensors already on :attr:`device`) and :attr:`runtime` (its name in :meth:`describe`).
    """

    name = "torch"
    runtime = "PyTorch"

    def __init__(self, device: str = "auto", cuda_graph: bool = False, precision: str = "auto",
                 gpu_precision: str = "bf16", graph_precision: str = "fp32") -> None:
        """Resolve ``device`` (auto | cpu | cuda | cuda:N) and the arithmetic; see :class:`TorchScriptBackend`.

        Raises BackendError where torch or the asked GPU is missing, ValueError for an unknown precision.
        """
        self.cuda_graph = False
        self.cuda_graph_note = ""
        kind, index = parse_device(device)
        for name, value in (("precision", precision), ("gpu_precision", gpu_precision)):
            if value not in (*TORCH_PRECISIONS, "auto") or (name == "gpu_precision" and value == "auto"):
                raise ValueError(f"unknown {name} {value!r} (choose from {', '.join(TORCH_PRECISIONS)}"
                                 f"{' or auto' if name == 'precision' else ''})")
        try:
            import torch
        except ImportError as exc:
            raise BackendError(f"the {self.name} backend needs torch") from exc
        if kind == "auto":
            kind, index = ("cuda", 0) if torch.cuda.is_available() else ("cpu", None)
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise BackendError(f"device {device!r} requested but torch sees no CUDA device")
            count = torch.cuda.device_count()
            if index >= count:
                raise BackendError(f"device {device!r} requested but torch sees {count} CUDA device(s) "
                                   f"(cuda:0 to cuda:{count - 1})")
        self.torch = torch
        self.device = "cpu" if kind == "cpu" else f"cuda:{index}"
        self._kind, self._index = kind, index
        asked = (gpu_precision if kind == "cuda" else "fp32") if precision == "auto" else precision
        if graph_precision == "fp16" and asked == "bf16":
            # Its convolutions hold fp16 weights that bf16 autocast would feed bf16 inputs (a dtype error at run).
            raise ValueError("precision 'bf16' over an fp16 package: its graphs compute in fp16 already; use "
                             "auto or fp16 (or export the package in fp32 for bf16)")
        # Autocast over a graph already at the asked precision (an fp16 export) would only add casts.
        half = asked != "fp32" and asked != graph_precision
        self._autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[asked] if half else None
        # The arithmetic precision in effect: without autocast, the graph's own (an fp16 graph stays fp16).
        self.precision: str = asked if half else graph_precision

    @property
    def holds_device_results(self) -> bool:
        """Outputs kept on the device stay on a GPU (torch tensors there), not in host memory."""
        return self._kind == "cuda"

    def describe(self) -> str:
        """Where and how the graph runs, e.g. ``cuda:0 (NVIDIA H200, TorchScript, bf16 autocast)``."""
        gpu = f"{self.torch.cuda.get_device_name(self._index)}, " if self._kind == "cuda" else ""
        how = f"{self.precision} autocast" if self._autocast_dtype is not None else f"{self.precision} graph"
        return f"{self.device} ({gpu}{self.runtime}, {how})"

    def run(self, inputs: Sequence[np.ndarray | DeviceTensor],
            keep_on_device: tuple[int, ...] = ()) -> list[np.ndarray | DeviceTensor]:
        """Inputs in card order (numpy or torch tensors) → outputs in card order; see :class:`Backend`.

        Floating outputs come back as float32 (autocast leaves some in bf16/fp16), also those kept on the
        device: the card's interface, which the next graph and the host merge expect.
        """
        torch = self.torch
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self._kind == "cuda":
                # Tensors a graph creates on "the current GPU" land on this one, not on cuda:0.
                stack.enter_context(torch.cuda.device(self._index))
            if self._autocast_dtype is not None:
                stack.enter_context(torch.autocast(device_type=self._kind, dtype=self._autocast_dtype))
            out = self._forward([self._tensor(a) for a in inputs])
            outs = [o.float() if o.dtype in (torch.bfloat16, torch.float16) else o
                    for o in (out if isinstance(out, (tuple, list)) else (out,))]
        return [self._kept(o) if i in keep_on_device else o.cpu().numpy() for i, o in enumerate(outs)]

    def _forward(self, tensors: list[DeviceTensor]) -> Any:
        """The graph on its inputs (torch tensors on :attr:`device`, card order) → a tensor or a tuple of them."""
        raise NotImplementedError

    def _kept(self, tensor: DeviceTensor) -> DeviceTensor:
        """An output the caller keeps on the device (a backend whose output buffers are reused copies it)."""
        return tensor

    def _tensor(self, value: np.ndarray | DeviceTensor) -> DeviceTensor:
        if isinstance(value, self.torch.Tensor):
            return value.to(self.device)
        # torch cannot wrap a read-only array (a frame viewed in its message): copy those.
        return self.torch.from_numpy(value if value.flags.writeable else value.copy()).to(self.device)


class TorchScriptBackend(TorchBackend):
    """A TorchScript graph on CUDA or CPU, in fp32 or under bf16/fp16 autocast."""

    name = "torchscript"
    runtime = "TorchScript"

    def __init__(self, path: Path, device: str = "auto", cuda_graph: bool = False, precision: str = "auto",
                 gpu_precision: str = "bf16", graph_precision: str = "fp32") -> None:
        """Load ``path`` onto ``device`` (auto | cpu | cuda | cuda:N); ``cuda_graph`` is not this backend's.

        ``precision``: ``auto`` (``gpu_precision`` on a GPU, fp32 on the CPU), ``fp32``, ``bf16`` or ``fp16``
        (also on the CPU, where torch's autocast takes both; slower there, but it checks the graph).
        ``graph_precision``: the precision the graph was exported at (the card's ``precision``): a graph
        already in fp16 runs as it is when fp16 (or fp32, which it cannot become) is asked for.
        Outputs keep the card's interface whatever the precision: uint8 labels, float32 scores/confidence.
        """
        super().__init__(device, cuda_graph, precision, gpu_precision, graph_precision)
        if cuda_graph:
            self.cuda_graph_note = ("CUDA graphs are captured by ONNX Runtime's CUDA provider and the pt2 "
                                    "backend's torch.compile only")
        self.module = self.torch.jit.load(str(path), map_location=self.device).eval()

    def _forward(self, tensors: list[DeviceTensor]) -> Any:
        return self.module(*tensors)
