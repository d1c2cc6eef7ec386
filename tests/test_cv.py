"""Cross-validation: data.cv_folds splits the pooled train+val into stratified, group-aware folds
over the same cache; ``python -m experiments cv`` trains one member per fold, writes the
out-of-fold table and the summary, and continues a stopped study."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import models.train as train_script
from dataset.cache import load_cache, prepare
from dataset.folds import PooledNpyDataset, assign_folds
from dataset.subset import CacheSubset
from experiments.__main__ import main
from experiments.cv import FOLD_LOGITS, OOF_CSV, _read_fold
from experiments.study import SUMMARY_JSON, member_runs
from tests.conftest import brightness_npz
from tests.test_experiments import report_figures, tiny_train
from training.config.schema import ConfigError, load_config
from training.engine.data import select_subset, split_dataset
from training.evaluation.ensemble import evaluate_ensemble
from training.evaluation.stats import mean_sd


def data_cfg(**overrides):
    return load_config(overrides=[f"data.{k}={v}" for k, v in overrides.items()]).data


def build(npz: Path, tmp_path: Path):
    return prepare(str(npz), tmp_path / "cache", progress=False)[0]


def pooled(cache):
    return (
        np.concatenate([cache.labels("train"), cache.labels("val")]),
        np.concatenate([np.asarray(cache.images("train")), np.asarray(cache.images("val"))]),
    )


def fold_views(cache, k: int, seed: int = 0, **extra):
    return [
        select_subset(cache, data_cfg(cv_folds=k, cv_fold=i, split_seed=seed, **extra))
        for i in range(k)
    ]


@pytest.fixture
def cache(tmp_path):
    return build(brightness_npz(tmp_path / "tiny.npz", counts=(50, 13, 12)), tmp_path)


def test_folds_are_disjoint_cover_train_val_are_stratified_and_leave_test_alone(cache):
    labels, images = pooled(cache)
    views = fold_views(cache, 4)
    vals = [v.rows("val") for v in views]
    assert sorted(np.concatenate(vals).tolist()) == list(range(len(labels)))  # each image once
    for view, val in zip(views, vals, strict=True):
        assert isinstance(view, CacheSubset) and view.path == cache.path  # no new cache
        assert sorted([*view.rows("train"), *val]) == list(range(len(labels)))
        np.testing.assert_array_equal(view.labels("val"), labels[val])
        np.testing.assert_array_equal(view.images("train"), images[view.rows("train")])
        np.testing.assert_array_equal(view.rows("test"), np.arange(len(cache.labels("test"))))
        np.testing.assert_array_equal(view.labels("test"), cache.labels("test"))
        assert view.counts("test") == cache.counts("test")
    # Stratified: each class's count differs by at most one between any two folds.
    per_fold = np.array([np.bincount(labels[val], minlength=3) for val in vals])
    assert (per_fold.max(axis=0) - per_fold.min(axis=0) <= 1).all()
    # The loaders read the pooled rows: a fold image is the pooled image at its index.
    dataset = split_dataset(views[1], "val", transform=lambda image: {"image": image})
    assert isinstance(dataset, PooledNpyDataset) and len(dataset) == len(vals[1])
    last = len(dataset) - 1
    np.testing.assert_array_equal(dataset[last][0], images[vals[1][last]])
    assert dataset[last][1] == labels[vals[1][last]]


def test_the_same_seed_gives_the_same_folds_another_seed_others(cache):
    first = [v.rows("val") for v in fold_views(cache, 3, seed=0)]
    again = [v.rows("val") for v in fold_views(cache, 3, seed=0)]
    other = [v.rows("val") for v in fold_views(cache, 3, seed=1)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_copies_and_near_copies_never_straddle_folds(tmp_path):
    """Exact copies of train images planted in val, and mirrored copies (near duplicates):
    each pair lands in one fold. Without the grouping most pairs would be split."""
    data = dict(np.load(brightness_npz(tmp_path / "plain.npz", counts=(60, 12, 12))))
    rng = np.random.default_rng(3)
    exact = rng.choice(60, size=8, replace=False)
    mirrored = rng.choice(np.setdiff1d(np.arange(60), exact), size=6, replace=False)
    copies = np.concatenate([data["train_images"][exact], data["train_images"][mirrored, :, ::-1]])
    data["val_images"] = np.concatenate([data["val_images"], copies])
    data["val_labels"] = np.concatenate(
        [data["val_labels"], data["train_labels"][exact], data["train_labels"][mirrored]]
    )
    np.savez(tmp_path / "dup.npz", **data)
    cache = build(tmp_path / "dup.npz", tmp_path)
    assert load_cache(cache.path).meta["params"]["near_distance"] >= 0
    views = fold_views(cache, 5)
    fold_of = np.full(60 + len(data["val_labels"]), -1)
    for i, view in enumerate(views):
        fold_of[view.rows("val")] = i
    assert (fold_of >= 0).all()
    # Pooled index of each copy: after train's 60 images and val's own 12.
    planted = 60 + 12 + np.arange(len(copies))
    originals = np.concatenate([exact, mirrored])
    np.testing.assert_array_equal(fold_of[planted], fold_of[originals])


def test_without_groups_the_class_counts_are_even_and_groups_stay_whole():
    labels = np.array([0] * 10 + [1] * 7)
    folds = assign_folds(labels, np.arange(17), 3, seed=5)
    for c in (0, 1):
        counts = np.bincount(folds[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    groups = np.arange(17)
    groups[[1, 2, 3]] = 1  # one group of three
    folds = assign_folds(labels, groups, 3, seed=5)
    assert len(set(folds[[1, 2, 3]].tolist())) == 1


def test_classes_and_train_fraction_apply_within_the_fold(cache):
    full = fold_views(cache, 3)
    both = fold_views(cache, 3, classes="['0', '2']", train_fraction=0.5)
    labels, _ = pooled(cache)
    for whole, part in zip(full, both, strict=True):
        kept = whole.rows("val")[np.isin(labels[whole.rows("val")], [0, 2])]
        np.testing.assert_array_equal(part.rows("val"), kept)  # the same fold, two classes
        assert set(part.rows("train")) <= set(whole.rows("train"))
        for c, label in ((0, 0), (2, 1)):
            n = int(np.sum(labels[whole.rows("train")] == c))
            assert np.sum(part.labels("train") == label) == int(np.ceil(n / 2))
        assert part.labels("test").max() == 1 and part.counts("test") == [4, 4]


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["data.cv_folds=1"], "data.cv_folds=1 is invalid; allowed: 0 (off) or an int >= 2"),
        (
            ["data.cv_folds=3", "data.cv_fold=3"],
            "data.cv_fold=3 is invalid; allowed: an int in 0..2",
        ),
        (["data.cv_folds=3", "data.cv_fold=-1"], "data.cv_fold=-1 is invalid"),
        (["data.cv_fold=1"], "data.cv_fold=1 has no effect while data.cv_folds=0"),
    ],
)  # fmt: skip
def test_bad_fold_settings_are_one_line(overrides, why, capsys, tmp_path):
    with pytest.raises(ConfigError, match=why.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=overrides)
    sets = [item for o in overrides for item in ("--set", o)]
    assert train_script.main(["--run-dir", str(tmp_path / "r"), *sets]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in " ".join(err.split())


def test_a_class_with_fewer_distinct_images_than_folds_is_refused(tmp_path):
    data = dict(np.load(brightness_npz(tmp_path / "plain.npz", counts=(30, 9, 9))))
    keep = np.flatnonzero(data["train_labels"] != 2)[:20].tolist() + [2]  # one class-2 image
    data["train_images"], data["train_labels"] = (
        data["train_images"][keep],
        data["train_labels"][keep],
    )
    val_keep = np.flatnonzero(data["val_labels"] != 2).tolist() + [2]
    data["val_images"], data["val_labels"] = (
        data["val_images"][val_keep],
        data["val_labels"][val_keep],
    )
    np.savez(tmp_path / "few.npz", **data)
    cache = build(tmp_path / "few.npz", tmp_path)
    with pytest.raises(ConfigError) as error:
        select_subset(cache, data_cfg(cv_folds=3, cv_fold=0))
    message = str(error.value)
    assert "\n" not in message and message.startswith("data.cv_folds: ")
    assert "class '2' has 2 distinct image(s)" in message and "allowed: an int in 2..2" in message
    assert select_subset(cache, data_cfg(cv_folds=2, cv_fold=1)).counts("val")[2] == 1


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--folds", "1"], "--folds 1 is invalid; allowed: an int >= 2"),
        (["--folds", "3", "--", "--set", "data.cv_fold=1"], "--set data.cv_fold is set by"),
        (["--folds", "3", "--", "--set", "data.cv_folds=4"], "--set data.cv_folds is set by"),
        (["--folds", "3", "--", "--run-dir", "x"], "--run-dir is set by the study"),
    ],
)
def test_bad_study_options_are_one_line(argv, why, tmp_path, capsys):
    assert main(["cv", "--study-dir", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err
    assert not (tmp_path / "s").exists()


def read_oof(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_cv_study_trains_folds_writes_oof_summary_ensemble_and_skips_finished(
    tmp_path, capsys, monkeypatch
):
    npz = brightness_npz(tmp_path / "tiny.npz")  # 48 train + 12 val pooled, 12 test
    calls: list[list[str]] = []
    real = train_script.main
    monkeypatch.setattr(train_script, "main", lambda argv: calls.append(argv) or real(argv))
    study = tmp_path / "study"
    command = ["cv", "--study-dir", str(study), "--folds", "3", "--", *tiny_train(npz, tmp_path)]
    assert main(command) == 0
    out = capsys.readouterr().out
    runs = [study / "members" / f"fold-{i}" for i in range(3)]
    assert member_runs(study) == runs
    assert [c[c.index("--run-dir") - 1] for c in calls] == [f"data.cv_fold={i}" for i in range(3)]
    assert "cv_fold: 2" in (runs[2] / "config.yaml").read_text()
    assert all((run / FOLD_LOGITS).is_file() for run in runs)

    rows = read_oof(study / OOF_CSV)
    assert [int(r["index"]) for r in rows] == list(range(60))  # every pooled image once
    assert {r["split"] for r in rows[:48]} == {"train"} and {r["split"] for r in rows[48:]} == {
        "val"
    }
    probs = np.array([[float(r[f"p_{c}"]) for c in "012"] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [r["predicted"] for r in rows] == [str(int(p.argmax())) for p in probs]

    summary = json.loads((study / SUMMARY_JSON).read_text())
    assert summary["complete"] and summary["pending"] == []
    per_fold = [report_figures(run) for run in runs]
    for key in per_fold[0]:
        values = [figures[key] for figures in per_fold]
        stat = summary["figures"][key]
        assert stat["mean"] == pytest.approx(mean_sd(values)["mean"])
        assert stat["sd"] == pytest.approx(mean_sd(values)["sd"])
    # Each fold's validation accuracy, recomputed from the OOF table.
    val_acc = [
        np.mean([r["label"] == r["predicted"] for r in rows if r["fold"] == str(i)])
        for i in range(3)
    ]
    assert summary["figures"]["val_accuracy"]["values"] == pytest.approx(val_acc)
    assert summary["figures"]["val_accuracy"]["mean"] == pytest.approx(mean_sd(val_acc)["mean"])
    assert summary["figures"]["val_accuracy"]["sd"] == pytest.approx(mean_sd(val_acc)["sd"])
    oof_acc = np.mean([r["label"] == r["predicted"] for r in rows])
    assert summary["oof"]["n"] == summary["oof"]["pooled"] == 60
    assert summary["oof"]["accuracy"] == pytest.approx(oof_acc)
    # The ensemble row is that of test.py --ensemble on the members.
    ensemble = evaluate_ensemble(runs, batch_size=64, device="cpu")["weights"]["ensemble"]
    row = summary["ensemble"]["figures"]["accuracy"]
    assert row["ensemble"] == pytest.approx(ensemble["accuracy"])
    assert row["single"]["n"] == 3
    assert "OOF accuracy (60/60 images)" in out and "ensemble of 3 fold models" in out

    # The same command again: nothing is trained, the table stays the same.
    before = (study / OOF_CSV).read_text()
    calls.clear()
    assert main(command) == 0
    assert calls == []
    assert capsys.readouterr().out.count("finished already, skipped") == 3
    assert (study / OOF_CSV).read_text() == before


def test_fold_logits_holding_pickled_objects_are_refused(tmp_path):
    # Loading a pickle runs code; a fold file is plain arrays, so an object array is refused.
    np.savez(tmp_path / FOLD_LOGITS, logits=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        _read_fold(tmp_path)
