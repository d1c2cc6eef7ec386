"""Near duplicates: the dihedral hash, the multi-index search, groups, the report, the carve."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

import dataset.cache as cache_mod
from dataset.cache import prepare, stratified_split
from dataset.cli import main
from dataset.near_duplicates import (
    DEFAULT_MAX_DISTANCE,
    HASH_BITS,
    TRANSFORMS,
    connected_groups,
    dct_hashes,
    duplicate_groups,
    find_near_duplicates,
    hash_distance,
    near_pairs,
)
from tests.conftest import shared_file, shared_folder

# The 8 symmetries of the square, in the order of TRANSFORMS, on (H, W, C) arrays.
DIHEDRAL = [
    lambda x: x,
    lambda x: x[:, ::-1],
    lambda x: x[::-1],
    lambda x: x[::-1, ::-1],
    lambda x: x.transpose(1, 0, 2),
    lambda x: np.rot90(x, 1),
    lambda x: np.rot90(x, -1),
    lambda x: x[::-1, ::-1].transpose(1, 0, 2),
]


def objects(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """``n`` uint8 ``(size, size, 3)`` images: a smooth textured ellipse, off centre, on a flat
    background, like a cell on a slide or a brain on black."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        texture = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        ry, rx = rng.uniform(0.15, 0.3, 2) * size
        inside = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)[..., None]
        out.append(np.where(inside, texture, rng.integers(0, 256, 3)).astype(np.uint8))
    return np.stack(out)


def jpeg(img: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def shifted(img: np.ndarray, pixels: int) -> np.ndarray:
    """The content moved up and left by ``pixels``, the frame's edge repeated to fill."""
    return np.pad(img[pixels:, pixels:], ((0, pixels), (0, pixels), (0, 0)), mode="edge")


COPIES = {
    "horizontal flip": lambda x: x[:, ::-1],
    "rotation 90": lambda x: np.rot90(x),
    "jpeg q75": jpeg,
    "rotation 270 + jpeg": lambda x: jpeg(np.ascontiguousarray(np.rot90(x, -1))),
    "shift 2 px": lambda x: shifted(x, 2),
    "brighter": lambda x: np.clip(x.astype(int) + 20, 0, 255).astype(np.uint8),
    "colour shift": lambda x: np.clip(x * np.array([1.1, 0.95, 1.0]), 0, 255).astype(np.uint8),
}


# ----------------------------------------------------------------------------- hash


@pytest.mark.parametrize("g", range(8), ids=TRANSFORMS)
def test_each_hash_variant_is_the_hash_of_the_transformed_image(g):
    img = objects(1)[0]
    direct = dct_hashes(np.ascontiguousarray(DIHEDRAL[g](img))[None])[0, 0]
    variants = dct_hashes(img[None])[0]
    assert hash_distance(direct, variants[g]) <= 2  # equal but for float rounding
    if g:
        assert hash_distance(direct, variants[0]) > 40  # the image is not symmetric


@pytest.mark.parametrize("kind", COPIES)
def test_a_copy_is_found_and_distinct_images_are_not(kind):
    images = objects(40)
    copy = np.ascontiguousarray(COPIES[kind](images[7]))
    pairs = near_pairs(dct_hashes(np.concatenate([images, copy[None]])), DEFAULT_MAX_DISTANCE)
    assert pairs[:, :2].tolist() == [[7, 40]]
    assert pairs[0, 2] <= DEFAULT_MAX_DISTANCE


def test_the_transform_maps_image_a_onto_image_b():
    img = objects(1)[0]
    pairs = near_pairs(dct_hashes(np.stack([img, np.rot90(img, 1), np.rot90(img, -1)])), 0)
    found = {(int(i), int(j)): TRANSFORMS[t] for i, j, _, t in pairs}
    assert found == {(0, 1): "rotation 90", (0, 2): "rotation 270", (1, 2): "rotation 180"}


def test_distance_without_numpy_bitwise_count(monkeypatch):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2**63, size=(2, 5, 4), dtype=np.uint64)
    expected = [
        sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(*row, strict=True))
        for row in zip(a, b, strict=True)
    ]
    assert hash_distance(a, b).tolist() == expected
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2.0
    assert hash_distance(a, b).tolist() == expected


