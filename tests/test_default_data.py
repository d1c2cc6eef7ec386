"""The embedded sample ``bloodcells_mini``: its file, its builder, and training on it by default."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dataset.medmnist
from dataset.cache import prepare
from dataset.cli import build_parser as dataset_parser
from dataset.errors import DataError
from dataset.leakage import find_duplicates
from dataset.sources import EMBEDDED, SPLITS, embedded_sample, read_npz
from models.train import data_note, eval_command
from tests.conftest import shared_file
from training.config.cli import build_parser, config_from_args
from training.config.schema import DataConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = EMBEDDED["bloodcells_mini"]
SIZES = {"train": 2100, "val": 300, "test": 600}


def _load_builder():
    path = ROOT / "dataset" / "default" / "make_bloodcells_mini.py"
    spec = importlib.util.spec_from_file_location("make_bloodcells_mini", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


@pytest.fixture(scope="module")
def sample() -> dict[str, np.ndarray]:
    with np.load(SAMPLE.path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


# --------------------------------------------------------------------------- the file


def test_the_file_ships_inside_the_package_and_is_small() -> None:
    assert SAMPLE.path.parent == ROOT / "dataset" / "default"
    assert SAMPLE.path.is_file() and SAMPLE.path.stat().st_size < 8e6
    assert (SAMPLE.path.parent / "README.md").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"default/*.npz"' in pyproject  # package data, for a non-editable install
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(SAMPLE.path)], cwd=ROOT, capture_output=True
    )
    assert ignored.returncode != 0, ".gitignore hides the embedded sample"


def test_keys_and_split_sizes(sample: dict[str, np.ndarray]) -> None:
    assert set(sample) == {f"{s}_{k}" for s in SPLITS for k in ("images", "labels", "files")}
    for split, n in SIZES.items():
        images, labels = sample[f"{split}_images"], sample[f"{split}_labels"]
        assert images.shape == (n, 28, 28, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert len(sample[f"{split}_files"]) == n


def test_every_split_is_stratified(sample: dict[str, np.ndarray]) -> None:
    # Each class's share is the same in every split, to within rounding; a plain random draw
    # of 600 misses a class's expected count by several images.
    pooled = np.bincount(np.concatenate([sample[f"{s}_labels"] for s in SPLITS]), minlength=8)
    share = pooled / pooled.sum()
    for split, n in SIZES.items():
        counts = np.bincount(sample[f"{split}_labels"], minlength=8)
        assert np.all(counts > 0)
        assert np.abs(counts - share * n).max() < 1.5, (split, counts, share * n)


def test_no_duplicates_and_class_names_of_the_full_file(sample: dict[str, np.ndarray]) -> None:
    images = {s: sample[f"{s}_images"] for s in SPLITS}
    report = find_duplicates(images, {s: sample[f"{s}_labels"] for s in SPLITS})
    assert sum(report.within.values()) == 0 and not report.across
    assert read_npz(SAMPLE.path).class_names == [
        "basophil",
        "eosinophil",
        "erythroblast",
        "ig",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ]


def test_the_sample_is_the_builder_output_from_the_real_file(sample, tmp_path) -> None:
    source = shared_file("bloodcells_pbc_28.npz")
    rebuilt = builder.build(source, seed=0)
    assert set(rebuilt) == set(sample)
    for key, value in rebuilt.items():
        np.testing.assert_array_equal(value, sample[key], err_msg=key)
    # Every image stays in its split, with its file name, label and pixels.
    with np.load(source) as full:
        for split in SPLITS:
            index = {name: i for i, name in enumerate(full[f"{split}_files"].tolist())}
            rows = [index[name] for name in sample[f"{split}_files"].tolist()]
            np.testing.assert_array_equal(full[f"{split}_labels"][rows], sample[f"{split}_labels"])
            np.testing.assert_array_equal(full[f"{split}_images"][rows], sample[f"{split}_images"])
    assert not np.array_equal(builder.build(source, seed=1)["train_files"], sample["train_files"])


# --------------------------------------------------------------------------- the builder


@pytest.mark.parametrize(
    "counts, total, expected",
    [
        ([10, 10, 10], 6, [2, 2, 2]),
        ([5, 3, 2], 5, [3, 1, 1]),  # 2.5, 1.5, 1.0: the tie goes to the lower class
        ([70, 20, 10], 10, [7, 2, 1]),
        ([1, 99], 10, [0, 10]),  # 0.1 rounds away; a sample this small cannot keep it
        ([4, 4], 8, [4, 4]),
    ],
)
def test_allocate_by_largest_remainder(counts, total, expected) -> None:
    assert builder.allocate(np.array(counts), total).tolist() == expected


def test_allocate_refuses_a_sample_larger_than_the_data() -> None:
    with pytest.raises(ValueError, match="sample size 11 is outside 0..10"):
        builder.allocate(np.array([5, 5]), 11)


def test_stratified_sample_is_seeded_and_stratified() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    first = builder.stratified_sample(labels, 10, np.random.default_rng(0))
    again = builder.stratified_sample(labels, 10, np.random.default_rng(0))
    other = builder.stratified_sample(labels, 10, np.random.default_rng(1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.bincount(labels[first]).tolist() == [5, 3, 2]
    assert len(set(first.tolist())) == 10 and np.all(np.diff(first) > 0)


def test_repeated_images_are_marked_in_every_split() -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (4, 2, 2, 3), dtype=np.uint8)
    val = np.stack([train[1], train[1] ^ 1])
    test = np.stack([train[3] ^ 1, train[3] ^ 1])
    marks = builder.repeated_images({"train": train, "val": val, "test": test})
    assert {s: m.tolist() for s, m in marks.items()} == {
        "train": [False, True, False, False],
        "val": [True, False],
        "test": [True, True],
    }


# --------------------------------------------------------------------------- resolving the name


def test_the_name_builds_a_cache_offline_from_any_folder(tmp_path, monkeypatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("the embedded sample must not be downloaded")

    monkeypatch.setattr(dataset.medmnist, "fetch", no_download)
    monkeypatch.chdir(tmp_path)
    cache, built = prepare("bloodcells_mini", tmp_path / "cache", progress=False)
    assert built and cache.name == "bloodcells_mini"
    assert [sum(cache.counts(s)) for s in SPLITS] == list(SIZES.values())
    assert cache.meta["source"]["path"] == str(SAMPLE.path)
    assert prepare("BloodCells_Mini", tmp_path / "cache", progress=False)[1] is False


def test_a_file_or_folder_of_that_name_wins(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert embedded_sample("bloodcells_mini") is SAMPLE
    (tmp_path / "bloodcells_mini").mkdir()
    assert embedded_sample("bloodcells_mini") is None
    assert embedded_sample("bloodmnist") is None


def test_a_missing_file_is_one_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("dataset.sources.EMBEDDED_DIR", tmp_path)
    with pytest.raises(DataError, match="bloodcells_mini.npz: the embedded sample"):
        embedded_sample("bloodcells_mini")


def test_unknown_sources_and_the_dataset_help_name_it(tmp_path) -> None:
    with pytest.raises(DataError, match="embedded sample \\(bloodcells_mini\\)"):
        prepare("no_such_source", tmp_path, progress=False)
    assert "bloodcells_mini" in " ".join(dataset_parser().format_help().split())


# --------------------------------------------------------------------------- training on it


def test_a_config_without_data_trains_on_it() -> None:
    cfg = config_from_args(build_parser().parse_args([]), cuda_available=lambda: False)
    assert cfg.data.source == DataConfig().source == "bloodcells_mini"
    assert embedded_sample(cfg.data.source) is SAMPLE


def test_data_note_is_one_line_with_the_other_commands() -> None:
    note = data_note("bloodcells_mini")
    assert note.startswith("data: bloodcells_mini, the embedded sample") and "\n" not in note
    assert "--data bloodmnist" in note and "--data path/to/folder" in note
    assert data_note("scans.npz") is None and data_note("bloodmnist") is None


def test_eval_command_quotes_the_run_folder() -> None:
    assert eval_command(Path("runs/a")) == "python test.py --run-dir runs/a"
    assert eval_command(Path("my runs/a")) == "python test.py --run-dir 'my runs/a'"


def _make_train(tmp_path, *variables: str) -> list[list[str]]:
    """Run the Makefile's train recipe with a stand-in python that logs its arguments."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    cmd = ["make", "-s", "-o", ".venv/.installed", "train", f"PY={fake}", *variables]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in log.read_text().splitlines()]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_train_trains_then_tests_the_same_run(tmp_path) -> None:
    calls = _make_train(tmp_path, "RUN_DIR=runs/x", "ARGS=--epochs 2")
    assert calls == [
        ["models/train.py", "--run-dir", "runs/x", "--epochs", "2"],
        ["test.py", "--run-dir", "runs/x"],
    ]
    (tmp_path / "b").mkdir()
    train, test = _make_train(tmp_path / "b")
    assert train[1] == "--run-dir" and train[2].startswith("runs/train-")
    assert test == ["test.py", "--run-dir", train[2]]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("args", ["--run-dir runs/mine --epochs 2", "--resume runs/old"])
