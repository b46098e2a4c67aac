"""Released Rein / DepthForge checkpoints (mmseg 1.x / mmdet 3.x names) → this package's model (tiny, CPU).

The synthetic checkpoints are written from the tiny models' state dicts by a hand-made inverse of the
mapping, in the released names: the tokens under ``backbone.reins.`` (Rein) or ``backbone.depthforge.``
(DepthForge), DQCM as ``decode_head.DQCM``, mmdet 3.x's named modules (``self_attn``, ``cross_attn``,
``ffn``) where this package numbers them, and the transformer decoder's parts directly under
``decode_head``. The frozen towers are not in the released files; they come from their own weight files.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TINY_DEPTHFORGE_CONFIG, TINY_REIN_CONFIG
from training.build import build_model
from training.checkpoint import load_state_dict_file
from training.config import config_from_dict, load_config
from training.convert_rein import (check_against, checkpoint_family, convert_rein_state, main as convert_main,
                                   official_name)
from training.inference import model_at_size

ROOT = Path(__file__).resolve().parents[1]
TOWERS = ("backbone.visual.", "backbone.depth.")
FAMILIES = ("depthforge", "rein")

# Inside one layer, here → mmdet 3.x: the pixel decoder's encoder layers and the transformer decoder's layers.
ENCODER_LAYER = (("attentions.0.", "self_attn."), ("ffns.0.", "ffn."))
DECODER_LAYER = (("attentions.0.", "cross_attn."), ("attentions.1.", "self_attn."), ("ffns.0.", "ffn."))


def tiny_config(family: str) -> dict:
    return copy.deepcopy(TINY_DEPTHFORGE_CONFIG if family == "depthforge" else TINY_REIN_CONFIG)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model with every tensor moved off its init (zero biases and unit norms would hide swaps)."""
    torch.manual_seed(seed)
    model = build_model(config_from_dict(tiny_config(family)).model, load_weights=False)
    with torch.no_grad():
        for value in model.state_dict().values():  # shares storage with the parameters
            if value.is_floating_point():
                value.add_(torch.randn_like(value) * 0.05)
    return model.eval()


