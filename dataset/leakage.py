"""Exact-duplicate check: the same pixels within a split, or in two splits.

Every image is hashed (BLAKE2b of its bytes and shape), so the check is linear in the data and
finds byte-identical copies only; flipped, rotated, re-encoded or shifted copies are the work of
:mod:`dataset.near_duplicates`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

# Order in which splits are compared: an image in a later split "leaks" from an earlier one.
_ORDER = ("train", "val", "test")


def image_hashes(images: np.ndarray, chunk: int = 4096) -> list[bytes]:
    """One 16-byte digest per image of ``images`` ``(N, H, W, C)``; reads memmaps chunk by chunk."""
    digests = []
    for start in range(0, len(images), chunk):
        block = np.ascontiguousarray(images[start : start + chunk])
        for img in block:
            h = hashlib.blake2b(img.tobytes(), digest_size=16)
            h.update(repr(img.shape).encode())
            digests.append(h.digest())
    return digests


@dataclass
class DuplicatePair:
    """Two byte-identical images: ``(split, index, label)`` of each."""

    a: tuple[str, int, int]
    b: tuple[str, int, int]

    @property
    def label_conflict(self) -> bool:
        return self.a[2] != self.b[2]


@dataclass
class LeakageReport:
    """Exact duplicates found by :func:`find_duplicates`.

    Attributes:
        within: split -> number of images that repeat an earlier image of the same split.
        within_groups: split -> number of distinct images that occur more than once in it.
        across: ``"a->b"`` -> number of images of split b whose pixels also occur in split a.
        across_distinct: the same, counting distinct images.
        leaked: split b -> number of its images whose pixels occur in any earlier split
            (train before val before test); ``leaked["test"]`` is what inflates test scores.
        leaked_distinct: the same, counting distinct images.
        leaked_indices: split b -> sorted indices into b of those images.
        label_conflicts: identical pixels carrying different labels (within or across splits).
        worst: example pairs, label conflicts first, then cross-split copies, then within.
    """

    within: dict[str, int] = field(default_factory=dict)
    within_groups: dict[str, int] = field(default_factory=dict)
    across: dict[str, int] = field(default_factory=dict)
    across_distinct: dict[str, int] = field(default_factory=dict)
    leaked: dict[str, int] = field(default_factory=dict)
    leaked_distinct: dict[str, int] = field(default_factory=dict)
    leaked_indices: dict[str, list[int]] = field(default_factory=dict)
    label_conflicts: int = 0
    worst: list[DuplicatePair] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not any(self.within.values()) and not any(self.across.values())

    def summary(self) -> dict:
        """JSON-ready counts (no indices), as stored in the cache's ``meta.json``."""
        return {
            "within": self.within,
            "within_groups": self.within_groups,
            "across": self.across,
            "across_distinct": self.across_distinct,
            "leaked": self.leaked,
            "leaked_distinct": self.leaked_distinct,
            "label_conflicts": self.label_conflicts,
        }


def find_duplicates(
    images: dict[str, np.ndarray], labels: dict[str, np.ndarray], max_examples: int = 10
) -> LeakageReport:
    """Hash every image of every split and report exact duplicates within and across splits."""
    splits = [s for s in _ORDER if s in images] + [s for s in images if s not in _ORDER]
    # digest -> list of (split, index, label), in split order then index order
    where: dict[bytes, list[tuple[str, int, int]]] = defaultdict(list)
    for split in splits:
        digests = image_hashes(images[split])
        for i, (d, y) in enumerate(zip(digests, labels[split].tolist(), strict=True)):
            where[d].append((split, i, int(y)))

    report = LeakageReport(within={s: 0 for s in splits}, within_groups={s: 0 for s in splits})
    conflicts, cross, inner = [], [], []
    for occ in where.values():
        if len(occ) < 2:
            continue
        if len({y for _, _, y in occ}) > 1:
            report.label_conflicts += 1
        by_split: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        for o in occ:
            by_split[o[0]].append(o)
        for split, items in by_split.items():
            if len(items) > 1:
                report.within[split] += len(items) - 1
                report.within_groups[split] += 1
                inner.append(DuplicatePair(items[0], items[1]))
        for ia, a in enumerate(splits):
            for b in splits[ia + 1 :]:
                if a in by_split and b in by_split:
                    key = f"{a}->{b}"
                    report.across[key] = report.across.get(key, 0) + len(by_split[b])
                    report.across_distinct[key] = report.across_distinct.get(key, 0) + 1
                    cross.append(DuplicatePair(by_split[a][0], by_split[b][0]))
        for ib, b in enumerate(splits):
            if b in by_split and any(a in by_split for a in splits[:ib]):
                report.leaked[b] = report.leaked.get(b, 0) + len(by_split[b])
                report.leaked_distinct[b] = report.leaked_distinct.get(b, 0) + 1
                report.leaked_indices.setdefault(b, []).extend(i for _, i, _ in by_split[b])
        first = occ[0]
        conflicts += [DuplicatePair(first, o) for o in occ[1:] if o[2] != first[2]]
    for key in report.leaked_indices:
        report.leaked_indices[key].sort()
    seen = set()
    for pair in conflicts + cross + inner:
        if (pair.a, pair.b) not in seen and len(report.worst) < max_examples:
            seen.add((pair.a, pair.b))
            report.worst.append(pair)
    return report
