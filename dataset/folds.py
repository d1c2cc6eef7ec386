"""k-fold cross-validation over a cache's pooled train and val splits, as an index over it.

The pooled set is the cache's train split followed by its val split: pooled index ``i`` is
train row ``i`` for ``i < n_train``, else val row ``i - n_train``. :func:`assign_folds` gives
each pooled image a fold, stratified by class and group-aware: the groups are those the cache
build itself uses to keep copies on one side of a carved split
(:func:`dataset.near_duplicates.duplicate_groups`: exact pixel copies joined with near
duplicates within the cache's ``near_distance``), so no image has a copy in another fold.
The groups are formed again at each run start: about a second at these datasets' sizes
(docs/studies.md has the figures), cheaper than keeping them in sync with a stored copy.

:class:`PooledImages` reads a pooled index from the two memory-mapped files, and
:class:`PooledNpyDataset` is :class:`~dataset.npy_dataset.NpyDataset` over it, so a fold is
read from the same ``.npy`` files as every other run (no cache is written).

Public API:
    POOLED_SPLITS, pooled_labels, pooled_groups, assign_folds, check_folds, PooledImages,
    PooledNpyDataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataset.cache import CacheInfo
from dataset.leakage import image_hashes
from dataset.near_duplicates import DEFAULT_MAX_DISTANCE, duplicate_groups
from dataset.npy_dataset import NpyDataset

#: the splits pooled for cross-validation, in pooled-index order.
POOLED_SPLITS = ("train", "val")

# Mixed into the seed so the folds' permutations are not those of the val carve-out or of the
# training fraction, which draw from the same data.split_seed.
_FOLD_STREAM = 0x63766664


def pooled_labels(cache: CacheInfo) -> np.ndarray:
    """The full cache's labels of train then val, ``(n_train + n_val,)`` int64."""
    return np.concatenate([CacheInfo.labels(cache, s) for s in POOLED_SPLITS]).astype(np.int64)


def pooled_groups(cache: CacheInfo) -> np.ndarray:
    """Duplicate-group id of each pooled image (the smallest pooled index of its group).

    Exact copies always share a group; near duplicates join them with the distance the cache
    was built with (``meta.params.near_distance``; -1 there, or images under 16 px, leave the
    exact groups only).
    """
    parts = [CacheInfo.images(cache, s) for s in POOLED_SPLITS]
    digests = [d for part in parts for d in image_hashes(part)]
    distance = int((cache.meta.get("params") or {}).get("near_distance", DEFAULT_MAX_DISTANCE))
    return duplicate_groups(parts, digests, distance)


def assign_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold ``0..k-1`` of each item: stratified by class, each group whole in one fold.

    A group's class is its first member's. Each class's groups are visited largest first (ties
    in a permutation seeded by ``seed``) and each goes to the fold holding the fewest images of
    that class so far, then the fewest images overall, then the lowest index. Without groups
    larger than one image the class counts of any two folds differ by at most one.
    """
    if k < 2:
        raise ValueError(f"cv folds {k} is invalid; allowed: an int >= 2")
    _, first, member_of = np.unique(groups, return_index=True, return_inverse=True)
    member_of = member_of.ravel()
    group_label = labels[first]
    size = np.bincount(member_of)
    rng = np.random.default_rng([_FOLD_STREAM, int(seed)])
    group_fold = np.zeros(len(first), dtype=np.int64)
    totals = np.zeros(k, dtype=np.int64)
    order = np.arange(k)
    for c in np.unique(group_label):
        g = rng.permutation(np.flatnonzero(group_label == c))
        g = g[np.argsort(-size[g], kind="stable")]
        counts = np.zeros(k, dtype=np.int64)
        for gi in g:
            fold = int(np.lexsort((order, totals, counts))[0])
            group_fold[gi] = fold
            counts[fold] += size[gi]
            totals[fold] += size[gi]
    return group_fold[member_of]


def check_folds(
    labels: np.ndarray, groups: np.ndarray, k: int, classes: Sequence[int], names: Sequence[str]
) -> None:
    """Refuse ``k`` when a class of ``classes`` has fewer than ``k`` groups (distinct images):
    some fold would validate without it.

    Raises:
        ValueError: one line naming the class and the allowed range of k.
    """
    _, first = np.unique(groups, return_index=True)
    group_label = labels[first]
    distinct = {int(c): int(np.sum(group_label == c)) for c in classes}
    most = min(distinct.values())
    if most >= k:
        return
    worst = min(distinct, key=distinct.__getitem__)
    allowed = f"an int in 2..{most}" if most >= 2 else "none (add images to that class)"
    raise ValueError(
        f"cv folds {k}: class {names[worst]!r} has {most} distinct image(s) in train+val "
        f"(copies and near copies count once), fewer than the folds; allowed: {allowed}"
    )


class PooledImages:
    """The pooled train+val images of a cache folder, read memory-mapped by pooled index.

    ``images[i]`` is one ``(H, W, C)`` image; ``images[array]`` a copied ``(n, H, W, C)`` batch.
    """

    def __init__(self, path: str | Path) -> None:
        self.parts = [
            np.load(Path(path) / f"{s}_images.npy", mmap_mode="r", allow_pickle=False)
            for s in POOLED_SPLITS
        ]
        self.n_first = len(self.parts[0])

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    def __getitem__(self, index):
        if np.isscalar(index):
            i = int(index)
            return self.parts[0][i] if i < self.n_first else self.parts[1][i - self.n_first]
        rows = np.asarray(index, dtype=np.int64)
        out = np.empty((len(rows), *self.parts[0].shape[1:]), dtype=self.parts[0].dtype)
        first = rows < self.n_first
        out[first] = self.parts[0][rows[first]]
        out[~first] = self.parts[1][rows[~first] - self.n_first]
        return out


class PooledNpyDataset(NpyDataset):
    """:class:`NpyDataset` of a fold split (its cache's ``rows`` are pooled indices)."""

    @property
    def images(self) -> PooledImages:  # type: ignore[override]
        if self._images is None:
            self._images = PooledImages(self.cache.path)
        return self._images
