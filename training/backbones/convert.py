r"""Offline DINOv2 patch-14 → patch-16 conversion (the VFMSeg / Rein / DepthForge 512-crop setting).

Reads a DINOv2-shaped ViT encoder and writes a timm-format safetensors file for the same ViT
built with a new patch size at a new image size. The layout of the source is auto-detected:

* Meta's original DINOv2 checkpoint (e.g. ``dinov2_vitl14_pretrain.pth``) or a timm-format one;
* the Depth Anything V2 release (``depth_anything_v2_vitl.pth``): the same DINOv2 encoder under
  ``pretrained.``; its DPT depth head (``depth_head.*``) is dropped;
* Hugging Face transformers: ``Dinov2Model`` / ``Dinov2Backbone`` keys, bare or under a prefix
  (``backbone.`` in ``DepthAnythingForDepthEstimation``, e.g. Depth-Anything-V2-Large-hf), with
  either the checkpoint names (``attention.attention.query``) or transformers 5 module names
  (``attention.q_proj``); separate q/k/v are fused into ``attn.qkv``, ``neck.*`` / ``head.*`` dropped.

Every layout is first brought to Meta's DINOv2 keys (``encoder_state``), then converted:

* the patch-embedding kernel is resized by plain bicubic interpolation (14×14 → 16×16,
  align_corners=False), as the official tools do. This does not preserve the projection of a
  patch exactly; it is the published behaviour the reference results were obtained with.
* the positional-embedding grid is resized bicubically (37×37 → 32×32 at 512), the
  class-token entry kept as is.

Key names are mapped to timm's by timm's own DINOv2 filter (it drops ``mask_token`` and renames
the giant model's SwiGLU ``w12``/``w3``). The catalog entries ``dinov2_l16`` and
``depth_anything_v2_l16`` then load the file with no runtime resampling.

Usage::

    python -m training.backbones.convert --src dinov2_vitl14_pretrain.pth \
        --dst dinov2_vitl16_512.safetensors [--patch 16] [--img 512]
    python -m training.backbones.convert --src depth_anything_v2_vitl.pth \
        --dst depth_anything_v2_vitl16_512.safetensors
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

from ..checkpoint import load_state_dict_file, run_conversion
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


# Hugging Face transformers' Dinov2 layout, relative to the model (bare Dinov2Model / Dinov2Backbone).
HF_KERNEL_KEY = "embeddings.patch_embeddings.projection.weight"
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.register_tokens": "register_tokens", "embeddings.position_embeddings": POS_KEY,
           HF_KERNEL_KEY: KERNEL_KEY, "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)")
# Block modules renamed one to one. Both the names stored in checkpoints and those of transformers 5 modules
# appear (transformers 5 renames the former on load), so both are accepted.
_HF_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
             "mlp.down_proj": "mlp.w3"}
_HF_LAYER_SCALE = {"layer_scale1": "ls1.gamma", "layer_scale2": "ls2.gamma"}
# Block modules that are pieces of one fused Meta/timm projection: (target, position, pieces). Meta's qkv stacks
# q, k, v along the output rows; its fused SwiGLU w12 stacks the gate (SiLU input) then the up projection.
_HF_PIECES = {"attention.attention.query": ("attn.qkv", 0, 3), "attention.attention.key": ("attn.qkv", 1, 3),
              "attention.attention.value": ("attn.qkv", 2, 3), "attention.q_proj": ("attn.qkv", 0, 3),
              "attention.k_proj": ("attn.qkv", 1, 3), "attention.v_proj": ("attn.qkv", 2, 3),
              "mlp.gate_proj": ("mlp.w12", 0, 2), "mlp.up_proj": ("mlp.w12", 1, 2)}

EXPECTED_LAYOUTS = (f"a DINOv2 ViT encoder: Meta/timm keys ({KERNEL_KEY}, {POS_KEY}, cls_token, blocks.N.*), "
                    f"optionally under a prefix such as 'pretrained.' (the Depth Anything V2 release, "
                    f"depth_anything_v2_vit*.pth), or Hugging Face transformers Dinov2 keys ({HF_KERNEL_KEY}, "
                    f"encoder.layer.N.*, layernorm.*), bare or under a prefix such as 'backbone.' "
                    f"(DepthAnythingForDepthEstimation, Depth-Anything-V2-*-hf)")


def _prefixes(state: StateDict, anchor: str) -> list[str]:
    """Every prefix P such that ``P + anchor`` is a key of ``state``."""
    return sorted(k[:len(k) - len(anchor)] for k in state if k == anchor or k.endswith("." + anchor))


def _hf_to_meta(state: StateDict, prefix: str) -> StateDict:
    """Rename a Hugging Face Dinov2 state dict (``prefix`` stripped) to Meta's keys, fusing split projections."""
    where = f"Hugging Face Dinov2 encoder under {prefix!r}" if prefix else "Hugging Face Dinov2 encoder"
    out: StateDict = {}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    unknown = []
    for key, value in state.items():
        match = _HF_LAYER.fullmatch(key)
        if key in _HF_TOP:
            target = _HF_TOP[key]
        elif match is None:
            unknown.append(prefix + key)
            continue
        else:
            index, module, param = match.groups()
            if param == "lambda1":
                if module not in _HF_LAYER_SCALE:
                    unknown.append(prefix + key)
                    continue
                target = f"blocks.{index}.{_HF_LAYER_SCALE[module]}"
            elif module in _HF_BLOCK:
                target = f"blocks.{index}.{_HF_BLOCK[module]}.{param}"
            elif module in _HF_PIECES:
                fused, position, needed = _HF_PIECES[module]
                target = f"blocks.{index}.{fused}.{param}"
                if position in pieces.setdefault(target, {}):
                    raise ValueError(f"{where}: two sources for piece {position} of {target} (mixed naming?)")
                pieces[target][position] = value
                counts[target] = needed
                continue
            else:
                unknown.append(prefix + key)
                continue
        if target in out:
            raise ValueError(f"{where}: two keys map to {target} (mixed naming?)")
        out[target] = value
    if unknown:
        listed = ", ".join(sorted(unknown)[:8]) + (f", … {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise ValueError(f"{where}: keys not in a Dinov2 encoder: {listed}")
    for target, parts in pieces.items():
        if len(parts) != counts[target]:
            raise ValueError(f"{where}: {target} needs {counts[target]} pieces, found {sorted(parts)}")
        out[target] = torch.cat([parts[i] for i in range(counts[target])], dim=0)
    return out


def _describe_layout(hf: bool, prefix: str, state: StateDict) -> str:
    where = f"under {prefix!r}" if prefix else "bare"
    if not hf:
        if prefix == "pretrained.":
            return "layout: Depth Anything V2 release (Meta DINOv2 encoder under 'pretrained.')"
        return f"layout: DINOv2, Meta/timm keys ({where})"
    names = ("transformers 5 module names" if any(".attention.q_proj." in k for k in state)
             else "checkpoint names")
    owner = " (DepthAnythingForDepthEstimation)" if prefix == "backbone." else ""
    return f"layout: Hugging Face transformers Dinov2 {where}{owner}, {names}; q/k/v fused into attn.qkv"


def encoder_state(state: StateDict) -> tuple[StateDict, list[str]]:
    """Find the DINOv2-shaped encoder in ``state`` and return it with Meta's DINOv2 keys.

    Accepts Meta/timm DINOv2 keys, the Depth Anything V2 release (encoder under ``pretrained.``,
    ``depth_head.*`` beside it) and Hugging Face transformers Dinov2 keys, bare or under a prefix
    (``backbone.`` in DepthAnythingForDepthEstimation, ``neck.*``/``head.*`` beside it). Values are not
    changed, except that Hugging Face's separate q/k/v (and SwiGLU gate/up) are concatenated.

    Returns:
        (state dict ``convert_dinov2`` accepts, lines naming the layout found and the keys dropped).

    Raises:
        ValueError: no encoder, several, or an encoder with keys that fit none of the layouts.
    """
    found = [(False, p) for p in _prefixes(state, KERNEL_KEY)] + [(True, p) for p in _prefixes(state, HF_KERNEL_KEY)]
    if not found:
        sample = ", ".join(sorted(state)[:6]) or "none"
        raise ValueError(f"no ViT encoder found: expected {EXPECTED_LAYOUTS}; found keys: {sample}"
                         f"{', …' if len(state) > 6 else ''}")
    if len(found) > 1:
        raise ValueError("several encoders in one checkpoint, under prefixes "
                         f"{', '.join(repr(p) for _, p in found)}; extract one first")
    hf, prefix = found[0]
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    report = [_describe_layout(hf, prefix, inside)]
    if hf:
        inside = _hf_to_meta(inside, prefix)
    outside: dict[str, int] = {}
    for key in state:
        if not key.startswith(prefix):
            group = key.split(".", 1)[0]
            outside[group] = outside.get(group, 0) + 1
    if outside:
        groups = ", ".join(f"{group}.* ({count} tensors)" for group, count in sorted(outside.items()))
        report.append(f"dropped (not the encoder): {groups}")
    return inside, report


def convert_file(src: str | Path, dst: str | Path, patch: int = 16, img: int = 512) -> list[str]:
    """Convert the checkpoint at ``src`` and write ``dst`` (.safetensors); returns what changed.

    Raises:
        FileNotFoundError: ``src`` is missing.
        FileExistsError: ``dst`` exists (never overwritten).
        ValueError: ``src`` unreadable or holding no DINOv2-shaped encoder (see ``encoder_state``), or ``dst``
            not .safetensors.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"--dst must be a .safetensors file, got {dst}")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; not overwriting it")
    state, found = encoder_state(load_state_dict_file(src))
    state, report = convert_dinov2(state, patch, img)
    # A patch-14 conversion at the native size only renames; say so rather than print nothing.
    report = found + (report or ["nothing resized: the checkpoint already fits"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted run leaves no half-written weights.
    partial = dst.with_name(dst.name + ".partial")
    save_file(state, str(partial), metadata={"source": src.name, "source_layout": found[0].removeprefix("layout: "),
                                             "patch_size": str(patch), "img_size": str(img), "layout": "timm"})
    os.replace(partial, dst)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: convert, print the layout found and what was resized; exit 1 with a message on any refusal."""
    parser = argparse.ArgumentParser(prog="python -m training.backbones.convert",
                                     description="DINOv2 / Depth Anything V2 encoder (patch 14) → timm safetensors "
                                                 "at a new patch size")
    parser.add_argument("--src", required=True,
                        help="DINOv2 (Meta or timm), Depth Anything V2 release or Hugging Face Dinov2 / "
                             "DepthAnything checkpoint (.pth/.pt/.safetensors); the layout is detected")
    parser.add_argument("--dst", required=True, help="output .safetensors (must not exist)")
    parser.add_argument("--patch", type=int, default=16, help="new patch size (default 16)")
    parser.add_argument("--img", type=int, default=512, help="square image size of the new model (default 512)")
    args = parser.parse_args(argv)
    return run_conversion(lambda: convert_file(args.src, args.dst, args.patch, args.img), args.dst)


if __name__ == "__main__":
    sys.exit(main())
