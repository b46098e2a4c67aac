"""Hungarian matching of the Mask2Former losses: cost matrix, assignment, losses under the assignment.

All on CPU with a few queries, classes and points. Float32 against float64 hand-written references:
rel 1e-5; paths that run the same float32 operations on the same draws: exact.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from training.mask_losses import (Assignment, IdentityTargets, _set_losses, hungarian_assignment, identity_assignment,
                                  identity_targets, mask_classification_loss, match_cost, point_sample)


def _slow_cost(class_logits: torch.Tensor, point_logits: torch.Tensor, gt_classes: torch.Tensor,
               point_targets: torch.Tensor, weights: tuple[float, float, float]) -> torch.Tensor:
    """The matching cost pair by pair, in float64, straight from its definition."""
    class_logits, point_logits, point_targets = class_logits.double(), point_logits.double(), point_targets.double()
    q, g = point_logits.shape[0], point_targets.shape[0]
    cost = torch.zeros(q, g, dtype=torch.float64)
    for i in range(q):
        for j in range(g):
            x, t = point_logits[i], point_targets[j]
            c_cls = -torch.softmax(class_logits[i], 0)[gt_classes[j]]
            pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
            neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
            c_bce = (pos * t + neg * (1 - t)).sum() / x.numel()
            p = torch.sigmoid(x)
            c_dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            cost[i, j] = weights[0] * c_cls + weights[1] * c_bce + weights[2] * c_dice
    return cost


def _replayed_costs(class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: IdentityTargets,
                    num_points: int, seed: int) -> list[torch.Tensor | None]:
    """Each image's (Q, G) cost at the points the assignment draws: one (1, P, 2) draw per image, in order."""
    gen = torch.Generator().manual_seed(seed)
    gt_image, gt_classes = targets.present.nonzero(as_tuple=True)
    costs: list[torch.Tensor | None] = []
    for i in range(class_logits.shape[0]):
        coords = torch.rand((1, num_points, 2), generator=gen)
        rows = (gt_image == i).nonzero()[:, 0]
        if rows.numel() == 0:
            costs.append(None)
            continue
        q = mask_logits.shape[1]
        point_logits = point_sample(mask_logits[i][:, None], coords.expand(q, -1, -1))[:, 0]
        point_targets = point_sample(targets.masks[rows][:, None], coords.expand(rows.numel(), -1, -1))[:, 0]
        costs.append(_slow_cost(class_logits[i], point_logits, gt_classes[rows], point_targets, (2.0, 5.0, 5.0)))
    return costs


def _brute_force(cost: torch.Tensor) -> tuple[float, dict[int, int]]:
    """Minimum total cost over every one-to-one matching of min(Q, G) pairs, and its {gt: query} map."""
    q, g = cost.shape
    best, best_map = float("inf"), {}
    if q >= g:
        for queries in itertools.permutations(range(q), g):
            total = float(sum(cost[queries[j], j] for j in range(g)))
            if total < best:
                best, best_map = total, {j: queries[j] for j in range(g)}
    else:
        for gts in itertools.permutations(range(g), q):
            total = float(sum(cost[i, gts[i]] for i in range(q)))
            if total < best:
                best, best_map = total, {gts[i]: i for i in range(q)}
    return best, best_map


def _check_consistent(assignment: Assignment, targets: IdentityTargets, num_classes: int) -> None:
    """Classes agree with the pairs; the pairs are sorted by (image, query) and point at their own image's rows."""
    gt_image, gt_classes = targets.present.nonzero(as_tuple=True)
    assert torch.equal(gt_image[assignment.target_index], assignment.image_index)
    expected = torch.full_like(assignment.classes, num_classes)
    expected[assignment.image_index, assignment.query_index] = gt_classes[assignment.target_index]
    assert torch.equal(assignment.classes, expected)
    key = assignment.image_index * assignment.classes.shape[1] + assignment.query_index
    assert torch.equal(key, key.sort().values) and key.unique().numel() == key.numel()
    assert assignment.target_index.unique().numel() == assignment.target_index.numel()
    for t in assignment[1:]:
        assert t.dtype == torch.long and t.dim() == 1


