r"""Offline DINOv2 patch-14 → patch-16 conversion (the VFMSeg / Rein 512-crop setting).

Reads Meta's original checkpoint (e.g. ``dinov2_vitl14_pretrain.pth``) or a timm-format DINOv2
checkpoint and writes a timm-format safetensors file for the same ViT built with a new patch
size at a new image size:

* the patch-embedding kernel is resized by plain bicubic interpolation (14×14 → 16×16,
  align_corners=False), as the official tools do. This does not preserve the projection of a
  patch exactly; it is the published behaviour the reference results were obtained with.
* the positional-embedding grid is resized bicubically (37×37 → 32×32 at 512), the
  class-token entry kept as is.

Key names are mapped to timm's by timm's own DINOv2 filter (it drops ``mask_token`` and renames
the giant model's SwiGLU ``w12``/``w3``). The catalog entry ``dinov2_l16`` then loads the file
with no runtime resampling.

Usage::

    python -m training.backbones.convert --src dinov2_vitl14_pretrain.pth \
        --dst dinov2_vitl16_512.safetensors [--patch 16] [--img 512]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn

from ..checkpoint import load_state_dict_file
from .vit import StateDict, describe_mismatch

KERNEL_KEY = "patch_embed.proj.weight"
POS_KEY = "pos_embed"


def resize_patch_kernel(weight: torch.Tensor, patch: int) -> torch.Tensor:
    """Resize a patch-embedding kernel (D,C,p,p) → (D,C,patch,patch), bicubic, align_corners=False (fp32)."""
    return F.interpolate(weight.float(), size=(patch, patch), mode="bicubic", align_corners=False)


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Resize a positional embedding (1, prefix + g·g, D) → (1, prefix + gh·gw, D) on its square grid.

    The ``num_prefix`` leading entries (the class token's) are kept unchanged; the grid is resized
    bicubically with align_corners=False and no antialiasing, as the official tools do.
    """
    prefix, tokens = pos[:, :num_prefix], pos[:, num_prefix:].float()
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"pos_embed holds {tokens.shape[1]} grid tokens after {num_prefix} prefix, not a square grid")
    dim = tokens.shape[2]
    spatial = tokens.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([prefix.float(), spatial.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)], dim=1)


def _target_model(state: StateDict, patch: int, img: tuple[int, int]) -> torch.nn.Module:
    """A meta-device timm DINOv2 shaped like ``state`` with the new patch and image size (no memory)."""
    embed_dim = state[KERNEL_KEY].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    swiglu = "blocks.0.mlp.w12.weight" in state  # ViT-g: Meta's fused SwiGLU
    hidden = state["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    # Heads do not change any tensor shape; DINOv2 uses 64-dim heads.
    heads = embed_dim // 64 if embed_dim % 64 == 0 else 1
    name = "vit_giant_patch14_dinov2" if swiglu else "vit_large_patch14_dinov2"
    # timm sizes the MLP as int(embed_dim * mlp_ratio); half a unit keeps float error from rounding it down.
    ratio = (hidden + 0.5) / embed_dim
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0, img_size=img, patch_size=patch,
                                 embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=ratio)


