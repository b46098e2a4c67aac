r"""Convert a released MFuser checkpoint (the official mmseg 0.x / mmcv 1.x layout) to this package's MFuser.

The official segmentor keeps the VLM vision tower (EVA02-CLIP or OpenAI CLIP), DINOv2, the MVFusers and the FPN
in one ``backbone`` module; here they are separate modules of :class:`~training.models.fused_encoder.FusedEncoder`.
The mapping, official → here:

=====================================  =====================================================================
official                               here
=====================================  =====================================================================
``backbone.dinov2.X`` (Meta names)     ``backbone.dino.X`` via timm's DINOv2 filter (``mask_token`` dropped)
``backbone.adapter.N.X``               ``backbone.fusers.N.X`` (MVFuser names are the same)
``backbone.adapter_proj1.N.X``         ``backbone.projections.proj1.N.X`` (stride-16 CLIP variant)
``backbone.adapter_proj2.N.X``         ``backbone.projections.proj2.N.X``
``backbone.adapter_proj3.X``           ``backbone.projections.proj3.X``
``backbone.fpn1.{0,1,3}.X``            ``backbone.fpn.fpn1.{0,1,3}.X`` (BatchNorm counters included)
``backbone.fpn2.0.X``                  ``backbone.fpn.fpn2.0.X``
other ``backbone.X``                   ``backbone.vlm.X`` via timm's filter for the tower (EVA-CLIP → Eva:
                                       ``attn.q_bias``/``v_bias`` → ``attn.q_proj.bias``/``v_proj.bias``,
                                       ``attn.inner_attn_ln`` → ``attn.norm``, ``mlp.w1/w2/w3`` →
                                       ``mlp.fc1_g/fc1_x/fc2``, ``mlp.ffn_ln`` → ``mlp.norm``; ``rope.*``
                                       and ``blocks.N.attn.rope.*`` dropped, timm recomputes them)
``text_encoder.X``                     ``text_encoder.text.X`` (``text_tower_state_dict``)
``contexts``                           ``text_encoder.contexts``
``context_decoder.X``, ``gamma``       unchanged
``decode_head.pixel_decoder.X``        unchanged
other ``decode_head.X``                ``decode_head.decoder.X`` (query_embed, text_proj, level_embed,
                                       transformer_decoder.*, cls_embed, mask_embed)
``random_text``, ``reg_E0.*``          dropped (allocated and never used; tqdm's frozen backbone copy)
=====================================  =====================================================================

The OpenAI-CLIP vision tower of the CLIP variant adds its class embedding twice (once as the class token, once
to the class position), so its converted ``pos_embed[:, 0]`` carries the class embedding once more. A missing
BatchNorm ``num_batches_tracked`` counter is filled with 0 (it has no effect in eval mode). The SigLIP variant
(Hugging Face names) is not converted.

Every converted tensor is checked against the model's own state dict (names and shapes) before anything is
written; position embeddings and patch kernels must already fit (nothing is resampled).

Usage::

    python -m training.convert_mfuser --src epoch_last.pth --config training/configs/<mfuser config>.yaml \
        --out weights/mfuser_eva02_gta.safetensors [--overwrite]

The output holds a plain state dict in this package's names, ready for
``python -m training.export --config <config> --weights <out> --out <package>``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .backbones.vit import StateDict, checkpoint_filter_for, describe_mismatch
from .checkpoint import load_released_checkpoint, run_conversion, strip_module_prefix, tensors_for_saving
from .models.mfuser import MFuser
from .models.text_encoder import rename_official_text_side

# Every official MFuser checkpoint holds entries under all of these.
REQUIRED_PREFIXES = ("backbone.dinov2.", "backbone.adapter.", "decode_head.")
EXPECTED_LAYOUT = ("backbone.* (VLM vision tower), backbone.dinov2.*, backbone.adapter.N.*, backbone.fpn1/fpn2.*, "
                   "text_encoder.*, contexts, context_decoder.*, gamma, decode_head.*")
# Allocated by the official segmentors and never used (random_text), or tqdm's frozen copy of its initial
# backbone, which only feeds a training loss (reg_E0).
DROPPED_KEYS = ("random_text",)
DROPPED_PREFIXES = ("reg_E0.",)

# Official → here for the entries that move as a whole prefix (checked in order: adapter_proj before adapter).
_BACKBONE_RENAMES = (
    (re.compile(r"backbone\.adapter_proj([12])\.(\d+)\.(.+)"), r"backbone.projections.proj\1.\2.\3"),
    (re.compile(r"backbone\.adapter_proj3\.(.+)"), r"backbone.projections.proj3.\1"),
    (re.compile(r"backbone\.adapter\.(\d+)\.(.+)"), r"backbone.fusers.\1.\2"),
    (re.compile(r"backbone\.(fpn\d)\.(.+)"), r"backbone.fpn.\1.\2"),
)
# Here → official, for naming missing entries in the official layout (the towers' own names aside).
_OFFICIAL_PREFIX = (
    ("backbone.fusers.", "backbone.adapter."),
    ("backbone.projections.proj1.", "backbone.adapter_proj1."),
    ("backbone.projections.proj2.", "backbone.adapter_proj2."),
    ("backbone.projections.proj3.", "backbone.adapter_proj3."),
    ("backbone.fpn.", "backbone."),
    ("backbone.dino.", "backbone.dinov2."),
    ("text_encoder.text.", "text_encoder."),
    ("text_encoder.contexts", "contexts"),
    ("decode_head.decoder.", "decode_head."),
    ("decode_head.pixel_decoder.", "decode_head.pixel_decoder."),
    ("context_decoder.", "context_decoder."),
    ("gamma", "gamma"),
)


def official_name(key: str) -> str | None:
    """The official checkpoint's name for one of this package's MFuser keys, where it follows by prefix.

    None for the VLM tower's keys (renamed by timm's filter) and keys without an official counterpart.
    """
    for ours, theirs in _OFFICIAL_PREFIX:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return None


def check_official_mfuser(state: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless ``state`` looks like an official MFuser checkpoint (entries under REQUIRED_PREFIXES).

    The message names the expected layout and the top-level names found, with a hint for the usual mix-ups
    (a tqdm checkpoint, a file already in this package's names).
    """
    absent = [p for p in REQUIRED_PREFIXES if not any(k.startswith(p) for k in state)]
    if not absent:
        return
    roots = sorted({k.split(".", 1)[0] for k in state})
    hint = ""
    if any(k.startswith("backbone.fusers.") for k in state):
        hint = "; it already uses this package's names (give it to training.export as it is)"
    elif any(k.startswith(DROPPED_PREFIXES) for k in state):
        hint = "; it looks like a tqdm checkpoint (reg_E0.*), which has no DINOv2 and no MVFusers"
    elif any(k.startswith("blocks.") for k in state):
        hint = "; it looks like a single vision tower, not a segmentor"
    raise ValueError(f"not an official MFuser checkpoint: expected {EXPECTED_LAYOUT}; nothing under "
                     f"{', '.join(absent)}; top-level names found: {roots[:12]}{' …' if len(roots) > 12 else ''}"
                     f"{hint}")


