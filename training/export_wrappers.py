"""Export wrappers: the graph the runtime runs, around an eager model.

They move the runtime's per-frame work into the graph (uint8 NHWC in,
normalisation, upsampling, softmax, argmax), so only uint8 labels and a
confidence map leave the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models.portable import arange_like
from .models.preprocess import Normalize


def labels_and_confidence(logits: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores (N,C,H,W) → labels uint8 (N,H,W) and max softmax float32 (N,H,W).

    The max softmax is 1 / Σ exp(l − max), with the argmax taken on the scores themselves: no softmax
    tensor over the channel axis, which ONNX Runtime computes by transposing the whole map twice
    (at 512×1024, 151 ms of softmax + max against 14 ms for this form on a 2-core CPU).

    ``overwrite``: the scores are the caller's temporary and may be overwritten (l − max, then its exp,
    in place). The same operations on the same values, so the same results; eager PyTorch and
    TorchScript then allocate no second and third N×C×H×W tensor (at 19×1024×2048 float32, 160 MB each,
    whose fresh pages cost the CPU more than the arithmetic). The exported ONNX and torch.export graphs
    are functional either way.
    """
    top, labels = logits.max(dim=1)
    shifted = logits.sub_(top[:, None]).exp_() if overwrite else torch.exp(logits - top[:, None])
    confidence = 1.0 / shifted.sum(dim=1)
    return labels.to(torch.uint8), confidence


class SegmentationGraph(nn.Module):
    """uint8 (N,H,W,3) RGB → labels uint8 (N,H,W) + max-softmax float32 (N,H,W), or logits (N,C,H,W).

    With ``network_size`` the graph takes frames of any size and does the resize itself: the frame
    is stretched to the network size (bilinear) and the labels come back at the frame's size
    (nearest) while the confidence stays at the network size (h, w), so only uint8 labels at full
    resolution leave the device and the host does no image work.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 output_kind: str = "labels_confidence", network_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if output_kind not in ("labels_confidence", "logits"):
            raise ValueError(f"unknown output kind {output_kind!r}")
        if network_size is not None and output_kind != "labels_confidence":
            raise ValueError("a graph that resizes frames itself outputs labels and confidence")
        self.model = model
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = Normalize(self.mean, self.std)
        self.output_kind = output_kind
        self.network_size = None if network_size is None else (int(network_size[0]), int(network_size[1]))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image.permute(0, 3, 1, 2).float()
        if self.network_size is not None:
            # Resize first: normalising is then done on the network's pixels, not the camera's.
            x = F.interpolate(x, size=self.network_size, mode="bilinear", align_corners=False)
        x = self.normalize(x)
        logits = self.model(x)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.output_kind == "logits":
            return (logits,)
        labels, confidence = labels_and_confidence(logits)
        if self.network_size is not None:
            labels = _nearest_upsample(labels, image.shape[1], image.shape[2])
        return labels, confidence


def _nearest_upsample(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (N,h,w) → (N,height,width) by nearest neighbour (PyTorch's rule: source = ⌊dst · h / height⌋).

    Gathering rows and columns of the uint8 map costs a fraction of interpolating it as floats. The
    gathers are ``index_select`` (ONNX Gather): ONNX Runtime's CUDA provider has no uint8 GatherND, which
    indexing with a tensor exports to, and would run it on the CPU with copies around it.
    """
    h, w = labels.shape[-2:]
    rows = torch.div(arange_like(labels, height) * h, height, rounding_mode="floor")
    cols = torch.div(arange_like(labels, width) * w, width, rounding_mode="floor")
    return labels.index_select(1, rows).index_select(2, cols)


