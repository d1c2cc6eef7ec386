"""Tests for report.curves: the report's "Training" section."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from report.curves import (
    MARKERS,
    _curves_figure,
    add_training_section,
    event_epochs,
    event_rows,
    group_names,
)
from report.page import Page
from report.run import RunFolder, epoch_rows, load_run


def _event(kind: str, title: str, *lines: str) -> dict:
    return {"kind": kind, "title": title, "lines": list(lines), "banner": True}


def _metrics(epochs: int = 6) -> list[dict]:
    """A log with a stage at 1, a rollback at 3, SWA from 4 and an early stop at 6."""
    rows = []
    for e in range(1, epochs + 1):
        rows.append(
            {
                "epoch": e,
                "train_loss": 1.0 / e,
                "train_acc": 0.5 + e / 20,
                "val_loss": 1.2 / e,
                "val_acc": 0.4 + e / 20,
                "val_macro_f1": 0.3 + e / 20,
                "lr": [1e-3 / e] if e == 1 else [1e-3 / e, 2e-3 / e],
                "active_blocks": 1 if e == 1 else 2,
                "dropout": [0.1, 0.2],
                "aug_strength": 0.5,
                "mixup_alpha": max(0.0, 0.2 - e / 20),
                "class_penalty": [1.0 + e / 100, 1.0 - e / 100],
                "images_per_s": 100.0 + e,
                "epoch_s": 2.0,
                "events": [],
            }
        )
    rows[0]["events"] = [
        _event(
            "stage",
            "STAGE 2: block2 active (scheduled at epoch 1)",
            "learning rates now: block1 1.00e-03, block2 2.00e-03",
        )
    ]
    rows[2]["events"] = [
        _event("rollback", "ROLLBACK 1/3: back to epoch 2", "restored weights"),
        _event("warning", "rollback pending", "not a rollback"),
    ]
    rows[3]["events"] = [_event("swa", "SWA started", "averaged from epoch 4")]
    rows[3]["swa_models"] = 1
    rows[-1]["events"] = [_event("stop", "early stopping", "no improvement")]
    rows[-1]["early_stop"] = "no improvement"
    rows.append({"event": "fit_end", "stopped": None, "best_epoch": 5, "monitor": "val_acc"})
    return rows


def test_event_epochs_come_from_the_events():
    assert event_epochs(_metrics()) == {"stage": [1], "rollback": [3], "swa": [4], "stop": [6]}


def test_event_epochs_fallbacks():
    rows = _metrics()
    for row in epoch_rows(rows):
        row["events"] = []
        row.pop("early_stop", None)
    epoch_rows(rows)[4]["swa_models"] = 2  # SWA without its event: the first averaged epoch
    rows[-1]["stopped"] = "diverged: loss is nan"  # a stop recorded only at the run's end
    assert event_epochs(rows) == {"stage": [], "rollback": [], "swa": [4], "stop": [6]}
    rows[-1]["stopped"] = "interrupted"  # an interrupt is not an early stop
    assert event_epochs(rows)["stop"] == []


def test_vertical_lines_sit_at_the_event_epochs():
    metrics = _metrics()
    marks = event_epochs(metrics)
    fig, missing = _curves_figure(epoch_rows(metrics), marks, metrics[-1])
    assert missing == ["train_macro_f1"]
    for ax in fig.axes:
        by_colour: dict[str, list[float]] = {}
        for line in ax.lines:
            x = np.asarray(line.get_xdata(), float)
            if len(x) == 2 and x[0] == x[1]:  # an axvline
                by_colour.setdefault(line.get_color(), []).append(float(x[0]))
        expected = {MARKERS[k][1]: [float(e) for e in v] for k, v in marks.items() if v}
        assert {c: sorted(v) for c, v in by_colour.items()} == expected
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [
        "stage joined (epoch 1)",
        "rollback (epoch 3)",
        "SWA start (epoch 4)",
        "early stop (epoch 6)",
    ]


def test_group_names_from_stage_events():
    metrics = _metrics()
    assert group_names(metrics, 3) == ["block1", "block2", "group 3"]
    assert group_names([{"epoch": 1, "events": []}], 2) == ["group 1", "group 2"]


def test_event_rows_table():
    rows = event_rows(_metrics())
    assert [r[0] for r in rows] == [1, 3, 3, 4, 6]
    assert rows[1][1:3] == ["rollback", "ROLLBACK 1/3: back to epoch 2"]


def _fake_run(tmp_path: Path, metrics: list[dict], names=None) -> RunFolder:
    report = {"class_names": names} if names else None
    return RunFolder(tmp_path / "run", {}, metrics, report, {})


def test_section_from_a_metrics_log(tmp_path):
    page = Page(tmp_path / "page", "t")
    add_training_section(page, _fake_run(tmp_path, _metrics(), names=["benign", "malignant"]))
    section = next(s for s in page.sections if s.key == "training")
    assert section.title == "Training"
    expected = {
        "training_curves",
        "training_lr",
        "training_regularisation",
        "training_class_penalty",
        "training_throughput",
    }
    assert {p.stem for p in page.folder.glob("*.png")} == expected
    for path in page.folder.glob("*.png"):
        with Image.open(path) as img:
            assert img.format == "PNG" and 1000 <= img.width <= 1250 and 250 <= img.height <= 500
    html = page.write().read_text()
    for name in expected:
        assert f'src="{name}.png"' in html
    table = next(b for b in section.blocks if b.startswith("<table>"))
    assert len(re.findall("<tr><td>", table)) == 5
    assert "ROLLBACK 1/3" in table
    assert "Not logged, so not drawn: train_macro_f1" in html  # the caption says so


def test_penalty_legend_names(tmp_path):
    from report.curves import _penalty_figure

    rows = epoch_rows(_metrics())
    fig = _penalty_figure(rows, event_epochs(rows), ["benign", "malignant"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["benign", "malignant"]


def test_an_empty_log_gives_a_note(tmp_path):
    page = Page(tmp_path / "page", "t")
    add_training_section(page, _fake_run(tmp_path, []))
    section = page.sections[0]
    assert len(section.blocks) == 1 and 'class="note"' in section.blocks[0]
    assert "metrics.jsonl" in section.blocks[0]
    assert not list(page.folder.glob("*.png"))


def test_section_on_a_trained_run(trained_run, tmp_path):
    run = load_run(trained_run)
    page = Page(tmp_path / "page", "t")
    add_training_section(page, run)
    marks = event_epochs(run.metrics)
    # The tiny run joins blocks at epochs 1 and 2 (unfreeze.activate_at) and averages from 3.
    assert marks["stage"] == [1, 2] and marks["swa"] == [3]
    assert (page.folder / "training_curves.png").is_file()
    html = page.write().read_text()
    assert "STAGE 2" in html
    for png in page.folder.glob("*.png"):
        assert f'src="{png.name}"' in html


def test_a_real_run_logs_and_draws_train_macro_f1(trained_run):
    run = load_run(trained_run)
    rows = epoch_rows(run.metrics)
    assert all(0.0 <= row["train_macro_f1"] <= 1.0 for row in rows)
    _, missing = _curves_figure(rows, event_epochs(run.metrics), run.metrics[-1])
    assert missing == []
