"""``bench/transfer.py`` end to end on a tiny generated 8-class source with a tiny timm model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_bench
from training.callbacks.metrics_log import read_metrics
from training.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLASSES = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)


bench = load_bench("transfer")


def eight_class_npz(path: Path, counts=(16, 3, 3)) -> Path:
    """28x28 RGB, the blood cells' 8 class names, each class its own mean brightness."""
    rng = np.random.default_rng(0)
    arrays = {"class_names": np.array(CLASSES)}
    for split, per_class in zip(("train", "val", "test"), counts, strict=True):
        labels = np.repeat(np.arange(8), per_class)
        base = (labels * 30 + 20)[:, None, None, None]
        images = np.clip(base + rng.integers(-10, 10, size=(len(labels), 28, 28, 3)), 0, 255)
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    np.savez(path, **arrays)
    return path


def test_the_study_runs_every_method_and_writes_its_results(tmp_path, keep_threads, capsys):
    source = eight_class_npz(tmp_path / "cells.npz")
    out = tmp_path / "bench"
    argv = [
        "--data",
        str(source),
        "--model",
        "timm/test_resnet",
        "--pretrain-epochs",
        "1",
        "--epochs",
        "2",
        "--seeds",
        "0",
        "--fractions",
        "0.5",
        "1.0",
        "--threads",
        "1",
        "--run-dir",
        str(out),
        "--set",
        f"data.root={tmp_path / 'cache'}",
        "--set",
        "optim.batch_size=16",
    ]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "thaw at 50% beats scratch at 50% by more than the seed spread: " in printed
    assert "fraction 100%" in printed

    result = json.loads((out / bench.RESULT_JSON).read_text())
    keys = {(r["fraction"], r["method"], r["seed"]) for r in result["runs"]}
    assert keys == {(f, m, 0) for f in (0.5, 1.0) for m in ("thaw", "full", "scratch")}
    assert len(result["runs"]) == 6
    for r in result["runs"]:
        assert 0.0 <= r["final_acc"] <= 1.0 and 0.0 <= r["best_acc"] <= 1.0
        assert r["final_acc"] == (r["swa_acc"] if r["final"] == "swa" else r["best_acc"])
        assert len(r["val_acc"]) == 2
    assert result["pretrain"]["class_names"] == ["basophil", "erythroblast", "ig", "platelet"]
    assert set(result["table"]) == {"0.5", "1"}
    assert result["verdict"]["fraction"] == 0.5
    assert (out / bench.FIGURE).stat().st_size > 10_000

    targets = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    for r in result["runs"]:
        ckpt = load_checkpoint(Path(r["run_dir"]) / "checkpoints" / "best.pt")
        assert ckpt["class_names"] == targets, r["run_dir"]
        assert r["class_names"] == targets
        cfg = ckpt["config"]
        # fine-tuned from the pretrain run, or not, as the method says
        assert bool(cfg["model"]["init"]) == (r["method"] != "scratch")
        assert cfg["data"]["train_fraction"] == r["fraction"]
    for r in result["runs"]:
        if r["method"] == "thaw":
            rows = read_metrics(Path(r["run_dir"]) / "metrics.jsonl")
            blocks = [row["active_blocks"] for row in rows]
            # the head alone first, then one stage per epoch (gap 1 for 2 epochs, 4 stages)
            assert blocks == [0, 1] == r["active_blocks"]
        else:
            assert r["active_blocks"] == [4, 4]


def test_thaw_schedule_thaws_by_half_the_run():
    assert bench.thaw_schedule(4, 10)["activate_at"] == [1, 2, 3, 4]
    assert bench.thaw_schedule(4, 20)["activate_at"] == [2, 4, 6, 8]
    assert bench.thaw_schedule(4, 20)["min_gap"] == 2
    assert bench.thaw_schedule(6, 3)["activate_at"] == [1, 2, 3, 4, 5, 6]


def test_verdict_compares_the_difference_with_the_larger_seed_range():
    runs = [{"fraction": 0.05, "method": "thaw", "final_acc": a} for a in (0.80, 0.84)] + [
        {"fraction": 0.05, "method": "scratch", "final_acc": a} for a in (0.70, 0.71)
    ]
    table = bench.build_table(runs, [0.05], ["thaw", "scratch"])
    v = bench.verdict(table, [0.05])
    assert v["difference"] == pytest.approx(0.115) and v["spread"] == pytest.approx(0.04)
    assert v["beats"] is True
    line = bench.verdict_line(v)
    assert line.startswith("thaw at 5% beats scratch at 5% by more than the seed spread: yes")
    assert "+11.50 points, spread 4.00 points" in line
    runs[0]["final_acc"], runs[1]["final_acc"] = 0.70, 0.90  # range 20 points > a 9.5 lead
    v = bench.verdict(bench.build_table(runs, [0.05], ["thaw", "scratch"]), [0.05])
    assert v["beats"] is False and "spread: no" in bench.verdict_line(v)


def test_bad_input_is_one_line(tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path / "none.npz"), "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "none.npz not found" in err and "bloodcells_pbc_28.npz" in err
    source = eight_class_npz(tmp_path / "cells.npz")
    for model, words in (("timm/no_such_net", "no_such_net"), ("resnet19", "resnet19")):
        argv = ["--data", str(source), "--model", model, "--run-dir", str(tmp_path / "b")]
        assert bench.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error:") and words in err, err
    assert bench.main(["--data", str(source), "--model", "basic_cnn"]) == 2
    assert "zoo model" in capsys.readouterr().err