def _window_tables(windows: list[tuple[int, int]], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets of every window as int64 (nwin, window) tables."""
    span = torch.arange(window, dtype=torch.int64)
    ys = torch.tensor([y for y, _ in windows], dtype=torch.int64)[:, None] + span
    xs = torch.tensor([x for _, x in windows], dtype=torch.int64)[:, None] + span
    return ys, xs


class CoarseGraph(nn.Module):
    """VFMSeg stage 1 for the runtime, with the window gate computed in the graph.

    uint8 (1,H,W,3) RGB frame at the working size and θ float32 (1,) →
    labels uint8 (1,H,W), max softmax float32 (1,H,W), stage-1 logits (1,C,h,w) and each
    window's share of pixels with max softmax > θ, float32 (1,nwin).

    :class:`CoarseGraphReference` is the plain form. Here the frame is normalised after the resize
    to the coarse size (both are linear per channel, so equal up to float rounding, on a quarter of
    the pixels at the paper's sizes) and the full-size logits are reduced in place. The upsample,
    labels, confidence and window shares are the reference's operations on the same values.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 coarse_size: tuple[int, int], windows: list[tuple[int, int]], window: int) -> None:
        super().__init__()
        self.model = model
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = Normalize(self.mean, self.std)
        self.coarse_size = tuple(coarse_size)
        self.windows = [tuple(w) for w in windows]
        self.window = window

    def forward(self, image: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        height, width = image.shape[1], image.shape[2]
        x = image.permute(0, 3, 1, 2).float()
        # Resize first: the normalisation then runs on the coarse size's pixels, not the frame's.
        x = self.normalize(F.interpolate(x, size=self.coarse_size, mode="bilinear", align_corners=False))
        coarse = self.model.coarse(x)
        full = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        # ``full`` is this graph's own: reduced in place, no second and third C×H×W tensor.
        labels, confidence = labels_and_confidence(full, overwrite=True)
        confident = (confidence > theta).float()
        w = self.window
        # A fixed, small set of windows: unrolled slices keep the graph free of loops. (Prefix sums over
        # the bands between window edges read the frame once instead of 2.25 times at 1024×2048, but
        # took as long on the CPU and as many kernels on a GPU.)
        fractions = torch.stack([confident[:, y:y + w, x:x + w].mean(dim=(1, 2)) for y, x in self.windows], dim=1)
        return labels, confidence, coarse, fractions


class CoarseGraphReference(nn.Module):
    """:class:`CoarseGraph` computed plainly, with the same inputs and outputs; the fast graph is tested against it.

    The frame is normalised at full size, then resized to the coarse size; the full-size logits are
    reduced out of place; each window's share of confident pixels is the mean of its slice.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 coarse_size: tuple[int, int], windows: list[tuple[int, int]], window: int) -> None:
        super().__init__()
        self.model = model
        self.normalize = Normalize(tuple(mean), tuple(std))
        self.coarse_size = tuple(coarse_size)
        self.windows = [tuple(w) for w in windows]
        self.window = window

    def forward(self, image: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.normalize(image.permute(0, 3, 1, 2).float())
        size = x.shape[-2:]
        coarse = self.model.coarse(F.interpolate(x, size=self.coarse_size, mode="bilinear", align_corners=False))
        full = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        labels, confidence = labels_and_confidence(full)
        confident = (confidence > theta).float()
        w = self.window
        fractions = torch.stack([confident[:, y:y + w, x:x + w].mean(dim=(1, 2)) for y, x in self.windows], dim=1)
        return labels, confidence, coarse, fractions


def disjoint_groups(windows: list[tuple[int, int]], window: int) -> list[int]:
    """A group per window such that windows of one group never overlap (greedy colouring, in order)."""
    groups: list[int] = []
    for i, (y, x) in enumerate(windows):
        taken = {groups[j] for j, (yy, xx) in enumerate(windows[:i]) if abs(y - yy) < window and abs(x - xx) < window}
        groups.append(min(set(range(len(windows))) - taken))
    return groups


class RefineGraph(nn.Module):
    """VFMSeg stage 2 for the runtime: the selected windows through backbone + MGRNet in one batch.

    uint8 (1,H,W,3) frame, stage-1 logits (1,C,h,w) from :class:`CoarseGraph` and the indices
    of the windows to refine, int64 (K,) with K ≥ 1 → labels uint8 (1,H,W) and max softmax
    float32 (1,H,W) of the overlap-averaged logits, where an unrefined window contributes
    the coarse logits.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 frame_size: tuple[int, int], windows: list[tuple[int, int]], window: int) -> None:
        super().__init__()
        self.model = model
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = Normalize(self.mean, self.std)
        self.frame_size = tuple(frame_size)
        self.window = window
        rows, cols = _window_tables(windows, window)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        qrows, qcols = _window_tables([(y // 4, x // 4) for y, x in windows], window // 4)
        self.register_buffer("qrows", qrows, persistent=False)
        self.register_buffer("qcols", qcols, persistent=False)
        count = torch.zeros(1, 1, *frame_size)
        for y, x in windows:
            count[..., y:y + window, x:x + window] += 1
        self.register_buffer("count", count, persistent=False)
        groups = disjoint_groups(windows, window)
        self.num_groups = max(groups) + 1
        self.register_buffer("groups", torch.tensor(groups, dtype=torch.int64), persistent=False)

    def forward(self, image: torch.Tensor, coarse: torch.Tensor,
                windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return labels_and_confidence(self.logits(image, coarse, windows), overwrite=True)

    def logits(self, image: torch.Tensor, coarse: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Return what :meth:`forward` reduces to labels: the overlap-averaged logits, shape (1,C,H,W)."""
        height, width = self.frame_size
        x = self.normalize(image.permute(0, 3, 1, 2).float())[0]  # (3,H,W)
        full = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
        quarter = F.interpolate(coarse, size=(height // 4, width // 4), mode="bilinear", align_corners=False)[0]
        rows, cols = self.rows[windows], self.cols[windows]  # (K, w)
        qrows, qcols = self.qrows[windows], self.qcols[windows]
        # Gather the K windows by index: (C, K, w, w) → (K, C, w, w).
        crops = x[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
        context = quarter[:, qrows[:, :, None], qcols[:, None, :]].permute(1, 0, 2, 3)
        base = full[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
        refined = F.interpolate(self.model.refine(crops, context), size=(self.window, self.window),
                                mode="bilinear", align_corners=False)
        # Average over overlaps: coarse everywhere, plus each refined window's change. Each window's change
        # goes to the canvas of its group of mutually disjoint windows, so no scatter index repeats
        # (ONNX Runtime's multithreaded ScatterND(add) loses updates to repeated indices); the group
        # canvases are then summed.
        channels, pixels = full.shape[0], height * width
        delta = (refined - base).permute(1, 0, 2, 3).reshape(channels, -1)
        flat = rows[:, :, None] * width + cols[:, None, :]  # (K, w, w)
        target = (self.groups[windows][:, None, None] * pixels + flat).reshape(-1)
        canvas = full.new_zeros(channels, self.num_groups * pixels)
        change = canvas.index_add(1, target, delta).reshape(channels, self.num_groups, pixels).sum(dim=1)
        return full[None] + change.reshape(1, *full.shape) / self.count


class ConstantText(nn.Module):
    """A text encoder's output held as a constant (K, E).

    MFuser's class embeddings come from the frozen text tower and the learned prompt context, never
    from the image: an exported graph embeds the result instead of the text tower (≈ 124M weights).
    """

    def __init__(self, text: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("text", text.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.text


def with_constant_text(model: nn.Module) -> nn.Module:
    """Replace ``model.text_encoder`` (MFuser) by its output, computed once; other models pass through."""
    encoder = getattr(model, "text_encoder", None)
    if encoder is not None and not isinstance(encoder, ConstantText):
        with torch.no_grad():
            model.text_encoder = ConstantText(encoder())
    return model


class ConstantQueries(nn.Module):
    """A Rein/DepthForge model whose decoder queries are held as a constant (Q, C).

    The queries are a function of the learned tokens only, so the graph carries their value instead of the
    token-to-query layers; forward(x) is the model's forward with these queries.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.register_buffer("queries", model.queries().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised → the model's scores."""
        return self.model(x, queries=self.queries)


def with_constants(model: nn.Module) -> nn.Module:
    """Every image-independent input of ``model`` computed once: MFuser's text, Rein's and DepthForge's queries."""
    model = with_constant_text(model)
    if callable(getattr(model, "queries", None)) and not isinstance(model, ConstantQueries):
        model = ConstantQueries(model)
    return model


class HalfPrecision(nn.Module):
    """A model whose weights and arithmetic are fp16 behind float32 inputs and outputs.

    The graphs around it keep the uint8 → float32 normalisation and the softmax / argmax in float32:
    normalised pixels and the confidence lose nothing to fp16's 11-bit mantissa, and the runtime sees
    the same tensor types as from an fp32 package. ``coarse`` and ``refine`` (VFMNet + MGRNet) are
    wrapped the same way as ``forward``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    @staticmethod
    def _to(value: object, dtype: torch.dtype) -> object:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(HalfPrecision._to(v, dtype) for v in value)
        return value

    def _call(self, fn: object, *args: torch.Tensor) -> object:
        return self._to(fn(*self._to(args, torch.float16)), torch.float32)

    def forward(self, x: torch.Tensor) -> object:
        """(N, 3, H, W) float32 → the model's outputs in float32."""
        return self._call(self.model, x)

    def coarse(self, x: torch.Tensor) -> torch.Tensor:
        """VFMNet's stage 1 in fp16: (N, 3, H, W) → (N, C, h, w) float32."""
        return self._call(self.model.coarse, x)

    def refine(self, crops: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """MGRNet's stage 2 in fp16: crops (K, 3, w, w), context (K, C, w/4, w/4) → (K, C, ·, ·) float32."""
        return self._call(self.model.refine, crops, context)


class WindowGraph(nn.Module):
    """Slide inference's window graph: uint8 (K,w,w,3) RGB windows → class scores float32 (K,C,w,w).

    K is free (the runtime batches as many windows of a frame as it likes); the scores are the
    model's output resized bilinearly to the window, which the runtime averages over overlapping
    windows before the softmax and argmax (mmseg's slide inference).
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = Normalize(self.mean, self.std)

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.normalize(windows.permute(0, 3, 1, 2).float())
        scores = self.model(x)
        return (F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False),)


class SlideGraph(nn.Module):
    """Slide inference in one graph: uint8 frame (1,H,W,3) → labels (1,H,W), max softmax float32 (1,H,W).

    The frame comes at the working size. The windows (a constant table) are cut in the graph and run
    ``chunk`` at a time (fewer bound the device memory; the chunks share the weights); their scores
    are averaged where windows overlap and reduced to labels, so neither the windows' scores
    (K×C×w×w floats) nor the frame's logits leave the device.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 frame_size: tuple[int, int], windows: list[tuple[int, int]], window: int, chunk: int = 0) -> None:
        super().__init__()
        self.model = model
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = Normalize(self.mean, self.std)
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.windows = [(int(y), int(x)) for y, x in windows]
        self.window = int(window)
        self.chunk = int(chunk) if chunk > 0 else len(self.windows)
        self.cells = _overlap_cells(self.frame_size, self.windows, self.window)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return labels_and_confidence(self.logits(image))

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Return what :meth:`forward` reduces to labels: the overlap-averaged scores, shape (1,C,H,W)."""
        w = self.window
        x = self.normalize(image.permute(0, 3, 1, 2).float())
        # A fixed, small set of windows: unrolled slices keep the graph free of loops and scatters.
        crops = torch.cat([x[:, :, y:y + w, c:c + w] for y, c in self.windows])
        scores = torch.cat([F.interpolate(self.model(crops[s:s + self.chunk]), size=(w, w), mode="bilinear",
                                          align_corners=False)
                            for s in range(0, len(self.windows), self.chunk)])
        # The frame is tiled by cells that lie inside the same windows; each is the mean of those windows'
        # slices, and the cells are concatenated: every output pixel is written once (a scatter-add of
        # whole windows makes ONNX Runtime copy and transpose the full frame once per window).
        rows = []
        for (y0, y1), row in self.cells:
            cells = []
            for (x0, x1), cover in row:
                part = sum(scores[i:i + 1, :, y0 - y:y1 - y, x0 - c:x1 - c] for i, y, c in cover)
                cells.append(part * (1.0 / len(cover)))
            rows.append(torch.cat(cells, dim=3))
        return torch.cat(rows, dim=2)


Cover = list[tuple[int, int, int]]  # the windows (index, top, left) containing a cell


def _overlap_cells(frame_size: tuple[int, int], windows: list[tuple[int, int]],
                   window: int) -> list[tuple[tuple[int, int], list[tuple[tuple[int, int], Cover]]]]:
    """The frame cut at every window edge: rows [y0, y1) of cells [x0, x1), each with its covering windows.

    A cell's windows are listed as (index, top, left).

    Raises:
        ValueError: a cell no window covers.
    """
    height, width = frame_size
    ys = sorted({0, height} | {y for y, _ in windows} | {y + window for y, _ in windows})
    xs = sorted({0, width} | {x for _, x in windows} | {x + window for _, x in windows})
    if ys[-1] > height or xs[-1] > width:
        raise ValueError(f"a window reaches past the {frame_size} frame")
    plan = []
    for y0, y1 in zip(ys, ys[1:]):
        row = []
        for x0, x1 in zip(xs, xs[1:]):
            cover = [(i, y, x) for i, (y, x) in enumerate(windows)
                     if y <= y0 and y1 <= y + window and x <= x0 and x1 <= x + window]
            if not cover:
                raise ValueError(f"the windows leave pixels of the {frame_size} frame uncovered "
                                 f"(rows {y0}–{y1}, columns {x0}–{x1})")
            row.append(((x0, x1), cover))
        plan.append(((y0, y1), row))
    return plan
