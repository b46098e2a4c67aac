"""FusedEncoder (DINOv2 + VLM towers fused by MVFusers) and SimpleFPN on tiny towers; parameter counts at full size.

Three pairings, as the official backbones: DINOv2/14 + EVA02-CLIP/14 (class tokens on both sides), DINOv2/16 +
CLIP/16 with the per-layer projections (the towers' widths differ here so the projections really map), and
DINOv2/16 + SigLIP/16 (no class token, attention-pool head). Images are 64×64: 4×4 tokens at patch 16, and at
patch 14 also 4×4 from the first 56 pixels — the last 8 are dropped, exactly as 512 = 36·14 + 8.

Tolerances, as max|got − ref| ≤ tol · max|ref|:
* the module against a hand-written block-by-block composition: exact (same ops, same order), except SigLIP's
  dense embedding, checked against torch's MultiheadAttention built from the pool's weights (as the official
  code runs it): 1e-5.
* ONNX Runtime (float32) against eager: 1e-4.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import nn

from onnxutil import op_types
from training.backbones.catalog import SIGLIP_MEAN, SIGLIP_STD
from training.backbones.vit import create_vit
from training.models.fused_encoder import FusedEncoder, FusedFeatures, FuserProjections, dense_attention_pool
from training.models.mvfuser import MVFuser
from training.models.simple_fpn import SimpleFPN

SIZE = (64, 64)
GRID = (4, 4)
TINY = {"depth": 4, "num_heads": 2}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VARIANTS = ("eva", "clip16", "siglip")

# Parameters at full size (EVA02-CLIP-L-336 and DINOv2-L/14 at 512, 24 MVFusers, FPN on 2048 channels):
# EVA02-CLIP-L block: norm1 2·1024 + q,k,v 3·1024² + q/v bias 2·1024 + inner LN 2·1024 + proj 1024² + 1024
#   + norm2 2·1024 + SwiGLU fc1_g, fc1_x 2·(2730·1024 + 2730) + sub-LN 2·2730 + fc2 2730·1024 + 1024 = 12,602,024;
#   stem: patch 3·14²·1024 + 1024 = 603,136, cls 1024, pos 1297·1024 = 1,328,128; norm 2048;
#   head (CLIP projection) 1024·768 + 768 = 787,200 → 24·12,602,024 + 603,136 + 1024 + 1,328,128 + 2048 + 787,200.
EVA02_CLIP_L_512 = 305_170_112
# DINOv2-L/14 block: norm1 2048 + qkv 3·1024² + 3072 + proj 1024² + 1024 + ls1 1024 + norm2 2048
#   + fc1 4096·1024 + 4096 + fc2 1024·4096 + 1024 + ls2 1024 = 12,598,272;
#   stem 603,136 + cls 1024 + pos 1297·1024 + norm 2048 = 1,934,336 → 24·12,598,272 + 1,934,336.
DINOV2_L14_512 = 304_292_864
# One MVFuser at d_model 1024 (see test_mvfuser): 1,667,585; 24 of them.
FUSERS_24 = 24 * 1_667_585  # 40,022,040
# FPN on 2048 channels: three ConvTranspose2d(2048, 2048, 2, 2) of 2048²·4 + 2048 = 16,779,264, BN 2·2048.
FPN_2048 = 3 * (2048 * 2048 * 4 + 2048) + 2 * 2048  # 50,341,888
MFUSER_EVA = EVA02_CLIP_L_512 + DINOV2_L14_512 + FUSERS_24 + FPN_2048  # 699,826,904
# Stride-16 CLIP variant: CLIP-L/16 at 512 with its 1024→768 projection (304,937,728), DINOv2-L/16 at 512
# (304,198,656: the stem shrinks to patch 3·16²·1024 + 1024 and pos 1025·1024), and 49 Linear(1024, 1024)
# projections (24 in, 24 out, 1 final) of 1024² + 1024 = 1,049,600.
CLIP_L16_512 = 304_937_728
DINOV2_L16_512 = 304_198_656
PROJECTIONS_24 = 49 * (1024 * 1024 + 1024)  # 51,430,400
MFUSER_CLIP = CLIP_L16_512 + DINOV2_L16_512 + FUSERS_24 + PROJECTIONS_24 + FPN_2048  # 750,930,712
# SigLIP-L/16 at 512 with its attention-pool head: 316,742,656.
SIGLIP_L16_512 = 316_742_656
MFUSER_SIGLIP = SIGLIP_L16_512 + DINOV2_L16_512 + FUSERS_24 + FPN_2048  # 711,305,240


def _count(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got − ref| / max|ref|, in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def build(variant: str, seed: int = 0, scale: float | None = 0.5, img_size: tuple[int, int] = SIZE) -> FusedEncoder:
    """A tiny fused encoder in eval mode; ``scale`` overrides every fuser's output scale (None keeps 1e-3)."""
    torch.manual_seed(seed)
    mean, std, projections = CLIP_MEAN, CLIP_STD, None
    if variant == "eva":
        dino = create_vit("vit_small_patch14_dinov2", img_size, overrides={**TINY, "embed_dim": 32})
        vlm = create_vit("eva02_l14", img_size, overrides={**TINY, "embed_dim": 32}, num_classes=16)
    elif variant == "clip16":
        dino = create_vit("vit_small_patch14_dinov2", img_size, overrides={**TINY, "embed_dim": 32, "patch_size": 16})
        vlm = create_vit("clip_l14_336", img_size, overrides={**TINY, "embed_dim": 48, "patch_size": 16},
                         num_classes=24)
        projections = FuserProjections(32, 48, 4)
    elif variant == "siglip":
        dino = create_vit("vit_small_patch14_dinov2", img_size, overrides={**TINY, "embed_dim": 32, "patch_size": 16})
        vlm = create_vit("siglip_l16", img_size, overrides={**TINY, "embed_dim": 32})
        mean, std = SIGLIP_MEAN, SIGLIP_STD
    else:
        raise AssertionError(variant)
    width = vlm.embed_dim
    fusers = nn.ModuleList(MVFuser(width, d_state=4) for _ in range(4))
    if scale is not None:
        with torch.no_grad():
            for fuser in fusers:
                fuser.scale.fill_(scale)
    model = FusedEncoder(dino, vlm, fusers, SimpleFPN(dino.embed_dim + width), vlm_mean=mean, vlm_std=std,
                         projections=projections)
    return model.eval()


