"""Evaluate a run's saved weights on the test split: metrics, a rich report, JSON and figures.

A run folder holds ``checkpoints/best.pt`` (and ``last.pt``, and ``swa.pt`` when SWA ran). Each
weight set is rebuilt from its checkpoint alone (model config, depth, class names, the training
set's mean/std) and scored on the test split of the cache the run trained on, or of another source
with the same classes (``data=``).

A checkpoint with a ``"temperature"`` (fitted on the validation set, see
``training.calibration``) also gets a ``<name>+T`` row: the same test logits divided by T, so
accuracy and F1 are unchanged and only NLL and ECE move. A checkpoint whose temperature was kept
at 1 because the validation set could not identify one (``"temperature_reason"``) gets no such
row; the report says why instead.

With test-time augmentation (``run.tta`` of the run, or ``tta=``; see ``training.tta``) every
row's logits are the mean over the mode's flipped and rotated views. The temperature is fitted
under the run's own mode (``"temperature_tta"`` in the checkpoint) and is only applied to logits
of that same mode.

Public API:
    checkpoint_temperature, checkpoint_temperature_reason, build_model, test_loader,
    find_weights, load_weight_set, latest_run, evaluate_run, run_tta, print_report, save_report,
    prepare_kwargs, temperature_notes, weight_label, final_of, SUMMARY_METRICS, WEIGHT_FILES,
    WEIGHT_METADATA, FINAL_ORDER.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from dataset.cache import CacheInfo, load_cache, prepare
from dataset.errors import DataError
from dataset.npy_dataset import NpyDataset
from dataset.subset import subset_cache
from dataset.transforms import eval_transform
from models.registry import build_from_record
from models.staged import StagedModel
from training.engine.atomic import write_atomically
from training.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_record,
    restore_model,
)
from training.engine.checks import one_line
from training.engine.data import resolve_workers
from training.engine.device import amp_dtype as resolve_amp_dtype
from training.engine.device import resolve_device
from training.engine.inference import predict
from training.evaluation.calibration import reliability_diagram
from training.evaluation.metrics import ECE_BINS, scored_metrics
from training.evaluation.tta import resolve_tta

#: weight-set name -> file under ``run_dir/checkpoints/``, in report order.
WEIGHT_FILES: dict[str, str] = {"best": "best.pt", "last": "last.pt", "swa": "swa.pt"}


#: The weight set a run ends with is the first of these it has: the SWA average when SWA ran,
#: else the best on validation, else the last (a run that never scored its validation set).
FINAL_ORDER: tuple[str, ...] = ("swa", "best", "last")


def final_of(names: Iterable[str]) -> str | None:
    """The first of :data:`FINAL_ORDER` among ``names``; ``None`` when there is none."""
    present = set(names)
    return next((name for name in FINAL_ORDER if name in present), None)


#: checkpoint keys a weight set needs to be rebuilt and used; an SWA checkpoint written without
#: them borrows them from the run's other checkpoint.
WEIGHT_METADATA: tuple[str, ...] = ("model_record", "class_names", "mean", "std", "data", "config")


REPORT_JSON = "test_report.json"


REPORT_PNG = "confusion_matrix.png"


RELIABILITY_PNG = "reliability.png"


#: checkpoint key of the softmax temperature fitted on the validation set.
TEMPERATURE_KEY = "temperature"


#: checkpoint key of the test-time augmentation mode the temperature was fitted under.
TEMPERATURE_TTA_KEY = "temperature_tta"


#: checkpoint key of why the temperature was kept at 1 (not identifiable on the validation set).
TEMPERATURE_REASON_KEY = "temperature_reason"


#: the keys of a weight set's own temperature fit, never taken from another checkpoint.
_TEMPERATURE_KEYS = (TEMPERATURE_KEY, TEMPERATURE_TTA_KEY, TEMPERATURE_REASON_KEY)


#: suffix of the weight-set row whose logits are divided by the checkpoint's temperature.
SCALED_SUFFIX = "+T"


# Keyword arguments of dataset.cache.prepare, by their name in the training config's data section.
_PREPARE_ARGS: dict[str, str] = {
    "val_fraction": "val_fraction",
    "test_fraction": "test_fraction",
    "split_seed": "seed",
    "image_size": "image_size",
    "strict_size": "strict_size",
    "drop_leaked_test": "drop_leaked_test",
}


def build_model(ckpt: dict) -> StagedModel:
    """The checkpoint's network with its weights, at the depth it was saved at (on the CPU),
    rebuilt from the checkpoint alone (its model record: any registered arch)."""
    try:
        model = build_from_record(model_record(ckpt))
    except ValueError as error:
        raise CheckpointError(f"checkpoint's model cannot be rebuilt: {error}") from None
    restore_model(model, ckpt)
    return model


def prepare_kwargs(ckpt: dict) -> dict[str, Any]:
    """The cache-building options the run trained with, so a rebuild gives the same splits."""
    data_cfg = (ckpt.get("config") or {}).get("data") or {}
    kwargs = {arg: data_cfg[key] for key, arg in _PREPARE_ARGS.items() if key in data_cfg}
    if "image_size" in kwargs:  # the config's 0 is prepare's None: the folder's common size
        kwargs["image_size"] = kwargs["image_size"] or None
    return kwargs


def _checkpoint_cache(ckpt: dict) -> CacheInfo:
    data = ckpt["data"]
    cache_dir = Path(data["cache"])
    try:
        return load_cache(cache_dir)
    except DataError:
        # The cache was deleted or damaged since training: rebuild it where it was.
        cache, _ = prepare(
            data["source"], cache_dir.parent, name=cache_dir.name, **prepare_kwargs(ckpt)
        )
        return cache


def _checkpoint_classes(ckpt: dict) -> list[str]:
    """The class subset the run trained on (its config's ``data.classes``); [] for all."""
    data_cfg = (ckpt.get("config") or {}).get("data") or {}
    return [str(name) for name in data_cfg.get("classes") or []]


def _select_classes(cache: CacheInfo, ckpt: dict, source: str) -> CacheInfo:
    """The test split restricted to the run's class subset, if it trained on one.

    Only the classes are selected: ``data.train_fraction`` reduced the training split alone.
    """
    classes = _checkpoint_classes(ckpt)
    try:
        return subset_cache(cache, classes)
    except ValueError as error:
        raise DataError(source, f"the run trained on a class subset: {error}") from None


def _check_compatible(cache: CacheInfo, ckpt: dict, source: str) -> None:
    expected = list(ckpt["class_names"])
    if cache.class_names != expected:
        raise DataError(
            source,
            f"class names {cache.class_names} differ from the checkpoint's {expected}; "
            "evaluate on data with the classes the model was trained on",
        )
    in_channels = model_record(ckpt).get("in_channels")
    if in_channels is not None and cache.channels != in_channels:
        raise DataError(
            source, f"images have {cache.channels} channel(s), the model expects {in_channels}"
        )


def test_loader(
    ckpt: dict, data_override: str | None, batch_size: int, workers: int
) -> tuple[DataLoader, CacheInfo]:
    """A loader over the test split that the checkpoint's model can score.

    Args:
        ckpt: a checkpoint dict (see ``training.checkpoint``).
        data_override: another source (MedMNIST name, ``.npz`` or folder) to test on instead of
            the run's own cache; it must have the checkpoint's class names. Its cache is built
            beside the run's cache.
        batch_size: images per batch.
        workers: DataLoader worker processes.

    Images are normalised with the checkpoint's mean/std, the statistics the model was trained
    with, not those of the (possibly different) test cache. A run trained on a class subset
    (``data.classes`` in the checkpoint's config) is tested on the images of those classes
    only, labelled as in training; ``data_override`` must then hold those classes.
    """
    if data_override is None:
        cache, source = _checkpoint_cache(ckpt), str(ckpt["data"]["source"])
    else:
        root = Path(ckpt["data"]["cache"]).parent
        cache, source = prepare(data_override, root)[0], str(data_override)
    cache = _select_classes(cache, ckpt, source)
    _check_compatible(cache, ckpt, source)
    dataset = NpyDataset(cache, "test", eval_transform(ckpt["mean"], ckpt["std"]))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, cache


def checkpoint_temperature(ckpt: Mapping, path: Path) -> float | None:
    """The softmax temperature saved in a checkpoint, or None when it has none (not fitted).

    Raises:
        CheckpointError: when the value is not a finite number > 0; the message names the file,
            the key and the value.
    """
    if TEMPERATURE_KEY not in ckpt:
        return None
    value = ckpt[TEMPERATURE_KEY]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and value > 0):
        shown = one_line(repr(value))
        shown = shown if len(shown) <= 60 else f"{shown[:57]}..."
        raise CheckpointError(
            f"checkpoint {path}: key {TEMPERATURE_KEY!r} is {shown}; allowed: a finite number > 0"
        )
    return float(value)


