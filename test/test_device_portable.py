"""Every exported graph runs on whatever device the runtime loads it to.

``torch.jit.trace`` keeps what a forward builds from Python data (``torch.tensor(mean)``) as tensor
constants on the tracing device, and a factory's ``device=`` (``torch.zeros(..., device=x.device)``) as a
literal of it: a graph exported on the CPU then fails on a GPU with tensors on two devices. The graphs of
every family and mode are checked here on the CPU for both, the eager wrappers for tensors that do not follow
the module to another device; the GPU test runs each package's TorchScript graphs on CUDA against the CPU.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import (TINY_C2F_CONFIG, TINY_CONFIG, TINY_DEPTHFORGE_CONFIG, TINY_MFUSER_CONFIG, TINY_REIN_CONFIG,
                      make_tiny_depthforge_weights)
from training.build import build_model
from training.config import config_from_dict
from training.export import at_precision, export_package
from training.export_wrappers import (CoarseGraph, RefineGraph, SegmentationGraph, SlideGraph, WindowGraph,
                                      with_constants)
from training.inference import model_at_size, window_grid
from training.models.portable import arange_like, values_like

# Each package (a fixture) of the families and modes: whole, resize-in-graph, batch, fp16, coarse-to-fine,
# slide (a window graph) and slide-in-graph.
PACKAGES = ("tiny_model_dir", "resize_in_graph_dir", "batch_dir", "fp16_dir", "tiny_c2f_dir", "tiny_mfuser_dir",
            "tiny_depthforge_dir", "rein_dir", "slide_in_graph_dir")
# fp16 rounds at different points on the CPU and on CUDA; the export checks its labels against fp32 instead.
GPU_PACKAGES = tuple(p for p in PACKAGES if p != "fp16_dir")

# CUDA and CPU kernels round differently (summation order, fused ops): a label may change where the top two
# scores are within rounding of each other, and a mask logit that close to the masked-attention threshold may
# flip a key in or out. At most this share of a frame's pixels may differ in label, or in confidence by more
# than GPU_CONFIDENCE_ATOL; a graph mixing devices fails outright, one computing something else differs almost
# everywhere.
GPU_MAX_DIFFERING = 0.005
GPU_CONFIDENCE_ATOL = 1e-3


@pytest.fixture(scope="module")
def resize_in_graph_dir(in_graph_package: tuple[Path, Path, dict]) -> Path:
    """The tiny VFMNet whose whole graph resizes frames of any size itself."""
    return in_graph_package[1]


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny VFMNet of ``tiny_model_dir`` as a whole graph of two frames (TorchScript only)."""
    out = tmp_path_factory.mktemp("portable_batch") / "package"
    export_package(config_from_dict(TINY_CONFIG), tiny_model_dir.parent / "weights.safetensors", out, batch=2,
                   formats=("torchscript",), parity_seed=0)
    return out


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny VFMNet of ``tiny_model_dir`` in fp16 (TorchScript only)."""
    out = tmp_path_factory.mktemp("portable_fp16") / "package"
    export_package(config_from_dict(TINY_CONFIG), tiny_model_dir.parent / "weights.safetensors", out,
                   precision="fp16", formats=("torchscript",), parity_seed=0)
    return out


@pytest.fixture(scope="module")
def rein_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Rein slide package (TorchScript only)."""
    work = tmp_path_factory.mktemp("portable_rein")
    cfg = make_tiny_depthforge_weights(work / "weights.safetensors", seed=2, config=TINY_REIN_CONFIG)
    export_package(cfg, work / "weights.safetensors", work / "package", formats=("torchscript",), parity_seed=0)
    return work / "package"