def image(seed: int = 1, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def embed(tower: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A tower's stem written out: patch embedding, prefix + position embedding, pre-norm (and EVA's RoPE)."""
    tokens = tower.patch_embed(x)
    if isinstance(tower, Eva):
        tokens, rope = tower._pos_embed(tokens)
    else:
        tokens, rope = tower._pos_embed(tokens), None
    return tower.norm_pre(tokens), rope


def grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    n, _, c = tokens.shape
    return tokens[:, prefix:].transpose(1, 2).reshape(n, c, *GRID)


def hand_written(model: FusedEncoder, variant: str, x: torch.Tensor) -> FusedFeatures:
    """The official fusion loop, written out with the towers' own modules (no FusedEncoder code)."""
    dino, vlm, proj = model.dino, model.vlm, model.projections
    vlm_mean, vlm_std = (SIGLIP_MEAN, SIGLIP_STD) if variant == "siglip" else (CLIP_MEAN, CLIP_STD)
    as_stat = lambda s: torch.tensor(s).view(1, 3, 1, 1)  # noqa: E731
    pixels = (x * as_stat(vlm_std) + as_stat(vlm_mean) - as_stat(IMAGENET_MEAN)) / as_stat(IMAGENET_STD)
    d, _ = embed(dino, pixels)
    v, rope = embed(vlm, x)
    vlm_prefix = 0 if variant == "siglip" else 1
    taps = []
    for i in range(4):
        v = vlm.blocks[i](v, rope=rope) if rope is not None else vlm.blocks[i](v)
        d = dino.blocks[i](d)
        if proj is None:
            o = model.fusers[i](torch.cat([d, v], dim=1))
            d = d + o[:, :d.shape[1]]
        else:
            o = model.fusers[i](torch.cat([proj.proj1[i](d), v], dim=1))
            d = d + proj.proj2[i](o[:, :d.shape[1]])
        v = v + o[:, d.shape[1]:]
        taps.append(torch.cat([grid(d, 1), grid(v, vlm_prefix)], dim=1))  # quarter-depth taps: every block
    fpn = model.fpn
    maps = [fpn.fpn1(taps[0]), fpn.fpn2(taps[1]), taps[2], F.max_pool2d(taps[3], 2)]
    if variant == "eva":
        tokens = vlm.head(vlm.norm(v) + dino.norm(d))
        return FusedFeatures(maps, tokens[:, 0], grid(tokens, 1))
    if variant == "clip16":
        tokens = vlm.head(vlm.norm(v + proj.proj3(d)))
        return FusedFeatures(maps, tokens[:, 0], grid(tokens, 1))
    # SigLIP: the pool's MultiheadAttention run once with its latent query, once with the patches as queries.
    tokens = vlm.norm(v) + dino.norm(d)[:, 1:]
    pool = vlm.attn_pool
    mha = nn.MultiheadAttention(pool.q.in_features, pool.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.q.weight, pool.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([pool.q.bias, pool.kv.bias]))
        mha.out_proj.weight.copy_(pool.proj.weight)
        mha.out_proj.bias.copy_(pool.proj.bias)
    local = mha(tokens, tokens, tokens, need_weights=False)[0]
    local = local + pool.mlp(pool.norm(local))
    return FusedFeatures(maps, pool(tokens), grid(local, 0))


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_level_order(variant: str) -> None:
    model = build(variant)
    out = model(image())
    assert isinstance(out, FusedFeatures)
    c, e = model.channels, model.joint_dim
    assert (c, e) == {"eva": (64, 16), "clip16": (80, 24), "siglip": (64, 32)}[variant]
    assert [tuple(m.shape) for m in out.maps] == [(2, c, 16, 16), (2, c, 8, 8), (2, c, 4, 4), (2, c, 2, 2)]
    assert tuple(out.global_embed.shape) == (2, e) and tuple(out.visual_embed.shape) == (2, e, *GRID)
    assert all(torch.isfinite(t).all() for t in (*out.maps, out.global_embed, out.visual_embed))
    assert model.out_indices == [0, 1, 2, 3] and model.grid_size == GRID and model.img_size == SIZE


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_hand_written_composition(variant: str) -> None:
    model, x = build(variant), image()
    with torch.no_grad():
        got, ref = model(x), hand_written(model, variant, x)
    for level, (g, r) in enumerate(zip(got.maps, ref.maps)):
        assert torch.equal(g, r), level
    assert torch.equal(got.global_embed, ref.global_embed)
    if variant == "siglip":
        assert _rel_err(got.visual_embed, ref.visual_embed) <= 1e-5
        # The dense pool with the latent as the only query is the pool itself.
        latent_only = dense_attention_pool(model.vlm.attn_pool, model.vlm.attn_pool.latent)
        assert torch.allclose(latent_only, model.vlm.attn_pool(model.vlm.attn_pool.latent)[:, None], atol=1e-6)
    else:
        assert torch.equal(got.visual_embed, ref.visual_embed)


def test_simple_fpn_branch_per_tap() -> None:
    torch.manual_seed(0)
    fpn = SimpleFPN(8).eval()
    assert {n for n, _ in fpn.named_parameters()} == {
        "fpn1.0.weight", "fpn1.0.bias", "fpn1.1.weight", "fpn1.1.bias", "fpn1.3.weight", "fpn1.3.bias",
        "fpn2.0.weight", "fpn2.0.bias"}
    taps = [torch.randn(1, 8, 6, 6) for _ in range(4)]
    out = fpn(taps)
    assert [tuple(o.shape[-2:]) for o in out] == [(24, 24), (12, 12), (6, 6), (3, 3)]
    assert torch.equal(out[2], taps[2]) and torch.equal(out[3], F.max_pool2d(taps[3], 2))
    with pytest.raises(ValueError, match="exactly 4 taps"):
        fpn(taps[:3])


@pytest.mark.parametrize("variant", ["eva", "siglip"])
def test_zero_scale_leaves_the_towers_uncoupled(variant: str) -> None:
    """With every fuser's scale at 0, taps and embeddings are those of the two towers run on their own."""
    model, x = build(variant, scale=0.0), image()
    dino, vlm = model.dino, model.vlm
    pixels = model.dino_pixels(x)
    with torch.no_grad():
        taps, global_embed, visual_embed = model.fuse(x)
        kw = dict(indices=model.out_indices, norm=False, output_fmt="NCHW", intermediates_only=True)
        pairs = zip(dino.forward_intermediates(pixels, **kw), vlm.forward_intermediates(x, **kw))
        alone = [torch.cat(pair, dim=1) for pair in pairs]
        dino_final, vlm_final = dino.forward_features(pixels), vlm.forward_features(x)  # final norm included
    for got, ref in zip(taps, alone):
        assert _rel_err(got, ref) <= 1e-6
    if variant == "eva":
        tokens = vlm.head(vlm_final + dino_final)
        ref_global, ref_visual = tokens[:, 0], grid(tokens, 1)
    else:
        tokens = vlm_final + dino_final[:, 1:]
        ref_global, ref_visual = vlm.attn_pool(tokens), grid(dense_attention_pool(vlm.attn_pool, tokens), 0)
    assert _rel_err(global_embed, ref_global) <= 1e-6 and _rel_err(visual_embed, ref_visual) <= 1e-6


@pytest.mark.parametrize("variant", ["eva", "clip16"])
def test_fusion_couples_the_towers(variant: str) -> None:
    """Perturbing one tower's tokens moves the other tower's half of the taps, unless the fusers are silenced."""
    x = image()

    def last_tap(scale: float, perturb: str) -> tuple[torch.Tensor, torch.Tensor]:
        model = build(variant, scale=scale)
        # Not a constant shift: CLIP's pre-norm would erase it.
        hooks = [tower.patch_embed.register_forward_hook(
                 lambda _m, _i, out: out + torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
                 for name, tower in (("dino", model.dino), ("vlm", model.vlm)) if name == perturb]
        with torch.no_grad():
            tap = model.fuse(x)[0][-1]
        for hook in hooks:
            hook.remove()
        return tap[:, :model.dino_dim], tap[:, model.dino_dim:]

    for scale in (0.0, 0.5):
        dino_half, vlm_half = last_tap(scale, "")
        vlm_half_after_dino_change = last_tap(scale, "dino")[1]
        dino_half_after_vlm_change = last_tap(scale, "vlm")[0]
        if scale == 0.0:
            assert torch.equal(vlm_half, vlm_half_after_dino_change)
            assert torch.equal(dino_half, dino_half_after_vlm_change)
            continue
        # DINOv2 → VLM: the forward scan carries the DINOv2 tokens' state into the whole VLM sequence.
        moved = (vlm_half - vlm_half_after_dino_change).abs().amax(dim=(0, 1))
        assert float(moved.min()) > 1e-6
        # VLM → DINOv2: only backwards through the non-causal depthwise conv at the seam (last DINOv2 tokens).
        moved = (dino_half - dino_half_after_vlm_change).abs().amax(dim=(0, 1))
        assert float(moved[-1, -1]) > 1e-6


def test_dino_receives_imagenet_normalised_pixels() -> None:
    model = build("eva")
    raw = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))  # RGB in [0, 1]
    x = (raw - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    seen = {}
    hooks = [tower.patch_embed.register_forward_pre_hook(lambda _m, args, key=key: seen.__setitem__(key, args[0]))
             for key, tower in (("dino", model.dino), ("vlm", model.vlm))]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen["vlm"], x)
    expected = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(seen["dino"], expected, atol=1e-5)
    # One pixel by hand: mid-grey 0.5 in the red channel.
    grey = torch.full((1, 3, *SIZE), 0.5)
    grey_x = (grey - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert float(model.dino_pixels(grey_x)[0, 0, 0, 0]) == pytest.approx((0.5 - 0.485) / 0.229, abs=1e-6)


def test_stride14_drops_the_last_pixels_and_size_is_fixed() -> None:
    """At patch 14, 64 = 4·14 + 8: the last 8 rows and columns never reach the towers (as 512 = 36·14 + 8)."""
    model, x = build("eva"), image()
    y = x.clone()
    y[:, :, 56:, :] = 5.0
    y[:, :, :, 56:] = -5.0
    with torch.no_grad():
        a, b = model(x), model(y)
    assert all(torch.equal(p, q) for p, q in zip((*a.maps, a.global_embed), (*b.maps, b.global_embed)))
    with pytest.raises(ValueError, match=r"expected \(N, 3, 64, 64\)"):
        model(torch.randn(1, 3, 70, 70))


@pytest.mark.parametrize("variant", ["eva", "clip16"])
def test_gradients_reach_only_fusers_projections_and_fpn(variant: str) -> None:
    model = build(variant).train()
    out = model(image())
    loss = sum(m.square().mean() for m in out.maps) + out.global_embed.square().mean() + out.visual_embed.mean()
    loss.backward()
    for tower in (model.dino, model.vlm):
        assert all(not p.requires_grad and p.grad is None for p in tower.parameters())
    trainable = [model.fusers, model.fpn] + ([model.projections] if model.projections is not None else [])
    for part in trainable:
        for name, p in part.named_parameters():
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
            assert float(p.grad.abs().max()) > 0, name
    expected = 4 * sum(p.numel() for p in model.fusers[0].parameters()) + _count(model.fpn)
    expected += _count(model.projections) if model.projections is not None else 0
    assert _count(model, trainable=True) == expected


def test_validation_errors() -> None:
    def parts(dino_patch: int = 14, size: tuple[int, int] = SIZE, depth: int = 4, width: int = 32) -> tuple:
        dino = create_vit("vit_small_patch14_dinov2", size,
                          overrides={"depth": depth, "num_heads": 2, "embed_dim": width, "patch_size": dino_patch})
        vlm = create_vit("eva02_l14", size, overrides={**TINY, "embed_dim": 32}, num_classes=16)
        return dino, vlm

    fusers = [MVFuser(32, d_state=4) for _ in range(4)]
    with pytest.raises(ValueError, match="same depth"):
        FusedEncoder(*parts(depth=2), fusers, SimpleFPN(64))
    with pytest.raises(ValueError, match="one fuser per block"):
        FusedEncoder(*parts(), fusers[:3], SimpleFPN(64))
    with pytest.raises(ValueError, match=r"token grids differ.*\(4, 4\).*\(5, 5\)"):  # 70/16 → 4, 70/14 → 5
        FusedEncoder(*parts(dino_patch=16, size=(70, 70)), fusers, SimpleFPN(64))
    with pytest.raises(ValueError, match="widths differ.*FuserProjections"):
        FusedEncoder(*parts(width=16), fusers, SimpleFPN(48))
    with pytest.raises(ValueError, match="out_indices"):
        FusedEncoder(*parts(), fusers, SimpleFPN(64), out_indices=[0, 2, 1, 3])
    with pytest.raises(ValueError, match="FPN takes 48 channels"):
        FusedEncoder(*parts(), fusers, SimpleFPN(48))
    with pytest.raises(ValueError, match="fuser 0 has width 16"):
        FusedEncoder(*parts(), [MVFuser(16, d_state=4)] + fusers[1:], SimpleFPN(64))
    no_head = create_vit("vit_base_patch16_224", SIZE, overrides={**TINY, "embed_dim": 32, "class_token": False,
                                                                  "global_pool": "avg"})
    with pytest.raises(ValueError, match="without class token needs an attention-pool"):
        FusedEncoder(parts(dino_patch=16)[0], no_head, fusers, SimpleFPN(64))


def test_onnx_export_matches_eager(tmp_path) -> None:
    import onnxruntime as ort

    model, x = build("eva"), image(n=1)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "fused.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, input_names=["image"], verbose=False)
    program.save(str(path))
    import onnx

    graph = onnx.load(str(path))
    assert not op_types(graph) & {"Loop", "Scan"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})
    expected = [*ref.maps, ref.global_embed, ref.visual_embed]
    assert len(got) == len(expected)
    for g, r in zip(got, expected):
        assert g.shape == tuple(r.shape) and _rel_err(torch.from_numpy(g), r) <= 1e-4


