"""Text-query mask decoder and its losses: shapes, masked attention, gradients, ONNX export, loss arithmetic.

Tiny decoder: hidden 32, 4 heads, FFN 64, 3 layers, text width 24, 5 queries/classes, levels 2², 4², 8²,
mask features 16².

Tolerances, as max|got − ref| ≤ tol · max|ref|:
* ONNX Runtime (float32) against eager: 1e-4.
* the inference path (last set only) against the training path's last set, float64: 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onnxutil import export_and_run, op_types
from training.mask_losses import (dice_loss, identity_targets, mask_classification_loss, pixel_text_alignment_loss,
                                  point_sample, uncertain_point_coords)
from training.models.mask_decoder import FULL_SIZE_PARAMS, TextQueryDecoder, attention_mask, segmentation_scores

HIDDEN, HEADS, FFN, LAYERS, TEXT, QUERIES = 32, 4, 64, 3, 24, 5
LEVELS = (2, 4, 8)
MASK_SIZE = 16


def _decoder(**kwargs: object) -> TextQueryDecoder:
    args = dict(text_dim=TEXT, hidden_dim=HIDDEN, num_queries=QUERIES, num_heads=HEADS, num_layers=LAYERS,
                ffn_dim=FFN, mask_dim=HIDDEN)
    args.update(kwargs)
    return TextQueryDecoder(**args)


def _inputs(batch: int = 2,
            dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Levels (lowest resolution first), mask features and text embeddings."""
    levels = [torch.randn(batch, HIDDEN, s, s, dtype=dtype) for s in LEVELS]
    features = torch.randn(batch, HIDDEN, MASK_SIZE, MASK_SIZE, dtype=dtype)
    return levels, features, torch.randn(batch, QUERIES, TEXT, dtype=dtype)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- decoder


def test_full_size_parameter_count() -> None:
    with torch.device("meta"):  # 14.7M parameters need no real memory to be counted
        decoder = TextQueryDecoder()
    # Arithmetic in training/models/mask_decoder.py: 262,656 (text MLP) + 4,864 + 768 (embeddings)
    # + 9 × 1,578,752 (layers) + 512 (post norm) + 5,140 (classes) + 197,376 (mask MLP).
    assert FULL_SIZE_PARAMS == 262_656 + 4_864 + 768 + 9 * 1_578_752 + 512 + 5_140 + 197_376
    assert sum(p.numel() for p in decoder.parameters()) == FULL_SIZE_PARAMS


