"""macro_f1_from_counts: the training loop's macro-F1 from running per-class counts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from training.evaluation.metrics import macro_f1_from_counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_give_scikit_learns_macro_f1_over_every_class(seed):
    rng = np.random.default_rng(seed)
    classes = 5
    y_true = rng.integers(0, classes - 1, 200)  # class 4 never occurs
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, classes, 200))
    correct = np.bincount(y_true[y_true == y_pred], minlength=classes)
    seen = np.bincount(y_true, minlength=classes)
    predicted = np.bincount(y_pred, minlength=classes)
    expected = f1_score(
        y_true, y_pred, labels=list(range(classes)), average="macro", zero_division=0
    )
    assert macro_f1_from_counts(correct, seen, predicted) == pytest.approx(expected)


def test_a_class_neither_seen_nor_predicted_scores_zero():
    assert macro_f1_from_counts([5, 0], [5, 0], [5, 0]) == pytest.approx(0.5)
    assert macro_f1_from_counts([], [], []) == 0.0