def split_official(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict, StateDict, list[str]]:
    """Split an official state dict into the VLM vision tower, DINOv2 and everything else.

    Args:
        state: the official ``state_dict`` (mmcv's wrapper removed).

    Returns:
        (vlm, dino, rest, dropped): the two towers' entries with the ``backbone.`` / ``backbone.dinov2.`` prefix
        removed (still in their own naming, for timm's filters), the remaining entries renamed by prefix as in
        the module docstring (text side still in official names), and the dropped keys.
    """
    vlm: StateDict = {}
    dino: StateDict = {}
    rest: StateDict = {}
    dropped: list[str] = []
    for key, value in state.items():
        if key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES):
            dropped.append(key)
        elif key.startswith("backbone.dinov2."):
            dino[key[len("backbone.dinov2."):]] = value
        elif key.startswith("backbone."):
            for pattern, target in _BACKBONE_RENAMES:
                if pattern.fullmatch(key):
                    rest[pattern.sub(target, key)] = value
                    break
            else:
                vlm[key[len("backbone."):]] = value
        elif key.startswith("decode_head.") and not key.startswith("decode_head.pixel_decoder."):
            rest["decode_head.decoder." + key[len("decode_head."):]] = value
        else:
            # Text side, enhancer, gamma, pixel decoder, and anything unknown (the final check reports it).
            rest[key] = value
    return vlm, dino, rest, dropped


def _pos_key(part: Mapping[str, torch.Tensor]) -> str | None:
    return next((k for k in ("pos_embed", "positional_embedding") if k in part), None)


def _kernel_key(part: Mapping[str, torch.Tensor]) -> str | None:
    return next((k for k in ("patch_embed.proj.weight", "conv1.weight") if k in part), None)


