"""Inference in PyTorch, the reference for evaluation and for the exported runtime.

Modes (the ``inference`` section of a training config):

- ``whole``: the frame stretched to the network size, logits resized back.
- ``slide``: windows of ``window`` pixels every ``stride`` over the frame, overlaps averaged.
- ``coarse``: VFMSeg stage 1 alone — the frame resized to a fixed ``coarse_size`` whatever its
  aspect, VFMNet's logits resized back to the frame.
- ``coarse_to_fine``: stage 1, then every slide window whose share of confident pixels (max
  softmax > θ) is below C_τ is run through the backbone and MGRNet with the window's coarse
  logits as context; the other windows keep the coarse logits; overlaps are averaged.

The window loop here is the plain one (one decision and one host sync per window). The
exported graphs compute the same thing with the decisions on the device and the selected
windows in one batch; the tests hold the two to the same labels.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones.lora import merge_lora
from .build import build_model
from .config import InferenceConfig, TrainConfig
from .models.preprocess import normalize

MODES = ("whole", "slide", "coarse", "coarse_to_fine")


def fit_state_to_model(state: dict[str, torch.Tensor], model: nn.Module,
                       trained_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Resample absolute positional embeddings from the training grid to the model's (another input size)."""
    from timm.layers import resample_abs_pos_embed

    own = model.state_dict()
    state = dict(state)
    for key, value in state.items():
        if key.endswith("pos_embed") and key in own and own[key].shape != value.shape:
            vit = model.get_submodule(key.rsplit(".", 1)[0])
            prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
            patch = vit.patch_embed.patch_size
            old = [trained_size[0] // patch[0], trained_size[1] // patch[1]]
            state[key] = resample_abs_pos_embed(value, new_size=list(vit.patch_embed.grid_size), old_size=old,
                                                num_prefix_tokens=prefix, verbose=False)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the configured model: missing {missing[:8]} ({len(missing)}), "
                         f"unexpected {unexpected[:8]} ({len(unexpected)})")
    return state


def model_at_size(cfg: TrainConfig, state: dict[str, torch.Tensor], size: tuple[int, int]) -> nn.Module:
    """The trained model built for inputs of ``size`` (H, W), LoRA merged, in eval mode.

    The ViT's positional embedding is fixed per size (resampled once here), which keeps
    every graph free of runtime interpolation.
    """
    model = build_model(cfg.model, img_size=size, with_lora=True, load_weights=False)
    model.load_state_dict(fit_state_to_model(state, model, tuple(cfg.model.img_size)))
    merge_lora(model)
    return model.eval()


