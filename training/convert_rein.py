r"""Convert a released Rein or DepthForge checkpoint (mmseg 1.x / mmdet 3.x layout) to this package's model.

The released files (``iter_40000_published.pth``, ``citys2acdc_40k_rein_head.pth``, DepthForge's
checkpoints) are mmengine checkpoints ``{'meta', 'state_dict'}`` (or the bare state dict) of an mmseg
``EncoderDecoder``. They hold the trained parts only: the tokens (``backbone.reins.*`` for Rein,
``backbone.depthforge.*`` for DepthForge) and the Mask2Former head (``decode_head.*``); the frozen DINOv2 and
Depth Anything V2 towers are not in them. The mapping, official → here:

- ``backbone.reins.X`` (Rein), ``backbone.depthforge.X`` (DepthForge) → ``backbone.reins.X``
  (``learnable_tokens_a``/``_b``, ``scale``, ``mlp_token2feat``, ``mlp_delta_f``, ``transform``, ``merge``).
- ``decode_head.DQCM.X`` → ``decode_head.correction.X`` (``attention_gate.channel_attention.{0,2}``,
  ``attention_gate.spatial_attention``, ``linear_fuse``; DepthForge only).
- ``decode_head.querys2feat.X`` and ``decode_head.pixel_decoder.X`` (``input_convs.i.conv/gn``,
  ``level_encoding``, ``lateral_convs.0``, ``output_convs.0``, ``mask_feature``, ``encoder.layers.k.norms.{0,1}``)
  keep their names, except inside the encoder layers: mmdet 3.x names the modules that mmcv 1.x (and this
  package) numbers, ``encoder.layers.k.self_attn.X`` → ``encoder.layers.k.attentions.0.X`` (MSDeformAttn:
  ``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``) and ``encoder.layers.k.ffn.X`` →
  ``encoder.layers.k.ffns.0.X`` (``layers.0.0``, ``layers.1``).
- ``decode_head.{level_embed,cls_embed,mask_embed,transformer_decoder}.X`` → ``decode_head.decoder.…X``, and in
  the decoder layers ``cross_attn.attn.X`` → ``attentions.0.attn.X``, ``self_attn.attn.X`` →
  ``attentions.1.attn.X`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), ``ffn.X`` → ``ffns.0.X``;
  ``norms.{0,1,2}`` (after cross-attention, self-attention, FFN) and ``post_norm`` keep their names.
- ``backbone.X`` in Meta's DINOv2 names (a full checkpoint) → ``backbone.visual.X`` with ``--with-backbone``
  (``mask_token`` dropped), else dropped: the visual tower comes from ``model.backbone.weights``.
- Dropped: ``backbone.depth_anything.*`` (Depth Anything V2 at patch 14; the depth tower comes from
  ``model.depthforge.depth.weights``), ``decode_head.loss_*``, ``decode_head.criterion.*``,
  ``data_preprocessor.*``, and ``decode_head.query_embed``/``query_feat`` beside ``querys2feat``.
- Refused: learned queries without ``querys2feat`` (a plain Mask2Former head), ``decode_head.decoder_input_projs``
  with weights (Rein's head keeps them as Identity; this model has no input projections), and files already in
  this package's names.

Full-rank ``learnable_tokens`` (the ``Reins`` / ``DepthForge`` classes rather than the released ``LoRAReins`` /
``DepthForgeReins``) are refused: the model holds rank-r factors. A file is DepthForge when it has
``backbone.depthforge.*`` or ``decode_head.DQCM.*``, Rein otherwise, and must be converted with a config of the
same family. Every converted tensor is checked against the model built from the config (names and shapes)
outside the frozen towers (``backbone.visual.*``, ``backbone.depth.*``), which come from their own files.

The output is a complete model state: the towers are read from the config's ``model.backbone.weights`` and
(DepthForge) ``model.depthforge.depth.weights`` — the files made by ``python -m training.backbones.convert`` —
and merged in, so ``training.export`` and ``training.inference`` load it as it is. ``--heads-only`` writes the
trained parts alone (no tower files needed; such a file cannot be exported until converted again without it).

Usage::

    python -m training.backbones.convert --src dinov2_vitl14_pretrain.pth \
        --dst weights/dinov2_vitl16_512.safetensors
    python -m training.convert_rein --src iter_40000_published.pth \
        --config training/configs/rein_gta2cbm_dinov2l.yaml --out weights/rein_gta.safetensors \
        [--with-backbone] [--heads-only] [--overwrite]
    python -m training.export --config training/configs/rein_gta2cbm_dinov2l.yaml \
        --weights weights/rein_gta.safetensors --out <package>

For DepthForge, convert ``depth_anything_v2_vitl.pth`` the same way (``--dst
weights/depth_anything_v2_vitl16_512.safetensors``) and give ``training/configs/depthforge_gta2cbm_dinov2l.yaml``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from .backbones.vit import StateDict, describe_mismatch
from .checkpoint import load_released_checkpoint, run_conversion, strip_module_prefix, tensors_for_saving
from .config import ModelConfig, TrainConfig

FAMILIES = ("depthforge", "rein")
TOWER_PREFIXES = ("backbone.visual.", "backbone.depth.")
TOKEN_PREFIXES = ("backbone.reins.", "backbone.depthforge.")
# Names that only this package's own files have (a released file never does).
OWN_PREFIXES = ("backbone.visual.", "backbone.depth.", "decode_head.decoder.", "decode_head.correction.")
EXAMPLE_CONFIGS = {"rein": "training/configs/rein_gta2cbm_dinov2l.yaml",
                   "depthforge": "training/configs/depthforge_gta2cbm_dinov2l.yaml"}
# The top-level names of Meta's DINOv2 (Rein's and DepthForge's DinoVisionTransformer) inside ``backbone``.
DINOV2_ROOTS = ("cls_token", "pos_embed", "mask_token", "register_tokens", "patch_embed", "blocks", "norm")
# Loss settings and data statistics an mmseg model may carry; none is a weight of this model.
DROPPED_PREFIXES = ("data_preprocessor.", "decode_head.loss_", "decode_head.criterion.")

# Official → here inside ``decode_head.pixel_decoder.encoder.layers.k.`` and
# ``decode_head.transformer_decoder.layers.i.``; mmdet 3.x names its modules, mmcv 1.x (here) numbers them.
_ENCODER_RENAMES = ((re.compile(r"(layers\.\d+\.)self_attn\."), r"\1attentions.0."),
                    (re.compile(r"(layers\.\d+\.)ffn\."), r"\1ffns.0."))
_DECODER_RENAMES = ((re.compile(r"(layers\.\d+\.)cross_attn\."), r"\1attentions.0."),
                    (re.compile(r"(layers\.\d+\.)self_attn\."), r"\1attentions.1."),
                    (re.compile(r"(layers\.\d+\.)ffn\."), r"\1ffns.0."))
_DECODER_ROOTS = ("level_embed.", "cls_embed.", "mask_embed.", "transformer_decoder.")
# Here → official, for naming missing entries in the released layout.
_ENCODER_OFFICIAL = ((re.compile(r"(layers\.\d+\.)attentions\.0\."), r"\1self_attn."),
                     (re.compile(r"(layers\.\d+\.)ffns\.0\."), r"\1ffn."))
_DECODER_OFFICIAL = ((re.compile(r"(layers\.\d+\.)attentions\.0\."), r"\1cross_attn."),
                     (re.compile(r"(layers\.\d+\.)attentions\.1\."), r"\1self_attn."),
                     (re.compile(r"(layers\.\d+\.)ffns\.0\."), r"\1ffn."))


def _rename(name: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str:
    for pattern, target in rules:
        name = pattern.sub(target, name)
    return name


def _listing(keys: list[str], limit: int = 6) -> str:
    return ", ".join(sorted(keys)[:limit]) + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def official_name(key: str, family: str = "rein") -> str | None:
    """The released checkpoint's name for one of this package's keys; None for the towers' keys."""
    if key.startswith("backbone.reins."):
        return ("backbone.depthforge." if family == "depthforge" else "backbone.reins.") + key[len("backbone.reins."):]
    if key.startswith("decode_head.correction."):
        return "decode_head.DQCM." + key[len("decode_head.correction."):]
    if key.startswith("decode_head.decoder."):
        return "decode_head." + _rename(key[len("decode_head.decoder."):], _DECODER_OFFICIAL)
    if key.startswith("decode_head.pixel_decoder.encoder."):
        return _rename(key, _ENCODER_OFFICIAL)
    if key.startswith("decode_head."):
        return key
    return None