def convert_dinov2(state: StateDict, patch: int = 16, img: int | tuple[int, int] = 512) -> tuple[StateDict, list[str]]:
    """Convert a DINOv2 state dict (Meta or timm layout) to timm layout at ``patch`` and ``img``.

    Args:
        state: keys as in ``dinov2_vit*14_pretrain.pth`` (``patch_embed.proj.weight`` (D,3,14,14),
            ``pos_embed`` (1,1+37·37,D), ``cls_token``, ``mask_token``, ``blocks.i.*``, ``norm.*``) or timm's.
        patch: new patch size.
        img: new image size, int or (H, W); the grid is (H/patch, W/patch).

    Returns:
        (timm-format state dict whose shapes fit the patch/img model exactly, lines saying what changed).

    Raises:
        ValueError: not a DINOv2 checkpoint (or one with registers), or img not a multiple of patch.
    """
    img_hw = (img, img) if isinstance(img, int) else tuple(img)
    if any(s % patch for s in img_hw):
        raise ValueError(f"image size {img_hw} is not a multiple of patch {patch}")
    if KERNEL_KEY not in state or POS_KEY not in state or "cls_token" not in state:
        raise ValueError(f"not a DINOv2 checkpoint: needs {KERNEL_KEY}, {POS_KEY} and cls_token")
    if "register_tokens" in state or "reg_token" in state:
        raise ValueError("DINOv2 with registers is not supported by this conversion")
    grid = (img_hw[0] // patch, img_hw[1] // patch)
    state = dict(state)
    report = []
    kernel = state[KERNEL_KEY]
    if tuple(kernel.shape[-2:]) != (patch, patch):
        state[KERNEL_KEY] = resize_patch_kernel(kernel, patch).to(kernel.dtype)
        report.append(f"{KERNEL_KEY}: {tuple(kernel.shape)} -> {tuple(state[KERNEL_KEY].shape)} "
                      "(bicubic, align_corners=False)")
    pos = state[POS_KEY]
    old_side = math.isqrt(pos.shape[1] - 1)
    if (old_side, old_side) != grid or pos.shape[1] != 1 + old_side * old_side:
        state[POS_KEY] = resize_pos_embed(pos, grid).to(pos.dtype)
        report.append(f"{POS_KEY}: grid {old_side}x{old_side} -> {grid[0]}x{grid[1]}, {tuple(pos.shape)} -> "
                      f"{tuple(state[POS_KEY].shape)} (bicubic, class-token entry kept)")
    resized = {k: state[k] for k in (KERNEL_KEY, POS_KEY)}
    model = _target_model(state, patch, img_hw)
    source_keys = set(state)
    # timm's filter does the Meta → timm renaming; the shapes already fit, so it resamples nothing.
    out = checkpoint_filter_fn(state, model)
    for key, value in resized.items():
        if out[key] is not value:  # identity, not values: also holds for meta tensors
            raise RuntimeError(f"timm's filter changed {key} after conversion; refusing to write it")
    problem = describe_mismatch(model.state_dict(), out)
    if problem:
        raise ValueError(f"converted checkpoint does not fit a timm DINOv2 at patch {patch}, image {img_hw}: {problem}")
    renamed = {k for k in source_keys if re.fullmatch(r"blocks\.\d+\.mlp\.w(12|3)\.(weight|bias)", k)}
    if renamed:
        report.append(f"renamed {len(renamed)} SwiGLU keys mlp.w12/w3 -> mlp.fc1/fc2")
    dropped = sorted(source_keys - set(out) - renamed)
    if dropped:
        report.append(f"dropped (not in the timm model): {', '.join(dropped)}")
    return {k: v.contiguous() for k, v in out.items()}, report


def convert_file(src: str | Path, dst: str | Path, patch: int = 16, img: int = 512) -> list[str]:
    """Convert the checkpoint at ``src`` and write ``dst`` (.safetensors); returns what changed.

    Raises:
        FileNotFoundError: ``src`` is missing.
        FileExistsError: ``dst`` exists (never overwritten).
        ValueError: ``src`` unreadable or not a DINOv2 checkpoint, or ``dst`` not .safetensors.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"--dst must be a .safetensors file, got {dst}")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; not overwriting it")
    state, report = convert_dinov2(load_state_dict_file(src), patch, img)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted run leaves no half-written weights.
    partial = dst.with_name(dst.name + ".partial")
    save_file(state, str(partial), metadata={"source": src.name, "patch_size": str(patch), "img_size": str(img),
                                             "layout": "timm"})
    os.replace(partial, dst)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: convert, print what was resized; exit 1 with a message on any refusal."""
    parser = argparse.ArgumentParser(prog="python -m training.backbones.convert",
                                     description="DINOv2 patch-14 checkpoint → timm safetensors at a new patch size")
    parser.add_argument("--src", required=True, help="Meta or timm DINOv2 checkpoint (.pth/.pt/.safetensors)")
    parser.add_argument("--dst", required=True, help="output .safetensors (must not exist)")
    parser.add_argument("--patch", type=int, default=16, help="new patch size (default 16)")
    parser.add_argument("--img", type=int, default=512, help="square image size of the new model (default 512)")
    args = parser.parse_args(argv)
    try:
        report = convert_file(args.src, args.dst, args.patch, args.img)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in report or ["nothing resized: the checkpoint already fits"]:
        print(line)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
