"""Temperature scaling recovers a known temperature; ECE, NLL and the reliability diagram."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.evaluation.calibration import (
    NEAR_ZERO_NLL,
    T_MAX,
    T_MIN,
    TemperatureFit,
    calibration_report,
    choose_temperature,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    reliability_diagram,
    unidentifiable_reason,
)


def calibrated(n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits z and labels drawn from softmax(z), so z is calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, classes, generator=g)
    y = torch.multinomial(z.softmax(dim=1), 1, generator=g).squeeze(1)
    return z, y


@pytest.fixture(scope="module")
def data():
    return calibrated()


@pytest.mark.parametrize("scale, expected", [(2.5, 2.5), (0.5, 0.5), (1.0, 1.0)])
def test_fit_recovers_known_temperature(data, scale, expected):
    z, y = data
    t = fit_temperature(z * scale, y)
    assert t == pytest.approx(expected, rel=0.1)
    # The fitted T is a minimum of the NLL: nudging it either way does worse.
    assert nll(z * scale, y, t) <= min(nll(z * scale, y, t * 1.05), nll(z * scale, y, t / 1.05))


def test_fit_accepts_float32_logits_on_any_dtype_and_clamps_degenerate_sets():
    # All predictions right and well separated: NLL keeps falling as T -> 0, so T hits the floor.
    z = torch.tensor([[5.0, 0.0], [0.0, 5.0], [4.0, -1.0]], dtype=torch.float16)
    assert fit_temperature(z, torch.tensor([0, 1, 0])) == T_MIN
    # All predictions wrong: NLL keeps falling as T -> inf, so T hits the ceiling.
    assert fit_temperature(z.float(), torch.tensor([1, 0, 1])) == T_MAX


def test_ece_small_when_calibrated_and_large_when_overconfident(data):
    z, y = data
    assert expected_calibration_error(z, y) < 0.02
    over = z * 2.5
    before = expected_calibration_error(over, y)
    assert before > 0.05
    after = expected_calibration_error(over / fit_temperature(over, y), y)
    assert after < 0.02 and after < before


def test_ece_hand_computed():
    # 3 bins on [0, 1]: confidences 0.9, 0.8, 0.9 fall in bin 3, 0.55 in bin 2.
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 0, 1])  # correct, wrong, correct, correct
    bins = reliability_bins(probs, labels, n_bins=3, from_logits=False)
    assert bins["count"] == [0, 1, 3]
    assert bins["confidence"][0] is None and bins["accuracy"][0] is None
    assert bins["confidence"][1:] == pytest.approx([0.55, (0.9 + 0.8 + 0.9) / 3])
    assert bins["accuracy"][1:] == pytest.approx([1.0, 2 / 3])
    assert bins["edges"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    # bin 2: |1 - 0.55| * 1/4; bin 3: |2/3 - 2.6/3| * 3/4
    expected = 0.45 / 4 + abs(2 / 3 - 2.6 / 3) * 3 / 4
    assert bins["ece"] == pytest.approx(expected)
    ece = expected_calibration_error(probs, labels, n_bins=3, from_logits=False)
    assert ece == pytest.approx(expected)
    # The same probabilities given as logits (log-probs) give the same ECE.
    assert expected_calibration_error(probs.log(), labels, n_bins=3) == pytest.approx(expected)


def test_nll_matches_cross_entropy():
    z, y = calibrated(n=50, seed=1)
    assert nll(z, y) == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    assert nll(z, y, 2.0) == pytest.approx(F.cross_entropy(z / 2, y).item(), rel=1e-6)


def test_report_before_and_after(data):
    z, y = data
    over = z * 2.5
    t = fit_temperature(over, y)
    report = calibration_report(over, y, t)
    assert set(report) == {"temperature", "nll_before", "nll_after", "ece_before", "ece_after"}
    assert report["temperature"] == t
    assert report["nll_after"] < report["nll_before"]
    assert report["ece_after"] < report["ece_before"]
    assert report["nll_after"] == pytest.approx(nll(over, y, t))


def test_diagram_is_png_and_leaves_no_temp_files(tmp_path, data):
    z, y = data
    over = z[:2000] * 2.5
    bins = reliability_bins(z[:2000], y[:2000], n_bins=10)
    curves = {"before": (over, y[:2000]), "after": (over / 2.5, y[:2000]), "given": bins}
    path = reliability_diagram(curves, tmp_path / "reliability.png", n_bins=10)
    assert path == tmp_path / "reliability.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["reliability.png"]


def test_diagram_failure_keeps_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "reliability.png"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="allowed: at least one"):
        reliability_diagram({}, path)
    with pytest.raises(ValueError, match="logits contain NaN"):
        reliability_diagram({"x": (torch.full((2, 2), float("nan")), torch.tensor([0, 1]))}, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda z, y: nll(z, y, 0.0), r"temperature=0.0 is invalid; allowed: a number > 0"),
        (lambda z, y: fit_temperature(z, y, max_iter=0), r"max_iter=0 is invalid"),
        (lambda z, y: reliability_bins(z, y, n_bins=0), r"n_bins=0 is invalid; allowed: an int"),
        (lambda z, y: nll(z[:, :1], y), r"logits have shape \(4, 1\); allowed: \(N, C\)"),
        (lambda z, y: nll(z, y[:3]), r"labels have shape \(3,\); allowed: \(4,\)"),
        (lambda z, y: nll(z, y + 2), r"labels span \[2, 4\]; allowed: \[0, 2\]"),
    ],
)
def test_arguments_checked(call, match):
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=match):
        call(z, y)


def test_fit_is_fast_on_cpu(data):
    import time

    z, y = data
    fit_temperature(z[:10], y[:10])  # the first optimizer in a process imports torch._dynamo
    start = time.perf_counter()
    fit_temperature(z * 2.5, y)
    assert time.perf_counter() - start < 2.0


def separable_split(n: int, noise: float, seed: int, classes: int = 4):
    """Logits 3 * one_hot(y) + noise: with a small noise every argmax is right (separable)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return 3.0 * F.one_hot(y, classes).double() + noise * torch.randn(n, classes, generator=g), y


