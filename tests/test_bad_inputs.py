"""Inputs that must be refused where they enter, in one line, leaving no cache behind."""

from __future__ import annotations

import builtins
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset.cache import load_cache, prepare
from dataset.errors import DataError
from dataset.pair_figure import write_pairs_png
from dataset.sources import read_folder, read_npz
from tests.conftest import make_arrays


def _refused(call, *parts: str) -> str:
    with pytest.raises(DataError) as exc:
        call()
    text = str(exc.value)
    assert "\n" not in text
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"
    return text


def _nothing_built(root: Path) -> None:
    """No cache folder and no temporary folder under the root (lock files may stay)."""
    if root.is_dir():
        assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


@pytest.fixture
def deny(monkeypatch):
    """``deny(path, "read" | "write")``: access refused below ``path``, as for an ordinary user.

    The mode is changed too, but root ignores modes, so the calls the data layer makes
    (``open``, ``os.scandir``, ``os.mkdir``) are also made to raise the ``PermissionError`` the
    kernel would.
    """
    rules: list[tuple[str, str]] = []
    restore: list[tuple[Path, int]] = []
    real_open, real_scandir, real_mkdir = builtins.open, os.scandir, os.mkdir

    def refused(path, writing: bool) -> None:
        if isinstance(path, int):
            return
        full = os.path.abspath(os.fspath(path))
        for base, kind in rules:
            inside = full == base or full.startswith(base + os.sep)
            if inside and (kind == "read" or writing):
                raise PermissionError(13, "Permission denied", os.fspath(path))

    def fake_open(file, mode="r", *args, **kwargs):
        refused(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def fake_scandir(path="."):
        refused(path, False)
        return real_scandir(path)

    def fake_mkdir(path, *args, **kwargs):
        refused(path, True)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "scandir", fake_scandir)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)

    def add(path: Path, kind: str) -> None:
        restore.append((path, stat.S_IMODE(path.stat().st_mode)))
        path.chmod(0 if kind == "read" else 0o555)
        rules.append((os.path.abspath(path), kind))

    yield add
    for path, mode in restore:
        path.chmod(mode)


# ------------------------------------------------------------- item: label rule


def test_stray_high_label_refused_naming_it_as_the_cause(npz_factory, tmp_path):
    labels = make_arrays(30)[1]
    labels[4] = 99  # one typo among 0..2 would make 100 classes, 96 of them empty
    path = npz_factory(train_labels=labels)
    text = _refused(
        lambda: prepare(path, tmp_path / "c", progress=False),
        str(path),
        "the highest train label is 99 while labels 3..98 have no image: labels must be 0..C-1 "
        "with every class in train, so 99 looks like a stray label "
        "(as read, 100 classes with 96 of them empty)",
    )
    assert "labels must be 0..99" not in text  # the range the typo made is not the rule
    _nothing_built(tmp_path / "c")


def test_several_stray_labels_are_all_named(npz_factory):
    labels = make_arrays(30)[1]
    labels[4], labels[5] = 50, 99
    _refused(
        lambda: read_npz(npz_factory(train_labels=labels)),
        "labels 3..49, 51..98 have no image",
        "so 50, 99 look like stray labels",
    )


def test_a_gap_below_present_labels_is_not_called_a_stray(npz_factory):
    labels = make_arrays(30, classes=5)[1]
    labels[labels == 1] = 0  # labels 0, 2, 3, 4: label 1 is missing, none stands apart
    text = _refused(
        lambda: read_npz(npz_factory(train_labels=labels)),
        "split 'train' has no image of label 1; labels must be 0..4",
        "(1 of 5 classes missing)",
    )
    assert "stray" not in text


def test_named_class_absent_from_train_refused(npz_factory):
    path = npz_factory(class_names=np.array(["a", "b", "c", "d"]))
    _refused(lambda: read_npz(path), "no image of label 3 ('d')", "0..3", "class_names key")


def test_label_beyond_train_classes_in_test_refused(npz_factory):
    labels = make_arrays(12)[1]
    labels[0] = 3  # train has 0..2 only
    _refused(lambda: read_npz(npz_factory(test_labels=labels)), "test_labels has value 3")


