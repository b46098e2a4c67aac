"""Export a trained model to a model package: ONNX + TorchScript (+ torch.export ``.pt2``) + card.json.

    python -m training.export --run runs/demo_vfmnet_tiny --out model_pkg

Every graph is checked against eager PyTorch on fresh random input (for
models with masked attention, an input whose attention decisions are not on
their threshold, see :func:`draw_parity_input`); the export fails (exit
code 1) when a graph differs beyond tolerance, printing the maximum
difference either way. The card records each graph's FLOPs per run
(``export.flops``, see :func:`count_flops`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from dgss_perception.card import write_card
from dgss_perception.labels import CITYSCAPES_CLASSES, palette_for

from .checkpoint import load_state_dict_file
from .config import TrainConfig, load_config
from .export_wrappers import (CoarseGraph, HalfPrecision, RefineGraph, SegmentationGraph, SlideGraph,
                              WindowGraph, with_constants)
from .inference import model_at_size, window_grid
from .onnx_cuda import gap_lines

GRAPH = "whole"
EXPORT_MODES = ("whole", "slide", "coarse_to_fine")
# Graph formats a package may hold: ONNX (ONNX Runtime), TorchScript and torch.export programs (both PyTorch).
FORMATS = ("onnx", "torchscript", "pt2")
TORCH_FORMATS = ("torchscript", "pt2")
DEFAULT_FORMATS = ("onnx", "torchscript")
PRECISIONS = ("fp32", "fp16")
# Parity tolerance per precision: the exported graph against eager PyTorch at the same precision.
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 2e-2}
# Families whose models are trained and tested on fixed windows (MFuser's EVA02 takes exactly 512²).
SLIDE_FAMILIES = ("mfuser", "depthforge", "rein")


def backbone_names(cfg: TrainConfig) -> list[str]:
    """The foundation models a package runs: the backbone, MFuser's VLM tower or DepthForge's depth tower beside it."""
    names = [cfg.model.backbone.name]
    if cfg.model.mfuser is not None:
        names.append(cfg.model.mfuser.vlm.name)
    if cfg.model.depthforge is not None and cfg.model.depthforge.depth is not None:
        names.append(cfg.model.depthforge.depth.name)
    return names


def default_export_mode(cfg: TrainConfig) -> str:
    """coarse_to_fine for a model with a refine head, slide for the window-based families, else whole."""
    if cfg.model.refine is not None:
        return "coarse_to_fine"
    return "slide" if cfg.model.family in SLIDE_FAMILIES else "whole"


# What ``export.flops`` counts, recorded beside the figures in every card.
FLOPS_CONVENTION = ("torch.utils.flop_counter.FlopCounterMode on the eager graph, attention through the math "
                    "SDPA backend: matmul, convolution and attention only; a multiply-add counts as 2 FLOPs")


class ParityError(RuntimeError):
    """An exported graph that does not reproduce eager PyTorch."""


def load_export_model(cfg: TrainConfig, weights: Path, size: tuple[int, int], precision: str = "fp32") -> nn.Module:
    """The trained model at ``size``, in eval mode: LoRA merged, MFuser's text and DepthForge's queries constant.

    With ``precision`` fp16 the model computes in half precision behind float32 inputs and outputs.
    """
    model = with_constants(model_at_size(cfg, load_state_dict_file(weights), size))
    # No gradients in an exported graph; parameters passed between modules as inputs (MFuser's text
    # positions) would otherwise trip the FLOP counter's module tracker under no_grad.
    return at_precision(model.requires_grad_(False), precision)


def at_precision(model: nn.Module, precision: str) -> nn.Module:
    """``model`` as is for fp32, wrapped in :class:`HalfPrecision` for fp16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return HalfPrecision(model).eval() if precision == "fp16" else model


def count_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of one forward of ``module`` on ``inputs``, as torch's FlopCounterMode counts them.

    Only matrix products, convolutions (transposed too) and scaled-dot-product attention are
    counted, a multiply-add as 2 FLOPs (torch's convention, and that of the usual ViT formula
    24·N·d² + 4·N²·d per block); normalisation, softmax, resizing and element-wise work are not.
    The forward runs on fake tensors (shapes only, no arithmetic), so a ViT-L costs
    milliseconds rather than a CPU inference; the module may live on the CPU or the meta device.

    Attention is counted through the math SDPA backend, whose two batched matrix products the counter
    always sees: the fused kernel SDPA picks otherwise depends on the torch version and the device, and
    some (CPU flash attention) are not counted at all, which once dropped a fifth of a ViT-L's FLOPs.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # Real parameters are wrapped as fake on first use; nothing is computed or allocated.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FakeTensorMode(allow_non_fake_inputs=True) as fake:
        fake_inputs = tuple(fake.from_tensor(t) for t in inputs)
        with counter:
            module(*fake_inputs)
    return int(counter.get_total_flops())


