"""The torch.export backend: a package's ``.pt2`` programs, run eagerly or compiled on the target.

A ``.pt2`` file (``torch.export.save``) holds one graph of the package as an ATen program with its
weights. Loading it, :func:`load_program` moves weights, constants and every device recorded in the
graph (``device=`` arguments, metadata checks) to the device chosen at run time, and refuses a program
that still names another device. :class:`TorchExportBackend` then runs it

- ``compile="none"``: eagerly, the program's operators one by one (no compile; the CPU's default);
- ``compile="inductor"``: through ``torch.compile`` (TorchInductor's generated kernels; the GPU's default),
  ``mode="max-autotune-no-cudagraphs"`` on a GPU, or ``"reduce-overhead"`` with ``cuda_graph`` (CUDA graphs
  recorded per input shape and replayed); on the CPU TorchInductor's default mode, whose C++ kernels build
  in a fraction of max-autotune's time (its GEMM template search is where that time goes);
- ``compile="aoti"``: AOTInductor: the program compiled ahead of time into a shared library, on the
  target at its first load, and kept; later starts load it in a fraction of a second.

The compiled forms are kept under ``$DGSS_TORCH_CACHE`` (default ``~/.cache/dgss_perception/inductor``), one
directory per graph checksum, device (GPU name and compute capability, or CPU architecture and vector ISA),
torch version and arithmetic precision (:func:`torch_cache_dir`): TorchInductor's on-disk cache (its FX
graph and kernel caches) for ``inductor``, and the AOTInductor package ``aoti.pt2`` for ``aoti``. No
compiled form is ever handed to another graph, device, torch or precision.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .backends import BackendError, DeviceTensor, TorchBackend

COMPILE_MODES = ("auto", "none", "inductor", "aoti")
CACHE_ENV = "DGSS_TORCH_CACHE"
AOTI_PACKAGE = "aoti.pt2"
# torch.compile's mode per device: the GPU's autotuned kernels, or its CUDA graphs; the CPU's default kernels.
INDUCTOR_MODES = {"cuda": "max-autotune-no-cudagraphs", "cuda_graph": "reduce-overhead", "cpu": "default"}


def torch_cache_root() -> Path:
    """Where compiled programs are kept: ``$DGSS_TORCH_CACHE``, else ``~/.cache/dgss_perception/inductor``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "dgss_perception" / "inductor"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def device_identity(torch: Any, device: str) -> str:
    """What a compiled program is only valid for, as a path-safe slug.

    A GPU: its name and compute capability (``nvidia-h200-sm90``); the CPU: its architecture and the vector
    instructions torch uses there (``cpu-x86-64-avx2``), which TorchInductor's C++ kernels are built for.
    """
    if device == "cpu":
        return _slug(f"cpu-{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}")
    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return _slug(f"{torch.cuda.get_device_name(index)}-sm{major}{minor}")


def torch_cache_dir(base: Path, checksum: str | None, device: str, torch_version: str, precision: str) -> Path:
    """The directory of one graph's compiled forms: keyed by its checksum, the device, torch and the precision."""
    digest = (checksum or "unversioned").split(":")[-1][:16]
    return base / f"{digest}-{device}-torch{_slug(torch_version)}-{precision}"


@contextlib.contextmanager
def inductor_cache(directory: Path) -> Iterator[None]:
    """Inside the block, TorchInductor reads and writes its on-disk caches under ``directory``.

    TorchInductor takes its cache directory from ``TORCHINDUCTOR_CACHE_DIR`` whenever it looks one up;
    its memoised paths are dropped on the way in and out so that neither side sees the other's.
    """
    try:
        from torch._inductor.utils import clear_caches
    except ImportError:  # a torch without it memoises nothing we could clear
        def clear_caches() -> None:
            return None
    directory.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    clear_caches()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
        clear_caches()


