"""``python -m dataset``: reports on real files, one-line errors, MedMNIST through a mirror."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from dataset import medmnist
from dataset.cli import main
from dataset.download import file_md5
from tests.conftest import shared_file


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping inside the lines the tests look for


def test_prepare_real_brain_mri_reports_leakage(tmp_path, capsys):
    src = shared_file("brain_tumor_mri_64.npz")
    assert main(["prepare", str(src), "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "brain_tumor_mri_64" in out and "built" in out
    assert "glioma" in out and "1311" in out  # class names, official test size
    assert "64x64, 1 channel(s)" in out
    assert "val: carved from train (fraction 0.1, seed 0)" in out
    assert "test: 216 image(s) (189 distinct) also occur in an earlier split" in out
    # a second run reuses the cache; inspect by cache name; check lists pairs with file names
    assert main(["inspect", "brain_tumor_mri_64", "--root", str(tmp_path)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["check", "brain_tumor_mri_64", "--root", str(tmp_path), "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "worst pairs" in out and "Te-" in out and "Tr-" in out


def test_prepare_real_bloodcells(tmp_path, capsys):
    src = shared_file("bloodcells_pbc_28.npz")
    assert main(["prepare", str(src), "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "basophil" in out and "platelet" in out  # names recovered from train_files
    assert "11965" in out and "1709" in out and "3418" in out
    assert "label conflicts: 1" in out


def test_bad_input_is_one_line_and_exit_2(npz_factory, tmp_path):
    import numpy as np

    path = npz_factory(test_labels=np.full(12, 7))
    proc = subprocess.run(
        [sys.executable, "-m", "dataset", "prepare", str(path), "--root", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env={"COLUMNS": "300", "PATH": ""},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(path) in lines[0] and "outside 0..2" in lines[0]
    assert "Traceback" not in proc.stderr


def test_medmnist_name_through_file_mirror(npz_factory, tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    fake = npz_factory("bloodmnist.npz", classes=8, n=(40, 16, 16))
    fake.rename(mirror / "bloodmnist.npz")
    info = medmnist.MEDMNIST["bloodmnist"]
    md5 = file_md5(mirror / "bloodmnist.npz")
    monkeypatch.setitem(
        medmnist.MEDMNIST, "bloodmnist", dataclasses.replace(info, md5={**info.md5, 28: md5})
    )
    monkeypatch.setenv(medmnist.BASE_URL_ENV, mirror.as_uri())
    root = tmp_path / "data_npy"
    assert main(["prepare", "bloodmnist", "--root", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bloodmnist_28" in out and "basophil" in out  # official class names
    assert (root / "_downloads" / "bloodmnist.npz").is_file()
    assert (root / "bloodmnist_28" / "meta.json").is_file()


def test_offline_download_fails_fast_with_manual_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(medmnist.BASE_URL_ENV, "http://127.0.0.1:9")  # nothing listens on port 9
    assert main(["prepare", "dermamnist_64", "--root", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and str(tmp_path / "_downloads" / "dermamnist_64.npz") in err
