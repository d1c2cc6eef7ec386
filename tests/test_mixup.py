"""Mixup: the alpha schedule, the Beta sampler, the mixed batch and targets, and resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from losses import soft_target_cross_entropy
from training.engine.mixup import Mixup, mixup_alpha, sample_beta


@pytest.mark.parametrize(
    "epoch, expected",
    [(0.0, 0.4), (7.5, 0.2), (3.0, 0.32), (15.0, 0.0), (16.0, 0.0), (100.0, 0.0)],
)
def test_alpha_decays_linearly_to_zero(epoch, expected):
    assert mixup_alpha(epoch, start_alpha=0.4, end_epoch=15.0) == pytest.approx(expected)


def test_alpha_rejects_negative_epoch():
    with pytest.raises(ValueError, match=r"epoch=-1.0 is invalid; allowed: a number >= 0"):
        mixup_alpha(-1.0, 0.4, 15.0)


@pytest.mark.parametrize("epoch, active", [(0.0, True), (14.99, True), (15.0, False), (20, False)])
def test_active_follows_alpha_and_enabled(epoch, active):
    assert Mixup(3).active(epoch) is active
    assert Mixup(3, enabled=False).active(epoch) is False
    assert Mixup(3, start_alpha=0.0).active(epoch) is False


@pytest.mark.parametrize("alpha", [0.2, 0.4, 2.0])
def test_beta_sampler_matches_beta_distribution(alpha):
    g = torch.Generator().manual_seed(0)
    draws = [sample_beta(alpha, g) for _ in range(1500)]
    assert all(0.0 <= d <= 1.0 for d in draws)
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 0.001


def test_beta_sampler_stays_finite_for_tiny_alpha():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_beta(1e-3, g) for _ in range(200)])
    assert torch.isfinite(draws).all()
    # Beta(a, a) with a -> 0 piles up at 0 and 1.
    assert ((draws < 0.01) | (draws > 0.99)).float().mean() > 0.95


def _batch(b: int = 8, classes: int = 4):
    x = torch.randn(b, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    y = torch.arange(b) % classes
    return x, y


def test_mixed_batch_is_convex_combination_of_a_permutation():
    mix = Mixup(4, generator=torch.Generator().manual_seed(3))
    x, y = _batch()
    lam, perm = mix.sample(8, epoch=1.0)
    assert 0.0 <= lam <= 1.0
    assert sorted(perm.tolist()) == list(range(8))
    mix.generator.manual_seed(3)
    x_mixed, targets, lam2 = mix(x, y, epoch=1.0)
    assert lam2 == lam  # same generator state, same draws
    assert torch.allclose(x_mixed, lam * x + (1 - lam) * x[perm])
    onehot = F.one_hot(y, 4).float()
    assert torch.allclose(targets, lam * onehot + (1 - lam) * onehot[perm])
    assert torch.allclose(targets.sum(dim=1), torch.ones(8))
    assert not torch.equal(x_mixed, x)


def test_mixed_loss_is_lam_weighted_cross_entropy():
    mix = Mixup(4, generator=torch.Generator().manual_seed(5))
    x, y = _batch()
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    lam, perm = mix.sample(8, epoch=0.5)
    mix.generator.manual_seed(5)
    _, targets, _ = mix(x, y, epoch=0.5)
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(expected.item())


def test_reproducible_with_seeded_generator():
    x, y = _batch()
    a = Mixup(4, generator=torch.Generator().manual_seed(7))(x, y, epoch=2.0)
    b = Mixup(4, generator=torch.Generator().manual_seed(7))(x, y, epoch=2.0)
    c = Mixup(4, generator=torch.Generator().manual_seed(8))(x, y, epoch=2.0)
    assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2] != c[2]


@pytest.mark.parametrize("kwargs, epoch", [({"enabled": False}, 0.0), ({}, 15.0), ({}, 30.0)])
def test_inactive_returns_inputs_and_one_hots(kwargs, epoch):
    g = torch.Generator().manual_seed(0)
    mix = Mixup(4, generator=g, **kwargs)
    state = g.get_state()
    x, y = _batch()
    x_out, targets, lam = mix(x, y, epoch)
    assert x_out is x and lam == 1.0
    assert torch.equal(targets, F.one_hot(y, 4).float())
    assert torch.equal(g.get_state(), state)  # no random numbers consumed


def test_label_smoothing_matches_cross_entropy():
    eps = 0.1
    mix = Mixup(4, label_smoothing=eps, generator=torch.Generator().manual_seed(0))
    x, y = _batch()
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    _, targets, _ = mix(x, y, epoch=20.0)
    assert torch.allclose(targets[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))
    expected = F.cross_entropy(logits, y, label_smoothing=eps)
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(expected.item())
    # Mixed and smoothed: the lam-weighted mix of the two smoothed cross-entropies.
    lam, perm = mix.sample(8, epoch=1.0)
    mix.generator.manual_seed(0)
    _, mixed, _ = mix(x, y, epoch=1.0)
    expected = lam * F.cross_entropy(logits, y, label_smoothing=eps) + (1 - lam) * F.cross_entropy(
        logits, y[perm], label_smoothing=eps
    )
    assert soft_target_cross_entropy(logits, mixed).item() == pytest.approx(expected.item())
    assert torch.allclose(mixed.sum(dim=1), torch.ones(8)) and mixed.min() >= eps / 4 - 1e-7


def test_targets_follow_x_device_and_dtype():
    mix = Mixup(3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 5, dtype=torch.float64)
    x_mixed, targets, _ = mix(x, torch.tensor([0, 1, 2, 0]), epoch=0.0)
    assert x_mixed.dtype == torch.float64 and targets.dtype == torch.float32
    assert targets.device == x.device and targets.shape == (4, 3)


def test_state_dict_round_trip_resumes_the_same_draws():
    x, y = _batch()
    mix = Mixup(4, generator=torch.Generator().manual_seed(11))
    mix(x, y, epoch=0.0)
    state = mix.state_dict()
    expected = mix(x, y, epoch=1.0)
    resumed = Mixup(4, enabled=False, generator=torch.Generator().manual_seed(99))
    resumed.load_state_dict(state)
    got = resumed(x, y, epoch=1.0)
    assert resumed.enabled and got[2] == expected[2] and torch.equal(got[0], expected[0])
    off = Mixup(4)
    off.load_state_dict({"enabled": False})
    assert off.state_dict() == {"enabled": False}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, r"num_classes=1 is invalid; allowed: an int >= 2"),
        ({"num_classes": True}, r"num_classes=True is invalid"),
        ({"start_alpha": -0.1}, r"start_alpha=-0.1 is invalid; allowed: a number >= 0"),
        ({"end_epoch": 0}, r"end_epoch=0 is invalid; allowed: a number > 0"),
        (
            {"label_smoothing": 1.0},
            r"label_smoothing=1.0 is invalid; allowed: a number in \[0, 1\)",
        ),
        ({"generator": 3}, r"generator=3 is invalid; allowed: a torch.Generator or None"),
    ],
)
def test_constructor_validation(kwargs, match):
    args = {"num_classes": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        Mixup(**args)


def test_call_rejects_bad_batches():
    mix = Mixup(4)
    with pytest.raises(ValueError, match="allowed: a floating-point tensor"):
        mix(torch.zeros(2, 3, dtype=torch.uint8), torch.tensor([0, 1]), 0.0)
    with pytest.raises(ValueError, match=r"y has shape \(3,\); allowed: \(2,\)"):
        mix(torch.zeros(2, 3), torch.tensor([0, 1, 2]), 0.0)