def test_parameter_names_follow_the_checkpoints() -> None:
    names = {name for name, _ in _decoder(num_layers=1).named_parameters()}
    layer = "transformer_decoder.layers.0."
    expected = {"text_proj.0.weight", "text_proj.0.bias", "text_proj.2.weight", "text_proj.2.bias",
                "query_embed.weight", "level_embed.weight", "transformer_decoder.post_norm.weight",
                "transformer_decoder.post_norm.bias", "cls_embed.weight", "cls_embed.bias"}
    expected |= {f"mask_embed.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    expected |= {f"{layer}attentions.{a}.attn.{p}" for a in (0, 1)
                 for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
    expected |= {f"{layer}ffns.0.layers.{i}.{p}" for i in ("0.0", "1") for p in ("weight", "bias")}
    expected |= {f"{layer}norms.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    assert names == expected


def test_output_count_and_shapes() -> None:
    torch.manual_seed(0)
    decoder = _decoder().eval()
    levels, features, text = _inputs()
    with torch.no_grad():
        classes, masks = decoder(levels, features, text)
        assert len(classes) == len(masks) == LAYERS + 1
        for cls, mask in zip(classes, masks):
            assert cls.shape == (2, QUERIES, QUERIES + 1)
            assert mask.shape == (2, QUERIES, MASK_SIZE, MASK_SIZE)
            assert torch.isfinite(cls).all() and torch.isfinite(mask).all()
        # A (Q, text_dim) text buffer is shared by the batch.
        shared, _ = decoder(levels, features, text[0])
        one, _ = decoder([x[:1] for x in levels], features[:1], text[:1])
        assert _rel_err(shared[-1][:1], one[-1]) < 1e-6
        scores = segmentation_scores(classes[-1], masks[-1])
    assert scores.shape == (2, QUERIES, MASK_SIZE, MASK_SIZE)
    expected = torch.einsum("nqc,nqhw->nchw", classes[-1].softmax(-1)[..., :QUERIES], masks[-1].sigmoid())
    assert _rel_err(scores, expected) < 1e-6


def test_last_set_only_matches_the_training_path() -> None:
    torch.manual_seed(1)
    decoder = _decoder().double().eval()
    levels, features, text = _inputs(dtype=torch.float64)
    with torch.no_grad():
        classes, masks = decoder(levels, features, text)
        last_classes, last_masks = decoder(levels, features, text, all_sets=False)
    assert len(last_classes) == len(last_masks) == 1
    assert _rel_err(last_classes[0], classes[-1]) < 1e-10
    assert _rel_err(last_masks[0], masks[-1]) < 1e-10


def test_attention_mask_layout_and_empty_rows() -> None:
    logits = torch.tensor([[[[1.0, -1.0], [-2.0, 3.0]], [[-1.0, -1.0], [-1.0, -1.0]]]])  # (1, 2, 2, 2)
    mask = attention_mask(logits, (2, 2), num_heads=3)
    assert mask.shape == (3, 2, 4) and mask.dtype == torch.bool
    for head in range(3):  # repeated per head, batch-major
        assert mask[head, 0].tolist() == [False, True, True, False]
        assert mask[head, 1].tolist() == [False] * 4  # all blocked → attends everywhere
    # Resized bilinearly before thresholding: a 2×2 → 4×4 map keeps the sign pattern by quadrant here.
    big = attention_mask(logits, (4, 4), num_heads=1)
    assert big.shape == (1, 2, 16)
    assert big[0, 0].view(4, 4)[0, 0].item() is False and big[0, 0].view(4, 4)[0, 3].item() is True


def _steered_decoder(quadrant_logits: tuple[float, float, float, float]) -> tuple[TextQueryDecoder, torch.Tensor]:
    """A decoder whose every mask prediction is channel 0 of the mask features, set per 8×8 quadrant.

    The 2×2 and 4×4 bilinear resizes of a quadrant-constant 16×16 map sample inside one quadrant, so
    the level-0 attention mask is exactly the sign pattern of the quadrants.
    """
    torch.manual_seed(2)
    decoder = _decoder().eval()
    with torch.no_grad():
        head = decoder.mask_embed[-1]
        head.weight.zero_()
        head.bias.zero_()
        head.bias[0] = 1.0
    features = torch.randn(1, HIDDEN, MASK_SIZE, MASK_SIZE)
    half = MASK_SIZE // 2
    for i, value in enumerate(quadrant_logits):
        r, c = divmod(i, 2)
        features[0, 0, r * half:(r + 1) * half, c * half:(c + 1) * half] = value
    return decoder, features


def _cross_attention_output(decoder: TextQueryDecoder, levels: list[torch.Tensor], features: torch.Tensor,
                            text: torch.Tensor, layer: int = 0) -> torch.Tensor:
    captured = []
    module = decoder.transformer_decoder.layers[layer].attentions[0]
    handle = module.register_forward_hook(lambda _m, _a, out: captured.append(out.detach().clone()))
    try:
        with torch.no_grad():
            decoder(levels, features, text)
    finally:
        handle.remove()
    return captured[0]


def test_masked_attention_ignores_blocked_tokens() -> None:
    decoder, features = _steered_decoder((5.0, -5.0, -5.0, -5.0))  # level 0: only token (0, 0) open
    levels, _, text = _inputs(batch=1)
    base = _cross_attention_output(decoder, levels, features, text)
    blocked = [x.clone() for x in levels]
    blocked[0][0, :, 0, 1] += 10.0
    blocked[0][0, :, 1, :] -= 10.0
    assert torch.equal(_cross_attention_output(decoder, blocked, features, text), base)
    opened = [x.clone() for x in levels]
    opened[0][0, :, 0, 0] += 1.0
    assert (_cross_attention_output(decoder, opened, features, text) - base).abs().max() > 1e-3
    # Layer 1 attends the 4×4 level through the same quadrants: the top-left 2×2 tokens only.
    base1 = _cross_attention_output(decoder, levels, features, text, layer=1)
    blocked1 = [x.clone() for x in levels]
    blocked1[1][0, :, 2:, :] += 10.0
    blocked1[1][0, :, :2, 2:] += 10.0
    out1 = _cross_attention_output(decoder, blocked1, features, text, layer=1)
    # The layer-1 input differs only if layer 0 saw the change, which it did not (level 0 untouched).
    assert torch.equal(out1, base1)


def test_fully_masked_rows_attend_everywhere() -> None:
    levels, _, text = _inputs(batch=1)
    closed_decoder, closed = _steered_decoder((-5.0, -5.0, -5.0, -5.0))
    open_decoder, opened = _steered_decoder((5.0, 5.0, 5.0, 5.0))
    got = _cross_attention_output(closed_decoder, levels, closed, text)
    assert torch.isfinite(got).all()
    # Layer 0's queries come from the text alone, so both runs attend the same tokens with the same queries.
    assert torch.equal(got, _cross_attention_output(open_decoder, levels, opened, text))
    with torch.no_grad():
        classes, masks = closed_decoder(levels, closed, text)
    assert all(torch.isfinite(t).all() for t in classes + masks)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_gradients_reach_every_parameter(pre_norm: bool) -> None:
    torch.manual_seed(3)
    decoder = _decoder(pre_norm=pre_norm).train()
    levels, features, text = _inputs()
    labels = torch.randint(0, QUERIES, (2, 24, 24))
    labels[:, :4] = 255
    classes, masks = decoder(levels, features, text)
    losses = mask_classification_loss(classes, masks, labels, num_classes=QUERIES, num_points=64,
                                      generator=torch.Generator().manual_seed(0))
    losses["loss"].backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        grad = p.grad
        if name.endswith("in_proj_bias"):
            # The key bias shifts every score of a query equally, so softmax cancels it: only q and v parts.
            grad = torch.cat([grad[:HIDDEN], grad[2 * HIDDEN:]])
        assert float(grad.abs().max()) > 0, name


class _LastScores(nn.Module):
    def __init__(self, decoder: TextQueryDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, l0: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor, features: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        classes, masks = self.decoder([l0, l1, l2], features, text, all_sets=False)
        return segmentation_scores(classes[-1], masks[-1])


def test_onnx_export_matches_eager() -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(4)
    graph = _LastScores(_decoder()).eval()
    levels, features, text = _inputs(batch=1)
    args = (*levels, features, text)
    names = ["l0", "l1", "l2", "mask_features", "text"]
    with torch.no_grad():
        # Non-trivial masks: some but not all tokens blocked at the first layer.
        first = graph.decoder._predict(graph.decoder.text_proj(text), features)[1]
        blocked = attention_mask(first, (LEVELS[0], LEVELS[0]), HEADS)
        eager = graph(*args)
    assert 0 < blocked.float().mean() < 1
    model, (got,) = export_and_run(graph, args, names, ["scores"], list(args))
    assert not op_types(model) & {"Loop", "If", "Scan"}
    assert got.shape == (1, QUERIES, MASK_SIZE, MASK_SIZE)
    assert _rel_err(torch.from_numpy(got), eager) < 1e-4


# ----------------------------------------------------------------------------------------------- losses


def test_identity_targets_hand_case() -> None:
    labels = torch.tensor([
        [[0, 0, 1, 1], [0, 255, 1, 1], [2, 2, 255, 255]],
        [[255, 255, 255, 3], [255, 255, 3, 3], [255, 255, 255, 255]],
    ])
    targets = identity_targets(labels, num_classes=4)
    assert targets.present.tolist() == [[True, True, True, False], [False, False, False, True]]
    assert targets.classes.tolist() == [[0, 1, 2, 4], [4, 4, 4, 3]]
    assert targets.masks.shape == (4, 3, 4) and targets.masks.dtype == torch.float32
    expected = [
        [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]],  # image 0, class 0
        [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]],  # image 0, class 1
        [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]],  # image 0, class 2
        [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]],  # image 1, class 3
    ]
    assert targets.masks.tolist() == expected
    with pytest.raises(ValueError, match="outside"):
        identity_targets(torch.tensor([[[0, 7]]]), num_classes=4)


