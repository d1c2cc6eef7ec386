"""``python -m report compare RUN_A RUN_B ... [--out DIR]``: several runs on one page.

The page holds a table of the runs' test figures beside the config values that differ between
them, their learning curves overlaid, and, when the runs fall into groups that differ only in
``run.seed``, each group's mean and sd and the paired difference between two groups (seed by
seed, with its 95% interval: :mod:`training.evaluation.stats`).

Public API:
    differing_settings, seed_groups, compare_runs, compare_parser, main.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from report.page import Page
from report.run import ReportError, RunFolder, load_run
from training.evaluation.stats import mean_sd, paired_difference

SEED_KEY = "run.seed"
#: Settings that name where a run lives rather than what it did; never a difference worth showing.
PLACE_KEYS = ("run.run_dir", "data.root")
#: (label, key in RunFolder.test_scores(), shown as a percentage)
FIGURES: tuple[tuple[str, str], ...] = (
    ("test accuracy", "accuracy"),
    ("macro-F1", "macro_f1"),
    ("ECE after T", "ece_scaled"),
)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` for every leaf of a nested config."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def differing_settings(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The dotted names of the settings whose values are not the same in every config."""
    flats = [flatten(c) for c in configs]
    names = sorted(set().union(*flats)) if flats else []
    missing = object()
    return [
        name
        for name in names
        if name not in PLACE_KEYS and len({repr(f.get(name, missing)) for f in flats}) > 1
    ]


def seed_groups(runs: Sequence[RunFolder]) -> list[list[RunFolder]]:
    """The runs grouped by their config without ``run.seed`` (and where they live), in order
    of first appearance: runs of one group differ only in their seed."""
    groups: dict[str, list[RunFolder]] = {}
    for run in runs:
        flat = flatten(run.config)
        key = repr(
            sorted((k, repr(v)) for k, v in flat.items() if k not in (SEED_KEY, *PLACE_KEYS))
        )
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _runs_table(runs: Sequence[RunFolder], differing: Sequence[str]) -> tuple[list, list]:
    headers = ["run", *(label for label, _ in FIGURES), "epochs", "train min", *differing]
    rows = []
    for run in runs:
        scores = run.test_scores()
        epochs = run.epochs or "-"
        rows.append(
            [
                run.name,
                *(_percent(scores.get(key)) for _, key in FIGURES),
                epochs,
                f"{run.training_seconds / 60:.1f}",
                *(str(run.setting(name, "-")) for name in differing),
            ]
        )
    return headers, rows


def group_summary(group: Sequence[RunFolder]) -> dict[str, dict[str, float]]:
    """Mean and sd over the group's tested runs of each figure in :data:`FIGURES`."""
    summary = {}
    for _, key in FIGURES:
        values = [r.test_scores()[key] for r in group if key in r.test_scores()]
        if values:
            summary[key] = {**mean_sd(values), "n": len(values)}
    return summary


def paired_groups(a: Sequence[RunFolder], b: Sequence[RunFolder], key: str) -> dict | None:
    """:func:`~training.evaluation.stats.paired_difference` of ``key`` between two groups over
    the seeds both ran (``None`` with fewer than two shared, tested seeds)."""

    def by_seed(group: Sequence[RunFolder]) -> dict[Any, float]:
        return {r.setting(SEED_KEY): r.test_scores()[key] for r in group if key in r.test_scores()}

    first, second = by_seed(a), by_seed(b)
    seeds = [s for s in first if s in second]
    result = paired_difference([first[s] for s in seeds], [second[s] for s in seeds])
    return None if result is None else {**result, "seeds": seeds}


