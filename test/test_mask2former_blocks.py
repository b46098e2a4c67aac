"""Standard Mask2Former blocks: pixel decoder without text, transformer decoder with queries from outside.

Checked against the text-conditioned versions they generalise (same weights, same outputs), a composition of
their own submodules, full-size parameter counts and ONNX export.

Tiny sizes: inputs of 48, 40, 36, 32 channels at 16², 8², 4², 2²; width 32, 4 heads, FFN 64, 2 encoder layers,
3 decoder layers, levels 2², 4², 8², mask features 16².

Tolerances, as max|got − ref| ≤ tol · max|ref|:
* float64, pixel decoder against the composition of its submodules: 1e-12 (the same ops, regrouped).
* float64, the inference path (last set only) against the training path's last set: 1e-10.
* ONNX Runtime (float32) against eager: 1e-4.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onnxutil import export_and_run, op_types
from training.models.mask_decoder import (FULL_SIZE_PARAMS, STANDARD_FULL_SIZE_PARAMS as DECODER_PARAMS,
                                          MaskedQueryDecoder, TextQueryDecoder, attention_mask, segmentation_scores)
from training.models.pixel_decoder import (STANDARD_FULL_SIZE_PARAMS as PIXEL_DECODER_PARAMS, DeformPixelDecoder,
                                           TextPixelDecoder)

IN_CHANNELS = [48, 40, 36, 32]
SIZES = [16, 8, 4, 2]
PIXEL = dict(conv_dim=32, mask_dim=16, num_layers=2, num_heads=4, num_points=3, ffn_dim=64)
TEXT_DIM, NUM_TEXTS = 24, 5

HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 3
QUERIES, CLASSES = 7, 3
LEVELS = (2, 4, 8)
MASK_SIZE = 16


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got − ref| / max|ref|, in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _perturb(module: nn.Module, scale: float = 0.1) -> None:
    """Move every parameter off its init (zero offsets, unit norms), so that a skipped one shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _pixel_inputs(batch: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=gen, dtype=dtype) for c, s in zip(IN_CHANNELS, SIZES)]


def _standard_pixel_decoder(seed: int = 0, **kwargs: object) -> DeformPixelDecoder:
    torch.manual_seed(seed)
    return DeformPixelDecoder(IN_CHANNELS, **{**PIXEL, **kwargs})


# ---------------------------------------------------------------------------------------------- pixel decoder


def test_standard_pixel_decoder_full_size_parameter_count() -> None:
    # Arithmetic in training/models/pixel_decoder.py.
    assert PIXEL_DECODER_PARAMS == 788_736 + 768 + 6 * 732_192 + 262_656 + 590_336 + 65_792
    with torch.device("meta"):  # no real memory needed to count
        decoder = DeformPixelDecoder([1024] * 4)
    assert _count(decoder) == PIXEL_DECODER_PARAMS
    # The defaults are the standard configuration.
    assert decoder.encoder.post_norm is None and decoder.num_texts == 0
    assert decoder.encoder.layers[0].ffns[0].layers[0][0].out_features == 1024


def test_standard_pixel_decoder_has_no_text_parts_and_rejects_text() -> None:
    decoder = _standard_pixel_decoder()
    names = set(decoder.state_dict())
    assert not any(name.startswith(("text_proj", "text_pos_embed", "encoder.post_norm")) for name in names)
    layer = "encoder.layers.1."
    own = {name[len(layer):] for name in names if name.startswith(layer)}
    assert {name.split(".")[0] + "." + name.split(".")[1] for name in own} == {"attentions.0", "norms.0", "norms.1",
                                                                               "ffns.0"}
    assert {"attentions.0.sampling_offsets.weight", "ffns.0.layers.0.0.weight", "ffns.0.layers.1.bias"} <= own
    feats = _pixel_inputs()
    with pytest.raises(ValueError, match="no text"):
        decoder(feats, torch.randn(2, NUM_TEXTS, TEXT_DIM))
    with pytest.raises(ValueError):
        DeformPixelDecoder(IN_CHANNELS, num_texts=NUM_TEXTS)  # text without its width
    with pytest.raises(ValueError):
        DeformPixelDecoder(IN_CHANNELS, text_dim=TEXT_DIM)  # a width without text
    with_text = DeformPixelDecoder(IN_CHANNELS, **PIXEL, text_dim=TEXT_DIM, num_texts=NUM_TEXTS)
    with pytest.raises(ValueError):
        with_text(feats)


