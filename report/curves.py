"""The report's "Training" section: what ``metrics.jsonl`` logged, epoch by epoch.

Learning curves, learning rates, the regularisation schedule, the class penalty and the
throughput, with vertical lines where something changed the course of training (a stage joined,
a rollback, SWA began, training stopped early), and a table of every event the callbacks logged.
An event is drawn at the epoch whose log line records it: decisions are taken after the epoch's
validation, so the line sits at the end of that epoch.

Public API:
    add_training_section, event_epochs, event_rows, group_names, MARKERS.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from report.data_section import class_names_of
from report.page import Figure, Page
from report.run import RunFolder, epoch_rows

#: Marker kind -> (legend label, colour, line style) of its vertical lines.
MARKERS: dict[str, tuple[str, str, str]] = {
    "stage": ("stage joined", "#2ca02c", "-"),
    "rollback": ("rollback", "#d62728", "--"),
    "swa": ("SWA start", "#9467bd", "-."),
    "stop": ("early stop", "#333333", ":"),
}
_TRAIN, _VAL = "#1f77b4", "#ff7f0e"
_WIDTH = 11.5  # inches at Page.save's 100 dpi
# "learning rates now: block1 3.00e-03, block2 6.00e-03" in a stage event's lines.
_RATES_LINE = re.compile(r"learning rates now:\s*(.*)")


def _run_end(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ends = [m for m in metrics if m.get("event") == "fit_end"]
    return ends[-1] if ends else {}


def event_epochs(metrics: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Epochs at which to mark each kind of :data:`MARKERS`, sorted, each epoch once.

    ``stage``: a block joined (event kind ``stage``). ``rollback``: weights restored (a
    ``rollback`` event titled ``ROLLBACK``). ``swa``: the first averaged epoch (``SWA started``,
    else the first line with ``swa_models``). ``stop``: early stopping or divergence (a ``stop``
    event titled "early stopping", an ``early_stop`` entry, a "training diverged" rollback
    event, or the ``fit_end`` line's ``stopped`` reason, at the last epoch).
    """
    found: dict[str, set[int]] = {kind: set() for kind in MARKERS}
    rows = epoch_rows(metrics)
    for row in rows:
        epoch = int(row["epoch"])
        for event in row.get("events") or []:
            kind, title = event.get("kind"), str(event.get("title", ""))
            if kind == "stage":
                found["stage"].add(epoch)
            elif kind == "rollback" and title.startswith("ROLLBACK"):
                found["rollback"].add(epoch)
            elif kind == "rollback" and "diverged" in title:
                found["stop"].add(epoch)
            elif kind == "swa" and title.startswith("SWA started"):
                found["swa"].add(epoch)
            elif kind == "stop" and title.startswith("early stop"):
                found["stop"].add(epoch)
        if row.get("early_stop"):
            found["stop"].add(epoch)
    if not found["swa"]:
        averaged = [int(r["epoch"]) for r in rows if r.get("swa_models")]
        found["swa"].update(averaged[:1])
    stopped = _run_end(metrics).get("stopped")
    if stopped and stopped != "interrupted" and not found["stop"] and rows:
        found["stop"].add(int(rows[-1]["epoch"]))
    return {kind: sorted(epochs) for kind, epochs in found.items()}