@pytest.fixture(scope="module")
def slide_in_graph_dir(tmp_path_factory: pytest.TempPathFactory, tiny_depthforge_dir: Path) -> Path:
    """The tiny DepthForge of ``tiny_depthforge_dir`` as one slide graph, 4 windows per run (TorchScript only)."""
    out = tmp_path_factory.mktemp("portable_slide_in_graph") / "package"
    export_package(config_from_dict(copy.deepcopy(TINY_DEPTHFORGE_CONFIG)),
                   tiny_depthforge_dir.parent / "weights.safetensors", out, mode="slide", slide_in_graph=True,
                   window_batch=4, formats=("torchscript",), parity_seed=0)
    return out


def torchscript_graphs(package: Path) -> dict[str, Path]:
    """The package's TorchScript files by graph name, as its card lists them."""
    card = json.loads((package / "card.json").read_text())
    return {name: package / spec["torchscript"] for name, spec in card["graphs"].items() if spec.get("torchscript")}


# Elementwise operators, which take a zero-dimensional operand on any device beside tensors on another.
SCALAR_USERS = {f"aten::{op}" for op in ("add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide",
                                         "remainder", "pow", "eq", "ne", "lt", "le", "gt", "ge", "where",
                                         "maximum", "minimum")}


def device_bound_parts(module: torch.jit.ScriptModule) -> list[str]:
    """What ties a traced graph to one device: device literals and tensor constants of more than one value.

    Zero-dimensional constants are the Python numbers of the traced arithmetic (``x * 255.0``, sizes times
    a number): operands of elementwise operators, which take them beside tensors on any device; one used
    by another operator counts as tied.
    """
    found = []
    graph = module.inlined_graph  # held: its nodes die with it
    for node in graph.findAllNodes("prim::Constant"):
        out = node.output()
        if out.type().kind() == "DeviceObjType":
            found.append(f"device literal {out.toIValue()!r}")
        elif node.hasAttribute("value") and node.kindOf("value") == "t":
            value = node.t("value")
            users = sorted({u.user.kind() for u in out.uses()})
            if value.dim() > 0 or not set(users) <= SCALAR_USERS:
                found.append(f"tensor constant {tuple(value.shape)} {value.dtype} on {value.device}, "
                             f"used by {users}")
    for name, sub in module.named_modules():
        try:
            code, constants = sub.code_with_constants
        except (AttributeError, RuntimeError):  # a container whose forward the graph never calls
            continue
        where = name or "<graph>"
        found += [f"{where}: {line.strip()}" for line in code.splitlines() if "torch.device(" in line]
        found += [f"{where}: CONSTANTS.{key} of shape {tuple(value.shape)}"
                  for key, value in constants.const_mapping.items()
                  if isinstance(value, torch.Tensor) and value.dim() > 0]
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_traced_graphs_hold_no_device(package: str, request: pytest.FixtureRequest) -> None:
    graphs = torchscript_graphs(request.getfixturevalue(package))
    assert graphs, f"{package} has no TorchScript graph"
    for name, path in graphs.items():
        module = torch.jit.load(str(path))
        assert not device_bound_parts(module), f"{package}/{name}: " + "\n".join(device_bound_parts(module))


def stray_tensors(root: nn.Module, device: str) -> list[str]:
    """Tensors reachable from ``root``'s modules (attributes, lists, dicts) that are not on ``device``."""
    found = []
    for name, module in root.named_modules():
        stack = [(f"{name}.{k}" if name else k, v) for k, v in vars(module).items() if k != "_modules"]
        while stack:
            where, value = stack.pop()
            if isinstance(value, torch.Tensor):
                if value.device.type != device:
                    found.append(f"{where} on {value.device}")
            elif isinstance(value, dict):
                stack += [(f"{where}[{k!r}]", v) for k, v in value.items()]
            elif isinstance(value, (list, tuple, set)):
                stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    return found


def export_model(config: dict, size: tuple[int, int], precision: str = "fp32") -> nn.Module:
    """The exported form of ``config``'s model at ``size`` (random weights): LoRA merged, constants, precision."""
    cfg = config_from_dict(copy.deepcopy(config))
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    return at_precision(with_constants(model_at_size(cfg, state, size)).requires_grad_(False), precision)