def _layer_names(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    """``layers.k.<ours>…`` → ``layers.k.<theirs>…``."""
    match = re.fullmatch(r"(layers\.\d+\.)(.+)", rest)
    if match:
        for ours, theirs in table:
            if match.group(2).startswith(ours):
                return match.group(1) + theirs + match.group(2)[len(ours):]
    return rest


def official_state(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The trained parts in the released layout (no towers)."""
    tokens = "backbone.depthforge." if family == "depthforge" else "backbone.reins."
    decoder = "decode_head.decoder.transformer_decoder."
    encoder = "decode_head.pixel_decoder.encoder."
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(TOWERS):
            continue
        if key.startswith("backbone.reins."):
            name = tokens + key[len("backbone.reins."):]
        elif key.startswith("decode_head.correction."):
            name = "decode_head.DQCM." + key[len("decode_head.correction."):]
        elif key.startswith(decoder):
            name = "decode_head.transformer_decoder." + _layer_names(key[len(decoder):], DECODER_LAYER)
        elif key.startswith("decode_head.decoder."):
            name = "decode_head." + key[len("decode_head.decoder."):]
        elif key.startswith(encoder):
            name = encoder + _layer_names(key[len(encoder):], ENCODER_LAYER)
        else:
            name = key  # querys2feat and the rest of the pixel decoder
        out[name] = value.clone()
    return out


def tower(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """One tower's entries without their prefix (timm names, as training.backbones.convert writes them)."""
    return {k[len(prefix):]: v.clone().contiguous() for k, v in model.state_dict().items() if k.startswith(prefix)}


def meta_dinov2(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The visual tower as a full checkpoint holds it: Meta's DINOv2 names under ``backbone.``, with mask_token."""
    out = {f"backbone.{k}": v for k, v in tower(model, "backbone.visual.").items()}
    out["backbone.mask_token"] = torch.randn(1, model.backbone.embed_dim)
    return out


def junk(family: str) -> dict[str, torch.Tensor]:
    """Entries a released file may carry that the model has no use for."""
    out = {"data_preprocessor.mean": torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1),
           "decode_head.loss_cls.class_weight": torch.ones(20)}
    if family == "depthforge":
        out["backbone.depth_anything.pretrained.cls_token"] = torch.randn(1, 1, 32)
        out["backbone.depth_anything.depth_head.scratch.output_conv1.weight"] = torch.randn(4, 8, 3, 3)
    return out


def save_mmengine(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """An mmengine checkpoint: {'meta', 'state_dict'}."""
    meta = {"mmengine_version": "0.10.3", "iter": 40000, "dataset_meta": {"classes": ("road", "sidewalk")}}
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_released_layout_converts_exactly(family):
    model = tiny_model(family, seed=0)
    state = {**official_state(model, family), **meta_dinov2(model), **junk(family)}
    # The released names this relies on.
    assert "decode_head.transformer_decoder.layers.2.cross_attn.attn.in_proj_weight" in state
    assert "decode_head.pixel_decoder.encoder.layers.1.self_attn.sampling_offsets.weight" in state
    assert "decode_head.pixel_decoder.encoder.layers.1.ffn.layers.0.0.weight" in state
    assert ("decode_head.DQCM.attention_gate.channel_attention.2.weight" in state) == (family == "depthforge")
    assert checkpoint_family(state) == family

    converted, report = convert_rein_state(state)
    cfg = config_from_dict(tiny_config(family))
    check_against(cfg, converted, family)
    original = model.state_dict()
    trained = {k: v for k, v in original.items() if not k.startswith(TOWERS)}
    assert sorted(converted) == sorted(trained)
    unequal = [k for k in trained if not torch.equal(converted[k], trained[k])]
    assert not unequal, unequal
    text = "\n".join(report)
    assert "data_preprocessor.mean" in text and "decode_head.loss_cls.class_weight" in text
    assert "DINOv2 entries" in text and "backbone.blocks.0.attn.qkv.weight" in text
    assert ("backbone.depth_anything.depth_head" in text) == (family == "depthforge")

    torch.manual_seed(123)
    fresh = build_model(cfg.model, load_weights=False).eval()
    towers = {k: v for k, v in original.items() if k.startswith(TOWERS)}
    fresh.load_state_dict({**converted, **towers}, strict=True)
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-6)


def test_with_backbone_takes_the_dinov2_entries(tmp_path_factory):
    model = tiny_model("rein", seed=1)
    state = {**official_state(model, "rein"), **meta_dinov2(model)}
    converted, report = convert_rein_state(state, with_backbone=True)
    assert "backbone.mask_token" in "\n".join(report)
    cfg = config_from_dict(tiny_config("rein"))
    check_against(cfg, converted, "rein")
    original = model.state_dict()
    assert sorted(converted) == sorted(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)
    # The CLI takes the tower from the file, so the config needs no DINOv2 file (Rein has no depth tower).
    tmp_path = tmp_path_factory.mktemp("with_backbone")
    src = save_mmengine(tmp_path / "full.pth", state)
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config("rein"))
    out = tmp_path / "rein.safetensors"
    assert convert_main(["--src", str(src), "--config", str(config_path), "--out", str(out), "--with-backbone"]) == 0
    written = load_file(str(out))
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[k], original[k]) for k in original)
    # A tower given at all must be complete.
    broken = dict(converted)
    del broken["backbone.visual.norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['backbone\.visual\.norm\.weight'\]"):
        check_against(cfg, broken, "rein")