def _curves_figure(page: Page, runs: Sequence[RunFolder]):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (("val_loss", "validation loss"), ("val_acc", "validation accuracy"))
    for ax, (key, title) in zip(axes[:2], panels, strict=True):
        for run in runs:
            points = [(m["epoch"], m[key]) for m in run.metrics if key in m and "epoch" in m]
            if points:
                ax.plot(*zip(*points, strict=True), label=run.name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for run in runs:
        points = [(m["epoch"], m["train_loss"]) for m in run.metrics if "train_loss" in m]
        if points:
            axes[2].plot(*zip(*points, strict=True), label=run.name)
    axes[2].set_title("training loss")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    return page.save(fig, "compare_curves", "learning curves of every run, overlaid")


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write the comparison page into ``out`` and return its ``index.html``.

    Raises:
        ReportError: fewer than two runs, or a run folder that cannot be read.
    """
    if len(run_dirs) < 2:
        raise ReportError(f"compare needs two or more run folders; got {len(run_dirs)}")
    runs = [load_run(d) for d in run_dirs]
    page = Page(out, f"Comparing {len(runs)} runs")
    page.subtitle = ", ".join(str(r.path) for r in runs)
    differing = differing_settings([r.config for r in runs])
    section = page.section("runs", "Runs")
    headers, rows = _runs_table(runs, differing)
    section.table(headers, rows)
    untested = [r.name for r in runs if not r.test_report]
    if untested:
        section.note(
            f"Not tested yet: {', '.join(untested)}; python test.py --run-dir RUN adds their"
            " test figures."
        )
    if not differing:
        section.text("The runs' configs are identical.")
    curves = page.section("curves", "Learning curves")
    curves.figures([_curves_figure(page, runs)], page.folder)
    _seed_section(page, runs)
    return page.write()


def _mean_sd_cell(figure: Mapping[str, float] | None) -> str:
    return "-" if figure is None else f"{figure['mean']:.2%} ({100 * figure['sd']:.2f})"


def _seed_section(page: Page, runs: Sequence[RunFolder]) -> None:
    groups = seed_groups(runs)
    section = page.section("seeds", "Seeds")
    if all(len(g) == 1 for g in groups):
        section.text(
            "No two runs differ only in run.seed, so there is no spread over seeds to show."
        )
        return
    headers = ["group", "runs (seeds)", *(f"{label} mean (sd)" for label, _ in FIGURES)]
    rows = []
    for index, group in enumerate(groups, start=1):
        summary = group_summary(group)
        seeds = ", ".join(str(r.setting(SEED_KEY)) for r in group)
        cells = [
            f"{summary[key]['mean']:.2%} ({100 * summary[key]['sd']:.2f})"
            if key in summary
            else "-"
            for _, key in FIGURES
        ]
        names = ", ".join(r.name for r in group)
        rows.append([f"{index}: {names}", f"{len(group)} ({seeds})", *cells])
    section.table(headers, rows)
    if len(groups) == 2:
        d = paired_groups(groups[0], groups[1], "accuracy")
        if d is None:
            section.text("The two groups share fewer than two tested seeds: no paired interval.")
        else:
            verdict = "holds zero: a tie at this many seeds"
            if d["low"] > 0 or d["high"] < 0:
                verdict = "excludes zero: beyond the seed-to-seed spread"
            section.text(
                f"Test accuracy, group 1 - group 2, paired over seeds {d['seeds']}: "
                f"{100 * d['mean']:+.2f} points (sd {100 * d['sd']:.2f}); 95% interval "
                f"{100 * d['low']:+.2f} to {100 * d['high']:+.2f}, which {verdict}."
            )
    elif len(groups) > 2:
        section.text("More than two groups: each group's mean and sd are shown, no paired test.")


def compare_parser() -> argparse.ArgumentParser:
    """The ``compare`` command line."""
    p = argparse.ArgumentParser(
        prog="python -m report compare",
        description="Compare runs: test figures with their differing settings, overlaid "
        "learning curves, and mean, sd and a paired interval for runs that differ in seed only.",
    )
    p.add_argument("runs", nargs="+", help="two or more run folders")
    p.add_argument(
        "--out", help="the page's folder (default: runs/compare-<timestamp>)", default=None
    )
    return p


def main(argv: Sequence[str]) -> int:
    """The ``compare`` command line; returns the exit code."""
    args = compare_parser().parse_args(argv)
    out = args.out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    path = compare_runs(args.runs, out)
    print(f"comparison written to {path}")
    return 0