@pytest.mark.parametrize("variant, total", [("eva", MFUSER_EVA), ("clip16", MFUSER_CLIP), ("siglip", MFUSER_SIGLIP)])
def test_parameter_counts_at_full_size(variant: str, total: int) -> None:
    """The real-size encoders on the meta device (shapes only, no memory): counts and output shapes at 512."""
    patch = 14 if variant == "eva" else 16
    with torch.device("meta"):
        dino = create_vit("dinov2_l14" if patch == 14 else "dinov2_l16", (512, 512))
        if variant == "eva":
            vlm = create_vit("eva02_l14", (512, 512), num_classes=768)
        elif variant == "clip16":
            vlm = create_vit("clip_l14_336", (512, 512), overrides={"patch_size": 16}, num_classes=768)
        else:
            vlm = create_vit("siglip_l16", (512, 512))
        fusers = nn.ModuleList(MVFuser(1024, d_state=16) for _ in range(24))
        projections = FuserProjections(1024, 1024, 24) if variant == "clip16" else None
        model = FusedEncoder(dino, vlm, fusers, SimpleFPN(2048), projections=projections).eval()
        out = model(torch.empty(1, 3, 512, 512))  # shapes only
    grid = 512 // patch  # 36 at patch 14 (504 pixels used), 32 at patch 16
    assert [tuple(m.shape) for m in out.maps] == [(1, 2048, s, s) for s in (4 * grid, 2 * grid, grid, grid // 2)]
    e = 1024 if variant == "siglip" else 768
    assert tuple(out.global_embed.shape) == (1, e) and tuple(out.visual_embed.shape) == (1, e, grid, grid)
    assert model.grid_size == (grid, grid) and model.out_indices == [7, 11, 15, 23] and model.channels == 2048
    assert model.joint_dim == e
    assert _count(model.dino) == (DINOV2_L14_512 if patch == 14 else DINOV2_L16_512)
    assert _count(model.vlm) == {"eva": EVA02_CLIP_L_512, "clip16": CLIP_L16_512, "siglip": SIGLIP_L16_512}[variant]
    assert _count(model.fusers) == FUSERS_24 and _count(model.fpn) == FPN_2048
    assert _count(model) == total
    trainable = FUSERS_24 + FPN_2048 + (PROJECTIONS_24 if variant == "clip16" else 0)
    assert _count(model, trainable=True) == trainable
    assert math.isclose(total / 1e6, {"eva": 699.8, "clip16": 750.9, "siglip": 711.3}[variant], abs_tol=0.05)
