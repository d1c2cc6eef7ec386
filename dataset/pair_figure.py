"""A PNG of near-duplicate pairs side by side, to judge by eye whether they are copies."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dataset.errors import DataError
from dataset.near_duplicates import NearPair, orientation


def _caption(where: tuple[str, int, int], files, class_names) -> str:
    split, index, label = where
    name = files[split][index] if files and split in files else f"#{index}"
    cls = class_names[label] if 0 <= label < len(class_names) else str(label)
    return f"{split}[{index}] {cls}\n{name}"


def write_pairs_png(
    path: str | Path,
    pairs: list[NearPair],
    images: dict[str, np.ndarray],
    class_names: list[str],
    files: dict[str, list[str]] | None = None,
) -> Path:
    """Draw each pair as a row (image A, image B) with split, index, class, file and distance.

    Args:
        path: the PNG to write (written to a temporary name, then renamed).
        pairs: the pairs, e.g. ``NearDuplicateReport.closest``; an empty list draws a note.
        images: split -> uint8 ``(N, H, W, C)``.
        class_names: index = label.
        files: split -> the original file name of each image, where known.
    """
    from matplotlib.figure import Figure  # imported here: only this command draws

    path = Path(path)
    rows = max(len(pairs), 1)
    fig = Figure(figsize=(5.2, 2.7 * rows), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not pairs:
        axes[0, 0].text(0, 0.5, "no near-duplicate pairs\nbeyond byte-identical copies")
    for row, pair in zip(axes, pairs, strict=False):
        conflict = "  LABELS DIFFER" if pair.label_conflict else ""
        # The pair's verdict goes in B's title: a note under the images would sit on the titles
        # of the row below.
        verdict = f"distance {pair.distance}; B vs A: {orientation(pair.transform)}{conflict}"
        for ax, where, extra in zip(row, (pair.a, pair.b), ("", verdict), strict=True):
            img = images[where[0]][where[1]]
            grey = img.shape[-1] == 1
            ax.imshow(img[..., 0] if grey else img, cmap="gray" if grey else None, vmin=0, vmax=255)
            title = _caption(where, files, class_names) + (f"\n{extra}" if extra else "")
            ax.set_title(title, fontsize=7, color="red" if conflict and extra else "black")
    # A pid-named temp file opened plainly (not mkstemp, which makes 0600 files), so the PNG
    # gets the umask's mode like every other file the project writes.
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                fig.savefig(f, dpi=100, format="png")
        except OSError as err:
            raise DataError(path, f"cannot write the pairs PNG: {err.strerror}") from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
