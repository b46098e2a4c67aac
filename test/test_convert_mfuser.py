"""Official MFuser checkpoints (mmcv layout, the released names) → this package's MFuser (tiny models, no network).

The synthetic checkpoints are written by hand-made inverse mappings of the tiny models' state dicts into the
official layout: the EVA02-CLIP tower in EVA-CLIP names, DINOv2 in Meta's names (with its ``mask_token``), the
MVFusers as ``backbone.adapter.N``, the FPN at the top of ``backbone``, the text tower as ``text_encoder.*``,
and the decode head without this package's ``decoder`` level. Rotary-embedding buffers are written with
arbitrary values: the official EVA tower stores them (shared by every block), timm recomputes them, and the
conversion drops them, so they are the one part of the tower with no round trip.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import TINY_MFUSER_CONFIG
from training.build import build_model
from training.config import config_from_dict
from training.convert_mfuser import convert_official_mfuser, main as convert_main, official_name
from training.export import load_export_model

ROOT = Path(__file__).resolve().parents[1]

# timm Eva → EVA-CLIP (the official EVAVisionTransformer) inside one block.
EVA_TO_OFFICIAL = (("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
                   ("attn.norm.", "attn.inner_attn_ln."), ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."),
                   ("mlp.fc2.", "mlp.w3."), ("mlp.norm.", "mlp.ffn_ln."))
# timm VisionTransformer (CLIP) → OpenAI CLIP inside one block.
CLIP_BLOCK_TO_OFFICIAL = (("norm1.", "ln_1."), ("norm2.", "ln_2."), ("attn.qkv.weight", "attn.in_proj_weight"),
                          ("attn.qkv.bias", "attn.in_proj_bias"), ("attn.proj.", "attn.out_proj."),
                          ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))

# The stride-16 CLIP variant: patch 16, DINOv2 and CLIP of different widths (per-layer projections).
TINY_CLIP_CONFIG = copy.deepcopy(TINY_MFUSER_CONFIG)
TINY_CLIP_CONFIG["name"] = "tiny_mfuser_clip_test"
TINY_CLIP_CONFIG["model"]["img_size"] = [64, 64]
TINY_CLIP_CONFIG["model"]["backbone"]["overrides"] = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 16}
TINY_CLIP_CONFIG["model"]["mfuser"]["vlm"] = {
    "name": "clip_l14", "overrides": {"embed_dim": 48, "depth": 4, "num_heads": 2, "patch_size": 16}, "embed_dim": 24}
TINY_CLIP_CONFIG["model"]["mfuser"]["text"] = {
    "name": "clip_l14", "overrides": {"width": 32, "layers": 2, "heads": 2, "output_dim": 24}}


def tiny_model(config: dict, seed: int = 0) -> torch.nn.Module:
    """The tiny MFuser with every tensor moved off its init (zero biases and unit norms would hide swaps)."""
    torch.manual_seed(seed)
    model = build_model(config_from_dict(config).model, load_weights=False)
    with torch.no_grad():
        for key, value in model.state_dict().items():  # shares storage with the parameters and buffers
            if value.is_floating_point():
                value.add_(torch.randn_like(value) * 0.05)
            elif key.endswith("num_batches_tracked"):
                value.fill_(7)
    return model.eval()


def _shared_parts(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """Official names of the entries every variant shares; None for the VLM tower's."""
    renames = (("backbone.dino.", "backbone.dinov2."), ("backbone.fusers.", "backbone.adapter."),
               ("backbone.projections.proj1.", "backbone.adapter_proj1."),
               ("backbone.projections.proj2.", "backbone.adapter_proj2."),
               ("backbone.projections.proj3.", "backbone.adapter_proj3."), ("backbone.fpn.", "backbone."),
               ("text_encoder.text.", "text_encoder."), ("text_encoder.contexts", "contexts"),
               ("decode_head.decoder.", "decode_head."))
    if key.startswith("backbone.vlm."):
        return None
    for ours, theirs in renames:
        if key.startswith(ours):
            return theirs + key[len(ours):], value
    return key, value  # context_decoder.*, gamma, decode_head.pixel_decoder.*


def official_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The EVA02 variant's state in the released layout (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        shared = _shared_parts(key, value)
        if shared is None:
            name = key[len("backbone.vlm."):]
            for ours, theirs in EVA_TO_OFFICIAL:
                name = name.replace(ours, theirs)
            out["backbone." + name] = value
        else:
            out[shared[0]] = shared[1]
    width = model.backbone.dino.embed_dim
    out["backbone.dinov2.mask_token"] = torch.randn(1, width)  # Meta's DINOv2 keeps its pretraining token
    # One rotary module shared by the tower and every block, as the official: its buffers appear once per path.
    freqs_cos, freqs_sin = torch.randn(16, 16), torch.randn(16, 16)
    out["backbone.rope.freqs_cos"], out["backbone.rope.freqs_sin"] = freqs_cos, freqs_sin
    for i in range(len(model.backbone.vlm.blocks)):
        out[f"backbone.blocks.{i}.attn.rope.freqs_cos"] = freqs_cos
        out[f"backbone.blocks.{i}.attn.rope.freqs_sin"] = freqs_sin
    out["random_text"] = torch.randn(19, 24)  # allocated by the official EVA segmentor, never used
    out["reg_E0.cls_token"] = torch.randn(1, 1, 32)  # tqdm's frozen backbone copy: dropped wherever it appears
    return out