def brute_force(hashes: np.ndarray, max_distance: int) -> dict[tuple[int, int], int]:
    """Every pair's distance, the minimum over transforms of either image."""
    out = {}
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            d = min(
                int(hash_distance(hashes[i, 0], hashes[j]).min()),
                int(hash_distance(hashes[j, 0], hashes[i]).min()),
            )
            if d <= max_distance:
                out[(i, j)] = d
    return out


@pytest.mark.parametrize("max_distance", [0, 5, 20, 32])
def test_multi_index_search_finds_exactly_what_brute_force_finds(max_distance):
    rng = np.random.default_rng(max_distance)
    n = 120
    bits = rng.integers(0, 2, size=(n, 8, HASH_BITS), dtype=np.uint8)
    # Plant pairs at distances around the threshold: a variant of i with k bits flipped.
    for k, (i, j) in enumerate(rng.choice(n, size=(40, 2), replace=False).tolist()):
        g, flips = k % 8, rng.choice(HASH_BITS, size=k, replace=False)
        bits[j, 0] = bits[i, g]
        bits[j, 0, flips] ^= 1
    hashes = np.packbits(bits, axis=-1, bitorder="little").view(np.uint64)
    pairs = near_pairs(hashes, max_distance)
    assert {(int(i), int(j)): int(d) for i, j, d, _ in pairs} == brute_force(hashes, max_distance)


def test_connected_groups_chain_pairs_into_components():
    pairs = np.array([[5, 1], [1, 3], [7, 8], [3, 5], [8, 9]])
    groups = connected_groups(10, pairs)
    assert groups.tolist() == [0, 1, 2, 1, 4, 1, 6, 7, 7, 7]
    assert connected_groups(3, np.zeros((0, 2), np.int64)).tolist() == [0, 1, 2]


def test_duplicate_groups_join_exact_and_near_copies():
    images = objects(6)
    images[4] = images[1]  # exact
    images[5] = images[2][::-1]  # near: flipped
    digests = [bytes(img.tobytes()) for img in images]
    parts = [images[:4], images[4:]]  # one sequence in two arrays
    assert duplicate_groups(parts, digests, DEFAULT_MAX_DISTANCE).tolist() == [0, 1, 2, 3, 1, 2]
    assert duplicate_groups(parts, digests, -1).tolist() == [0, 1, 2, 3, 1, 5]
    small = [images[:, :8, :8]]  # too small to hash: exact copies only
    assert duplicate_groups(small, digests, DEFAULT_MAX_DISTANCE).tolist() == [0, 1, 2, 3, 1, 5]


def test_stratified_split_holds_out_the_fraction_of_images_despite_a_large_group():
    labels = np.zeros(150, np.int64)
    groups = np.r_[np.zeros(50, np.int64), np.arange(1, 101)]  # one group of 50, 100 singles
    for seed in range(20):
        keep, held = stratified_split(labels, 0.1, seed, groups=groups)
        assert len(held) == 15 and not np.isin(np.arange(50), held).any()
        assert sorted(np.r_[keep, held].tolist()) == list(range(150))


def test_stratified_split_without_groups_is_unchanged():
    labels = np.arange(103) % 4
    for seed in range(5):
        _, held = stratified_split(labels, 0.1, seed)
        # The first round(0.1 * n) of each class's seeded permutation, as before groups counted.
        rng = np.random.default_rng(seed)
        expected = [rng.permutation(np.flatnonzero(labels == c)) for c in range(4)]
        expected = [p[: round(0.1 * len(p))] for p in expected]
        assert held.tolist() == sorted(np.concatenate(expected).tolist())


# --------------------------------------------------------------------------- report


