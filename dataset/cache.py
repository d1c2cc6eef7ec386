"""The ``data_npy/<dataset>/`` cache that training reads.

Layout of one cache folder::

    train_images.npy  val_images.npy  test_images.npy   uint8 (N, H, W, C)
    train_labels.npy  val_labels.npy  test_labels.npy   int64 (N,)
    files.json                                           original file of each image, if known
    meta.json                                            written last: no meta.json, no cache

A build writes into a hidden temporary folder beside the cache and renames it into place, so an
interrupted build leaves either the previous cache or none, never a half-written one. Builds of
one cache hold a lock (``.<name>.lock`` beside it, see :mod:`dataset.locking`): a second run
started at the same time waits and then reuses what the first built, and the temporary folders
of a killed build are deleted by the next build. The folders and files get the mode the umask
gives a plain ``mkdir`` or ``open`` (0755 and 0644 under the usual 022), as every file the
project writes does. Opening a cache checks each ``.npy`` against ``meta.json`` (header, size,
shape), so a truncated file is refused, and rebuilt by ``prepare``, instead of failing mid-run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset import medmnist
from dataset.errors import DataError
from dataset.leakage import find_duplicates, image_hashes
from dataset.locking import exclusive_lock
from dataset.near_duplicates import (
    DEFAULT_MAX_DISTANCE,
    check_distance,
    duplicate_groups,
    find_near_duplicates,
)
from dataset.sources import (
    EMBEDDED,
    SPLITS,
    RawSplits,
    embedded_sample,
    read_folder,
    read_npz,
)

CACHE_VERSION = 1
DEFAULT_ROOT = Path("data_npy")


@dataclass(frozen=True)
class CacheInfo:
    """A built cache: its folder and the contents of its ``meta.json``."""

    path: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def channels(self) -> int:
        return int(self.meta["image_shape"][2])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_shape"][0])

    @property
    def mean(self) -> list[float]:
        return list(self.meta["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.meta["std"])

    def counts(self, split: str) -> list[int]:
        """Images per class in ``split``."""
        return list(self.meta["counts"][split])

    def rows(self, split: str) -> np.ndarray | None:
        """Rows of the split's ``.npy`` files in use: ``None`` for all of them.

        A class or fraction subset (:class:`dataset.subset.CacheSubset`) returns its index.
        """
        return None

    def labels(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}_labels.npy")

    def images(self, split: str) -> np.ndarray:
        """The split's images, memory-mapped read-only: ``(N, H, W, C)`` uint8."""
        return np.load(self.path / f"{split}_images.npy", mmap_mode="r")


# ----------------------------------------------------------------- small helpers


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held out) with ``fraction`` of every class held out.

    Args:
        labels: ``(N,)`` class of each item.
        fraction: share held out, in (0, 1).
        seed: seed of the permutation.
        groups: optional ``(N,)`` group id of each item; a group goes wholly to one side, so
            copies of one image never straddle the split. Its class is its first member's.

    The groups of each class are visited in a seeded random order, and each one is held out
    if that brings the held-out images closer to ``round(fraction * n)`` of the class's ``n``,
    so a few large groups do not skew the share (without groups this holds out the first
    ``round(fraction * n)`` items of the order). Each class with at least two groups gives at
    least one to the held-out part, so small classes still appear there, and keeps at least
    one. Both index arrays are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    if groups is None:
        groups = np.arange(len(labels))
    _, first, member_of = np.unique(groups, return_index=True, return_inverse=True)
    group_label = labels[first]
    group_size = np.bincount(member_of.ravel())
    rng = np.random.default_rng(seed)
    held_groups = []
    for c in np.unique(group_label):
        g = rng.permutation(np.flatnonzero(group_label == c))
        held_groups.append(g[_fill(group_size[g].tolist(), round(group_size[g].sum() * fraction))])
    held = (
        np.isin(member_of, np.concatenate(held_groups))
        if held_groups
        else np.zeros(len(labels), bool)
    )
    return np.flatnonzero(~held), np.flatnonzero(held)


def _fill(sizes: list[int], target: int) -> np.ndarray:
    """Which of the groups, visited in order, to take so their sizes sum close to ``target``."""
    take = np.zeros(len(sizes), dtype=bool)
    count = 0
    for i, size in enumerate(sizes):
        if abs(count + size - target) < abs(count - target):
            take[i] = True
            count += size
    if len(sizes) >= 2 and not take.any():
        take[0] = True
    if len(sizes) >= 2 and take.all():
        take[-1] = False
    return take