def official_clip_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The stride-16 CLIP variant's state in the released layout (OpenAI names for the CLIP tower)."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for key, value in state.items():
        value = value.clone()
        shared = _shared_parts(key, value)
        if shared is not None:
            out[shared[0]] = shared[1]
    vlm = {k[len("backbone.vlm."):]: v.clone() for k, v in state.items() if k.startswith("backbone.vlm.")}
    cls = vlm.pop("cls_token").reshape(-1)
    pos = vlm.pop("pos_embed")[0]
    # The official tower adds the class embedding to the class position too (converted back by the converter).
    pos[0] = pos[0] - cls
    out.update({"backbone.class_embedding": cls, "backbone.positional_embedding": pos,
                "backbone.conv1.weight": vlm.pop("patch_embed.proj.weight"),
                "backbone.proj": vlm.pop("head.weight").t().contiguous()})
    assert not vlm.pop("head.bias").any()  # the official projection has no bias
    for key, value in vlm.items():
        if key.startswith("blocks."):
            index, rest = key[len("blocks."):].split(".", 1)
            for ours, theirs in CLIP_BLOCK_TO_OFFICIAL:
                rest = rest.replace(ours, theirs)
            out[f"backbone.transformer.resblocks.{index}.{rest}"] = value
        else:
            out["backbone." + key.replace("norm_pre.", "ln_pre.").replace("norm.", "ln_post.")] = value
    out["backbone.dinov2.mask_token"] = torch.randn(1, model.backbone.dino.embed_dim)
    return out


