"""The ``seeds`` study: the same training once per seed, and the spread of its test figures.

``python -m experiments seeds --study-dir DIR --seeds 0-4 [-- TRAIN OPTIONS]`` trains members
``seed-0`` ... ``seed-4``, each with the training options after ``--`` plus
``--set run.seed=N``, and tests each. The data split (``data.split_seed``) does not follow
``run.seed``, so every member is scored on the same test images.

With ``--compare A.yaml B.yaml`` the members are ``A/seed-N`` and ``B/seed-N`` (the files'
stems), trained with ``--config A.yaml`` or ``--config B.yaml`` plus the same options, in the
order A/seed-0, B/seed-0, A/seed-1, ... so a stopped study already holds whole pairs.

The summary takes each member's final weight set (swa > best > last) and, for every figure
(accuracy, macro_f1, balanced_accuracy, nll, ece, and the temperature-scaled row's nll+T and
ece+T when the weight set has one), the mean and sample sd over the seeds; with ``--compare``
also B - A paired by seed with its 95% interval, a "tie" when the interval holds 0.

Public API:
    parse_seeds, add_parser, plan, run, member_figures, summarize, summary_table, paired_table,
    paired_rows, FIGURES.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from experiments.study import (
    FORMAT,
    STUDY_JSON,
    SUMMARY_JSON,
    Member,
    Study,
    StudyError,
    check_train_options,
    member_dir,
    member_state,
    open_study,
    read_json,
    run_members,
    write_summary,
)
from training.evaluation.report import REPORT_JSON, SCALED_SUFFIX, final_of
from training.evaluation.stats import mean_sd, paired_difference

KIND = "seeds"

#: (summary key, table label, report row suffix, metric key, higher is better).
FIGURES: tuple[tuple[str, str, str, str, bool], ...] = (
    ("accuracy", "accuracy", "", "accuracy", True),
    ("macro_f1", "macro-F1", "", "macro_f1", True),
    ("balanced_accuracy", "balanced accuracy", "", "balanced_accuracy", True),
    ("nll", "NLL", "", "nll", False),
    ("ece", "ECE", "", "ece", False),
    ("nll+T", "NLL +T", SCALED_SUFFIX, "nll", False),
    ("ece+T", "ECE +T", SCALED_SUFFIX, "ece", False),
)

#: arm name of a study without ``--compare``.
SINGLE_ARM = "all"

_SEEDS_HELP = "0-4, 0,1,2 or 0 1 2"

#: training options the study sets itself, per member; refused after ``--``.
_OWN_SETTINGS = {"run.seed": "--seeds"}


def parse_seeds(tokens: Sequence[str]) -> list[int]:
    """Seeds from ``--seeds`` tokens: ranges ``0-4``, lists ``0,1,2`` or ``0 1 2`` (mixable).

    Raises:
        StudyError: an empty list, a part that is not a seed or range, a range that goes down,
            or a seed given twice.
    """
    text = " ".join(tokens)
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts:
        raise StudyError(f"--seeds is empty; allowed: {_SEEDS_HELP}")
    seeds: list[int] = []
    for part in parts:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise StudyError(
                f"--seeds {text!r}: {part!r} is not a seed (>= 0) or a range low-high; "
                f"allowed: {_SEEDS_HELP}"
            )
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise StudyError(f"--seeds {text!r}: the range {part!r} goes down; write {high}-{low}")
        seeds.extend(range(low, high + 1))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise StudyError(f"--seeds {text!r}: seed(s) {repeated} given twice; give each once")
    return seeds


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        KIND,
        help="train once per seed; mean and sd of the test figures",
        description="Train the same run once per seed (each with --set run.seed=N) and test it; "
        "the summary gives the mean and sd of every test figure. Training options go after --.",
        epilog="example: python -m experiments seeds --study-dir runs/s5 --seeds 0-4 "
        "-- --preset cpu --data bloodmnist --epochs 10",
        allow_abbrev=False,
    )
    parser.add_argument("--study-dir", required=True, metavar="DIR", help="the study folder")
    parser.add_argument(
        "--seeds", required=True, nargs="+", metavar="SEEDS", help=f"seeds: {_SEEDS_HELP}"
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.yaml", "B.yaml"),
        help="train every seed under both config files; adds B - A paired by seed",
    )
    return parser


def _check_train_argv(train_argv: Sequence[str], compare: bool) -> None:
    """Refuse, in one line, training options that train.py rejects or that the study sets."""
    flags = ["--run-dir", "--resume", "--overwrite", "--seed", *(["--config"] if compare else [])]
    check_train_options(train_argv, flags, _OWN_SETTINGS)


def _config_record(path_text: str) -> dict[str, str]:
    path = Path(path_text)
    if not path.is_file():
        raise StudyError(f"--compare: config file {path} does not exist")
    # The file's content is part of the command: a study continued after the file was edited
    # would mix members trained under two configurations.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"name": path.stem, "path": str(path.resolve()), "sha256": digest}


def _check_configs_unchanged(study_dir: Path, configs: Sequence[dict[str, str]]) -> None:
    """Name an edited ``--compare`` file in one line, rather than the whole record that now
    differs from the study's."""
    record = study_dir / STUDY_JSON
    if not record.is_file():
        return
    stored = read_json(record).get("options") or {}
    for old in stored.get("compare") or []:
        for new in configs:
            if old.get("path") == new["path"] and old.get("sha256") != new["sha256"]:
                raise StudyError(
                    f"--compare: {new['path']} changed since study {study_dir} began; its "
                    "members were trained with the old content: restore it, or pick another "
                    "--study-dir"
                )


