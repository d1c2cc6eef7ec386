"""Studies (``python -m experiments``): the seeds kind trains, tests, resumes and summarises
real tiny runs; refusals are one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models.train as train_script
from experiments.__main__ import main
from experiments.seeds import paired_rows, parse_seeds
from experiments.study import STUDY_JSON, SUMMARY_JSON, StudyError, member_runs, open_study
from training.engine.trainer import Trainer
from training.evaluation.report import REPORT_JSON, SCALED_SUFFIX, final_of
from training.evaluation.stats import mean_sd

FIGURES = ("accuracy", "macro_f1", "balanced_accuracy", "nll", "ece")


def tiny_train(npz: Path, root: Path, epochs: int = 2) -> list[str]:
    """Training options for a run of a few seconds (the tiny model of conftest.train_tiny_run)."""
    return [
        "--preset", "cpu", "--data", str(npz), "--epochs", str(epochs),
        "--set", "model.width=0.125", "--set", "model.block_channels=[]",
        "--set", "optim.batch_size=16", "--set", "run.progress=plain",
        "--set", "run.tensorboard=false", "--set", f"data.root={root / 'cache'}",
    ]  # fmt: skip


def report_figures(run: Path) -> dict[str, float]:
    """The final weight set's figures, read from the member's own test report."""
    weights = json.loads((run / REPORT_JSON).read_text())["weights"]
    final = final_of(n for n, m in weights.items() if "scaled_from" not in m)
    figures = {key: weights[final][key] for key in FIGURES}
    if final + SCALED_SUFFIX in weights:
        figures["nll+T"] = weights[final + SCALED_SUFFIX]["nll"]
        figures["ece+T"] = weights[final + SCALED_SUFFIX]["ece"]
    return figures


@pytest.fixture
def count_train(monkeypatch):
    """Every argv models/train.py's main was called with (the real main still runs)."""
    calls: list[list[str]] = []
    real = train_script.main

    def counted(argv):
        calls.append(list(argv))
        return real(argv)

    monkeypatch.setattr(train_script, "main", counted)
    return calls


def test_seed_study_trains_tests_summarises_and_skips_finished(
    tiny_npz, tmp_path, capsys, count_train
):
    study = tmp_path / "study"
    command = [
        "seeds",
        "--study-dir",
        str(study),
        "--seeds",
        "0-1",
        "--",
        *tiny_train(tiny_npz, tmp_path),
    ]
    assert main(command) == 0
    out = capsys.readouterr().out
    runs = [study / "members" / "seed-0", study / "members" / "seed-1"]
    assert all((run / REPORT_JSON).is_file() for run in runs)
    assert member_runs(study) == runs
    # Each member got its own seed, after the pass-through options (so it wins).
    assert [c[c.index("--run-dir") - 1] for c in count_train] == ["run.seed=0", "run.seed=1"]
    assert "seed: 1" in (runs[1] / "config.yaml").read_text()

    summary = json.loads((study / SUMMARY_JSON).read_text())
    assert summary["complete"] and summary["pending"] == []
    per_member = [report_figures(run) for run in runs]
    assert {"nll+T", "ece+T"} <= set(per_member[0])  # the tiny run fits a temperature
    for key in per_member[0]:
        values = [figures[key] for figures in per_member]
        stat = summary["figures"]["all"][key]
        assert stat["mean"] == pytest.approx(mean_sd(values)["mean"])
        assert stat["sd"] == pytest.approx(mean_sd(values)["sd"])
        assert stat["values"] == pytest.approx(values)
    assert summary["members"]["seed-1"]["figures"] == pytest.approx(per_member[1])
    # The table was printed: its title and one row per figure.
    assert "seeds 0,1: mean ± sd" in out
    for label in ("accuracy", "macro-F1", "balanced accuracy", "NLL +T", "ECE +T"):
        assert label in out

    # The same command again: nothing is trained or tested again.
    mtimes = [(run / REPORT_JSON).stat().st_mtime_ns for run in runs]
    count_train.clear()
    assert main(command) == 0
    assert count_train == []
    assert [(run / REPORT_JSON).stat().st_mtime_ns for run in runs] == mtimes
    assert capsys.readouterr().out.count("finished already, skipped") == 2


