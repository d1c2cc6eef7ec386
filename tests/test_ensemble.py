"""``test.py --ensemble``: the mean of several runs' (temperature-scaled) test logits."""

from __future__ import annotations

import importlib.util
import json
import shutil
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from experiments.study import expand_runs
from training.engine.checkpoint import load_checkpoint, save_checkpoint
from training.engine.inference import predict
from training.evaluation.ensemble import (
    ENSEMBLE_JSON,
    ENSEMBLE_ROW,
    EnsembleError,
    evaluate_ensemble,
    member_names,
)
from training.evaluation.metrics import scored_metrics
from training.evaluation.report import (
    SCALED_SUFFIX,
    TEMPERATURE_TTA_KEY,
    build_model,
    checkpoint_temperature,
    checkpoint_temperature_reason,
    final_of,
    find_weights,
    load_weight_set,
    print_report,
)
from training.evaluation.report import (
    test_loader as make_test_loader,  # aliased: pytest would collect test_loader
)

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("accuracy", "macro_f1", "balanced_accuracy", "nll", "ece", "temperature")


def train(base: Path, npz: Path, name: str, seed: int, swa: bool = True) -> Path:
    """A tiny run as ``conftest.train_tiny_run`` trains it, on ``npz`` with ``run.seed=seed``;
    every run of ``base`` shares one cache root, so runs on the same npz share their split."""
    import models.train as train_script
    from training.evaluation.report import evaluate_run, save_report

    run = base / name
    code = train_script.main(
        [
            "--preset", "cpu", "--data", str(npz), "--run-dir", str(run),
            "--epochs", "4", "--set", "model.width=0.125",
            "--set", "model.block_channels=[]", "--set", "unfreeze.activate_at=[1, 2]",
            "--set", f"data.root={base / 'cache'}", "--set", f"run.seed={seed}",
            "--set", "optim.batch_size=16", "--set", "run.progress=plain",
            "--set", "run.tensorboard=false",
            *(["--set", "safety.swa_start_epoch=3"] if swa else ["--set", "safety.swa=false"]),
        ]
    )  # fmt: skip
    assert code == 0, f"the tiny run {name} did not train"
    save_report(evaluate_run(run, batch_size=32), run)
    return run


def overlapping_npz(path: Path, counts=(96, 24, 24)) -> Path:
    """Like ``conftest.brightness_npz``, but each image's brightness is shifted as a whole, so
    the classes overlap: some validation images are wrong and a temperature gets fitted."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        labels = np.arange(n) % 3
        level = labels * 70 + 50 + rng.integers(-55, 56, size=n)
        noise = rng.integers(-20, 21, size=(n, 28, 28, 3))
        arrays[f"{split}_images"] = np.clip(level[:, None, None, None] + noise, 0, 255).astype(
            np.uint8
        )
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``a`` and ``b``: the same data, different seeds; ``other``: the same images under other
    class names. Shared by the tests here: copy a run before changing it."""
    base = tmp_path_factory.mktemp("ensemble")
    npz = overlapping_npz(base / "tiny.npz")
    relabelled = dict(np.load(npz))
    relabelled["class_names"] = np.array(["dark", "mid", "bright"])
    other = base / "other.npz"
    np.savez(other, **relabelled)
    return {
        "a": train(base, npz, "a", seed=0),
        "b": train(base, npz, "b", seed=1),
        "other": train(base, other, "other", seed=0, swa=False),
    }