def plan(
    seeds: Sequence[int], configs: Sequence[dict[str, str]] | None, train_argv: Sequence[str]
) -> list[tuple[Member, str, int]]:
    """The members in training order, each with its arm name and seed."""
    if not configs:
        return [
            (Member(f"seed-{s}", [*train_argv, "--set", f"run.seed={s}"]), SINGLE_ARM, s)
            for s in seeds
        ]
    return [
        (
            Member(
                f"{c['name']}/seed-{s}",
                ["--config", c["path"], *train_argv, "--set", f"run.seed={s}"],
            ),
            c["name"],
            s,
        )
        for s in seeds
        for c in configs
    ]


def member_figures(run_dir: Path) -> dict[str, Any]:
    """The final weight set of a tested run, its epoch, and its figures (see :data:`FIGURES`);
    a figure its report lacks (no temperature-scaled row) is left out."""
    report = read_json(run_dir / REPORT_JSON)
    weights = report.get("weights") or {}
    final = final_of(name for name, m in weights.items() if "scaled_from" not in m)
    if final is None:
        raise StudyError(f"{run_dir / REPORT_JSON}: no weight set (swa, best or last) was scored")
    figures = {}
    for key, _, suffix, metric, _ in FIGURES:
        row = weights.get(final + suffix)
        if row is not None and row.get(metric) is not None:
            figures[key] = float(row[metric])
    epoch = (report.get("checkpoints") or {}).get(final, {}).get("epoch")
    return {"weights": final, "epoch": epoch, "figures": figures}


def _verdict(diff: dict[str, Any], higher_better: bool, arm_a: str, arm_b: str) -> str:
    if diff["low"] <= 0 <= diff["high"]:
        return "tie"
    b_better = (diff["mean"] > 0) == higher_better
    return f"{arm_b} better" if b_better else f"{arm_a} better"


def summarize(study: Study) -> dict[str, Any]:
    """The summary of the finished members: per member its figures, per arm the mean and sd
    of each figure, and with two arms the paired B - A rows."""
    seeds = study.options["seeds"]
    configs = study.options.get("compare")
    planned = plan(seeds, configs, study.train_argv)
    arms = [c["name"] for c in configs] if configs else [SINGLE_ARM]
    members: dict[str, Any] = {}
    for member, arm, seed in planned:
        run_dir = member_dir(study.path, member.name)
        if member_state(run_dir) == "finished":
            members[member.name] = {"arm": arm, "seed": seed, "run": str(run_dir)}
            members[member.name].update(member_figures(run_dir))
    figures: dict[str, Any] = {}
    for arm in arms:
        figures[arm] = {}
        for key, *_ in FIGURES:
            values = [
                m["figures"][key]
                for m in members.values()
                if m["arm"] == arm and key in m["figures"]
            ]
            if values:
                figures[arm][key] = {"n": len(values), **mean_sd(values), "values": values}
    summary: dict[str, Any] = {
        "format": FORMAT,
        "kind": KIND,
        "seeds": seeds,
        "arms": arms,
        "complete": len(members) == len(planned),
        "pending": [m.name for m, _, _ in planned if m.name not in members],
        "members": members,
        "figures": figures,
    }
    if configs:
        summary["paired"] = paired_rows(members, arms[0], arms[1])
    return summary


