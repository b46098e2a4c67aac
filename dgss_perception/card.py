"""The model package: ``card.json`` beside the exported graphs.

The card is the contract between training/export and the runtime. It is
validated on load; any mismatch (schema, missing graph, wrong checksum, bad
sizes) raises :class:`CardError` naming the field and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
CARD_FILE = "card.json"
FAMILIES = ("vfmnet_mgrnet", "mfuser", "depthforge", "rein")
OUTPUT_KINDS = ("labels_confidence", "logits")
INFERENCE_MODES = ("whole", "slide", "coarse", "coarse_to_fine")
# The graphs each mode runs: coarse-to-fine is VFMSeg's stage 1 ("coarse", which also scores
# every window's confidence) followed by the selected windows through backbone + MGRNet ("refine");
# slide runs the card's windows of the frame through the window graph in batches and averages overlaps.
MODE_GRAPHS = {"whole": ("whole",), "slide": ("window",), "coarse": ("coarse",),
               "coarse_to_fine": ("coarse", "refine")}
# stretch: the runtime resizes frames to the input size; stretch_in_graph: the graph takes frames of any
# size (dimensions -1), resizes them itself and returns labels at the frame's size.
RESIZE_POLICIES = ("stretch", "stretch_in_graph")
# torch_gpu_precision: the arithmetic the PyTorch path runs the TorchScript and torch.export graphs at on a GPU,
# as the export checked it (bf16: autocast whose labels agreed with fp32 on the parity input; fp16: an fp16
# package's own; fp32: bf16 fell short). Optional: cards written before it was recorded have none (see the
# engine's rule).
GPU_PRECISIONS = ("fp32", "bf16", "fp16")


class CardError(ValueError):
    """A model package that the runtime refuses; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph in ONNX, TorchScript and/or torch.export (``.pt2``) form."""

    onnx: str | None
    torchscript: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_kind: str
    onnx_data: tuple[str, ...] = ()  # files beside the ONNX graph holding its weights (graphs over 2 GB)
    pt2: str | None = None  # the torch.export program (torch.export.save); optional, absent from older cards

    @property
    def files(self) -> tuple[str, ...]:
        """Every file of the graph: ONNX, its external weights, TorchScript, torch.export program."""
        return tuple(f for f in (self.onnx, *self.onnx_data, self.torchscript, self.pt2) if f)


@dataclass(frozen=True)
class ModelCard:
    """What the runtime needs to know about a model package."""

    directory: Path
    name: str
    family: str
    backbones: tuple[str, ...]
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    input_height: int
    input_width: int
    channel_order: str
    layout: str
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalization: str
    inference_mode: str
    inference_params: dict[str, Any]
    graphs: dict[str, GraphSpec]
    precision: str
    checksums: dict[str, str]
    export: dict[str, Any] = field(default_factory=dict)
    torch_gpu_precision: str | None = None  # one of GPU_PRECISIONS; None on cards that predate it

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def available_modes(self) -> tuple[str, ...]:
        """Inference modes whose graphs this package holds."""
        return tuple(m for m in INFERENCE_MODES if all(g in self.graphs for g in MODE_GRAPHS[m]))

    def graph_path(self, graph: str, kind: str) -> Path:
        """The file of ``graph`` in form ``kind`` (onnx | torchscript | pt2); CardError where the package lacks it."""
        spec = self.graphs[graph]
        name = {"onnx": spec.onnx, "torchscript": spec.torchscript, "pt2": spec.pt2}.get(kind)
        if name is None:
            raise CardError(f"model package {self.directory} has no {kind} file for graph '{graph}'")
        return self.directory / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise CardError(f"{where}: missing field '{key}'")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CardError(f"{where}: field '{key}' should be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _tensor_specs(items: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list) or not items:
        raise CardError(f"{where}: expected a non-empty list of tensors")
    specs = []
    for i, item in enumerate(items):
        w = f"{where}[{i}]"
        specs.append(TensorSpec(
            name=_require(item, "name", str, w),
            dtype=_require(item, "dtype", str, w),
            shape=tuple(int(s) for s in _require(item, "shape", list, w)),
        ))
    return tuple(specs)


def parse_card(data: dict[str, Any], directory: Path) -> ModelCard:
    """Validate a card dictionary (without touching the graph files)."""
    where = str(directory / CARD_FILE)
    version = _require(data, "schema_version", int, where)
    if version != SCHEMA_VERSION:
        raise CardError(f"{where}: schema_version {version} is not supported (this runtime reads {SCHEMA_VERSION})")
    family = _require(data, "family", str, where)
    if family not in FAMILIES:
        raise CardError(f"{where}: unknown family '{family}' (known: {', '.join(FAMILIES)})")
    classes = tuple(_require(data, "classes", list, where))
    palette = tuple(tuple(int(c) for c in rgb) for rgb in _require(data, "palette", list, where))
    if not classes or len(classes) > 255:
        raise CardError(f"{where}: 'classes' must hold 1 to 255 names, got {len(classes)}")
    if len(palette) != len(classes) or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
        raise CardError(f"{where}: 'palette' must hold one RGB triple (0–255) per class ({len(classes)})")

    inp = _require(data, "input", dict, where)
    w_in = where + ": input"
    height, width = _require(inp, "height", int, w_in), _require(inp, "width", int, w_in)
    if height <= 0 or width <= 0:
        raise CardError(f"{w_in}: size must be positive, got {width}x{height}")
    mean = tuple(float(v) for v in _require(inp, "mean", list, w_in))
    std = tuple(float(v) for v in _require(inp, "std", list, w_in))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CardError(f"{w_in}: mean and std need three values, std positive")
    channel_order = _require(inp, "channel_order", str, w_in)
    if channel_order not in ("RGB", "BGR"):
        raise CardError(f"{w_in}: channel_order must be RGB or BGR, got {channel_order!r}")
    layout = _require(inp, "layout", str, w_in)
    if layout != "NHWC":
        raise CardError(f"{w_in}: layout must be NHWC, got {layout!r}")
    resize = _require(inp, "resize", str, w_in)
    if resize not in RESIZE_POLICIES:
        raise CardError(f"{w_in}: resize policy {resize!r} unknown (known: {', '.join(RESIZE_POLICIES)})")
    normalization = _require(inp, "normalization", str, w_in)
    if normalization != "in_graph":
        raise CardError(f"{w_in}: normalization must be 'in_graph', got {normalization!r}")

    inference = _require(data, "inference", dict, where)
    mode = _require(inference, "mode", str, where + ": inference")
    if mode not in INFERENCE_MODES:
        raise CardError(f"{where}: inference mode {mode!r} unknown (known: {', '.join(INFERENCE_MODES)})")

    params = inference.get("params", {})
    if not isinstance(params, dict):
        raise CardError(f"{where}: inference.params must be an object")
    graphs: dict[str, GraphSpec] = {}
    for gname, g in _require(data, "graphs", dict, where).items():
        wg = f"{where}: graphs.{gname}"
        kind = _require(g, "output_kind", str, wg)
        if kind not in OUTPUT_KINDS:
            raise CardError(f"{wg}: output_kind {kind!r} unknown (known: {', '.join(OUTPUT_KINDS)})")
        spec = GraphSpec(
            onnx=g.get("onnx"), torchscript=g.get("torchscript"),
            inputs=_tensor_specs(g.get("inputs"), wg + ".inputs"),
            outputs=_tensor_specs(g.get("outputs"), wg + ".outputs"),
            output_kind=kind,
            onnx_data=tuple(str(f) for f in g.get("onnx_data", [])),
            pt2=g.get("pt2"),
        )
        if any(Path(f).name != f or f in ("", ".", "..") for f in spec.files):
            raise CardError(f"{wg}: graph files must be plain names inside the package, got {list(spec.files)}")
        if spec.onnx is None and spec.torchscript is None and spec.pt2 is None:
            raise CardError(f"{wg}: names no onnx, torchscript or pt2 file")
        batch = spec.inputs[0].shape[0] if spec.inputs[0].shape else 0
        expected_in = (batch, -1, -1, 3) if resize == "stretch_in_graph" else (batch, height, width, 3)
        if gname == "window":
            _check_window_graph(spec, _require(params, "window", int, where + ": inference.params"), len(classes), wg)
        elif batch < 1 or spec.inputs[0].shape != expected_in or spec.inputs[0].dtype != "uint8":
            raise CardError(f"{wg}: input must be uint8 {list(expected_in)} (N ≥ 1), card says "
                            f"{spec.inputs[0].dtype} {list(spec.inputs[0].shape)}")
        # labels + confidence come first; a coarse graph adds what its refine stage needs.
        if kind == "labels_confidence" and (len(spec.outputs) < 2 or spec.outputs[0].dtype != "uint8"):
            raise CardError(f"{wg}: output_kind {kind} needs uint8 labels and a confidence map first, "
                            f"card lists {[(o.name, o.dtype) for o in spec.outputs]}")
        if kind == "logits" and len(spec.outputs) != 1:
            raise CardError(f"{wg}: output_kind logits needs one output, card lists {len(spec.outputs)}")
        graphs[gname] = spec
    missing = [g for g in MODE_GRAPHS[mode] if g not in graphs]
    if missing:
        raise CardError(f"{where}: inference mode {mode!r} needs graphs {list(MODE_GRAPHS[mode])}, "
                        f"card has {sorted(graphs)}")
    if mode == "coarse_to_fine" or "refine" in graphs:
        _check_coarse_to_fine(params, graphs, height, width, where)
    gpu_precision = data.get("torch_gpu_precision")
    if gpu_precision is not None and gpu_precision not in GPU_PRECISIONS:
        raise CardError(f"{where}: torch_gpu_precision must be one of {', '.join(GPU_PRECISIONS)} (or absent), "
                        f"got {gpu_precision!r}")
    if "window" in graphs:
        _check_windows(params, height, width, where)
        if resize != "stretch":
            raise CardError(f"{where}: slide inference needs the 'stretch' resize policy, card says {resize!r}")

    return ModelCard(
        directory=directory, name=_require(data, "name", str, where), family=family,
        backbones=tuple(_require(data, "backbones", list, where)), classes=classes, palette=palette,
        ignore_index=int(data.get("ignore_index", 255)), input_height=height, input_width=width,
        channel_order=channel_order, layout=layout, resize=resize, mean=mean, std=std,
        normalization=normalization, inference_mode=mode, inference_params=dict(params),
        graphs=graphs, precision=_require(data, "precision", str, where),
        checksums=dict(_require(data, "checksums", dict, where)), export=dict(data.get("export", {})),
        torch_gpu_precision=gpu_precision,
    )


def _check_windows(params: dict[str, Any], height: int, width: int, where: str) -> list[Any]:
    """The window table (``window`` size and ``windows`` corners) of a slide or coarse-to-fine package."""
    w = f"{where}: inference.params"
    window = _require(params, "window", int, w)
    windows = _require(params, "windows", list, w)
    if window < 1 or not windows or any(
            not isinstance(c, list) or len(c) != 2 or not all(isinstance(v, int) for v in c)
            or not 0 <= c[0] <= height - window or not 0 <= c[1] <= width - window for c in windows):
        raise CardError(f"{w}: 'windows' must list [y, x] corners of {window}-pixel windows inside {height}x{width}")
    return windows


def _check_window_graph(spec: GraphSpec, window: int, num_classes: int, where: str) -> None:
    """Slide's window graph: uint8 (K, w, w, 3) windows → float scores (K, C, w, w), K free (-1)."""
    expected_in = (-1, window, window, 3)
    expected_out = (-1, num_classes, window, window)
    if spec.inputs[0].shape != expected_in or spec.inputs[0].dtype != "uint8" or len(spec.inputs) != 1:
        raise CardError(f"{where}: input must be one uint8 {list(expected_in)} (K windows), card says "
                        f"{[(i.dtype, list(i.shape)) for i in spec.inputs]}")
    if spec.output_kind != "logits" or spec.outputs[0].shape != expected_out or spec.outputs[0].dtype != "float32":
        raise CardError(f"{where}: output must be float32 scores {list(expected_out)} (output_kind logits), card says "
                        f"{spec.output_kind} {[(o.dtype, list(o.shape)) for o in spec.outputs]}")