def _block_labels(rows: list[list[int]], block: int = 4) -> torch.Tensor:
    """(1, H, W) label map of square blocks of the given train ids."""
    return torch.tensor(rows)[None].repeat_interleave(block, 1).repeat_interleave(block, 2)


# --------------------------------------------------------------------------------------------- the cost


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (2.0, 5.0, 5.0)])
def test_match_cost_equals_the_per_pair_definition(weights: tuple[float, float, float]) -> None:
    torch.manual_seed(0)
    q, g, p, c = 5, 3, 37, 4
    class_logits = torch.randn(q, c + 1) * 2
    point_logits = torch.randn(q, p) * 3
    gt_classes = torch.tensor([2, 0, 3])
    point_targets = torch.rand(g, p)  # soft, as bilinear samples of a binary mask are
    point_targets[0] = (point_targets[0] > 0.5).float()
    got = match_cost(class_logits, point_logits, gt_classes, point_targets, *weights)
    assert got.shape == (q, g) and got.dtype == torch.float32
    ref = _slow_cost(class_logits, point_logits, gt_classes, point_targets, weights)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_match_cost_prefers_the_right_query() -> None:
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    good = match_cost(torch.tensor([[5.0, -5.0]]), torch.tensor([[9.0, 9.0, -9.0, -9.0]]), torch.tensor([0]), targets)
    bad = match_cost(torch.tensor([[-5.0, 5.0]]), torch.tensor([[-9.0, -9.0, 9.0, 9.0]]), torch.tensor([0]), targets)
    # Class term ≈ −2, BCE ≈ 0, Dice ≈ 1 − 5/5 = 0 for the right query; ≈ 0 + 5·9 + 5·(1 − 1/5) for the wrong one.
    assert float(good) == pytest.approx(-2.0, abs=2e-3)
    assert float(bad) == pytest.approx(5 * 9.0 + 5 * 0.8, abs=1e-2)


# ---------------------------------------------------------------------------------------- the assignment


def test_assignment_is_the_minimum_over_all_matchings() -> None:
    torch.manual_seed(1)
    c, q, num_points, seed = 5, 4, 16, 7
    labels = torch.cat([
        _block_labels([[0, 2], [4, 4]]),        # 3 gts
        torch.full((1, 8, 8), 255),             # none
        _block_labels([[1, 255], [1, 3]]),      # 2 gts
    ])
    targets = identity_targets(labels, c)
    class_logits = torch.randn(3, q, c + 1)
    mask_logits = torch.randn(3, q, 6, 6) * 2
    got = hungarian_assignment(class_logits, mask_logits, targets, num_points=num_points,
                               generator=torch.Generator().manual_seed(seed))
    _check_consistent(got, targets, c)
    assert got.classes[1].tolist() == [c] * q
    assert got.image_index.tolist() == [0, 0, 0, 2, 2]
    # The points of image 2 come after image 1's draw, so this also checks that an empty image draws too.
    starts = [0, 3, 3]
    for i, cost in enumerate(_replayed_costs(class_logits, mask_logits, targets, num_points, seed)):
        if cost is None:
            continue
        best, best_map = _brute_force(cost)
        mine = got.image_index == i
        pairs = {int(t) - starts[i]: int(k) for t, k in zip(got.target_index[mine], got.query_index[mine])}
        assert pairs == best_map
        assert float(sum(cost[k, j] for j, k in pairs.items())) == pytest.approx(best, rel=1e-9)


def test_fewer_queries_than_ground_truths_leave_some_unmatched() -> None:
    torch.manual_seed(2)
    c, q, num_points, seed = 6, 2, 24, 3
    labels = _block_labels([[0, 1, 2], [3, 3, 5]])  # 5 gts, 2 queries
    targets = identity_targets(labels, c)
    class_logits = torch.randn(1, q, c + 1) * 2
    mask_logits = torch.randn(1, q, 6, 6) * 2
    got = hungarian_assignment(class_logits, mask_logits, targets, num_points=num_points,
                               generator=torch.Generator().manual_seed(seed))
    _check_consistent(got, targets, c)
    assert got.query_index.tolist() == [0, 1] and (got.classes < c).all()
    (cost,) = _replayed_costs(class_logits, mask_logits, targets, num_points, seed)
    _, best_map = _brute_force(cost)
    assert {int(t): int(k) for t, k in zip(got.target_index, got.query_index)} == best_map