def device_literals(program: Any) -> set[str]:
    """Every device an exported program's graph names in its operators' arguments (e.g. ``{"cpu"}``).

    These are the places a program can stay bound to the device it was exported on: ``device=`` keyword
    arguments (factory functions, ``_to_copy``, tensor metadata checks) and device values among the
    positional arguments (``aten.to.device``).
    """
    import torch
    import torch.utils._pytree as pytree

    found: set[str] = set()
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            values = pytree.tree_leaves((node.args, node.kwargs))
            found.update(str(v) for v in values if isinstance(v, torch.device))
            device = node.kwargs.get("device")
            if isinstance(device, str):
                found.add(str(torch.device(device)))
    return found


def strip_metadata_asserts(program: Any) -> int:
    """Remove the program's checks of a tensor's export-time dtype and device; returns how many there were.

    ``torch.export`` puts ``aten._assert_tensor_metadata`` before every ``.to()`` / ``.float()`` of the
    model, asserting the dtype and device it saw there. The casts themselves stay in the graph; under
    autocast their inputs are bf16/fp16 by design (a model's ``.float()`` before a softmax then casts, as
    it should), which the checks would refuse. They compute nothing, so the program is the same without.
    """
    import torch

    target = torch.ops.aten._assert_tensor_metadata.default
    removed = 0
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in [n for n in module.graph.nodes if n.op == "call_function" and n.target is target]:
            if not node.users:
                module.graph.erase_node(node)
                removed += 1
        module.recompile()
    return removed


def drop_dead_code(program: Any) -> int:
    """Remove the program's operators whose results nothing uses; returns how many there were.

    ``torch.export`` keeps calls whose value it recorded but nothing reads, such as
    ``aten.promote_types`` where a model picks its compute dtype (``torch.promote_types(x.dtype,
    torch.float32)``). They cost nothing eagerly, but ``torch.compile`` cannot put an operator that
    returns a dtype into a graph: each one split the compiled program (DepthForge's window graph into 7
    graphs, MFuser's into 12), with Python between the pieces and a CUDA graph per piece. Operators with
    side effects (assertions, in-place updates) are kept: FX counts them impure.
    """
    import torch

    def size() -> int:
        return sum(len(m.graph.nodes) for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule))

    before = size()
    if program.graph_module.graph.eliminate_dead_code():  # the subgraphs it calls too (recompiled there)
        program.graph_module.recompile()
    return before - size()


def read_program(path: Path) -> Any:
    """``path``'s exported program as the runtime runs it, on the export's device.

    Its export-time dtype and device checks (:func:`strip_metadata_asserts`) and its unused operators
    (:func:`drop_dead_code`) are removed. Raises BackendError where the file is no exported program.
    """
    import torch

    from .ops import register

    register()  # the dgss:: operators a program may name (MFuser's selective scan) must exist to load it
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # a zip that is no program raises torch's own errors, which share no base
        raise BackendError(f"{path} is not a torch.export program ({type(exc).__name__}: {exc})") from exc
    strip_metadata_asserts(program)
    drop_dead_code(program)
    return program


def place_program(program: Any, device: str, name: str = "the program") -> Any:
    """``program`` with its weights, constants and device arguments moved to ``device``.

    Raises BackendError where the moved program still names another device (a tensor the graph would make
    there, then mix with tensors on ``device``); ``name`` says which program in that message.
    """
    import torch
    from torch.export.passes import move_to_device_pass

    program = move_to_device_pass(program, device)
    target = torch.device(device)
    stray = {d for d in device_literals(program) if torch.device(d) != target}
    if stray:
        raise BackendError(f"{name}: the program still names device(s) {sorted(stray)} after moving it to "
                           f"{device}; re-export it from graphs that make their tensors on their input's device")
    return program


def load_program(path: Path, device: str) -> Any:
    """``path``'s exported program (:func:`read_program`) on ``device`` (:func:`place_program`)."""
    return place_program(read_program(path), device, str(path))