def _perfect(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    targets = identity_targets(labels, num_classes)
    classes = torch.full((labels.shape[0], num_classes, num_classes + 1), -10.0)
    classes.scatter_(2, targets.classes[..., None], 10.0)
    onehot = F.one_hot(labels.clamp_max(num_classes), num_classes + 1)[..., :num_classes]  # 255 → no class
    masks = onehot.permute(0, 3, 1, 2).float() * 20.0 - 10.0
    return classes, masks


def test_perfect_prediction_beats_a_wrong_one() -> None:
    torch.manual_seed(5)
    # 4×4 blocks of classes 0–2 (3 and 4 absent), a band of ignored pixels.
    labels = torch.randint(0, 3, (2, 4, 4)).repeat_interleave(4, 1).repeat_interleave(4, 2)
    labels[1, :4] = 255
    classes, masks = _perfect(labels, 5)
    wrong_classes, wrong_masks = classes.roll(1, dims=-1), -masks

    def total(c: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
        return mask_classification_loss([c, c], [m, m], labels, num_classes=5, num_points=100,
                                        generator=torch.Generator().manual_seed(0))

    good, bad = total(classes, masks), total(wrong_classes, wrong_masks)
    assert set(good) == {"loss_cls", "loss_mask", "loss_dice", "d0.loss_cls", "d0.loss_mask", "d0.loss_dice", "loss"}
    for key in ("loss_cls", "loss_mask", "loss_dice"):
        assert float(good[key]) < float(bad[key]), key
    # Not zero even when perfect: the uncertainty points gather on class borders, where the bilinear target
    # and logit are both in between.
    assert float(good["loss_cls"]) < 1e-3
    assert float(good["loss"]) < float(bad["loss"]) / 10
    assert float(good["loss"]) == pytest.approx(float(sum(v for k, v in good.items() if k != "loss")))


def test_class_loss_applies_the_no_object_weight() -> None:
    labels = torch.zeros(1, 4, 4, dtype=torch.long)  # class 0 present, class 1 absent
    logits = torch.tensor([[[0.3, -1.2, 0.5], [1.0, 0.2, -0.4]]])  # (1, 2 queries, 3)
    masks = torch.zeros(1, 2, 4, 4)
    losses = mask_classification_loss([logits], [masks], labels, num_classes=2, no_object_weight=0.1, num_points=8)

    def ce(row: list[float], target: int) -> float:
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    # Query 0 → class 0 (weight 1), query 1 → no object (index 2, weight 0.1); mean weighted by the weights.
    expected = 2.0 * (1.0 * ce([0.3, -1.2, 0.5], 0) + 0.1 * ce([1.0, 0.2, -0.4], 2)) / 1.1
    assert float(losses["loss_cls"]) == pytest.approx(expected, rel=1e-6)


def test_dice_hand_case() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), -math.log(3.0)]])  # p = (½, ½) and (¾, ¼)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = dice_loss(logits, targets)
    assert got[0].item() == pytest.approx(1 - (2 * 0.5 + 1) / (1.0 + 1 + 1))
    assert got[1].item() == pytest.approx(1 - (2 * 0.75 + 1) / (1.0 + 1 + 1))
    assert dice_loss(logits, targets, eps=0.0)[1].item() == pytest.approx(1 - 1.5 / 2.0)