def test_planted_permutation_is_recovered_and_beats_a_shuffle() -> None:
    torch.manual_seed(3)
    c, q = 6, 8
    labels = torch.cat([_block_labels([[0, 2], [5, 3]]), _block_labels([[1, 1], [255, 4]])])
    targets = identity_targets(labels, c)  # rows: image 0 classes 0, 2, 3, 5; image 1 classes 1, 4
    planted = {0: [6, 1, 3, 0], 1: [2, 7]}  # image → query of each of its gts, in row order
    class_logits = torch.zeros(2, q, c + 1)
    class_logits[..., c] = 6.0  # unplanted queries say "no object"
    mask_logits = torch.full((2, q, 8, 8), -6.0)
    row = 0
    for i, queries in planted.items():
        for k in queries:
            class_logits[i, k, c] = 0.0
            class_logits[i, k, targets.classes[i][targets.present[i]][queries.index(k)]] = 6.0
            mask_logits[i, k] = torch.where(targets.masks[row] > 0, 6.0, -6.0)
            row += 1
    mask_logits += 0.5 * torch.randn_like(mask_logits)
    got = hungarian_assignment(class_logits, mask_logits, targets, num_points=64,
                               generator=torch.Generator().manual_seed(0))
    _check_consistent(got, targets, c)
    pairs = {(int(i), int(t)): int(k) for i, t, k in zip(got.image_index, got.target_index, got.query_index)}
    assert pairs == {(0, 0): 6, (0, 1): 1, (0, 2): 3, (0, 3): 0, (1, 4): 2, (1, 5): 7}

    weights = torch.ones(c + 1)
    weights[-1] = 0.1
    count = torch.tensor(6.0)

    def losses(a: Assignment) -> torch.Tensor:
        parts = _set_losses(class_logits, mask_logits, a, targets.masks, weights, count, 64, 3.0, 0.75,
                            torch.Generator().manual_seed(1))
        return torch.stack(parts)

    # Same pairs, gts handed to the wrong queries: every term gets worse.
    shuffled = got.target_index.clone()
    shuffled[:4] = shuffled[:4].roll(1)
    shuffled[4:] = shuffled[4:].roll(1)
    classes = torch.full_like(got.classes, c)
    classes[got.image_index, got.query_index] = targets.present.nonzero()[:, 1][shuffled]
    good, bad = losses(got), losses(Assignment(classes, got.image_index, got.query_index, shuffled))
    assert (good < bad).all() and float(bad.sum()) > 10 * float(good.sum())


def test_identity_assignment_matches_the_present_classes() -> None:
    labels = torch.cat([_block_labels([[0, 255], [3, 0]]), _block_labels([[2, 2], [2, 2]])])
    targets = identity_targets(labels, 4)
    a = identity_assignment(targets, 4)
    assert a.image_index.tolist() == [0, 0, 1] and a.query_index.tolist() == [0, 3, 2]
    assert a.target_index.tolist() == [0, 1, 2]
    assert torch.equal(a.classes, targets.classes)
    _check_consistent(a, targets, 4)
    with pytest.raises(ValueError, match="classes"):
        identity_assignment(targets, 5)


def test_non_finite_costs_do_not_stop_the_matching() -> None:
    labels = _block_labels([[0, 1], [1, 0]])
    targets = identity_targets(labels, 2)
    class_logits = torch.zeros(1, 3, 3)
    mask_logits = torch.zeros(1, 3, 8, 8)
    mask_logits[0, 1, 2, 2] = float("nan")  # a broken query is left out while others can take the gts
    got = hungarian_assignment(class_logits, mask_logits, targets, num_points=32,
                               generator=torch.Generator().manual_seed(0))
    assert got.query_index.tolist() == [0, 2]


# ------------------------------------------------------------------------------------------- the losses


