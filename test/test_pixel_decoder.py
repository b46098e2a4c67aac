"""Text pixel decoder: deformable-attention core, position encoding, wiring, gradients, ONNX export, size.

Tolerances, as max|got − ref| ≤ tol · max|ref|:
* float64, grid_sample core against the explicit bilinear reference (outputs and gradients): 1e-10.
* float64, whole decoder against a hand-written composition: 1e-10 (same math, different ops).
* ONNX Runtime (float32) against eager: 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from onnxutil import export_and_run, op_types
from training.models.ms_deform_attn import MSDeformAttn, ms_deform_attn_reference, ms_deform_attn_sample
from training.models.pixel_decoder import TextPixelDecoder
from training.models.position_encoding import SinePositionEncoding, sine_position_encoding

# Full size, in_channels [2048] * 4, conv_dim 256, 8 heads, 3 levels, 4 points, FFN 2048, 6 layers, 19 texts:
# input convs 3 · (2048·256 + 256 + GN 512) = 1,575,168; level embedding 3·256 = 768;
# per layer: deformable attention (offsets 256·192 + 192, weights 256·96 + 96, value and output proj
# 2 · (256² + 256)) = 205,600, text attention (in 3·256² + 768, out 256² + 256) = 263,168,
# three LayerNorms 1,536, FFN (256·2048 + 2048 + 2048·256 + 256) = 1,050,880 → 1,521,184; six: 9,127,104;
# final LayerNorm 512; text_proj 768·256 + 256 = 196,864; text positions 19·256 = 4,864;
# lateral 1×1 (no bias) 2048·256 + GN 512 = 524,800; output 3×3 (no bias) 256·256·9 + GN 512 = 590,336;
# mask_feature 256² + 256 = 65,792.
PARAMS_FULL = (1_575_168 + 768 + 6 * 1_521_184 + 512 + 196_864 + 4_864 + 524_800 + 590_336 + 65_792)

IN_CHANNELS = [48, 40, 36, 32]
SIZES = [16, 8, 4, 2]
TINY = dict(text_dim=24, num_texts=5, conv_dim=32, mask_dim=16, num_layers=2, num_heads=4, num_points=3,
            ffn_dim=64)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got − ref| / max|ref|, in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _tiny_decoder(seed: int = 0, dtype: torch.dtype = torch.float32) -> TextPixelDecoder:
    torch.manual_seed(seed)
    return TextPixelDecoder(IN_CHANNELS, **TINY).to(dtype)


def _inputs(batch: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32
            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, c, s, s, generator=gen, dtype=dtype) for c, s in zip(IN_CHANNELS, SIZES)]
    return feats, torch.randn(batch, TINY["num_texts"], TINY["text_dim"], generator=gen, dtype=dtype)


# ---------------------------------------------------------------------------------------------- the core


def test_grid_sample_core_matches_reference_outputs_and_gradients() -> None:
    torch.manual_seed(10)
    shapes = [(5, 7), (3, 4), (2, 2)]
    n, lq, heads, head_dim, points = 2, 13, 2, 3, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), heads, head_dim, dtype=torch.float64)
    # Mostly inside, some outside [0, 1] (partly or wholly off the map), and some exactly on the border.
    loc = torch.rand(n, lq, heads, len(shapes), points, 2, dtype=torch.float64) * 1.6 - 0.3
    loc[:, 0, :, :, 0] = 0.0
    loc[:, 1, :, :, 0] = 1.0
    loc[:, 2, :, :, 0, 0] = 0.0
    loc[:, 2, :, :, 0, 1] = 1.0
    loc[:, 3, :, :, 0] = -0.02  # less than half a pixel outside: the first row/column still contributes
    loc[:, 4, :, :, 0] = 1.7  # far outside: reads zero
    weights = torch.rand(n, lq, heads, len(shapes), points, dtype=torch.float64)
    upstream = torch.randn(n, lq, heads * head_dim, dtype=torch.float64)

    results = []
    for fn in (ms_deform_attn_sample, ms_deform_attn_reference):
        v, lo, w = (t.clone().requires_grad_(True) for t in (value, loc, weights))
        out = fn(v, shapes, lo, w)
        grads = torch.autograd.grad((out * upstream).sum(), (v, lo, w))
        results.append((out, *grads))
    for got, ref in zip(*results):
        assert got.shape == ref.shape
        assert _rel_err(got, ref) < 1e-10
    out = results[1][0].view(n, lq, heads, head_dim)
    assert float(out.detach().abs().max()) > 0.1


def test_reference_gradients_are_the_true_derivatives() -> None:
    torch.manual_seed(11)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(1, 16, 1, 2, dtype=torch.float64, requires_grad=True)
    loc = (torch.rand(1, 3, 1, 2, 2, 2, dtype=torch.float64) * 1.4 - 0.2).requires_grad_(True)
    weights = torch.rand(1, 3, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, lo, w: ms_deform_attn_reference(v, shapes, lo, w),
                                    (value, loc, weights), eps=1e-7, atol=1e-6)


def test_sampling_convention_by_hand() -> None:
    # One level of 2 × 3, one head, one channel, one point with weight 1 per query.
    grid = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    value = grid.reshape(1, 6, 1, 1)
    locations = torch.tensor([
        [(1.5 / 3, 0.5 / 2)],  # centre of pixel (0, 1) → 2
        [(0.0, 0.0)],  # the map's corner: a quarter of pixel (0, 0) → 0.25
        [(1.0 / 3, 0.25)],  # halfway between the centres of (0, 0) and (0, 1) → 1.5
        [(2.5 / 3, 0.5)],  # halfway between the centres of (0, 2) and (1, 2) → 4.5
        [(1.0, 1.0)],  # the opposite corner → 0.25 · 6
        [(-0.5, 0.5)],  # more than half a pixel outside → 0
    ], dtype=torch.float64).view(1, 6, 1, 1, 1, 2)
    weights = torch.ones(1, 6, 1, 1, 1, dtype=torch.float64)
    expected = torch.tensor([2.0, 0.25, 1.5, 4.5, 1.5, 0.0], dtype=torch.float64)
    for fn in (ms_deform_attn_sample, ms_deform_attn_reference):
        got = fn(value, [(2, 3)], locations, weights).flatten()
        assert torch.allclose(got, expected, atol=1e-12), (fn.__name__, got)


def test_core_rejects_inconsistent_shapes() -> None:
    value = torch.zeros(1, 10, 2, 4)
    loc = torch.zeros(1, 3, 2, 1, 4, 2)
    with pytest.raises(ValueError):
        ms_deform_attn_sample(value, [(3, 3)], loc, torch.zeros(1, 3, 2, 1, 4))
    with pytest.raises(ValueError):
        ms_deform_attn_sample(torch.zeros(1, 9, 2, 4), [(3, 3)], loc, torch.zeros(1, 3, 2, 1, 3))


# ---------------------------------------------------------------------------------------------- the module


def test_msdeform_attn_init() -> None:
    attn = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.detach().view(4, 2, 3, 2)
    # Heads point right, down, left, up (angle 2πk/4, largest component scaled to 1), point p at p + 1 px.
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for p in range(3):
        for level in range(2):
            assert torch.allclose(bias[:, level, p], directions * (p + 1), atol=1e-6)
    assert torch.equal(attn.sampling_offsets.weight.detach(), torch.zeros(4 * 2 * 3 * 2, 32))
    assert not attn.attention_weights.weight.detach().any() and not attn.attention_weights.bias.detach().any()
    assert not attn.value_proj.bias.detach().any() and not attn.output_proj.bias.detach().any()
    bound = math.sqrt(6 / (32 + 32))  # xavier-uniform
    assert float(attn.value_proj.weight.detach().abs().max()) <= bound


def test_msdeform_attn_shape() -> None:
    torch.manual_seed(12)
    attn = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=3, num_points=2)
    shapes = [(2, 2), (4, 4), (8, 8)]
    query = torch.randn(2, 7, 32)
    ref = torch.rand(2, 7, 3, 2)
    value = torch.randn(2, 84, 32)
    out = attn(query, ref, value, shapes)
    assert out.shape == (2, 7, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        attn(query, ref[:, :, :2], value[:, :20], shapes[:2])


def test_zero_offsets_and_uniform_weights_sample_the_reference_point() -> None:
    attn = MSDeformAttn(embed_dim=8, num_heads=2, num_levels=2, num_points=3).double()
    with torch.no_grad():  # no offsets, uniform attention, identity projections: the bare sampling remains
        attn.sampling_offsets.bias.zero_()
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(8))
            proj.bias.zero_()
    shapes = [(4, 4), (2, 2)]
    torch.manual_seed(13)
    fine, coarse = torch.randn(4, 4, 8, dtype=torch.float64), torch.randn(2, 2, 8, dtype=torch.float64)
    value = torch.cat([fine.reshape(16, 8), coarse.reshape(4, 8)])[None]
    # Query 0 sits on the centre of coarse pixel (0, 0) = (0.25, 0.25): on the fine map that is the corner
    # shared by pixels (0, 0), (0, 1), (1, 0), (1, 1), so it reads their mean.
    # Query 1 sits on the centre of fine pixel (1, 2) = (0.625, 0.375): on the coarse map that is x = 0.75,
    # y = 0.25 in pixel units, i.e. weights 0.25/0.75 over columns 0/1 and 0.75/0.25 over rows 0/1.
    ref = torch.tensor([[0.25, 0.25], [0.625, 0.375]], dtype=torch.float64)[None, :, None].expand(1, 2, 2, 2)
    out = attn(torch.randn(1, 2, 8, dtype=torch.float64), ref, value, shapes)[0]
    expected_0 = 0.5 * fine[:2, :2].mean(dim=(0, 1)) + 0.5 * coarse[0, 0]
    expected_1 = 0.5 * fine[1, 2] + 0.5 * (0.1875 * coarse[0, 0] + 0.5625 * coarse[0, 1]
                                           + 0.0625 * coarse[1, 0] + 0.1875 * coarse[1, 1])
    assert torch.allclose(out[0], expected_0, atol=1e-12)
    assert torch.allclose(out[1], expected_1, atol=1e-12)


# ---------------------------------------------------------------------------------------------- position encoding


def test_sine_position_encoding_by_hand() -> None:
    x = torch.zeros(2, 3, 4, 5)
    pos = SinePositionEncoding(num_feats=8)(x)
    assert pos.shape == (2, 16, 4, 5) and pos.dtype == x.dtype
    assert torch.equal(pos[0], pos[1])
    eps, two_pi = 1e-6, 2 * math.pi
    i, j = 2, 3
    y, xx = (i + 1) / (4 + eps) * two_pi, (j + 1) / (5 + eps) * two_pi
    for k in range(8):
        freq = 10000 ** (2 * (k // 2) / 8)
        trig = math.sin if k % 2 == 0 else math.cos
        assert float(pos[0, k, i, j]) == pytest.approx(trig(y / freq), abs=1e-6)  # y channels first
        assert float(pos[0, 8 + k, i, j]) == pytest.approx(trig(xx / freq), abs=1e-6)
    # The y half varies along rows only, the x half along columns only.
    assert torch.equal(pos[:, :8], pos[:, :8, :, :1].expand(-1, -1, -1, 5))
    assert torch.equal(pos[:, 8:], pos[:, 8:, :1].expand(-1, -1, 4, -1))
    unnormalised = sine_position_encoding(x, num_feats=8, normalize=False)
    assert float(unnormalised[0, 0, i, j]) == pytest.approx(math.sin(i + 1), abs=1e-6)


# ---------------------------------------------------------------------------------------------- the decoder


def test_parameter_count_full_size() -> None:
    assert PARAMS_FULL == 12_086_208
    with torch.device("meta"):  # 12M parameters need no real memory to be counted
        decoder = TextPixelDecoder([2048] * 4)
    assert _count(decoder) == PARAMS_FULL


def test_parameter_names_follow_the_checkpoints() -> None:
    names = set(_tiny_decoder().state_dict())
    for name in ("input_convs.0.conv.weight", "input_convs.0.conv.bias", "input_convs.2.gn.weight",
                 "level_encoding.weight", "text_proj.weight", "text_pos_embed.weight",
                 "encoder.layers.1.attentions.0.sampling_offsets.bias",
                 "encoder.layers.1.attentions.0.attention_weights.weight",
                 "encoder.layers.1.attentions.0.value_proj.weight", "encoder.layers.1.attentions.0.output_proj.bias",
                 "encoder.layers.1.attentions.1.attn.in_proj_weight",
                 "encoder.layers.1.attentions.1.attn.out_proj.weight", "encoder.layers.1.norms.2.bias",
                 "encoder.layers.1.ffns.0.layers.0.0.weight", "encoder.layers.1.ffns.0.layers.1.bias",
                 "encoder.post_norm.weight", "lateral_convs.0.conv.weight", "lateral_convs.0.gn.bias",
                 "output_convs.0.conv.weight", "output_convs.0.gn.weight", "mask_feature.weight", "mask_feature.bias"):
        assert name in names, name
    assert "lateral_convs.0.conv.bias" not in names and "output_convs.0.conv.bias" not in names


def test_decoder_init() -> None:
    decoder = _tiny_decoder()
    for layer in decoder.encoder.layers:
        msda = layer.attentions[0]
        assert not msda.sampling_offsets.weight.detach().any() and not msda.attention_weights.weight.detach().any()
        assert float(msda.sampling_offsets.bias.detach().abs().max()) == pytest.approx(TINY["num_points"])
    for block in decoder.input_convs:
        assert not block.conv.bias.detach().any()
    fan_in = 32 * 9
    assert float(decoder.output_convs[0].conv.weight.detach().abs().max()) <= math.sqrt(3 / fan_in)
    assert not decoder.mask_feature.bias.detach().any()


def test_output_shapes_and_level_order() -> None:
    decoder = _tiny_decoder().eval()
    feats, text = _inputs()
    with torch.no_grad():
        mask_features, multi_scale = decoder(feats, text)
    assert mask_features.shape == (2, TINY["mask_dim"], 16, 16)
    # Lowest resolution first, as the transformer decoder cycles through them.
    assert [tuple(m.shape) for m in multi_scale] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 32, 8, 8)]
    # Each level is the encoder's post-norm output: zero mean, unit variance over channels per pixel.
    for level in multi_scale:
        tokens = level.flatten(2).transpose(1, 2)
        assert float(tokens.mean(-1).abs().max()) < 1e-5
    with pytest.raises(ValueError):
        decoder(feats[:3], text)
    with pytest.raises(ValueError):
        decoder(feats, text[:, :4])


def _hand_written(decoder: TextPixelDecoder, feats: list[torch.Tensor], text: torch.Tensor
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The decoder's forward spelled out from its parameters (float64), for the wiring test."""
    def conv_gn(block, x):
        conv = block.conv
        x = F.conv2d(x, conv.weight, conv.bias, padding=conv.padding)
        return F.group_norm(x, block.gn.num_groups, block.gn.weight, block.gn.bias, block.gn.eps)

    def ln(norm, x):
        return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)

    c, heads, points = TINY["conv_dim"], TINY["num_heads"], TINY["num_points"]
    n = text.shape[0]
    tokens, positions, shapes, centres = [], [], [], []
    for lvl in range(3):  # level 0 = the lowest-resolution input
        x = conv_gn(decoder.input_convs[lvl], feats[3 - lvl])
        h, w = x.shape[-2:]
        rows = torch.arange(1, h + 1, dtype=x.dtype) / (h + 1e-6) * 2 * math.pi
        cols = torch.arange(1, w + 1, dtype=x.dtype) / (w + 1e-6) * 2 * math.pi
        k = torch.arange(c // 2, dtype=x.dtype)
        freq = 10000 ** (2 * torch.div(k, 2, rounding_mode="floor") / (c // 2))
        even = (torch.arange(c // 2) % 2 == 0)
        pos_y = torch.where(even, torch.sin(rows[:, None] / freq), torch.cos(rows[:, None] / freq))  # (h, c/2)
        pos_x = torch.where(even, torch.sin(cols[:, None] / freq), torch.cos(cols[:, None] / freq))  # (w, c/2)
        pos = torch.cat([pos_y[:, None].expand(h, w, -1), pos_x[None].expand(h, w, -1)], -1).reshape(h * w, c)
        positions.append(pos + decoder.level_encoding.weight[lvl])
        tokens.append(x.flatten(2).transpose(1, 2))
        ii, jj = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        centres.append(torch.stack([(jj.flatten() + 0.5) / w, (ii.flatten() + 0.5) / h], -1))
        shapes.append((h, w))
    x, pos, centres = torch.cat(tokens, 1), torch.cat(positions, 0)[None], torch.cat(centres, 0)
    t = text @ decoder.text_proj.weight.T + decoder.text_proj.bias
    t_key = t + decoder.text_pos_embed.weight
    for layer in decoder.encoder.layers:
        msda, cross = layer.attentions[0], layer.attentions[1].attn
        q = x + pos
        value = (x @ msda.value_proj.weight.T + msda.value_proj.bias).view(n, -1, heads, c // heads)
        offsets = (q @ msda.sampling_offsets.weight.T + msda.sampling_offsets.bias).view(n, -1, heads, 3, points, 2)
        logits = (q @ msda.attention_weights.weight.T + msda.attention_weights.bias).view(n, -1, heads, 3 * points)
        weights = logits.softmax(-1).view(n, -1, heads, 3, points)
        wh = torch.tensor([[w, h] for h, w in shapes], dtype=x.dtype)
        loc = centres[None, :, None, None, None, :] + offsets / wh[None, None, None, :, None, :]
        attended = ms_deform_attn_reference(value, shapes, loc, weights)
        x = ln(layer.norms[0], x + attended @ msda.output_proj.weight.T + msda.output_proj.bias)

        wq, wk, wv = cross.in_proj_weight.chunk(3)
        bq, bk, bv = cross.in_proj_bias.chunk(3)
        d = c // heads
        qh = ((x + pos) @ wq.T + bq).view(n, -1, heads, d).transpose(1, 2)
        kh = (t_key @ wk.T + bk).view(n, -1, heads, d).transpose(1, 2)
        vh = (t @ wv.T + bv).view(n, -1, heads, d).transpose(1, 2)
        attn = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ vh
        attn = attn.transpose(1, 2).reshape(n, -1, c) @ cross.out_proj.weight.T + cross.out_proj.bias
        x = ln(layer.norms[1], x + attn)

        fc1, fc2 = layer.ffns[0].layers[0][0], layer.ffns[0].layers[1]
        x = ln(layer.norms[2], x + torch.relu(x @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias)
    x = ln(decoder.encoder.post_norm, x)
    outs, start = [], 0
    for h, w in shapes:
        outs.append(x[:, start:start + h * w].transpose(1, 2).reshape(n, c, h, w))
        start += h * w
    lateral = conv_gn(decoder.lateral_convs[0], feats[0])
    y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
    y = torch.relu(conv_gn(decoder.output_convs[0], y))
    return F.conv2d(y, decoder.mask_feature.weight, decoder.mask_feature.bias), outs


def test_matches_hand_written_composition() -> None:
    decoder = _tiny_decoder(seed=3, dtype=torch.float64).eval()
    with torch.no_grad():  # move every parameter off its init (zero offsets, unit norms) so a skipped one shows
        for p in decoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    feats, text = _inputs(dtype=torch.float64)
    with torch.no_grad():
        mask_features, multi_scale = decoder(feats, text)
        ref_mask, ref_levels = _hand_written(decoder, feats, text)
    assert _rel_err(mask_features, ref_mask) < 1e-10
    for got, ref in zip(multi_scale, ref_levels):
        assert _rel_err(got, ref) < 1e-10


def test_gradients_reach_every_parameter() -> None:
    decoder = _tiny_decoder(seed=4)
    feats, text = _inputs(seed=5)
    mask_features, multi_scale = decoder(feats, text)
    gen = torch.Generator().manual_seed(6)
    loss = (mask_features * torch.randn(mask_features.shape, generator=gen)).sum()
    loss = loss + sum((m * torch.randn(m.shape, generator=gen)).sum() for m in multi_scale)
    loss.backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().max()) > 0, name


def test_text_steers_the_output_per_sample() -> None:
    decoder = _tiny_decoder(seed=7).eval()
    feats, text = _inputs(seed=8)
    other = text.clone()
    other[1] = torch.randn_like(other[1])
    with torch.no_grad():
        base, base_levels = decoder(feats, text)
        changed, changed_levels = decoder(feats, other)
    # Sample 1's text changed: its outputs move, sample 0's do not (no mixing across the batch).
    assert _rel_err(changed[1], base[1]) > 1e-3
    assert _rel_err(changed_levels[0][1], base_levels[0][1]) > 1e-3
    assert torch.allclose(changed[0], base[0], atol=1e-6)


def test_onnx_export_matches_eager_with_standard_ops() -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    decoder = _tiny_decoder(seed=9).eval()
    feats, text = _inputs(batch=1, seed=10)
    names = ["f0", "f1", "f2", "f3", "text"]
    model, got = export_and_run(decoder, (feats, text), names, ["mask_features", "level0", "level1", "level2"],
                                feats + [text])
    ops = op_types(model)
    assert "GridSample" in ops, sorted(ops)
    assert not ops & {"Loop", "Scan"}, sorted(ops)
    inlined = pytest.importorskip("onnx.inliner").inline_local_functions(model)
    domains = {node.domain for node in inlined.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    with torch.no_grad():
        mask_features, multi_scale = decoder(feats, text)
    for out, ref in zip(got, [mask_features] + multi_scale):
        assert out.shape == tuple(ref.shape)
        assert _rel_err(torch.from_numpy(out), ref) < 1e-4
