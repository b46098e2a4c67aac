"""Depth Anything V2 encoder as a timm DINOv2 ViT: catalog entries and checkpoint conversion (tiny models, CPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.backbones import catalog
from training.backbones.catalog import CATALOG, catalog_entry, create_backbone, find_entry, resolve_timm_name
from training.backbones.convert import convert_dinov2, encoder_state, main as convert_main
from training.backbones.vit import create_vit

transformers = pytest.importorskip("transformers")

WIDTH, DEPTH, HEADS, GRID = 32, 3, 2, 4
SIDE = 14 * GRID  # square and at the config's image size: Hugging Face Dinov2 then uses its pos-embed as is
TINY = {"embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere; layer-scales well away from their 1e-5 / 1.0 inits, so they matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def hf_dinov2_config(swiglu: bool = False) -> "transformers.Dinov2Config":
    return transformers.Dinov2Config(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, patch_size=14, image_size=SIDE,
        use_swiglu_ffn=swiglu, out_features=[f"stage{i + 1}" for i in range(DEPTH)], reshape_hidden_states=False)


def tiny_hf_depth_anything(seed: int = 0) -> torch.nn.Module:
    """A transformers DepthAnythingForDepthEstimation with a 3-block, 32-wide Dinov2 backbone."""
    config = transformers.DepthAnythingConfig(
        backbone_config=hf_dinov2_config(), reassemble_hidden_size=WIDTH, patch_size=14, fusion_hidden_size=16,
        neck_hidden_sizes=[8, 16, 32], reassemble_factors=[2, 1, 0.5], head_hidden_size=8)
    model = transformers.DepthAnythingForDepthEstimation(config).eval()
    randomise(model, seed)
    return model


def to_checkpoint_names(state: dict) -> dict:
    """transformers 5 module names → the names stored in hub checkpoints (attention.attention.query, …)."""
    renames = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
               ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}
    out = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        out[key] = value
    return out


def timm_tokens(vit: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Embedding output then every block's output tokens (class token included), as HF's hidden_states."""
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    out = [tokens]
    for block in vit.blocks:
        tokens = block(tokens)
        out.append(tokens)
    return out


def test_hf_depth_anything_matches_timm_block_by_block(tmp_path, capsys):
    model = tiny_hf_depth_anything()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "backbone.encoder.layer.0.layer_scale1.lambda1" in state and any(k.startswith("neck.") for k in state)
    src, dst = tmp_path / "model.safetensors", tmp_path / "da_v2_tiny14.safetensors"
    save_file(state, str(src))
    # Patch 14 at the native grid: layout change only, no resampling on either side.
    assert convert_main(["--src", str(src), "--dst", str(dst), "--patch", "14", "--img", str(SIDE)]) == 0
    printed = capsys.readouterr().out
    assert "layout: Hugging Face transformers Dinov2 under 'backbone.' (DepthAnythingForDepthEstimation)" in printed
    assert "dropped (not the encoder): head.* (6 tensors), neck.* (" in printed
    assert "resized" not in printed and "pos_embed: grid" not in printed
    converted = load_file(str(dst))
    assert not any(k.startswith(("neck.", "head.", "backbone.")) for k in converted)
    with safe_open(str(dst), "pt") as f:
        assert "Hugging Face" in f.metadata()["source_layout"]

    vit = create_vit("depth_anything_v2_s14", (SIDE, SIDE), weights=str(dst), overrides=TINY).eval()
    torch.testing.assert_close(vit.blocks[1].ls2.gamma.detach(), state["backbone.encoder.layer.1.layer_scale2.lambda1"],
                               rtol=0, atol=0)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        hf = model.backbone(x, output_hidden_states=True)
        ours = timm_tokens(vit, x)
        assert len(hf.hidden_states) == DEPTH + 1
        for i, (got, want) in enumerate(zip(ours, hf.hidden_states)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"hidden state {i}")
        torch.testing.assert_close(vit.norm(ours[-1]), model.backbone.layernorm(hf.hidden_states[-1]),
                                   rtol=1e-5, atol=1e-5)
        # The catalog backbone's taps are the same tokens as NCHW maps (class token dropped, no final norm).
        backbone = create_backbone("depth_anything_v2_s14", (SIDE, SIDE), weights=str(dst), overrides=TINY,
                                   out_indices=list(range(DEPTH))).eval()
        for i, feat in enumerate(backbone(x)):
            want = hf.hidden_states[i + 1][:, 1:].reshape(2, GRID, GRID, WIDTH).permute(0, 3, 1, 2)
            torch.testing.assert_close(feat, want, rtol=1e-5, atol=1e-5)