def test_folder_class_only_in_test_refused(folder_factory):
    root = folder_factory({"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1, "c": 1}})
    _refused(
        lambda: read_folder(root),
        str(root / "train"),
        "split 'train' has no image of label 2 ('c')",
        "class folder names",
    )


def test_split_folders_without_train_refused(folder_factory):
    root = folder_factory({"val": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    _refused(lambda: read_folder(root), str(root), "no train folder")


# ------------------------------------------------- item: images models cannot take


@pytest.mark.parametrize("shape", [(0, 0), (8, 0)])
def test_zero_pixel_images_refused(npz_factory, tmp_path, shape):
    empty = {
        f"{split}_images": np.zeros((n, *shape, 3), np.uint8)
        for split, n in (("train", 30), ("val", 9), ("test", 12))
    }
    path = npz_factory(**empty)
    _refused(
        lambda: prepare(path, tmp_path / "c", progress=False),
        "train_images",
        f"{shape[0]}x{shape[1]} pixels",
        "at least 1x1",
    )
    _nothing_built(tmp_path / "c")


@pytest.mark.parametrize("names", [None, np.array(["only"])])
def test_single_class_npz_refused(npz_factory, tmp_path, names):
    zeros = {
        f"{s}_labels": np.zeros(n, np.int64) for s, n in (("train", 30), ("val", 9), ("test", 12))
    }
    path = npz_factory(class_names=names, **zeros)
    _refused(
        lambda: prepare(path, tmp_path / "c", progress=False), "found 1 class(es)", "at least 2"
    )
    _nothing_built(tmp_path / "c")


def test_image_size_below_one_refused(folder_factory, tmp_path):
    root = folder_factory({"a": 3, "b": 3})
    _refused(lambda: prepare(root, tmp_path / "c", image_size=0), "image_size", ">= 1, got 0")


# ---------------------------------------------------------- item: empty carved splits


def test_one_image_per_class_folder_refused_at_prepare(folder_factory, tmp_path):
    root = folder_factory({"a": 1, "b": 1, "c": 1})
    _refused(
        lambda: prepare(root, tmp_path / "c"),
        str(root),
        "carving split 'test' (fraction 0.2) left it empty",
        "3 image(s) in 3 class(es)",
    )
    _nothing_built(tmp_path / "c")


def test_val_carved_empty_refused(npz_factory, tmp_path):
    images, labels = make_arrays(3)  # one train image per class, no val in the file
    path = npz_factory(train_images=images, train_labels=labels, val_images=None, val_labels=None)
    _refused(
        lambda: prepare(path, tmp_path / "c", progress=False),
        "carving split 'val' (fraction 0.1) left it empty",
        "give a val split",
    )
    _nothing_built(tmp_path / "c")


def test_drop_leaked_test_that_empties_test_refused(npz_factory, tmp_path):
    images, labels = make_arrays(30)
    path = npz_factory(train_images=images, test_images=images[:6], test_labels=labels[:6])
    _refused(
        lambda: prepare(path, tmp_path / "c", drop_leaked_test=True, progress=False),
        str(path),
        "would leave split 'test' empty",
    )
    _nothing_built(tmp_path / "c")


# ------------------------------------------------------- item: one line, not a traceback


def test_unreadable_npz(npz_factory, tmp_path, deny):
    path = npz_factory()
    deny(path, "read")
    _refused(lambda: read_npz(path), str(path), "cannot read the file: Permission denied")
    _refused(lambda: prepare(path, tmp_path / "c", progress=False), str(path), "Permission denied")
    _nothing_built(tmp_path / "c")


def test_read_only_cache_root_refused_but_reuse_still_works(npz_factory, tmp_path, deny):
    root = tmp_path / "c"
    root.mkdir()
    ro_root = tmp_path / "ro"
    ro_root.mkdir()
    path = npz_factory()
    built, _ = prepare(path, ro_root, progress=False)  # built while still writable
    deny(root, "write")
    deny(ro_root, "write")
    _refused(
        lambda: prepare(path, root, progress=False),
        str(root),
        "cannot write the cache here (Permission denied",
        "pick a writable cache root: --root DIR for python -m dataset, "
        "--set data.root=DIR for training",
    )
    assert list(root.iterdir()) == []
    reused, fresh = prepare(path, ro_root, progress=False)  # an up-to-date cache needs no write
    assert not fresh and reused.path == built.path


def test_truncated_cache_file_refused_then_rebuilt_saying_so(npz_factory, tmp_path, capsys):
    cache, _ = prepare(npz_factory(), tmp_path / "c", progress=False)
    file = cache.path / "train_images.npy"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    _refused(lambda: load_cache(cache.path), str(file), "truncated or damaged", "--rebuild")
    capsys.readouterr()
    again, built = prepare(npz_factory(), tmp_path / "c", progress=False)
    assert built and again.images("train").shape == (30, 8, 8, 3)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"the cache {cache.path} is damaged, so it is rebuilt "
        "(train_images.npy: cache file is truncated or damaged ("
    )
    assert "--rebuild" not in lines[0]  # it is being rebuilt: no advice to do it
    prepare(npz_factory(), tmp_path / "c", progress=False)
    assert capsys.readouterr().err == ""  # a whole cache is reused without a word


def test_training_run_says_it_rebuilds_a_damaged_cache(npz_factory, tmp_path, capsys):
    from training.config.schema import DataConfig
    from training.engine.data import prepare_cache

    data = DataConfig(source=str(npz_factory()), root=str(tmp_path / "c"))
    cache = prepare_cache(data, progress=False)
    (cache.path / "val_labels.npy").unlink()
    capsys.readouterr()
    prepare_cache(data, progress=False)
    err = capsys.readouterr().err
    assert err == (
        f"the cache {cache.path} is damaged, so it is rebuilt "
        "(cache file val_labels.npy is missing)\n"
    )


def test_cache_file_disagreeing_with_meta_refused(npz_factory, tmp_path):
    cache, _ = prepare(npz_factory(), tmp_path / "c", progress=False)
    np.save(cache.path / "test_labels.npy", np.zeros(5, np.int64))
    _refused(
        lambda: load_cache(cache.path),
        "test_labels.npy",
        "holds int64 (5,), meta.json says int64 (12,)",
    )


def test_inspect_of_truncated_cache_is_one_line(npz_factory, tmp_path):
    root = tmp_path / "c"
    cache, _ = prepare(npz_factory(), root, progress=False)
    file = cache.path / "val_images.npy"
    file.write_bytes(file.read_bytes()[:200])
    proc = subprocess.run(
        [sys.executable, "-m", "dataset", "inspect", cache.name, "--root", str(root)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "val_images.npy" in lines[0] and "truncated" in lines[0]


def test_unreadable_class_folder_is_not_called_empty(folder_factory, deny):
    root = folder_factory({"a": 2, "b": 2})
    deny(root / "b", "read")
    text = _refused(lambda: read_folder(root), str(root / "b"), "cannot list the folder")
    assert "has no images" not in text


# ----------------------------------------------------------------- item: file modes


@pytest.mark.parametrize(
    "umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)]
)
def test_cache_gets_the_umask_modes(npz_factory, tmp_path, umask, folder_mode, file_mode):
    old = os.umask(umask)
    try:
        cache, _ = prepare(npz_factory(), tmp_path / "c", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.path.stat().st_mode) == folder_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in cache.path.iterdir()}
    assert set(modes.values()) == {file_mode}, modes


def test_pairs_png_gets_the_umask_mode(tmp_path):
    images = {"train": make_arrays(2)[0]}
    old = os.umask(0o022)
    try:
        path = write_pairs_png(tmp_path / "pairs.png", [], images, ["a", "b", "c"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.png"]  # no temporary file left


def test_cache_with_an_empty_split_is_not_reused(npz_factory, tmp_path):
    # A cache written before empty splits were refused must not slip through reuse.
    cache, _ = prepare(npz_factory(), tmp_path / "c", progress=False)
    np.save(cache.path / "val_images.npy", np.zeros((0, 8, 8, 3), np.uint8))
    np.save(cache.path / "val_labels.npy", np.zeros(0, np.int64))
    meta = json.loads((cache.path / "meta.json").read_text())
    meta["counts"]["val"] = [0, 0, 0]
    (cache.path / "meta.json").write_text(json.dumps(meta))
    _refused(lambda: load_cache(cache.path), str(cache.path), "split 'val' of the cache is empty")
    again, built = prepare(npz_factory(), tmp_path / "c", progress=False)
    assert built and len(again.labels("val")) == 9