def _check_grid(part: Mapping[str, torch.Tensor], tower: nn.Module, name: str) -> None:
    """ValueError when the tower's position embedding or patch kernel would have to be resampled.

    The released models were trained at one size (512×512); the model must be built at that size so the weights
    are taken as they are (export resamples later, from the config's img_size).
    """
    pos_key, kernel_key = _pos_key(part), _kernel_key(part)
    pos = getattr(tower, "pos_embed", None)
    if pos_key is not None and pos is not None and part[pos_key].shape[-2] != pos.shape[1]:
        raise ValueError(f"{name}: the checkpoint's {pos_key} holds {part[pos_key].shape[-2]} tokens, the model "
                         f"built from the config {pos.shape[1]} (grid {tuple(tower.patch_embed.grid_size)}); build "
                         "it at the size it was trained at (model.img_size 512×512 for the released models)")
    kernel = tower.patch_embed.proj.weight
    if kernel_key is not None and tuple(part[kernel_key].shape[-2:]) != tuple(kernel.shape[-2:]):
        raise ValueError(f"{name}: the checkpoint's patch kernel is {tuple(part[kernel_key].shape[-2:])}, the "
                         f"model's {tuple(kernel.shape[-2:])}; the config's patch size does not match")


def _untouched(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether a filter passed a tensor through (possibly as a reshaped view) rather than resampling it."""
    if after.numel() != before.numel():
        return False
    return after.is_meta or after.data_ptr() == before.data_ptr()


def _filter_tower(part: StateDict, tower: nn.Module, name: str) -> StateDict:
    """One tower's entries (its own naming, an official layout) → timm names, through timm's filter."""
    if not part:
        return {}  # the final check lists every missing entry
    _check_grid(part, tower, name)
    openai_clip = "class_embedding" in part
    # Always a new dict: timm's DINOv2 conversion pops entries from the one it is given. timm recognises OpenAI
    # CLIP weights by their "visual." prefix.
    source = {f"visual.{k}": v for k, v in part.items()} if openai_clip else dict(part)
    watched = {k: part[k] for k in (_pos_key(part), _kernel_key(part)) if k is not None}
    try:
        out = checkpoint_filter_for(tower)(source, tower)
    except Exception as exc:  # timm asserts or raises KeyError on layouts it does not know
        raise ValueError(f"{name} weights cannot be adapted to {type(tower).__name__}: {exc!r}") from exc
    for key, value in watched.items():
        target = "pos_embed" if key in ("pos_embed", "positional_embedding") else "patch_embed.proj.weight"
        if target in out and not _untouched(value, out[target]):
            raise ValueError(f"{name}: timm's filter resampled {key}; refusing to convert (the sizes should match)")
    if openai_clip and "pos_embed" in out and "cls_token" in out:
        if getattr(tower, "no_embed_class", False):
            raise ValueError(f"{name}: an OpenAI-CLIP tower needs a model whose class token takes a position "
                             "embedding (no_embed_class=False)")
        # The official CLIP tower adds its class embedding to the class position as well as using it as the
        # class token; timm adds pos_embed[:, 0] to cls_token, so the extra term moves into pos_embed[:, 0].
        pos = out["pos_embed"].clone()
        pos[:, :1] = pos[:, :1] + out["cls_token"].reshape(1, 1, -1).to(pos.dtype)
        out["pos_embed"] = pos
    return out


def _official_hint(missing: list[str], limit: int = 8) -> str:
    names = [n for n in (official_name(k) for k in missing) if n is not None]
    if not names:
        return ""
    more = f", … {len(names) - limit} more" if len(names) > limit else ""
    return f"; missing in the official names: {names[:limit]}{more}"


def convert_official_mfuser_with_notes(state: Mapping[str, torch.Tensor],
                                       model: MFuser) -> tuple[StateDict, list[str]]:
    """:func:`convert_official_mfuser`, also returning lines that say what was dropped or filled in."""
    state = strip_module_prefix(state)
    check_official_mfuser(state)
    vlm_part, dino_part, rest, dropped = split_official(state)
    backbone = model.backbone
    vlm = _filter_tower(vlm_part, backbone.vlm, "VLM vision tower (backbone.*)")
    dino = _filter_tower(dino_part, backbone.dino, "DINOv2 (backbone.dinov2.*)")
    out: StateDict = rename_official_text_side(rest, encoder_prefix="text_encoder")
    out.update({f"backbone.vlm.{k}": v for k, v in vlm.items()})
    out.update({f"backbone.dino.{k}": v for k, v in dino.items()})

    notes = []
    if dropped:
        notes.append(f"dropped {len(dropped)} unused entries: {', '.join(sorted(dropped)[:6])}"
                     f"{' …' if len(dropped) > 6 else ''}")
    rope = sorted(k for k in vlm_part if "rope" in k)
    if rope:
        notes.append(f"dropped {len(rope)} rotary-embedding buffers (backbone.rope.*, backbone.blocks.N.attn.rope.*); "
                     "the model computes its own")
    if "mask_token" in dino_part:
        notes.append("dropped backbone.dinov2.mask_token (DINOv2 pretraining only)")
    expected = model.state_dict()
    counters = [k for k in expected if k.endswith("num_batches_tracked") and k not in out]
    for key in counters:
        out[key] = torch.zeros((), dtype=torch.long)
    if counters:
        notes.append(f"filled {len(counters)} missing BatchNorm num_batches_tracked counters with 0")

    problem = describe_mismatch(expected, out)
    if problem:
        missing = sorted(k for k in expected if k not in out)
        raise ValueError(f"the converted checkpoint does not fit the MFuser built from the config: {problem}"
                         f"{_official_hint(missing)}")
    return out, notes


def convert_official_mfuser(state: Mapping[str, torch.Tensor], model: MFuser) -> dict[str, torch.Tensor]:
    """Rename an official MFuser state dict to ``model``'s names (see the module docstring for the mapping).

    Args:
        state: the official ``state_dict`` (already unwrapped from mmcv's {'meta', 'state_dict', 'optimizer'}).
        model: the MFuser built from the matching config; only its structure, names and shapes are used, so it
            may live on the meta device.

    Returns:
        a state dict with exactly ``model.state_dict()``'s keys and shapes (tensors shared with ``state`` where
        nothing had to change).

    Raises:
        ValueError: not an MFuser checkpoint; a tower whose grid or patch size differs from the model's; or
            missing, unexpected or mis-shaped entries after renaming (listed, with the official names of the
            missing ones where they follow by prefix).
    """
    return convert_official_mfuser_with_notes(state, model)[0]


def load_official_checkpoint(path: str | Path) -> StateDict:
    """Read a released checkpoint safely (weights only) and unwrap its ``state_dict``."""
    return load_released_checkpoint(path, "an official MFuser checkpoint (mmcv 1.x: a dict with 'meta', "
                                          "'state_dict' and 'optimizer', or the state dict itself)")


def convert_file(src: str | Path, config: str | Path, out: str | Path, overwrite: bool = False) -> list[str]:
    """Convert the official checkpoint ``src`` for the MFuser of ``config`` and write ``out`` (.safetensors).

    The model is built on the meta device (no memory, no tower weights) and the converted state is loaded into
    it strictly, which proves every name and shape before the file is written.

    Returns:
        lines saying what was dropped or filled in.

    Raises:
        FileNotFoundError: ``src`` or ``config`` missing.
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        ValueError: ``out`` not .safetensors, a config that is not an MFuser, or a checkpoint that cannot be
            read or does not convert (see :func:`convert_official_mfuser`).
    """
    from safetensors.torch import save_file

    from .build import build_model
    from .config import load_config

    src, out = Path(src), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must be a .safetensors file, got {out}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    cfg = load_config(config)
    if cfg.model.family != "mfuser":
        raise ValueError(f"{config} builds model.family {cfg.model.family!r}, not mfuser")
    state = load_official_checkpoint(src)
    with torch.device("meta"):
        model = build_model(cfg.model, load_weights=False)
    converted, notes = convert_official_mfuser_with_notes(state, model)
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:  # names and shapes were checked; this would be a dtype or structure surprise
        raise ValueError(f"the converted checkpoint does not load into the MFuser of {config}: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted run leaves no half-written weights.
    partial = out.with_name(out.name + ".partial")
    save_file(tensors_for_saving(converted), str(partial),
              metadata={"source": src.name, "layout": "dgss_perception mfuser", "config": cfg.name})
    os.replace(partial, out)
    return notes


def main(argv: list[str] | None = None) -> int:
    """Command line: convert, print what was dropped; exit 1 with a message on any refusal."""
    parser = argparse.ArgumentParser(prog="python -m training.convert_mfuser",
                                     description="official MFuser checkpoint (mmcv) → safetensors in this package's "
                                                 "names, for training.export")
    parser.add_argument("--src", required=True, help="released checkpoint, e.g. epoch_last.pth (read weights-only)")
    parser.add_argument("--config", required=True, help="training config of the matching MFuser variant (.yaml)")
    parser.add_argument("--out", required=True, help="output .safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    return run_conversion(lambda: convert_file(args.src, args.config, args.out, args.overwrite), args.out)


if __name__ == "__main__":
    sys.exit(main())
