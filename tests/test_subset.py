"""data.classes and data.train_fraction: a class subset and a training share as an index over
the cache, through the Dataset, a training run, its checkpoint and its test report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dataset.cache import prepare
from dataset.errors import DataError
from dataset.npy_dataset import NpyDataset
from dataset.subset import CacheSubset, fraction_rows, subset_cache
from tests.test_trainer import fit, tiny_config
from training.build import build_criterion
from training.callbacks.console import counts_table
from training.config.schema import ConfigError, load_config
from training.engine.checkpoint import load_checkpoint
from training.engine.data import make_loaders, prepare_cache
from training.evaluation import report as ev

NAMES = ["alpha", "beta", "gamma"]


def uneven_npz(path, train_counts=(20, 7, 1), val=(4, 4, 4), test=(5, 3, 2), seed=0):
    """A named 3-class .npz whose train classes have ``train_counts`` images (in a mixed order)."""
    rng = np.random.default_rng(seed)
    arrays = {"class_names": np.array(NAMES)}
    for split, counts in (("train", train_counts), ("val", val), ("test", test)):
        labels = rng.permutation(np.repeat(np.arange(3), counts)).astype(np.int64)
        images = rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(path, **arrays)
    return path


@pytest.fixture
def cache(tmp_path):
    built, _ = prepare(uneven_npz(tmp_path / "uneven.npz"), tmp_path / "cache", progress=False)
    return built


def test_class_subset_renumbers_labels_in_the_order_given(cache):
    sub = subset_cache(cache, ["gamma", "alpha"])
    assert isinstance(sub, CacheSubset)
    assert sub.class_names == ["gamma", "alpha"] and sub.num_classes == 2
    for split in ("train", "val", "test"):
        full = cache.labels(split)
        rows = sub.rows(split)
        assert rows.tolist() == np.flatnonzero(full != 1).tolist()  # beta's images are gone
        # gamma (2) -> 0, alpha (0) -> 1
        assert sub.labels(split).tolist() == [{2: 0, 0: 1}[int(v)] for v in full[rows]]
        assert sub.counts(split) == [cache.counts(split)[2], cache.counts(split)[0]]
    # The Dataset reads the full file's rows and returns the renumbered label.
    ds = NpyDataset(sub, "test")
    plain = NpyDataset(cache, "test")
    assert len(ds) == sum(sub.counts("test"))
    for i, row in enumerate(sub.rows("test")):
        image, label = ds[i]
        assert torch.equal(image, plain[int(row)][0])
        assert label == {2: 0, 0: 1}[int(cache.labels("test")[row])]
    assert np.array_equal(sub.images("test"), cache.images("test")[sub.rows("test")])
    # Statistics stay the full train split's.
    assert sub.mean == cache.mean and sub.std == cache.std and sub.path == cache.path


def test_no_selection_is_the_cache_itself_and_nothing_is_written(cache):
    assert subset_cache(cache, [], 1.0) is cache
    before = sorted(p.name for p in cache.path.parent.iterdir())
    inside = sorted(p.name for p in cache.path.iterdir())
    subset_cache(cache, ["beta", "alpha"], 0.5, seed=3)
    assert sorted(p.name for p in cache.path.parent.iterdir()) == before
    assert sorted(p.name for p in cache.path.iterdir()) == inside


def test_train_fraction_keeps_ceil_per_class_seeded_and_nested(cache):
    quarter = subset_cache(cache, [], 0.25, seed=7)
    # 20, 7, 1 images: ceil(5), ceil(1.75), ceil(0.25) -- the one-image class keeps it.
    assert quarter.counts("train") == [5, 2, 1]
    assert quarter.class_names == NAMES
    # Stratified: the kept rows of each class are rows of that class.
    full = cache.labels("train")
    kept = quarter.rows("train")
    assert np.bincount(full[kept], minlength=3).tolist() == [5, 2, 1]
    assert quarter.labels("train").tolist() == full[kept].tolist()
    # Val and test are not reduced.
    for split in ("val", "test"):
        assert quarter.counts(split) == cache.counts(split)
        assert quarter.rows(split).tolist() == list(range(len(cache.labels(split))))
    # Seeded: the same seed gives the same images, another seed others.
    assert subset_cache(cache, [], 0.25, seed=7).rows("train").tolist() == kept.tolist()
    assert subset_cache(cache, [], 0.25, seed=8).rows("train").tolist() != kept.tolist()
    # Nested: the 10% subset lies inside the 25% subset, which lies inside the 60% one.
    tenth = set(subset_cache(cache, [], 0.1, seed=7).rows("train").tolist())
    sixty = set(subset_cache(cache, [], 0.6, seed=7).rows("train").tolist())
    assert tenth < set(kept.tolist()) < sixty
    # A class keeps the same images whichever other classes are chosen.
    alpha_rows = set(kept[full[kept] == 0].tolist())
    both = subset_cache(cache, ["beta", "alpha"], 0.25, seed=7)
    assert alpha_rows == set(both.rows("train")[both.labels("train") == 1].tolist())
    assert both.counts("train") == [2, 5]


def test_fraction_ceil_is_not_fooled_by_float_rounding(tmp_path):
    # 0.07 * 100 is 7.000000000000001 in floats; the fraction keeps 7 images, not 8.
    path = uneven_npz(tmp_path / "hundred.npz", train_counts=(100, 10, 10))
    built, _ = prepare(path, tmp_path / "cache", progress=False)
    assert subset_cache(built, [], 0.07).counts("train") == [7, 1, 1]
    assert subset_cache(built, [], 1.0) is built


@pytest.mark.parametrize(
    "classes, expected",
    [
        (["alpha", "delta", "omega"], "unknown classes ['delta', 'omega']; available: alpha, beta"),
        (["beta"], "at least 2"),
        (["beta", "beta"], "more than once"),
    ],
)
def test_bad_class_names_are_refused_in_one_line(cache, classes, expected):
    with pytest.raises(ValueError, match="^[^\n]*$") as info:
        subset_cache(cache, classes)
    assert expected in str(info.value)


def test_config_checks_and_prepare_cache_refusal(tmp_path):
    npz = uneven_npz(tmp_path / "uneven.npz")
    base = [f"data.source={npz}", f"data.root={tmp_path / 'cache'}"]
    for bad in ("data.classes=[alpha]", "data.train_fraction=0", "data.train_fraction=1.5"):
        with pytest.raises(ConfigError) as info:
            load_config(overrides=[*base, bad])
        assert "\n" not in str(info.value) and bad.split("=")[0] in str(info.value)
    cfg = load_config(overrides=[*base, "data.classes=[alpha, zeta]"])
    with pytest.raises(ConfigError) as info:
        prepare_cache(cfg.data, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.classes: unknown classes ['zeta']; available: alpha, beta")
    cfg = load_config(overrides=[*base, "data.classes=[gamma, beta]", "data.train_fraction=0.5"])
    sub = prepare_cache(cfg.data, progress=False)
    assert sub.class_names == ["gamma", "beta"] and sub.counts("train") == [1, 4]


def test_consumers_see_the_subset(tmp_path):
    npz = uneven_npz(tmp_path / "uneven.npz")
    cfg = load_config(
        preset="cpu",
        overrides=[
            f"data.source={npz}",
            f"data.root={tmp_path / 'cache'}",
            "data.classes=[gamma, alpha]",
            "data.balanced_sampling=true",
            "data.workers=0",
            "balance.loss_weights=inverse",
            "optim.batch_size=4",
        ],
    )
    sub = prepare_cache(cfg.data, progress=False)
    criterion = build_criterion(cfg, sub)
    weights = criterion.base
    assert weights.shape == (2,) and weights[0] > weights[1]  # gamma (1 image) is the rare one
    loaders = make_loaders(sub, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    labels = torch.cat([y for _, y in loaders["train"]])
    assert len(labels) == 21 and set(labels.tolist()) <= {0, 1}
    assert sorted(torch.cat([y for _, y in loaders["val"]]).tolist()) == [0] * 4 + [1] * 4
    rows = [[cell for cell in col.cells] for col in counts_table(sub).columns]
    assert rows[0] == ["gamma", "alpha", "total"]
    assert rows[1] == ["1", "20", "21"]


def test_subset_run_trains_saves_its_classes_and_tests_on_them(tiny_npz, tmp_path):
    cfg = tiny_config(
        tiny_npz,
        tmp_path,
        "run",
        "data.classes=['2', '0']",
        "data.train_fraction=0.5",
        "run.epochs=1",
    )
    trainer, _ = fit(cfg)
    assert trainer.cache.class_names == ["2", "0"]
    assert trainer.cache.counts("train") == [8, 8]  # half of the 16 per class of the carved train
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["class_names"] == ["2", "0"]
    assert ckpt["model_record"]["num_classes"] == 2
    assert ckpt["config"]["data"]["classes"] == ["2", "0"]

    report = ev.evaluate_run(tmp_path / "run", device="cpu")
    assert report["class_names"] == ["2", "0"]
    assert report["n_test"] == 8  # the 4 + 4 test images of classes 2 and 0, not class 1's
    for row in report["weights"].values():
        matrix = np.array(row["confusion_matrix"])
        assert matrix.shape == (2, 2) and matrix.sum() == 8
        assert matrix.sum(axis=1).tolist() == [4, 4]


def test_report_refuses_other_data_without_the_subset_classes(tiny_npz, tmp_path):
    cfg = tiny_config(tiny_npz, tmp_path, "run", "data.classes=['2', '0']", "run.epochs=1")
    fit(cfg)
    other = uneven_npz(tmp_path / "other.npz")  # classes alpha, beta, gamma
    with pytest.raises(DataError) as info:
        ev.evaluate_run(tmp_path / "run", data=str(other), device="cpu")
    message = str(info.value)
    assert "\n" not in message and "unknown classes ['2', '0']" in message


def test_fraction_keeps_at_least_one_image_per_class():
    labels = np.array([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    kept = fraction_rows(labels, [0, 1, 2], 0.01, seed=0)
    assert np.bincount(labels[kept]).tolist() == [1, 1, 1]
    kept = fraction_rows(labels, [0, 1, 2], 0.5, seed=0)
    assert np.bincount(labels[kept]).tolist() == [1, 1, math.ceil(0.5 * 10)]
