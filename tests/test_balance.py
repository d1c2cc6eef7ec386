"""Balanced sampling, the double-correction warning, ClassPenalty and per_class_accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from losses import class_weights
from training.callbacks.class_penalty import ClassPenalty, moved_classes, per_class_accuracy
from training.engine.data import double_correction_warning, make_balanced_sampler, sample_weights

# --------------------------------------------------------------------------- sampling


def test_sample_weights_are_class_weights_per_sample():
    labels = np.array([0, 1, 1, 2, 0])
    w = sample_weights(labels, [2.0, 0.5, 1.0])
    assert w.tolist() == [2.0, 0.5, 0.5, 1.0, 2.0]


def test_inverse_sample_weights_give_equal_class_totals():
    labels = np.array([0] * 90 + [1] * 10)
    w = sample_weights(labels, class_weights([90, 10], "inverse"))
    assert w[:90].sum().item() == pytest.approx(w[90:].sum().item())


@pytest.mark.parametrize(
    "labels, cw, match",
    [
        (np.array([0, 3]), [1.0, 1.0], "class_weights has 2 entries but labels go up to 3"),
        (np.array([0, 1]), [1.0, -1.0], "finite numbers >= 0"),
        (np.array([0, 0]), [0.0, 1.0], "every sample has weight 0"),
        (np.array([0.5, 1.0]), [1.0, 1.0], "integer class indices"),
        (np.array([-1, 1]), [1.0, 1.0], "labels contain -1"),
    ],
)
def test_sample_weights_validate(labels, cw, match):
    with pytest.raises(ValueError, match=match):
        sample_weights(labels, cw)


def _draw_share(sampler: WeightedRandomSampler, labels: np.ndarray) -> float:
    drawn = labels[np.fromiter(iter(sampler), dtype=np.int64)]
    return float((drawn == 1).mean())


def test_balanced_sampler_balances_90_10():
    labels = np.array([0] * 900 + [1] * 100)
    gen = torch.Generator().manual_seed(0)
    sampler = make_balanced_sampler(labels, generator=gen, num_samples=20_000)
    assert isinstance(sampler, WeightedRandomSampler) and len(sampler) == 20_000
    assert _draw_share(sampler, labels) == pytest.approx(0.5, abs=0.02)


def test_effective_scheme_balances_partly_and_default_length_is_n():
    labels = np.array([0] * 900 + [1] * 100)
    sampler = make_balanced_sampler(
        labels, scheme="effective", beta=0.99, generator=torch.Generator().manual_seed(1)
    )
    assert len(sampler) == 1000
    sampler.num_samples = 20_000
    # Class weights (1 - b) / (1 - b^n): class 1 is favoured 1.58x, short of the 9x of inverse.
    w0, w1 = ((1 - 0.99) / (1 - 0.99**n) for n in (900, 100))
    expected = 100 * w1 / (900 * w0 + 100 * w1)  # ~0.149, between natural 0.1 and balanced 0.5
    assert _draw_share(sampler, labels) == pytest.approx(expected, abs=0.015)


def test_sampler_seeded_generator_is_reproducible():
    labels = np.arange(30) % 3
    a = list(make_balanced_sampler(labels, generator=torch.Generator().manual_seed(5)))
    b = list(make_balanced_sampler(labels, generator=torch.Generator().manual_seed(5)))
    assert a == b


@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True])
def test_sampler_checks_num_samples(num_samples):
    with pytest.raises(ValueError, match=f"num_samples={num_samples!r} is invalid"):
        make_balanced_sampler(np.array([0, 1]), num_samples=num_samples)


def test_sampler_checks_scheme():
    with pytest.raises(ValueError, match="scheme='sqrt' is invalid"):
        make_balanced_sampler(np.array([0, 1]), scheme="sqrt")


# --------------------------------------------------------------------------- warning


@pytest.mark.parametrize("scheme", ["inverse", "effective"])
def test_double_correction_warned(scheme):
    text = double_correction_warning(scheme, True)
    assert text is not None and "corrected twice" in text and repr(scheme) in text


@pytest.mark.parametrize("scheme, balanced", [("none", True), ("inverse", False), ("none", False)])
def test_no_warning_when_corrected_once(scheme, balanced):
    assert double_correction_warning(scheme, balanced) is None


def test_warning_checks_scheme():
    with pytest.raises(ValueError, match="loss_weighting='focal' is invalid"):
        double_correction_warning("focal", True)


# --------------------------------------------------------------------------- ClassPenalty

EVEN = [0.9, 0.9, 0.9, 0.9]


def test_overfit_class_gets_weight_above_one_others_below():
    cp = ClassPenalty(4, use_recall=False)
    w = cp.update(train_acc_per_class=[0.9, 0.9, 0.9, 0.95], val_acc_per_class=[0.9, 0.9, 0.9, 0.5])
    assert w[3] > 1 and (w[:3] < 1).all()
    assert w.mean().item() == pytest.approx(1.0)
    assert w.dtype == torch.float32
    assert cp.changes()[3] > 0 and all(d < 0 for d in cp.changes()[:3])


def test_no_gap_no_shortfall_keeps_weights_at_one():
    cp = ClassPenalty(4)
    w = cp.update(EVEN, EVEN, EVEN)
    assert torch.allclose(w, torch.ones(4))
    # A class better on validation than on train is not rewarded.
    w = cp.update([0.5, 0.9, 0.9, 0.9], EVEN)
    assert torch.allclose(w, torch.ones(4))


def test_raw_weights_formula():
    cp = ClassPenalty(3, strength=2.0)
    raw = cp.raw_weights([0.9, 0.8, 0.7], [0.7, 0.8, 0.9], [0.4, 0.8, 1.2])
    # gaps (0.2, 0, 0); mean recall 0.8 -> shortfalls (0.5, 0, 0)
    assert raw.tolist() == pytest.approx([1 + 2 * 0.7, 1.0, 1.0])


def test_smoothing_moves_partway_then_further():
    train, val = [0.9, 0.9, 0.9], [0.9, 0.9, 0.6]
    target = ClassPenalty(3, momentum=0.0, use_recall=False).update(train, val)
    cp = ClassPenalty(3, momentum=0.7, use_recall=False)
    first = cp.update(train, val).clone()
    second = cp.update(train, val).clone()
    assert 1.0 < first[2] < second[2] < target[2]
    # Before rescaling, the first update is 0.7 * 1 + 0.3 * raw.
    smoothed = torch.tensor([1.0, 1.0, 0.7 + 0.3 * 1.3])
    assert torch.allclose(first, smoothed / smoothed.mean())


def test_clip_then_rescale_to_mean_one():
    # raw (1, 1, 1, 11) -> clip (1, 1, 1, 2) -> mean 1.25 -> (0.8, 0.8, 0.8, 1.6): the top class
    # keeps the clipped ratio max/1 to the others, not max_weight itself.
    cp = ClassPenalty(4, momentum=0.0, strength=10.0, min_weight=0.5, max_weight=2.0)
    w = cp.update([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0])
    assert w.tolist() == pytest.approx([0.8, 0.8, 0.8, 1.6])
    assert w.mean().item() == pytest.approx(1.0)


def test_final_clip_keeps_bounds_when_rescaling_crosses_them():
    # raw (1, 11, 11, 11) -> clip (1, 2, 2, 2) -> / 1.75 -> 0.571 for class 0, below min 0.9.
    cp = ClassPenalty(4, momentum=0.0, strength=10.0, min_weight=0.9, max_weight=2.0)
    for _ in range(3):
        w = cp.update([1.0] * 4, [1.0, 0.0, 0.0, 0.0])
        assert (w >= 0.9 - 1e-6).all() and (w <= 2.0 + 1e-6).all()
    assert w[0].item() == pytest.approx(0.9)
    assert w[1:].tolist() == pytest.approx([2 / 1.75] * 3)


def test_recall_term_raises_poorly_recalled_class():
    acc = [0.8, 0.8, 0.8]
    recall = [0.9, 0.9, 0.3]
    with_recall = ClassPenalty(3).update(acc, acc, recall)
    assert with_recall[2] > 1 > with_recall[0]
    assert torch.allclose(ClassPenalty(3, use_recall=False).update(acc, acc, recall), torch.ones(3))
    assert torch.allclose(ClassPenalty(3).update(acc, acc, None), torch.ones(3))


def test_non_finite_inputs_count_as_no_penalty():
    cp = ClassPenalty(3)
    w = cp.update([0.9, math.nan, 0.9], [0.9, 0.5, 0.9], [0.9, math.nan, 0.9])
    assert torch.allclose(w, torch.ones(3))


def test_class_penalty_state_round_trip():
    cp = ClassPenalty(3)
    cp.update([0.9, 0.9, 0.9], [0.9, 0.9, 0.5])
    other = ClassPenalty(3)
    other.load_state_dict(cp.state_dict())
    assert torch.equal(other.weights, cp.weights) and other.changes() == cp.changes()
    assert other.num_updates == 1
    # Both continue identically after the restore.
    nxt = ([0.9, 0.9, 0.9], [0.5, 0.9, 0.9])
    assert torch.equal(other.update(*nxt), cp.update(*nxt))
    with pytest.raises(ValueError, match="state has 3 class weights; this ClassPenalty has 4"):
        ClassPenalty(4).load_state_dict(cp.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes=1 is invalid; allowed: an int >= 2"),
        ({"momentum": 1.0}, r"momentum=1.0 is invalid; allowed: a number in \[0, 1\)"),
        ({"strength": -1}, "strength=-1 is invalid; allowed: a number >= 0"),
        ({"min_weight": 0}, r"min_weight=0 is invalid; allowed: a number in \(0, 1\]"),
        ({"min_weight": 1.5}, "min_weight=1.5 is invalid"),
        ({"max_weight": 0.9}, "max_weight=0.9 is invalid; allowed: a number >= 1"),
        ({"use_recall": 1}, "use_recall=1 is invalid; allowed: True | False"),
    ],
)
def test_class_penalty_validates(kwargs, match):
    args = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        ClassPenalty(**args)


def test_update_checks_lengths():
    with pytest.raises(
        ValueError, match=r"val_acc_per_class has 2 entries; allowed: one per class"
    ):
        ClassPenalty(3).update([0.9, 0.9, 0.9], [0.9, 0.9])


# --------------------------------------------------------------------------- per_class_accuracy


def test_per_class_accuracy_from_predictions_and_logits():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 0, 1, 0, 1, 0, 2, 2])
    assert per_class_accuracy(preds, labels, 3) == pytest.approx([0.75, 0.5, 1.0])
    logits = torch.nn.functional.one_hot(preds, 3).float() * 5  # (8, 3), argmax = preds
    assert per_class_accuracy(logits, labels, 3) == pytest.approx([0.75, 0.5, 1.0])


def test_per_class_accuracy_absent_class_gets_mean_of_present():
    labels = torch.tensor([0, 0, 2, 2])
    preds = torch.tensor([0, 1, 2, 2])
    acc = per_class_accuracy(preds, labels, 3)
    assert acc == pytest.approx([0.5, 0.75, 1.0])
    assert not any(math.isnan(a) for a in acc)
    assert per_class_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([]), 2) == [1.0, 1.0]


@pytest.mark.parametrize(
    "preds, labels, n, match",
    [
        (torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 2, "2 predictions for 3 labels"),
        (torch.tensor([0, 1]), torch.tensor([0, 3]), 2, r"labels span 0..3; allowed: 0..1"),
        (torch.tensor([0]), torch.tensor([0]), 1, "num_classes=1 is invalid"),
    ],
)
def test_per_class_accuracy_validates(preds, labels, n, match):
    with pytest.raises(ValueError, match=match):
        per_class_accuracy(preds, labels, n)


# --------------------------------------------------------------------------- notable moves


SETTINGS = [
    {"num_classes": 2},
    {"num_classes": 3, "momentum": 0.5},
    {"num_classes": 8},
    {"num_classes": 8, "momentum": 0.9, "strength": 3.0},
    {"num_classes": 4, "min_weight": 0.25, "max_weight": 4.0, "use_recall": False},
]


def extreme_epoch(c: int) -> tuple[list[float], list[float], list[float]]:
    """The last class overfits completely and is never recalled; the others are perfect."""
    return [1.0] * c, [1.0] * (c - 1) + [0.0], [1.0] * (c - 1) + [0.0]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_no_single_epoch_from_rest_moves_a_weight_past_notable_move(kwargs):
    c = kwargs["num_classes"]
    generator = torch.Generator().manual_seed(0)
    largest = 0.0
    for _ in range(200):
        penalty = ClassPenalty(**kwargs)
        train, val, recall = torch.rand(3, c, generator=generator).tolist()
        penalty.update(train, val, recall)
        largest = max(largest, *(abs(d) for d in penalty.changes()))
    assert largest <= penalty.notable_move
    extreme = ClassPenalty(**kwargs)
    extreme.update(*extreme_epoch(c))
    assert max(abs(d) for d in extreme.changes()) == pytest.approx(extreme.notable_move)


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_the_same_push_over_a_few_epochs_drifts_past_notable_move(kwargs):
    penalty = ClassPenalty(**kwargs)
    epoch = extreme_epoch(kwargs["num_classes"])
    drift = [penalty.update(*epoch)[-1].item() - 1.0 for _ in range(5)]
    assert drift[0] <= penalty.notable_move + 1e-6 < drift[-1]  # weights are float32


def test_notable_move_grows_with_strength_and_shrinks_with_momentum_and_a_tight_bound():
    base = ClassPenalty(4).notable_move
    assert ClassPenalty(4, strength=2.0).notable_move > base
    assert ClassPenalty(4, momentum=0.9).notable_move < base
    assert ClassPenalty(4, max_weight=1.2).notable_move < base
    assert ClassPenalty(4, strength=0.0).notable_move == 0.0


def test_moved_classes_compare_with_the_reference_largest_first():
    reference = [1.0, 1.0, 1.0, 1.0]
    assert moved_classes([1.1, 0.5, 1.6, 0.8], reference, 0.4) == [2, 1]
    assert moved_classes([1.1, 0.9, 1.0, 1.0], reference, 0.4) == []
    assert moved_classes([1.4, 1.0, 1.0, 1.0], reference, 0.4) == []  # must exceed it
    assert moved_classes(reference, reference, 0.0) == []


@pytest.mark.parametrize(
    ("weights", "threshold", "match"),
    [([1.0], 0.1, "1 weights against 2"), ([1.0, 1.0], -0.1, "threshold=-0.1")],
)
def test_moved_classes_validates(weights, threshold, match):
    with pytest.raises(ValueError, match=match):
        moved_classes(weights, [1.0, 1.0], threshold)