def checkpoint_temperature_reason(ckpt: Mapping) -> str | None:
    """Why a checkpoint's temperature was kept at 1, on one line; None when it was fitted."""
    reason = ckpt.get(TEMPERATURE_REASON_KEY)
    return None if reason is None else one_line(reason)


def find_weights(run_dir: Path) -> dict[str, Path]:
    """The weight sets of a run: ``best``, else ``last``; plus ``swa`` when present.

    Raises:
        FileNotFoundError: when the run folder or every checkpoint is missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    folder = run_dir / "checkpoints"
    present = {n: folder / f for n, f in WEIGHT_FILES.items() if (folder / f).is_file()}
    if "best" in present:
        present.pop("last", None)  # last is the fallback for a run that never scored val
    if not present:
        raise FileNotFoundError(
            f"no checkpoints in {folder}: train first with python models/train.py"
        )
    return present


def load_weight_set(run_dir: Path, name: str) -> dict:
    """The checkpoint of a run's weight set ``name`` (``best``, ``last`` or ``swa``), with the
    metadata it lacks (:data:`WEIGHT_METADATA`) taken from the run's best or last checkpoint.

    Raises:
        FileNotFoundError: the run has no file for ``name``.
        CheckpointError: a checkpoint cannot be read, or nothing holds the missing metadata.
    """
    if name not in WEIGHT_FILES:
        raise ValueError(f"weights={name!r} is invalid; allowed: {' | '.join(WEIGHT_FILES)}")
    folder = Path(run_dir) / "checkpoints"
    path = folder / WEIGHT_FILES[name]
    if not path.is_file():
        present = [n for n, f in WEIGHT_FILES.items() if (folder / f).is_file()]
        raise FileNotFoundError(
            f"{path} does not exist; this run has: {', '.join(present) or 'no checkpoints'}"
        )
    ckpt = load_checkpoint(path)
    missing = [key for key in WEIGHT_METADATA if key not in ckpt]
    if not missing:
        return ckpt
    for other in ("best", "last"):
        other_path = folder / WEIGHT_FILES[other]
        if other != name and other_path.is_file():
            # A weight set never borrows another's temperature: T was fitted to its own logits.
            borrowed = load_checkpoint(other_path)
            for key in _TEMPERATURE_KEYS:
                borrowed.pop(key, None)
            return {**borrowed, **ckpt}
    raise CheckpointError(
        f"{path} lacks {', '.join(missing)} and the run has no other checkpoint to take them from"
    )


def latest_run(root: Path = Path("runs")) -> Path:
    """The run folder under ``root`` whose newest checkpoint is the most recent.

    Raises:
        FileNotFoundError: when no folder under ``root`` has a checkpoint.
    """
    newest: dict[Path, float] = {}
    for folder in Path(root).glob("*/checkpoints"):
        times = [p.stat().st_mtime for p in folder.glob("*.pt")]
        if times:
            newest[folder.parent] = max(times)
    if not newest:
        raise FileNotFoundError(
            f"no run with checkpoints under {root}/: train first with python models/train.py"
        )
    return max(newest, key=newest.__getitem__)


def evaluate_run(
    run_dir: Path,
    *,
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 256,
    workers: int = -1,
    amp: str = "off",
    tta: str | None = None,
) -> dict[str, Any]:
    """Score every weight set of a run on the test split.

    Args:
        run_dir: the run folder (with ``checkpoints/``).
        data: another source to test on (see :func:`test_loader`); ``None`` uses the run's.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        batch_size: images per batch, >= 1.
        workers: DataLoader workers; -1 picks (none on the CPU, 4 on an accelerator).
        amp: autocast mode "off", "auto", "fp16" or "bf16"; "off" gives exact fp32 scores.
        tta: test-time augmentation mode (see ``training.tta``); ``None`` uses the run's own
            ``run.tta`` ("none" for a run from before the option). A temperature fitted under
            another mode does not fit these logits: that weight set then gets no scaled row.

    Returns:
        ``{"weights": {row: metrics}, "checkpoints": {name: {file, epoch, temperature,
        temperature_tta}}, "dataset": name, "class_names": [...], "n_test": int,
        "ece_bins": int, "tta": the resolved mode}``. The rows are
        each weight set (``temperature`` 1.0) followed, when its checkpoint has a temperature T,
        by ``<name>+T`` (the same logits divided by T, with ``scaled_from``: the weight set);
        metrics come from :func:`scored_metrics`. ``checkpoints[name]["temperature"]`` is the
        saved T, or None when the checkpoint has none; ``temperature_reason`` says why T was kept
        at 1 (no scaled row then), None when it was fitted.

    Raises:
        CheckpointError: on an unreadable checkpoint or an invalid saved temperature.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an int >= 1")
    files = find_weights(run_dir)
    dev = resolve_device(device)
    dtype = resolve_amp_dtype(dev, amp)
    ckpts = {name: load_checkpoint(path) for name, path in files.items()}
    # Checked before any forward pass, so a bad value fails at once. Read from each file itself:
    # a weight set never borrows another's temperature.
    temperatures = {name: checkpoint_temperature(ckpts[name], files[name]) for name in ckpts}
    reference = next(iter(ckpts.values()))
    loader, cache = test_loader(reference, data, batch_size, resolve_workers(workers, dev))
    mode = resolve_tta(run_tta(reference) if tta is None else tta, cache.channels)
    report: dict[str, Any] = {
        "dataset": cache.name,
        "class_names": list(reference["class_names"]),
        "n_test": len(loader.dataset),
        "ece_bins": ECE_BINS,
        "tta": mode,
        "checkpoints": {},
        "weights": {},
    }
    for name, ckpt in ckpts.items():
        # A weight set saved without metadata (an SWA model, say) borrows the reference's.
        model = build_model({**reference, **ckpt})
        logits, labels = predict(model, loader, dev, dtype, tta=mode)
        fitted_for = str(ckpt.get(TEMPERATURE_TTA_KEY, "none"))
        reason = checkpoint_temperature_reason(ckpt)
        # A kept T = 1 would repeat the weight set's own row.
        fitted = fitted_for == mode and reason is None
        temperature = temperatures[name] if fitted else None
        report["weights"].update(
            _weight_rows(name, files[name], logits, labels, report["class_names"], temperature)
        )
        report["checkpoints"][name] = {
            "file": str(files[name]),
            "epoch": ckpt.get("epoch"),
            "temperature": temperatures[name],
            "temperature_tta": fitted_for,
            TEMPERATURE_REASON_KEY: reason,
        }
    return report


