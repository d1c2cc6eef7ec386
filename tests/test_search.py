"""The search study (``python -m experiments search``): real tiny trials with Optuna, pruning,
resuming, storage, and one-line refusals of bad space files."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from experiments import search
from experiments.__main__ import main
from experiments.pruning import TrialPruning
from experiments.study import StudyError, member_runs
from tests.test_experiments import tiny_train
from training.config.cli import build_parser, config_from_args
from training.config.schema import load_config, save_config
from training.engine.checkpoint import load_checkpoint
from training.engine.events import StopTraining
from training.evaluation.report import REPORT_JSON

PNG = b"\x89PNG\r\n\x1a\n"

SPACE = """\
optim.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
regularize.mixup_alpha: {type: categorical, choices: [0.0, 0.2]}
"""


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


@pytest.fixture
def trained(monkeypatch):
    """The run folder of every trial the search trained (the real training still runs)."""
    runs: list[Path] = []
    real = search._train

    def counted(argv, run_dir, pruning, console):
        runs.append(run_dir)
        return real(argv, run_dir, pruning, console)

    monkeypatch.setattr(search, "_train", counted)
    return runs


def command(study: Path, space: Path, npz: Path, trials: int, *extra: str) -> list[str]:
    return [
        "search", "--study-dir", str(study), "--space", str(space), "--trials", str(trials),
        *extra, "--", *tiny_train(npz, study.parent, epochs=3),
    ]  # fmt: skip


def load(study: Path, storage: str | None = None) -> optuna.Study:
    url = storage or f"sqlite:///{study / 'optuna.db'}"
    return optuna.load_study(study_name=study.name, storage=url)


def test_search_trains_tests_and_writes_best_config_summary_plots(
    tiny_npz, space, tmp_path, capsys, trained
):
    study = tmp_path / "study"
    assert main(command(study, space, tiny_npz, 3)) == 0
    out = capsys.readouterr().out
    names = ["trial-000", "trial-001", "trial-002"]
    assert [r.name for r in trained] == names
    summary = json.loads((study / "summary.json").read_text())
    assert summary["complete"] and summary["trials_done"] == 3
    assert [t["state"] for t in summary["trials"]] == ["complete"] * 3
    optuna_study = load(study)
    best = optuna_study.best_trial
    assert summary["best"]["number"] == best.number
    assert summary["best"]["value"] == pytest.approx(best.value)
    assert f"best: trial {best.number}" in out
    for trial, stored in zip(summary["trials"], optuna_study.trials, strict=True):
        run = study / "members" / f"trial-{trial['number']:03d}"
        # The drawn values are the run's own config, and its best.pt is picked by the metric.
        cfg = load_config(yaml_path=run / "config.yaml")
        assert cfg.optim.lr == pytest.approx(stored.params["optim.lr"])
        assert cfg.regularize.mixup_alpha == stored.params["regularize.mixup_alpha"]
        assert cfg.run.monitor == "val_acc"
        # The value is the best validation accuracy of the epochs the trial reported.
        assert stored.value == max(stored.intermediate_values.values())
        assert sorted(stored.intermediate_values) == [1, 2, 3]
        report = json.loads((run / REPORT_JSON).read_text())
        final = "swa" if "swa" in report["weights"] else "best"
        assert trial["test_accuracy"] == report["weights"][final]["accuracy"]
    assert member_runs(study) == [study / "members" / n for n in names]
    # best_config.yaml is what --config reads, with the best trial's values and no run folder.
    path = study / "best_config.yaml"
    args = build_parser().parse_args(["--config", str(path)])
    cfg = config_from_args(args)
    assert cfg.optim.lr == pytest.approx(best.params["optim.lr"])
    assert cfg.regularize.mixup_alpha == best.params["regularize.mixup_alpha"]
    assert cfg.run.run_dir == "" and cfg.run.epochs == 3
    assert "warning" not in out
    for png in ("optimization_history.png", "param_importances.png"):
        assert (study / png).read_bytes()[:8] == PNG
    assert summary["plots"] == ["optimization_history.png", "param_importances.png"]


class PruneAfterFirstEpoch(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.last_step is not None and trial.last_step >= 1


def test_pruned_trial_stops_cleanly_and_is_recorded(tiny_npz, space, tmp_path, monkeypatch):
    monkeypatch.setattr(search, "make_pruner", lambda name: PruneAfterFirstEpoch())
    study = tmp_path / "study"
    assert main(command(study, space, tiny_npz, 1)) == 0
    run = study / "members" / "trial-000"
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    # It stopped after epoch 1 of 3, with its checkpoints and the end phase done.
    assert ckpt["epoch"] == 1
    assert ckpt["finished"]["stopped"].startswith("pruned:")
    assert (run / "checkpoints" / "best.pt").is_file()
    assert not (run / REPORT_JSON).exists()  # a pruned trial is not tested
    trial = load(study).trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]
    summary = json.loads((study / "summary.json").read_text())
    assert summary["trials"][0]["state"] == "pruned" and summary["complete"]
    # No complete trial: no best, no best config, no plots, and notes that say so.
    assert summary["best"] is None
    assert not (study / "best_config.yaml").exists()
    assert summary["plots"] == [] and len(summary["plot_notes"]) == 2


def test_pruning_callback_reports_finite_values_and_stops_after_the_epoch():
    class Trial:
        number = 7

        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return len(self.reported) == 2

    class Trainer:
        def __init__(self):
            self.notices = []

        def notify(self, kind, title, lines):
            self.notices.append(title)

    trial, trainer = Trial(), Trainer()
    cb = TrialPruning(trial, "val_loss", maximize=False)
    for epoch, value in ((1, 0.9), (2, math.nan)):
        cb.on_validation_end(trainer, {"epoch": epoch, "val_loss": value})
        cb.on_epoch_end(trainer, {})
    assert trial.reported == [(1, 0.9)]  # the NaN epoch is not reported
    metrics = {"epoch": 3, "val_loss": 0.5}
    cb.on_validation_end(trainer, metrics)
    assert "pruned" in metrics and trainer.notices == ["trial 7 pruned"]
    with pytest.raises(StopTraining, match="pruned"):
        cb.on_epoch_end(trainer, metrics)
    assert cb.best == 0.5


def test_resumed_search_trains_only_the_missing_trials_with_the_same_draws(
    tiny_npz, space, tmp_path, trained
):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert main(command(resumed, space, tiny_npz, 2)) == 0
    assert main(command(resumed, space, tiny_npz, 3)) == 0
    assert [r.name for r in trained] == ["trial-000", "trial-001", "trial-002"]
    assert main(command(resumed, space, tiny_npz, 3)) == 0  # nothing left to do
    assert len(trained) == 3
    summary = json.loads((resumed / "summary.json").read_text())
    assert [t["number"] for t in summary["trials"]] == [0, 1, 2]
    # The seeded sampler draws the same values whether the search was stopped or not.
    assert main(command(straight, space, tiny_npz, 3)) == 0
    assert [t.params for t in load(resumed).trials] == [t.params for t in load(straight).trials]


def test_trial_of_a_dead_process_is_marked_failed_and_replaced(tiny_npz, space, tmp_path):
    study = tmp_path / "study"
    assert main(command(study, space, tiny_npz, 1)) == 0
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = load(study).ask()
    left.set_user_attr("host", socket.gethostname())
    left.set_user_attr("pid", gone.pid)
    assert main(command(study, space, tiny_npz, 2)) == 0
    states = [t.state.name for t in load(study).trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]


def test_custom_sqlite_storage(tiny_npz, space, tmp_path):
    study, db = tmp_path / "study", tmp_path / "elsewhere" / "shared.db"
    db.parent.mkdir()
    url = f"sqlite:///{db}"
    extra = ("--storage", url, "--study-name", "shared", "--pruner", "none")
    assert main(command(study, space, tiny_npz, 1, *extra)) == 0
    assert db.is_file() and not (study / "optuna.db").exists()
    stored = optuna.load_study(study_name="shared", storage=url)
    assert [t.state.name for t in stored.trials] == ["COMPLETE"]
    assert json.loads((study / "summary.json").read_text())["study_name"] == "shared"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optim.lrr: {type: float, low: 0.001, high: 0.01}", "optim.lrr"),
        ("optim.lr: {type: float, low: 0.01, high: 0.001}", "must be below high"),
        ("optim.lr: {type: normal, low: 0.001, high: 0.01}", "type float, int or categorical"),
        ("optim.lr: {type: float, low: 0.0, high: 0.01, log: true}", "needs low > 0"),
        ("optim.lr: {type: float, low: -1.0, high: 0.01}", "the config refuses -1.0"),
        ("optim.batch_size: {type: int, low: 8.5, high: 32}", "not an integer"),
        ("model.arch: {type: categorical, choices: []}", "non-empty list"),
        ("lr: {type: float, low: 0.001, high: 0.01}", "section.field"),
        ("[1, 2]", "needs a mapping"),
    ],
)
def test_bad_space_file_is_one_line_naming_file_and_key(tiny_npz, tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    study = tmp_path / "study"
    assert main(command(study, path, tiny_npz, 1)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and expected in err
    if "allowed" not in err:  # the config's own refusal names what it allows
        assert "refuses" in err or "section.field" in err or "mapping" in err
    assert not study.exists()  # refused before anything was created


def test_training_option_that_overrules_a_searched_field_is_refused(
    tiny_npz, space, tmp_path, capsys
):
    study = tmp_path / "study"
    argv = command(study, space, tiny_npz, 1) + ["--lr", "0.1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--lr sets optim.lr, which is searched" in err and len(err.splitlines()) == 1


def test_edited_space_is_refused_and_an_untested_trial_is_tested_on_rerun(
    tiny_npz, space, tmp_path, capsys, trained
):
    study = tmp_path / "study"
    assert main(command(study, space, tiny_npz, 1)) == 0
    report = study / "members" / "trial-000" / REPORT_JSON
    report.unlink()  # as if the process died during the test step
    edited = tmp_path / "edited.yaml"
    edited.write_text(SPACE.replace("1.0e-2", "2.0e-2"))
    capsys.readouterr()
    assert main(command(study, edited, tiny_npz, 1)) == 2
    err = capsys.readouterr().err.strip()
    assert "made by a different command" in err and len(err.splitlines()) == 1
    assert main(command(study, space, tiny_npz, 1)) == 0
    assert report.is_file() and len(trained) == 1  # tested again, not trained again


def test_median_pruner_waits_for_three_trials_and_spares_epoch_one():
    study = optuna.create_study(direction="maximize", pruner=search.make_pruner("median"))
    for _ in range(3):
        good = study.ask()
        good.report(0.9, 1)
        good.report(0.9, 2)
        study.tell(good, 0.9)
    weak = study.ask()
    weak.report(0.1, 1)
    assert not weak.should_prune()  # epoch 1: every run is still near chance
    weak.report(0.1, 2)
    assert weak.should_prune()
    assert isinstance(search.make_pruner("none"), optuna.pruners.NopPruner)


def test_interrupted_trial_is_marked_failed_and_the_rerun_draws_a_new_one(
    tiny_npz, space, tmp_path, monkeypatch
):
    study = tmp_path / "study"
    real = search._train

    def interrupted(argv, run_dir, pruning, console):
        summary = real(argv, run_dir, pruning, console)
        return {**summary, "stopped": "interrupted"}  # as a first Ctrl-C leaves it

    monkeypatch.setattr(search, "_train", interrupted)
    assert main(command(study, space, tiny_npz, 1)) == 130
    monkeypatch.setattr(search, "_train", real)
    assert main(command(study, space, tiny_npz, 1)) == 0
    assert [t.state.name for t in load(study).trials] == ["FAIL", "COMPLETE"]
    assert (study / "members" / "trial-000" / "checkpoints" / "last.pt").is_file()  # kept
    assert (study / "members" / "trial-001" / REPORT_JSON).is_file()


def test_trials_without_a_finite_metric_fail_and_the_search_stops(
    tiny_npz, space, tmp_path, monkeypatch, capsys
):
    study = tmp_path / "study"
    real = search._train

    def never_finite(argv, run_dir, pruning, console):
        summary = real(argv, run_dir, pruning, console)
        pruning.values = dict.fromkeys(pruning.values, math.nan)
        return summary

    monkeypatch.setattr(search, "_train", never_finite)
    assert main(command(study, space, tiny_npz, 1)) == 2
    err = capsys.readouterr().err.strip()
    assert "1 trials failed in this run" in err and len(err.splitlines()) == 1
    assert [t.state.name for t in load(study).trials] == ["FAIL"]


def test_the_monitor_the_search_sets_is_refused_in_one_line():
    with pytest.raises(StudyError, match=r"--set run.monitor is set by the study \(--metric\)"):
        search._train_args(["--set", "run.monitor=val_loss"], [])


def test_best_config_of_a_short_swa_run_loads_back_and_a_bad_file_is_named(tmp_path):
    # SWA's scaled start lies past the end of a 1-epoch run: the run's own config still loads.
    cfg = search.resolve_config(["--preset", "cpu", "--epochs", "1", "--set", "safety.swa=true"])
    assert cfg.safety.swa and cfg.safety.swa_start_epoch > cfg.run.epochs
    cfg.run.run_dir = ""
    path = tmp_path / "best_config.yaml"
    save_config(cfg, path)
    assert search.reload_problem(path) is None
    path.write_text("optim:\n  lr: -1\n")
    assert "optim.lr" in search.reload_problem(path)


def test_a_failed_plot_save_leaves_no_file_behind(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    study = optuna.create_study(direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)

    def half_written(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG")  # a truncated file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        search.write_plots(study, tmp_path, "val_acc")
    assert list(tmp_path.iterdir()) == []