def test_hungarian_loss_equals_the_identity_loss_when_the_identity_is_optimal() -> None:
    torch.manual_seed(4)
    c, num_points = 4, 48
    labels = torch.cat([_block_labels([[0, 1], [3, 255]]), _block_labels([[2, 2], [255, 2]]),
                        torch.full((1, 8, 8), 255)])
    targets = identity_targets(labels, c)
    class_logits = torch.randn(3, c, c + 1)
    class_logits.scatter_add_(2, targets.classes[..., None], torch.full((3, c, 1), 6.0))
    onehot = F.one_hot(labels.clamp_max(c), c + 1)[..., :c].permute(0, 3, 1, 2).float()
    mask_logits = 4.0 * (2 * onehot - 1) + torch.randn(3, c, 8, 8)
    hungarian = hungarian_assignment(class_logits, mask_logits, targets, num_points=num_points,
                                     generator=torch.Generator().manual_seed(5))
    identity = identity_assignment(targets, c)
    assert all(torch.equal(a, b) for a, b in zip(hungarian, identity))  # else the comparison below is vacuous

    got = mask_classification_loss([class_logits], [mask_logits], labels, num_classes=c, num_points=num_points,
                                   generator=torch.Generator().manual_seed(5), matching="hungarian")
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):  # the matching's draws, one per image, before the loss points
        torch.rand((1, num_points, 2), generator=gen)
    ref = mask_classification_loss([class_logits], [mask_logits], labels, num_classes=c, num_points=num_points,
                                   generator=gen)
    assert got.keys() == ref.keys()
    for key in got:
        assert torch.equal(got[key], ref[key]), key
    assert float(got["loss_mask"]) > 0 and float(got["loss_dice"]) > 0


def test_every_set_is_matched_on_its_own() -> None:
    torch.manual_seed(5)
    c, q = 3, 5
    labels = _block_labels([[0, 2], [2, 0]])
    targets = identity_targets(labels, c)
    sets_cls, sets_mask = [], []
    for k in (1, 4):  # the two sets put the same planted prediction on different queries
        cls = torch.zeros(1, q, c + 1)
        cls[..., c] = 5.0
        masks = torch.full((1, q, 8, 8), -5.0)
        for j, query in enumerate((k, (k + 1) % q)):
            cls[0, query] = F.one_hot(targets.present[0].nonzero()[j], c + 1).float() * 10 - 5
            masks[0, query] = torch.where(targets.masks[j] > 0, 5.0, -5.0)
        sets_cls.append(cls)
        sets_mask.append(masks)
    both = mask_classification_loss(sets_cls, sets_mask, labels, num_classes=c, num_points=64,
                                    matching="hungarian", generator=torch.Generator().manual_seed(0))
    assert set(both) == {"loss_cls", "loss_mask", "loss_dice", "d0.loss_cls", "d0.loss_mask", "d0.loss_dice", "loss"}
    # Matched separately, both sets are near perfect. One matching shared by both would give one set a class
    # CE of about 2·10 and, the matched queries' masks being −5 everywhere, a Dice term of about 5·1.
    for prefix in ("", "d0."):
        assert float(both[f"{prefix}loss_cls"]) < 0.05
        assert float(both[f"{prefix}loss_dice"]) < 2.5


def test_gradients_reach_matched_masks_and_every_class_logit() -> None:
    torch.manual_seed(6)
    c, q = 3, 6
    labels = torch.cat([_block_labels([[0, 1], [1, 255]]), _block_labels([[2, 2], [255, 255]])])
    class_logits = torch.randn(2, q, c + 1, requires_grad=True)
    mask_logits = torch.randn(2, q, 6, 6, requires_grad=True)
    losses = mask_classification_loss([class_logits], [mask_logits], labels, num_classes=c, num_points=32,
                                      matching="hungarian", generator=torch.Generator().manual_seed(2))
    losses["loss"].backward()
    # The assignment is drawn first from the same seed, so it is the one the loss used.
    a = hungarian_assignment(class_logits, mask_logits, identity_targets(labels, c), num_points=32,
                             generator=torch.Generator().manual_seed(2))
    assert a.image_index.tolist() == [0, 0, 1]
    matched = torch.zeros(2, q, dtype=torch.bool)
    matched[a.image_index, a.query_index] = True
    per_query = mask_logits.grad.abs().flatten(2).amax(2)
    assert (per_query[matched] > 0).all()
    assert (per_query[~matched] == 0).all()
    assert (class_logits.grad.abs().amax(2) > 0).all()


