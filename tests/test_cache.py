"""The data_npy cache: layout, metadata, carving, reuse, rebuild and atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest

import dataset.cache as cache_mod
from dataset.cache import channel_stats, load_cache, prepare, stratified_split
from dataset.errors import DataError
from dataset.locking import exclusive_lock
from dataset.locking import fcntl as _fcntl
from tests.conftest import make_arrays


def test_layout_and_meta(npz_factory, tmp_path):
    src = npz_factory()
    cache, built = prepare(src, tmp_path / "cache")
    assert built and cache.path == tmp_path / "cache" / "tiny"
    for split, n in (("train", 30), ("val", 9), ("test", 12)):
        images = np.load(cache.path / f"{split}_images.npy", mmap_mode="r")
        labels = np.load(cache.path / f"{split}_labels.npy")
        assert images.dtype == np.uint8 and images.shape == (n, 8, 8, 3)
        assert labels.dtype == np.int64 and labels.shape == (n,)
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["class_names"] == ["0", "1", "2"]
    assert meta["counts"]["train"] == [10, 10, 10]
    assert meta["image_shape"] == [8, 8, 3]
    assert meta["source"]["checksum"]["sha256"] == cache_mod.file_sha256(src)
    assert meta["split"] == {"seed": 0, "val": "source", "test": "source"}
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3


def test_channel_stats_match_numpy():
    images, _ = make_arrays(50, size=6, channels=3)
    mean, std = channel_stats(images, chunk=7)  # chunks that do not divide N
    ref = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), atol=1e-5)


def test_val_carved_stratified_and_recorded(npz_factory, tmp_path):
    src = npz_factory(val_images=None, val_labels=None, n=(60, 0, 12))
    cache, _ = prepare(src, tmp_path, val_fraction=0.2, seed=3)
    assert cache.counts("val") == [4, 4, 4] and cache.counts("train") == [16, 16, 16]
    assert cache.meta["split"] == {
        "seed": 3,
        "val": "carved from train",
        "test": "source",
        "val_fraction": 0.2,
    }
    assert cache.counts("test") == [4, 4, 4]  # the official test split is untouched


def test_carving_keeps_duplicates_together(npz_factory, tmp_path):
    images, labels = make_arrays(60)
    images[30:] = images[:30]  # every image twice
    src = npz_factory(train_images=images, train_labels=labels, val_images=None, val_labels=None)
    cache, _ = prepare(src, tmp_path, val_fraction=0.2)
    assert cache.meta["leakage"]["across"].get("train->val", 0) == 0
    assert len(cache.labels("val")) % 2 == 0


def test_stratified_split_properties():
    labels = np.repeat(np.arange(4), [50, 20, 5, 2])
    keep, held = stratified_split(labels, 0.1, seed=0)
    assert np.intersect1d(keep, held).size == 0 and len(keep) + len(held) == len(labels)
    assert np.bincount(labels[held], minlength=4).tolist() == [5, 2, 1, 1]  # small classes get one
    keep2, held2 = stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(held, held2)  # seeded
    _, held3 = stratified_split(labels, 0.1, seed=1)
    assert not np.array_equal(held, held3)


def test_folder_without_splits_carves_test_and_val(folder_factory, tmp_path):
    root = folder_factory({"a": 20, "b": 20})
    cache, _ = prepare(root, tmp_path / "cache", test_fraction=0.2, val_fraction=0.1)
    assert cache.counts("test") == [4, 4]
    assert sum(cache.counts("val")) > 0
    assert sum(sum(cache.counts(s)) for s in ("train", "val", "test")) == 40
    assert cache.meta["split"]["test"] == "carved from all images"
    files = json.loads((cache.path / "files.json").read_text())
    assert len(files["test"]) == 8


def test_reused_when_unchanged_rebuilt_when_changed(npz_factory, tmp_path):
    src = npz_factory()
    first, built1 = prepare(src, tmp_path)
    second, built2 = prepare(src, tmp_path)
    assert built1 and not built2 and first.meta == second.meta
    _, built3 = prepare(src, tmp_path, val_fraction=0.2)  # a parameter changed
    assert built3
    npz_factory(n=(33, 9, 12))  # the source changed
    cache, built4 = prepare(src, tmp_path, val_fraction=0.2)
    assert built4 and sum(cache.counts("train")) == 33


def test_interrupted_build_leaves_previous_cache(npz_factory, tmp_path, monkeypatch):
    src = npz_factory()
    prepare(src, tmp_path)
    npz_factory(n=(36, 9, 12))
    real_save = np.save
    calls = []

    def failing_save(path, arr, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the middle of writing the new cache
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(cache_mod.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path)
    monkeypatch.undo()
    old = load_cache(tmp_path / "tiny")
    assert sum(old.counts("train")) == 30  # still the previous, complete cache
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tiny")] == [".tiny.lock"]


def test_interrupted_first_build_leaves_nothing_loadable(npz_factory, tmp_path, monkeypatch):
    src = npz_factory()

    def broken_meta(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.json, "dumps", broken_meta)
    with pytest.raises(OSError):
        prepare(src, tmp_path)
    monkeypatch.undo()
    with pytest.raises(DataError, match="meta.json missing"):
        load_cache(tmp_path / "tiny")


def test_killed_build_leftovers_removed_by_next_build(npz_factory, tmp_path):
    src = npz_factory()
    # What a SIGKILL in the middle of a build (or of the swap) leaves behind.
    for leftover in (".tiny.tmp-abc123", ".tiny.old-def456"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "train_images.npy").write_bytes(b"half")
    (tmp_path / ".tiny_64.tmp-xyz").mkdir()  # another cache's build: not this one's to delete
    cache, built = prepare(src, tmp_path)
    assert built and sum(cache.counts("train")) == 30
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == [".tiny.lock", ".tiny_64.tmp-xyz"]


@pytest.mark.skipif(_fcntl is None, reason="no file lock without fcntl (Windows)")
def test_second_run_waits_for_the_build_lock_then_reuses(npz_factory, tmp_path, capfd):
    src = npz_factory()
    built_elsewhere = prepare(src, tmp_path / "other")[0].path
    root = tmp_path / "data_npy"
    root.mkdir()
    result = {}
    # The test holds the lock as another process building "tiny" would.
    with exclusive_lock(root / ".tiny.lock", "held by the test"):
        waiter = threading.Thread(target=lambda: result.update(out=prepare(src, root)))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and not (root / "tiny").exists()  # waiting, not building
        shutil.copytree(built_elsewhere, root / "tiny")  # the other process finishes its build
    waiter.join(timeout=30)
    cache, built = result["out"]
    assert not built and cache.path == root / "tiny"  # reused, not built a second time
    assert "waiting for another process that is building the cache" in capfd.readouterr().err


def test_damaged_cache_is_rebuilt(npz_factory, tmp_path):
    src = npz_factory()
    cache, _ = prepare(src, tmp_path)
    os.remove(cache.path / "val_labels.npy")
    with pytest.raises(DataError, match="val_labels.npy is missing"):
        load_cache(cache.path)
    again, built = prepare(src, tmp_path)
    assert built and len(again.labels("val")) == 9


def test_drop_leaked_test(npz_factory, tmp_path):
    train, labels = make_arrays(30)
    test, test_labels = make_arrays(12, seed=9)
    test[[2, 5, 7]] = train[[0, 1, 1]]  # three test images copied from train (two distinct)
    src = npz_factory(
        train_images=train, train_labels=labels, test_images=test, test_labels=test_labels
    )
    kept, _ = prepare(src, tmp_path / "a")
    assert kept.meta["leakage"]["leaked"] == {"test": 3}
    assert kept.meta["leakage"]["leaked_distinct"] == {"test": 2}
    dropped, _ = prepare(src, tmp_path / "b", drop_leaked_test=True)
    assert len(dropped.labels("test")) == 9
    assert dropped.meta["leakage"]["leaked"] == {}
    assert any("dropped 3 test image" in n for n in dropped.meta["notes"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 0.5\), got 0.0"),
        ({"test_fraction": 0.7}, r"test_fraction must be in \(0, 0.5\), got 0.7"),
    ],
)
def test_bad_fractions(npz_factory, tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        prepare(npz_factory(), tmp_path, **kwargs)


def test_unknown_source(tmp_path):
    with pytest.raises(DataError, match="not a folder, an .npz file or a MedMNIST name"):
        prepare("nosuchthing", tmp_path)


def test_multilabel_medmnist_refused(tmp_path):
    with pytest.raises(DataError, match="multi-label"):
        prepare("chestmnist", tmp_path)