def window_grid(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of slide windows; the last row and column are flush with the border.

    The frame must be at least one window in each direction.
    """
    if height < window or width < window:
        raise ValueError(f"frame {height}x{width} is smaller than the {window}-pixel window")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    ys = [min(i * stride, height - window) for i in range((height - window + stride - 1) // stride + 1)]
    xs = [min(j * stride, width - window) for j in range((width - window + stride - 1) // stride + 1)]
    return [(y, x) for y in ys for x in xs]


def working_size(frame: tuple[int, int], test_size: tuple[int, int], keep_ratio: bool) -> tuple[int, int]:
    """The (H, W) a frame is resized to before inference.

    ``test_size`` itself, or with ``keep_ratio`` the largest size of the frame's aspect inside it
    (long side to long side, as mmseg's keep_ratio), rounded to multiples of 4 for the
    coarse-to-fine window arithmetic.
    """
    if not keep_ratio:
        return int(test_size[0]), int(test_size[1])
    h, w = frame
    scale = min(max(test_size) / max(h, w), min(test_size) / min(h, w))
    return max(4, int(round(h * scale / 4)) * 4), max(4, int(round(w * scale / 4)) * 4)


class Predictor:
    """Predict labels for RGB frames with a trained model in one of :data:`MODES`.

    Args:
        cfg: the training config (model and ``inference`` sections).
        state: trained weights (LoRA unmerged, as training saves them).
        device: torch device to run on.
        mode: overrides ``cfg.inference.mode``.
        **overrides: fields of :class:`InferenceConfig` to override (window, stride, theta, …).
    """

    def __init__(self, cfg: TrainConfig, state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                 mode: str | None = None, **overrides: object) -> None:
        self.cfg = cfg
        self.params: InferenceConfig = replace(cfg.inference, **({"mode": mode} if mode else {}), **overrides)
        if self.params.mode not in MODES:
            raise ValueError(f"unknown inference mode {self.params.mode!r} (known: {', '.join(MODES)})")
        if self.params.mode == "coarse_to_fine" and cfg.model.refine is None:
            raise ValueError("coarse_to_fine needs a model with a refine head (model.refine in the config)")
        self.state = state
        self.device = torch.device(device)
        self._models: dict[tuple[int, int], nn.Module] = {}
        self.windows_total = 0
        self.windows_refined = 0

    def model(self, size: tuple[int, int]) -> nn.Module:
        """The model for inputs of ``size``, built once and cached."""
        size = (int(size[0]), int(size[1]))
        if size not in self._models:
            self._models[size] = model_at_size(self.cfg, self.state, size).to(self.device)
        return self._models[size]

    def _tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """rgb uint8 (H,W,3) → normalised float (1,3,H,W) on the device."""
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None].float()
        return normalize(x, self.cfg.model.mean, self.cfg.model.std)

    @torch.no_grad()
    def logits(self, rgb: np.ndarray) -> torch.Tensor:
        """Logits (1,C,H',W') of rgb uint8 (H,W,3) at the working size (``test_size`` or the frame's)."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 H×W×3 frame, got {rgb.dtype} {rgb.shape}")
        p = self.params
        if p.test_size:
            size = working_size(rgb.shape[:2], tuple(p.test_size), p.keep_ratio)
            if size != tuple(rgb.shape[:2]):
                rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        size = rgb.shape[:2]
        if p.mode == "whole":
            net = tuple(self.cfg.model.img_size)
            small = cv2.resize(rgb, (net[1], net[0]), interpolation=cv2.INTER_LINEAR) if size != net else rgb
            return _resize(self.model(net)(self._tensor(small)), size)
        x = self._tensor(rgb)
        if p.mode == "slide":
            return self._slide(x)
        coarse = self.model(tuple(p.coarse_size)).coarse(_resize(x, tuple(p.coarse_size)))
        if p.mode == "coarse":
            return _resize(coarse, size)
        return self._coarse_to_fine(x, coarse)

    def _slide(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        model = self.model((p.window, p.window))
        height, width = x.shape[-2:]
        total = torch.zeros(1, self.cfg.model.num_classes, height, width, device=x.device)
        count = torch.zeros(1, 1, height, width, device=x.device)
        for y, xx in window_grid(height, width, p.window, p.stride):
            crop = x[..., y:y + p.window, xx:xx + p.window]
            total[..., y:y + p.window, xx:xx + p.window] += _resize(model(crop), (p.window, p.window))
            count[..., y:y + p.window, xx:xx + p.window] += 1
        return total / count

    def _coarse_to_fine(self, x: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """x (1,3,H,W) normalised, coarse stage-1 logits (1,C,h,w) → averaged logits (1,C,H,W)."""
        p = self.params
        height, width = x.shape[-2:]
        if height % 4 or width % 4 or p.window % 4:
            raise ValueError(f"coarse_to_fine needs the frame ({height}x{width}) and window ({p.window}) "
                             "to be multiples of 4")
        full = _resize(coarse, (height, width))
        # The window's context: its crop of the coarse logits at a quarter of the frame's size,
        # which is the 4× feature grid MGRNet embeds (128² for a 512 window at patch 16).
        quarter = _resize(coarse, (height // 4, width // 4))
        confident = torch.softmax(full, dim=1).amax(dim=1) > p.theta
        model = self.model((p.window, p.window))
        total = torch.zeros_like(full)
        count = torch.zeros(1, 1, height, width, device=x.device)
        w, q = p.window, p.window // 4
        for y, xx in window_grid(height, width, w, p.stride):
            self.windows_total += 1
            fraction = float(confident[:, y:y + w, xx:xx + w].float().mean())
            if fraction < p.c_tau:
                self.windows_refined += 1
                context = quarter[..., y // 4:y // 4 + q, xx // 4:xx // 4 + q]
                window_logits = _resize(model.refine(x[..., y:y + w, xx:xx + w], context), (w, w))
            else:
                window_logits = full[..., y:y + w, xx:xx + w]
            total[..., y:y + w, xx:xx + w] += window_logits
            count[..., y:y + w, xx:xx + w] += 1
        return total / count

    @torch.no_grad()
    def predict(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rgb uint8 (H,W,3) → labels uint8 (H,W) and max softmax float32 (H,W) at the frame's size."""
        logits = _resize(self.logits(rgb), rgb.shape[:2])
        confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
        return labels[0].to(torch.uint8).cpu().numpy(), confidence[0].float().cpu().numpy()

    __call__ = predict


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N,C,h,w) to ``size`` (H, W); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
