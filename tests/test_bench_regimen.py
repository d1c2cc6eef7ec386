"""``bench/regimen.py`` on a tiny generated source: both arms run, score and write their JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from training.calibration import expected_calibration_error, nll

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_regimen", ROOT / "bench" / "regimen.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture
def keep_threads():
    """The benchmark sets torch's thread count; put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _argv(source: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(source),
        "--run-dir",
        str(tmp_path / "run"),
        "--plain-epochs",
        "1",
        "--threads",
        "1",
        "--set",
        f"data.root={tmp_path / 'cache'}",
        *extra,
    ]


def test_plain_network_matches_the_reference_size():
    # The README's reference CNN has 288k parameters on the 3-channel, 8-class blood cells.
    model = bench.PlainCNN(3, 8)
    assert sum(p.numel() for p in model.parameters()) == 288_488
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 8)


def test_flips_only_mirror_images():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    out = bench.random_flips(x, vertical=True, generator=torch.Generator().manual_seed(0))
    for original, flipped in zip(x, out, strict=True):
        views = [original, original.flip(2), original.flip(1), original.flip(1).flip(2)]
        assert any(torch.equal(flipped, v) for v in views)


def test_temperature_changes_confidence_not_predictions():
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * 4
    labels = torch.arange(50) % 4
    raw = bench.score(logits, labels, wall_s=1.0)
    scaled = bench.score(logits, labels, wall_s=1.0, temperature=3.0)
    assert scaled.accuracy == raw.accuracy and scaled.macro_f1 == raw.macro_f1
    assert scaled.nll == pytest.approx(nll(logits, labels, 3.0))
    assert scaled.ece == pytest.approx(expected_calibration_error(logits / 3.0, labels, 15))
    assert scaled.ece != pytest.approx(raw.ece)


def _entry(accuracy: float, scaled_ece: float | None) -> dict:
    raw = bench.Scores(accuracy, accuracy, 0.1, 0.05, 10.0)
    scaled = None if scaled_ece is None else bench.Scores(accuracy, accuracy, 0.1, scaled_ece, 10.0)
    return {"raw": raw, "scaled": scaled, "temperature": None if scaled is None else 1.5}


def test_verdicts_judge_swa_when_the_run_has_it():
    plain = bench.Scores(0.98, 0.98, 0.1, 0.02, 5.0)
    both = {"best": _entry(0.99, 0.01), "swa": _entry(0.97, 0.02)}
    v = bench.verdicts(plain, both, reference=None)
    assert v["weights"] == "swa" and v["regimen_beats_plain"] is False
    assert v["scaled_ece_met"] is False
    assert bench.verdict_lines(v)[0] == (
        "regimen beats plain: no (0.9700 regimen-swa vs 0.9800 plain)"
    )
    v = bench.verdicts(plain, {"best": _entry(0.99, 0.01)}, reference=None)
    assert v["weights"] == "best" and v["regimen_beats_plain"] and v["scaled_ece_met"]
    assert bench.verdict_lines(v)[1].startswith("temperature-scaled ECE < 1.5%: yes")


def test_verdicts_without_plain_use_the_reference_or_none():
    v = bench.verdicts(None, {"best": _entry(0.99, None)}, reference=0.9851)
    assert v["plain_source"] == "reference" and v["regimen_beats_plain"] is True
    assert v["scaled_ece_met"] is False  # no temperature: the target cannot be met
    assert bench.verdicts(None, {"best": _entry(0.99, None)}, None)["regimen_beats_plain"] is None


def test_both_arms_score_and_write_json(npz_factory, tmp_path, capsys, keep_threads):
    source = npz_factory(n=(40, 12, 24), size=28)
    argv = _argv(
        source,
        tmp_path,
        "--set",
        "run.epochs=1",
        "--set",
        "model.width=0.125",
        "--set",
        "optim.batch_size=16",
    )
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "run" / bench.RESULT_JSON).read_text())

    plain = report["plain"]["scores"]
    assert 0.0 <= plain["accuracy"] <= 1.0 and plain["nll"] > 0 and 0.0 <= plain["ece"] <= 1.0
    assert plain["wall_s"] > 0 and report["plain"]["epochs"] == 1

    regimen = report["regimen"]
    assert regimen["returncode"] == 0 and 0 < regimen["train_loop_s"] < regimen["wall_s"]
    best = regimen["weights"]["best"]
    assert 0.0 <= best["raw"]["accuracy"] <= 1.0 and 0.0 <= best["raw"]["macro_f1"] <= 1.0
    if best["temperature"] is not None:  # a checkpoint from before temperature scaling has none
        scaled = best["scaled"]
        assert scaled["accuracy"] == best["raw"]["accuracy"]  # T never changes a prediction
    assert report["same_test_split"] is True

    assert set(report["rows"]) == {
        "plain",
        "regimen-best",
        "regimen-best+T",
        "regimen-swa",
        "regimen-swa+T",
    }
    assert "regimen beats plain: " in out and "temperature-scaled ECE < 1.5%: " in out
    beats = report["targets"]["regimen_beats_plain"]
    assert beats == (report["targets"]["regimen_accuracy"] > plain["accuracy"])


def test_skip_regimen_still_reports_plain(npz_factory, tmp_path, capsys, keep_threads):
    source = npz_factory(n=(30, 9, 12), size=8)
    assert bench.main(_argv(source, tmp_path, "--skip-regimen")) == 0
    report = json.loads((tmp_path / "run" / bench.RESULT_JSON).read_text())
    assert report["regimen"] is None and report["rows"]["regimen-best"] == "skipped"
    assert 0.0 <= report["plain"]["scores"]["accuracy"] <= 1.0
    assert "regimen beats plain: n/a" in capsys.readouterr().out


def test_missing_data_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "absent.npz"
    assert bench.main(["--data", str(missing), "--skip-regimen"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(missing) in err and "not found" in err


def test_run_dir_with_checkpoints_is_refused(npz_factory, tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "best.pt").write_bytes(b"old")
    assert bench.main(_argv(npz_factory(), tmp_path)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_both_skips_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--skip-plain", "--skip-regimen"])
    assert exc.value.code == 2
    assert "nothing to run" in capsys.readouterr().err
