"""Readers of .npz files and image folders: what they accept and the one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dataset.errors import DataError
from dataset.sources import read_folder, read_npz
from tests.conftest import make_arrays


def _one_line(exc: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(exc.value)
    assert "\n" not in text
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"
    return text


# ----------------------------------------------------------------------- npz


def test_npz_reads_all_splits_with_channel_axis(npz_factory):
    path = npz_factory(channels=1, train_images=make_arrays(30, channels=1)[0][..., 0])
    raw = read_npz(path)
    assert raw.images["train"].shape == (30, 8, 8, 1)  # (N, H, W) gained its channel axis
    assert raw.images["test"].shape == (12, 8, 8, 1)
    assert raw.labels["val"].dtype == np.int64
    assert raw.class_names == ["0", "1", "2"]


def test_npz_labels_n_by_1_and_class_names(npz_factory):
    labels = make_arrays(30)[1][:, None]  # MedMNIST stores (N, 1)
    path = npz_factory(train_labels=labels, class_names=np.array(["a", "b", "c"]))
    raw = read_npz(path)
    assert raw.labels["train"].shape == (30,)
    assert raw.class_names == ["a", "b", "c"]


def test_npz_class_names_from_file_folders(npz_factory):
    files = np.array([f"{'abc'[y]}/img{i}.png" for i, y in enumerate(make_arrays(30)[1])])
    raw = read_npz(npz_factory(train_files=files))
    assert raw.class_names == ["a", "b", "c"]
    assert raw.files["train"][0] == "a/img0.png"


def test_npz_empty_val_counts_as_absent(npz_factory):
    path = npz_factory(
        val_images=np.zeros((0, 8, 8, 3), np.uint8), val_labels=np.zeros(0, np.int64)
    )
    assert "val" not in read_npz(path).images


@pytest.mark.parametrize(
    "override, parts",
    [
        ({"train_labels": None}, ["missing key 'train_labels'", "keys present"]),
        ({"val_labels": None}, ["missing key 'val_labels'"]),
        (
            {"train_images": np.zeros((30, 8, 8, 3), np.float32)},
            ["train_images", "dtype float32", "uint8"],
        ),
        (
            {"test_images": np.zeros((12, 8, 8, 3, 1), np.uint8)},
            ["test_images", "shape (12, 8, 8, 3, 1)"],
        ),
        ({"test_images": np.zeros((12, 8, 8, 2), np.uint8)}, ["test_images", "C 1 or 3"]),
        (
            {"val_images": np.zeros((9, 9, 9, 3), np.uint8)},
            ["image shapes differ", "val (9, 9, 3)"],
        ),
        ({"train_labels": np.arange(30) * 0.5}, ["train_labels", "dtype float64"]),
        ({"train_labels": np.zeros((30, 2), np.int64)}, ["train_labels", "shape (30, 2)"]),
        ({"test_labels": np.arange(11)}, ["test_labels has 11 labels for 12 images"]),
        (
            {"test_images": np.zeros((0, 8, 8, 3), np.uint8), "test_labels": np.zeros(0, np.int64)},
            ["split 'test' is empty"],
        ),
    ],
)
def test_npz_bad_input(npz_factory, override, parts):
    path = npz_factory(**override)
    with pytest.raises(DataError) as exc:
        read_npz(path)
    _one_line(exc, str(path), *parts)


def test_npz_label_out_of_range(npz_factory):
    path = npz_factory(class_names=np.array(["a", "b", "c"]), val_labels=np.full(9, 3))
    with pytest.raises(DataError) as exc:
        read_npz(path)
    _one_line(exc, str(path), "val_labels has value 3 outside 0..2", "9 such labels")


def test_npz_negative_label(npz_factory):
    labels = make_arrays(12)[1]
    labels[5] = -1
    with pytest.raises(DataError) as exc:
        read_npz(npz_factory(test_labels=labels))
    _one_line(exc, "test_labels has value -1 outside 0..2")


def test_npz_truncated(npz_factory):
    path = npz_factory()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        read_npz(path)
    _one_line(exc, str(path), "truncated or corrupt")


def test_npz_corrupt_member(npz_factory):
    path = npz_factory()
    data = bytearray(path.read_bytes())
    # Flip bytes inside the first member's compressed data; the central directory stays valid.
    for i in range(200, 260):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as exc:
        read_npz(path)
    _one_line(exc, str(path), "corrupt")


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_text("hello")
    with pytest.raises(DataError) as exc:
        read_npz(path)
    _one_line(exc, str(path), "not a readable .npz")


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError) as exc:
        read_npz(tmp_path / "nope.npz")
    _one_line(exc, "nope.npz", "file not found")


# -------------------------------------------------------------------- folder


def test_folder_with_split_folders(folder_factory):
    root = folder_factory({"Training": {"cat": 4, "dog": 3}, "Testing": {"cat": 2, "dog": 2}})
    raw, has_splits = read_folder(root)
    assert has_splits
    assert set(raw.images) == {"train", "test"}
    assert raw.class_names == ["cat", "dog"]
    assert raw.labels["train"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert raw.images["train"].shape == (7, 8, 8, 3)
    assert raw.files["test"][0] == "cat/img0.png"


def test_folder_without_split_folders_is_all_train(folder_factory):
    raw, has_splits = read_folder(folder_factory({"a": 5, "b": 5}))
    assert not has_splits
    assert list(raw.images) == ["train"] and len(raw.labels["train"]) == 10


def test_folder_greyscale_gives_one_channel(folder_factory):
    raw, _ = read_folder(folder_factory({"a": 2, "b": 2}, mode="L"))
    assert raw.images["train"].shape == (4, 8, 8, 1)


def test_folder_mixed_sizes_resized_to_most_common(folder_factory):
    root = folder_factory({"a": 3, "b": 3})
    Image.new("RGB", (12, 10)).save(root / "a" / "odd.png")
    raw, _ = read_folder(root)
    assert raw.images["train"].shape == (7, 8, 8, 3)
    assert any("resized 1 image" in n and "8x8" in n for n in raw.notes)


def test_folder_explicit_image_size(folder_factory):
    raw, _ = read_folder(folder_factory({"a": 2, "b": 2}), image_size=16)
    assert raw.images["train"].shape == (4, 16, 16, 3)


def test_folder_mixed_sizes_strict_names_the_file(folder_factory):
    root = folder_factory({"a": 3, "b": 3})
    Image.new("RGB", (12, 10)).save(root / "b" / "odd.png")
    with pytest.raises(DataError) as exc:
        read_folder(root, strict_size=True)
    _one_line(exc, str(root / "b" / "odd.png"), "12x10 differs from 8x8")


def test_folder_unreadable_image_names_the_file(folder_factory):
    root = folder_factory({"a": 2, "b": 2})
    bad = root / "a" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError) as exc:
        read_folder(root)
    _one_line(exc, str(bad), "unreadable image")


def test_a_16_bit_image_is_refused_naming_the_file_not_saturated(folder_factory):
    root = folder_factory({"a": 2, "b": 2}, mode="L")
    scan = root / "b" / "scan16.png"
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(scan)
    assert Image.open(scan).mode == "I;16"
    with pytest.raises(DataError) as exc:
        read_folder(root)
    _one_line(exc, str(scan), "I;16 image (more than 8 bits per pixel)")


def test_folder_truncated_image_names_the_file(folder_factory):
    root = folder_factory({"a": 2, "b": 2}, size=(64, 64))
    good = root / "a" / "img0.png"
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        read_folder(root)
    _one_line(exc, str(good), "unreadable image")


def test_folder_empty_class_folder(folder_factory):
    root = folder_factory({"a": 2, "b": 2})
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as exc:
        read_folder(root)
    _one_line(exc, str(root / "c"), "class folder has no images")


def test_folder_single_class_refused(folder_factory):
    root = folder_factory({"a": 2})
    with pytest.raises(DataError) as exc:
        read_folder(root)
    _one_line(exc, "need at least 2")


def test_folder_missing(tmp_path):
    with pytest.raises(DataError) as exc:
        read_folder(tmp_path / "none")
    _one_line(exc, "folder not found")
