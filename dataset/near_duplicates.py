"""Near-duplicate check: flipped, rotated, re-encoded or re-coloured copies in and across splits.

Each image gets a perceptual hash in the manner of pHash (Zauner, "Implementation and
benchmarking of perceptual image hash functions", 2010): the grey image's lowest 16x16 DCT-II
coefficients, one bit per coefficient, set where it exceeds their median (256 bits). Two
images are near duplicates when the Hamming distance between their hashes is at most
``max_distance``, taken over the 8 flips and right-angle rotations of one of them. The cosines
are centred on the image's content (its centroid, measured from the frame's grey level), so a
copy shifted by a pixel or two still matches; larger shifts and crops do not (measured in
``docs/near-duplicates.md``, with the choice of the default distance).

Three things keep it fast enough to run on every cache build:

- The coefficients are a projection onto 16 cosines per axis, a few matrix products per chunk
  of images at their own size, rather than a resize and a full DCT per image.
- The flips and rotations of an image need no second projection: mirroring an axis multiplies
  the coefficient of frequency ``u`` on that axis by ``(-1)**u``, and a transpose transposes
  the coefficient block.
- Pairs are found by multi-index hashing (Norouzi et al., "Fast search in Hamming space with
  multi-index hashing", CVPR 2012): the 256 bits are cut into ``m`` chunks with ``2m >
  max_distance``, so a pair within the distance agrees on some chunk up to one bit; only
  images that share such a chunk are compared. Nothing is quadratic in the number of images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from dataset.errors import DataError

HASH_SIDE = 16  # DCT coefficients kept per axis
HASH_BITS = HASH_SIDE * HASH_SIDE
DEFAULT_MAX_DISTANCE = 20  # of 256 bits; chosen from the pairs in docs/near-duplicates.md
MAX_DISTANCE_LIMIT = 32  # beyond it look-alike images pass, and the search slows down
# The 8 symmetries of the square, in the order of the hash variants of :func:`dct_hashes`.
TRANSFORMS = (
    "identity",
    "horizontal flip",
    "vertical flip",
    "rotation 180",
    "transpose",
    "rotation 90",
    "rotation 270",
    "anti-transpose",
)


def orientation(transform: int) -> str:
    """How image B of a pair lies relative to image A, in words."""
    return TRANSFORMS[transform] if transform else "same orientation"


_INVERSE = np.array([0, 1, 2, 3, 4, 6, 5, 7])  # only the quarter turns are not their own inverse
_ORDER = ("train", "val", "test")
_CHUNK_BITS = 20
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's "L" mode


def check_distance(value: int) -> int:
    """``value`` if it is a usable ``near_distance`` (-1 for off, else 0..32), else a DataError."""
    if not -1 <= value <= MAX_DISTANCE_LIMIT:
        raise DataError(
            None, f"near_distance must be in -1..{MAX_DISTANCE_LIMIT} (-1: off), got {value}"
        )
    return value


def can_hash(images: np.ndarray) -> bool:
    """Whether ``images`` ``(N, H, W, C)`` are large enough for a 16x16-coefficient hash."""
    return images.ndim == 4 and min(images.shape[1:3]) >= HASH_SIDE


def _shifted_cosines(n: int, shift: np.ndarray) -> np.ndarray:
    """``(B, 16, n)`` DCT-II bases, one per image, centred ``shift`` pixels off the middle.

    Row ``u`` is ``cos(pi * (2 * (x - shift) + 1) * u / (2n))``; with ``shift`` 0 it is the
    plain DCT-II basis.
    """
    x = np.arange(n, dtype=np.float32)[None, None, :] - shift[:, None, None]
    u = np.arange(HASH_SIDE, dtype=np.float32)[None, :, None]
    return np.cos(np.float32(np.pi) * (2 * x + 1) * u / (2 * n))


def dct_coefficients(images: np.ndarray) -> np.ndarray:
    """The lowest 16x16 DCT-II coefficients of each grey image, taken around its content.

    The grey level of the frame is subtracted and the cosines are centred on the centroid of
    what remains (in magnitude), so a shifted copy of an image is projected onto equally
    shifted cosines. Mirroring the image mirrors its centroid, which keeps the sign rule of
    :func:`dct_hashes` exact.

    Args:
        images: uint8 ``(N, H, W, C)``, C 1 or 3, H and W at least 16.

    Returns:
        ``(N, 16, 16)`` float32.
    """
    _, h, w, c = images.shape
    block = np.asarray(images)
    grey = block[..., 0].astype(np.float32) if c == 1 else block.astype(np.float32) @ _LUMA
    # Measured from the grey level of the frame (its outermost pixels), the content stands out
    # (a cell on its slide, a brain on black), and a flat background adds nothing to the
    # shifted cosines.
    frame = np.concatenate(
        [grey[:, 0], grey[:, -1], grey[:, 1:-1, 0], grey[:, 1:-1, -1]], axis=1
    ).mean(axis=1)
    grey -= frame[:, None, None]
    weight = np.abs(grey) + 1e-3  # the constant centres a flat image
    total = weight.sum(axis=(1, 2))
    dy = weight.sum(axis=2) @ np.arange(h, dtype=np.float32) / total - (h - 1) / 2
    dx = weight.sum(axis=1) @ np.arange(w, dtype=np.float32) / total - (w - 1) / 2
    rows, cols = _shifted_cosines(h, dy), _shifted_cosines(w, dx)
    # (B, 16, H) @ (B, H, W) @ (B, W, 16) -> (B, 16, 16)
    return rows @ (grey @ cols.transpose(0, 2, 1))


# Sign patterns (4, 16, 16) that mirror nothing, the columns (a horizontal flip), the rows (a
# vertical flip), or both.
_SIGN = (-1.0) ** np.arange(HASH_SIDE, dtype=np.float32)
_ONES = np.ones(HASH_SIDE, dtype=np.float32)
_MIRRORS = np.stack(
    [np.outer(r, c) for r, c in ((_ONES, _ONES), (_ONES, _SIGN), (_SIGN, _ONES), (_SIGN, _SIGN))]
)


def dct_hashes(images: np.ndarray, chunk_bytes: int = 1 << 20) -> np.ndarray:
    """The 256-bit hash of every image under each of the 8 :data:`TRANSFORMS`.

    Args:
        images: uint8 ``(N, H, W, C)``, C 1 or 3, H and W at least 16; read about
            ``chunk_bytes`` at a time (memmaps too): chunks that stay in the CPU's cache
            measured twice as fast as 16 MB ones on 128x128 images.

    Returns:
        ``(N, 8, 4)`` uint64: 4 words of 64 bits per hash; variant 0 is the image as it is.
    """
    n = len(images)
    chunk = max(1, chunk_bytes // max(1, int(np.prod(images.shape[1:]))))
    out = np.empty((n, 8, HASH_BITS // 8), dtype=np.uint8)
    for start in range(0, n, chunk):
        coef = dct_coefficients(images[start : start + chunk])
        mirrored = (coef[:, None] * _MIRRORS).reshape(len(coef), 4, HASH_BITS)
        kth = np.partition(mirrored, (HASH_BITS // 2 - 1, HASH_BITS // 2), axis=-1)
        median = kth[..., HASH_BITS // 2 - 1 : HASH_BITS // 2 + 1].mean(axis=-1, keepdims=True)
        bits = (mirrored > median).reshape(len(coef), 4, HASH_SIDE, HASH_SIDE)
        # A transpose keeps the coefficients' median, so its bits are the transposed bits.
        bits = np.concatenate([bits, bits.transpose(0, 1, 3, 2)], axis=1)
        out[start : start + len(coef)] = np.packbits(
            bits.reshape(len(coef), 8, HASH_BITS), axis=-1, bitorder="little"
        )
    return out.view(np.uint64)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per row of ``(..., 4)`` uint64 words."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words).sum(axis=-1, dtype=np.int64)
    as_bytes = words.view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1, dtype=np.int64)


def hash_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance between hashes ``(..., 4)`` uint64 (broadcast)."""
    return _popcount(np.bitwise_xor(a, b))


