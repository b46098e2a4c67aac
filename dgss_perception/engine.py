"""The inference engine: a model package in, labels at input resolution out.

No rclpy here: the node, the bag tool and the command line all call
:class:`Segmenter`, and it is tested with plain pytest.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .backends import (TORCH_PRECISIONS, Backend, BackendError, DeviceTensor, OnnxRuntimeBackend, TorchBackend,
                       TorchScriptBackend, parse_device)
from .card import MODE_GRAPHS, CardError, ModelCard, load_card
from .torch_export import COMPILE_MODES, TorchExportBackend

# pt2: the package's torch.export programs (``.pt2``), eager or compiled on the target (see torch_export).
BACKENDS = ("auto", "onnx", "torchscript", "pt2")
DEVICES = ("auto", "cpu", "cuda")  # device kinds; a GPU by index is cuda:N (parse_device)
PRECISIONS = ("auto", *TORCH_PRECISIONS)
OUTPUT_RESOLUTIONS = ("input", "network")


def device_arg(text: str) -> str:
    """argparse ``type`` for ``--device``: the text when :func:`parse_device` takes it, else a usage error."""
    import argparse

    try:
        parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def gpu_precision(card: ModelCard) -> tuple[str, str]:
    """The PyTorch path's precision on a GPU for ``precision="auto"``, and a note when it was not checked.

    The card's ``torch_gpu_precision`` where the export recorded it. A card without it (exported before the
    check existed): an fp16 package runs as its fp16 graphs; an fp32 package runs bf16 autocast, unchecked
    (it is ~6× faster than fp32 on current GPUs, and bf16 keeps fp32's range), and the note says so for the
    log; ``precision="fp32"`` or a re-export (which records the check) settles it.
    """
    if card.torch_gpu_precision is not None:
        return card.torch_gpu_precision, ""
    if card.precision == "fp16":
        return "fp16", ""
    return "bf16", (f"model card {card.name} has no torch_gpu_precision (exported before bf16 was checked): "
                    "the torchscript backend runs bf16 autocast on the GPU without a recorded label agreement; "
                    "set precision to fp32 for the exported arithmetic, or re-export to have bf16 checked")


@dataclass
class SegmentResult:
    """Labels (uint8 H×W, 255 = ignore) and per-stage timings in milliseconds.

    ``confidence`` (max softmax, float32 H×W at the labels' size) is resized from
    the network grid on first access, so callers that never read it pay nothing.
    """

    labels: np.ndarray
    timings_ms: dict[str, float]
    network_confidence: np.ndarray
    windows_refined: int = 0  # coarse_to_fine: windows run through the refine graph for this frame
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


@functools.lru_cache(maxsize=64)
def _nearest_rows(dst: int, src: int) -> np.ndarray:
    """Source row of each of ``dst`` output rows under OpenCV's INTER_NEAREST: floor(i · src/dst), clipped."""
    scale = 1.0 / (dst / src)  # formed as OpenCV forms it, so every floor rounds the same way
    rows = np.minimum(np.floor(np.arange(dst) * scale).astype(np.intp), src - 1)
    rows.flags.writeable = False  # shared by every call through the cache
    return rows


def resize_labels(labels: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Nearest-neighbour resize of a label map (H,W) to ``size`` = (h, w), equal to ``cv2.INTER_NEAREST``.

    Enlarging repeats whole source rows, so each source row is resized once (H×w pixels) and the
    h output rows are row copies of those: at 1080p from a 224×112 or 1024×512 grid that is 2–5×
    faster than OpenCV resizing all h×w pixels (the plain call, kept for shrinking, is the reference
    the tests compare against).

    ``out``: a C-contiguous uint8 (h, w) array to write the labels into and return (a message buffer,
    say, so the labels need no further copy); without it the result is new, or ``labels`` itself when
    the size already matches.
    """
    h, w = size
    src_h, src_w = labels.shape
    if out is not None and (out.shape != (h, w) or out.dtype != np.uint8 or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous uint8 array of shape {(h, w)}, got {out.dtype} {out.shape}")
    if (src_h, src_w) == (h, w):
        if out is None:
            return labels
        np.copyto(out, labels)
        return out
    if h <= src_h:
        return cv2.resize(labels, (w, h), dst=out, interpolation=cv2.INTER_NEAREST)
    wide = labels if w == src_w else cv2.resize(labels, (w, src_h), interpolation=cv2.INTER_NEAREST)
    # The row indices are in range by construction; numpy's default mode would buffer ``out`` (a 4× slower copy).
    return np.take(wide, _nearest_rows(h, src_h), axis=0, out=out, mode="clip")


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
        backend: ``auto`` (ONNX Runtime when importable and exported, else TorchScript, else the torch.export
            program), ``onnx``, ``torchscript`` or ``pt2`` (the ``.pt2`` programs, see :mod:`.torch_export`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the N-th GPU); :attr:`device_report` says which
            device (and GPU, providers, precision) was taken.
        output_resolution: ``input`` (labels at the frame's size) or ``network`` (the graph's grid).
        threads: ONNX Runtime intra-op threads (0 = its default).
        inference_mode: ``whole``, ``slide``, ``coarse`` or ``coarse_to_fine`` where the package offers
            it (None = the card's mode).
        theta: coarse_to_fine max-softmax threshold for a confident pixel (None = the card's).
        c_tau: coarse_to_fine refines a window whose confident fraction is below this (None = the card's).
        window_batch: slide: windows per run of the window graph (0 = all of a frame's windows at once;
            fewer bound the device memory at the cost of more runs).
        io_binding: ONNX Runtime IO binding, which keeps coarse_to_fine's coarse logits on the device
            between its graphs (None = on for CUDA/TensorRT sessions, off on CPU).
        spin_wait: ONNX Runtime's CPU threads busy-wait for work between operators: slightly faster
            inference in a tight loop, but the cores stay busy after each run.
        cuda_graph: ONNX Runtime's CUDA provider (instead of TensorRT's) captures each input shape's run
            of a graph as a CUDA graph and replays it; graphs it cannot capture run without
            (``cuda_graph_notes`` says why). The pt2 backend with ``torch_compile`` inductor on a GPU records
            CUDA graphs through ``torch.compile`` (``reduce-overhead``) instead.
        precision: the PyTorch backends' (torchscript, pt2) arithmetic: ``auto`` (on a GPU the card's
            ``torch_gpu_precision``, see :func:`gpu_precision`; fp32 on the CPU), ``fp32``, ``bf16`` or ``fp16``
            (autocast; taken on the CPU too). ONNX Runtime runs graphs at their exported precision: it takes
            ``auto`` or the card's ``precision``, and ``backend="auto"`` with another precision chooses a PyTorch
            backend. Results are uint8 labels and float32 confidence at any precision.
        merge_on_device: slide: sum and reduce the windows' scores where the backend produced them (torch
            tensors), so only labels and confidence come back to the host (None = where the backend holds its
            results on a GPU, i.e. torchscript or pt2 on CUDA; True needs a PyTorch backend; ONNX Runtime's
            windows are merged on the host).
        torch_compile: the pt2 backend's compilation: ``auto`` (``inductor`` on a GPU, ``none`` on the CPU),
            ``none`` (eager), ``inductor`` (``torch.compile``, at load; CUDA graphs with ``cuda_graph``) or
            ``aoti`` (AOTInductor, compiled at the first load and cached); see :mod:`.torch_export`.
    """

    def __init__(self, model_dir: str | Path, backend: str = "auto", device: str = "auto",
                 output_resolution: str = "input", threads: int = 0, inference_mode: str | None = None,
                 theta: float | None = None, c_tau: float | None = None, window_batch: int = 0,
                 io_binding: bool | None = None, spin_wait: bool = False, cuda_graph: bool = False,
                 precision: str = "auto", merge_on_device: bool | None = None, torch_compile: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if torch_compile not in COMPILE_MODES:
            raise ValueError(f"unknown torch_compile {torch_compile!r} (choose from {', '.join(COMPILE_MODES)})")
        self._torch_compile = torch_compile
        parse_device(device)  # ValueError naming the accepted forms
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
        if output_resolution not in OUTPUT_RESOLUTIONS:
            raise ValueError(f"unknown output_resolution {output_resolution!r} "
                             f"(choose from {', '.join(OUTPUT_RESOLUTIONS)})")
        self.card: ModelCard = load_card(model_dir)
        self.output_resolution = output_resolution
        self.mode = inference_mode or self.card.inference_mode
        if self.mode not in self.card.available_modes:
            raise CardError(f"inference mode {self.mode!r} is not offered by model {self.card.name} "
                            f"(it offers: {', '.join(self.card.available_modes)})")
        params = self.card.inference_params
        self.theta = float(params.get("theta", 0.968) if theta is None else theta)
        self.c_tau = float(params.get("c_tau", 0.8) if c_tau is None else c_tau)
        if not (0.0 < self.theta < 1.0 and 0.0 <= self.c_tau <= 1.0):
            raise ValueError(f"theta must lie in (0, 1) and c_tau in [0, 1], got {self.theta}, {self.c_tau}")
        self._theta_input = np.array([self.theta], np.float32)  # the coarse graph's θ input, made once
        if window_batch < 0:
            raise ValueError(f"window_batch must be ≥ 0, got {window_batch}")
        self._windows = [(int(y), int(x)) for y, x in params.get("windows", [])]
        self._window = int(params.get("window", 0))
        self.window_batch = window_batch or max(1, len(self._windows))
        if self.mode == "slide":
            count = np.zeros((self.card.input_height, self.card.input_width), np.float32)
            for y, x in self._windows:
                count[y:y + self._window, x:x + self._window] += 1
            if count.min() == 0:
                raise CardError(f"model {self.card.name}: its slide windows leave pixels of the "
                                f"{self.card.input_height}x{self.card.input_width} frame uncovered")
            self._inverse_count = 1.0 / count
        graphs = MODE_GRAPHS[self.mode]
        self.graph = self.card.graphs[graphs[0]]
        self._gpu_precision, note = gpu_precision(self.card)
        self.backends: dict[str, Backend] = {
            g: self._open_backend(g, backend, device, threads, io_binding, spin_wait, cuda_graph, precision)
            for g in graphs}
        self.backend: Backend = self.backends[graphs[0]]
        # The arithmetic the graphs run at: a PyTorch backend's (autocast or the graph's own), else the card's.
        self.precision: str = getattr(self.backend, "precision", self.card.precision)
        on_gpu_torch = any(isinstance(b, TorchBackend) and b.holds_device_results for b in self.backends.values())
        # Only where the unchecked rule actually chose bf16 autocast on a GPU.
        self.precision_note: str = note if precision == "auto" and on_gpu_torch and self.precision == "bf16" else ""
        descriptions = {g: b.describe() for g, b in self.backends.items()}
        # One line saying which device, GPU, providers and precision were taken (per graph where they differ).
        self.device_report: str = (next(iter(descriptions.values())) if len(set(descriptions.values())) == 1
                                   else "; ".join(f"{g}: {d}" for g, d in descriptions.items()))
        if merge_on_device and not all(isinstance(b, TorchBackend) for b in self.backends.values()):
            raise ValueError("merge_on_device needs the torchscript backend or the pt2 backend (ONNX Runtime's "
                             "windows merge on the host)")
        self.merge_on_device: bool = self.mode == "slide" and (
            all(b.holds_device_results for b in self.backends.values()) if merge_on_device is None
            else bool(merge_on_device))
        self._inverse_count_device: DeviceTensor | None = None  # slide: 1 / overlap count, on the backend's device
        self.windows_total = 0
        self.windows_refined = 0

    def _open_backend(self, graph: str, backend: str, device: str, threads: int,
                      io_binding: bool | None = None, spin_wait: bool = False, cuda_graph: bool = False,
                      precision: str = "auto") -> Backend:
        spec = self.card.graphs[graph]
        onnx_precision = precision in ("auto", self.card.precision)
        if backend == "auto":
            # TorchScript before the torch.export program: it loads in seconds, while the program's default on a
            # GPU compiles at load (minutes for a large model under max-autotune), which a node's start should
            # not pay unasked; a package without TorchScript graphs runs its programs.
            torch_backend = "torchscript" if spec.torchscript or not spec.pt2 else "pt2"
            try:
                import onnxruntime  # noqa: F401
                # Another arithmetic than the exported one is the PyTorch path's (autocast).
                torch_graph = spec.torchscript or spec.pt2
                backend = "onnx" if spec.onnx and (onnx_precision or not torch_graph) else torch_backend
            except ImportError:
                backend = torch_backend
        path = self.card.graph_path(graph, backend)
        if backend == "onnx":
            if not onnx_precision:
                raise ValueError(f"precision {precision!r}: ONNX Runtime runs the graphs at their exported precision "
                                 f"({self.card.precision}); bf16/fp16 arithmetic over an fp32 package is the "
                                 "PyTorch backends' (torchscript, pt2; or export the package with --precision fp16)")
            return OnnxRuntimeBackend(path, [i.name for i in spec.inputs], [o.name for o in spec.outputs],
                                      device=device, threads=threads, checksum=self.card.checksums.get(path.name),
                                      precision=self.card.precision, io_binding=io_binding, spin_wait=spin_wait,
                                      cuda_graph=cuda_graph)
        if backend == "torchscript":
            return TorchScriptBackend(path, device=device, cuda_graph=cuda_graph, precision=precision,
                                      gpu_precision=self._gpu_precision, graph_precision=self.card.precision)
        if backend == "pt2":
            return TorchExportBackend(path, device=device, cuda_graph=cuda_graph, precision=precision,
                                      gpu_precision=self._gpu_precision, graph_precision=self.card.precision,
                                      compile=self._torch_compile, checksum=self.card.checksums.get(path.name))
        raise BackendError(f"unknown backend {backend}")

    @property
    def cuda_graphs(self) -> bool:
        """Some graph of this model replays captured CUDA graphs."""
        return any(b.cuda_graph for b in self.backends.values())

    @property
    def cuda_graph_notes(self) -> dict[str, str]:
        """Per graph, why CUDA graphs were asked for and are not used (empty when they are, or were not asked)."""
        return {g: b.cuda_graph_note for g, b in self.backends.items() if b.cuda_graph_note}

    @property
    def warmup_runs(self) -> int:
        """Runs of a frame size before its timing is steady.

        With CUDA graphs, ONNX Runtime's first run of a shape, its regular runs before capture and the
        capture itself come first.
        """
        return 4 if self.cuda_graphs else 1

    @property
    def network_size(self) -> tuple[int, int]:
        """(height, width) of the graph input."""
        return self.card.input_height, self.card.input_width

    @property
    def resizes_in_graph(self) -> bool:
        """The graph takes frames of any size and returns labels at the frame's size."""
        return self.card.resize == "stretch_in_graph"

    @property
    def batch_size(self) -> int:
        """Frames one inference takes (the graph's fixed batch; 1 for most packages and for slide)."""
        return 1 if self.mode == "slide" else self.graph.inputs[0].shape[0]

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """rgb uint8 H×W×3 → uint8 (h, w, 3) at the network size, in the card's channel order."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 H×W×3 frame, got {rgb.dtype} {rgb.shape}")
        h, w = self.network_size
        if rgb.shape[:2] != (h, w) and not self.resizes_in_graph:
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        if self.card.channel_order == "BGR":
            rgb = rgb[:, :, ::-1]
        return rgb

    def output_size(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the labels for a frame of ``frame_size`` = (height, width)."""
        return frame_size if self.output_resolution == "input" else self.network_size

    def segment(self, rgb: np.ndarray, out: np.ndarray | None = None) -> SegmentResult:
        """Segment one frame: rgb uint8 H×W×3 → labels uint8 at input (or network) resolution.

        ``out``: as for :meth:`segment_batch`, for this frame.
        """
        return self.segment_batch([rgb], None if out is None else [out])[0]

    def segment_batch(self, frames: list[np.ndarray], out: list[np.ndarray | None] | None = None,
                      inputs: list[np.ndarray | None] | None = None) -> list[SegmentResult]:
        """Segment up to ``batch_size`` frames (any sizes) in one inference; timings are the batch's.

        ``out``: per frame, None or a C-contiguous uint8 array of :meth:`output_size` that receives its
        labels (and becomes ``labels`` of its result), e.g. the buffer of the message to be published.
        ``inputs``: per frame, None or its :meth:`preprocess` already done (by a caller that prepares a
        frame where it arrives); ``preprocess`` then times only the batching.
        """
        if not 1 <= len(frames) <= self.batch_size:
            raise ValueError(f"this model takes 1 to {self.batch_size} frames at once, got {len(frames)}")
        for name, given in (("out", out), ("inputs", inputs)):
            if given is not None and len(given) != len(frames):
                raise ValueError(f"{name} holds {len(given)} arrays for {len(frames)} frames")
        if self.resizes_in_graph and len({f.shape for f in frames}) > 1:
            # One tensor per inference: frames of different sizes go one size at a time.
            return [r for i, f in enumerate(frames)
                    for r in self.segment_batch([f], None if out is None else [out[i]],
                                                None if inputs is None else [inputs[i]])]
        t0 = time.perf_counter()
        given = inputs or [None] * len(frames)
        prepared = [self.preprocess(rgb) if x is None else x for rgb, x in zip(frames, given)]
        if self.batch_size == 1:
            batch = np.ascontiguousarray(prepared[0])[None]  # no copy when already contiguous
        else:
            size = frames[0].shape[:2] if self.resizes_in_graph else self.network_size
            batch = np.zeros((self.batch_size, *size, 3), np.uint8)  # unused slots stay black
            for i, x in enumerate(prepared):
                batch[i] = x
        t1 = time.perf_counter()
        refined = [0] * len(frames)
        if self.mode == "whole":
            outputs = self.backend.run([batch])
        elif self.mode == "slide":
            outputs = self._run_slide(batch)
        else:
            outputs, refined[0] = self._run_coarse_to_fine(batch)
        t2 = time.perf_counter()
        results = []
        for i, rgb in enumerate(frames):
            if self.graph.output_kind == "labels_confidence" or self.mode == "slide":
                labels = outputs[0][i].astype(np.uint8, copy=False)
                confidence = outputs[1][i].astype(np.float32, copy=False)
            else:
                labels, confidence = _softmax_max_argmax(outputs[0][i].astype(np.float32, copy=False))
            labels = resize_labels(labels, self.output_size(rgb.shape[:2]), None if out is None else out[i])
            results.append(SegmentResult(labels=labels, timings_ms={}, network_confidence=confidence,
                                         windows_refined=refined[i]))
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
        for r in results:
            r.timings_ms = dict(timings)
        return results

    def _run_slide(self, batch: np.ndarray) -> list[np.ndarray]:
        """One frame (1,H,W,3) at the working size → labels (1,H,W), max softmax (1,H,W).

        The card's windows go through the window graph ``window_batch`` at a time; their scores are
        summed where windows overlap, divided by the overlap count, and reduced by softmax and argmax:
        on the host, or with :attr:`merge_on_device` where the backend left them (:meth:`_run_slide_on_device`).
        """
        if self.merge_on_device:
            return self._run_slide_on_device(batch)
        frame, w = batch[0], self._window
        total = None
        for start in range(0, len(self._windows), self.window_batch):
            corners = self._windows[start:start + self.window_batch]
            (scores,) = self.backend.run([np.stack([frame[y:y + w, x:x + w] for y, x in corners])])
            if total is None:
                total = np.zeros((scores.shape[1], *frame.shape[:2]), np.float32)
            for (y, x), window_scores in zip(corners, scores):
                total[:, y:y + w, x:x + w] += window_scores
        total *= self._inverse_count
        labels, confidence = _softmax_max_argmax(total)
        return [labels[None], confidence[None]]

    def _run_slide_on_device(self, batch: np.ndarray) -> list[np.ndarray]:
        """:meth:`_run_slide` with the frame, windows, score sum and reduction on the PyTorch backend's device.

        The K×C×w×w scores of each run never leave the device (at 2048×1024 a frame's windows hold ~360 MB of
        float32 scores); only uint8 labels (1,H,W) and float32 confidence (1,H,W) come back. The sums run in
        the host merge's order, so the labels equal it exactly and the confidence to float32 rounding of exp.
        """
        backend = self.backend
        torch = backend.torch
        w = self._window
        with torch.inference_mode():
            frame = torch.from_numpy(np.ascontiguousarray(batch[0])).to(backend.device)  # (H,W,3) uint8, one copy
            if self._inverse_count_device is None:
                self._inverse_count_device = torch.from_numpy(self._inverse_count).to(backend.device)
            total = None
            for start in range(0, len(self._windows), self.window_batch):
                corners = self._windows[start:start + self.window_batch]
                windows = torch.stack([frame[y:y + w, x:x + w] for y, x in corners])
                (scores,) = backend.run([windows], keep_on_device=(0,))
                if total is None:
                    total = torch.zeros((scores.shape[1], *frame.shape[:2]), dtype=torch.float32, device=frame.device)
                for (y, x), window_scores in zip(corners, scores):
                    total[:, y:y + w, x:x + w] += window_scores
            total *= self._inverse_count_device
            labels = total.argmax(dim=0)
            top = total.gather(0, labels[None])
            confidence = 1.0 / torch.exp(total - top).sum(dim=0)
            return [labels.to(torch.uint8).cpu().numpy()[None], confidence.float().cpu().numpy()[None]]

    def _run_coarse_to_fine(self, batch: np.ndarray) -> tuple[list[np.ndarray], int]:
        """One frame (1,H,W,3) through the coarse graph and, where it is unsure, the refine graph.

        The coarse graph scores every window on the device; only that short vector comes back
        to pick the windows, which the refine graph then runs as one batch. The coarse logits stay
        on the device (where the backend can keep them) and go from there into the refine graph.
        """
        labels, confidence, coarse, fractions = self.backend.run([batch, self._theta_input], keep_on_device=(2,))
        if self.mode == "coarse":
            return [labels, confidence], 0
        windows = np.flatnonzero(fractions[0] < self.c_tau).astype(np.int64)
        self.windows_total += fractions.shape[-1]
        self.windows_refined += windows.size
        if windows.size == 0:
            return [labels, confidence], 0
        labels, confidence = self.backends["refine"].run([batch, coarse, windows])
        return [labels, confidence], int(windows.size)