def load_entry_script():
    # Loaded from its path: "import test" would find the standard library's test package.
    spec = importlib.util.spec_from_file_location("entry_test_script", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def member_logits(run_dir: Path, mode: str, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A member's test logits computed here, without the ensemble module: its final weight set
    through ``predict``, divided by its temperature when that applies and ``scaled``."""
    name = final_of(find_weights(run_dir))
    ckpt = load_weight_set(run_dir, name)
    own = load_checkpoint(run_dir / "checkpoints" / f"{name}.pt")
    loader, _ = make_test_loader(ckpt, None, 32, 0)
    logits, labels = predict(build_model(ckpt), loader, "cpu", None, tta=mode)
    applies = own.get(TEMPERATURE_TTA_KEY, "none") == mode
    applies = applies and checkpoint_temperature_reason(own) is None
    temperature = checkpoint_temperature(own, Path(name)) if applies and scaled else None
    return logits.double() / (temperature or 1.0), labels


def assert_same_metrics(row: dict, expected: dict) -> None:
    for key in COMPARED:
        assert row[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert row["confusion_matrix"] == expected["confusion_matrix"]


def patched_copy(run_dir: Path, dest: Path, patch) -> Path:
    """A copy of ``run_dir`` whose every checkpoint has gone through ``patch(ckpt)``."""
    shutil.copytree(run_dir, dest)
    for path in (dest / "checkpoints").glob("*.pt"):
        ckpt = load_checkpoint(path)
        patch(ckpt)
        save_checkpoint(ckpt, path)
    return dest


# --------------------------------------------------------------------------- the scores


def test_ensemble_is_the_mean_of_the_members_scaled_logits(runs):
    report = evaluate_ensemble([runs["a"], runs["b"]], device="cpu", batch_size=32)
    mode = report["tta"]
    assert list(report["weights"]) == ["a", "b", ENSEMBLE_ROW]
    assert report["scaling"] == "member" and report["n_test"] == 24
    parts = [member_logits(runs[n], mode, scaled=True) for n in ("a", "b")]
    labels = parts[0][1]
    mean = torch.stack([logits for logits, _ in parts]).mean(dim=0)
    expected = scored_metrics(mean, labels, report["class_names"])
    assert_same_metrics(report["weights"][ENSEMBLE_ROW], expected)
    # A member's row is its own test report's figure for its final weights (+T when scaled).
    used = []
    for name in ("a", "b"):
        saved = json.loads((runs[name] / "test_report.json").read_text())
        weights = final_of(find_weights(runs[name]))
        member = report["members"][name]
        assert member["weights"] == weights and member["run_dir"] == str(runs[name])
        scaled = weights + SCALED_SUFFIX
        row = scaled if scaled in saved["weights"] else weights
        assert_same_metrics(report["weights"][name], saved["weights"][row])
        assert member["temperature"] == saved["weights"][row]["temperature"]
        used.append(member["temperature"])
    # The runs fitted temperatures, so the scaling had something to do.
    assert any(t != 1.0 for t in used)


def test_scaling_none_averages_the_raw_logits(runs):
    report = evaluate_ensemble([runs["a"], runs["b"]], device="cpu", batch_size=32, scaling="none")
    parts = [member_logits(runs[n], report["tta"], scaled=False) for n in ("a", "b")]
    mean = torch.stack([logits for logits, _ in parts]).mean(dim=0)
    expected = scored_metrics(mean, parts[0][1], report["class_names"])
    assert_same_metrics(report["weights"][ENSEMBLE_ROW], expected)
    assert all(m["temperature"] == 1.0 for m in report["members"].values())
    scaled = evaluate_ensemble([runs["a"], runs["b"]], device="cpu", batch_size=32)
    assert scaled["weights"][ENSEMBLE_ROW]["nll"] != pytest.approx(expected["nll"])


def test_the_report_has_evaluate_runs_shape(runs):
    report = evaluate_ensemble([runs["a"], runs["b"]], device="cpu", batch_size=32)
    out = StringIO()
    print_report(report, Console(file=out, width=200))
    assert ENSEMBLE_ROW in out.getvalue()
    json.dumps(report)  # JSON-ready as it is


# --------------------------------------------------------------------------- refusals


def test_members_with_other_class_names_are_refused(runs, capsys):
    code = load_entry_script().main(["--ensemble", str(runs["a"]), str(runs["other"])])
    assert code == 2
    err = one_line_error(capsys)
    assert "member other" in err and "class names" in err and "'dark'" in err


def test_members_with_other_normalisation_are_refused(runs, tmp_path, capsys):
    def brighter(ckpt):
        ckpt["mean"] = [v + 0.1 for v in ckpt["mean"]]

    copy = patched_copy(runs["b"], tmp_path / "shifted", brighter)
    assert load_entry_script().main(["--ensemble", str(runs["a"]), str(copy)]) == 2
    err = one_line_error(capsys)
    assert "member shifted" in err and "normalisation mean" in err


def test_members_split_otherwise_are_refused(runs, tmp_path, capsys):
    def resplit(ckpt):
        ckpt["config"]["data"]["split_seed"] = 7

    copy = patched_copy(runs["b"], tmp_path / "resplit", resplit)
    assert load_entry_script().main(["--ensemble", str(runs["a"]), str(copy)]) == 2
    err = one_line_error(capsys)
    assert "member resplit" in err and "split options" in err and "'seed': 7" in err


def test_one_member_is_refused(runs, capsys):
    assert load_entry_script().main(["--ensemble", str(runs["a"])]) == 2
    assert "at least 2 members; got 1" in one_line_error(capsys)
    with pytest.raises(EnsembleError, match="given twice"):
        evaluate_ensemble([runs["a"], runs["a"]], device="cpu")


def test_ensemble_excludes_run_dir_and_report(runs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_entry_script().main(["--ensemble", str(runs["a"]), "--run-dir", str(runs["b"])])
    assert exit_info.value.code == 2
    assert "cannot be combined with --run-dir" in capsys.readouterr().err


# --------------------------------------------------------------------------- studies and files


def test_a_study_folder_expands_to_its_finished_members(runs, tmp_path, capsys):
    study = tmp_path / "study"
    (study / "members").mkdir(parents=True)
    # The study's own record names its members, in its order; only finished ones count.
    (study / "study.json").write_text(json.dumps({"members": ["x", "y/seed-1", "z"]}))
    shutil.copytree(runs["a"], study / "members" / "x")
    shutil.copytree(runs["b"], study / "members" / "y" / "seed-1")  # a compare study's nesting
    unfinished = shutil.copytree(runs["b"], study / "members" / "z")
    (unfinished / "test_report.json").unlink()
    members = study / "members"
    assert expand_runs([study]) == [members / "x", members / "y" / "seed-1"]

    assert load_entry_script().main(["--ensemble", str(study), "--batch-size", "32"]) == 0
    assert str(study / ENSEMBLE_JSON) in capsys.readouterr().out
    saved = json.loads((study / ENSEMBLE_JSON).read_text())
    assert list(saved["weights"]) == ["x", "seed-1", ENSEMBLE_ROW]
    direct = evaluate_ensemble([runs["a"], runs["b"]], device="cpu", batch_size=32)
    assert_same_metrics(saved["weights"][ENSEMBLE_ROW], direct["weights"][ENSEMBLE_ROW])


def test_out_file_and_scaling_flag(runs, tmp_path, capsys):
    out = tmp_path / "reports" / "ens.json"
    argv = ["--ensemble", str(runs["a"]), str(runs["b"]), "--ensemble-scaling", "none"]
    assert load_entry_script().main([*argv, "--ensemble-out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["scaling"] == "none" and list(saved["members"]) == ["a", "b"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    capsys.readouterr()
    assert load_entry_script().main(argv) == 0  # runs given: printed, written nowhere
    assert "not written" in capsys.readouterr().out


def test_member_names_lengthen_only_where_they_clash():
    paths = [Path("/s/members/A/seed-0"), Path("/s/members/B/seed-0"), Path("/r/solo")]
    assert member_names(paths) == ["A/seed-0", "B/seed-0", "solo"]
    assert member_names([Path("/r/ensemble"), Path("/r/x")]) == ["r/ensemble", "x"]