def paired_rows(members: dict[str, Any], arm_a: str, arm_b: str) -> dict[str, Any]:
    """Per figure, B - A over the seeds where both arms finished and have the figure."""
    by_seed: dict[str, dict[int, dict]] = {arm_a: {}, arm_b: {}}
    for m in members.values():
        by_seed[m["arm"]][m["seed"]] = m["figures"]
    paired = {}
    for key, _, _, _, higher_better in FIGURES:
        seeds = sorted(
            s
            for s in by_seed[arm_a]
            if s in by_seed[arm_b] and key in by_seed[arm_a][s] and key in by_seed[arm_b][s]
        )
        b = [by_seed[arm_b][s][key] for s in seeds]
        a = [by_seed[arm_a][s][key] for s in seeds]
        diff = paired_difference(b, a)  # b - a
        if diff is None:
            paired[key] = {"n": len(seeds), "seeds": seeds, "verdict": "fewer than 2 pairs"}
            continue
        diff["seeds"] = seeds
        diff["tie"] = diff["low"] <= 0 <= diff["high"]
        diff["verdict"] = _verdict(diff, higher_better, arm_a, arm_b)
        paired[key] = diff
    return paired


def _arm_count(summary: dict[str, Any], arm: str) -> int:
    return sum(1 for m in summary["members"].values() if m["arm"] == arm)


def summary_table(summary: dict[str, Any]) -> Table:
    """The mean ± sd table: a row per figure, a column per arm (headed by its member count)."""
    arms = summary["arms"]
    seeds = ",".join(map(str, summary["seeds"]))
    table = Table(title=f"seeds {seeds}: mean ± sd of the final weights", box=box.SIMPLE_HEAD)
    table.add_column("figure", no_wrap=True)
    for arm in arms:
        label = "mean ± sd" if arm == SINGLE_ARM else arm
        table.add_column(f"{label} (n={_arm_count(summary, arm)})", justify="right")
    for key, label, *_ in FIGURES:
        stats = [summary["figures"][arm].get(key) for arm in arms]
        if all(s is None for s in stats):
            continue
        cells = ["-" if s is None else f"{s['mean']:.4f} ± {s['sd']:.4f}" for s in stats]
        table.add_row(label, *cells)
    return table


def paired_table(summary: dict[str, Any]) -> Table:
    """With two arms: a row per figure with B - A paired by seed, its 95% interval and the
    verdict ("tie" when the interval holds 0). Separate from :func:`summary_table` so each fits
    80 columns."""
    arm_a, arm_b = summary["arms"]
    table = Table(title=f"{arm_b} - {arm_a}, paired by seed", box=box.SIMPLE_HEAD)
    table.add_column("figure", no_wrap=True)
    table.add_column("pairs", justify="right")
    table.add_column("mean", justify="right", no_wrap=True)
    table.add_column("95% interval", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for key, label, *_ in FIGURES:
        diff = summary["paired"][key]
        if not diff["n"]:
            continue
        if "mean" not in diff:
            table.add_row(label, str(diff["n"]), "-", "-", diff["verdict"])
            continue
        interval = f"[{diff['low']:+.4f}, {diff['high']:+.4f}]"
        table.add_row(label, str(diff["n"]), f"{diff['mean']:+.4f}", interval, diff["verdict"])
    return table


def run(args: argparse.Namespace, train_argv: list[str], console: Console) -> int:
    """Create or continue the study, train and test its members, then write and print the
    summary; the exit code."""
    seeds = parse_seeds(args.seeds)
    _check_train_argv(train_argv, compare=bool(args.compare))
    configs = None
    if args.compare:
        configs = [_config_record(p) for p in args.compare]
        if configs[0]["name"] == configs[1]["name"]:
            raise StudyError(
                f"--compare {args.compare[0]} {args.compare[1]}: both files are named "
                f"{configs[0]['name']!r}; the members are named after the files: rename one"
            )
        _check_configs_unchanged(Path(args.study_dir), configs)
    options: dict[str, Any] = {"seeds": seeds, "compare": configs}
    planned = plan(seeds, configs, train_argv)
    study = open_study(
        args.study_dir,
        kind=KIND,
        options=options,
        train_argv=train_argv,
        members=[m.name for m, _, _ in planned],
        command=args.command_line,
    )

    def refresh() -> dict[str, Any]:
        summary = summarize(study)
        write_summary(study.path, summary)
        return summary

    code = run_members(study, [m for m, _, _ in planned], console, after_each=refresh)
    summary = refresh()
    console.print(summary_table(summary))
    if "paired" in summary:
        console.print(paired_table(summary))
    if summary["pending"]:
        console.print(f"not finished: {', '.join(summary['pending'])}", soft_wrap=True)
    console.print(f"summary: {study.path / SUMMARY_JSON}", soft_wrap=True, markup=False)
    return code