def whole_flops(graph: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """``export.flops`` of a whole-image package: the graph's FLOPs for its whole batch, and that batch."""
    return {GRAPH: count_flops(graph, (example,)), "batch": int(example.shape[0])}


def coarse_to_fine_flops(coarse: nn.Module, refine: nn.Module, image: torch.Tensor, theta: torch.Tensor,
                         coarse_logits: torch.Tensor) -> dict[str, int]:
    """``export.flops`` of a coarse-to-fine package: the coarse graph per frame and the refine graph per window.

    A frame refining k windows costs ``coarse + k · refine_per_window``. The refine graph is
    counted with one window and with two; its cost must grow by one window's worth (its
    per-frame part, the resize of the coarse logits, has no counted FLOPs).

    Raises:
        RuntimeError: the refine graph's FLOPs are not proportional to its window count.
    """
    f_coarse = count_flops(coarse, (image, theta))
    # Window 0, once and twice: valid indices whatever the size of the window table.
    one, two = (count_flops(refine, (image, coarse_logits, torch.zeros(k, dtype=torch.int64, device=image.device)))
                for k in (1, 2))
    if abs(two - 2 * one) > 0.01 * one:
        raise RuntimeError(f"refine graph FLOPs are not proportional to its windows: {one} for one, {two} for two")
    return {"coarse": f_coarse, "refine_per_window": one}


def export_onnx(graph: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: Path,
                output_names: list[str], opset: int, input_names: list[str] | None = None,
                dynamic_shapes: dict[str, Any] | None = None) -> None:
    """Export with the dynamo exporter (the TorchScript exporter rejects timm's pos-embed resize) and check."""
    import onnx

    example = example if isinstance(example, tuple) else (example,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, example, dynamo=True, opset_version=opset,
                                    input_names=input_names or ["image"], output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(str(path))
    onnx.checker.check_model(str(path))


def export_torchscript(graph: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: Path) -> None:
    example = example if isinstance(example, tuple) else (example,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, example, check_trace=False)
    traced.save(str(path))


def export_program(graph: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: Path,
                   dynamic_shapes: dict[str, Any] | None = None) -> None:
    """``torch.export.export`` + ``torch.export.save``: the graph's ATen program and weights in one ``.pt2`` file.

    ``dynamic_shapes`` as for the ONNX export (keyed by the forward's argument names): the program keeps
    those dimensions free, within their bounds.
    """
    example = example if isinstance(example, tuple) else (example,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(graph, example, dynamic_shapes=dynamic_shapes)
    torch.export.save(program, str(path))


def load_torch_graph(path: Path) -> Callable[..., Any]:
    """An exported PyTorch graph as a callable on the CPU: a ``.pt2`` program's module, else TorchScript."""
    if path.suffix == ".pt2":
        from dgss_perception.torch_export import read_program

        # As the runtime runs it: without the export-time dtype checks, which autocast's bf16 would trip.
        return read_program(path).module()
    return torch.jit.load(str(path))


def compare(name: str, got: list[np.ndarray], ref: list[np.ndarray], ref_probs: np.ndarray, output_kind: str,
            atol: float) -> dict[str, Any]:
    """Compare a graph's outputs with eager ones; labels may differ only where the top-2 classes tie."""
    if output_kind == "logits":
        diff = float(np.abs(got[0] - ref[0]).max())
        return {"graph": name, "max_abs_diff": diff, "ok": diff <= atol * max(1.0, float(np.abs(ref[0]).max())),
                "label_agreement": label_agreement(got[0].argmax(axis=1), ref[0].argmax(axis=1))}
    conf_diff = float(np.abs(got[1].astype(np.float32) - ref[1]).max())
    mismatch = got[0] != ref[0]
    top2 = np.sort(ref_probs, axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) <= 2 * atol
    bad = int((mismatch & ~tie).sum())
    return {"graph": name, "max_abs_diff": conf_diff, "label_mismatch": int(mismatch.sum()),
            "label_mismatch_not_tied": bad, "ok": conf_diff <= atol and bad == 0,
            "label_agreement": 1.0 - float(mismatch.mean())}


def label_agreement(got: np.ndarray, want: np.ndarray) -> float:
    """Share of pixels whose label in ``got`` equals that in ``want`` (same shapes, any integer type)."""
    return float(np.mean(np.asarray(got) == np.asarray(want)))


def _add_agreement(results: list[dict[str, Any]], labels: dict[str, np.ndarray], want: np.ndarray | None) -> None:
    """Put each exported graph's label agreement with the fp32 model (``want``) into its parity record."""
    if want is None:
        return
    for r in results:
        r["label_agreement_fp32"] = label_agreement(labels[r["graph"]], want)


def _add_bf16_agreement(record: dict[str, Any], ts_path: Path, inputs: list[np.ndarray], labels32: np.ndarray,
                        output_kind: str) -> None:
    """Put into ``record`` the share of pixels where the PyTorch graph under bf16 autocast keeps its fp32 labels.

    ``ts_path``: a TorchScript graph or a torch.export program (``.pt2``).

    The runtime's PyTorch path runs fp32 graphs under bf16 autocast on a GPU; torch's CPU autocast casts the
    same operators (matrix products, convolutions) to bf16, so the export checks that arithmetic here, on the
    parity inputs, against ``labels32`` (the graph's own labels in fp32). ``label_agreement_bf16`` is 0, with
    the reason in ``bf16_error``, for a graph that fails under autocast.
    """
    module = load_torch_graph(ts_path)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = module(*(torch.from_numpy(a) for a in inputs))
    except RuntimeError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        record["label_agreement_bf16"], record["bf16_error"] = 0.0, lines[-1] if lines else type(exc).__name__
        return
    outputs = [t.float().numpy() if t.is_floating_point() else t.numpy()
               for t in (got if isinstance(got, (tuple, list)) else (got,))]
    record["label_agreement_bf16"] = label_agreement(_labels_of(outputs, output_kind), labels32)


def torch_gpu_precision(parity: list[dict[str, Any]], precision: str, min_label_agreement: float) -> str:
    """The card's ``torch_gpu_precision``: the arithmetic the runtime's PyTorch path may run on a GPU.

    fp16 for an fp16 package (its graphs are half already; ``label_agreement_fp32`` checks them); bf16 for
    an fp32 package whose every TorchScript and pt2 parity record kept at least ``min_label_agreement`` of its labels
    under bf16 autocast; else fp32.
    """
    if precision == "fp16":
        return "fp16"
    agreements = [r["label_agreement_bf16"] for r in parity if "label_agreement_bf16" in r]
    return "bf16" if agreements and min(agreements) >= min_label_agreement else "fp32"


def _reference_probs(graph: SegmentationGraph, image: torch.Tensor) -> np.ndarray:
    """Softmax (N,C,H,W) behind a whole graph's labels, at the labels' size (for tie detection)."""
    logits_graph = SegmentationGraph(graph.model, graph.mean, graph.std, "logits")
    if graph.network_size is None:
        return torch.softmax(logits_graph(image)[0], dim=1).numpy()
    small = torch.nn.functional.interpolate(image.permute(0, 3, 1, 2).float(), size=graph.network_size,
                                            mode="bilinear", align_corners=False)
    # The logits graph normalises and runs the model; the uint8 cast of the resized frame is undone by
    # feeding floats through the same permutation the graph expects.
    probs = torch.softmax(logits_graph(small.permute(0, 2, 3, 1))[0], dim=1)
    return torch.nn.functional.interpolate(probs, size=tuple(image.shape[1:3]), mode="nearest").numpy()


# Rounding moves a mask logit between eager PyTorch and an exported graph by ~1e-6 in fp32 and ~1e-3 in
# fp16 (ONNX Runtime and torch round at different points); a logit closer than this to the masked-attention
# threshold may land on the other side and change that query's attention, which tiny models (few pixels per
# level) show as a large output difference that says nothing of the export.
ATTENTION_MARGIN = {"fp32": 1e-4, "fp16": 3e-2}
PARITY_DRAWS = 4


@contextlib.contextmanager
def attention_margins() -> Iterator[list[float]]:
    """Inside the block, every eager masked-attention decision appends its smallest |mask logit| to the list."""
    from .models import mask_decoder

    seen: list[float] = []
    original = mask_decoder.attention_mask

    def probe(mask_logits: torch.Tensor, size: tuple[int, int], num_heads: int) -> torch.Tensor:
        seen.append(float(mask_decoder.mask_logits_at(mask_logits, size).abs().min()))
        return original(mask_logits, size, num_heads)

    mask_decoder.attention_mask = probe
    try:
        yield seen
    finally:
        mask_decoder.attention_mask = original


def draw_parity_input(rng: np.random.Generator, shape: tuple[int, ...], eager: Callable[[torch.Tensor], Any],
                      needed: float = ATTENTION_MARGIN["fp32"]) -> tuple[np.ndarray, Any, float | None]:
    """A random uint8 input of ``shape``, ``eager``'s outputs on it and its attention margin.

    Models with masked attention get up to PARITY_DRAWS inputs, keeping the first whose every
    attention decision is ``needed`` away from its threshold (else the one with the widest
    margin, which :func:`export_package` then judges by its labels); the margin is None for a
    model without masked attention.
    """
    best: tuple[np.ndarray, Any, float | None] | None = None
    for _ in range(PARITY_DRAWS):
        x = rng.integers(0, 256, size=shape, dtype=np.uint8)
        with attention_margins() as seen, torch.no_grad():
            outputs = eager(torch.from_numpy(x))
        margin = min(seen) if seen else None
        if best is None or (margin is not None and best[2] is not None and margin > best[2]):
            best = (x, outputs, margin)
        if margin is None or margin >= needed:
            break
    assert best is not None
    return best


def run_parity(graph: nn.Module, onnx_path: Path | None, ts_path: Path | None, size: tuple[int, int],
               output_kind: str, atol: float, seed: int, batch: int = 1,
               graph32: nn.Module | None = None, pt2_path: Path | None = None) -> list[dict[str, Any]]:
    """Exported files (ONNX, TorchScript, ``.pt2`` program) against eager ``graph`` on a random (batch, *size, 3) frame.

    With ``graph32`` (the same graph around the fp32 model, for an fp16 export) each record also
    holds the share of pixels where the exported graph's labels equal the fp32 model's.
    """
    image, ref, margin = draw_parity_input(np.random.default_rng(seed), (batch, *size, 3),
                                           lambda x: [t.numpy() for t in graph(x)],
                                           ATTENTION_MARGIN["fp32" if graph32 is None else "fp16"])
    with torch.no_grad():
        if isinstance(graph, SlideGraph):
            logits = graph.logits(torch.from_numpy(image))
            ref_probs = torch.softmax(logits, dim=1).numpy()
            # Held to the window graph's standard: scores within atol of their largest magnitude, which
            # lets the confidence move by up to that much (a softmax moves by at most its input's change).
            atol = atol * max(1.0, float(logits.abs().max()))
        else:
            ref_probs = _reference_probs(graph, torch.from_numpy(image))
    results, labels = [], {}
    if onnx_path is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": image})
        results.append(compare("onnx", got, ref, ref_probs, output_kind, atol))
        labels["onnx"] = _labels_of(got, output_kind)
    for kind, path in (("torchscript", ts_path), ("pt2", pt2_path)):
        if path is None:
            continue
        module = load_torch_graph(path)
        with torch.no_grad():
            got = [t.numpy() for t in module(torch.from_numpy(image))]
        results.append(compare(kind, got, ref, ref_probs, output_kind, atol))
        labels[kind] = _labels_of(got, output_kind)
        if graph32 is None:  # an fp32 export: may the PyTorch path run it in bf16 on a GPU?
            _add_bf16_agreement(results[-1], path, [image], labels[kind], output_kind)
    if graph32 is not None:
        with torch.no_grad():
            want = _labels_of([t.numpy() for t in graph32(torch.from_numpy(image))], output_kind)
        _add_agreement(results, labels, want)
    for r in results:
        r["seed"] = seed
        r["attention_margin"] = margin
    return results


def _labels_of(outputs: list[np.ndarray], output_kind: str) -> np.ndarray:
    """A graph's labels (N,H,W): its first output, or the argmax of its logits (N,C,H,W)."""
    return outputs[0] if output_kind == "labels_confidence" else outputs[0].argmax(axis=1)


def tensor_specs(size: tuple[int, int], num_classes: int, output_kind: str, batch: int = 1) -> tuple[list, list]:
    h, w = size
    n = batch
    inputs = [{"name": "image", "dtype": "uint8", "shape": [n, h, w, 3]}]
    if output_kind == "logits":
        outputs = [{"name": "logits", "dtype": "float32", "shape": [n, num_classes, h, w]}]
    else:
        outputs = [{"name": "labels", "dtype": "uint8", "shape": [n, h, w]},
                   {"name": "confidence", "dtype": "float32", "shape": [n, h, w]}]
    return inputs, outputs


def _graph_files(out: Path, graph_name: str, module: nn.Module, example: tuple[torch.Tensor, ...],
                 input_names: list[str], output_names: list[str], formats: tuple[str, ...], opset: int,
                 dynamic_shapes: dict[str, Any] | None = None) -> tuple[str | None, str | None, str | None]:
    """Write ``<graph_name>.onnx``, ``.ts`` and/or ``.pt2``; returns their file names (None where not asked for)."""
    onnx_name = f"{graph_name}.onnx" if "onnx" in formats else None
    ts_name = f"{graph_name}.ts" if "torchscript" in formats else None
    pt2_name = f"{graph_name}.pt2" if "pt2" in formats else None
    if onnx_name:
        export_onnx(module, example, out / onnx_name, output_names, opset, input_names, dynamic_shapes)
    if ts_name:
        export_torchscript(module, example, out / ts_name)
    if pt2_name:
        export_program(module, example, out / pt2_name, dynamic_shapes)
    return onnx_name, ts_name, pt2_name


def external_data_files(out: Path, onnx_name: str, force: bool = False) -> list[str]:
    """The files holding an ONNX graph's weights outside it; with ``force`` move every weight out first.

    ONNX files cannot exceed 2 GB (protobuf), so the exporter writes the weights of larger models
    (MFuser, DepthForge in fp32) to a file beside the graph; the card lists and checksums it.
    """
    import onnx

    path = out / onnx_name
    model = onnx.load(str(path), load_external_data=False)
    if force and not _external_locations(model):
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{onnx_name}.data", size_threshold=1024)
        model = onnx.load(str(path), load_external_data=False)
    return _external_locations(model)


def _external_locations(model: Any) -> list[str]:
    import onnx

    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations |= {e.value for e in tensor.external_data if e.key == "location"}
    return sorted(locations)


def _run_exported(out: Path, onnx_name: str | None, ts_name: str | None, input_names: list[str],
                  inputs: list[np.ndarray], pt2_name: str | None = None) -> dict[str, list[np.ndarray]]:
    """Outputs of each exported file of one graph on the same inputs, keyed onnx / torchscript / pt2."""
    results = {}
    if onnx_name:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out / onnx_name), providers=["CPUExecutionProvider"])
        results["onnx"] = sess.run(None, dict(zip(input_names, inputs)))
    for kind, name in (("torchscript", ts_name), ("pt2", pt2_name)):
        if name:
            module = load_torch_graph(out / name)
            with torch.no_grad():
                results[kind] = [t.numpy() for t in module(*(torch.from_numpy(a) for a in inputs))]
    return results


def _export_whole(cfg: TrainConfig, weights: Path, out: Path, size: tuple[int, int], output_kind: str,
                  formats: tuple[str, ...], opset: int, atol: float, batch: int, seed: int,
                  resize_in_graph: bool = False,
                  precision: str = "fp32") -> tuple[dict, dict, list[dict[str, Any]], dict[str, int]]:
    """One graph: the frame stretched to ``size`` through VFMNet (whole-image inference).

    With ``resize_in_graph`` the graph takes frames of any size and resizes them itself.
    """
    def make(p: str) -> SegmentationGraph:
        return SegmentationGraph(load_export_model(cfg, weights, size, p), cfg.model.mean, cfg.model.std,
                                 output_kind, network_size=size if resize_in_graph else None).eval()

    graph = make(precision)
    inputs, outputs = tensor_specs(size, cfg.model.num_classes, output_kind, batch)
    example = torch.zeros((batch, *size, 3), dtype=torch.uint8)
    flops = whole_flops(graph, example)
    dynamic = None
    test_size = size
    if resize_in_graph:
        from torch.export import Dim

        # Frame height and width are free; the labels follow them, the confidence stays at the network size.
        inputs[0]["shape"] = [batch, -1, -1, 3]
        outputs[0]["shape"] = [batch, -1, -1]
        dynamic = {"image": {1: Dim("height", min=16, max=8192), 2: Dim("width", min=16, max=8192)}}
        test_size = (size[0] * 3 // 2 + 5, size[1] * 7 // 4 + 3)  # parity on a frame the export never saw
    onnx_name, ts_name, pt2_name = _graph_files(out, GRAPH, graph, (example,), ["image"],
                                                [o["name"] for o in outputs], formats, opset, dynamic)
    parity = run_parity(graph, out / onnx_name if onnx_name else None, out / ts_name if ts_name else None,
                        test_size, output_kind, atol, seed, batch, make("fp32") if precision != "fp32" else None,
                        out / pt2_name if pt2_name else None)
    graphs = {GRAPH: {"onnx": onnx_name, "torchscript": ts_name, **({"pt2": pt2_name} if pt2_name else {}),
                      "inputs": inputs, "outputs": outputs, "output_kind": output_kind}}
    return graphs, {"mode": GRAPH, "params": {}}, parity, flops


def _export_slide_in_graph(cfg: TrainConfig, weights: Path, out: Path, size: tuple[int, int],
                           formats: tuple[str, ...], opset: int, atol: float, seed: int, precision: str = "fp32",
                           window_batch: int = 0) -> tuple[dict, dict, list[dict[str, Any]], dict[str, int]]:
    """Slide inference as one whole-frame graph (:class:`SlideGraph`): frame at ``size`` in, labels out.

    The runtime sees a ``whole`` package; the windows, their batching (``window_batch`` per run of the
    model, 0 = all) and the overlap averaging happen on the device. The card keeps the window table
    under ``inference.params`` for the record.
    """
    inf = cfg.inference
    window = inf.window
    windows = window_grid(size[0], size[1], window, inf.stride)

    def make(p: str) -> SlideGraph:
        return SlideGraph(load_export_model(cfg, weights, (window, window), p), cfg.model.mean, cfg.model.std,
                          size, windows, window, window_batch).eval()

    graph = make(precision)
    inputs, outputs = tensor_specs(size, cfg.model.num_classes, "labels_confidence")
    example = torch.zeros((1, *size, 3), dtype=torch.uint8)
    flops = whole_flops(graph, example)
    onnx_name, ts_name, pt2_name = _graph_files(out, GRAPH, graph, (example,), ["image"],
                                                [o["name"] for o in outputs], formats, opset)
    parity = run_parity(graph, out / onnx_name if onnx_name else None, out / ts_name if ts_name else None,
                        size, "labels_confidence", atol, seed, 1, make("fp32") if precision != "fp32" else None,
                        out / pt2_name if pt2_name else None)
    graphs = {GRAPH: {"onnx": onnx_name, "torchscript": ts_name, **({"pt2": pt2_name} if pt2_name else {}),
                      "inputs": inputs, "outputs": outputs, "output_kind": "labels_confidence"}}
    params = {"slide_in_graph": True, "window": window, "stride": inf.stride, "window_batch": graph.chunk,
              "windows": [list(c) for c in windows]}
    return graphs, {"mode": GRAPH, "params": params}, parity, flops


def _export_coarse_to_fine(cfg: TrainConfig, weights: Path, out: Path, size: tuple[int, int],
                           formats: tuple[str, ...], opset: int, atol: float, seed: int,
                           precision: str = "fp32") -> tuple[dict, dict, list[dict[str, Any]], dict[str, int]]:
    """Two graphs: VFMNet at the fixed coarse size with the window gate, and backbone + MGRNet on windows.

    The frame size is fixed at export (the card's input size), so the window table is a constant.
    """
    if cfg.model.refine is None:
        raise ValueError("coarse_to_fine export needs a model with a refine head (model.refine in the config)")
    inf = cfg.inference
    window, stride, coarse_size = cfg.model.refine.window, inf.stride, tuple(inf.coarse_size)
    if inf.window != window:
        raise ValueError(f"inference.window ({inf.window}) must equal model.refine.window ({window}), "
                         "the window MGRNet was trained on")
    if size[0] % 4 or size[1] % 4 or window % 4:
        raise ValueError(f"the frame size {size} and window {window} must be multiples of 4")
    windows = window_grid(size[0], size[1], window, stride)
    state = load_state_dict_file(weights)
    mean, std, n = cfg.model.mean, cfg.model.std, cfg.model.num_classes

    def make(p: str) -> tuple[CoarseGraph, RefineGraph]:
        return (CoarseGraph(at_precision(model_at_size(cfg, state, coarse_size), p), mean, std, coarse_size,
                            windows, window).eval(),
                RefineGraph(at_precision(model_at_size(cfg, state, (window, window)), p), mean, std, size,
                            windows, window).eval())

    coarse, refine = make(precision)

    h, w = size
    image = torch.zeros((1, h, w, 3), dtype=torch.uint8)
    theta = torch.tensor([inf.theta], dtype=torch.float32)
    with torch.no_grad():
        coarse_logits = coarse(image, theta)[2]
    flops = coarse_to_fine_flops(coarse, refine, image, theta, coarse_logits)
    ch, cw = coarse_logits.shape[-2:]
    image_spec = {"name": "image", "dtype": "uint8", "shape": [1, h, w, 3]}
    labels_spec = [{"name": "labels", "dtype": "uint8", "shape": [1, h, w]},
                   {"name": "confidence", "dtype": "float32", "shape": [1, h, w]}]
    logits_spec = {"name": "coarse_logits", "dtype": "float32", "shape": [1, n, ch, cw]}
    graphs = {
        "coarse": {"inputs": [image_spec, {"name": "theta", "dtype": "float32", "shape": [1]}],
                   "outputs": labels_spec + [logits_spec, {"name": "window_confident", "dtype": "float32",
                                                           "shape": [1, len(windows)]}],
                   "output_kind": "labels_confidence"},
        # K, the number of windows to refine, is chosen per frame: -1 marks the dynamic size.
        "refine": {"inputs": [image_spec, logits_spec, {"name": "windows", "dtype": "int64", "shape": [-1]}],
                   "outputs": labels_spec, "output_kind": "labels_confidence"},
    }
    from torch.export import Dim

    examples = {"coarse": (image, theta), "refine": (image, coarse_logits, torch.arange(min(2, len(windows))))}
    dynamic = {"coarse": None,
               "refine": {"image": None, "coarse": None, "windows": {0: Dim("windows", min=1, max=len(windows))}}}
    for name, module in (("coarse", coarse), ("refine", refine)):
        spec = graphs[name]
        spec["onnx"], spec["torchscript"], pt2_name = _graph_files(
            out, name, module, examples[name], [i["name"] for i in spec["inputs"]],
            [o["name"] for o in spec["outputs"]], formats, opset, dynamic[name])
        if pt2_name:
            spec["pt2"] = pt2_name

    parity = _coarse_to_fine_parity(coarse, refine, out, graphs, size, len(windows), atol, seed,
                                    make("fp32") if precision != "fp32" else None)
    params = {"theta": inf.theta, "c_tau": inf.c_tau, "window": window, "stride": stride,
              "coarse_size": list(coarse_size), "windows": [list(c) for c in windows]}
    return graphs, {"mode": "coarse_to_fine", "params": params}, parity, flops


def _export_slide(cfg: TrainConfig, weights: Path, out: Path, size: tuple[int, int], formats: tuple[str, ...],
                  opset: int, atol: float, seed: int,
                  precision: str = "fp32") -> tuple[dict, dict, list[dict[str, Any]], dict[str, int]]:
    """One graph on windows of ``inference.window`` pixels (any number K of them per run).

    The runtime resizes a frame to ``size`` (the working size), cuts the windows listed in the card
    (every ``inference.stride`` pixels, the last ones flush with the border), runs them in batches and
    averages the scores of overlapping windows, as :meth:`training.inference.Predictor._slide`.
    """
    inf = cfg.inference
    window, n = inf.window, cfg.model.num_classes
    windows = window_grid(size[0], size[1], window, inf.stride)

    def make(p: str) -> WindowGraph:
        return WindowGraph(load_export_model(cfg, weights, (window, window), p), cfg.model.mean, cfg.model.std).eval()

    graph = make(precision)
    spec = {"inputs": [{"name": "windows", "dtype": "uint8", "shape": [-1, window, window, 3]}],
            "outputs": [{"name": "scores", "dtype": "float32", "shape": [-1, n, window, window]}],
            "output_kind": "logits"}
    from torch.export import Dim

    example = torch.zeros((2, window, window, 3), dtype=torch.uint8)
    flops = {"window": count_flops(graph, (example[:1],))}
    dynamic = {"windows": {0: Dim("windows", min=1, max=max(2, len(windows)))}}
    spec["onnx"], spec["torchscript"], pt2_name = _graph_files(out, "window", graph, (example,), ["windows"],
                                                               ["scores"], formats, opset, dynamic)
    if pt2_name:
        spec["pt2"] = pt2_name
    # Parity on a batch size the export never saw.
    crops, ref, margin = draw_parity_input(np.random.default_rng(seed), (3, window, window, 3),
                                           lambda x: [graph(x)[0].numpy()], ATTENTION_MARGIN[precision])
    parity, labels = [], {}
    exported = _run_exported(out, spec["onnx"], spec["torchscript"], ["windows"], [crops], spec.get("pt2"))
    for kind, got in exported.items():
        r = compare(f"window/{kind}", got, ref, ref[0], "logits", atol)
        r["seed"] = seed
        r["attention_margin"] = margin
        parity.append(r)
        labels[r["graph"]] = got[0].argmax(axis=1)
    if precision != "fp32":
        with torch.no_grad():
            _add_agreement(parity, labels, make("fp32")(torch.from_numpy(crops))[0].numpy().argmax(axis=1))
    else:
        for kind in TORCH_FORMATS:
            if spec.get(kind):
                _add_bf16_agreement(next(r for r in parity if r["graph"] == f"window/{kind}"), out / spec[kind],
                                    [crops], labels[f"window/{kind}"], "logits")
    params = {"window": window, "stride": inf.stride, "windows": [list(c) for c in windows]}
    return {"window": spec}, {"mode": "slide", "params": params}, parity, flops


def _coarse_to_fine_parity(coarse: CoarseGraph, refine: RefineGraph, out: Path, graphs: dict,
                           size: tuple[int, int], num_windows: int, atol: float, seed: int,
                           graphs32: tuple[CoarseGraph, RefineGraph] | None = None) -> list[dict[str, Any]]:
    """Both exported graphs against eager PyTorch on a random frame; the refine graph on several window sets.

    With ``graphs32`` (an fp16 export) each record also holds its labels' agreement with the fp32
    pipeline: the fp32 coarse graph, and the fp32 refine graph fed the fp32 coarse logits.
    """
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(1, *size, 3), dtype=np.uint8)
    theta = np.array([0.5], np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in coarse(torch.from_numpy(image), torch.from_numpy(theta))]
        full = torch.nn.functional.interpolate(torch.from_numpy(ref[2]), size=size, mode="bilinear",
                                               align_corners=False)
        probs = torch.softmax(full, dim=1).numpy()
    ref32 = None
    if graphs32 is not None:
        with torch.no_grad():
            ref32 = [t.numpy() for t in graphs32[0](torch.from_numpy(image), torch.from_numpy(theta))]
    results, labels = [], {}
    names = [i["name"] for i in graphs["coarse"]["inputs"]]
    spec = graphs["coarse"]
    for kind, got in _run_exported(out, spec["onnx"], spec["torchscript"], names, [image, theta],
                                   spec.get("pt2")).items():
        r = compare(f"coarse/{kind}", got, ref, probs, "labels_confidence", atol)
        r["coarse_logits_max_abs_diff"] = float(np.abs(got[2] - ref[2]).max())
        # A pixel whose confidence sits on θ may flip; allow a handful per window (more in fp16).
        r["window_confident_max_abs_diff"] = float(np.abs(got[3] - ref[3]).max())
        r["ok"] = bool(r["ok"] and r["coarse_logits_max_abs_diff"] <= atol * max(1.0, float(np.abs(ref[2]).max()))
                       and r["window_confident_max_abs_diff"] <= max(1e-3, atol))
        results.append(r)
        labels[r["graph"]] = got[0]
        if kind in TORCH_FORMATS and graphs32 is None:
            _add_bf16_agreement(r, out / spec[kind], [image, theta], got[0], "labels_confidence")
    _add_agreement(results, labels, None if ref32 is None else ref32[0])
    spec = graphs["refine"]
    names = [i["name"] for i in spec["inputs"]]
    subsets = [np.arange(num_windows), np.sort(rng.choice(num_windows, size=max(1, num_windows // 3), replace=False))]
    for subset in subsets:
        windows = subset.astype(np.int64)
        feeds = [image, ref[2], windows]
        with torch.no_grad():
            args = [torch.from_numpy(a) for a in feeds]
            want = [t.numpy() for t in refine(*args)]
            probs = torch.softmax(refine.logits(*args), dim=1).numpy()
        refined = {}
        for kind, got in _run_exported(out, spec["onnx"], spec["torchscript"], names, feeds, spec.get("pt2")).items():
            r = compare(f"refine/{kind}", got, want, probs, "labels_confidence", atol)
            r["windows"] = windows.tolist()
            results.append(r)
            refined[r["graph"]] = got[0]
            if kind in TORCH_FORMATS and graphs32 is None:
                _add_bf16_agreement(r, out / spec[kind], feeds, got[0], "labels_confidence")
        if graphs32 is not None and ref32 is not None:
            with torch.no_grad():
                want32 = graphs32[1](*(torch.from_numpy(a) for a in (image, ref32[2], windows)))[0].numpy()
            _add_agreement(results[-len(refined):], refined, want32)
    for r in results:
        r["seed"] = seed
    return results


def export_package(cfg: TrainConfig, weights: Path, out: Path, size: tuple[int, int] | None = None,
                   output_kind: str = "labels_confidence", formats: tuple[str, ...] = DEFAULT_FORMATS,
                   opset: int = 18, atol: float | None = None, overwrite: bool = False, name: str | None = None,
                   batch: int = 1, mode: str | None = None, resize_in_graph: bool = False,
                   benchmark: bool = False, external_data: bool = False, parity_seed: int | None = None,
                   precision: str = "fp32", min_label_agreement: float = 0.98, slide_in_graph: bool = False,
                   window_batch: int = 0) -> dict:
    """Write a model package to ``out``; raise ParityError when a graph disagrees with eager PyTorch.

    Args:
        formats: some of :data:`FORMATS`: ``onnx`` (``<graph>.onnx``), ``torchscript`` (``<graph>.ts``),
            ``pt2`` (``<graph>.pt2``, ``torch.export.save`` of the ``torch.export`` program, with the same free
            dimensions as the ONNX graph); each is parity-checked against eager PyTorch under its own key
            (``onnx``, ``torchscript``, ``pt2``; ``window/pt2`` etc. for slide and coarse-to-fine graphs).
        size: the graphs' input (H, W): the network size for ``whole`` (default the training size),
            the working frame size for ``slide`` and ``coarse_to_fine`` (default the config's test
            size, else twice the coarse size: 1024×2048 for the paper's 512×1024).
        mode: ``whole``, ``slide`` or ``coarse_to_fine`` (default: :func:`default_export_mode`).
        batch: the graphs' fixed batch size (``whole`` only): a node serving several cameras runs up
            to that many frames in one inference.
        resize_in_graph: (``whole`` only) the graph takes frames of any size, stretches them to ``size``
            itself and returns labels at the frame's size, so the host does no image work.
        external_data: keep every ONNX graph's weights in a ``<graph>.onnx.data`` file beside it (always
            done for graphs over 2 GB, whose weights cannot live inside the ONNX file).
        benchmark: ``weights`` are a random initialisation (``training.bench_models``): the card says
            so (``benchmark: true`` at the top and in ``export``, ``export.weights`` "random (benchmark)").
        slide_in_graph: (``slide`` only) one graph takes the frame, runs its windows ``window_batch``
            at a time (0 = all at once) and averages them on the device; the card then offers
            ``whole`` inference of that graph, and only labels and confidence leave the device.
        parity_seed: seed of the parity inputs (default: fresh each export); every parity record
            carries its seed, so a reported failure can be replayed.
        atol: parity tolerance against eager PyTorch at the same precision (default
            ``DEFAULT_ATOL[precision]``).
        precision: ``fp32``, or ``fp16`` (weights and arithmetic in half precision; uint8 in, float32
            confidence / scores out, normalisation and softmax in float32). An fp16 package records
            each graph's label agreement with the fp32 model (``label_agreement_fp32`` in the parity
            records) and fails below ``min_label_agreement``. An fp32 package's TorchScript and pt2 parity records
            hold ``label_agreement_bf16`` (the same graph under bf16 autocast against itself in fp32, on
            the parity input); the card's ``torch_gpu_precision`` is then bf16 where each reaches
            ``min_label_agreement``, else fp32 (fp16 for an fp16 package): the precision the runtime's
            PyTorch path takes on a GPU by default.

    Returns:
        The card as written; ``card["export"]["flops"]`` holds the FLOPs per run of each graph:
        ``{"whole": F, "batch": N}`` (F for the whole batch of N frames), or
        ``{"coarse": F, "refine_per_window": F}`` (a frame refining k windows costs coarse + k × that).
    """
    mode = mode or default_export_mode(cfg)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 0.0 <= min_label_agreement <= 1.0:
        raise ValueError(f"min_label_agreement must lie in [0, 1], got {min_label_agreement}")
    atol = DEFAULT_ATOL[precision] if atol is None else atol
    if mode not in EXPORT_MODES:
        raise ValueError(f"export mode must be one of {', '.join(EXPORT_MODES)}, got {mode!r}")
    if batch < 1 or (mode != "whole" and batch != 1):
        raise ValueError(f"batch must be ≥ 1 (and 1 for {mode}), got {batch}")
    if mode == "coarse_to_fine" and output_kind != "labels_confidence":
        raise ValueError(f"{mode} graphs output labels and confidence, not {output_kind}")
    if slide_in_graph and (mode != "slide" or output_kind != "labels_confidence"):
        raise ValueError("slide_in_graph needs slide mode and outputs labels and confidence")
    if window_batch < 0:
        raise ValueError(f"window_batch must be ≥ 0, got {window_batch}")
    if resize_in_graph and (mode != "whole" or output_kind != "labels_confidence"):
        raise ValueError("resize_in_graph needs a whole-image graph that outputs labels and confidence")
    if size is None:
        if mode == "whole":
            size = tuple(cfg.model.img_size)
        else:
            size = tuple(cfg.inference.test_size or [2 * s for s in cfg.inference.coarse_size])
    size = (int(size[0]), int(size[1]))
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    seed = int.from_bytes(os.urandom(4), "little") if parity_seed is None else int(parity_seed)
    if mode == "whole":
        graphs, inference, parity, flops = _export_whole(cfg, weights, out, size, output_kind, formats, opset, atol,
                                                         batch, seed, resize_in_graph, precision)
    elif mode == "slide" and slide_in_graph:
        graphs, inference, parity, flops = _export_slide_in_graph(cfg, weights, out, size, formats, opset, atol,
                                                                  seed, precision, window_batch)
    elif mode == "slide":
        graphs, inference, parity, flops = _export_slide(cfg, weights, out, size, formats, opset, atol, seed,
                                                         precision)
    else:
        graphs, inference, parity, flops = _export_coarse_to_fine(cfg, weights, out, size, formats, opset, atol,
                                                                  seed, precision)

    import onnx
    import timm

    for spec in graphs.values():
        if spec.get("onnx"):
            data = external_data_files(out, spec["onnx"], force=external_data)
            if data:
                spec["onnx_data"] = data
    # Nodes ONNX Runtime's CUDA provider would leave to the CPU (copies around them, no CUDA graphs): none
    # in this project's graphs; an export that adds one says so here rather than on the car.
    cuda_gaps = {name: gap_lines(out / spec["onnx"]) for name, spec in graphs.items() if spec.get("onnx")}
    n = cfg.model.num_classes
    classes = list(CITYSCAPES_CLASSES) if n == 19 else [f"class_{i}" for i in range(n)]
    palette = [list(c) for c in palette_for(n)]
    card = {
        "name": name or cfg.name,
        "family": cfg.model.family,
        "backbones": backbone_names(cfg),
        "classes": classes,
        "palette": palette,
        "ignore_index": 255,
        "input": {"height": size[0], "width": size[1], "channel_order": "RGB", "layout": "NHWC",
                  "dtype": "uint8", "resize": "stretch_in_graph" if resize_in_graph else "stretch",
                  "normalization": "in_graph",
                  "mean": list(cfg.model.mean), "std": list(cfg.model.std)},
        "inference": inference,
        "graphs": graphs,
        "precision": precision,
        "export": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
                   "opset": opset, "weights": "random (benchmark)" if benchmark else str(weights),
                   "parity": parity, "flops": flops, "flops_convention": FLOPS_CONVENTION,
                   "onnx_cuda_gaps": {name: lines for name, lines in cuda_gaps.items() if lines},
                   "backbone": {"name": cfg.model.backbone.name, "overrides": cfg.model.backbone.overrides,
                                "lora": "merged" if cfg.model.backbone.lora else None}},
    }
    if cfg.model.mfuser is not None:
        m = cfg.model.mfuser
        card["export"]["mfuser"] = {"vlm": {"name": m.vlm.name, "overrides": m.vlm.overrides},
                                    "text": {"name": m.text.name, "overrides": m.text.overrides,
                                             "in_graph": "class embeddings precomputed as a constant"}}
    if cfg.model.depthforge is not None:
        d = cfg.model.depthforge
        card["export"]["depthforge"] = {
            "depth": None if d.depth is None else {"name": d.depth.name, "overrides": d.depth.overrides},
            "tokens": {"length": d.token_length, "rank": d.rank}, "dqcm": d.dqcm,
            "queries": "decoder queries precomputed from the tokens as a constant"}
    if benchmark:
        # Twice: at the top for anyone reading card.json, in ``export`` for the runtime's ModelCard.export.
        card["benchmark"] = True
        card["export"]["benchmark"] = True
    if any(spec.get(kind) for spec in graphs.values() for kind in TORCH_FORMATS):
        card["torch_gpu_precision"] = torch_gpu_precision(parity, precision, min_label_agreement)
    if precision != "fp32" or "torch_gpu_precision" in card:
        card["export"]["min_label_agreement"] = min_label_agreement
    for r in parity:
        if r.get("attention_margin") is not None and r["attention_margin"] < ATTENTION_MARGIN[precision]:
            # No input kept every attention decision off its threshold (large models never do): values may
            # jump where a decision flipped, so the graph is held to its labels instead.
            r["check"] = "labels"
            r["ok"] = r["label_agreement"] >= min_label_agreement
    failed = [r for r in parity if not r["ok"]]
    disagree = [r for r in parity if r.get("label_agreement_fp32", 1.0) < min_label_agreement]
    if failed or disagree:
        # No card: the runtime must not load graphs that failed parity.
        (out / "parity_report.json").write_text(json.dumps(parity, indent=2) + "\n")
        if failed:
            raise ParityError(f"exported graph(s) differ from eager PyTorch beyond tolerance {atol}: {failed}")
        raise ParityError(f"{precision} graph(s) agree with the fp32 model's labels on less than "
                          f"{min_label_agreement:.2%} of pixels: {disagree} (export fp32, or lower "
                          "--min-label-agreement knowingly)")
    write_card(out, card)
    return card


def human_flops(flops: float) -> str:
    """A FLOP count with a unit prefix: ``1.69 TFLOP``, ``750 GFLOP``, ``5.97 MFLOP``."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}FLOP"
    return f"{flops:.0f} FLOP"


def format_flops(flops: dict[str, int]) -> str:
    """One line of ``export.flops``, e.g. ``FLOPs per run: whole 1.69 TFLOP (batch 1)``."""
    parts = [f"{k} {human_flops(v)}" for k, v in flops.items() if k != "batch"]
    batch = f" (batch {flops['batch']})" if "batch" in flops else ""
    return "FLOPs per run: " + ", ".join(parts) + batch


def parse_formats(parser: argparse.ArgumentParser, text: str) -> tuple[str, ...]:
    """``--formats`` ("onnx,torchscript,pt2") as a tuple; anything else is a usage error."""
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    if not formats or set(formats) - set(FORMATS):
        parser.error(f"--formats must list some of {', '.join(FORMATS)}, got {text!r}")
    return formats


def print_parity(card: dict) -> None:
    """One line per parity check of an exported package, then any ONNX node the CUDA provider lacks."""
    for r in card["export"]["parity"]:
        agreement = r.get("label_agreement_fp32")
        extra = "" if agreement is None else f", labels equal to fp32 on {agreement:.2%} of pixels"
        if r.get("label_agreement_bf16") is not None:
            extra += f", bf16 autocast keeps {r['label_agreement_bf16']:.2%} of its labels"
        print(f"parity {r['graph']}: max abs diff {r['max_abs_diff']:.3g}{extra} ({'ok' if r['ok'] else 'FAILED'})")
    for graph, lines in card["export"].get("onnx_cuda_gaps", {}).items():
        print(f"warning: {graph}.onnx: {len(lines)} node(s) would run on the CPU under ONNX Runtime's CUDA "
              "provider (bus copies, no CUDA graphs):")
        for line in lines:
            print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="training run directory (config.yaml + model.safetensors)")
    parser.add_argument("--config", help="training config (default <run>/config.yaml)")
    parser.add_argument("--weights", help="weights file (default <run>/model.safetensors)")
    parser.add_argument("--out", required=True, help="model package directory to write")
    parser.add_argument("--height", type=int, help="graph input height: the network size for whole (default: "
                        "training size), the working frame size for coarse_to_fine (default: inference.test_size)")
    parser.add_argument("--width", type=int, help="graph input width (see --height)")
    parser.add_argument("--output-kind", choices=("labels_confidence", "logits"), default="labels_confidence")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"comma list of {', '.join(FORMATS)} (default %(default)s; pt2: torch.export programs)")
    parser.add_argument("--mode", choices=EXPORT_MODES,
                        help="graphs to export (default: coarse_to_fine for a model with a refine head, slide for "
                        "MFuser, else whole)")
    parser.add_argument("--resize-in-graph", action="store_true",
                        help="whole mode: the graph takes frames of any size and resizes them on the device")
    parser.add_argument("--slide-in-graph", action="store_true",
                        help="slide mode: one graph cuts the windows, runs them and averages them on the device "
                        "(the runtime sees a whole-frame graph)")
    parser.add_argument("--window-batch", type=int, default=0,
                        help="with --slide-in-graph: windows per run of the model inside the graph (0 = all)")
    parser.add_argument("--batch", type=int, default=1, help="fixed batch size of the graphs (cameras per inference)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--atol", type=float,
                        help="parity tolerance against eager PyTorch at the same precision (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_ATOL.items()) + ")")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp16: half-precision weights and arithmetic, label agreement with fp32 checked")
    parser.add_argument("--min-label-agreement", type=float, default=0.98,
                        help="fp16: fail when a graph's labels equal the fp32 model's on fewer pixels than this; "
                        "fp32: the card's torch_gpu_precision is bf16 only where bf16 autocast keeps this share")
    parser.add_argument("--parity-seed", type=int,
                        help="seed of the parity inputs (default: fresh; each parity record carries its seed)")
    parser.add_argument("--name", help="package name (default: the config's name)")
    parser.add_argument("--external-data", action="store_true",
                        help="keep ONNX weights in <graph>.onnx.data files (automatic above 2 GB)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if not (args.run or (args.config and args.weights)):
        parser.error("give --run, or both --config and --weights")
    try:
        cfg = load_config(args.config or Path(args.run) / "config.yaml")
        weights = Path(args.weights or Path(args.run) / "model.safetensors")
        size = (args.height, args.width) if args.height and args.width else None
        if (args.height is None) != (args.width is None):
            parser.error("give both --height and --width, or neither")
        formats = parse_formats(parser, args.formats)
        card = export_package(cfg, weights, Path(args.out), size, args.output_kind, formats, args.opset,
                              args.atol, args.overwrite, args.name, args.batch, args.mode,
                              resize_in_graph=args.resize_in_graph, external_data=args.external_data,
                              parity_seed=args.parity_seed, precision=args.precision,
                              min_label_agreement=args.min_label_agreement, slide_in_graph=args.slide_in_graph,
                              window_batch=args.window_batch)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_parity(card)
    print(format_flops(card["export"]["flops"]))
    print(f"wrote {args.out}: mode {card['inference']['mode']}, graphs {', '.join(card['graphs'])}, "
          f"input {card['input']['height']}x{card['input']['width']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