def event_rows(metrics: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the events table: epoch, kind, title, details (the event's lines, joined)."""
    return [
        [
            row["epoch"],
            event.get("kind", ""),
            event.get("title", ""),
            "; ".join(str(line) for line in event.get("lines") or []),
        ]
        for row in epoch_rows(metrics)
        for event in row.get("events") or []
    ]


def group_names(metrics: Sequence[dict[str, Any]], count: int) -> list[str]:
    """Names of the first ``count`` optimizer parameter groups.

    The log holds the rates only; a stage event lists the groups by name ("learning rates now:
    block1 3.00e-03, ..."), so the last such list names them. A group it does not reach is
    ``group i`` (from 1).
    """
    names: list[str] = []
    for row in epoch_rows(metrics):
        for event in row.get("events") or []:
            for line in event.get("lines") or []:
                match = _RATES_LINE.match(str(line))
                if match:
                    names = [part.strip().rsplit(" ", 1)[0] for part in match[1].split(",")]
    return [names[i] if i < len(names) and names[i] else f"group {i + 1}" for i in range(count)]


def _series(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """One number per epoch (NaN where a line lacks it or it is not a number)."""
    values = []
    for row in rows:
        value = row.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        values.append(float(value) if ok else math.nan)
    return np.asarray(values, dtype=float)


def _list_series(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """``(epochs, n)`` from a list per epoch (lr, dropout, class_penalty); shorter lists (a
    group that joined later) are NaN-padded. ``(epochs, 0)`` when none is logged."""
    lists = [row.get(key) if isinstance(row.get(key), list) else [] for row in rows]
    width = max((len(v) for v in lists), default=0)
    out = np.full((len(rows), width), math.nan)
    for i, values in enumerate(lists):
        for j, value in enumerate(values):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[i, j] = value
    return out


# ------------------------------------------------------------------ drawing helpers


def _new_figure(height: float, panels: int):
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(_WIDTH, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _epoch_axis(ax, epochs: np.ndarray) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
    ax.set_xlabel("epoch")
    if len(epochs):
        ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
    ax.grid(alpha=0.3)


def _mark_events(ax, marks: dict[str, list[int]]) -> None:
    for kind, epochs in marks.items():
        label, colour, style = MARKERS[kind]
        for epoch in epochs:
            ax.axvline(epoch, color=colour, linestyle=style, linewidth=1.2, alpha=0.8, zorder=1)


def _marker_handles(marks: dict[str, list[int]]) -> list:
    from matplotlib.lines import Line2D

    handles = []
    for kind, epochs in marks.items():
        if epochs:
            label, colour, style = MARKERS[kind]
            at = ", ".join(str(e) for e in epochs[:6]) + ("..." if len(epochs) > 6 else "")
            handles.append(
                Line2D([], [], color=colour, linestyle=style, label=f"{label} (epoch {at})")
            )
    return handles


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}\nnot logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------ figures


def _curves_figure(rows, marks, end: dict) -> tuple[Any, list[str]]:
    """Loss, accuracy and macro-F1, train and val; returns the figure and what is missing."""
    epochs = _series(rows, "epoch")
    fig, axes = _new_figure(4.3, 3)
    missing = []
    panels = (("loss", "loss"), ("acc", "accuracy"), ("macro_f1", "macro-F1"))
    titles = {}
    monitor, best = end.get("monitor"), end.get("best_epoch")
    for ax, (key, title) in zip(axes, panels, strict=True):
        drawn = False
        for split, colour, style in (("train", _TRAIN, "-"), ("val", _VAL, "-")):
            values = _series(rows, f"{split}_{key}")
            if np.isnan(values).all():
                missing.append(f"{split}_{key}")
                titles[key] = f"{title} ({split} not logged)"
                continue
            ax.plot(epochs, values, color=colour, linestyle=style, marker="o", ms=3, label=split)
            drawn = True
            if monitor == f"{split}_{key}" and best in list(epochs):
                i = list(epochs).index(best)
                ax.plot(best, values[i], marker="*", ms=13, color=colour, linestyle="none",
                        markeredgecolor="black", label=f"best epoch ({monitor})")  # fmt: skip
        if not drawn:
            _empty(ax, title)
            continue
        _mark_events(ax, marks)
        _epoch_axis(ax, epochs)
        ax.set_title(titles.get(key, title))
        ax.set_ylabel(title)
        if key == "loss":
            finite = _series(rows, "train_loss"), _series(rows, "val_loss")
            values = np.concatenate(finite)
            values = values[np.isfinite(values) & (values > 0)]
            # One diverged epoch (val loss 100x the rest) would flatten every other epoch.
            if len(values) and values.max() / values.min() > 30:
                ax.set_yscale("log")
                ax.set_ylabel("loss (log scale)")
        else:
            ax.set_ylim(-0.02, 1.02)
        # The curves fall (loss) or rise (scores): the opposite corner stays free.
        ax.legend(fontsize=8, loc="upper right" if key == "loss" else "lower right")
    handles = _marker_handles(marks)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    return fig, missing


def _lr_figure(rows, marks, names: list[str]):
    epochs = _series(rows, "epoch")
    lrs = _list_series(rows, "lr")
    fig, (ax,) = _new_figure(3.8, 1)
    for j in range(lrs.shape[1]):
        ax.plot(epochs, lrs[:, j], marker="o", ms=3, label=names[j])
    _mark_events(ax, marks)
    _epoch_axis(ax, epochs)
    if np.isfinite(lrs).any() and (lrs[np.isfinite(lrs)] > 0).all():
        ax.set_yscale("log")
    ax.set_ylabel("learning rate (log scale)")
    ax.set_title("learning rate per parameter group (at the end of each epoch)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _regularisation_figure(rows, marks):
    epochs = _series(rows, "epoch")
    fig, axes = _new_figure(3.4, 4)
    dropout = _list_series(rows, "dropout")
    if dropout.shape[1] and np.isfinite(dropout).any():
        for j in range(dropout.shape[1]):
            axes[0].plot(epochs, dropout[:, j], marker="o", ms=3, label=f"block {j + 1}")
        axes[0].legend(fontsize=7)
    panels = (
        (axes[0], None, "dropout per block", "dropout rate"),
        (axes[1], "mixup_alpha", "Mixup alpha", "alpha"),
        (axes[2], "aug_strength", "augmentation strength", "strength"),
        (axes[3], "active_blocks", "active blocks", "blocks"),
    )
    for ax, key, title, label in panels:
        if key is not None:
            values = _series(rows, key)
            if np.isfinite(values).any():
                if key == "active_blocks":
                    ax.step(epochs, values, where="post", color="#444444")
                else:
                    ax.plot(epochs, values, marker="o", ms=3, color="#444444")
        ax.set_title(title, fontsize=10)
        if not ax.lines:
            _empty(ax, title)
            continue
        _mark_events(ax, marks)
        _epoch_axis(ax, epochs)
        ax.set_ylabel(label)
        drawn = np.concatenate([np.asarray(line.get_ydata(), float) for line in ax.lines])
        top = float(np.nanmax(drawn)) if np.isfinite(drawn).any() else 0.0
        if key == "active_blocks":
            from matplotlib.ticker import MaxNLocator

            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(float(np.nanmin(drawn)) - 0.5, top + 0.5)
        else:
            # From 0: a constant 0.01 would otherwise fill the panel with ticks 0.0096..0.0104.
            ax.set_ylim(0.0, top * 1.15 if top > 0 else 1.0)
    return fig


def _penalty_figure(rows, marks, names: list[str]):
    epochs = _series(rows, "epoch")
    penalty = _list_series(rows, "class_penalty")
    fig, (ax,) = _new_figure(4.0, 1)
    colours = _class_colours(penalty.shape[1])
    for j in range(penalty.shape[1]):
        ax.plot(epochs, penalty[:, j], marker="o", ms=3, color=colours[j], label=names[j])
    ax.axhline(1.0, color="#999999", linewidth=0.8)
    _mark_events(ax, marks)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("loss weight factor")
    ax.set_title("class penalty per class (above 1: the class's loss counts more)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _class_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _throughput_figure(rows, marks):
    epochs = _series(rows, "epoch")
    speed = _series(rows, "images_per_s")
    fig, (ax,) = _new_figure(3.2, 1)
    ax.plot(epochs, speed, marker="o", ms=3, color="#1f77b4")
    _mark_events(ax, marks)
    _epoch_axis(ax, epochs)
    if np.isfinite(speed).any():
        ax.set_ylim(0, float(np.nanmax(speed)) * 1.1 or 1.0)
    ax.set_ylabel("training images / s")
    ax.set_title("training throughput per epoch")
    return fig


# ------------------------------------------------------------------ the section


def _summary(rows, end: dict) -> str:
    parts = [f"{len(rows)} epoch(s) logged"]
    seconds = float(np.nansum(_series(rows, "epoch_s")))
    if seconds:
        parts.append(f"{seconds / 60:.1f} min of epochs")
    if end.get("best_epoch") is not None:
        value = end.get("best_value")
        shown = (
            f" ({end.get('monitor', 'monitor')} {value:.4f})" if isinstance(value, float) else ""
        )
        parts.append(f"best epoch {end['best_epoch']}{shown}")
    if end.get("stopped"):
        parts.append(f"stopped: {end['stopped']}")
    swa = end.get("swa") or {}
    if swa.get("models"):
        parts.append(f"SWA averaged {swa['models']} epoch(s)")
    return "; ".join(parts) + "."


def add_training_section(page: Page, run: RunFolder) -> None:
    """Add the "Training" section from ``run.metrics``; a note when nothing was logged."""
    section = page.section("training", "Training")
    rows = epoch_rows(run.metrics)
    if not rows:
        section.note(
            f"No epoch is logged in {run.path / 'metrics.jsonl'} (missing or empty): the run "
            "has not finished an epoch, so there are no training curves."
        )
        return
    rows = sorted(rows, key=lambda r: r["epoch"])
    marks = event_epochs(run.metrics)
    end = _run_end(run.metrics)
    section.text(_summary(rows, end))

    curves, missing = _curves_figure(rows, marks, end)
    caption = (
        "Learning curves, train and val; vertical lines mark the events named in the legend "
        "(at the end of the epoch that logged them)."
    )
    if missing:
        caption += f" Not logged, so not drawn: {', '.join(missing)}."
    figures: list[Figure] = [page.save(curves, "training_curves", caption)]
    lrs = _list_series(rows, "lr")
    if lrs.shape[1]:
        names = group_names(run.metrics, lrs.shape[1])
        figures.append(
            page.save(
                _lr_figure(rows, marks, names),
                "training_lr",
                "Learning rate of each optimizer parameter group; a group appears when its "
                "stage joins. Vertical lines as in the learning curves.",
            )
        )
    figures.append(
        page.save(
            _regularisation_figure(rows, marks),
            "training_regularisation",
            "Dropout per block, Mixup alpha, augmentation strength and the number of active "
            "blocks, per epoch.",
        )
    )
    penalty = _list_series(rows, "class_penalty")
    if penalty.shape[1] and np.isfinite(penalty).any():
        names = class_names_of(run)
        if len(names) != penalty.shape[1]:
            names = [f"class {i}" for i in range(penalty.shape[1])]
        figures.append(
            page.save(
                _penalty_figure(rows, marks, names),
                "training_class_penalty",
                "Class penalty: the factor on each class's loss weight, set from its training "
                "accuracy (balance.penalty).",
            )
        )
    if np.isfinite(_series(rows, "images_per_s")).any():
        figures.append(
            page.save(
                _throughput_figure(rows, marks),
                "training_throughput",
                "Training images per second in each epoch (the whole epoch, data loading "
                "included).",
            )
        )
    section.figures(figures, page.folder)
    events = event_rows(run.metrics)
    section.heading("Events")
    if events:
        section.table(["epoch", "kind", "title", "details"], events)
    else:
        section.text("No callback logged an event (no stage change, rollback or SWA start).")
