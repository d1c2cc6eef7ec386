"""Build ``bloodcells_mini.npz``, the small sample of the PBC blood cells that training defaults to.

    python dataset/default/make_bloodcells_mini.py [SOURCE.npz] [--seed 0] [--out PATH]

SOURCE is the 28x28 ``bloodcells_pbc_28.npz`` (default: ``../shared/data/`` beside the
checkout). Each of its train/val/test splits is sampled on its own (2,100 / 300 / 600 images),
stratified by class: a class keeps its share of the split, rounded by largest remainder. Images
whose exact pixels occur more than once anywhere in the source are left out first, so the sample
has no duplicate and no image that carries two labels. The keys are the source's
(``{split}_images``, ``{split}_labels``, ``{split}_files``); the same seed gives the same sample.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from dataset.leakage import image_hashes
from dataset.sources import SPLITS

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[2] / "shared" / "data" / "bloodcells_pbc_28.npz"
DEFAULT_OUT = HERE / "bloodcells_mini.npz"
SAMPLE_SIZES = {"train": 2100, "val": 300, "test": 600}


def allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Images per class for a sample of ``total``: each class's share, by largest remainder.

    Args:
        counts: ``(C,)`` images available per class.
        total: sample size, at most ``counts.sum()``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if not 0 <= total <= counts.sum():
        raise ValueError(f"sample size {total} is outside 0..{int(counts.sum())}")
    exact = counts * total / counts.sum()
    take = np.floor(exact).astype(np.int64)
    # Ties go to the lower class index (stable sort), so the result does not depend on the seed.
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: total - take.sum()]] += 1
    return take


def stratified_sample(labels: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``total`` items of ``labels`` ``(N,)``, stratified by class."""
    classes = np.arange(int(labels.max()) + 1)
    counts = np.bincount(labels, minlength=len(classes))
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
        for c, k in zip(classes, allocate(counts, total), strict=True)
    ]
    return np.sort(np.concatenate(picked))


def repeated_images(images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per split, a boolean mask of the images whose pixels occur more than once in the source."""
    digests = {split: image_hashes(images[split]) for split in SPLITS}
    seen = Counter(d for split in SPLITS for d in digests[split])
    return {split: np.array([seen[d] > 1 for d in digests[split]]) for split in SPLITS}


def build(source: Path, seed: int) -> dict[str, np.ndarray]:
    """The arrays of the sample, keyed as in the source."""
    with np.load(source, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    repeated = repeated_images({s: arrays[f"{s}_images"] for s in SPLITS})
    rng = np.random.default_rng(seed)
    out = {}
    for split in SPLITS:
        unique = np.flatnonzero(~repeated[split])
        labels = arrays[f"{split}_labels"][unique]
        keep = unique[stratified_sample(labels, SAMPLE_SIZES[split], rng)]
        for kind in ("images", "labels", "files"):
            out[f"{split}_{kind}"] = arrays[f"{split}_{kind}"][keep]
    return out


def save(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Write a compressed ``.npz`` under a temporary name, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the .npz to write")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(f"error: {args.source}: file not found", file=sys.stderr)
        return 2
    arrays = build(args.source, args.seed)
    save(arrays, args.out)
    sizes = ", ".join(f"{s} {len(arrays[f'{s}_labels'])}" for s in SPLITS)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