def test_report_counts_groups_within_and_across_splits():
    train, val, test = objects(20, seed=1), objects(8, seed=2), objects(10, seed=3)
    train[1] = train[0][:, ::-1]  # within train
    test[0] = jpeg(np.ascontiguousarray(np.rot90(train[5])))  # across, not byte-identical
    test[1] = train[6]  # across, byte-identical: the exact check's
    val[2] = shifted(train[7], 2)  # across train->val ...
    test[2] = val[2][::-1]  # ... and the same group reaches test
    labels = {
        s: np.zeros(len(a), np.int64) for s, a in (("train", train), ("val", val), ("test", test))
    }
    labels["test"][0] = 1  # a copy with another label
    images = {"train": train, "val": val, "test": test}
    report = find_near_duplicates(images, labels)
    assert report.groups == 4 and report.images == 9 and report.largest == 3
    assert report.within == {"train": 1, "val": 0, "test": 0}
    assert report.across == {"train->val": 1, "train->test": 3, "val->test": 1}
    assert report.across_beyond_exact == {"train->val": 1, "train->test": 2, "val->test": 1}
    assert report.leaked == {"val": 1, "test": 3}
    assert report.label_conflicts == 1
    # Across splits first, byte-identical pairs left to the exact check.
    first = report.closest[0]
    assert first.a[0] != first.b[0]
    assert all((p.a[0], p.a[1], p.b[0], p.b[1]) != ("train", 6, "test", 1) for p in report.closest)
    assert ("train", 0, 0) in [p.a for p in report.closest]  # within-split pairs come after


def test_report_is_none_for_images_too_small_to_hash():
    images = {"train": np.zeros((4, 8, 8, 1), np.uint8)}
    assert find_near_duplicates(images, {"train": np.zeros(4, np.int64)}) is None


# ----------------------------------------------------------------------------- carve


def write_npz_with_copies(path, seed: int = 0):
    """Train with 30 groups of 4 dihedral copies plus 60 single images, 3 classes; no val."""
    rng = np.random.default_rng(seed)
    bases = objects(90, size=32, seed=seed)
    images, labels, group = [], [], []
    for k, img in enumerate(bases):
        copies = [DIHEDRAL[g](img) for g in rng.choice(8, 4, replace=False)] if k < 30 else [img]
        images += [np.ascontiguousarray(c) for c in copies]
        labels += [k % 3] * len(copies)
        group += [k] * len(copies)
    np.savez(
        path,
        train_images=np.stack(images),
        train_labels=np.array(labels),
        test_images=objects(9, size=32, seed=seed + 100),
        test_labels=np.arange(9) % 3,
    )
    return np.array(group)


def carved_groups(cache, group) -> tuple[set, set]:
    """The groups of the carved train and val images, recovered by matching pixels."""
    by_pixels = {}
    for img, g in zip(np.load(cache.path.parent / "src.npz")["train_images"], group, strict=True):
        by_pixels[img.tobytes()] = int(g)
    return tuple({by_pixels[img.tobytes()] for img in cache.images(s)} for s in ("train", "val"))


def test_carve_keeps_each_group_of_copies_on_one_side(tmp_path):
    group = write_npz_with_copies(tmp_path / "src.npz")
    cache, _ = prepare(tmp_path / "src.npz", tmp_path, val_fraction=0.2, seed=0)
    train, val = carved_groups(cache, group)
    assert not train & val
    assert cache.meta["near_duplicates"]["within"]["val"] > 0  # some groups went to val
    # Stratified as before: each class gives about a fifth of its 60 images to val.
    assert all(abs(n - 12) <= 1 for n in np.bincount(cache.labels("val")))


def test_carve_searches_the_other_splits_too(tmp_path, monkeypatch):
    # Two train images that are each a near copy of one test image belong to one group, so
    # the test split must be part of the search that groups train for the carve.
    write_npz_with_copies(tmp_path / "src.npz")
    seen = []
    real = cache_mod.duplicate_groups

    def spy(parts, digests, max_distance):
        seen.append([len(p) for p in parts])
        return real(parts, digests, max_distance)

    monkeypatch.setattr(cache_mod, "duplicate_groups", spy)
    prepare(tmp_path / "src.npz", tmp_path)
    assert seen == [[180, 9]]  # train (30 x 4 + 60), then test


def test_without_the_near_check_copies_straddle_the_carve(tmp_path):
    group = write_npz_with_copies(tmp_path / "src.npz")
    cache, _ = prepare(tmp_path / "src.npz", tmp_path, val_fraction=0.2, seed=0, near_distance=-1)
    train, val = carved_groups(cache, group)
    assert train & val  # what the group-aware carve prevents
    assert cache.meta["near_duplicates"] == {"skipped": "turned off (near_distance -1)"}