def test_hf_layouts_agree():
    """Checkpoint names, transformers 5 names and a bare Dinov2Model all give the same Meta-layout tensors."""
    state = tiny_hf_depth_anything().state_dict()
    modern, report = encoder_state(state)
    assert "transformers 5 module names" in report[0]
    legacy, report = encoder_state(to_checkpoint_names(state))
    assert "checkpoint names" in report[0]
    bare, report = encoder_state({k.removeprefix("backbone."): v for k, v in state.items()
                                  if k.startswith("backbone.")})
    assert report == ["layout: Hugging Face transformers Dinov2 bare, transformers 5 module names; "
                      "q/k/v fused into attn.qkv"]
    for other in (legacy, bare):
        assert other.keys() == modern.keys() and all(torch.equal(other[k], modern[k]) for k in modern)
    prefix = "backbone.encoder.layer.2.attention."
    qkv = torch.cat([state[prefix + f"{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(modern["blocks.2.attn.qkv.weight"], qkv)
    assert torch.equal(modern["pos_embed"], state["backbone.embeddings.position_embeddings"])
    assert torch.equal(modern["norm.weight"], state["backbone.layernorm.weight"])


def test_hf_swiglu_matches_timm_giant_layout():
    """A SwiGLU Dinov2 (ViT-g style) from transformers: gate/up fuse into timm's packed fc1, gate first."""
    model = transformers.Dinov2Model(hf_dinov2_config(swiglu=True)).eval()
    randomise(model, 1)
    meta, _ = encoder_state(model.state_dict())
    converted, report = convert_dinov2(meta, patch=14, img=SIDE)
    assert any("SwiGLU" in line for line in report)
    hidden = converted["blocks.0.mlp.fc1.weight"].shape[0]
    vit = create_vit("vit_giant_patch14_dinov2", (SIDE, SIDE), overrides={**TINY, "mlp_ratio": hidden / WIDTH}).eval()
    vit.load_state_dict(converted)
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        hf = model(x, output_hidden_states=True)
        for got, want in zip(timm_tokens(vit, x), hf.hidden_states):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def timm_dinov2_as_meta(seed: int) -> dict:
    """A tiny DINOv2 (patch 14, 5×5 grid) in Meta's key layout: timm's keys plus Meta's mask_token."""
    torch.manual_seed(seed)
    vit = create_vit("vit_small_patch14_dinov2", (70, 70), overrides=TINY)
    randomise(vit, seed)
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    state["mask_token"] = torch.randn(1, WIDTH)
    return state


def test_release_pth_converts_like_bare_dinov2(tmp_path, capsys):
    meta = timm_dinov2_as_meta(3)
    release = {f"pretrained.{k}": v for k, v in meta.items()}
    release.update({"depth_head.projects.0.weight": torch.randn(8, WIDTH, 1, 1),
                    "depth_head.projects.0.bias": torch.randn(8),
                    "depth_head.scratch.output_conv2.2.weight": torch.randn(1, 8, 1, 1)})
    src, dst = tmp_path / "depth_anything_v2_vits.pth", tmp_path / "depth_anything_v2_vits16_64.safetensors"
    torch.save(release, src)
    assert convert_main(["--src", str(src), "--dst", str(dst), "--patch", "16", "--img", "64"]) == 0
    printed = capsys.readouterr().out
    assert "layout: Depth Anything V2 release (Meta DINOv2 encoder under 'pretrained.')" in printed
    assert "dropped (not the encoder): depth_head.* (3 tensors)" in printed
    assert "patch_embed.proj.weight: (32, 3, 14, 14) -> (32, 3, 16, 16)" in printed
    assert "pos_embed: grid 5x5 -> 4x4" in printed

    out = load_file(str(dst))
    want, _ = convert_dinov2(meta, patch=16, img=64)
    assert out.keys() == want.keys() and all(torch.equal(out[k], want[k]) for k in want)
    assert not any("depth_head" in k or k.startswith("pretrained.") for k in out)

    # Built through the lockstep entries, the DA-V2 file and the same DINOv2 file give the same maps.
    bare = tmp_path / "dinov2_tiny16.safetensors"
    save_file(want, str(bare))
    depth = create_backbone("depth_anything_v2_l16", (64, 64), weights=str(dst), overrides=TINY).eval()
    dino = create_backbone("dinov2_l16", (64, 64), weights=str(bare), overrides=TINY).eval()
    assert depth.patch_size == 16 and torch.equal(depth.model.pos_embed.detach(), out["pos_embed"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(depth(x), dino(x)):
            assert a.shape == (1, WIDTH, 4, 4) and torch.equal(a, b)


def test_plain_dinov2_layout_is_reported_and_untouched():
    meta = timm_dinov2_as_meta(4)
    state, report = encoder_state(meta)
    assert report == ["layout: DINOv2, Meta/timm keys (bare)"] and state.keys() == meta.keys()
    assert all(state[k] is meta[k] for k in meta)


def test_release_layout_at_real_size_on_meta_device():
    """depth_anything_v2_vitl.pth shapes (meta tensors) → exactly the depth_anything_v2_l16 model at 512."""
    with torch.device("meta"):
        vitl = create_vit("vit_large_patch14_dinov2", (518, 518))
        release = {f"pretrained.{k}": v for k, v in vitl.state_dict().items()}
        release["pretrained.mask_token"] = torch.empty(1, 1024)
        release["depth_head.projects.0.weight"] = torch.empty(256, 1024, 1, 1)
        state, _ = encoder_state(release)
        converted, _ = convert_dinov2(state, patch=16, img=512)
        model = create_backbone("depth_anything_v2_l16", (512, 512)).model
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape)
                                                                 for k, v in model.state_dict().items()}
    assert tuple(converted["pos_embed"].shape) == (1, 1 + 32 * 32, 1024)


def test_hf_large_at_real_size_on_meta_device():
    """Depth-Anything-V2-Large-hf's architecture (meta tensors) → the depth_anything_v2_l16 model at 512."""
    backbone = transformers.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                         patch_size=14, image_size=518, out_indices=[5, 12, 18, 24])
    config = transformers.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=1024,
                                              neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256)
    with torch.device("meta"):
        hf = transformers.DepthAnythingForDepthEstimation(config)
        state, report = encoder_state(to_checkpoint_names(hf.state_dict()))
        converted, _ = convert_dinov2(state, patch=16, img=512)
        model = create_backbone("depth_anything_v2_l16", (512, 512)).model
    assert "checkpoint names" in report[0]
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape)
                                                                 for k, v in model.state_dict().items()}