def test_mask_count_is_the_number_of_ground_truths() -> None:
    torch.manual_seed(7)
    c, q = 4, 2
    labels = torch.cat([_block_labels([[0, 1], [2, 3]]), _block_labels([[1, 1], [1, 1]])])  # 5 gts, 3 matched
    class_logits = torch.randn(2, q, c + 1)
    mask_logits = torch.randn(2, q, 8, 8)

    def run(num_masks: float | None) -> dict[str, torch.Tensor]:
        return mask_classification_loss([class_logits], [mask_logits], labels, num_classes=c, num_points=20,
                                        matching="hungarian", generator=torch.Generator().manual_seed(0),
                                        num_masks=num_masks)

    default, five, three = run(None), run(5.0), run(3.0)
    for key in ("loss_cls", "loss_mask", "loss_dice"):
        assert torch.equal(default[key], five[key]), key
    assert float(three["loss_dice"]) == pytest.approx(float(five["loss_dice"]) * 5 / 3, rel=1e-6)
    assert torch.equal(three["loss_cls"], five["loss_cls"])


def test_an_unlabelled_batch_has_no_matches_and_zero_mask_terms() -> None:
    labels = torch.full((2, 8, 8), 255)
    class_logits = torch.randn(2, 3, 3, requires_grad=True)
    mask_logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    losses = mask_classification_loss([class_logits], [mask_logits], labels, num_classes=2, num_points=16,
                                      matching="hungarian")
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    losses["loss"].backward()
    assert torch.equal(mask_logits.grad, torch.zeros_like(mask_logits))
    # Every query's target is "no object": the class loss is the mean CE against index 2.
    ce = F.cross_entropy(class_logits.detach().reshape(-1, 3), torch.full((6,), 2))
    assert float(losses["loss_cls"].detach()) == pytest.approx(2.0 * float(ce), rel=1e-6)


# ------------------------------------------------------------------------------------------- validation


def test_bad_arguments_are_refused() -> None:
    labels = _block_labels([[0, 1], [1, 0]])
    targets = identity_targets(labels, 2)
    cls, masks = torch.zeros(1, 5, 3), torch.zeros(1, 5, 4, 4)
    with pytest.raises(ValueError, match="matching"):
        mask_classification_loss([cls], [masks], labels, num_classes=2, matching="greedy")
    with pytest.raises(ValueError, match="expected"):
        mask_classification_loss([cls], [torch.zeros(1, 4, 4, 4)], labels, num_classes=2, matching="hungarian")
    with pytest.raises(ValueError, match="expected"):
        mask_classification_loss([torch.zeros(1, 5, 4)], [masks], labels, num_classes=2, matching="hungarian")
    with pytest.raises(ValueError, match="expected"):
        mask_classification_loss([cls], [torch.zeros(1, 5, 16)], labels, num_classes=2, matching="hungarian")
    with pytest.raises(ValueError, match="expected"):
        mask_classification_loss([torch.zeros(1, 0, 3)], [torch.zeros(1, 0, 4, 4)], labels, num_classes=2,
                                 matching="hungarian")
    with pytest.raises(ValueError, match="expected"):  # identity still needs Q = C
        mask_classification_loss([cls], [masks], labels, num_classes=2)
    with pytest.raises(ValueError, match="expected"):
        hungarian_assignment(torch.zeros(2, 5, 3), torch.zeros(2, 5, 4, 4), targets)  # batch of 2, targets of 1
    with pytest.raises(ValueError, match="expected"):
        hungarian_assignment(cls, torch.zeros(1, 5, 4), targets)
    with pytest.raises(ValueError, match="num_points"):
        hungarian_assignment(cls, masks, targets, num_points=0)
    # A single query is allowed: it takes one of the two gts.
    one = mask_classification_loss([cls[:, :1]], [masks[:, :1]], labels, num_classes=2, num_points=8,
                                   matching="hungarian")
    assert torch.isfinite(one["loss"])