def frame(*shape: int) -> torch.Tensor:
    """A zero uint8 frame of ``shape``."""
    return torch.zeros(shape, dtype=torch.uint8)


def slide_graphs(config: dict) -> Iterator[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """A slide family's window graph and slide-in-graph graph, each with example inputs."""
    cfg = config_from_dict(copy.deepcopy(config))
    window, size = cfg.inference.window, tuple(cfg.inference.test_size)
    model = export_model(config, (window, window))
    yield WindowGraph(model, cfg.model.mean, cfg.model.std), (frame(2, window, window, 3),)
    windows = window_grid(*size, window, cfg.inference.stride)
    yield SlideGraph(model, cfg.model.mean, cfg.model.std, size, windows, window, 4), (frame(1, *size, 3),)


def vfmnet_graphs() -> Iterator[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """VFMNet's whole graph (fixed size, resize-in-graph, fp16) with example inputs."""
    cfg = config_from_dict(copy.deepcopy(TINY_CONFIG))
    size = tuple(cfg.model.img_size)
    yield SegmentationGraph(export_model(TINY_CONFIG, size), cfg.model.mean, cfg.model.std), (frame(2, *size, 3),)
    yield (SegmentationGraph(export_model(TINY_CONFIG, size), cfg.model.mean, cfg.model.std, network_size=size),
           (frame(1, 70, 90, 3),))
    yield (SegmentationGraph(export_model(TINY_CONFIG, size, "fp16"), cfg.model.mean, cfg.model.std),
           (frame(1, *size, 3),))


def coarse_to_fine_graphs() -> Iterator[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """VFMNet + MGRNet's coarse and refine graphs (fp32 and fp16) with example inputs."""
    cfg = config_from_dict(copy.deepcopy(TINY_C2F_CONFIG))
    inf, mean, std = cfg.inference, cfg.model.mean, cfg.model.std
    size, coarse_size, window = tuple(inf.test_size), tuple(inf.coarse_size), inf.window
    windows = window_grid(*size, window, inf.stride)
    image = frame(1, *size, 3)
    for precision in ("fp32", "fp16"):
        coarse = CoarseGraph(export_model(TINY_C2F_CONFIG, coarse_size, precision), mean, std, coarse_size,
                             windows, window)
        yield coarse, (image, torch.tensor([0.9]))
        refine = RefineGraph(export_model(TINY_C2F_CONFIG, (window, window), precision), mean, std, size,
                             windows, window)
        logits = torch.zeros(1, cfg.model.num_classes, coarse_size[0] // 4, coarse_size[1] // 4)
        yield refine, (image, logits, torch.tensor([0, 3, 4]))


WRAPPERS: dict[str, Callable[[], Iterator[tuple[nn.Module, tuple[torch.Tensor, ...]]]]] = {
    "vfmnet": vfmnet_graphs,
    "coarse_to_fine": coarse_to_fine_graphs,
    "mfuser": lambda: slide_graphs(TINY_MFUSER_CONFIG),
    "depthforge": lambda: slide_graphs(TINY_DEPTHFORGE_CONFIG),
    "rein": lambda: slide_graphs(TINY_REIN_CONFIG),
}


@pytest.mark.parametrize("family", WRAPPERS)
def test_eager_wrappers_follow_the_module_to_another_device(family: str) -> None:
    """After ``.to("meta")`` every tensor a wrapper holds is there, and its forward runs there."""
    for graph, inputs in WRAPPERS[family]():
        name = type(graph).__name__
        graph = graph.eval().to("meta")
        assert not stray_tensors(graph, "meta"), f"{family} {name}: {stray_tensors(graph, 'meta')}"
        with torch.no_grad():
            outputs = graph(*(x.to("meta") for x in inputs))
        assert outputs and all(o.device.type == "meta" for o in outputs), f"{family} {name}"


class Counting(nn.Module):
    """The portable helpers on sizes read from the input, for tracing."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H, W) → arange(W) and arange(3, H + 3) in ``dtype``, and a (2, 2) table in x's dtype."""
        h, w = x.shape[-2:]
        return (arange_like(x, w, dtype=self.dtype), arange_like(x, 3, h + 3, dtype=self.dtype),
                values_like(x, [(17.0, 9.0), (0.1, 3.25)]))


@pytest.mark.parametrize("dtype, limit", [(torch.int64, 5000), (torch.float32, 5000), (torch.float16, 2048),
                                          (torch.bfloat16, 256)])
def test_traced_counting_equals_torch_and_follows_the_input(dtype: torch.dtype, limit: int) -> None:
    """Traced on one size and run on others (up to where ``dtype`` holds every integer): torch.arange's values."""
    traced = torch.jit.trace(Counting(dtype), torch.zeros(1, 3, 5, dtype=torch.float16))
    assert not device_bound_parts(traced)
    for h, w in ((1, 1), (4, 9), (limit - 3, limit)):
        columns, rows, table = traced(torch.zeros(1, h, w, dtype=torch.float64))
        assert columns.dtype == rows.dtype == dtype
        assert torch.equal(columns, torch.arange(w, dtype=dtype)), (h, w)
        assert torch.equal(rows, torch.arange(3, h + 3, dtype=dtype)), (h, w)
        assert torch.equal(table, torch.tensor([(17.0, 9.0), (0.1, 3.25)], dtype=torch.float64))
    assert torch.equal(arange_like(torch.zeros(1), 4), torch.arange(4))


def smooth_frame(height: int, width: int, seed: int) -> np.ndarray:
    """Blobs of colour with noise: labels that vary over the frame without a tie at every pixel."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).permute(2, 0, 1)[None].float()
    rgb = torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0]
    return np.clip(rgb.permute(1, 2, 0).numpy() + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def no_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's convolutions and matmuls in full float32, as on the CPU (TF32 keeps 10 bits of mantissa)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("package", GPU_PACKAGES)
def test_torchscript_graphs_on_cuda_equal_the_cpu(package: str, request: pytest.FixtureRequest, no_tf32: None) -> None:
    from dgss_perception.engine import Segmenter

    model_dir = request.getfixturevalue(package)
    on = {d: Segmenter(model_dir, backend="torchscript", device=d, precision="fp32") for d in ("cpu", "cuda")}
    assert on["cuda"].backend.device.startswith("cuda")
    height, width = on["cpu"].network_size
    if on["cpu"].resizes_in_graph:
        height, width = height * 3 // 2 + 5, width * 7 // 4 + 3  # a frame size the export never saw
    frames = [smooth_frame(height, width, seed) for seed in range(3, 3 + on["cpu"].batch_size)]
    cpu, cuda = on["cpu"].segment_batch(frames), on["cuda"].segment_batch(frames)
    for i, (a, b) in enumerate(zip(cpu, cuda)):
        assert a.labels.shape == b.labels.shape == (height, width)
        assert a.network_confidence.shape == b.network_confidence.shape
        # The tiny random models' outputs depend on the frame (Rein's labels may all be one class).
        assert np.ptp(a.network_confidence) > 0.1, f"{package}: frame {i} gives a constant output"
        differing = float(np.mean(a.labels != b.labels))
        assert differing <= GPU_MAX_DIFFERING, f"{package}: frame {i}: {differing:.2%} of the labels differ"
        off = float(np.mean(np.abs(a.network_confidence - b.network_confidence) > GPU_CONFIDENCE_ATOL))
        assert off <= GPU_MAX_DIFFERING, f"{package}: frame {i}: {off:.2%} of the confidence differs"
        assert a.windows_refined == b.windows_refined  # coarse-to-fine: the same windows chosen on both