def _composed(decoder: DeformPixelDecoder, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The standard decoder's forward written out, level by level, from its submodules."""
    n, c = feats[0].shape[0], PIXEL["conv_dim"]
    levels = [decoder.input_convs[i](feats[3 - i]) for i in range(3)]  # lowest resolution first
    shapes = [tuple(x.shape[-2:]) for x in levels]
    pos = torch.cat([(decoder.position_encoding(x) + decoder.level_encoding.weight[i][:, None, None])
                     .flatten(2).transpose(1, 2) for i, x in enumerate(levels)], dim=1)
    centres = []
    for h, w in shapes:
        for i in range(h):
            for j in range(w):
                centres.append([(j + 0.5) / w, (i + 0.5) / h])
    ref = torch.tensor(centres, dtype=feats[0].dtype)[None, :, None].expand(n, -1, 3, -1)
    x = torch.cat([level.flatten(2).transpose(1, 2) for level in levels], dim=1)
    for layer in decoder.encoder.layers:
        x = layer.norms[0](x + layer.attentions[0](x + pos, ref, x, shapes))
        fc1, fc2 = layer.ffns[0].layers[0][0], layer.ffns[0].layers[1]
        x = layer.norms[1](x + fc2(torch.relu(fc1(x))))
    outs, start = [], 0
    for h, w in shapes:
        outs.append(x[:, start:start + h * w].transpose(1, 2).reshape(n, c, h, w))
        start += h * w
    lateral = decoder.lateral_convs[0](feats[0])
    fpn = decoder.output_convs[0](lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear",
                                                          align_corners=False))
    return decoder.mask_feature(fpn), outs


def test_standard_pixel_decoder_matches_its_composition() -> None:
    decoder = _standard_pixel_decoder(seed=3).double().eval()
    _perturb(decoder)
    feats = _pixel_inputs(dtype=torch.float64)
    with torch.no_grad():
        mask_features, multi_scale = decoder(feats)
        ref_mask, ref_levels = _composed(decoder, feats)
    assert mask_features.shape == (2, PIXEL["mask_dim"], 16, 16)
    assert [tuple(m.shape) for m in multi_scale] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 32, 8, 8)]
    assert _rel_err(mask_features, ref_mask) < 1e-12
    for got, ref in zip(multi_scale, ref_levels):
        assert _rel_err(got, ref) < 1e-12


def test_text_variant_is_the_text_pixel_decoder() -> None:
    args = dict(PIXEL, text_dim=TEXT_DIM, num_texts=NUM_TEXTS)
    torch.manual_seed(5)
    text_decoder = TextPixelDecoder(IN_CHANNELS, **args).eval()
    torch.manual_seed(5)
    general = DeformPixelDecoder(IN_CHANNELS, **args, post_norm=True).eval()
    assert isinstance(text_decoder, DeformPixelDecoder)
    # Same names in the same order and, from the same seed, the same initial values.
    assert list(general.state_dict()) == list(text_decoder.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(general.state_dict().values(), text_decoder.state_dict().values()))
    _perturb(text_decoder)
    general.load_state_dict(text_decoder.state_dict(), strict=True)
    feats = _pixel_inputs(seed=6)
    text = torch.randn(2, NUM_TEXTS, TEXT_DIM)
    with torch.no_grad():
        want, want_levels = text_decoder(feats, text)
        got, got_levels = general(feats, text)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_levels, want_levels))