def near_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs of images whose hashes are within ``max_distance`` under some transform.

    Args:
        hashes: ``(N, 8, 4)`` from :func:`dct_hashes`.
        max_distance: the largest Hamming distance (of 256 bits) that counts, 0 or more.

    Returns:
        ``(P, 4)`` int64 rows ``(i, j, distance, transform)`` with ``i < j``, sorted by ``i``
        then ``j``; ``transform`` indexes :data:`TRANSFORMS`: it is the one under which image
        i's hash comes closest to image j's.
    """
    # 2m > max_distance (pigeonhole: some chunk differs by at most one bit); chunks of at most
    # 20 bits keep the bucket table of a chunk at 2**20 entries.
    m = max(max_distance // 2 + 1, -(-HASH_BITS // _CHUNK_BITS))
    bits = np.unpackbits(hashes.view(np.uint8), axis=-1, bitorder="little")  # (N, 8, 256)
    # Chunk j takes bits j, j + m, j + 2m, ...: the low frequencies, whose bits vary least
    # between images, spread over all chunks instead of crowding the first few buckets.
    found = [_chunk_pairs(hashes, bits[..., j::m], max_distance) for j in range(m)]
    pairs = np.concatenate(found)
    # A row says: transform t of `other` matches `query`. Store i < j and the transform that
    # maps image i onto image j, which is t's inverse when `query` is i.
    swap = pairs[:, 0] > pairs[:, 1]
    pairs[:, 3] = np.where(swap, pairs[:, 3], _INVERSE[pairs[:, 3]])
    pairs[swap, :2] = pairs[swap, 1::-1]
    # Keep the closest finding of each pair (found once per chunk and from both sides).
    pairs = pairs[np.lexsort((pairs[:, 3], pairs[:, 2], pairs[:, 1], pairs[:, 0]))]
    new = np.ones(len(pairs), dtype=bool)
    new[1:] = (pairs[1:, 0] != pairs[:-1, 0]) | (pairs[1:, 1] != pairs[:-1, 1])
    return pairs[new]


def _chunk_pairs(hashes: np.ndarray, chunk: np.ndarray, max_distance: int) -> np.ndarray:
    """Rows ``(query, other, distance, transform)`` of the pairs whose ``chunk`` bits
    ``(N, 8, b)`` agree up to one bit, between image ``query`` as it is and variant
    ``transform`` of ``other``."""
    width = chunk.shape[-1]
    keys = chunk.astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64))  # (N, 8)
    # The index: all 8 variants of every image, grouped by key through a counting table.
    order = np.argsort(keys.ravel(), kind="stable")
    size = np.bincount(keys.ravel(), minlength=1 << width)
    start = np.cumsum(size) - size
    # The probes: each image as it is, and with any one bit of the chunk flipped.
    flips = np.concatenate([[0], np.int64(1) << np.arange(width, dtype=np.int64)])
    probes = (keys[:, 0, None] ^ flips).ravel()
    count = size[probes]
    query = np.repeat(np.arange(len(probes)) // len(flips), count)
    offset = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    item = order[np.repeat(start[probes], count) + offset]
    other, transform = item // 8, item % 8
    keep = other != query
    query, other, transform = query[keep], other[keep], transform[keep]
    dist = hash_distance(hashes[query, 0], hashes[other, transform])
    ok = dist <= max_distance
    return np.stack([query[ok], other[ok], dist[ok], transform[ok]], axis=1).astype(np.int64)


def connected_groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group id of each of ``n`` items: the connected components of ``pairs`` ``(P, >=2)``.

    A vectorised union-find: every pair hooks the larger of its two roots onto the smaller,
    then pointers are jumped to their roots, until no pair joins two roots. Ids are the
    smallest member's index, so an item alone is its own group.
    """
    parent = np.arange(n)
    a, b = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        if np.array_equal(ra, rb):
            return parent
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def exact_groups(digests: list[bytes]) -> np.ndarray:
    """Group id of each image: the first index with the same pixel digest."""
    first: dict[bytes, int] = {}
    return np.array([first.setdefault(d, i) for i, d in enumerate(digests)], dtype=np.int64)


