"""The ``search`` study: a hyperparameter search with Optuna, one member run per trial.

``python -m experiments search --study-dir DIR --space SPACE.yaml --trials N [--storage URL]
[--pruner median|none] [--metric val_acc] [--seed S] [--study-name NAME] -- [TRAIN OPTIONS]``

Each trial draws the space's fields (:mod:`experiments.space`) and trains member
``trial-NNN`` (Optuna's trial number) with the training options plus one ``--set`` per drawn
field and ``--set run.monitor=METRIC``, so its ``config.yaml`` records the values like any run's
and its ``best.pt`` is the best by the searched metric. Every epoch's validation metric is
reported to the trial; a pruned trial stops at the end of that epoch with its checkpoints
written and is recorded as pruned (it is not tested). A trial that trains to the end gets its
best validation metric as value and is tested (``test_report.json``).

The Optuna study lives in ``--storage`` (``sqlite:///DIR/optuna.db`` by default) under
``--study-name`` (the folder's name by default) and is loaded when it exists, so re-running
the command continues it until N trials are done (complete or pruned). A trial left running by
a process of this machine that is gone (killed, Ctrl-C) is marked failed and stays in the
storage and in its folder; the search draws new trials instead.

At the end: ``best_config.yaml`` (the best trial's whole configuration, for
``models/train.py --config``), ``summary.json`` and the plots ``optimization_history.png`` and
``param_importances.png``.

Public API:
    KIND, add_parser, run, make_pruner, direction_of, summarize, write_best_config, write_plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console

from dataset.errors import DataError
from experiments.pruning import TrialPruning
from experiments.space import Param, SpaceError, override, read_space
from experiments.study import (
    FORMAT,
    INTERRUPTED,
    STUDY_JSON,
    SUMMARY_JSON,
    Study,
    StudyError,
    check_train_options,
    member_dir,
    open_study,
    read_json,
    write_summary,
)
from training.build import build_trainer
from training.config.cli import SHORTCUTS, build_parser, config_from_args
from training.config.schema import ConfigError, TrainConfig, load_config, save_config
from training.engine.atomic import write_atomically
from training.engine.checkpoint import CheckpointError
from training.engine.run_dir import prepare_run_dir
from training.evaluation.report import REPORT_JSON, evaluate_run, final_of, save_report

KIND = "search"
METRICS = {"val_acc": "maximize", "val_macro_f1": "maximize", "val_loss": "minimize"}
PRUNERS = ("median", "none")
DB_NAME = "optuna.db"
BEST_CONFIG = "best_config.yaml"
PLOTS = {"history": "optimization_history.png", "importances": "param_importances.png"}

#: training settings the study sets for each trial; refused after ``--``.
_OWN_SETTINGS = {"run.monitor": "--metric"}
#: finished trials: they count towards --trials.
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def direction_of(metric: str) -> str:
    """``"maximize"`` or ``"minimize"`` for a validation metric."""
    return METRICS[metric]


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The pruner named by ``--pruner``.

    ``median`` waits for 3 finished trials and never prunes at epoch 1, where every run is
    still near chance and the noise of one epoch would decide.
    """
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)