def _check_coarse_to_fine(params: dict[str, Any], graphs: dict[str, GraphSpec], height: int, width: int,
                          where: str) -> None:
    """The window table and thresholds a coarse-to-fine package must carry, consistent with its graphs."""
    w = f"{where}: inference.params"
    windows = _check_windows(params, height, width, where)
    for key in ("theta", "c_tau"):
        value = _require(params, key, (int, float), w)
        if not 0.0 <= float(value) <= 1.0:
            raise CardError(f"{w}: {key} must lie in [0, 1], got {value}")
    coarse = graphs.get("coarse")
    if coarse is not None and (len(coarse.outputs) != 4 or coarse.outputs[3].shape[-1] != len(windows)):
        raise CardError(f"{where}: graphs.coarse must output labels, confidence, coarse logits and one "
                        f"confident fraction per window ({len(windows)})")


def load_card(model_dir: str | Path, verify_checksums: bool = True) -> ModelCard:
    """Read and validate ``<model_dir>/card.json``; check every graph file exists and matches its checksum."""
    directory = Path(model_dir)
    path = directory / CARD_FILE
    if not directory.is_dir():
        raise CardError(f"model package not found: {directory} is not a directory")
    if not path.is_file():
        raise CardError(f"model package {directory} has no {CARD_FILE}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CardError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CardError(f"{path} must hold a JSON object")
    card = parse_card(data, directory)
    for spec in card.graphs.values():
        for fname in spec.files:
            fpath = directory / fname
            if not fpath.is_file():
                raise CardError(f"model package {directory}: graph file {fname} is missing")
            if fname not in card.checksums:
                raise CardError(f"model package {directory}: no checksum for {fname} in {CARD_FILE}")
            if verify_checksums:
                actual = sha256_file(fpath)
                if actual != card.checksums[fname]:
                    raise CardError(f"model package {directory}: checksum of {fname} is {actual}, "
                                    f"card says {card.checksums[fname]} (file changed or corrupt)")
    return card


def write_card(model_dir: Path, data: dict[str, Any]) -> ModelCard:
    """Fill in graph checksums, write card.json, and validate it by loading it back."""
    files = [f for g in data["graphs"].values()
             for f in (g.get("onnx"), *g.get("onnx_data", []), g.get("torchscript"), g.get("pt2")) if f]
    data = dict(data, schema_version=SCHEMA_VERSION,
                checksums={f: sha256_file(model_dir / f) for f in files})
    (model_dir / CARD_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return load_card(model_dir)