def duplicate_groups(
    parts: list[np.ndarray], digests: list[bytes], max_distance: int
) -> np.ndarray:
    """Group id per image joining exact copies and, where the check runs, near duplicates.

    Args:
        parts: arrays of uint8 ``(N_k, H, W, C)`` images, taken as one sequence (the splits of
            a source, say, without copying them into one array).
        digests: a pixel digest per image of that sequence.
        max_distance: see :func:`near_pairs`; ``< 0``, or images under 16x16, leave the
            exact groups only.
    """
    groups = exact_groups(digests)
    if max_distance < 0 or not all(can_hash(p) for p in parts) or len(groups) < 2:
        return groups
    pairs = near_pairs(np.concatenate([dct_hashes(p) for p in parts]), max_distance)
    exact = np.stack([np.arange(len(groups)), groups], axis=1)
    return connected_groups(len(groups), np.concatenate([pairs[:, :2], exact]))


# ------------------------------------------------------------------------- report


@dataclass
class NearPair:
    """Two near-duplicate images: ``(split, index, label)`` of each, their hash distance, and
    the transform (an index into :data:`TRANSFORMS`) under which A's hash is closest to B's."""

    a: tuple[str, int, int]
    b: tuple[str, int, int]
    distance: int
    transform: int

    @property
    def label_conflict(self) -> bool:
        return self.a[2] != self.b[2]