def test_near_distance_is_part_of_the_cache_fingerprint(tmp_path):
    write_npz_with_copies(tmp_path / "src.npz")
    first, built = prepare(tmp_path / "src.npz", tmp_path)
    assert built and first.meta["params"]["near_distance"] == DEFAULT_MAX_DISTANCE
    assert not prepare(tmp_path / "src.npz", tmp_path)[1]
    # Another distance can carve another split: the cache is rebuilt, not reused.
    assert prepare(tmp_path / "src.npz", tmp_path, near_distance=4)[1]


@pytest.mark.parametrize("bad", [-2, 33])
def test_near_distance_out_of_range_is_one_clear_error(tmp_path, bad):
    write_npz_with_copies(tmp_path / "src.npz")
    with pytest.raises(ValueError, match=rf"near_distance must be in -1\.\.32 .*got {bad}"):
        prepare(tmp_path / "src.npz", tmp_path, near_distance=bad)


# ------------------------------------------------------------------------------- CLI


@pytest.fixture
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no wrapping inside the lines the tests look for


def test_prepare_prints_one_line_per_kind_and_check_draws_pairs(tmp_path, capsys, wide_console):
    train, test = objects(30, seed=1), objects(10, seed=2)
    train[3] = train[2]  # exact, within train
    test[4] = train[8][:, ::-1]  # near, across
    np.savez(
        tmp_path / "tiny.npz",
        train_images=train,
        train_labels=np.r_[0, 1, 2, 2, np.arange(26) % 3],
        val_images=objects(6, seed=3),
        val_labels=np.arange(6) % 3,
        test_images=test,
        test_labels=np.arange(10) % 3,
    )
    assert main(["prepare", str(tmp_path / "tiny.npz"), "--root", str(tmp_path / "c")]) == 0
    lines = capsys.readouterr().out.splitlines()
    exact = [line for line in lines if line.startswith("exact duplicates")]
    near = [line for line in lines if line.startswith("near duplicates")]
    within = "within splits: train 1, val 0, test 0"
    assert exact == [f"exact duplicates: {within}; across splits: none; label conflicts: 0"]
    assert len(near) == 1
    assert "2 group(s) of 4 images" in near[0]
    assert "within splits: train 1; across splits: train->test 1 (1 not byte-identical)" in near[0]

    png = tmp_path / "pairs.png"
    argv = ["check", "tiny", "--root", str(tmp_path / "c"), "--pairs-png", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "closest near-duplicate pairs" in out and "horizontal flip" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".pairs.png*"))  # the temporary file is gone
    assert main(["check", "tiny", "--root", str(tmp_path / "c"), "--near-distance", "99"]) == 2
    assert "near_distance must be in -1..32 (-1: off), got 99" in capsys.readouterr().err


def test_a_cache_built_before_the_check_is_reported_and_rebuilt(tmp_path, capsys, wide_console):
    write_npz_with_copies(tmp_path / "src.npz")
    cache, _ = prepare(tmp_path / "src.npz", tmp_path / "c")
    # What a cache built before the near-duplicate check looks like.
    meta = json.loads((cache.path / "meta.json").read_text())
    del meta["near_duplicates"], meta["params"]["near_distance"]
    meta["fingerprint"] = cache_mod._fingerprint(meta["source"]["checksum"], meta["params"])
    (cache.path / "meta.json").write_text(json.dumps(meta))
    assert main(["prepare", "src", "--root", str(tmp_path / "c")]) == 0  # by name: as it is
    assert "near duplicates: not checked (cache built before the check" in capsys.readouterr().out
    # From its source, its carve may straddle groups of copies: it is rebuilt.
    again, built = prepare(tmp_path / "src.npz", tmp_path / "c")
    assert built and "groups" in again.meta["near_duplicates"]


# ------------------------------------------------------------------------- real data


def test_real_brain_mri_flipped_copies_leak_into_test():
    d = np.load(shared_file("brain_tumor_mri_64.npz"))
    images = {s: d[f"{s}_images"] for s in ("train", "test")}
    labels = {s: d[f"{s}_labels"] for s in ("train", "test")}
    report = find_near_duplicates(images, labels, max_examples=10_000)
    # The exact check sees 189 distinct test images in train; flipped and re-encoded copies
    # add hundreds of groups it cannot see (figures in docs/near-duplicates.md).
    assert report.across_beyond_exact["train->test"] > 400
    assert report.leaked["test"] > 2 * 216
    files = {s: list(d[f"{s}_files"]) for s in ("train", "test")}
    a = ("train", files["train"].index("glioma/Tr-glTr_0002.jpg"))
    b = ("test", files["test"].index("glioma/Te-gl_0154.jpg"))
    pair = next(p for p in report.closest if (p.a[:2], p.b[:2]) == (a, b))
    assert pair.distance <= 2 and TRANSFORMS[pair.transform] == "horizontal flip"


