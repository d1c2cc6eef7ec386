"""Tests for report.test_section: the report's "Test" section, from test_report.json."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from PIL import Image

from report.page import Page
from report.run import load_run
from report.test_section import (
    add_test_section,
    confused_pairs,
    per_class_rows,
    summary_rows,
)
from training.evaluation.report import SUMMARY_METRICS


def _cells(html: str) -> list[list[str]]:
    """The rows of every table body in ``html`` as lists of cell texts."""
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", html)]


def test_confused_pairs_on_a_constructed_matrix():
    matrix = [
        [5, 3, 0],  # a: 8 images, 3 taken for b
        [1, 7, 4],  # b: 12 images, 4 taken for c, 1 for a
        [0, 0, 9],  # c: never confused
    ]
    pairs = confused_pairs(matrix, ["a", "b", "c"])
    assert [(t, p, n) for t, p, n, _ in pairs] == [("b", "c", 4), ("a", "b", 3), ("b", "a", 1)]
    assert [share for *_, share in pairs] == pytest.approx([4 / 12, 3 / 8, 1 / 12])
    # The diagonal, however large, and empty cells are never pairs; top cuts the list.
    assert confused_pairs(matrix, ["a", "b", "c"], top=1) == [("b", "c", 4, pytest.approx(1 / 3))]
    assert confused_pairs(np.diag([3, 4]), ["x", "y"]) == []


def test_confused_pairs_ties_keep_row_major_order():
    matrix = [[1, 2, 2], [2, 1, 0], [0, 0, 1]]
    pairs = confused_pairs(matrix, ["a", "b", "c"], top=5)
    assert [(t, p) for t, p, *_ in pairs] == [("a", "b"), ("a", "c"), ("b", "a")]


def test_confused_pairs_refuses_a_matrix_that_does_not_fit():
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        confused_pairs([[1, 2, 3], [4, 5, 6]], ["a", "b"])
    with pytest.raises(ValueError, match="class_names 3"):
        confused_pairs([[1, 0], [0, 1]], ["a", "b", "c"])


def test_summary_rows_equal_the_report(trained_run):
    report = json.loads((trained_run / "test_report.json").read_text())
    headers, rows = summary_rows(report)
    assert headers[1:] == [label for label, _ in SUMMARY_METRICS]
    assert len(rows) == len(report["weights"])
    for row, (name, metrics) in zip(rows, report["weights"].items(), strict=True):
        assert row[0].startswith(name)
        for cell, (_, key) in zip(row[1:], SUMMARY_METRICS, strict=True):
            assert float(cell) == pytest.approx(metrics[key], abs=5e-5)


def test_summary_rows_label_scaled_rows_and_mark_missing_metrics():
    report = {
        "checkpoints": {"best": {"epoch": 7}},
        "weights": {
            "best": {"accuracy": 0.5, "macro_f1": 0.25, "balanced_accuracy": 0.5, "nll": 1.0},
            "best+T": {"accuracy": 0.5, "nll": 0.9, "temperature": 1.5, "scaled_from": "best"},
        },
    }
    _, rows = summary_rows(report)
    assert rows[0] == ["best (epoch 7)", "0.5000", "0.2500", "0.5000", "1.0000", "-"]
    assert rows[1][0] == "best+T (T=1.500)" and rows[1][2] == "-"


def test_per_class_rows():
    metrics = {
        "per_class": [{"class": "a", "precision": 1, "recall": 0.5, "f1": 2 / 3, "support": 4}]
    }
    assert per_class_rows(metrics) == [["a", "1.000", "0.500", "0.667", "4"]]


def test_section_on_a_trained_run(trained_run, tmp_path):
    run = load_run(trained_run)
    page = Page(tmp_path / "page", "t")
    add_test_section(page, run)
    [section] = page.sections
    assert (section.key, section.title) == ("test", "Test")
    html = page.write().read_text()
    for name in ("confusion_normalised", "confusion_counts", "reliability"):
        path = page.figure_path(name)
        assert Image.open(path).size[0] > 300 and f'src="{path.name}"' in html
    final = run.test_report["weights"]["swa"]  # the tiny run averages weights from epoch 3
    names = set(run.test_report["class_names"])
    per_class = [r for r in _cells(html) if len(r) == 5 and r[0] in names]
    assert per_class == per_class_rows(final)
    assert "Most-confused class pairs (swa)" in html


def test_section_lists_the_most_confused_pairs(trained_run, tmp_path):
    run = load_run(trained_run)
    run.test_report = copy.deepcopy(run.test_report)
    names = run.test_report["class_names"]
    # 10 images of class 0: 6 right, 3 taken for class 2 and 1 for class 1.
    run.test_report["weights"]["swa"]["confusion_matrix"] = [[6, 1, 3], [0, 8, 0], [0, 0, 8]]
    page = Page(tmp_path / "page", "t")
    add_test_section(page, run)
    rows = _cells(page.write().read_text())
    assert [names[0], names[2], "3", "30.0%"] in rows
    assert [names[0], names[1], "1", "10.0%"] in rows


def test_section_without_scored_weights_says_so(trained_run, tmp_path):
    run = load_run(trained_run)
    run.test_report = {"weights": {}}
    page = Page(tmp_path / "page", "t")
    add_test_section(page, run)
    assert 'class="note"' in page.sections[0].blocks[0]
    assert not list(page.folder.glob("*.png"))
