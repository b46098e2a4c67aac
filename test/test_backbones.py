"""Backbone catalog, multi-level taps, weight loading and the DINOv2 patch-14 → 16 conversion (tiny models)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.eva import Eva

from training.backbones.catalog import (CATALOG, catalog_entry, create_backbone, default_out_indices, find_entry,
                                        resolve_timm_name)
from training.backbones.convert import convert_dinov2, main as convert_main
from training.backbones.vit import ViTBackbone, create_vit, load_backbone_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def tiny_size(patch: int) -> tuple[int, int]:
    """A 2×3-token image for the patch size."""
    return (2 * patch, 3 * patch)


def tiny(key: str, seed: int = 0, **kwargs) -> ViTBackbone:
    torch.manual_seed(seed)
    return create_backbone(key, tiny_size(CATALOG[key].patch_size), overrides=TINY, **kwargs).eval()


def test_catalog_lookup_and_defaults():
    assert catalog_entry("dinov2_l16").patch_size == 16
    assert catalog_entry("vit_large_patch14_dinov2").key == "dinov2_l14"  # never the patch-16 variant
    assert catalog_entry("vit_large_patch14_dinov2.lvd142m").key == "dinov2_l14"
    assert catalog_entry("vit_large_patch14_clip_quickgelu_224.openai").key == "clip_l14"
    assert find_entry("vit_large_patch14_clip_quickgelu_224.dfn2b") is None  # other weights, other normalisation
    with pytest.raises(ValueError, match=r"unknown backbone 'dinov3_l'.*dinov2_l16.*siglip_l16"):
        catalog_entry("dinov3_l")
    for key in ("dinov2_l14", "dinov2_l16"):
        assert list(CATALOG[key].out_indices) == [7, 11, 15, 23]
    assert list(CATALOG["dinov2_s14"].out_indices) == [2, 5, 8, 11]
    assert list(CATALOG["dinov2_g14"].out_indices) == [9, 19, 29, 39]
    assert default_out_indices("dinov2_l16", 4) == [0, 1, 2, 3]  # a tiny depth falls back to quarter depth
    assert default_out_indices("vit_base_patch16_224", 12) == [2, 5, 8, 11]
    assert resolve_timm_name("dinov2_l16") == ("vit_large_patch14_dinov2", {"patch_size": 16})
    assert resolve_timm_name("eva02_l14", hub=True)[0] == "eva02_large_patch14_clip_336.merged2b"
    with pytest.raises(ValueError, match="training.backbones.convert"):
        resolve_timm_name("dinov2_l16", hub=True)  # hub weights are patch 14; the file comes from the conversion
    with pytest.raises(ValueError, match="not a timm model nor a catalog key"):
        create_vit("vit_nonexistent", (28, 28))
    # Plain timm names still work, with quarter-depth taps.
    plain = create_backbone("vit_base_patch16_224", (32, 48), overrides=TINY)
    assert plain.out_indices == [0, 1, 2, 3] and plain(torch.randn(1, 3, 32, 48))[0].shape == (1, 32, 2, 3)


@pytest.mark.parametrize("key", sorted(CATALOG))
def test_catalog_entry_matches_timm_at_real_size(key):
    """Each entry's numbers are those of the timm model (built on the meta device: no memory)."""
    entry = CATALOG[key]
    with torch.device("meta"):
        backbone = create_backbone(key, (32 * entry.patch_size, 32 * entry.patch_size))
    vit = backbone.model
    assert (backbone.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads, backbone.patch_size) == (
        entry.embed_dim, entry.depth, entry.num_heads, entry.patch_size)
    assert backbone.out_indices == list(entry.out_indices)
    cfg = vit.pretrained_cfg
    assert tuple(cfg["mean"]) == entry.mean and tuple(cfg["std"]) == entry.std
    if entry.hub_tag:
        assert cfg["tag"] == entry.hub_tag and entry.hub_name in timm.list_pretrained(entry.timm_name + "*")
    module_names = {name.rsplit(".", 1)[-1] for name, _ in vit.named_modules()}
    assert set(entry.lora_targets) <= module_names


def test_dinov2_l16_real_size():
    with torch.device("meta"):
        backbone = create_backbone("dinov2_l16", (512, 512))
    vit = backbone.model
    params = sum(p.numel() for p in vit.parameters())
    assert backbone.embed_dim == 1024 and len(vit.blocks) == 24 and backbone.patch_size == 16
    assert tuple(vit.pos_embed.shape) == (1, 1 + 32 * 32, 1024)
    assert abs(params / 1e6 - 304.2) < 0.5, params
    assert backbone.out_indices == [7, 11, 15, 23]


@pytest.mark.parametrize("key", sorted(CATALOG))
def test_tiny_variants_give_nchw_maps(key):
    backbone = tiny(key)
    h, w = tiny_size(backbone.patch_size)
    feats = backbone(torch.randn(2, 3, h, w))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 2, 3)] * 4
    assert all(torch.isfinite(f).all() for f in feats)