def make_sampler(seed: int, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """The TPE sampler for the next trial."""
    return optuna.samplers.TPESampler(seed=seed + trials_so_far)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        KIND,
        help="hyperparameter search with Optuna, one run per trial",
        description="Search config fields with Optuna (TPE sampler, median pruning): each trial "
        "is a member run trained with the drawn values as --set overrides. Training options go "
        "after --.",
        epilog="example: python -m experiments search --study-dir runs/lr --space "
        "experiments/spaces/example.yaml --trials 20 -- --preset cpu --data bloodmnist "
        "--epochs 8",
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--study-dir", required=True, metavar="DIR", help="the study folder")
    add("--space", required=True, metavar="SPACE.yaml", help="fields to search and their ranges")
    add("--trials", required=True, type=int, metavar="N", help="trials to finish in all")
    add(
        "--storage",
        metavar="URL",
        help=f"Optuna storage URL (default sqlite:///DIR/{DB_NAME}); a shared database lets "
        "several machines work on one search",
    )
    add("--study-name", metavar="NAME", help="the Optuna study's name (default: DIR's name)")
    add("--pruner", choices=PRUNERS, default="median", help="stop weak trials early (median)")
    add("--metric", choices=list(METRICS), default="val_acc", help="validation metric to optimise")
    add("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    return parser


def _train_args(train_argv: Sequence[str], params: Sequence[Param]) -> argparse.Namespace:
    """Parse the training options with train.py's parser, refusing in one line what it rejects
    and what the study sets itself (the run folder, the monitor, the searched fields)."""
    args = check_train_options(train_argv, settings=_OWN_SETTINGS)

    def refuse(message: str) -> None:
        raise StudyError(f"training options after --: {message}")

    searched = {p.name for p in params}
    for item in args.overrides:
        key = item.partition("=")[0].strip()
        if key in searched:
            refuse(f"--set {key} is searched (--space); leave it out")
    for dest, path in SHORTCUTS.items():
        # A shortcut flag beats every --set, so it would overrule the drawn value.
        if path in searched and getattr(args, dest, None) not in (None, False):
            refuse(f"--{dest.replace('_', '-')} sets {path}, which is searched; leave it out")
    return args


def trial_argv(train_argv: Sequence[str], params: dict[str, Any], metric: str) -> list[str]:
    """A trial's training options (without ``--run-dir``): the study's, then the drawn values."""
    argv = list(train_argv)
    for name, value in params.items():
        argv += ["--set", override(name, value)]
    return [*argv, "--set", f"run.monitor={metric}"]


def resolve_config(argv: Sequence[str]) -> TrainConfig:
    """The configuration a trial with training options ``argv`` trains under."""
    args = build_parser().parse_args(list(argv))
    return config_from_args(args)


def _check_space(path: str, train_argv: Sequence[str], metric: str) -> list[Param]:
    """Read the space, resolving each of its values on top of the training options."""
    base = [*train_argv, "--set", f"run.monitor={metric}"]

    def check(item: str) -> None:
        resolve_config([*base, "--set", item])

    try:
        return read_space(path, check)
    except SpaceError as error:
        raise StudyError(str(error)) from None


def _storage_url(args: argparse.Namespace) -> str:
    if args.storage:
        return args.storage
    return f"sqlite:///{Path(args.study_dir).resolve() / DB_NAME}"


def _load_study(args: argparse.Namespace, study_name: str) -> optuna.Study:
    try:
        return optuna.create_study(
            storage=_storage_url(args),
            study_name=study_name,
            direction=direction_of(args.metric),
            sampler=make_sampler(args.seed, 0),
            pruner=make_pruner(args.pruner),
            load_if_exists=True,
        )
    except Exception as error:  # noqa: BLE001 - SQLAlchemy's and Optuna's errors vary by URL
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StudyError(f"--storage {_storage_url(args)}: cannot open it ({reason})") from None


def _fail_dead_trials(study: optuna.Study, console: Console) -> None:
    """Mark failed the trials left running by a process of this machine that is gone.

    A trial running on another machine (shared storage) is left alone: its process is not
    ours to judge.
    """
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != host or _alive(int(attrs.get("pid", -1))):
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        console.print(
            f"trial {trial.number}: its process ({attrs.get('pid')}) is gone; marked failed "
            f"(its folder {attrs.get('run', '?')} is kept)",
            soft_wrap=True,
            markup=False,
        )


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return False  # this process has no trial running yet: the id was reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _done(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=_DONE))


def _failed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


def _record_member(study_rec: Study, name: str) -> None:
    """Add ``name`` to study.json's members, so ``member_runs`` and the report tools see it."""
    if name in study_rec.members:
        return
    study_rec.members.append(name)
    record = study_rec.path / STUDY_JSON
    text = json.dumps(study_rec.record(), indent=2) + "\n"
    write_atomically(record, lambda tmp: tmp.write_text(text))


def _train(argv: list[str], run_dir: Path, pruning: TrialPruning, console: Console) -> dict:
    """Train one trial's run (as models/train.py does, with the pruning callback); the
    trainer's summary.

    Raises:
        StudyError: the configuration, data or run folder is refused (one line).
    """
    try:
        cfg = resolve_config([*argv, "--set", f"run.run_dir={run_dir}"])
        prepare_run_dir(run_dir)
        trainer = build_trainer(cfg, run_dir, console=console, extra_callbacks=[pruning])
        return trainer.fit()
    except (ConfigError, DataError, CheckpointError) as error:
        raise StudyError(f"{run_dir}: {error}") from None


def _test(run_dir: Path, console: Console) -> None:
    try:
        save_report(evaluate_run(run_dir), run_dir)
    except (CheckpointError, DataError, ValueError, OSError) as error:
        raise StudyError(f"{run_dir}: testing failed: {error}") from None
    console.print(f"tested: {run_dir / REPORT_JSON}", soft_wrap=True, markup=False)


def _run_trial(
    study: optuna.Study,
    study_rec: Study,
    params: Sequence[Param],
    train_argv: Sequence[str],
    metric: str,
    seed: int,
    console: Console,
) -> int:
    """Draw, train and (when it finishes) test one trial; 0, or 130 when interrupted."""
    # A sampler seeded by (seed, trials so far): the draws of a search stopped and continued
    # are those of one run straight through (one sampler seeded once would repeat its first
    # draws after a restart).
    study.sampler = make_sampler(seed, len(study.get_trials(deepcopy=False)))
    trial = study.ask({p.name: p.distribution for p in params})
    name = f"trial-{trial.number:03d}"
    run_dir = member_dir(study_rec.path, name)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("run", str(run_dir))
    _record_member(study_rec, name)
    drawn = ", ".join(override(k, v) for k, v in trial.params.items())
    console.print(f"[bold]{name}[/]: {drawn}", soft_wrap=True)
    pruning = TrialPruning(trial, metric, maximize=direction_of(metric) == "maximize")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = _train(trial_argv(train_argv, trial.params, metric), run_dir, pruning, console)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    if summary.get("stopped") == "interrupted":
        study.tell(trial, state=TrialState.FAIL)
        console.print(
            f"[yellow]{name} interrupted: marked failed (its folder is kept); run the same "
            "command again to go on with new trials[/]",
            soft_wrap=True,
        )
        return INTERRUPTED
    if pruning.pruned_at is not None:
        study.tell(trial, state=TrialState.PRUNED)
        console.print(f"{name}: pruned at epoch {pruning.pruned_at}", soft_wrap=True)
        return 0
    best = pruning.best
    if best is None:
        study.tell(trial, state=TrialState.FAIL)
        console.print(f"{name}: no finite {metric} in any epoch; marked failed", soft_wrap=True)
        return 0
    study.tell(trial, best)
    console.print(f"{name}: best {metric} {best:.4f}", soft_wrap=True)
    _test(run_dir, console)
    return 0


def _test_untested(study: optuna.Study, study_rec: Study, console: Console) -> None:
    """Test the complete trials of this folder whose test step was stopped."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_dir = member_dir(study_rec.path, f"trial-{trial.number:03d}")
        trained = (run_dir / "checkpoints" / "last.pt").is_file()
        if trained and not (run_dir / REPORT_JSON).is_file():
            console.print(f"trial {trial.number}: finished but not tested; testing", soft_wrap=True)
            _test(run_dir, console)


def _test_accuracy(run_dir: Path) -> float | None:
    path = run_dir / REPORT_JSON
    if not path.is_file():
        return None
    weights = read_json(path).get("weights") or {}
    final = final_of(n for n, m in weights.items() if "scaled_from" not in m)
    return None if final is None else weights[final].get("accuracy")


def summarize(study: optuna.Study, study_dir: Path, metric: str, wanted: int) -> dict[str, Any]:
    """The search's figures: every trial (number, state, params, value, run, test accuracy
    when tested here) and the best one."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        run_dir = member_dir(study_dir, f"trial-{t.number:03d}")
        value = t.value if t.value is None or math.isfinite(t.value) else None
        trials.append({
            "number": t.number,
            "state": t.state.name.lower(),
            "params": t.params,
            "value": value,
            "run": str(run_dir) if run_dir.is_dir() else None,
            "test_accuracy": _test_accuracy(run_dir),
        })  # fmt: skip
    completed = [t for t in trials if t["state"] == "complete"]
    best = None
    if completed:
        b = study.best_trial
        best = next(t for t in trials if t["number"] == b.number)
    done = sum(t["state"] in ("complete", "pruned") for t in trials)
    return {
        "kind": KIND,
        "format": FORMAT,
        "study_name": study.study_name,
        "metric": metric,
        "direction": direction_of(metric),
        "trials_wanted": wanted,
        "trials_done": done,
        "complete": done >= wanted,
        "trials": trials,
        "best": best,
    }


def write_best_config(
    study_dir: Path, train_argv: Sequence[str], params: dict[str, Any], metric: str
) -> Path:
    """``best_config.yaml``: the whole configuration of a trial with ``params`` (no run
    folder), which ``models/train.py --config`` trains again."""
    cfg = resolve_config(trial_argv(train_argv, params, metric))
    cfg.run.run_dir = ""
    path = study_dir / BEST_CONFIG
    save_config(cfg, path)
    return path


def reload_problem(path: Path) -> str | None:
    """Why ``--config path`` would be refused, or None when it loads.

    A guard, not a known case: the file is the resolved configuration of a trial that resolved,
    and a config file's values pass the same checks, derived ones included (an SWA start past a
    short run's end is taken as the run had it; only values typed on the command line are
    refused for not fitting the run). What could still refuse it is a check that treats a value
    in a file differently from the same value reached through flags and ``--set``.
    """
    try:
        load_config(yaml_path=path)
    except ConfigError as error:
        return str(error)
    return None


def write_plots(
    study: optuna.Study, study_dir: Path, metric: str = "objective"
) -> tuple[list[str], list[str]]:
    """Optuna's optimisation history and parameter importances as PNG in ``study_dir``, the
    trial value named ``metric``; the files written and a note for each plot skipped."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written, notes = [], []
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = [("history", ovm.plot_optimization_history, 1)]
    plots.append(("importances", ovm.plot_param_importances, 2))
    for key, plot, least in plots:
        path = study_dir / PLOTS[key]
        if len(completed) < least:
            notes.append(f"{PLOTS[key]} skipped: needs {least} complete trials")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" warnings of the matplotlib plots
            try:
                axes = plot(study, target_name=metric)
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                notes.append(f"{PLOTS[key]} skipped: {error}")
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure

        # Through a temporary file: an interrupted save leaves no truncated PNG under the name.
        def save(tmp: Path, figure: Any = figure) -> None:
            figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")

        write_atomically(path, save)
        plt.close(figure)
        written.append(PLOTS[key])
    return written, notes


def run(args: argparse.Namespace, train_argv: list[str], console: Console) -> int:
    """Create or continue the search, run trials until ``--trials`` are done, then write the
    summary, the best config and the plots; the exit code."""
    if args.trials < 1:
        raise StudyError(f"--trials {args.trials}: give at least 1")
    _train_args(train_argv, [])  # before the space is resolved on top of these options
    params = _check_space(args.space, train_argv, args.metric)
    _train_args(train_argv, params)
    study_dir = Path(args.study_dir)
    study_name = args.study_name or study_dir.resolve().name
    options = {
        # The drawn fields and ranges, not the file's path: an edited space is another command.
        "space": [p.record() for p in params],
        "storage": args.storage,
        "study_name": study_name,
        "pruner": args.pruner,
        "metric": args.metric,
        "seed": args.seed,
    }
    study_rec = open_study(
        study_dir,
        kind=KIND,
        options=options,
        train_argv=train_argv,
        members=[],
        command=args.command_line,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the study prints its own lines
    study = _load_study(args, study_name)
    _fail_dead_trials(study, console)
    _test_untested(study, study_rec, console)

    def refresh() -> dict[str, Any]:
        summary = summarize(study, study_dir, args.metric, args.trials)
        write_summary(study_dir, summary)
        return summary

    code = 0
    failed_before = _failed(study)
    while _done(study) < args.trials:
        if _failed(study) - failed_before >= args.trials:
            # Failed trials do not count towards N; without a cap a metric that is never
            # finite would draw trials for ever.
            raise StudyError(
                f"{args.trials} trials failed in this run (no finite {args.metric}); see their "
                f"runs under {study_dir / 'members'} before running the search again"
            )
        console.print(f"trials done: {_done(study)} of {args.trials}", soft_wrap=True)
        code = _run_trial(study, study_rec, params, train_argv, args.metric, args.seed, console)
        refresh()
        if code != 0:
            break
    summary = refresh()
    best = summary["best"]
    if best is None:
        console.print("no complete trial yet: no best config", soft_wrap=True)
    else:
        path = write_best_config(study_dir, train_argv, best["params"], args.metric)
        test = best["test_accuracy"]
        console.print(
            f"[bold]best: trial {best['number']}[/], {args.metric} {best['value']:.4f}"
            + ("" if test is None else f", test accuracy {test:.4f}"),
            soft_wrap=True,
        )
        for key, value in best["params"].items():
            console.print(f"  {override(key, value)}", soft_wrap=True, markup=False)
        console.print(f"best config: {path}", soft_wrap=True, markup=False)
        if problem := reload_problem(path):
            console.print(
                f"[yellow]warning:[/] --config {path} will be refused as it is ({problem}); "
                "edit that setting first",
                soft_wrap=True,
            )
    summary["plots"], summary["plot_notes"] = write_plots(study, study_dir, args.metric)
    for note in summary["plot_notes"]:
        console.print(f"note: {note}", soft_wrap=True, markup=False)
    write_summary(study_dir, summary)
    console.print(f"summary: {study_dir / SUMMARY_JSON}", soft_wrap=True, markup=False)
    return code