def test_catalog_entries_and_dinov2_first():
    for key, timm_name, dim, depth in (("depth_anything_v2_s14", "vit_small_patch14_dinov2", 384, 12),
                                       ("depth_anything_v2_b14", "vit_base_patch14_dinov2", 768, 12),
                                       ("depth_anything_v2_l14", "vit_large_patch14_dinov2", 1024, 24)):
        entry = catalog_entry(key)
        assert (entry.timm_name, entry.embed_dim, entry.depth, entry.patch_size) == (timm_name, dim, depth, 14)
        assert entry.hub_tag == "" and entry.mean == catalog.IMAGENET_MEAN and entry.std == catalog.IMAGENET_STD
        assert "--patch 14 --img 518" in entry.weights_note and find_entry(key) is entry
        assert resolve_timm_name(key) == (timm_name, {})
    l16 = catalog_entry("depth_anything_v2_l16")
    assert l16.patch_size == 16 and l16.out_indices == CATALOG["dinov2_l16"].out_indices  # lockstep taps
    assert resolve_timm_name("depth_anything_v2_l16") == ("vit_large_patch14_dinov2", {"patch_size": 16})
    assert "--src depth_anything_v2_vitl.pth --dst depth_anything_v2_vitl16_512.safetensors" in l16.weights_note
    with pytest.raises(ValueError, match="no hub weights.*depth_anything_v2_vitl.pth"):
        resolve_timm_name("depth_anything_v2_l16", hub=True)
    with pytest.raises(ValueError, match="no hub weights"):
        create_vit("depth_anything_v2_s14", (28, 28), weights="hub")

    # A plain timm name means timm's own (DINOv2) weights, whatever the catalog order.
    for name, key in (("vit_small_patch14_dinov2", "dinov2_s14"), ("vit_base_patch14_dinov2", "dinov2_b14"),
                      ("vit_large_patch14_dinov2", "dinov2_l14"), ("vit_large_patch14_dinov2.lvd142m", "dinov2_l14")):
        assert find_entry(name).key == key and catalog_entry(name).key == key
    reordered = dict(sorted(CATALOG.items(), key=lambda item: not item[0].startswith("depth_anything")))
    assert next(iter(reordered)).startswith("depth_anything")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(catalog, "CATALOG", reordered)
        assert catalog.find_entry("vit_large_patch14_dinov2").key == "dinov2_l14"
        assert catalog.find_entry("vit_small_patch14_dinov2").key == "dinov2_s14"
        assert catalog.find_entry("vit_large_patch14_dinov2.other") is None


