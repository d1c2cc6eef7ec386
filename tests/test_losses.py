"""Class weights, soft-target cross-entropy and focal loss against their definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses import (
    FocalLoss,
    WeightedCrossEntropy,
    class_weights,
    focal_cross_entropy,
    soft_target_cross_entropy,
)


def test_inverse_frequency_weights():
    w = class_weights([100, 50, 25], scheme="inverse")
    assert torch.allclose(w, torch.tensor([1, 2, 4]) / (7 / 3))
    assert w.mean().item() == pytest.approx(1.0)


def test_effective_number_weights_between_equal_and_inverse():
    counts = [1000, 100, 10]
    beta = 0.99
    w = class_weights(counts, scheme="effective", beta=beta)
    raw = torch.tensor([(1 - beta) / (1 - beta**n) for n in counts])
    assert torch.allclose(w, (raw / raw.mean()).float())
    inv = class_weights(counts, scheme="inverse")
    ratio_eff, ratio_inv = (w[2] / w[0]).item(), (inv[2] / inv[0]).item()
    assert 1.0 < ratio_eff < ratio_inv  # milder than inverse frequency
    assert torch.allclose(class_weights(counts, "effective", beta=0.0), torch.ones(3))


def test_empty_class_gets_zero_weight():
    w = class_weights([10, 0, 30], scheme="inverse")
    assert w[1] == 0 and w[[0, 2]].mean().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "sqrt"}, "scheme='sqrt' is invalid"),
        ({"beta": 1.0}, r"beta=1.0 is invalid; allowed: a number in \[0, 1\)"),
    ],
)
def test_weight_arguments_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        class_weights([1, 2], **kwargs)


def test_soft_target_equals_hard_for_one_hot():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    onehot = F.one_hot(y, 4).float()
    assert torch.allclose(soft_target_cross_entropy(logits, onehot), F.cross_entropy(logits, y))
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])
    assert torch.allclose(
        soft_target_cross_entropy(logits, onehot, w), F.cross_entropy(logits, y, weight=w)
    )


def test_soft_target_mixture_is_mixture_of_losses():
    torch.manual_seed(1)
    logits = torch.randn(5, 3)
    ya, yb, lam = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 2, 0, 1, 1]), 0.3
    mixed = lam * F.one_hot(ya, 3).float() + (1 - lam) * F.one_hot(yb, 3).float()
    expected = lam * F.cross_entropy(logits, ya) + (1 - lam) * F.cross_entropy(logits, yb)
    assert torch.allclose(soft_target_cross_entropy(logits, mixed), expected)


def test_focal_loss_reduces_to_ce_and_downweights_easy():
    torch.manual_seed(2)
    logits, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, y), F.cross_entropy(logits, y))
    easy = torch.tensor([[5.0, 0.0, 0.0]])
    hard = torch.tensor([[0.0, 0.0, 0.0]])
    t = torch.tensor([0])
    ratio_easy = FocalLoss(2.0)(easy, t) / F.cross_entropy(easy, t)
    ratio_hard = FocalLoss(2.0)(hard, t) / F.cross_entropy(hard, t)
    assert ratio_easy < 0.01 < ratio_hard


def _focal_by_hand(logits, y, gamma, weight):
    # -w_y (1 - p_y)^gamma log p_y per sample, averaged over the targets' weights.
    total, norm = 0.0, 0.0
    for row, label in zip(logits.tolist(), y.tolist(), strict=True):
        z = torch.tensor(row)
        p = z.softmax(0)[label].item()
        total += -weight[label].item() * (1 - p) ** gamma * torch.log(torch.tensor(p)).item()
        norm += weight[label].item()
    return total / norm


def test_focal_matches_its_formula_for_hard_and_one_hot_targets():
    torch.manual_seed(3)
    logits, y = torch.randn(7, 4) * 2, torch.tensor([0, 1, 2, 3, 3, 1, 0])
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    expected = _focal_by_hand(logits, y, 2.0, weight)
    assert focal_cross_entropy(logits, y, 2.0, weight).item() == pytest.approx(expected, rel=1e-5)
    one_hot = F.one_hot(y, 4).float()
    soft = soft_target_cross_entropy(logits, one_hot, weight, gamma=2.0)
    assert soft.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="gamma=-1 is invalid"):
        focal_cross_entropy(logits, y, -1)


def test_soft_focal_scales_each_class_term():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([[0.7, 0.3, 0.0]])
    p = logits.softmax(1)[0]
    by_hand = -(0.7 * (1 - p[0]) ** 2 * p[0].log() + 0.3 * (1 - p[1]) ** 2 * p[1].log())
    got = soft_target_cross_entropy(logits, target, gamma=2.0)
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # gamma 0 is the plain soft-target cross-entropy.
    plain = -(0.7 * p[0].log() + 0.3 * p[1].log())
    assert soft_target_cross_entropy(logits, target).item() == pytest.approx(plain.item())


def test_weighted_loss_turns_focal_with_gamma_and_keeps_the_penalty():
    torch.manual_seed(4)
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = WeightedCrossEntropy(3, torch.tensor([1.0, 2.0, 0.5]), gamma=1.5)
    loss.set_penalty([1.0, 1.5, 1.0])
    expected = _focal_by_hand(logits, y, 1.5, torch.tensor([1.0, 3.0, 0.5]))
    assert loss(logits, y).item() == pytest.approx(expected, rel=1e-5)
    assert loss(logits, F.one_hot(y, 3).float()).item() == pytest.approx(expected, rel=1e-5)
    # A focal loss is smaller than the cross-entropy it scales.
    assert loss(logits, y) < WeightedCrossEntropy(3, torch.tensor([1.0, 2.0, 0.5]))(logits, y)
    with pytest.raises(ValueError, match="gamma=-0.5 is invalid; allowed: a number >= 0"):
        WeightedCrossEntropy(3, gamma=-0.5)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_gradients_stay_finite_on_a_saturated_softmax(gamma):
    # p == 1.0 exactly in float32: (1 - p)^gamma has an infinite slope there for gamma < 1.
    logits = torch.tensor([[40.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    focal_cross_entropy(logits, torch.tensor([0, 1]), gamma).backward()
    assert torch.isfinite(logits.grad).all()
    logits.grad = None
    soft = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.8, 0.0]])
    soft_target_cross_entropy(logits, soft, gamma=gamma).backward()
    assert torch.isfinite(logits.grad).all()