def save_mmcv(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """An mmcv 1.x checkpoint: {'meta', 'state_dict', 'optimizer'}."""
    meta = {"mmcv_version": "1.5.0", "CLASSES": ["road", "sidewalk"], "iter": 20000}
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4}]}
    torch.save({"meta": meta, "state_dict": state, "optimizer": optimizer}, path)
    return path


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_converts_the_official_layout_exactly(tmp_path, capsys):
    model = tiny_model(TINY_MFUSER_CONFIG, seed=0)
    src = save_mmcv(tmp_path / "epoch_last.pth", official_state(model))
    config = write_config(tmp_path / "tiny.yaml", TINY_MFUSER_CONFIG)
    out = tmp_path / "weights" / "mfuser_tiny.safetensors"
    assert convert_main(["--src", str(src), "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random_text" in printed and "reg_E0.cls_token" in printed and "rotary" in printed
    assert "mask_token" in printed and f"wrote {out}" in printed

    converted = load_file(str(out))
    original = model.state_dict()
    assert sorted(converted) == sorted(original)
    unequal = [k for k in original if not torch.equal(converted[k], original[k])]
    assert not unequal, unequal

    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    fresh = build_model(config_from_dict(TINY_MFUSER_CONFIG).model, load_weights=False)
    fresh.load_state_dict(converted, strict=True)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(fresh.eval()(x), want)
        # training.export reads the file as it is (constant text, the same scores).
        exported = load_export_model(config_from_dict(TINY_MFUSER_CONFIG), out, (56, 56))
        torch.testing.assert_close(exported(x), want)


def test_stride16_clip_variant_with_projections(tmp_path):
    model = tiny_model(TINY_CLIP_CONFIG, seed=2)
    with torch.no_grad():
        model.backbone.vlm.head.bias.zero_()  # OpenAI CLIP's projection has no bias
    state = official_clip_state(model)
    assert "backbone.adapter_proj1.3.weight" in state and "backbone.adapter_proj3.bias" in state
    with torch.device("meta"):
        target = build_model(config_from_dict(TINY_CLIP_CONFIG).model, load_weights=False)
    converted = convert_official_mfuser(state, target)
    original = model.state_dict()
    assert sorted(converted) == sorted(original)
    # pos_embed[:, 0] is rebuilt as (p − c) + c, the rest is moved unchanged.
    torch.testing.assert_close(converted["backbone.vlm.pos_embed"], original["backbone.vlm.pos_embed"])
    unequal = [k for k in original if k != "backbone.vlm.pos_embed" and not torch.equal(converted[k], original[k])]
    assert not unequal, unequal
    fresh = build_model(config_from_dict(TINY_CLIP_CONFIG).model, load_weights=False).eval()
    fresh.load_state_dict(converted, strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_official_sizes_on_the_meta_device():
    """The official EVA02 variant at 512 (shapes only): the released layout's shapes fit the default sizes."""
    config = {"model": {"family": "mfuser", "backbone": {"name": "dinov2_l14", "weights": "", "lora": None},
                        "mfuser": {}}}
    with torch.device("meta"):
        model = build_model(config_from_dict(config).model, load_weights=False)
        state = official_state(model)
    # Shapes as the official code builds them (EVA and DINOv2 position tables at 36×36 + class, prompt length 13).
    official_shapes = {"backbone.pos_embed": (1, 1297, 1024), "backbone.dinov2.pos_embed": (1, 1297, 1024),
                       "backbone.blocks.0.mlp.w1.weight": (2730, 1024), "backbone.blocks.0.attn.q_bias": (1024,),
                       "backbone.head.weight": (768, 1024), "backbone.adapter.23.x_proj.weight": (96, 512),
                       "backbone.fpn1.0.weight": (2048, 2048, 2, 2), "text_encoder.positional_embedding": (13, 768),
                       "contexts": (1, 8, 768), "gamma": (768,), "decode_head.query_embed.weight": (19, 256),
                       "decode_head.pixel_decoder.input_convs.0.conv.weight": (256, 2048, 1, 1)}
    assert {k: tuple(state[k].shape) for k in official_shapes} == official_shapes
    converted = convert_official_mfuser(state, model)
    model.load_state_dict(converted, strict=True, assign=True)


def test_missing_and_misfitting_entries_are_named():
    with torch.device("meta"):
        model = build_model(config_from_dict(TINY_MFUSER_CONFIG).model, load_weights=False)
    state = official_state(tiny_model(TINY_MFUSER_CONFIG))
    broken = dict(state)
    del broken["backbone.adapter.1.A_log"]
    with pytest.raises(ValueError, match=r"missing \['backbone\.fusers\.1\.A_log'\].*official names: "
                                         r"\['backbone\.adapter\.1\.A_log'\]"):
        convert_official_mfuser(broken, model)
    broken = dict(state, **{"backbone.adapter.0.D": torch.zeros(3), "decode_head.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected \['decode_head\.decoder\.extra\.weight'\].*"
                                         r"backbone\.fusers\.0\.D expected \(16,\) found \(3,\)"):
        convert_official_mfuser(broken, model)
    # A model built at another size would need resampled position embeddings: refused, not resampled.
    with torch.device("meta"):
        larger = build_model(config_from_dict(TINY_MFUSER_CONFIG).model, img_size=(70, 70), load_weights=False)
    with pytest.raises(ValueError, match=r"pos_embed holds 17 tokens, the model built from the config 26"):
        convert_official_mfuser(state, larger)
    # BatchNorm counters missing from a checkpoint are filled (they do nothing in eval mode).
    lean = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    filled = convert_official_mfuser(lean, model)
    assert int(filled["backbone.fpn.fpn1.1.num_batches_tracked"]) == 0
    assert official_name("decode_head.decoder.query_embed.weight") == "decode_head.query_embed.weight"
    assert official_name("backbone.vlm.blocks.0.attn.q_proj.weight") is None


def test_refusals(tmp_path, capsys):
    model = tiny_model(TINY_MFUSER_CONFIG)
    state = official_state(model)
    config = write_config(tmp_path / "tiny.yaml", TINY_MFUSER_CONFIG)
    src = save_mmcv(tmp_path / "epoch_last.pth", state)
    out = tmp_path / "mfuser.safetensors"

    # Not an MFuser: a bare DINOv2, this package's own names, a file of no tensors.
    dino = tmp_path / "dinov2.pth"
    torch.save({k[len("backbone.dinov2."):]: v for k, v in state.items() if k.startswith("backbone.dinov2.")}, dino)
    assert convert_main(["--src", str(dino), "--config", str(config), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "not an official MFuser checkpoint" in err and "backbone.adapter." in err and "single vision tower" in err
    ours = tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ours))
    assert convert_main(["--src", str(ours), "--config", str(config), "--out", str(out)]) == 1
    assert "already uses this package's names" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    torch.save({"meta": {}, "state_dict": {"a": [1, 2]}}, junk)
    assert convert_main(["--src", str(junk), "--config", str(config), "--out", str(out)]) == 1
    assert "expected an official MFuser checkpoint" in capsys.readouterr().err
    assert not out.exists()

    # Never overwrites unless asked.
    assert convert_main(["--src", str(src), "--config", str(config), "--out", str(out)]) == 0
    before = out.read_bytes()
    assert convert_main(["--src", str(src), "--config", str(config), "--out", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert convert_main(["--src", str(src), "--config", str(config), "--out", str(out), "--overwrite"]) == 0
    assert convert_main(["--src", str(src), "--config", str(config), "--out", str(tmp_path / "x.pth")]) == 1
    assert ".safetensors" in capsys.readouterr().err


def test_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "training.convert_mfuser", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--overwrite" in result.stdout
