"""Classification metrics from logits and labels (scikit-learn for the scores).

Public API:
    classification_metrics, scored_metrics, macro_f1_from_counts, ECE_BINS.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from training.evaluation.calibration import nll, reliability_bins

#: equal-width confidence bins of the ECE and the reliability diagram (Guo et al. use 15).
ECE_BINS = 15


def macro_f1_from_counts(
    correct: Sequence[int], seen: Sequence[int], predicted: Sequence[int]
) -> float:
    """Macro-F1 from per-class counts, for running sums that keep no predictions: F1 of class c
    is ``2 * correct[c] / (seen[c] + predicted[c])`` (0 when the class was neither seen nor
    predicted, as scikit-learn's ``f1_score(..., zero_division=0)`` over every class gives it).

    Args:
        correct: per class, the images of that class predicted as it.
        seen: per class, the images whose true class it is.
        predicted: per class, the images predicted as it.
    """
    scores = [
        2 * c / (s + p) if s + p else 0.0 for c, s, p in zip(correct, seen, predicted, strict=True)
    ]
    return sum(scores) / len(scores) if scores else 0.0


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, balanced accuracy, NLL, per-class scores and the confusion matrix.

    Every score is computed over all ``len(class_names)`` classes, so a class absent from the
    labels still has its row (support 0, scores 0) and the matrix stays ``C x C``.

    Args:
        logits: ``(N, C)`` raw scores.
        labels: ``(N,)`` true class indices.
        class_names: one name per class; ``C`` is its length.

    Returns:
        A JSON-ready dict: ``accuracy``, ``macro_f1``, ``balanced_accuracy``, ``nll`` (mean
        cross-entropy of the logits, see ``training.calibration.nll``), ``per_class`` (list of
        ``{class, precision, recall, f1, support}``) and ``confusion_matrix`` (rows true, columns
        predicted).

    Raises:
        ValueError: on logits of the wrong shape, or with NaN or inf.
    """
    n_classes = len(class_names)
    if logits.ndim != 2 or logits.shape[1] != n_classes or len(logits) != len(labels):
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not fit "
            f"{n_classes} classes; expected (N, {n_classes}) and (N,)"
        )
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    y_true, y_pred = labels.numpy(), logits.argmax(dim=1).numpy()
    classes = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
        ),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "nll": nll(logits, labels),
        "per_class": [
            {
                "class": str(name),
                "precision": float(p),
                "recall": float(r),
                "f1": float(f),
                "support": int(s),
            }
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        ],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }


def scored_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    temperature: float = 1.0,
) -> dict[str, Any]:
    """:func:`classification_metrics` of ``softmax(logits / temperature)``, with calibration.

    Dividing by T > 0 keeps every argmax, so the prediction scores come from ``logits`` as they
    are and are the same for any T; NLL and the reliability bins use the scaled logits.

    Args:
        logits: ``(N, C)`` raw scores.
        labels: ``(N,)`` true class indices.
        class_names: one name per class.
        temperature: the softmax temperature T, > 0; 1.0 leaves the logits as they are.

    Returns:
        The metrics of :func:`classification_metrics` with ``nll`` at T, plus ``ece`` (over
        ``ECE_BINS`` bins), ``temperature`` (the T applied) and ``reliability`` (the
        ``training.calibration.reliability_bins`` dict the ECE comes from).
    """
    metrics = classification_metrics(logits, labels, class_names)
    scaled_nll = nll(logits, labels, temperature)  # first: it checks the temperature
    # Divided in float64, as calibration.nll does, so NLL and ECE see the same scaled logits.
    bins = reliability_bins(logits.detach().double().cpu() / temperature, labels, ECE_BINS)
    metrics.update(
        nll=scaled_nll,
        ece=bins["ece"],
        temperature=float(temperature),
        reliability=bins,
    )
    return metrics


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # A class that is predicted but absent from y_true has no recall; sklearn leaves it out of
    # the mean, which is what we want, and warns about it, which we do not.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, y_pred))