def test_post_norm_adds_exactly_the_final_layer_norm() -> None:
    plain = _standard_pixel_decoder(seed=7).double().eval()
    normed = _standard_pixel_decoder(seed=8, post_norm=True).double().eval()
    _perturb(plain)
    _perturb(normed)  # the final norm's affine parameters off (1, 0)
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["encoder.post_norm.bias", "encoder.post_norm.weight"] and not unexpected
    feats = _pixel_inputs(seed=9, dtype=torch.float64)
    with torch.no_grad():
        got, got_levels = normed(feats)
        ref, ref_levels = plain(feats)
        post_norm = normed.encoder.post_norm
        for got_level, ref_level in zip(got_levels, ref_levels):
            expected = post_norm(ref_level.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            assert _rel_err(got_level, expected) < 1e-12
        # Attached to the plain decoder, the same norm makes the two decoders one.
        plain.encoder.post_norm = post_norm
        again, again_levels = plain(feats)
    assert _rel_err(got, ref) > 1e-3
    assert torch.equal(again, got) and all(torch.equal(a, b) for a, b in zip(again_levels, got_levels))


def test_standard_pixel_decoder_onnx_export_matches_eager() -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    decoder = _standard_pixel_decoder(seed=10).eval()
    _perturb(decoder)
    feats = _pixel_inputs(batch=1, seed=11)
    names = ["f0", "f1", "f2", "f3"]
    model, got = export_and_run(decoder, (feats,), names, ["mask_features", "level0", "level1", "level2"], feats)
    ops = op_types(model)
    assert "GridSample" in ops and not ops & {"Loop", "Scan"}, sorted(ops)
    with torch.no_grad():
        mask_features, multi_scale = decoder(feats)
    for out, ref in zip(got, [mask_features] + multi_scale):
        assert out.shape == tuple(ref.shape)
        assert _rel_err(torch.from_numpy(out), ref) < 1e-4


# ---------------------------------------------------------------------------------------------- transformer decoder


def _query_decoder(seed: int = 0, **kwargs: object) -> MaskedQueryDecoder:
    torch.manual_seed(seed)
    args = dict(hidden_dim=HIDDEN, num_queries=QUERIES, num_classes=CLASSES, num_heads=HEADS, num_layers=LAYERS,
                ffn_dim=FFN, mask_dim=HIDDEN)
    args.update(kwargs)
    return MaskedQueryDecoder(**args)


def _decoder_inputs(batch: int = 2, seed: int = 12, dtype: torch.dtype = torch.float32,
                    queries: int = QUERIES) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levels (lowest resolution first), mask features, content queries (N, Q, C) and positions (1, Q, C)."""
    gen = torch.Generator().manual_seed(seed)
    levels = [torch.randn(batch, HIDDEN, s, s, generator=gen, dtype=dtype) for s in LEVELS]
    features = torch.randn(batch, HIDDEN, MASK_SIZE, MASK_SIZE, generator=gen, dtype=dtype)
    query = torch.randn(batch, queries, HIDDEN, generator=gen, dtype=dtype)
    return levels, features, query, torch.randn(1, queries, HIDDEN, generator=gen, dtype=dtype)


def test_standard_decoder_full_size_parameter_count() -> None:
    # Arithmetic in training/models/mask_decoder.py; the text decoder adds its text MLP and query table.
    assert DECODER_PARAMS == 768 + 9 * 1_578_752 + 512 + 5_140 + 197_376
    assert FULL_SIZE_PARAMS - DECODER_PARAMS == 262_656 + 4_864
    with torch.device("meta"):
        decoder = MaskedQueryDecoder()
    assert _count(decoder) == DECODER_PARAMS
    assert decoder.num_queries == 100 and decoder.cls_embed.out_features == 20


def test_query_count_independent_of_class_count() -> None:
    decoder = _query_decoder().eval()
    names = {name.split(".")[0] for name, _ in decoder.named_parameters()}
    assert names == {"level_embed", "transformer_decoder", "cls_embed", "mask_embed"}
    levels, features, query, query_pos = _decoder_inputs()
    with torch.no_grad():
        classes, masks = decoder(levels, features, query, query_pos)
        assert len(classes) == len(masks) == LAYERS + 1
        for cls, mask in zip(classes, masks):
            assert cls.shape == (2, QUERIES, CLASSES + 1)
            assert mask.shape == (2, QUERIES, MASK_SIZE, MASK_SIZE)
            assert torch.isfinite(cls).all() and torch.isfinite(mask).all()
        assert segmentation_scores(classes[-1], masks[-1]).shape == (2, CLASSES, MASK_SIZE, MASK_SIZE)
        # A batch-1 query is shared by the batch.
        shared, _ = decoder(levels, features, query[:1], query_pos)
        expanded, _ = decoder(levels, features, query[:1].expand(2, -1, -1), query_pos.expand(2, -1, -1))
    assert _rel_err(shared[-1], expanded[-1]) < 1e-6
    for bad_query, bad_pos in ((query[:, :-1], query_pos), (query, query_pos[..., :-1]), (query[0], query_pos)):
        with pytest.raises(ValueError):
            decoder(levels, features, bad_query, bad_pos)


def test_gradients_reach_the_queries_and_every_parameter() -> None:
    decoder = _query_decoder(seed=13).train()
    levels, features, query, query_pos = _decoder_inputs(seed=14)
    query = query[:1].clone().requires_grad_(True)  # learned queries, shared by the batch
    query_pos = query_pos.clone().requires_grad_(True)
    classes, masks = decoder(levels, features, query, query_pos)
    gen = torch.Generator().manual_seed(15)
    loss = sum((t * torch.randn(t.shape, generator=gen)).sum() for t in classes + masks)
    loss.backward()
    for name, p in [("query", query), ("query_pos", query_pos), *decoder.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        grad = p.grad
        if name.endswith("in_proj_bias"):
            # The key bias shifts every score of a query equally, so softmax cancels it: only q and v parts.
            grad = torch.cat([grad[:HIDDEN], grad[2 * HIDDEN:]])
        assert float(grad.abs().max()) > 0, name


def test_text_query_decoder_is_the_masked_decoder_with_text_queries() -> None:
    torch.manual_seed(16)
    text_decoder = TextQueryDecoder(text_dim=TEXT_DIM, hidden_dim=HIDDEN, num_queries=NUM_TEXTS, num_heads=HEADS,
                                    num_layers=LAYERS, ffn_dim=FFN, mask_dim=HIDDEN).eval()
    assert isinstance(text_decoder, MaskedQueryDecoder)
    # The checkpoints' order: the query modules first.
    order = [name.split(".")[0] for name, _ in text_decoder.named_parameters()]
    assert list(dict.fromkeys(order)) == ["text_proj", "query_embed", "level_embed", "transformer_decoder",
                                          "cls_embed", "mask_embed"]
    general = _query_decoder(num_queries=NUM_TEXTS, num_classes=NUM_TEXTS).eval()
    shared = {k: v for k, v in text_decoder.state_dict().items() if not k.startswith(("text_proj", "query_embed"))}
    general.load_state_dict(shared, strict=True)
    levels, features, _, _ = _decoder_inputs(seed=17, queries=NUM_TEXTS)
    text = torch.randn(2, NUM_TEXTS, TEXT_DIM)
    with torch.no_grad():
        query = text_decoder.text_proj(text)
        query_pos = text_decoder.query_embed.weight[None]
        for all_sets in (True, False):
            want = text_decoder(levels, features, text, all_sets=all_sets)
            got = general(levels, features, query, query_pos, all_sets=all_sets)
            assert len(got[0]) == len(want[0]) == (LAYERS + 1 if all_sets else 1)
            assert all(torch.equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1]))


def test_last_set_only_matches_the_training_path() -> None:
    decoder = _query_decoder(seed=18).double().eval()
    levels, features, query, query_pos = _decoder_inputs(seed=19, dtype=torch.float64)
    with torch.no_grad():
        classes, masks = decoder(levels, features, query, query_pos)
        last_classes, last_masks = decoder(levels, features, query, query_pos, all_sets=False)
    assert len(last_classes) == len(last_masks) == 1
    assert _rel_err(last_classes[0], classes[-1]) < 1e-10
    assert _rel_err(last_masks[0], masks[-1]) < 1e-10


class _ConstantQueries(nn.Module):
    """The decoder with its queries fixed (as learned ones are at export), returning the last set's scores."""

    def __init__(self, decoder: MaskedQueryDecoder, query: torch.Tensor, query_pos: torch.Tensor) -> None:
        super().__init__()
        self.decoder = decoder
        self.register_buffer("query", query)
        self.register_buffer("query_pos", query_pos)

    def forward(self, l0: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        classes, masks = self.decoder([l0, l1, l2], features, self.query, self.query_pos, all_sets=False)
        return segmentation_scores(classes[-1], masks[-1])


def test_masked_query_decoder_onnx_export_matches_eager() -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    decoder = _query_decoder(seed=20).eval()
    levels, features, query, query_pos = _decoder_inputs(batch=1, seed=21)
    graph = _ConstantQueries(decoder, query, query_pos).eval()
    args = (*levels, features)
    names = ["l0", "l1", "l2", "mask_features"]
    with torch.no_grad():
        # Non-trivial masks: some but not all tokens blocked at the first layer.
        first = decoder._predict(query, features)[1]
        blocked = attention_mask(first, (LEVELS[0], LEVELS[0]), HEADS)
        eager = graph(*args)
    assert 0 < blocked.float().mean() < 1
    model, (got,) = export_and_run(graph, args, names, ["scores"], list(args))
    assert not op_types(model) & {"Loop", "If", "Scan"}
    assert got.shape == (1, CLASSES, MASK_SIZE, MASK_SIZE)
    assert _rel_err(torch.from_numpy(got), eager) < 1e-4