def test_make_train_leaves_a_run_folder_named_in_args_to_the_user(tmp_path, args) -> None:
    # The recipe cannot know that folder: train.py runs alone and prints the test command.
    assert _make_train(tmp_path, f"ARGS={args}") == [["models/train.py", *args.split()]]


def test_train_script_without_data_or_preset(tmp_path) -> None:
    """The quick start in miniature: no --data, no --preset, offline, then the printed test."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    # Any download attempt would fail at once against this mirror.
    env["MEDMNIST_BASE_URL"] = (tmp_path / "no-mirror").as_uri()
    cmd = [sys.executable, str(ROOT / "models" / "train.py"), "--device", "cpu", "--epochs", "1"]
    cmd += ["--run-dir", str(run_dir), "--set", f"data.root={tmp_path / 'cache'}"]
    cmd += ["--set", "run.tensorboard=false", "--set", "run.progress=off"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "preset: cpu (run.device is cpu; --preset full for the long GPU run)" in lines
    assert data_note("bloodcells_mini") in lines
    assert lines[-1] == f"test it with: {eval_command(run_dir)}"
    assert "preset: cpu" in (run_dir / "config.yaml").read_text()
    printed = shlex.split(lines[-1].removeprefix("test it with: "))
    assert printed[:2] == ["python", "test.py"]
    test_cmd = [sys.executable, str(ROOT / "test.py"), *printed[2:], "--device", "cpu"]
    proc = subprocess.run(test_cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "test_report.json").is_file()