def test_separable_validation_keeps_t_at_one_and_spares_the_test_nll():
    val_z, val_y = separable_split(200, noise=0.3, seed=0)
    test_z, test_y = separable_split(2000, noise=2.0, seed=1)  # overlapping: some mistakes
    assert bool((val_z.argmax(1) == val_y).all()) and not (test_z.argmax(1) == test_y).all()
    # The plain fit runs to its bound, and that T wrecks the test NLL.
    assert fit_temperature(val_z, val_y) == T_MIN
    assert nll(test_z, test_y, T_MIN) > 5 * nll(test_z, test_y)
    fit = choose_temperature(val_z, val_y)
    assert fit.temperature == 1.0
    assert fit.reason == "every validation image is right (200 of 200), so T is not identifiable"


def test_near_zero_nll_with_a_mistake_keeps_t_at_one():
    z, y = separable_split(2000, noise=0.3, seed=2)
    z = z * 8.0  # confident: the mean NLL is near 0
    z[0] = torch.tensor([0.0, 0.01, 0.0, 0.0], dtype=z.dtype)  # one barely wrong image (y=0)
    assert not (z.argmax(1) == y).all() and nll(z, y) < NEAR_ZERO_NLL
    fit = choose_temperature(z, y)
    assert fit.temperature == 1.0 and "is near 0 (< 0.001)" in fit.reason


def test_a_fit_on_the_lower_bound_keeps_t_at_one():
    # Three right by a small margin, one a hair wrong: the NLL (not near 0) is least at T_MIN.
    z = torch.tensor([[0.2, 0.0], [0.0, 0.2], [0.2, 0.0], [0.0, 3e-3]])
    y = torch.tensor([0, 1, 0, 0])
    assert unidentifiable_reason(z, y) is None and fit_temperature(z, y) == T_MIN
    assert choose_temperature(z, y) == TemperatureFit(
        1.0, f"the fit ran to its lower bound T={T_MIN:g}"
    )


def test_an_identifiable_set_gets_the_fitted_temperature(data):
    z, y = data
    fit = choose_temperature(z * 2.5, y)
    assert fit.reason is None and fit.temperature == fit_temperature(z * 2.5, y)
    assert fit.temperature == pytest.approx(2.5, rel=0.1)