def test_interrupted_study_resumes_its_member(tiny_npz, tmp_path, monkeypatch, count_train):
    """A Ctrl-C after the first epoch stops the whole study (130, the next member untouched);
    the same command then resumes that member with --resume to its last epoch."""
    real_epoch = Trainer._run_epoch

    def ctrl_c_after_first_epoch(self, epoch):
        real_epoch(self, epoch)
        if epoch == 1:
            signal.raise_signal(signal.SIGINT)  # the trainer's own handler takes it

    monkeypatch.setattr(Trainer, "_run_epoch", ctrl_c_after_first_epoch)
    study = tmp_path / "study"
    command = [
        "seeds",
        "--study-dir",
        str(study),
        "--seeds",
        "0,1",
        "--",
        *tiny_train(tiny_npz, tmp_path, epochs=3),
    ]
    assert main(command) == 130
    seed0, seed1 = study / "members" / "seed-0", study / "members" / "seed-1"
    last = seed0 / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=False)["epoch"] == 1
    assert not (seed0 / REPORT_JSON).exists() and not seed1.exists()
    assert len(count_train) == 1

    monkeypatch.setattr(Trainer, "_run_epoch", real_epoch)
    count_train.clear()
    assert main(command) == 0
    assert count_train[0] == ["--resume", str(seed0)]
    assert "--resume" not in count_train[1]
    assert torch.load(last, weights_only=False)["epoch"] == 3
    epochs = [json.loads(line).get("epoch") for line in (seed0 / "metrics.jsonl").open()]
    assert [e for e in epochs if e is not None] == [1, 2, 3]
    assert (seed0 / REPORT_JSON).is_file() and (seed1 / REPORT_JSON).is_file()


def test_trained_member_without_report_is_only_tested(tiny_npz, tmp_path, count_train):
    """A member that trained every epoch but was stopped before its test: --resume does
    nothing (train.py says so and returns 0), then the test step runs."""
    study = tmp_path / "study"
    command = [
        "seeds",
        "--study-dir",
        str(study),
        "--seeds",
        "0",
        "--",
        *tiny_train(tiny_npz, tmp_path),
    ]
    assert main(command) == 0
    report = study / "members" / "seed-0" / REPORT_JSON
    report.unlink()
    last = study / "members" / "seed-0" / "checkpoints" / "last.pt"
    before = last.stat().st_mtime_ns
    assert main(command) == 0
    assert count_train[-1][0] == "--resume"
    assert report.is_file() and last.stat().st_mtime_ns == before