def run_tta(ckpt: Mapping) -> str:
    """The ``run.tta`` a checkpoint's run was configured with; "none" when it has none."""
    run = (ckpt.get("config") or {}).get("run") or {}
    return str(run.get("tta", "none"))


def _weight_rows(
    name: str,
    path: Path,
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    temperature: float | None,
) -> dict[str, dict[str, Any]]:
    """The report rows of one weight set: its own, and ``<name>+T`` when it has a temperature."""
    try:
        rows = {name: scored_metrics(logits, labels, class_names)}
        if temperature is not None:
            scaled = scored_metrics(logits, labels, class_names, temperature)
            rows[name + SCALED_SUFFIX] = {**scaled, "scaled_from": name}
    except ValueError as error:  # NaN or inf logits: say which weights gave them
        raise ValueError(f"{name} weights ({path}): {error}") from error
    return rows


#: (label, key) of the figures each weight set's summary shows, in order.
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"),
    ("macro-F1", "macro_f1"),
    ("balanced accuracy", "balanced_accuracy"),
    ("NLL", "nll"),
    ("ECE", "ece"),
)


def _main_sets(report: dict) -> list[str]:
    """The weight sets scored by a forward pass, without their temperature-scaled rows."""
    return [name for name, m in report["weights"].items() if "scaled_from" not in m]