def dynamic_dims(program: Any) -> list[dict[int, tuple[Any, int, int | None]]]:
    """Per user input of ``program`` (card order), its free dimensions: index → (symbol, min, max or None)."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    dims = []
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val")
        free: dict[int, tuple[Any, int, int | None]] = {}
        for i, size in enumerate(getattr(value, "shape", ())):
            if isinstance(size, int):
                continue
            symbol = size.node.expr
            bounds = program.range_constraints.get(symbol)
            low = int(bounds.lower) if bounds is not None else 0
            high = int(bounds.upper) if bounds is not None and getattr(bounds.upper, "is_finite", False) else None
            free[i] = (symbol, low, high)
        dims.append(free)
    return dims


def autocast_program(program: Any, device_type: str, dtype: Any) -> Any:
    """``program`` exported again with its module run under autocast to ``dtype`` (e.g. ``torch.bfloat16``).

    AOTInductor compiles the arithmetic it sees, and autocast is no part of a saved program: this one
    computes as the program does under ``torch.autocast(device_type, dtype)``, its free dimensions free
    within the same bounds. Its example inputs (the saved ones, on the program's device) trace it.
    """
    import torch

    class Autocast(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: Any) -> Any:
            with torch.autocast(device_type=device_type, dtype=dtype):
                return self.inner(*inputs)

    if program.example_inputs is None or program.example_inputs[1]:
        raise ValueError("autocast_program needs a program saved with positional example inputs")
    args = program.example_inputs[0]
    dims: dict[Any, Any] = {}  # one Dim per symbol: dimensions the program ties together stay tied
    spec = []
    for free in dynamic_dims(program):
        entry = {}
        for i, (symbol, low, high) in free.items():
            if symbol not in dims:
                extra = {} if high is None else {"max": high}
                dims[symbol] = torch.export.Dim(f"dim{len(dims)}", min=low, **extra)
            entry[i] = dims[symbol]
        spec.append(entry or None)
    return torch.export.export(Autocast(program.module()), tuple(args), dynamic_shapes=(tuple(spec),))


def _cudagraph_skips() -> int:
    """How many compiled graphs TorchInductor has run without the CUDA graphs asked for, in this process."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


class TorchExportBackend(TorchBackend):
    """A torch.export program (``.pt2``) on CUDA or CPU, eager or compiled, in fp32 or under bf16/fp16 autocast.

    Precision, devices, outputs and :meth:`run` are :class:`~dgss_perception.backends.TorchScriptBackend`'s.
    """

    name = "pt2"

    def __init__(self, path: Path, device: str = "auto", cuda_graph: bool = False, precision: str = "auto",
                 gpu_precision: str = "bf16", graph_precision: str = "fp32", compile: str = "auto",
                 checksum: str | None = None) -> None:
        """Load ``path`` onto ``device`` and compile it there as ``compile`` asks (see the module's text).

        ``compile``: ``auto`` (``inductor`` on a GPU, ``none`` on the CPU), ``none``, ``inductor`` or
        ``aoti``. A compiled program is compiled here, on the example input saved with it, so the first
        frame finds it ready (shapes it has not seen compile again when they come, dynamic dimensions
        once for all sizes). ``cuda_graph``: with ``inductor`` on a GPU, CUDA graphs (``reduce-overhead``);
        elsewhere ``cuda_graph_note`` says why not. ``checksum``: the card's checksum of ``path``, the
        first field of the compile cache's key. ``compile_seconds`` says how long loading and compiling took.
        """
        super().__init__(device, cuda_graph, precision, gpu_precision, graph_precision)
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile!r} (choose from {', '.join(COMPILE_MODES)})")
        torch = self.torch
        self.compile: str = ("inductor" if self._kind == "cuda" else "none") if compile == "auto" else compile
        if cuda_graph and self._kind != "cuda":
            self.cuda_graph_note = "the program runs on the CPU"
        elif cuda_graph and self.compile != "inductor":
            self.cuda_graph_note = f"CUDA graphs need compile='inductor' (the program runs with {self.compile!r})"
        self.cuda_graph = bool(cuda_graph) and not self.cuda_graph_note
        start = time.perf_counter()
        program = load_program(path, self.device)
        self._dynamic = dynamic_dims(program)
        self.cache_dir: Path | None = None
        if self.compile != "none":
            self.cache_dir = torch_cache_dir(torch_cache_root(), checksum, device_identity(torch, self.device),
                                             torch.__version__, self.precision)
        self.mode = ""  # torch.compile's mode
        self.aoti_cached = False  # compile="aoti" found its package in the cache
        self._seen: set[tuple] = set()  # input shapes run through torch.compile so far
        if self.compile == "none":
            self._module = program.module()
        elif self.compile == "inductor":
            self.mode = INDUCTOR_MODES["cuda_graph" if self.cuda_graph else self._kind]
            self._module = torch.compile(program.module(), mode=self.mode)
        else:
            self._module = self._aoti(program, path)
        if self.compile == "inductor" and program.example_inputs is not None:
            args, kwargs = program.example_inputs
            if not kwargs:
                # As numpy, so that they become tensors as frames do (inference tensors, which dynamo tells
                # apart from the saved ones): the first frame then finds this compile, not a second one.
                self.run([a.cpu().numpy() for a in args])
        self.compile_seconds = time.perf_counter() - start

    @property
    def runtime(self) -> str:  # type: ignore[override]
        """The runtime as :meth:`describe` names it, e.g. ``torch.export + inductor max-autotune-no-cudagraphs``."""
        if self.compile == "inductor":
            return f"torch.export + inductor {self.mode}"
        if self.compile == "aoti":
            return "torch.export + AOTInductor"
        return "torch.export, eager"

    def _aoti(self, program: Any, path: Path) -> Any:
        """The AOTInductor-compiled program: from the cache, or compiled here and put there."""
        from torch._inductor import aoti_compile_and_package, aoti_load_package

        assert self.cache_dir is not None
        package = self.cache_dir / AOTI_PACKAGE
        if package.is_file():
            self.aoti_cached = True
        else:
            if self._autocast_dtype is not None:
                program = autocast_program(program, self._kind, self._autocast_dtype)
            with inductor_cache(self.cache_dir):
                # Written beside its final name and renamed: a start killed mid-compile leaves no half package.
                partial = self.cache_dir / f"aoti.{os.getpid()}.partial.pt2"
                try:
                    aoti_compile_and_package(program, package_path=str(partial))
                    os.replace(partial, package)
                except Exception as exc:
                    partial.unlink(missing_ok=True)
                    raise BackendError(f"AOTInductor could not compile {path} for {self.device}: "
                                       f"{type(exc).__name__}: {exc}") from exc
        return aoti_load_package(str(package), device_index=-1 if self._index is None else self._index)

    def _forward(self, tensors: list[DeviceTensor]) -> Any:
        if self.compile != "inductor":
            return self._module(*tensors)
        torch = self.torch
        # Compiled code is guarded on strides, also on a batch dimension of 1 (a frame viewed as a batch of one
        # by numpy has stride 0 there): the same tensor laid out the standard way finds the same compile.
        tensors = [t.contiguous().reshape(-1).view(t.shape) for t in tensors]
        for tensor, free in zip(tensors, self._dynamic):
            for i in free:
                # The card's free dimensions (window count, frame size) compile once for every size.
                torch._dynamo.maybe_mark_dynamic(tensor, i)
        if self.cuda_graph:
            # A new step: the previous run's graph outputs may be overwritten (run() copies what it keeps).
            torch.compiler.cudagraph_mark_step_begin()
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        if key in self._seen:
            return self._module(*tensors)
        skips = _cudagraph_skips()
        with inductor_cache(self.cache_dir):  # a shape not run before may compile
            out = self._module(*tensors)
        self._seen.add(key)
        if self.cuda_graph and _cudagraph_skips() > skips:
            # TorchInductor only logs that it ran a compiled graph without CUDA graphs; the node reports this note.
            self.cuda_graph_note = (f"TorchInductor runs inputs of shapes {[list(t.shape) for t in tensors]} without "
                                    "CUDA graphs (TORCH_LOGS=cudagraphs says why)")
        return out

    def _kept(self, tensor: DeviceTensor) -> DeviceTensor:
        # CUDA graphs replay into the same output buffers: what the caller keeps must survive the next run.
        return tensor.clone() if self.cuda_graph else tensor