def test_real_bloodcells_near_copies_stay_within_splits():
    d = np.load(shared_file("bloodcells_pbc_28.npz"))
    splits = ("train", "val", "test")
    report = find_near_duplicates(
        {s: d[f"{s}_images"] for s in splits}, {s: d[f"{s}_labels"] for s in splits}
    )
    assert report.across == {}  # the split kept copies together; near ones too
    names = {(d[f"{p.a[0]}_files"][p.a[1]], d[f"{p.b[0]}_files"][p.b[1]]) for p in report.closest}
    # Two captures of one monocyte, shifted by two pixels: no byte-identical copy.
    assert ("monocyte/MO_231316.jpg", "monocyte/MO_415531.jpg") in names


def test_real_jpeg_folder_subset_prepares_with_classes_and_near_copies(tmp_path, capsys):
    source = shared_folder("bloodcells_pbc_128")
    split_csv = shared_file("bloodcells_pbc_split.csv")
    label_of = {}
    for line in split_csv.read_text().splitlines()[1:]:
        file, label = line.split(",")[:2]
        label_of[file] = int(label)
    # 20 files per class and split (the whole folder takes ~30 s), plus two captures of one
    # monocyte that only the near-duplicate check links.
    subset = tmp_path / "pbc_subset"
    pair = {"MO_231316.jpg", "MO_415531.jpg"}
    for split_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files = sorted(class_dir.iterdir())
            keep = files[:20] + [f for f in files[20:] if f.name in pair]
            (subset / split_dir.name / class_dir.name).mkdir(parents=True)
            for f in keep:
                (subset / split_dir.name / class_dir.name / f.name).symlink_to(f)
    argv = ["prepare", str(subset), "--root", str(tmp_path / "c"), "--image-size", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "near duplicates" in out and "within splits: test 1; across splits: none" in out
    cache = prepare(subset, tmp_path / "c", image_size=64)[0]
    names = ["basophil", "eosinophil", "erythroblast", "ig"]
    assert cache.class_names == names + ["lymphocyte", "monocyte", "neutrophil", "platelet"]
    assert cache.meta["image_shape"] == [64, 64, 3]
    assert cache.counts("train") == [20] * 8 and cache.counts("val") == [20] * 8
    assert cache.counts("test") == [20] * 5 + [22] + [20] * 2
    files = json.loads((cache.path / "files.json").read_text())
    for split in ("train", "val", "test"):
        expected = [label_of[f] for f in files[split]]  # the published label of each file
        assert cache.labels(split).tolist() == expected


def test_check_reads_only_and_draws_into_a_new_folder(tmp_path, capsys, wide_console):
    train, test = objects(30, seed=1), objects(10, seed=2)
    test[4] = train[8][:, ::-1]
    np.savez(
        tmp_path / "tiny.npz",
        train_images=train,
        train_labels=np.arange(30) % 3,
        test_images=test,
        test_labels=np.arange(10) % 3,
    )
    root = tmp_path / "c"
    assert main(["prepare", str(tmp_path / "tiny.npz"), "--root", str(root)]) == 0
    meta = (root / "tiny" / "meta.json").read_text()
    # Another distance for the report must not rebuild the cache (and move the carved val split).
    png = tmp_path / "new" / "deeper" / "pairs.png"
    argv = ["check", str(tmp_path / "tiny.npz"), "--root", str(root), "--near-distance", "5"]
    assert main([*argv, "--pairs-png", str(png)]) == 0
    assert (root / "tiny" / "meta.json").read_text() == meta
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    (tmp_path / "a_file").write_text("")
    assert main([*argv, "--pairs-png", str(tmp_path / "a_file" / "pairs.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write the pairs PNG" in err and len(err.splitlines()) == 1