def weight_label(report: dict, name: str, *, console: bool = True) -> str:
    """A weight set's label: ``best (epoch 12)``, or for a temperature-scaled row ``best+T`` and
    its T, on a second line for the console (so four columns fit in 80 characters), in brackets
    on the report page."""
    metrics = report["weights"].get(name, {})
    if "scaled_from" in metrics:
        if console:
            return f"{name}\nT={metrics['temperature']:.2f}"
        return f"{name} (T={metrics['temperature']:.3f})"
    epoch = report.get("checkpoints", {}).get(name, {}).get("epoch")
    return name if epoch is None else f"{name} (epoch {epoch})"


def _summary_table(report: dict) -> Table:
    table = Table(title="summary", box=box.SIMPLE_HEAD)
    table.add_column("metric")
    for name in report["weights"]:
        table.add_column(weight_label(report, name), justify="right")
    rows = report["weights"].values()
    for label, key in SUMMARY_METRICS:
        if any(key in m for m in rows):  # a report from before ECE has no ECE row
            table.add_row(label, *(f"{m[key]:.4f}" if key in m else "-" for m in rows))
    return table


def temperature_notes(report: dict) -> list[str]:
    """One line per weight set that has no temperature-scaled row, saying why."""
    notes = []
    mode = report.get("tta", "none")
    for name, info in report.get("checkpoints", {}).items():
        file = Path(info.get("file", name)).name
        if info.get(TEMPERATURE_REASON_KEY):
            notes.append(
                f"{name}: temperature kept at 1 in {file}: {info[TEMPERATURE_REASON_KEY]}; "
                "the validation split may leak into training; no temperature-scaled row"
            )
        elif TEMPERATURE_KEY in info and info[TEMPERATURE_KEY] is None:
            notes.append(
                f"{name}: temperature not fitted ({file} has no {TEMPERATURE_KEY!r}); "
                "no temperature-scaled row"
            )
        elif info.get(TEMPERATURE_KEY) is not None and info.get(TEMPERATURE_TTA_KEY, mode) != mode:
            fitted = info[TEMPERATURE_TTA_KEY]
            notes.append(
                f"{name}: the temperature in {file} was fitted with tta={fitted}, "
                f"these logits use tta={mode}; no temperature-scaled row"
            )
    return notes