def checkpoint_family(state: Mapping[str, torch.Tensor]) -> str:
    """``depthforge`` for a file with DepthForge's tokens or DQCM, else ``rein``."""
    state = strip_module_prefix(state)
    if any(k.startswith(("backbone.depthforge.", "decode_head.DQCM.")) for k in state):
        return "depthforge"
    return "rein"


def _family_evidence(state: Mapping[str, torch.Tensor]) -> str:
    found = [p + "*" for p in ("backbone.reins.", "backbone.depthforge.", "decode_head.DQCM.")
             if any(k.startswith(p) for k in state)]
    return ", ".join(found) + ("" if any(k.startswith("decode_head.DQCM.") for k in state)
                               else ", no decode_head.DQCM.*")


def check_rein_layout(state: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless ``state`` is a released Rein / DepthForge state dict this package can hold.

    Refused: files without tokens or head (the message names the top-level names found and the usual mix-ups),
    full-rank tokens, a plain Mask2Former head (learned queries, no ``querys2feat``), and input projections
    between the pixel decoder and the transformer decoder.
    """
    state = strip_module_prefix(state)
    ours = [k for k in state if k.startswith(OWN_PREFIXES)]
    if ours:
        raise ValueError(f"not a released checkpoint: it already uses this package's names ({_listing(ours, 3)}); "
                         "give it to training.export as it is")
    has_tokens = any(k.startswith(TOKEN_PREFIXES) for k in state)
    has_head = any(k.startswith("decode_head.") for k in state)
    if not (has_tokens and has_head):
        roots = sorted({".".join(k.split(".")[:2]) for k in state})
        hint = ""
        if any(k.startswith("backbone.adapter.") for k in state):
            hint = "; it looks like an MFuser checkpoint (training.convert_mfuser converts those)"
        elif any(k.startswith("blocks.") for k in state):
            hint = "; it looks like a single vision tower, not a segmentor"
        elif has_head:
            hint = "; it has a head but no tokens"
        elif has_tokens:
            hint = "; it has tokens but no head"
        raise ValueError("not a Rein or DepthForge checkpoint: expected backbone.reins.* (Rein) or "
                         "backbone.depthforge.* (DepthForge) tokens and decode_head.* (the Mask2Former head); "
                         f"names found: {roots[:12]}{' …' if len(roots) > 12 else ''}{hint}")
    full_rank = [k for k in state if k.startswith(TOKEN_PREFIXES) and k.endswith(".learnable_tokens")]
    if full_rank:
        raise ValueError(f"{full_rank[0]} holds full-rank tokens (the Reins / DepthForge classes); this model holds "
                         "the low-rank factors learnable_tokens_a / learnable_tokens_b of the released LoRAReins / "
                         "DepthForgeReins, so the file cannot be converted exactly")
    queries = [k for k in state if k.startswith(("decode_head.query_feat.", "decode_head.query_embed."))]
    if queries and not any(k.startswith("decode_head.querys2feat.") for k in state):
        raise ValueError(f"{_listing(queries)}: a plain Mask2Former head with learned queries, not Rein's head "
                         "(replace_query_feat=True: the queries come from the tokens through querys2feat); "
                         "this model cannot use it")
    projections = [k for k in state if k.startswith("decode_head.decoder_input_projs.")]
    if projections:
        raise ValueError(f"{_listing(projections)}: the head projects the pixel decoder's levels before the "
                         "transformer decoder (enforce_decoder_input_project or a different width); this model "
                         "has no such projections (Rein's head keeps them as Identity)")


def convert_rein_state(state: Mapping[str, torch.Tensor],
                       with_backbone: bool = False) -> tuple[StateDict, list[str]]:
    """Rename a released Rein / DepthForge state dict to this package's names (see the module docstring).

    Args:
        state: the ``state_dict`` of the released file (mmengine's wrapper removed).
        with_backbone: map DINOv2 entries (``backbone.<Meta name>``) to ``backbone.visual.*`` instead of
            dropping them.

    Returns:
        (converted, report): the renamed tensors (shared with ``state``), with entries of unknown names kept
        as they are so a check against the model lists them; and lines saying what was dropped.

    Raises:
        ValueError: not a Rein / DepthForge checkpoint, or one this model cannot hold (see
            :func:`check_rein_layout`).
    """
    state = strip_module_prefix(state)
    check_rein_layout(state)
    out: StateDict = {}
    dropped: dict[str, list[str]] = {}

    def drop(reason: str, key: str) -> None:
        dropped.setdefault(reason, []).append(key)

    for key, value in state.items():
        if key.startswith(TOKEN_PREFIXES):
            out["backbone.reins." + key.split(".", 2)[2]] = value
        elif key.startswith("backbone.depth_anything."):
            drop("Depth Anything V2 entries (the depth tower loads from model.depthforge.depth.weights)", key)
        elif key.startswith("backbone.") and key.split(".")[1] in DINOV2_ROOTS:
            name = key[len("backbone."):]
            if not with_backbone:
                drop("DINOv2 entries (the visual tower loads from model.backbone.weights; --with-backbone uses "
                     "them)", key)
            elif name == "mask_token":
                drop("DINOv2 pretraining entries", key)
            else:
                # Meta's fused SwiGLU (ViT-g) is timm's fc1 / fc2; every other DINOv2 name is timm's already.
                name = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", name)
                out["backbone.visual." + re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", name)] = value
        elif key.startswith(DROPPED_PREFIXES):
            drop("loss and data-preprocessing entries", key)
        elif key.startswith(("decode_head.query_feat.", "decode_head.query_embed.")):
            drop("learned-query entries (the queries come from the tokens through querys2feat)", key)
        elif key.startswith("decode_head.DQCM."):
            out["decode_head.correction." + key[len("decode_head.DQCM."):]] = value
        elif key.startswith("decode_head.pixel_decoder.encoder."):
            out[_rename(key, _ENCODER_RENAMES)] = value
        elif key.startswith("decode_head.") and key[len("decode_head."):].startswith(_DECODER_ROOTS):
            out["decode_head.decoder." + _rename(key[len("decode_head."):], _DECODER_RENAMES)] = value
        else:
            # querys2feat and the rest of the pixel decoder keep their names; anything unknown is reported.
            out[key] = value
    report = [f"dropped {len(keys)} {reason}: {_listing(keys)}" for reason, keys in dropped.items()]
    return out, report


def _model_config(cfg: TrainConfig | ModelConfig) -> ModelConfig:
    return cfg.model if isinstance(cfg, TrainConfig) else cfg


def check_against(cfg: TrainConfig | ModelConfig, converted: Mapping[str, torch.Tensor],
                  family: str | None = None) -> None:
    """ValueError unless ``converted`` fits the model of ``cfg`` exactly outside the frozen towers.

    The model is built on the meta device (no memory, no tower weights). A tower is checked too when
    ``converted`` holds any of its entries (``--with-backbone``), and must then be complete.

    Args:
        cfg: a training config, or its ``model`` section, of family depthforge or rein.
        converted: the output of :func:`convert_rein_state`.
        family: the checkpoint's family (:func:`checkpoint_family`); when given it must be the config's.

    Raises:
        ValueError: another family, or missing, unexpected or mis-shaped entries (listed, the missing ones
            also in the released names).
    """
    from .build import build_model

    model_cfg = _model_config(cfg)
    if model_cfg.family not in FAMILIES:
        raise ValueError(f"the config builds model.family {model_cfg.family!r}; Rein and DepthForge checkpoints "
                         "need family rein or depthforge")
    if family is not None and family != model_cfg.family:
        what = "DepthForge" if family == "depthforge" else "Rein"
        raise ValueError(f"the checkpoint is a {what} checkpoint but the config builds model.family "
                         f"{model_cfg.family}; use a {family} config (e.g. {EXAMPLE_CONFIGS[family]})")
    with torch.device("meta"):
        model = build_model(model_cfg, load_weights=False)
    supplied = tuple(p for p in TOWER_PREFIXES if any(k.startswith(p) for k in converted))
    expected = {k: v for k, v in model.state_dict().items()
                if not k.startswith(TOWER_PREFIXES) or k.startswith(supplied)}
    problem = describe_mismatch(expected, converted)
    if problem:
        missing = sorted(k for k in expected if k not in converted)
        names = [n for n in (official_name(k, family or model_cfg.family) for k in missing) if n is not None]
        hint = f"; missing in the released names: {_listing(names, 8)}" if names else ""
        raise ValueError(f"the converted checkpoint does not fit the model.family {model_cfg.family} model of the "
                         f"config: {problem}{hint}")


def tower_state(cfg: TrainConfig | ModelConfig, skip: tuple[str, ...] = ()) -> tuple[StateDict, list[str]]:
    """The frozen towers' entries (``backbone.visual.*``, ``backbone.depth.*``) from the config's weight files.

    The model is built with its weights loaded (``build_depthforge``: timm's filter and a strict fit), and
    the towers' part of its state is returned with a line per file read.

    Args:
        cfg: a training config, or its ``model`` section, of family depthforge or rein.
        skip: tower prefixes not to read (already in the converted checkpoint).

    Raises:
        ValueError: a tower whose ``weights`` is empty.
        FileNotFoundError: a weight file that does not exist.
    """
    from .build import build_depthforge

    model_cfg = _model_config(cfg)
    b, d = model_cfg.backbone, model_cfg.depthforge
    if d is None:
        raise ValueError(f"model.family {model_cfg.family} needs a model.depthforge section")
    sources = {"backbone.visual.": ("model.backbone.weights", b.weights, "--src dinov2_vitl14_pretrain.pth")}
    if d.depth is not None:
        sources["backbone.depth."] = ("model.depthforge.depth.weights", d.depth.weights,
                                      "--src depth_anything_v2_vitl.pth")
    needed = {p: s for p, s in sources.items() if p not in skip}
    if not needed:
        return {}, []
    for field, path, example in needed.values():
        if not path:
            raise ValueError(f"{field} is empty: name the converted tower there (python -m "
                             f"training.backbones.convert {example} --dst <file>.safetensors), or pass --heads-only")
        if path != "hub" and not Path(path).is_file():
            raise FileNotFoundError(f"{field} {path} not found: convert the tower first (python -m "
                                    f"training.backbones.convert {example} --dst {path}), or pass --heads-only")
    # Towers already supplied stay random here (nothing to read), and are not taken.
    backbone = replace(b, weights=b.weights if "backbone.visual." in needed else "")
    depth = d.depth
    if depth is not None and "backbone.depth." not in needed:
        depth = replace(depth, weights="")
    built = build_depthforge(replace(model_cfg, backbone=backbone, depthforge=replace(d, depth=depth)))
    state = {k: v for k, v in built.state_dict().items() if k.startswith(tuple(needed))}
    notes = [f"added {sum(k.startswith(p) for k in state)} {p}* entries from {field} {path}"
             for p, (field, path, _) in needed.items()]
    return state, notes


def load_official_checkpoint(path: str | Path) -> StateDict:
    """Read a released checkpoint safely (weights only) and unwrap its ``state_dict``."""
    return load_released_checkpoint(path, "a released Rein or DepthForge checkpoint"
                                          " (mmengine: a dict with 'meta' and 'state_dict', or the state dict itself)")


def convert_file(src: str | Path, config: str | Path, out: str | Path, overwrite: bool = False,
                 with_backbone: bool = False, heads_only: bool = False) -> list[str]:
    """Convert the released checkpoint ``src`` for the model of ``config`` and write ``out`` (.safetensors).

    Everything is checked before anything is written: the converted entries against the model built on the
    meta device, and (without ``heads_only``) the complete state, towers included, by a strict load.

    Returns:
        lines saying what was dropped and what was added from the tower files.

    Raises:
        FileNotFoundError: ``src``, ``config`` or a tower file missing.
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        ValueError: ``out`` not .safetensors, a config of another family, or a checkpoint that cannot be read
            or does not convert.
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
    if cfg.model.family not in FAMILIES:
        raise ValueError(f"{config} builds model.family {cfg.model.family!r}, not rein or depthforge")
    state = load_official_checkpoint(src)
    converted, notes = convert_rein_state(state, with_backbone)
    family = checkpoint_family(state)
    if family != cfg.model.family:
        raise ValueError(f"{src} is a {'DepthForge' if family == 'depthforge' else 'Rein'} checkpoint "
                         f"({_family_evidence(strip_module_prefix(state))}) but {config} builds model.family "
                         f"{cfg.model.family}; use a {family} config (e.g. {EXAMPLE_CONFIGS[family]})")
    check_against(cfg, converted, family)
    if heads_only:
        converted = {k: v for k, v in converted.items() if not k.startswith(TOWER_PREFIXES)}
    else:
        supplied = tuple(p for p in TOWER_PREFIXES if any(k.startswith(p) for k in converted))
        towers, added = tower_state(cfg, skip=supplied)
        converted = {**converted, **towers}
        notes += added
        with torch.device("meta"):
            model = build_model(cfg.model, load_weights=False)
        try:
            model.load_state_dict(converted, strict=True, assign=True)
        except RuntimeError as exc:  # names and shapes were checked; this would be a structure surprise
            raise ValueError(f"the converted checkpoint does not load into the model of {config}: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted run leaves no half-written weights.
    partial = out.with_name(out.name + ".partial")
    save_file(tensors_for_saving(converted), str(partial),
              metadata={"source": src.name, "layout": f"dgss_perception {cfg.model.family}", "config": cfg.name,
                        "contents": "trained parts only" if heads_only else "complete"})
    os.replace(partial, out)
    return notes


def main(argv: list[str] | None = None) -> int:
    """Command line: convert, print what was dropped and added; exit 1 with a message on any refusal."""
    parser = argparse.ArgumentParser(prog="python -m training.convert_rein",
                                     description="released Rein / DepthForge checkpoint (mmseg 1.x) → safetensors "
                                                 "in this package's names, for training.export")
    parser.add_argument("--src", required=True, help="released checkpoint, e.g. iter_40000_published.pth "
                                                     "(read weights-only)")
    parser.add_argument("--config", required=True, help="training config of the matching family (.yaml); its tower "
                                                        "weight files are merged into the output")
    parser.add_argument("--out", required=True, help="output .safetensors")
    parser.add_argument("--with-backbone", action="store_true",
                        help="take the DINOv2 entries of a full checkpoint (backbone.*) instead of dropping them")
    parser.add_argument("--heads-only", action="store_true",
                        help="write the trained parts only (tokens, DQCM, head); not loadable by training.export")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    return run_conversion(lambda: convert_file(args.src, args.config, args.out, args.overwrite, args.with_backbone,
                                               args.heads_only), args.out)


if __name__ == "__main__":
    sys.exit(main())