def test_unknown_and_broken_files_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"no ViT encoder found: expected .*'pretrained\.'.*'backbone\.'.*"
                                         r"found keys: classifier\.weight"):
        encoder_state({"classifier.weight": torch.zeros(2, 2), "stem.conv.weight": torch.zeros(2, 2)})
    state = tiny_hf_depth_anything().state_dict()
    with pytest.raises(ValueError, match="several encoders"):
        encoder_state({**state, **{f"pretrained.{k}": v for k, v in timm_dinov2_as_meta(0).items()}})
    incomplete = {k: v for k, v in state.items() if ".layer.1.attention.v_proj." not in k}
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight needs 3 pieces, found \[0, 1\]"):
        encoder_state(incomplete)
    with pytest.raises(ValueError, match=r"keys not in a Dinov2 encoder: backbone\.encoder\.layer\.0\.adapter"):
        encoder_state({**state, "backbone.encoder.layer.0.adapter.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="mixed naming"):
        encoder_state({**state, **to_checkpoint_names(state)})

    unknown = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3)}, str(unknown))
    assert convert_main(["--src", str(unknown), "--dst", str(tmp_path / "a.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "no ViT encoder found" in err and "Depth Anything V2" in err and "conv1.weight" in err
    assert not (tmp_path / "a.safetensors").exists()
    good = tmp_path / "good.pth"
    torch.save({f"pretrained.{k}": v for k, v in timm_dinov2_as_meta(0).items()}, good)
    corrupt = tmp_path / "depth_anything_v2_vits.pth"
    corrupt.write_bytes(good.read_bytes()[:300])
    assert convert_main(["--src", str(corrupt), "--dst", str(tmp_path / "b.safetensors")]) == 1
    assert "depth_anything_v2_vits.pth" in capsys.readouterr().err and not (tmp_path / "b.safetensors").exists()