def test_mask_terms_hand_case_with_uniform_points() -> None:
    """Point BCE and Dice against their definitions, at the same random points (same generator state)."""
    torch.manual_seed(6)
    labels = torch.randint(0, 2, (1, 12, 12))
    labels[0, 0] = 255
    masks = torch.randn(1, 3, 6, 6)  # predictions at half the label resolution
    classes = torch.zeros(1, 3, 4)
    losses = mask_classification_loss([classes], [masks], labels, num_classes=3, num_points=40,
                                      importance_sample_ratio=0.0, generator=torch.Generator().manual_seed(1))
    targets = identity_targets(labels, 3)
    pred = masks[targets.present]  # queries 0 and 1
    gen = torch.Generator().manual_seed(1)  # replay the sampler's draws: candidates first, then the fill
    torch.rand((2, 120, 2), generator=gen)  # the candidates, unused at importance 0
    coords = torch.rand((2, 40, 2), generator=gen)
    logit = point_sample(pred[:, None], coords)[:, 0]
    target = point_sample(targets.masks[:, None], coords)[:, 0]
    bce = F.binary_cross_entropy_with_logits(logit, target, reduction="sum") / (2 * 40)
    p = logit.sigmoid()
    dice = (1 - (2 * (p * target).sum(1) + 1) / (p.sum(1) + target.sum(1) + 1)).sum() / 2
    assert float(losses["loss_mask"]) == pytest.approx(5.0 * float(bce), rel=1e-5)
    assert float(losses["loss_dice"]) == pytest.approx(5.0 * float(dice), rel=1e-5)
    # The distributed count replaces the local one in the mask terms only.
    halved = mask_classification_loss([classes], [masks], labels, num_classes=3, num_points=40,
                                      importance_sample_ratio=0.0, generator=torch.Generator().manual_seed(1),
                                      num_masks=4.0)
    assert float(halved["loss_mask"]) == pytest.approx(float(losses["loss_mask"]) / 2, rel=1e-6)
    assert float(halved["loss_dice"]) == pytest.approx(float(losses["loss_dice"]) / 2, rel=1e-6)
    assert float(halved["loss_cls"]) == pytest.approx(float(losses["loss_cls"]))


