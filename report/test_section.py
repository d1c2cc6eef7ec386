"""The report's test section, from the run's ``test_report.json`` alone (no forward pass).

It shows every scored weight set (best, best+T, swa, swa+T) side by side, then the confusion
matrices, reliability diagram, per-class scores and most-confused class pairs of the final
weights (``swa`` when it was scored, else ``best``).

Public API:
    add_test_section, summary_rows, per_class_rows, confused_pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from report.page import Figure, Page
from report.run import RunFolder, final_set
from training.evaluation.calibration import reliability_diagram
from training.evaluation.metrics import ECE_BINS
from training.evaluation.report import (
    SCALED_SUFFIX,
    SUMMARY_METRICS,
    temperature_notes,
    weight_label,
)

#: (column header, metric key) of the summary table, in order.
#: most-confused pairs listed.
TOP_PAIRS = 5

#: above this many classes the confusion cells carry no numbers (they would overlap).
ANNOTATE_UP_TO = 20


def _weight_label(report: dict[str, Any], name: str) -> str:
    return weight_label(report, name, console=False)


def summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row per weight set of the report (in its order): the set's label, then
    each metric of :data:`~training.evaluation.report.SUMMARY_METRICS` to 4 decimals ("-" where
    a report lacks it)."""
    headers = ["weights", *(label for label, _ in SUMMARY_METRICS)]
    rows = []
    for name, metrics in report.get("weights", {}).items():
        cells = [f"{metrics[key]:.4f}" if key in metrics else "-" for _, key in SUMMARY_METRICS]
        rows.append([_weight_label(report, name), *cells])
    return headers, rows


def per_class_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row per class of a weight set's ``per_class`` list: class, precision, recall, F1
    (3 decimals) and support."""
    return [
        [
            str(c["class"]),
            f"{c['precision']:.3f}",
            f"{c['recall']:.3f}",
            f"{c['f1']:.3f}",
            str(c["support"]),
        ]
        for c in metrics.get("per_class", [])
    ]


def confused_pairs(
    matrix: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], top: int = TOP_PAIRS
) -> list[tuple[str, str, int, float]]:
    """The ``top`` largest off-diagonal cells of a confusion matrix (rows true, columns
    predicted), largest first, ties in row-major order; zero cells are left out.

    Returns:
        ``(true class, predicted class, count, count / images of the true class)`` tuples.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion matrix has shape {counts.shape}; allowed: (C, C)")
    if counts.shape[0] != len(class_names):
        raise ValueError(
            f"confusion matrix has {counts.shape[0]} classes, class_names {len(class_names)}"
        )
    off = counts.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top]
    totals = counts.sum(axis=1)
    pairs = []
    for index in flat:
        i, j = np.unravel_index(index, off.shape)
        if off[i, j] == 0:
            break
        pairs.append((class_names[i], class_names[j], int(off[i, j]), off[i, j] / totals[i]))
    return pairs


def _percent(share: float) -> str:
    """A share as a whole percentage that never rounds a nonzero share to 0% or a share
    below one to 100%."""
    if share < 0.005:
        return "<1%"
    if 0.995 <= share < 1.0:
        return ">99%"
    return f"{share:.0%}"


def _confusion_figure(
    page: Page, matrix: np.ndarray, class_names: Sequence[str], normalised: bool, title: str
) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    n = len(class_names)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = matrix / np.maximum(totals, 1)
    values = shares if normalised else matrix
    side = min(9.0, max(3.8, 0.5 * n + 2.2))
    fig = MplFigure(figsize=(side + 0.6, side - 0.4), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalised else max(1, matrix.max()))
    if n <= ANNOTATE_UP_TO:
        for (i, j), value in np.ndenumerate(values):
            if matrix[i, j] == 0:
                continue  # blank, so the few confusions stand out from the empty cells
            text = str(int(value)) if not normalised else _percent(value)
            # Dark cells get white text: the colour follows the cell's share of the row scale.
            dark = (shares[i, j] if normalised else value / max(1, matrix.max())) > 0.5
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")  # fmt: skip
    ticks = range(n)
    ax.set_xticks(ticks, class_names, rotation=40, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(ticks, class_names, fontsize=9)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.75, format="{x:.0%}" if normalised else None)
    name = "confusion_normalised" if normalised else "confusion_counts"
    caption = (
        "each row divided by the images of its true class: the diagonal is the recall"
        if normalised
        else "image counts; rows are the true class"
    )
    return page.save(fig, name, caption)


def add_test_section(page: Page, run: RunFolder) -> None:
    """Add the "test" section from ``run.test_report`` (which must not be None)."""
    report = run.test_report
    section = page.section("test", "Test")
    if not report or not report.get("weights"):
        section.note("test_report.json scores no weight set; run python test.py again.")
        return
    tta = report.get("tta", "none")
    section.text(
        f"Test split of {report.get('dataset', '?')}: {report.get('n_test', '?')} images"
        + (f", logits averaged over test-time augmentation ({tta})." if tta != "none" else ".")
        + " Rows with T divide the same logits by the temperature fitted on the validation"
        " set: accuracy and F1 stay, NLL and ECE move."
    )
    section.table(*summary_rows(report))
    for line in temperature_notes(report):
        section.note(line)

    final = final_set(report)
    metrics = report["weights"][final]
    names = list(report.get("class_names") or [c["class"] for c in metrics["per_class"]])
    matrix = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    section.heading(f"Confusion matrices of the final weights ({_weight_label(report, final)})")
    section.figures(
        [
            _confusion_figure(page, matrix, names, True, f"{final}: share of each true class"),
            _confusion_figure(page, matrix, names, False, f"{final}: counts"),
        ],
        page.folder,
    )

    # The final weights alone, with and without T: four near-identical curves hide each other,
    # and the summary table has every set's ECE.
    curves = {
        _weight_label(report, n): m["reliability"]
        for n, m in report["weights"].items()
        if "reliability" in m and n in (final, final + SCALED_SUFFIX)
    }
    if curves:
        section.heading("Reliability")
        path = reliability_diagram(
            curves, page.figure_path("reliability"), int(report.get("ece_bins", ECE_BINS))
        )
        caption = (
            f"{final} weights: accuracy against confidence per confidence bin (the diagonal is"
            " perfect calibration); below, the share of test images per bin"
        )
        section.figures([Figure(path, caption)], page.folder)

    section.heading(f"Per class ({final})")
    section.table(["class", "precision", "recall", "F1", "support"], per_class_rows(metrics))

    section.heading(f"Most-confused class pairs ({final})")
    pairs = confused_pairs(matrix, names)
    if pairs:
        section.table(
            ["true class", "predicted as", "images", "share of the true class"],
            [[t, p, str(n), f"{share:.1%}"] for t, p, n, share in pairs],
        )
    else:
        section.text("No test image is misclassified.")