def _per_class_table(report: dict) -> Table:
    table = Table(title="per class: precision / recall / F1", box=box.SIMPLE_HEAD)
    table.add_column("class")
    table.add_column("support", justify="right")
    names = _main_sets(report)  # a +T row has its weight set's predictions, so the same scores
    for name in names:
        for score in ("P", "R", "F1"):
            table.add_column(f"{name} {score}", justify="right")
    rows = zip(*(report["weights"][name]["per_class"] for name in names), strict=True)
    for per_set in rows:
        cells = [f"{c[k]:.3f}" for c in per_set for k in ("precision", "recall", "f1")]
        table.add_row(per_set[0]["class"], str(per_set[0]["support"]), *cells)
    return table


def _confusion_table(report: dict, name: str) -> Table:
    matrix = report["weights"][name]["confusion_matrix"]
    table = Table(title=f"confusion: {name}", box=box.SIMPLE_HEAD)
    table.add_column("true \\ pred")
    for j in range(len(matrix)):
        table.add_column(str(j), justify="right")
    for i, (cls, row) in enumerate(zip(report["class_names"], matrix, strict=True)):
        # The diagonal (correct predictions) in bold, so confusions stand out from hits.
        cells = [f"[bold]{v}[/]" if i == j else str(v) for j, v in enumerate(row)]
        table.add_row(f"{i} {cls}", *cells)
    return table