def test_ignored_pixels_are_negatives_and_an_unlabelled_image_has_no_masks() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, 4:] = 255
    masks = torch.full((1, 2, 8, 8), -8.0)
    masks[0, 0, :, :4] = 8.0
    classes = torch.zeros(1, 2, 3)

    def loss(m: torch.Tensor) -> dict[str, torch.Tensor]:
        return mask_classification_loss([classes], [m], labels, num_classes=2, num_points=64,
                                        importance_sample_ratio=0.0, generator=torch.Generator().manual_seed(2))

    base = loss(masks)
    raised = masks.clone()
    raised[0, 0, :, 4:] = 8.0  # predict class 0 on the ignored half
    changed = loss(raised)
    # As in the official head, an ignored pixel is background for every present-class mask.
    assert float(changed["loss_mask"]) > float(base["loss_mask"]) + 1.0
    assert float(changed["loss_cls"]) == float(base["loss_cls"])
    # An unlabelled image: every query is "no object", the mask terms are zero but still in the graph.
    unlabelled = torch.full((1, 8, 8), 255)
    m = masks.clone().requires_grad_(True)
    c = classes.clone().requires_grad_(True)
    empty = mask_classification_loss([c], [m], unlabelled, num_classes=2, num_points=16)
    assert identity_targets(unlabelled, 2).classes.tolist() == [[2, 2]]
    assert empty["loss_mask"].item() == 0.0 and empty["loss_dice"].item() == 0.0
    empty["loss"].backward()
    assert m.grad is not None and torch.equal(m.grad, torch.zeros_like(m))
    assert float(c.grad.abs().max()) > 0


def test_point_sampler_counts_and_importance() -> None:
    torch.manual_seed(7)
    logits = torch.randn(3, 1, 10, 10) * 4
    state = torch.Generator().manual_seed(3).get_state()
    gen = torch.Generator()
    gen.set_state(state)
    coords = uncertain_point_coords(logits, num_points=50, oversample_ratio=3.0, importance_sample_ratio=0.75,
                                    generator=gen)
    assert coords.shape == (3, 50, 2)
    assert float(coords.min()) >= 0 and float(coords.max()) <= 1
    odd = uncertain_point_coords(logits, num_points=13, oversample_ratio=2.5, importance_sample_ratio=0.5)
    assert odd.shape == (3, 13, 2)

    replay = torch.Generator()
    replay.set_state(state)
    candidates = torch.rand((3, 150, 2), generator=replay)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()
    chosen = coords[:, :37]  # int(0.75 · 50) by uncertainty, then 13 uniform
    chosen_uncertainty = -point_sample(logits, chosen)[:, 0].abs()
    top = uncertainty.topk(37, dim=1).values
    assert torch.equal(chosen_uncertainty.sort(dim=1).values, top.sort(dim=1).values)
    rest = uncertainty.sort(dim=1, descending=True).values[:, 37:]
    assert (chosen_uncertainty.min(dim=1).values >= rest.max(dim=1).values).all()
    assert torch.equal(coords[:, 37:], torch.rand((3, 13, 2), generator=replay))


def test_pixel_text_alignment_hand_case() -> None:
    torch.manual_seed(8)
    score = torch.rand(1, 3, 2, 2) * 2 - 1  # cosine similarities
    labels = torch.tensor([[[0, 1, 2, 255], [1, 1, 0, 2], [255, 2, 2, 0], [0, 0, 1, 255]]])
    got = pixel_text_alignment_loss(score, labels, tau=0.07)
    # Bilinear 2 → 4, align_corners False: output i samples source (i + ½)/2 − ½, clamped at the border.
    up = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    logits = torch.einsum("ia,cab,jb->cij", up, score[0] / 0.07, up)
    total = 0.0
    for i in range(4):
        for j in range(4):
            target = int(labels[0, i, j])
            if target != 255:
                total += float(torch.logsumexp(logits[:, i, j], 0) - logits[target, i, j])
    # mmseg's mean: ignored pixels add nothing but count in the denominator.
    assert float(got) == pytest.approx(total / 16, rel=1e-5)
    assert float(pixel_text_alignment_loss(score, labels, tau=0.07, weight=0.5)) == pytest.approx(total / 32,
                                                                                                  rel=1e-5)