@pytest.mark.parametrize("family", FAMILIES)
def test_official_sizes_on_the_meta_device(family):
    """The paper configs (shapes only): the released layout's shapes fit the models they build."""
    cfg = load_config(ROOT / "training" / "configs" / f"{family}_gta2cbm_dinov2l.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model, load_weights=False)
    state = official_state(model, family)
    tokens = "backbone.depthforge." if family == "depthforge" else "backbone.reins."
    # Shapes as the released code builds them: ViT-L (24 × 1024), 100 tokens of rank 16, 256-wide head.
    official_shapes = {tokens + "learnable_tokens_a": (24, 100, 16), tokens + "learnable_tokens_b": (24, 16, 1024),
                       tokens + "scale": (), tokens + "merge.weight": (256, 768),
                       "decode_head.querys2feat.weight": (256, 256), "decode_head.level_embed.weight": (3, 256),
                       "decode_head.cls_embed.weight": (20, 256), "decode_head.mask_embed.4.weight": (256, 256),
                       "decode_head.transformer_decoder.layers.8.cross_attn.attn.in_proj_weight": (768, 256),
                       "decode_head.transformer_decoder.layers.8.ffn.layers.0.0.weight": (2048, 256),
                       "decode_head.pixel_decoder.input_convs.0.conv.weight": (256, 1024, 1, 1),
                       "decode_head.pixel_decoder.encoder.layers.5.self_attn.sampling_offsets.weight": (192, 256),
                       "decode_head.pixel_decoder.encoder.layers.5.ffn.layers.0.0.weight": (1024, 256),
                       "decode_head.pixel_decoder.lateral_convs.0.conv.weight": (256, 1024, 1, 1)}
    if family == "depthforge":
        official_shapes.update({"decode_head.DQCM.attention_gate.channel_attention.0.weight": (64, 1024, 1, 1),
                                "decode_head.DQCM.attention_gate.spatial_attention.weight": (1, 1024, 3, 3),
                                "decode_head.DQCM.linear_fuse.weight": (1024, 4096, 1, 1)})
    assert {k: tuple(state[k].shape) for k in official_shapes} == official_shapes
    converted, _ = convert_rein_state(state)
    check_against(cfg, converted, family)


def test_cli_writes_a_complete_model_that_inference_loads(tmp_path, capsys):
    model = tiny_model("depthforge", seed=2)
    released = {**official_state(model, "depthforge"), **junk("depthforge")}
    src = save_mmengine(tmp_path / "iter_40000_published.pth", released)
    visual, depth = tmp_path / "dinov2_tiny.safetensors", tmp_path / "depth_anything_tiny.safetensors"
    save_file(tower(model, "backbone.visual."), str(visual))
    save_file(tower(model, "backbone.depth."), str(depth))
    config = tiny_config("depthforge")
    config["model"]["backbone"]["weights"] = str(visual)
    config["model"]["depthforge"]["depth"]["weights"] = str(depth)
    config_path = write_config(tmp_path / "tiny.yaml", config)
    out = tmp_path / "weights" / "depthforge_tiny.safetensors"

    assert convert_main(["--src", str(src), "--config", str(config_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "data_preprocessor.mean" in printed and "Depth Anything V2 entries" in printed
    assert f"from model.backbone.weights {visual}" in printed
    assert f"from model.depthforge.depth.weights {depth}" in printed
    assert f"wrote {out}" in printed
    written = load_file(str(out))
    original = model.state_dict()
    assert sorted(written) == sorted(original)
    unequal = [k for k in original if not torch.equal(written[k], original[k])]
    assert not unequal, unequal
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["contents"] == "complete"

    # What training.export and the evaluation load: the file as it is, through model_at_size.
    loaded = model_at_size(config_from_dict(config), load_state_dict_file(out), (64, 64))
    x = _image(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


def test_cli_heads_only_and_missing_tower_files(tmp_path, capsys):
    model = tiny_model("rein", seed=3)
    src = save_mmengine(tmp_path / "citys2acdc_40k_rein_head.pth", official_state(model, "rein"))
    config = tiny_config("rein")  # backbone.weights ""
    config_path = write_config(tmp_path / "tiny.yaml", config)
    out = tmp_path / "rein.safetensors"

    # A complete file needs the tower file the config names.
    assert convert_main(["--src", str(src), "--config", str(config_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "model.backbone.weights is empty" in err and "--heads-only" in err and not out.exists()
    config["model"]["backbone"]["weights"] = str(tmp_path / "absent.safetensors")
    write_config(config_path, config)
    assert convert_main(["--src", str(src), "--config", str(config_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "absent.safetensors not found" in err and "training.backbones.convert" in err and not out.exists()

    assert convert_main(["--src", str(src), "--config", str(config_path), "--out", str(out), "--heads-only"]) == 0
    written = load_file(str(out))
    original = model.state_dict()
    assert sorted(written) == sorted(k for k in original if not k.startswith(TOWERS))
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["contents"] == "trained parts only"
    # Such a file lacks the towers that inference needs.
    with pytest.raises(ValueError, match=r"missing \['backbone\.visual\."):
        model_at_size(config_from_dict(config), written, (64, 64))


def test_refusals(tmp_path, capsys):
    rein, depthforge = tiny_model("rein", seed=4), tiny_model("depthforge", seed=4)
    rein_state, depthforge_state = official_state(rein, "rein"), official_state(depthforge, "depthforge")
    configs = {f: write_config(tmp_path / f"{f}.yaml", tiny_config(f)) for f in FAMILIES}
    out = tmp_path / "out.safetensors"

    def refused(state_or_path: dict | Path, family: str, *extra: str) -> str:
        src = state_or_path if isinstance(state_or_path, Path) else save_mmengine(tmp_path / "src.pth", state_or_path)
        code = convert_main(["--src", str(src), "--config", str(configs[family]), "--out", str(out), "--heads-only",
                             *extra])
        assert code == 1 and not out.exists() and not list(tmp_path.glob("*.partial"))
        return capsys.readouterr().err

    # The other family's config.
    err = refused(depthforge_state, "rein")
    assert "is a DepthForge checkpoint (backbone.depthforge.*, decode_head.DQCM.*)" in err
    assert "use a depthforge config" in err
    err = refused(rein_state, "depthforge")
    assert "is a Rein checkpoint (backbone.reins.*, no decode_head.DQCM.*)" in err and "use a rein config" in err

    # A plain Mask2Former head: learned queries instead of querys2feat.
    plain = {k: v for k, v in rein_state.items() if not k.startswith("decode_head.querys2feat.")}
    plain.update({"decode_head.query_feat.weight": torch.randn(10, 32), "decode_head.query_embed.weight":
                  torch.randn(10, 32)})
    assert "plain Mask2Former head" in refused(plain, "rein")
    # Beside querys2feat they are leftovers, dropped.
    _, report = convert_rein_state({**rein_state, "decode_head.query_embed.weight": torch.randn(10, 32)})
    assert any("decode_head.query_embed.weight" in line for line in report)

    # Unknown, missing and mis-shaped entries, named (the missing ones also in the released names).
    err = refused({**rein_state, "decode_head.extra.weight": torch.zeros(1)}, "rein")
    assert "unexpected ['decode_head.extra.weight']" in err
    broken = dict(rein_state)
    del broken["decode_head.transformer_decoder.post_norm.weight"]
    err = refused(broken, "rein")
    assert "missing ['decode_head.decoder.transformer_decoder.post_norm.weight']" in err
    assert "released names: decode_head.transformer_decoder.post_norm.weight" in err
    err = refused({**rein_state, "backbone.reins.learnable_tokens_a": torch.zeros(4, 10, 8)}, "rein")
    assert "backbone.reins.learnable_tokens_a expected (4, 10, 4) found (4, 10, 8)" in err

    # Files that cannot be read, or are not Rein / DepthForge checkpoints.
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    err = refused(corrupt, "rein")
    assert "cannot load" in err and "expected a released Rein or DepthForge checkpoint" in err
    assert "not found" in refused(tmp_path / "absent.pth", "rein")
    dino = tmp_path / "dinov2.pth"
    torch.save(tower(rein, "backbone.visual."), dino)
    err = refused(dino, "rein")
    assert "not a Rein or DepthForge checkpoint" in err and "single vision tower" in err
    ours = tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in rein.state_dict().items()}, str(ours))
    assert "already uses this package's names" in refused(ours, "rein")

    # Layouts this model cannot hold.
    full_rank = {k: v for k, v in rein_state.items() if not k.startswith("backbone.reins.learnable_tokens_")}
    full_rank["backbone.reins.learnable_tokens"] = torch.randn(4, 10, 32)
    with pytest.raises(ValueError, match="full-rank tokens"):
        convert_rein_state(full_rank)
    with pytest.raises(ValueError, match="no such projections"):
        convert_rein_state({**rein_state, "decode_head.decoder_input_projs.0.weight": torch.randn(32, 32, 1, 1)})

    # The output: never overwritten unless asked, and always .safetensors.
    src = save_mmengine(tmp_path / "rein.pth", rein_state)
    args = ["--src", str(src), "--config", str(configs["rein"]), "--heads-only"]
    assert convert_main([*args, "--out", str(out)]) == 0
    before = out.read_bytes()
    assert convert_main([*args, "--out", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert convert_main([*args, "--out", str(out), "--overwrite"]) == 0
    assert convert_main([*args, "--out", str(tmp_path / "x.pth")]) == 1
    assert ".safetensors" in capsys.readouterr().err


def test_official_names_for_messages():
    assert official_name("backbone.reins.scale", "depthforge") == "backbone.depthforge.scale"
    assert official_name("decode_head.correction.linear_fuse.weight") == "decode_head.DQCM.linear_fuse.weight"
    assert (official_name("decode_head.decoder.transformer_decoder.layers.4.attentions.1.attn.in_proj_bias")
            == "decode_head.transformer_decoder.layers.4.self_attn.attn.in_proj_bias")
    assert (official_name("decode_head.pixel_decoder.encoder.layers.0.ffns.0.layers.1.bias")
            == "decode_head.pixel_decoder.encoder.layers.0.ffn.layers.1.bias")
    assert official_name("backbone.visual.cls_token") is None


def test_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "training.convert_rein", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--with-backbone" in result.stdout and "--heads-only" in result.stdout
