"""Tests for ``python -m report compare``: differing settings, seed groups and paired figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from report.__main__ import main as report_main
from report.compare import compare_runs, differing_settings, paired_groups, seed_groups
from report.run import ReportError, load_run


def fake_run(base: Path, name: str, *, seed: int, lr: float, accuracy: float | None) -> Path:
    """A run folder with what the comparison reads: config, metrics and (optionally) a test."""
    folder = base / name
    folder.mkdir(parents=True)
    config = {
        "data": {"source": "cells.npz", "root": f"/cache/{name}"},
        "optim": {"lr": lr},
        "run": {"seed": seed, "run_dir": str(folder)},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "val_loss": 1.1 / e,
            "val_acc": 0.5 + 0.1 * e,
            "epoch_s": 30.0,
        }
        for e in (1, 2, 3)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if accuracy is not None:
        report = {
            "weights": {
                "best": {"accuracy": accuracy - 0.01, "macro_f1": accuracy - 0.02, "ece": 0.05},
                "swa": {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "ece": 0.04},
                "swa+T": {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "ece": 0.01},
            }
        }
        (folder / "test_report.json").write_text(json.dumps(report))
    return folder


def test_differing_settings_ignore_where_runs_live(tmp_path):
    a = load_run(fake_run(tmp_path, "a", seed=0, lr=1e-3, accuracy=0.9))
    b = load_run(fake_run(tmp_path, "b", seed=1, lr=1e-3, accuracy=0.9))
    c = load_run(fake_run(tmp_path, "c", seed=0, lr=3e-3, accuracy=0.9))
    assert differing_settings([a.config, b.config, c.config]) == ["optim.lr", "run.seed"]
    assert differing_settings([a.config, a.config]) == []


def test_runs_that_differ_only_in_seed_form_one_group(tmp_path):
    runs = [
        load_run(fake_run(tmp_path, name, seed=seed, lr=lr, accuracy=0.9))
        for name, seed, lr in (("a0", 0, 1e-3), ("b0", 0, 3e-3), ("a1", 1, 1e-3), ("b1", 1, 3e-3))
    ]
    groups = seed_groups(runs)
    assert [[r.name for r in g] for g in groups] == [["a0", "a1"], ["b0", "b1"]]


def test_the_paired_difference_pairs_runs_by_seed(tmp_path):
    a = [
        load_run(fake_run(tmp_path, f"a{s}", seed=s, lr=1e-3, accuracy=acc))
        for s, acc in ((0, 0.90), (1, 0.94), (2, 0.92))
    ]
    # Listed out of seed order: pairing goes by the seed, not by the position.
    b = [
        load_run(fake_run(tmp_path, f"b{s}", seed=s, lr=3e-3, accuracy=acc))
        for s, acc in ((2, 0.91), (0, 0.88), (1, 0.93))
    ]
    d = paired_groups(a, b, "accuracy")
    assert d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx((0.02 + 0.01 + 0.01) / 3)
    assert d["low"] < d["mean"] < d["high"]
    assert paired_groups(a[:1], b, "accuracy") is None  # one shared seed: no spread


def test_the_page_shows_each_run_its_differences_and_the_seed_groups(tmp_path):
    folders = [
        fake_run(tmp_path, name, seed=seed, lr=lr, accuracy=acc)
        for name, seed, lr, acc in (
            ("a0", 0, 1e-3, 0.90),
            ("a1", 1, 1e-3, 0.94),
            ("b0", 0, 3e-3, 0.88),
            ("b1", 1, 3e-3, 0.93),
            ("untested", 2, 1e-3, None),
        )
    ]
    index = compare_runs(folders, tmp_path / "cmp")
    html = index.read_text()
    assert (tmp_path / "cmp" / "compare_curves.png").stat().st_size > 1000
    for name in ("a0", "a1", "b0", "b1", "untested"):
        assert f"<td>{name}</td>" in html
    assert "<th>optim.lr</th>" in html and "<th>run.seed</th>" in html
    assert "94.00%" in html  # a1's swa accuracy
    assert "1.00%" in html  # the ECE after T, not the raw one
    assert "Not tested yet: untested" in html
    # Group a is a0, a1 and the untested run; the interval pairs seeds 0 and 1.
    assert re.search(r"paired over seeds \[0, 1\]: \+1\.50 points", html)


def test_compare_refuses_one_run_and_a_missing_folder_in_one_line(tmp_path, capsys):
    one = fake_run(tmp_path, "one", seed=0, lr=1e-3, accuracy=0.9)
    assert report_main(["compare", str(one), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "error: compare needs two or more run folders; got 1"
    assert report_main(["compare", str(one), str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: run folder {tmp_path / 'gone'} does not exist"
    with pytest.raises(ReportError, match="holds no run"):
        load_run(tmp_path)
