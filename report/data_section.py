"""The report's "Data" section: what the run trained on, counted, shown and checked.

The cache is found as the evaluation finds it (``training.evaluation.report``): the path a
checkpoint recorded, rebuilt from the source with the run's split settings when it was deleted.
A run without a readable checkpoint falls back to its ``config.yaml``. The run's class subset and
training fraction (``data.classes``, ``data.train_fraction``; see :mod:`dataset.subset`) are
applied, so every count is of the images the run saw. A cache that cannot be opened (source
gone) leaves a note naming the source, and the rest of the page still renders.

Public API:
    RunData, add_data_section, open_run_data, class_names_of, count_rows, sample_indices,
    upscale_factor, thumbnail_grid, split_channel_stats, leakage_rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dataset import medmnist
from dataset.cache import CacheInfo, channel_stats, load_cache, prepare
from dataset.errors import DataError
from dataset.folds import PooledImages
from dataset.sources import SPLITS
from dataset.subset import subset_cache
from report.page import Page, Section
from report.run import RunFolder
from training.engine.checkpoint import CheckpointError, load_checkpoint
from training.engine.data import sized_cache_name
from training.evaluation.report import prepare_kwargs

#: Sample images per class in the grid, and the smallest side of a thumbnail in pixels.
SAMPLES_PER_CLASS = 6
MIN_THUMB_PX = 96
#: The sample grid's seed: the same run gives the same grid each time the page is built.
SAMPLE_SEED = 0
#: Channel statistics read at most this many images of a split (an even, seeded sample).
STATS_LIMIT = 50_000
_STATS_CHUNK = 256  # images per float64 block: 256 x 224 x 224 x 3 x 8 B stays under 300 MB
_GUTTER = 4  # pixels between thumbnails
_CHAR_PX = 7  # width of one character of a 10-point class name, for the label margin
_DPI = 100  # Page.save's dpi: the grid figure is sized so one image pixel is one PNG pixel
_SPLIT_COLOURS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}


@dataclass
class RunData:
    """What the report knows about a run's data.

    Attributes:
        cache: the cache the run trained on, its subset applied; ``None`` when it cannot be
            opened (``problem`` says why).
        source: the data source the run named.
        cache_path: where the cache is (or was).
        mean, std: the normalisation the run used (the checkpoint's), or ``None``.
        stats_from: where ``mean``/``std`` came from, in words.
        data_cfg: the run's ``data`` settings.
        notes: things worth telling the reader (a rebuild, a subset, a fallback).
        problem: why the cache could not be opened, or ``None``.
    """

    cache: CacheInfo | None
    source: str
    cache_path: Path | None
    mean: list[float] | None = None
    std: list[float] | None = None
    stats_from: str = ""
    data_cfg: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problem: str | None = None
    class_names: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ opening the data

# Read once per run: the training section asks for class names, the data section for the
# cache, and a large checkpoint takes seconds to load.
_OPENED: dict[tuple[str, float], RunData] = {}


def _smallest_checkpoint(run: RunFolder) -> list[Path]:
    """The run's checkpoints, smallest file first: every one records the data, and the
    weights-only files (swa.pt, best.pt) load faster than last.pt with its optimizer state."""
    return sorted(run.checkpoints.values(), key=lambda p: p.stat().st_size)


def _read_checkpoint(run: RunFolder) -> tuple[dict | None, str | None]:
    problems = []
    for path in _smallest_checkpoint(run):
        try:
            return load_checkpoint(path), None
        except CheckpointError as err:
            problems.append(str(err))
    return None, "; ".join(problems) or None


def _run_base(run: RunFolder) -> Path | None:
    """The folder the run was started from, when ``run.run_dir`` was relative: the config's
    other relative paths (``data.root``, ``data.source``) are relative to it too."""
    recorded = run.setting("run.run_dir")
    if not recorded or Path(recorded).is_absolute():
        return None
    parts = Path(recorded).parts
    here = run.path.resolve()
    if len(here.parts) > len(parts) and here.parts[-len(parts) :] == parts:
        return here.parents[len(parts) - 1]
    return None


def _locate(path: str | Path, run: RunFolder) -> Path:
    """``path`` as recorded, or relative to the run's start folder when only that exists."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    base = _run_base(run)
    if base is not None and (base / path).exists():
        return base / path
    return path


def _is_medmnist(source: str) -> bool:
    return medmnist.parse_name(source) is not None


def _guess_cache(source: Path, root: Path, data_cfg: dict) -> Path:
    """Where training put the cache of ``source`` (see ``training.engine.data.prepare_cache``)
    when no checkpoint says so."""
    size = data_cfg.get("image_size") or 0
    if size:
        return root / sized_cache_name(source, size)
    return root / (source.stem if source.suffix else source.name)


def open_run_data(run: RunFolder) -> RunData:
    """Find and open the run's cache, its subset applied; never raises for missing data."""
    key = (str(run.path.resolve()), _stamp(run))
    if key not in _OPENED:
        _OPENED[key] = _open(run)
    return _OPENED[key]


def _stamp(run: RunFolder) -> float:
    times = [p.stat().st_mtime for p in run.checkpoints.values() if p.exists()]
    config = run.path / "config.yaml"
    return max(times + ([config.stat().st_mtime] if config.exists() else []), default=0.0)


def _open(run: RunFolder) -> RunData:
    ckpt, ckpt_problem = _read_checkpoint(run)
    data_cfg = dict(((ckpt or {}).get("config") or {}).get("data") or run.config.get("data") or {})
    recorded = (ckpt or {}).get("data") or {}
    source = str(recorded.get("source") or data_cfg.get("source") or "")
    info = RunData(None, source, None, data_cfg=data_cfg)
    if ckpt is None:
        info.notes.append(
            "no readable checkpoint"
            + (f" ({ckpt_problem})" if ckpt_problem else "")
            + ": the cache is located from config.yaml and the normalisation shown is the "
            "cache's own training-split statistics"
        )
    else:
        info.mean, info.std = list(ckpt["mean"]), list(ckpt["std"])
        info.stats_from = "the checkpoint (what the model was trained and tested with)"
        info.class_names = [str(c) for c in ckpt.get("class_names") or []]
    if not source:
        info.problem = "the run records no data source (data.source is empty)"
        return info
    src_path = _locate(source, run)
    if recorded.get("cache"):
        cache_path = _locate(recorded["cache"], run)
    else:
        root = _locate(data_cfg.get("root") or "data_npy", run)
        cache_path = _guess_cache(src_path, root, data_cfg)
    info.cache_path = cache_path
    try:
        cache = load_cache(cache_path)
    except DataError as err:
        if not (src_path.exists() or _is_medmnist(source)):
            info.problem = (
                f"the cache {cache_path} cannot be opened ({err.problem}) and its source "
                f"{source} is gone; restore the source (or the cache) and build the report "
                f"again, or rebuild the cache with: python -m dataset prepare SOURCE --root "
                f"{cache_path.parent} --name {cache_path.name}"
            )
            return info
        try:
            # As the evaluation does: rebuild where it was, with the run's split settings.
            cache, _ = prepare(
                str(src_path) if src_path.exists() else source,
                cache_path.parent,
                name=cache_path.name,
                progress=False,
                **prepare_kwargs({"config": {"data": data_cfg}}),
            )
        except (DataError, OSError) as rebuild_err:
            info.problem = (
                f"the cache {cache_path} cannot be opened ({err.problem}) and rebuilding it from "
                f"{source} failed: {' '.join(str(rebuild_err).split())}"
            )
            return info
        info.notes.append(f"the cache {cache_path} was missing or damaged and was rebuilt now")
    if info.mean is None:
        info.mean, info.std = cache.mean, cache.std
        info.stats_from = "the cache (its full training split), as training computes it"
    classes = [str(c) for c in data_cfg.get("classes") or []]
    fraction = float(data_cfg.get("train_fraction") or 1.0)
    folds, fold = int(data_cfg.get("cv_folds") or 0), int(data_cfg.get("cv_fold") or 0)
    seed = int(data_cfg.get("split_seed") or 0)
    try:
        cache = subset_cache(cache, classes, fraction, seed, folds, fold)
    except ValueError as err:
        info.problem = f"the run's data.classes/train_fraction/cv_folds do not fit the cache: {err}"
        return info
    if folds:
        info.notes.append(
            f"the run is fold {fold} of {folds} (data.cv_folds): its training and validation "
            "images are the cache's train and val pooled, this fold validating"
        )
    if classes:
        info.notes.append(
            f"the run trained on {len(classes)} of the cache's "
            f"{len(cache.meta['subset']['source_counts']['train'])} classes (data.classes)"
        )
    if fraction < 1.0:
        full = sum(cache.meta["subset"]["source_counts"]["train"])
        info.notes.append(
            f"the run trained on {fraction:.0%} of each class's training images "
            f"(data.train_fraction {fraction:g}): {sum(cache.counts('train'))} of {full}; "
            "val and test are whole"
        )
    if info.class_names and info.class_names != cache.class_names:
        info.notes.append(
            f"the checkpoint's classes {info.class_names} differ from the cache's "
            f"{cache.class_names}: the cache changed since training"
        )
    info.class_names = info.class_names or cache.class_names
    info.cache = cache
    return info


def class_names_of(run: RunFolder) -> list[str]:
    """The run's class names: the test report's, else the checkpoint's or cache's; [] if none."""
    if run.test_report and run.test_report.get("class_names"):
        return [str(c) for c in run.test_report["class_names"]]
    return list(open_run_data(run).class_names)


# ------------------------------------------------------------------ pure pieces


def count_rows(cache: CacheInfo) -> list[list[Any]]:
    """Rows of the counts table: class, then images per split and in all; a total row last."""
    counts = {s: cache.counts(s) for s in SPLITS}
    rows: list[list[Any]] = [
        [name, *(counts[s][i] for s in SPLITS), sum(counts[s][i] for s in SPLITS)]
        for i, name in enumerate(cache.class_names)
    ]
    totals = [sum(counts[s]) for s in SPLITS]
    rows.append(["total", *totals, sum(totals)])
    return rows


def sample_indices(
    labels: np.ndarray, classes: int, per_class: int = SAMPLES_PER_CLASS, seed: int = SAMPLE_SEED
) -> list[np.ndarray]:
    """For each class, up to ``per_class`` positions in ``labels`` drawn without replacement
    (seeded), sorted so the grid reads in file order."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        take = min(per_class, len(members))
        picks.append(np.sort(rng.choice(members, size=take, replace=False)) if take else members)
    return picks


def upscale_factor(size: int, min_px: int = MIN_THUMB_PX) -> int:
    """The whole-number factor that brings a ``size``-pixel image to at least ``min_px``."""
    return max(1, math.ceil(min_px / max(1, size)))


def thumbnail_grid(
    rows: Sequence[np.ndarray], per_row: int, scale: int, gutter: int = _GUTTER
) -> np.ndarray:
    """Tile uint8 ``(n, H, W, C)`` images, one class per row, each enlarged ``scale`` times by
    repeating pixels (nearest neighbour: no blur on 28-pixel images).

    Returns ``(rows * (H*scale + gutter) - gutter, per_row * (W*scale + gutter) - gutter, C)``
    uint8 on a white background; missing images (a class with fewer) stay white.
    """
    sample = next((r for r in rows if len(r)), None)
    if sample is None:
        raise ValueError("no images to tile")
    h, w, c = sample.shape[1:]
    th, tw = h * scale, w * scale
    grid = np.full(
        (len(rows) * (th + gutter) - gutter, per_row * (tw + gutter) - gutter, c), 255, np.uint8
    )
    for r, images in enumerate(rows):
        for k, img in enumerate(images[:per_row]):
            big = np.repeat(np.repeat(np.asarray(img), scale, axis=0), scale, axis=1)
            y, x = r * (th + gutter), k * (tw + gutter)
            grid[y : y + th, x : x + tw] = big
    return grid


def _split_rows(cache: CacheInfo, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The full split's memory map and the rows of it the (sub)set uses; no copy of the pixels
    (a subset's ``images()`` copies the whole split). A cross-validation fold's rows index the
    pooled train and val images."""
    pooled = split in getattr(cache, "pooled", ())
    images = PooledImages(cache.path) if pooled else CacheInfo.images(cache, split)
    rows = cache.rows(split)
    return images, np.arange(len(images)) if rows is None else np.asarray(rows)


def split_channel_stats(
    cache: CacheInfo, split: str, limit: int = STATS_LIMIT
) -> tuple[list[float], list[float], int, int]:
    """Per-channel mean and std (0..1 scale) of a split's images
    (:func:`dataset.cache.channel_stats`, as the cache computes the normalisation).

    Returns ``(mean, std, images read, images in the split)``: a split over ``limit`` images is
    read at ``limit`` evenly spaced rows.
    """
    images, rows = _split_rows(cache, split)
    total = len(rows)
    if total > limit:
        rows = rows[np.linspace(0, total - 1, limit).round().astype(np.int64)]
    if not len(rows):
        channels = images.shape[-1]
        return [math.nan] * channels, [math.nan] * channels, 0, total
    mean, std = channel_stats(images, chunk=_STATS_CHUNK, rows=rows)
    return mean, std, len(rows), total


def leakage_rows(meta: dict) -> tuple[list[list[str]], list[str]]:
    """The duplicate checks of a cache's ``meta.json`` as table rows, and warnings.

    Rows: check, within splits, across splits, images reaching an earlier split, label
    conflicts; one for exact copies (``meta["leakage"]``, :mod:`dataset.leakage`) and one for
    near copies (``meta["near_duplicates"]``, :mod:`dataset.near_duplicates`). A check that was
    not made says so in its row. Warnings name the splits whose scores the copies inflate.
    """
    rows: list[list[str]] = []
    warnings: list[str] = []
    leak = meta.get("leakage")
    if leak is None:
        rows.append(["exact duplicates", "not computed", "", "", ""])
    else:
        within = ", ".join(f"{s} {n}" for s, n in leak.get("within", {}).items() if n)
        across = ", ".join(
            f"{k} {n} ({leak.get('across_distinct', {}).get(k, n)} distinct)"
            for k, n in leak.get("across", {}).items()
        )
        leaked = ", ".join(
            f"{s} {n} ({leak.get('leaked_distinct', {}).get(s, n)} distinct)"
            for s, n in leak.get("leaked", {}).items()
        )
        rows.append(
            [
                "exact duplicates (identical pixels)",
                within or "none",
                across or "none",
                leaked or "none",
                str(leak.get("label_conflicts", 0)),
            ]
        )
        for split, n in leak.get("leaked", {}).items():
            warnings.append(
                f"{split}: {n} image(s) also occur in an earlier split, so {split} scores are "
                "optimistic"
                + (
                    "; data.drop_leaked_test=true rebuilds the cache without those test images"
                    if split == "test"
                    else ""
                )
            )
    near = meta.get("near_duplicates")
    if near is None:
        rows.append(
            [
                "near duplicates",
                "not computed (cache built before the check; python -m dataset prepare SOURCE "
                "--rebuild adds it)",
                "",
                "",
                "",
            ]
        )
    elif "skipped" in near:
        rows.append(["near duplicates", f"not checked ({near['skipped']})", "", "", ""])
    else:
        beyond = near.get("across_beyond_exact", {})
        within = ", ".join(f"{s} {n}" for s, n in near.get("within", {}).items() if n)
        across = ", ".join(
            f"{k} {n} ({beyond.get(k, 0)} not byte-identical)"
            for k, n in near.get("across", {}).items()
        )
        leaked = ", ".join(f"{s} {n}" for s, n in near.get("leaked", {}).items())
        rows.append(
            [
                f"near duplicates (hash distance <= {near.get('max_distance')} of "
                f"{near.get('bits')} bits; flips and rotations included): {near.get('groups', 0)} "
                f"group(s) of {near.get('images', 0)} images",
                (within + " group(s)") if within else "none",
                across or "none",
                leaked or "none",
                str(near.get("label_conflicts", 0)),
            ]
        )
        if any(beyond.values()):
            warnings.append(
                "near copies that are not byte-identical cross splits: "
                + ", ".join(f"{k} {n}" for k, n in beyond.items() if n)
                + " group(s); the exact check does not see them"
            )
    return rows, warnings


# ------------------------------------------------------------------ figures


def _counts_figure(cache: CacheInfo):
    from matplotlib.figure import Figure

    names = cache.class_names
    n = len(names)
    height = max(3.0, 0.42 * n + 1.4)
    fig = Figure(figsize=(11, height), layout="constrained")
    counts_ax, share_ax = fig.subplots(1, 2, sharey=True)
    y = np.arange(n)
    bar = 0.8 / len(SPLITS)
    for k, split in enumerate(SPLITS):
        counts = np.asarray(cache.counts(split), dtype=float)
        offset = (k - (len(SPLITS) - 1) / 2) * bar
        colour = _SPLIT_COLOURS.get(split)
        counts_ax.barh(y + offset, counts, height=bar, color=colour, label=split)
        share = 100 * counts / counts.sum() if counts.sum() else counts
        share_ax.barh(y + offset, share, height=bar, color=colour, label=split)
    # First class at the top, as in the tables.
    counts_ax.set_yticks(y, names)
    counts_ax.invert_yaxis()
    counts_ax.set_xlabel("images")
    counts_ax.set_title("images per class and split")
    counts_ax.legend(loc="lower right", fontsize=8)
    share_ax.set_xlabel("% of the split")
    share_ax.set_title("class share within each split")
    for ax in (counts_ax, share_ax):
        ax.grid(axis="x", alpha=0.3)
    return fig


def _grid_figure(grid: np.ndarray, names: Sequence[str], row_px: int, gutter: int):
    """The grid drawn at one image pixel per PNG pixel, the class names left of its rows."""
    from matplotlib.figure import Figure

    h, w = grid.shape[:2]
    top, bottom, right = 30, 6, 6
    label_px = 24 + _CHAR_PX * max((len(n) for n in names), default=4)
    width_px, height_px = label_px + w + right, top + h + bottom
    fig = Figure(figsize=(width_px / _DPI, height_px / _DPI))
    ax = fig.add_axes(
        (label_px / width_px, bottom / height_px, w / width_px, h / height_px), frameon=False
    )
    if grid.shape[2] < 3:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(grid[..., :3], interpolation="nearest")
    centres = [r * (row_px + gutter) + row_px / 2 for r in range(len(names))]
    ax.set_yticks(centres, names, fontsize=10)
    ax.set_xticks([])
    ax.tick_params(left=False)
    fig.suptitle("random training images per class", fontsize=11, y=1 - 8 / height_px, va="top")
    return fig


# ------------------------------------------------------------------ the section


def _fmt(values: Sequence[float] | None) -> str:
    if values is None:
        return "-"
    return ", ".join("nan" if math.isnan(v) else f"{v:.4f}" for v in values)


def _describe(section: Section, cache: CacheInfo, info: RunData) -> None:
    meta = cache.meta
    h, w, c = meta["image_shape"]
    src = meta.get("source", {})
    section.text(
        f"Source {info.source} ({src.get('kind', '?')}), cache {cache.path}: "
        f"{cache.num_classes} classes, {h}x{w} pixels, {c} channel(s)."
    )
    split = meta.get("split", {})
    carved = [
        f"{s} {split[s]} (fraction {split.get(f'{s}_fraction')}, seed {split.get('seed')})"
        for s in ("val", "test")
        if split.get(s) not in (None, "source")
    ]
    if carved:
        section.text("Splits: " + "; ".join(carved) + ".")
    for note in meta.get("notes", []):
        section.note(f"cache: {note}")
    for note in info.notes:
        section.note(note)


def _samples(page: Page, section: Section, cache: CacheInfo) -> None:
    labels = cache.labels("train")
    picks = sample_indices(labels, cache.num_classes)
    images, rows = _split_rows(cache, "train")
    per_class = [np.asarray(images[rows[p]]) if len(p) else images[:0] for p in picks]
    scale = upscale_factor(cache.image_size)
    grid = thumbnail_grid(per_class, SAMPLES_PER_CLASS, scale)
    fig = _grid_figure(grid, cache.class_names, cache.image_size * scale, _GUTTER)
    shown = "greyscale" if cache.channels == 1 else "RGB" if cache.channels == 3 else "channels"
    section.figures(
        [
            page.save(
                fig,
                "data_samples",
                f"{SAMPLES_PER_CLASS} random training images per class (seed {SAMPLE_SEED}), "
                f"{cache.image_size} px shown {scale}x with nearest-neighbour pixels ({shown}"
                + (", first three channels" if cache.channels > 3 else "")
                + (", first channel" if cache.channels == 2 else "")
                + ").",
            )
        ],
        page.folder,
    )


def _channel_table(section: Section, cache: CacheInfo, info: RunData) -> None:
    channels = cache.channels
    names = ["grey"] if channels == 1 else ["R", "G", "B"] if channels == 3 else None
    names = names or [f"c{i}" for i in range(channels)]
    headers = ["split", "images", *(f"mean {n}" for n in names), *(f"std {n}" for n in names)]
    rows, sampled = [], []
    for split in SPLITS:
        mean, std, read, total = split_channel_stats(cache, split)
        if read < total:
            sampled.append(f"{split} from {read} of {total} images")
        rows.append([split, total, *(f"{m:.4f}" for m in mean), *(f"{s:.4f}" for s in std)])
    if info.mean is not None and info.std is not None:
        rows.append(
            [
                "normalisation used",
                "",
                *(f"{m:.4f}" for m in info.mean),
                *(f"{s:.4f}" for s in info.std),
            ]
        )
    section.heading("Channel statistics (0-1 scale)")
    section.table(headers, rows)
    text = f"The normalisation row is from {info.stats_from}." if info.stats_from else ""
    if sampled:
        text += " Statistics of " + "; ".join(sampled) + " (evenly spaced rows)."
    if text:
        section.text(text.strip())


def add_data_section(page: Page, run: RunFolder) -> None:
    """Add the "Data" section: counts, sample images, channel statistics and duplicate checks
    of the images the run trained on; a note instead when the cache cannot be opened."""
    section = page.section("data", "Data")
    info = open_run_data(run)
    cache = info.cache
    if cache is None:
        section.note(f"The data of this run cannot be shown: {info.problem}.")
        for note in info.notes:
            section.note(note)
        if info.mean is not None:
            section.text(
                f"Normalisation the run used (checkpoint): mean {_fmt(info.mean)}, "
                f"std {_fmt(info.std)}."
            )
        return
    _describe(section, cache, info)
    section.heading("Images per class")
    section.table(["class", *SPLITS, "all"], count_rows(cache))
    section.figures(
        [
            page.save(
                _counts_figure(cache),
                "data_counts",
                "Images per class in each split (left) and each class's share of its split "
                "(right): the shares match when the splits are stratified.",
            )
        ],
        page.folder,
    )
    _samples(page, section, cache)
    _channel_table(section, cache, info)
    section.heading("Duplicates across and within splits")
    rows, warnings = leakage_rows(cache.meta)
    section.table(
        ["check", "within splits", "across splits", "reaching an earlier split", "label conflicts"],
        rows,
    )
    for warning in warnings:
        section.note(warning)
    if cache.meta.get("subset"):
        section.text(
            "Duplicate counts are of the whole cache, before the run's class or training "
            "subset was taken."
        )