def test_a_different_command_on_a_study_is_refused_in_one_line(tmp_path, capsys):
    study = tmp_path / "study"
    open_study(
        study,
        kind="seeds",
        options={"seeds": [0, 1], "compare": None},
        train_argv=["--epochs", "2"],
        members=["seed-0", "seed-1"],
        command=["seeds", "--study-dir", str(study), "--seeds", "0-1", "--", "--epochs", "2"],
    )
    record = (study / STUDY_JSON).read_text()
    assert main(["seeds", "--study-dir", str(study), "--seeds", "0-2", "--", "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "different command" in err and "seeds [0, 1] vs [0, 1, 2]" in err
    assert "--seeds 0-1" in err  # the stored command, to continue with
    assert main(["seeds", "--study-dir", str(study), "--seeds", "0-1", "--", "--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training options '--epochs 2' vs '--epochs 3'" in err
    assert (study / STUDY_JSON).read_text() == record
    assert not (study / "members").exists()


def test_a_failing_member_stops_the_study_and_deletes_nothing(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(train_script, "main", lambda argv: calls.append(argv) or 2)
    study = tmp_path / "study"
    assert main(["seeds", "--study-dir", str(study), "--seeds", "0-1", "--", "--epochs", "2"]) == 2
    out = capsys.readouterr().out
    assert "study stopped: member seed-0 exited with code 2" in " ".join(out.split())
    assert len(calls) == 1  # seed-1 never started
    assert (study / STUDY_JSON).is_file() and (study / SUMMARY_JSON).is_file()
    assert json.loads((study / SUMMARY_JSON).read_text())["pending"] == ["seed-0", "seed-1"]

    # A member whose run saved no epoch is neither resumed nor cleared: the study says so.
    stuck = study / "members" / "seed-0"
    stuck.mkdir(parents=True)
    (stuck / "config.yaml").write_text("run: {}\n")
    calls.clear()
    assert main(["seeds", "--study-dir", str(study), "--seeds", "0-1", "--", "--epochs", "2"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "saved no epoch" in out and "member seed-0 exited with code 2" in out
    assert calls == [] and (stuck / "config.yaml").read_text() == "run: {}\n"


def test_compare_gives_paired_differences(tiny_npz, tmp_path, capsys, count_train):
    low, high = tmp_path / "lowlr.yaml", tmp_path / "highlr.yaml"
    low.write_text("optim:\n  lr: 1.0e-4\n")
    high.write_text("optim:\n  lr: 3.0e-3\n")
    study = tmp_path / "study"
    command = [
        "seeds", "--study-dir", str(study), "--seeds", "0", "1",
        "--compare", str(low), str(high), "--", *tiny_train(tiny_npz, tmp_path),
    ]  # fmt: skip
    assert main(command) == 0
    out = capsys.readouterr().out
    names = ["lowlr/seed-0", "highlr/seed-0", "lowlr/seed-1", "highlr/seed-1"]
    runs = [study / "members" / name for name in names]
    assert member_runs(study) == runs  # interleaved, so a stopped study holds whole pairs
    assert [c[c.index("--config") + 1] for c in count_train] == [
        str(p.resolve()) for p in (low, high, low, high)
    ]
    assert "lr: 0.0001" in (runs[0] / "config.yaml").read_text()

    summary = json.loads((study / SUMMARY_JSON).read_text())
    assert summary["arms"] == ["lowlr", "highlr"]
    figures = [report_figures(run) for run in runs]
    for key in FIGURES:
        diffs = [figures[1][key] - figures[0][key], figures[3][key] - figures[2][key]]
        row = summary["paired"][key]
        assert row["n"] == 2 and row["seeds"] == [0, 1]
        assert row["mean"] == pytest.approx(mean_sd(diffs)["mean"])
        assert row["low"] <= row["mean"] <= row["high"]
        assert row["tie"] == (row["low"] <= 0 <= row["high"])
        assert (row["verdict"] == "tie") == row["tie"]
        assert summary["figures"]["highlr"][key]["mean"] == pytest.approx(
            mean_sd([figures[1][key], figures[3][key]])["mean"]
        )
    assert "highlr - lowlr, paired by seed" in out and "95% interval" in out
    assert out.count("tie") + out.count("better") >= len(FIGURES)


@pytest.mark.parametrize(
    ("tokens", "seeds"),
    [(["0-4"], [0, 1, 2, 3, 4]), (["0,1,2"], [0, 1, 2]), (["0", "1", "2"], [0, 1, 2]),
     (["0 1 2"], [0, 1, 2]), (["3", "7-8"], [3, 7, 8])],
)  # fmt: skip
def test_seed_lists(tokens, seeds):
    assert parse_seeds(tokens) == seeds


@pytest.mark.parametrize(
    ("tokens", "why"),
    [(["0-x"], "not a seed"), (["4-1"], "goes down"), (["0,0"], "given twice"), ([","], "empty")],
)
def test_a_bad_seed_list_is_one_line(tokens, why, tmp_path, capsys):
    with pytest.raises(StudyError, match=why):
        parse_seeds(tokens)
    assert main(["seeds", "--study-dir", str(tmp_path / "s"), "--seeds", *tokens]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--", "--seed", "3"], "--seed is set by the study"),
        (["--", "--run-dir", "x"], "--run-dir is set by the study"),
        (["--", "--set", "run.seed=3"], "--set run.seed is set by the study"),
        (["--", "--bogus"], "unrecognized arguments: --bogus"),
        (["--epochs", "3"], "training options go after --"),
    ],
)
def test_options_the_study_owns_or_misplaced_are_refused_in_one_line(argv, why, tmp_path, capsys):
    assert main(["seeds", "--study-dir", str(tmp_path / "s"), "--seeds", "0", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err
    assert not (tmp_path / "s").exists()


def test_paired_verdicts_follow_each_figures_direction():
    """Higher accuracy and lower NLL are both "B better"; an interval holding 0 is a tie."""
    members = {}
    for seed, (acc_a, acc_b, nll_a, nll_b, ece_a, ece_b) in enumerate(
        [(0.80, 0.90, 0.50, 0.30, 0.05, 0.06), (0.82, 0.91, 0.52, 0.33, 0.07, 0.05),
         (0.81, 0.93, 0.49, 0.31, 0.06, 0.06)]
    ):  # fmt: skip
        members[f"A/seed-{seed}"] = {
            "arm": "A",
            "seed": seed,
            "figures": {"accuracy": acc_a, "nll": nll_a, "ece": ece_a},
        }
        members[f"B/seed-{seed}"] = {
            "arm": "B",
            "seed": seed,
            "figures": {"accuracy": acc_b, "nll": nll_b, "ece": ece_b},
        }
    rows = paired_rows(members, "A", "B")
    assert rows["accuracy"]["verdict"] == "B better" and not rows["accuracy"]["tie"]
    assert rows["accuracy"]["mean"] == pytest.approx((0.10 + 0.09 + 0.12) / 3)
    assert rows["nll"]["verdict"] == "B better" and rows["nll"]["high"] < 0
    assert rows["ece"]["verdict"] == "tie" and rows["ece"]["low"] <= 0 <= rows["ece"]["high"]
    assert rows["macro_f1"] == {"n": 0, "seeds": [], "verdict": "fewer than 2 pairs"}


def test_an_edited_compare_file_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_script, "main", lambda argv: 2)  # no member trains here
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("optim:\n  lr: 1.0e-3\n")
    b.write_text("optim:\n  lr: 2.0e-3\n")
    study = str(tmp_path / "s")
    command = ["seeds", "--study-dir", study, "--seeds", "0-1", "--compare", str(a), str(b)]
    assert main(command) == 2  # the first member's (patched) failure
    capsys.readouterr()
    b.write_text("optim:\n  lr: 5.0e-3\n")
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{b.resolve()} changed since study" in err


@pytest.mark.parametrize(
    "stored, why",
    [
        ([1, 2], "is not a JSON object (holds a list)"),
        ({"format": "x"}, "format 'x' is invalid; allowed: an int <= 1"),
        ({"format": True}, "format True is invalid; allowed: an int <= 1"),
        ({"format": 99}, "written by a newer version (format 99"),
    ],
)
def test_a_study_json_of_the_wrong_shape_is_one_line(stored, why, tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    (study / STUDY_JSON).write_text(json.dumps(stored))
    assert main(["seeds", "--study-dir", str(study), "--seeds", "0", "--", "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err, err
    assert json.loads((study / STUDY_JSON).read_text()) == stored  # left as it was


def test_a_study_json_that_is_no_object_is_one_line_for_the_readers(tmp_path):
    (tmp_path / STUDY_JSON).write_text("[]")
    with pytest.raises(StudyError, match="is not a JSON object"):
        member_runs(tmp_path)


def test_the_study_folder_lookups_import_without_the_training_script():
    # A fresh interpreter: in this one the tests have imported models.train already.
    code = (
        "import sys, experiments.folder; assert 'models.train' not in sys.modules; "
        "import models.train, experiments.study; "
        "assert experiments.study.expand_runs is experiments.folder.expand_runs"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