@dataclass
class NearDuplicateReport:
    """Groups of near duplicates found by :func:`find_near_duplicates`.

    A group is a connected component of near-duplicate pairs, so it can chain images that are
    each close to the next. Byte-identical copies count here too; the ``beyond exact``
    figures leave out what the exact check already reports.

    Attributes:
        max_distance: the Hamming threshold used, of ``bits`` bits.
        groups: groups of two or more images; ``images``: the images in them.
        largest: the size of the largest group.
        within: split -> groups whose members all lie in that split.
        across: ``"a->b"`` -> groups with members in both splits.
        across_beyond_exact: the same, counting groups where no image of a is byte-identical
            to an image of b (invisible to the exact check).
        leaked: split b -> its images in a group that reaches an earlier split.
        label_conflicts: groups whose members carry more than one label.
        closest: the closest pairs that are not byte-identical, across splits first.
    """

    max_distance: int
    bits: int = HASH_BITS
    groups: int = 0
    images: int = 0
    largest: int = 0
    within: dict[str, int] = field(default_factory=dict)
    across: dict[str, int] = field(default_factory=dict)
    across_beyond_exact: dict[str, int] = field(default_factory=dict)
    leaked: dict[str, int] = field(default_factory=dict)
    label_conflicts: int = 0
    closest: list[NearPair] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready counts (no pairs), as stored in the cache's ``meta.json``."""
        return {
            "max_distance": self.max_distance,
            "bits": self.bits,
            "groups": self.groups,
            "images": self.images,
            "largest": self.largest,
            "within": self.within,
            "across": self.across,
            "across_beyond_exact": self.across_beyond_exact,
            "leaked": self.leaked,
            "label_conflicts": self.label_conflicts,
        }


def _digest(img: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=16).digest()


def find_near_duplicates(
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    max_distance: int = DEFAULT_MAX_DISTANCE,
    max_examples: int = 12,
) -> NearDuplicateReport | None:
    """Hash every image of every split and group the near duplicates within and across splits.

    Returns ``None`` when the images are under 16x16 (too small for the hash).
    """
    splits = [s for s in _ORDER if s in images] + [s for s in images if s not in _ORDER]
    if not all(can_hash(images[s]) for s in splits):
        return None
    split_of = np.concatenate([np.full(len(images[s]), k) for k, s in enumerate(splits)])
    index = np.concatenate([np.arange(len(images[s])) for s in splits])
    label = np.concatenate([np.asarray(labels[s], dtype=np.int64) for s in splits])
    hashes = np.concatenate([dct_hashes(images[s]) for s in splits])
    pairs = near_pairs(hashes, max_distance)
    report = NearDuplicateReport(max_distance, within={s: 0 for s in splits})
    if not len(pairs):
        return report
    group = connected_groups(len(hashes), pairs)
    members = np.unique(pairs[:, :2])
    # Pixels are compared only where a pair was found: a handful of images, not all of them.
    digest = {int(i): _digest(images[splits[split_of[i]]][index[i]]) for i in members}
    _count_groups(report, splits, members, group[members], split_of, label, digest)
    report.closest = _closest(pairs, splits, split_of, index, label, digest, max_examples)
    return report


def _count_groups(report, splits, members, gid, split_of, label, digest) -> None:
    order = np.argsort(gid, kind="stable")
    members, gid = members[order], gid[order]
    starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
    sizes = np.diff(np.r_[starts, len(gid)])
    report.groups, report.images = len(starts), int(sizes.sum())
    report.largest = int(sizes.max())
    for start, size in zip(starts, sizes, strict=True):
        group = members[start : start + size]
        where = {splits[k]: group[split_of[group] == k] for k in np.unique(split_of[group])}
        report.label_conflicts += len(np.unique(label[group])) > 1
        if len(where) == 1:
            report.within[next(iter(where))] += 1
            continue
        names = [s for s in splits if s in where]
        for ia, a in enumerate(names):
            for b in names[ia + 1 :]:
                key = f"{a}->{b}"
                report.across[key] = report.across.get(key, 0) + 1
                if not {digest[int(i)] for i in where[a]} & {digest[int(i)] for i in where[b]}:
                    report.across_beyond_exact[key] = report.across_beyond_exact.get(key, 0) + 1
        for b in names[1:]:
            report.leaked[b] = report.leaked.get(b, 0) + len(where[b])


def _closest(pairs, splits, split_of, index, label, digest, limit) -> list[NearPair]:
    def where(i: int) -> tuple[str, int, int]:
        return splits[split_of[i]], int(index[i]), int(label[i])

    i, j = pairs[:, 0], pairs[:, 1]
    differ = np.array([digest[int(a)] != digest[int(b)] for a, b in zip(i, j, strict=True)])
    within = split_of[i] == split_of[j]
    # Across splits first, closest first; byte-identical pairs are the exact check's to show.
    order = np.lexsort((pairs[:, 2], within))
    order = order[differ[order]][:limit]
    return [
        NearPair(where(int(i[k])), where(int(j[k])), int(pairs[k, 2]), int(pairs[k, 3]))
        for k in order
    ]
