"""A class subset and a training fraction of a cache, as an index over it, not a new cache.

Transfer studies train on some of a dataset's classes, or on a share of its training images.
:func:`subset_cache` returns a :class:`CacheSubset`: the same interface as the
:class:`~dataset.cache.CacheInfo` it views (``class_names``, ``num_classes``, ``counts``,
``labels``, ``mean``, ``std``, ``meta``, ``path``, ``name``), restricted to the chosen images and
with the labels renumbered ``0..k-1`` in the order the classes were given. Nothing is written: the
``.npy`` files stay those of the full cache, and :meth:`CacheSubset.rows` says which of their rows
each split uses, so :class:`~dataset.npy_dataset.NpyDataset` reads the subset from the same
memory map.

The training fraction is nested and stratified: each class draws one permutation of its training
images from ``(seed, class index in the cache)`` and keeps its first ``ceil(fraction * n)``. The
permutation does not depend on the fraction or on which other classes are chosen, so a 5%
subset lies inside the 20% subset of the same seed, and every class keeps at least one image.

With ``cv_folds`` k (:mod:`dataset.folds`), train and val are pooled and re-split: val is fold
``cv_fold`` of the pooled images of the chosen classes, train the other folds (then reduced by
the training fraction), test is unchanged. Their rows are then pooled indices (train rows
first, then val rows: :attr:`CacheSubset.pooled`), read by
:class:`~dataset.folds.PooledNpyDataset`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dataset.cache import CacheInfo
from dataset.folds import (
    POOLED_SPLITS,
    PooledImages,
    assign_folds,
    check_folds,
    pooled_groups,
    pooled_labels,
)
from dataset.sources import SPLITS

MIN_SUBSET_CLASSES = 2

# Mixed into the seed so the fraction's permutations are not those of the val carve-out
# (dataset.cache.stratified_split draws from default_rng(seed) itself).
_FRACTION_STREAM = 0x66726163


@dataclass(frozen=True, eq=False)
class CacheSubset(CacheInfo):
    """A view of a cache: some classes, renumbered, and some of the training images.

    ``meta`` is the full cache's with ``class_names`` and ``counts`` replaced by the subset's and
    a ``subset`` entry added (its classes, the full cache's index of each, the fraction and seed).
    The normalisation ``mean`` and ``std`` stay the full cache's, computed on its whole train
    split: a subset run normalises its images as the full run does, so weights move between them
    without a shift in input statistics.

    Args:
        path: the full cache's folder.
        meta: see above; build it with :func:`subset_cache`.
        class_map: the full cache's class index of each subset label, ``(k,)``.
        split_rows: the full cache's row of each image of each split, sorted ascending.
        pooled: the splits whose rows are pooled train+val indices (a cross-validation fold:
            ``("train", "val")``), read with :class:`~dataset.folds.PooledNpyDataset`.
    """

    class_map: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    split_rows: dict[str, np.ndarray] = field(default_factory=dict)
    pooled: tuple[str, ...] = ()

    def rows(self, split: str) -> np.ndarray:
        """Rows of the split's ``.npy`` files that the subset uses, ``(n,)`` int64, ascending;
        for a split in :attr:`pooled`, indices into train followed by val."""
        return self.split_rows[split]

    def labels(self, split: str) -> np.ndarray:
        """The subset's labels of ``split``, renumbered ``0..k-1``: ``(n,)`` int64."""
        source = pooled_labels(self) if split in self.pooled else super().labels(split)
        full = source[self.split_rows[split]]
        return _relabel_table(self.class_map, int(self.meta["subset"]["source_classes"]))[full]

    def images(self, split: str) -> np.ndarray:
        """The subset's images of ``split``, ``(n, H, W, C)`` uint8: a copy, not a memory map."""
        if split in self.pooled:
            return PooledImages(self.path)[self.split_rows[split]]
        return super().images(split)[self.split_rows[split]]


def _relabel_table(class_map: np.ndarray, source_classes: int) -> np.ndarray:
    """Full-cache class index -> subset label, -1 for classes outside the subset."""
    table = np.full(source_classes, -1, dtype=np.int64)
    table[class_map] = np.arange(len(class_map))
    return table


def resolve_classes(class_names: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    """The cache's class index of each name in ``wanted``, in the order given.

    Raises:
        ValueError: with one line: repeated names, fewer than two, or names the cache lacks
            (naming them and the available ones).
    """
    names = [str(n) for n in class_names]
    wanted = [str(n) for n in wanted]
    repeated = sorted({n for n in wanted if wanted.count(n) > 1})
    if repeated:
        raise ValueError(f"classes {repeated} are given more than once; name each class once")
    if len(wanted) < MIN_SUBSET_CLASSES:
        raise ValueError(
            f"classes {wanted} name {len(wanted)} class; a subset needs at least "
            f"{MIN_SUBSET_CLASSES} (or [] for all classes)"
        )
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; available: {', '.join(names)}")
    return np.array([names.index(n) for n in wanted], dtype=np.int64)


def fraction_rows(labels: np.ndarray, classes: Sequence[int], fraction: float, seed: int):
    """Rows of ``labels`` kept by a nested, stratified, seeded ``fraction`` of each class.

    Each class ``c`` of ``classes`` (full-cache indices) keeps the first ``ceil(fraction * n_c)``
    rows of a permutation drawn from ``(seed, c)`` alone (at least one when ``n_c >= 1``).
    Returns the kept rows sorted ascending, ``(m,)`` int64.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train fraction {fraction!r} is invalid; allowed: a number in (0, 1]")
    kept = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if fraction < 1.0:
            rng = np.random.default_rng([_FRACTION_STREAM, int(seed), int(c)])
            # round() first: 0.1 * 30 is 3.0000000000000004 in floats, whose ceil would be 4.
            keep = max(1, math.ceil(round(fraction * len(members), 9)))
            members = rng.permutation(members)[: min(keep, len(members))]
        kept.append(members)
    return np.sort(np.concatenate(kept)).astype(np.int64) if kept else np.zeros(0, np.int64)


def subset_cache(
    cache: CacheInfo,
    classes: Sequence[str] = (),
    train_fraction: float = 1.0,
    seed: int = 0,
    cv_folds: int = 0,
    cv_fold: int = 0,
) -> CacheInfo:
    """``cache`` restricted to ``classes`` (in that label order) and a fraction of train, or
    with ``cv_folds`` its train and val pooled and re-split into folds.

    Args:
        cache: the full cache (a :class:`CacheSubset` is refused: subsets are not stacked).
        classes: class names, at least two; empty keeps every class in the cache's order.
        train_fraction: share of each class's training images kept, in (0, 1]; val and test
            keep all their images of the chosen classes.
        seed: seed of the training fraction's permutations and of the folds.
        cv_folds: 0 (off) or the number of folds k >= 2.
        cv_fold: the validation fold, ``0..cv_folds-1``.

    Returns:
        ``cache`` itself when there is nothing to select (no classes, fraction 1, no folds),
        else a :class:`CacheSubset`.

    Raises:
        ValueError: one line, for unknown, repeated or too few classes, or a bad fraction; for
            folds, starting ``cv fold``: a bad k or fold, or a class with fewer distinct
            images than k.
    """
    if isinstance(cache, CacheSubset):
        raise ValueError("cache is already a subset; select from the full cache")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(
            f"train fraction {train_fraction!r} is invalid; allowed: a number in (0, 1]"
        )
    if cv_folds and not (cv_folds >= 2 and 0 <= cv_fold < cv_folds):
        raise ValueError(
            f"cv folds {cv_folds}, fold {cv_fold} are invalid; allowed: folds >= 2 and a fold "
            f"in 0..{max(cv_folds, 1) - 1}"
        )
    if not classes and train_fraction == 1.0 and not cv_folds:
        return cache
    names = cache.class_names
    class_map = (
        resolve_classes(names, classes) if classes else np.arange(len(names), dtype=np.int64)
    )
    table = _relabel_table(class_map, len(names))
    rows, counts, fold_info = {}, {}, None
    if cv_folds:
        rows, fold_info = _fold_rows(cache, class_map, train_fraction, seed, cv_folds, cv_fold)
    for split in SPLITS:
        full = pooled_labels(cache) if split in rows else cache.labels(split)
        if split in rows:  # a fold's split, already chosen
            pass
        elif split == "train":
            rows[split] = fraction_rows(full, class_map, train_fraction, seed)
        else:
            rows[split] = np.flatnonzero(np.isin(full, class_map)).astype(np.int64)
        relabelled = table[full[rows[split]]]
        counts[split] = np.bincount(relabelled, minlength=len(class_map)).tolist()
    meta = {
        **cache.meta,
        "class_names": [names[i] for i in class_map],
        "counts": counts,
        "subset": {
            "classes": [names[i] for i in class_map],
            "class_index": class_map.tolist(),
            "source_classes": len(names),
            "source_counts": {s: cache.counts(s) for s in SPLITS},
            "train_fraction": train_fraction,
            "seed": seed,
        },
    }
    if fold_info is not None:
        meta["subset"]["cv"] = fold_info
    pooled = POOLED_SPLITS if fold_info is not None else ()
    return CacheSubset(cache.path, meta, class_map=class_map, split_rows=rows, pooled=pooled)


def _fold_rows(
    cache: CacheInfo,
    class_map: np.ndarray,
    train_fraction: float,
    seed: int,
    k: int,
    fold: int,
) -> tuple[dict[str, np.ndarray], dict]:
    """Pooled rows of a fold's train and val splits, and the ``subset.cv`` record.

    The folds are drawn over every class of the cache, so a class subset validates on the same
    images as the full run's fold; the training fraction then reduces the fold's train part.
    """
    labels = pooled_labels(cache)
    groups = pooled_groups(cache)
    check_folds(labels, groups, k, class_map.tolist(), cache.class_names)
    folds = assign_folds(labels, groups, k, seed)
    chosen = np.isin(labels, class_map)
    val = np.flatnonzero(chosen & (folds == fold)).astype(np.int64)
    rest = np.flatnonzero(chosen & (folds != fold)).astype(np.int64)
    train = rest[fraction_rows(labels[rest], class_map, train_fraction, seed)]
    info = {
        "folds": k,
        "fold": fold,
        "pooled": {s: len(CacheInfo.labels(cache, s)) for s in POOLED_SPLITS},
        "groups": int(len(np.unique(groups))),
    }
    return {"train": train, "val": val}, info
