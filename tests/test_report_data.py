"""Tests for report.data_section: the report's "Data" section."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dataset.cache import load_cache
from dataset.sources import SPLITS
from dataset.subset import subset_cache
from report.data_section import (
    add_data_section,
    count_rows,
    leakage_rows,
    open_run_data,
    sample_indices,
    split_channel_stats,
    thumbnail_grid,
    upscale_factor,
)
from report.page import Page
from report.run import load_run
from tests.conftest import brightness_npz
from training.engine.checkpoint import load_checkpoint, save_checkpoint


def _table_rows(block: str) -> list[list[str]]:
    body = block.split("<tbody>", 1)[1]
    return [re.findall(r"<td>(.*?)</td>", row) for row in body.split("</tr>") if "<td>" in row]


def _section(page: Page, key: str):
    return next(s for s in page.sections if s.key == key)


def _keep_one_checkpoint(run: Path, edit) -> None:
    """Leave ``best.pt`` only (the report reads the smallest checkpoint), changed by ``edit``."""
    folder = run / "checkpoints"
    for other in folder.glob("*.pt"):
        if other.name != "best.pt":
            other.unlink()
    ckpt = load_checkpoint(folder / "best.pt")
    edit(ckpt)
    save_checkpoint(ckpt, folder / "best.pt")


def test_section_on_a_trained_run(trained_run, tmp_path):
    run = load_run(trained_run)
    page = Page(tmp_path / "page", "t")
    add_data_section(page, run)
    section = _section(page, "data")
    assert section.title == "Data"
    assert not any('class="note"' in b for b in section.blocks), section.blocks

    cache = load_cache(load_checkpoint(trained_run / "checkpoints" / "best.pt")["data"]["cache"])
    tables = [b for b in section.blocks if b.startswith("<table>")]
    counts = _table_rows(tables[0])
    assert [r[0] for r in counts] == [*cache.class_names, "total"]
    for i in range(cache.num_classes):
        assert [int(v) for v in counts[i][1:4]] == [cache.counts(s)[i] for s in SPLITS]
    assert int(counts[-1][4]) == sum(sum(cache.counts(s)) for s in SPLITS)

    with Image.open(page.folder / "data_counts.png") as img:
        assert img.format == "PNG" and 800 <= img.width <= 1300 and img.height >= 250
    with Image.open(page.folder / "data_samples.png") as img:
        # 3 rows of 6 thumbnails, 28 px enlarged 4x to 112 px (>= 96).
        assert img.width >= 6 * 112 and img.height >= 3 * 112
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 0  # images were drawn, not a blank canvas

    # The normalisation row is the checkpoint's mean/std; the splits' stats are the images'.
    stats = _table_rows(tables[1])
    mean = load_checkpoint(trained_run / "checkpoints" / "best.pt")["mean"]
    assert [float(v) for v in stats[-1][2:5]] == pytest.approx(mean, abs=1e-4)
    images = cache.images("test").astype(np.float64) / 255
    assert float(stats[2][2]) == pytest.approx(images[..., 0].mean(), abs=1e-4)

    html = page.write().read_text()
    for png in page.folder.glob("*.png"):
        assert f'src="{png.name}"' in html
    assert "exact duplicates" in html and "near duplicates" in html


def test_train_fraction_counts_what_the_run_trained_on(trained_run, tmp_path):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))

    def half(ckpt):
        ckpt["config"]["data"]["train_fraction"] = 0.5

    _keep_one_checkpoint(run_dir, half)
    info = open_run_data(load_run(run_dir))
    full = load_cache(info.cache_path)
    expected = subset_cache(full, [], 0.5, 0)
    assert info.cache.counts("train") == expected.counts("train")
    assert sum(info.cache.counts("train")) < sum(full.counts("train"))
    assert info.cache.counts("test") == full.counts("test")
    assert any("train_fraction 0.5" in n for n in info.notes)
    # The statistics read the subset's rows only.
    mean, _, read, total = split_channel_stats(info.cache, "train")
    assert read == total == sum(expected.counts("train"))
    assert mean[0] == pytest.approx(expected.images("train")[..., 0].mean() / 255, abs=1e-6)


def test_a_cross_validation_fold_counts_and_reads_its_pooled_images(trained_run, tmp_path):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))

    def fold_1_of_3(ckpt):
        ckpt["config"]["data"].update(cv_folds=3, cv_fold=1)

    _keep_one_checkpoint(run_dir, fold_1_of_3)
    info = open_run_data(load_run(run_dir))
    full = load_cache(info.cache_path)
    expected = subset_cache(full, [], 1.0, 0, 3, 1)
    assert info.cache.counts("val") == expected.counts("val") != full.counts("val")
    assert sum(info.cache.counts("train")) + sum(info.cache.counts("val")) == sum(
        full.counts("train")
    ) + sum(full.counts("val"))
    assert any("fold 1 of 3" in n for n in info.notes)
    # The statistics read the fold's pooled rows, some of them from the val file.
    mean, _, read, total = split_channel_stats(info.cache, "val")
    assert read == total == sum(expected.counts("val"))
    assert mean[0] == pytest.approx(expected.images("val")[..., 0].mean() / 255, abs=1e-6)


def test_a_missing_source_gives_a_note(trained_run, tmp_path):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    gone = tmp_path / "gone"

    def move(ckpt):
        ckpt["data"] = {
            "name": "x",
            "cache": str(gone / "cache" / "x"),
            "source": str(gone / "x.npz"),
        }

    _keep_one_checkpoint(run_dir, move)
    page = Page(tmp_path / "page", "t")
    add_data_section(page, load_run(run_dir))
    section = _section(page, "data")
    notes = [b for b in section.blocks if 'class="note"' in b]
    assert len(notes) == 1
    assert str(gone / "x.npz") in notes[0] and "python -m dataset prepare" in notes[0]
    assert not list(page.folder.glob("*.png"))
    assert "<section" in page.render()  # the page still renders


def test_greyscale_run_from_its_config_alone(tmp_path):
    """No checkpoint: the cache is found (built) from config.yaml; a 1-channel 64 px grid is
    drawn in grey at 2x."""
    npz = brightness_npz(tmp_path / "grey.npz", counts=(30, 9, 9))
    data = dict(np.load(npz))
    for key in [k for k in data if k.endswith("_images")]:
        big = data[key].repeat(2, axis=1)[:, :, :, :1].repeat(2, axis=2)[:, :64, :64]
        data[key] = np.ascontiguousarray(np.pad(big, ((0, 0), (0, 8), (0, 8), (0, 0))))
    np.savez(npz, **data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"data": {"source": str(npz), "root": str(tmp_path / "cache"), "classes": []}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    page = Page(tmp_path / "page", "t")
    add_data_section(page, load_run(run_dir))
    section = _section(page, "data")
    assert any("no readable checkpoint" in b for b in section.blocks)
    counts = _table_rows(next(b for b in section.blocks if b.startswith("<table>")))
    assert [int(r[1]) for r in counts[:3]] == [10, 10, 10]
    with Image.open(page.folder / "data_samples.png") as img:
        assert img.width >= 6 * 128 and img.height >= 3 * 128
        rgb = np.asarray(img.convert("RGB")).astype(int)
    # Grey colormap: every pixel has R == G == B (the labels are black text).
    assert np.abs(rgb[..., 0] - rgb[..., 1]).max() == 0
    assert np.abs(rgb[..., 1] - rgb[..., 2]).max() == 0
    stats = _table_rows([b for b in section.blocks if b.startswith("<table>")][1])
    assert stats[0][0] == "train" and len(stats[0]) == 4  # split, images, mean grey, std grey


def test_upscale_and_grid():
    assert [upscale_factor(s) for s in (28, 64, 96, 224)] == [4, 2, 1, 1]
    rows = [np.full((2, 3, 3, 1), 10, np.uint8), np.full((1, 3, 3, 1), 200, np.uint8)]
    grid = thumbnail_grid(rows, per_row=2, scale=2, gutter=1)
    assert grid.shape == (2 * 6 + 1, 2 * 6 + 1, 1)
    assert (grid[:6, :6] == 10).all() and (grid[:6, 7:] == 10).all()
    assert (grid[7:, :6] == 200).all()
    assert (grid[7:, 7:] == 255).all()  # the second class has one image: the rest stays white


def test_samples_are_seeded_and_per_class():
    labels = np.array([0, 1, 2] * 20)
    first = sample_indices(labels, 3, per_class=6, seed=0)
    again = sample_indices(labels, 3, per_class=6, seed=0)
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    for c, picks in enumerate(first):
        assert len(picks) == 6 and len(set(picks.tolist())) == 6 and (labels[picks] == c).all()
    short = sample_indices(np.array([0, 0, 1]), 3, per_class=6)
    assert [len(p) for p in short] == [2, 1, 0]


def test_leakage_rows_describe_what_was_and_was_not_checked():
    rows, warnings = leakage_rows({})
    assert "not computed" in rows[0][1] and "not computed" in rows[1][1] and not warnings
    leak = {
        "within": {"train": 2, "val": 0, "test": 0},
        "across": {"train->test": 3},
        "across_distinct": {"train->test": 2},
        "leaked": {"test": 3},
        "leaked_distinct": {"test": 2},
        "label_conflicts": 1,
    }
    near = {"skipped": "images under 16x16 pixels are too small for the hash"}
    rows, warnings = leakage_rows({"leakage": leak, "near_duplicates": near})
    assert rows[0][1:] == ["train 2", "train->test 3 (2 distinct)", "test 3 (2 distinct)", "1"]
    assert "too small" in rows[1][1]
    assert len(warnings) == 1 and warnings[0].startswith("test: 3 image(s)")


def test_count_rows_total():
    class Fake:
        class_names = ["a", "b"]

        @staticmethod
        def counts(split):
            return {"train": [5, 7], "val": [1, 2], "test": [3, 4]}[split]

    assert count_rows(Fake()) == [["a", 5, 1, 3, 9], ["b", 7, 2, 4, 13], ["total", 12, 3, 7, 22]]