def manual_taps(vit: torch.nn.Module, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """Block-by-block forward: the residual stream after each chosen block, prefix tokens dropped, no final norm."""
    tokens = vit.patch_embed(x)
    rope = None
    if isinstance(vit, Eva):
        tokens, rope = vit._pos_embed(tokens)
    else:
        tokens = vit._pos_embed(tokens)
    tokens = vit.norm_pre(tokens)
    h, w = x.shape[2] // vit.patch_embed.patch_size[0], x.shape[3] // vit.patch_embed.patch_size[1]
    out = []
    for i, block in enumerate(vit.blocks):
        tokens = block(tokens, rope=rope) if isinstance(vit, Eva) else block(tokens)
        if i in indices:
            grid = tokens[:, vit.num_prefix_tokens:]
            out.append(grid.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2))
    return out


@pytest.mark.parametrize("key,prefix,pre_norm", [("clip_l14", 1, True), ("siglip_l16", 0, False),
                                                 ("eva02_l14", 1, False), ("dinov2_l16", 1, False)])
def test_taps_are_raw_block_outputs(key, prefix, pre_norm):
    backbone = tiny(key, out_indices=[1, 2])
    vit = backbone.model
    assert vit.num_prefix_tokens == prefix and isinstance(vit.norm_pre, torch.nn.LayerNorm) == pre_norm
    with torch.no_grad():  # a non-trivial pre-norm, so skipping it would show
        for p in vit.norm_pre.parameters():
            p.normal_()
    x = torch.randn(2, 3, *tiny_size(backbone.patch_size))
    with torch.no_grad():
        feats = backbone(x)
        expected = manual_taps(vit, x, [1, 2])
        final_norm = getattr(vit, "norm", torch.nn.Identity())
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    normed = final_norm(expected[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert not torch.allclose(feats[-1], normed, atol=1e-3)


@pytest.mark.parametrize("key,suffix", [("dinov2_s14", ".safetensors"), ("eva02_l14", ".pth"),
                                        ("siglip_l16", ".safetensors"), ("clip_l14", ".pt")])
def test_weights_round_trip(tmp_path, key, suffix):
    source = tiny(key, seed=1)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    fresh = tiny(key, seed=2)
    x = torch.randn(1, 3, *tiny_size(source.patch_size))
    with torch.no_grad():
        assert not torch.allclose(fresh(x)[-1], source(x)[-1])
        loaded = create_backbone(key, tiny_size(source.patch_size), weights=str(path), overrides=TINY).eval()
        for a, b in zip(loaded(x), source(x)):
            torch.testing.assert_close(a, b)


def test_weight_errors_are_clear(tmp_path):
    vit = tiny("dinov2_s14").model
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(64, 32)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as info:
        load_backbone_weights(vit, tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "bad.safetensors" in message
    assert "missing ['blocks.0.attn.qkv.weight'] (1 keys)" in message
    assert "unexpected ['blocks.0.attn.qkv_renamed.weight'] (1 keys)" in message
    assert "blocks.1.mlp.fc1.weight expected (128, 32) found (64, 32)" in message
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_backbone_weights(vit, tmp_path / "nowhere.safetensors")
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(good))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_backbone_weights(vit, tmp_path / "cut.safetensors")
    torch.save(vit.state_dict(), tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.pth"):
        load_backbone_weights(vit, tmp_path / "cut.pth")


def meta_dinov2_state(embed: int, depth: int, patch: int, grid: int, swiglu_hidden: int = 0) -> dict:
    """A DINOv2 checkpoint in Meta's key layout (``dinov2_vit*14_pretrain.pth``), random values."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    state = {"cls_token": rand(1, 1, embed), "pos_embed": rand(1, 1 + grid * grid, embed),
             "mask_token": rand(1, embed), "patch_embed.proj.weight": rand(embed, 3, patch, patch),
             "patch_embed.proj.bias": rand(embed), "norm.weight": rand(embed), "norm.bias": rand(embed)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": rand(embed), b + "norm1.bias": rand(embed),
                      b + "attn.qkv.weight": rand(3 * embed, embed), b + "attn.qkv.bias": rand(3 * embed),
                      b + "attn.proj.weight": rand(embed, embed), b + "attn.proj.bias": rand(embed),
                      b + "ls1.gamma": rand(embed), b + "norm2.weight": rand(embed), b + "norm2.bias": rand(embed),
                      b + "ls2.gamma": rand(embed)})
        if swiglu_hidden:  # ViT-g: fused SwiGLU
            hidden = swiglu_hidden
            state.update({b + "mlp.w12.weight": rand(2 * hidden, embed), b + "mlp.w12.bias": rand(2 * hidden),
                          b + "mlp.w3.weight": rand(embed, hidden), b + "mlp.w3.bias": rand(embed)})
        else:
            state.update({b + "mlp.fc1.weight": rand(4 * embed, embed), b + "mlp.fc1.bias": rand(4 * embed),
                          b + "mlp.fc2.weight": rand(embed, 4 * embed), b + "mlp.fc2.bias": rand(embed)})
    return state


def test_convert_meta_checkpoint_to_patch16(tmp_path, capsys):
    # Patch 14 on a 5×5 grid (img 70) → patch 16 at img 64 (4×4 grid): both resizes happen.
    src_state = meta_dinov2_state(32, 2, 14, 5)
    src, dst = tmp_path / "dinov2_tiny_pretrain.pth", tmp_path / "out" / "dinov2_tiny16.safetensors"
    torch.save(src_state, src)
    assert convert_main(["--src", str(src), "--dst", str(dst), "--patch", "16", "--img", "64"]) == 0
    printed = capsys.readouterr().out
    assert "patch_embed.proj.weight: (32, 3, 14, 14) -> (32, 3, 16, 16)" in printed
    assert "pos_embed: grid 5x5 -> 4x4" in printed and "mask_token" in printed

    out = load_file(str(dst))
    assert "mask_token" not in out and tuple(out["pos_embed"].shape) == (1, 17, 32)
    kernel = src_state["patch_embed.proj.weight"]
    torch.testing.assert_close(out["patch_embed.proj.weight"],
                               F.interpolate(kernel, size=(16, 16), mode="bicubic", align_corners=False))
    assert torch.equal(out["pos_embed"][:, :1], src_state["pos_embed"][:, :1])
    grid = src_state["pos_embed"][:, 1:].reshape(1, 5, 5, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 32)
    torch.testing.assert_close(out["pos_embed"][:, 1:], want)
    assert torch.equal(out["blocks.1.ls2.gamma"], src_state["blocks.1.ls2.gamma"])

    # The file loads as is into the patch-16 model, both by timm name and through the catalog entry.
    vit = create_vit("vit_small_patch14_dinov2", (64, 64), weights=str(dst),
                     overrides={"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2})
    backbone = create_backbone("dinov2_l16", (64, 64), weights=str(dst),
                               overrides={"embed_dim": 32, "depth": 2, "num_heads": 2}).eval()
    for model in (vit, backbone.model):  # no runtime resampling
        assert torch.equal(model.pos_embed.detach(), out["pos_embed"])
        assert torch.equal(model.patch_embed.proj.weight.detach(), out["patch_embed.proj.weight"])
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 4, 4)] * 2 and all(torch.isfinite(f).all() for f in feats)

    # Never overwrites; a missing source is named.
    before = dst.read_bytes()
    assert convert_main(["--src", str(src), "--dst", str(dst)]) == 1
    assert "exists" in capsys.readouterr().err and dst.read_bytes() == before
    assert convert_main(["--src", str(tmp_path / "absent.pth"), "--dst", str(tmp_path / "x.safetensors")]) == 1
    assert "absent.pth" in capsys.readouterr().err


def test_convert_timm_layout_and_giant_swiglu():
    # A timm-format checkpoint (no mask_token) converts the same way.
    torch.manual_seed(0)
    source = create_vit("vit_small_patch14_dinov2", (70, 70), overrides={"embed_dim": 32, "depth": 2, "num_heads": 2})
    state, report = convert_dinov2(source.state_dict(), patch=16, img=64)
    assert len(report) == 2 and tuple(state["pos_embed"].shape) == (1, 17, 32)
    # ViT-g: Meta's mlp.w12 / mlp.w3 become timm's fc1 / fc2 through timm's filter.
    giant, report = convert_dinov2(meta_dinov2_state(32, 2, 14, 5, swiglu_hidden=48), patch=16, img=(64, 80))
    assert any("renamed 8 SwiGLU keys" in line for line in report)
    assert tuple(giant["blocks.0.mlp.fc1.weight"].shape) == (96, 32) and "blocks.0.mlp.w12.weight" not in giant
    target = create_vit("vit_giant_patch14_dinov2", (64, 80),
                        overrides={"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 3.0})
    target.load_state_dict(giant)
    with pytest.raises(ValueError, match="not a multiple of patch 16"):
        convert_dinov2(meta_dinov2_state(32, 1, 14, 5), patch=16, img=70)


def test_convert_real_size_on_meta_device():
    """dinov2_vitl14_pretrain.pth layout at real size (meta tensors: shapes only) → the dinov2_l16 model."""
    with torch.device("meta"):
        state = meta_dinov2_state(1024, 24, 14, 37)
        converted, _ = convert_dinov2(state, patch=16, img=512)
        model = create_backbone("dinov2_l16", (512, 512)).model
    assert tuple(converted["patch_embed.proj.weight"].shape) == (1024, 3, 16, 16)
    assert tuple(converted["pos_embed"].shape) == (1, 1025, 1024)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape)
                                                                 for k, v in model.state_dict().items()}


def test_convert_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "training.backbones.convert", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--patch" in result.stdout