def same_statistics(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two per-channel means (or stds) normalise alike: the same length and equal to
    float precision (a statistic recomputed or stored through JSON may differ in its last bits)."""
    return len(a) == len(b) and all(
        math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9)
        for x, y in zip(a, b, strict=True)
    )


def channel_stats(
    images: np.ndarray, chunk: int = 8192, rows: np.ndarray | None = None
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 ``(N, H, W, C)`` images on the 0..1 scale.

    ``rows`` restricts it to those images (read ``chunk`` at a time, so a memory map is never
    read whole); ``None`` takes every image.
    """
    c = images.shape[-1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    count = 0
    n = len(images) if rows is None else len(rows)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        block = np.asarray(images[part if rows is None else rows[part]], dtype=np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += (block**2).sum(axis=(0, 1, 2))
        count += block.shape[0] * block.shape[1] * block.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _folder_listing_sha256(root: Path) -> str:
    # Names, sizes and modification times: a changed, added or removed file changes the hash.
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------- reading caches


class _DamagedCache(DataError):
    """A cache file that was written but no longer matches ``meta.json``; ``prepare`` rebuilds it.

    Kept apart from the other refusals so that ``prepare`` can say why it rebuilds: a rebuild
    after damage is otherwise indistinguishable from reuse, apart from the time it takes.
    """

    def __init__(self, source: Path, damage: str, remedy: str = "rebuild it with --rebuild"):
        self.damage = damage
        super().__init__(source, f"{damage}; {remedy}")


def load_cache(path: str | Path) -> CacheInfo:
    """Open a built cache folder; a folder without a complete ``meta.json`` is refused."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            path,
            "no cache here (meta.json missing); build it with: python -m dataset prepare SOURCE",
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(meta_path, f"unreadable cache metadata: {exc}") from exc
    if meta.get("version") != CACHE_VERSION:
        raise DataError(
            meta_path, f"cache version {meta.get('version')} is not {CACHE_VERSION}; rebuild it"
        )
    for split in SPLITS:
        for kind in ("images", "labels"):
            if not (path / f"{split}_{kind}.npy").is_file():
                raise _DamagedCache(
                    path, f"cache file {split}_{kind}.npy is missing", remedy="rebuild it"
                )
    for split in SPLITS:
        _check_array_file(path, meta, split)
    return CacheInfo(path, meta)


def _check_array_file(path: Path, meta: dict, split: str) -> None:
    """Refuse a split whose ``.npy`` files are truncated or disagree with ``meta.json``.

    Mapping a file reads only its header and checks the data fits, so this costs no pixel
    reads; a truncated file would otherwise pass here and fail at the first batch.
    """
    try:
        n = sum(meta["counts"][split])
        expected = {
            "images": ((n, *meta["image_shape"]), np.uint8),
            "labels": ((n,), np.int64),
        }
    except (KeyError, TypeError) as exc:
        raise _DamagedCache(
            path / "meta.json", f"cache metadata lacks {exc}", remedy="rebuild it"
        ) from exc
    if n == 0:
        # Built before empty splits were refused; a rebuild refuses it with the reason.
        raise DataError(path, f"split {split!r} of the cache is empty; rebuild it with --rebuild")
    for kind, (shape, dtype) in expected.items():
        file = path / f"{split}_{kind}.npy"
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise _DamagedCache(file, f"cache file is truncated or damaged ({exc})") from exc
        if arr.shape != tuple(shape) or arr.dtype != dtype:
            raise _DamagedCache(
                file,
                f"cache file holds {arr.dtype} {arr.shape}, meta.json says {np.dtype(dtype)} "
                f"{tuple(shape)}",
            )


# ----------------------------------------------------------------- building caches


@dataclass(frozen=True)
class _Source:
    kind: str  # "medmnist" | "npz" | "folder"
    path: Path
    name: str
    url: str | None = None
    md5: str | None = None
    class_names: tuple[str, ...] | None = None


def _resolve(source: str | Path, root: Path, progress: bool) -> _Source:
    p = Path(source)
    if p.is_dir():
        return _Source("folder", p, p.resolve().name)
    if p.suffix.lower() == ".npz" or p.is_file():
        if not p.is_file():
            raise DataError(p, "file not found")
        return _Source("npz", p, p.stem)
    sample = embedded_sample(source)
    if sample is not None:
        return _Source("npz", sample.path, sample.name)
    parsed = medmnist.parse_name(str(source))
    if parsed is None:
        raise DataError(
            source,
            "not a folder, an .npz file or a MedMNIST name (one of: "
            + ", ".join(sorted(medmnist.MEDMNIST))
            + ", optionally with _64, _128 or _224), nor an embedded sample ("
            + ", ".join(EMBEDDED)
            + ")",
        )
    flag, size = parsed
    info = medmnist.require_single_label(flag)
    path = medmnist.fetch(flag, size, root, progress=progress)
    return _Source(
        "medmnist", path, f"{flag}_{size}", info.urls[size], info.md5[size], info.class_names
    )


def _source_checksum(src: _Source, old_meta: dict | None) -> dict:
    """Checksum of the source; skips re-hashing a file whose size and mtime are unchanged."""
    if src.kind == "folder":
        return {"listing_sha256": _folder_listing_sha256(src.path)}
    st = src.path.stat()
    stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    old = (old_meta or {}).get("source", {})
    if (
        old.get("path") == str(src.path.resolve())
        and old.get("stat") == stat
        and "sha256" in old.get("checksum", {})
    ):
        digest = old["checksum"]["sha256"]
    else:
        try:
            digest = file_sha256(src.path)
        except OSError as exc:
            raise DataError(src.path, f"cannot read the file: {exc.strerror or exc}") from exc
    checksum = {"sha256": digest}
    if src.md5:
        checksum["md5"] = src.md5
    return {"stat": stat, **checksum}


def _fingerprint(checksum: dict, params: dict) -> str:
    blob = json.dumps(
        {
            "checksum": {k: v for k, v in checksum.items() if k != "stat"},
            "params": params,
            "version": CACHE_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(
    source: str | Path,
    root: str | Path = DEFAULT_ROOT,
    *,
    name: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
    strict_size: bool = False,
    drop_leaked_test: bool = False,
    near_distance: int = DEFAULT_MAX_DISTANCE,
    rebuild: bool = False,
    progress: bool = True,
) -> tuple[CacheInfo, bool]:
    """Build (or reuse) the cache of ``source`` under ``root/<name>/``.

    Args:
        source: a MedMNIST name (``bloodmnist``, ``bloodmnist_64``), an ``.npz`` path or an
            image folder.
        root: the cache root, ``data_npy/`` by default.
        name: the cache folder's name; by default the file or folder name, or ``flag_size``.
        val_fraction: the share of train carved out, stratified, when the source has no val.
        test_fraction: the same for test, for a folder without split folders only.
        seed: the seed of those carved splits (recorded in ``meta.json``).
        image_size / strict_size: for folders, see :func:`dataset.sources.read_folder`.
        drop_leaked_test: drop test images whose exact pixels also occur in train or val.
        near_distance: the Hamming distance (of 256 bits) within which two images count as
            near duplicates (:mod:`dataset.near_duplicates`), for the report and for carving,
            which keeps each group of copies on one side; -1 turns the check off.
        rebuild: build even if an up-to-date cache exists.

    Returns:
        The cache, and whether it was (re)built now. A cache is reused only if its source
        checksum and these parameters are unchanged.

    Raises:
        DataError: bad input, in one line, with nothing written: an unreadable source, labels
            that break the class rule of :func:`dataset.sources.check_classes`, images under
            1x1 pixel, a split that is empty (as read, after carving, or after dropping leaked
            test images), or a cache root that cannot be written.
    """
    for label, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 0.5:
            raise DataError(None, f"{label} must be in (0, 0.5), got {frac}")
    if image_size is not None and image_size < 1:
        raise DataError(None, f"image_size must be an integer >= 1, got {image_size}")
    check_distance(near_distance)
    root = Path(root)
    with _writes_under(root):
        root.mkdir(parents=True, exist_ok=True)
        src = _resolve(source, root, progress)
    name = name or src.name
    out = root / name
    old_meta = _try_meta(out)
    params = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "image_size": image_size,
        "strict_size": strict_size,
        "drop_leaked_test": drop_leaked_test,
        # Part of the fingerprint: it decides which images a carved split keeps together.
        "near_distance": near_distance,
    }
    checksum = _source_checksum(src, old_meta)
    fingerprint = _fingerprint(checksum, params)
    if not rebuild:
        reused = _reusable(out, old_meta, fingerprint)
        if reused is not None:
            return reused, False
    with _writes_under(root), exclusive_lock(root / f".{name}.lock", f"building the cache {out}"):
        # Another run may have built it while this one waited for the lock.
        reused = None if rebuild else _reusable(out, _try_meta(out), fingerprint, say=True)
        if reused is not None:
            return reused, False
        _remove_leftovers(out)
        _build(src, name, out, params, checksum, fingerprint, drop_leaked_test)
    return load_cache(out), True


@contextmanager
def _writes_under(root: Path) -> Iterator[None]:
    """Turn a refused write inside the cache root into one line that names the root."""
    try:
        yield
    except PermissionError as exc:
        where = Path(exc.filename) if exc.filename else None
        if where is None or not where.resolve().is_relative_to(root.resolve()):
            raise
        # Named for both front ends: only `python -m dataset` has --root; training sets it.
        raise DataError(
            root,
            f"cannot write the cache here ({exc.strerror}: {where}); pick a writable cache root: "
            "--root DIR for python -m dataset, --set data.root=DIR for training",
        ) from exc


def _reusable(
    out: Path, meta: dict | None, fingerprint: str, *, say: bool = False
) -> CacheInfo | None:
    """The cache at ``out`` if it was built from this source with these parameters and is whole.

    ``say``: print one line to stderr when the cache is damaged (a truncated file), since the
    rebuild that follows would otherwise look like a slow reuse. Only the check made under the
    build lock says it, so the process that rebuilds says it once.
    """
    if not meta or meta.get("fingerprint") != fingerprint:
        return None
    try:
        return load_cache(out)
    except _DamagedCache as exc:
        if say:
            # The file at fault, when the message does not name it already.
            where = "" if Path(exc.source) == out else f"{Path(exc.source).name}: "
            print(
                f"the cache {out} is damaged, so it is rebuilt ({where}{exc.damage})",
                file=sys.stderr,
            )
        return None
    except DataError:
        return None  # e.g. an empty split of an old cache: the rebuild refuses it with the reason


def _remove_leftovers(out: Path) -> None:
    """Delete the temporary folders of builds that were killed (``SIGKILL``, power loss).

    Called with the build lock held, so no live build owns them.
    """
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for folder in out.parent.glob(pattern):
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)


def _build(src, name, out, params, checksum, fingerprint, drop_leaked_test) -> None:
    raw, split_info = _read_source(src, params)
    leakage = find_duplicates(raw.images, raw.labels)
    if drop_leaked_test:
        _drop_leaked_test(raw, leakage, src.path)
        leakage = find_duplicates(raw.images, raw.labels)
    meta = _make_meta(name, src, raw, checksum, params, fingerprint, split_info, leakage.summary())
    meta["near_duplicates"] = _near_summary(raw, params["near_distance"])
    _write_atomically(raw, meta, out)


def _near_summary(raw: RawSplits, near_distance: int) -> dict:
    """The near-duplicate counts for ``meta.json``, or why there are none."""
    if near_distance < 0:
        return {"skipped": "turned off (near_distance -1)"}
    report = find_near_duplicates(raw.images, raw.labels, near_distance, max_examples=0)
    if report is None:
        return {"skipped": "images under 16x16 pixels are too small for the hash"}
    return report.summary()


def _try_meta(out: Path) -> dict | None:
    try:
        return json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _read_source(src: _Source, params: dict) -> tuple[RawSplits, dict]:
    seed = params["seed"]
    split_info = {"seed": seed, "val": "source", "test": "source"}
    if src.kind == "folder":
        raw, has_splits = read_folder(
            src.path, image_size=params["image_size"], strict_size=params["strict_size"]
        )
        if not has_splits:
            _carve(raw, "train", "test", params["test_fraction"], seed, params["near_distance"])
            split_info.update(test="carved from all images", test_fraction=params["test_fraction"])
        if "test" not in raw.images:
            raise DataError(src.path, "split 'test' has no images (add a test/ or Testing/ folder)")
    else:
        raw = read_npz(src.path, list(src.class_names) if src.class_names else None)
    if "val" not in raw.images:
        # Seeded +1 so that a folder's test and val carving draw different permutations.
        _carve(raw, "train", "val", params["val_fraction"], seed + 1, params["near_distance"])
        split_info.update(val="carved from train", val_fraction=params["val_fraction"])
    for split in ("test", "val"):
        if len(raw.labels[split]) == 0:
            raise DataError(src.path, _empty_carve(split, split_info, raw.labels["train"]))
    return raw, split_info


def _empty_carve(split: str, split_info: dict, train_labels: np.ndarray) -> str:
    # Only a carved split can come out empty: a source's own empty split is refused on reading.
    fraction = split_info[f"{split}_fraction"]
    return (
        f"carving split {split!r} (fraction {fraction}) left it empty: each class needs at "
        f"least 2 distinct images (copies count as one) to give one away, and train has "
        f"{len(train_labels)} image(s) in {len(np.unique(train_labels))} class(es); "
        f"add images or give a {split} split"
    )


def _carve(
    raw: RawSplits, src: str, dst: str, fraction: float, seed: int, near_distance: int
) -> None:
    # Copies of one image (exact, and near within near_distance) stay together, so the carved
    # split does not leak into the other. The other splits join the search: two images that
    # are each a near copy of one test image belong to one group.
    parts = [raw.images[src]] + [a for s, a in raw.images.items() if s != src]
    digests = [d for a in parts for d in image_hashes(a)]
    groups = duplicate_groups(parts, digests, near_distance)[: len(raw.images[src])]
    keep, held = stratified_split(raw.labels[src], fraction, seed, groups=groups)
    files = raw.files.get(src)
    raw.images[dst], raw.labels[dst] = raw.images[src][held], raw.labels[src][held]
    raw.images[src], raw.labels[src] = raw.images[src][keep], raw.labels[src][keep]
    if files is not None:
        raw.files[dst] = [files[i] for i in held]
        raw.files[src] = [files[i] for i in keep]


def _drop_leaked_test(raw: RawSplits, leakage, source: Path) -> None:
    leaked = set(leakage.leaked_indices.get("test", []))
    if not leaked:
        return
    if len(leaked) == len(raw.labels["test"]):
        raise DataError(
            source,
            f"--drop-leaked-test would leave split 'test' empty: all {len(leaked)} test images "
            "also occur in train or val",
        )
    keep = np.array([i for i in range(len(raw.labels["test"])) if i not in leaked], dtype=np.int64)
    raw.images["test"], raw.labels["test"] = raw.images["test"][keep], raw.labels["test"][keep]
    if "test" in raw.files:
        raw.files["test"] = [raw.files["test"][i] for i in keep]
    raw.notes.append(f"dropped {len(leaked)} test image(s) whose pixels also occur in train or val")


def _make_meta(name, src, raw, checksum, params, fingerprint, split_info, leakage) -> dict:
    n = len(raw.class_names)
    mean, std = channel_stats(raw.images["train"])
    source = {
        "kind": src.kind,
        "path": str(src.path.resolve()),
        "checksum": {k: v for k, v in checksum.items() if k != "stat"},
    }
    if "stat" in checksum:
        source["stat"] = checksum["stat"]
    if src.url:
        source["url"] = src.url
    return {
        "version": CACHE_VERSION,
        "name": name,
        "class_names": raw.class_names,
        "image_shape": list(raw.images["train"].shape[1:]),
        "counts": {s: np.bincount(raw.labels[s], minlength=n).tolist() for s in SPLITS},
        "mean": mean,
        "std": std,
        "source": source,
        "params": params,
        "split": split_info,
        "fingerprint": fingerprint,
        "leakage": leakage,
        "notes": raw.notes,
    }


def _write_atomically(raw: RawSplits, meta: dict, out: Path) -> None:
    tmp = _new_dir(out, "tmp")
    try:
        for split in SPLITS:
            np.save(tmp / f"{split}_images.npy", np.ascontiguousarray(raw.images[split]))
            np.save(tmp / f"{split}_labels.npy", raw.labels[split].astype(np.int64))
        if raw.files:
            (tmp / "files.json").write_text(json.dumps(raw.files))
        # meta.json last: its presence is what makes the folder a loadable cache.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _fsync_dir(tmp)
        if out.exists():
            trash = _new_dir(out, "old")
            os.replace(out, trash / "cache")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _new_dir(out: Path, kind: str) -> Path:
    """A fresh hidden folder beside ``out``, ``.<name>.<kind>-*``, with the umask's mode.

    Not ``tempfile.mkdtemp``, which makes the folder 0700: the cache is renamed from it, and
    like every file the project writes it gets the mode a plain ``mkdir`` would (0755 under
    the usual umask 022), so others who may read the data may read the cache.
    """
    while True:
        path = out.parent / f".{out.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _fsync_dir(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