def _tta_text(mode: str) -> str:
    if mode == "none":
        return ""
    views = {"hflip": 2, "d4": 8}[mode]
    return f", logits averaged over {views} views (tta={mode})"


def print_report(report: dict, console: Console) -> None:
    """Print the summary, per-class scores and confusion matrices, weight sets side by side.

    The summary has a column per row of ``report["weights"]`` (temperature-scaled ones included,
    with a note for each weight set that has no fitted temperature); the per-class scores and
    confusion matrices are those of the weight sets themselves, which T does not change.
    """
    console.print(
        f"[bold]test set[/]: {report['dataset']}, {report['n_test']} images"
        f"{_tta_text(report.get('tta', 'none'))}",
        highlight=False,
    )
    console.print(_summary_table(report))
    for note in temperature_notes(report):
        console.print(note, highlight=False, soft_wrap=True)
    console.print(_per_class_table(report))
    console.print("confusion matrices: rows are the true class, column j the predicted class j")
    console.print(Columns([_confusion_table(report, name) for name in _main_sets(report)]))


def _plot_confusion(report: dict, path: Path) -> None:
    # Figure without pyplot: the Agg canvas renders it, and no global backend state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = _main_sets(report)
    n_classes = len(report["class_names"])
    side = max(4.0, 0.55 * n_classes + 2.5)
    fig = Figure(figsize=(side * len(names), side), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names, strict=True):
        matrix = np.asarray(report["weights"][name]["confusion_matrix"])
        ax.imshow(matrix, cmap="Blues", vmin=0)
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), count in np.ndenumerate(matrix):
            colour = "white" if count > threshold else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
        ticks = range(n_classes)
        ax.set_xticks(ticks, report["class_names"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(ticks, report["class_names"], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{weight_label(report, name)}: acc {report['weights'][name]['accuracy']:.3f}")
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight", pad_inches=0.15)


def save_report(report: dict, run_dir: Path) -> tuple[Path, ...]:
    """Write ``test_report.json``, ``confusion_matrix.png`` and ``reliability.png``, atomically.

    The reliability diagram has one curve per row of ``report["weights"]`` that carries
    reliability bins (see :func:`scored_metrics`); a report without any gets no diagram.

    Returns:
        The paths written: the JSON report, the confusion figure, and the reliability diagram.
    """
    run_dir = Path(run_dir)
    json_path, png_path = run_dir / REPORT_JSON, run_dir / REPORT_PNG
    text = json.dumps(report, indent=2) + "\n"
    write_atomically(json_path, lambda tmp: tmp.write_text(text))
    write_atomically(png_path, lambda tmp: _plot_confusion(report, tmp))
    curves = {
        _curve_label(name, m): m["reliability"]
        for name, m in report["weights"].items()
        if "reliability" in m
    }
    if not curves:
        return json_path, png_path
    # reliability_diagram writes through a temp file and os.replace, like write_atomically.
    return json_path, png_path, reliability_diagram(curves, run_dir / RELIABILITY_PNG, ECE_BINS)


def _curve_label(name: str, metrics: dict) -> str:
    return f"{name} (T={metrics['temperature']:.2f})" if "scaled_from" in metrics else name
