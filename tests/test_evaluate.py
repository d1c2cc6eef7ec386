"""Test-set evaluation: metrics on hand-made logits, a run's weight sets (with and without a
fitted temperature), and the test.py script."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch.utils.data import DataLoader, TensorDataset

from dataset.cache import prepare
from models.basic_cnn_model import BasicCNNModel, ModelConfig
from training.engine.checkpoint import CheckpointError
from training.evaluation import calibration
from training.evaluation.tta import tta_logits

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["alpha", "beta", "gamma"]
# The checkpoint's statistics differ from the cache's, so a test can tell which were used.
CKPT_MEAN, CKPT_STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
REPORT_KEYS = {
    "accuracy",
    "macro_f1",
    "balanced_accuracy",
    "nll",
    "per_class",
    "confusion_matrix",
    "ece",
    "temperature",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers


def write_npz(path: Path, class_names=CLASSES, n=(40, 10, 12), seed=0) -> Path:
    """A MedMNIST-layout .npz of random 28x28 RGB images with balanced labels."""
    rng = np.random.default_rng(seed)
    arrays = {"class_names": np.array(class_names)}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(count, dtype=np.int64) % len(class_names)
    np.savez_compressed(path, **arrays)
    return path


def make_checkpoint(cache, seed: int, epoch: int) -> dict:
    torch.manual_seed(seed)
    config = ModelConfig(num_classes=3, width=0.125, norm="batch", active_blocks=1)
    model = BasicCNNModel(config)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
    return {
        "format": 1,
        "epoch": epoch,
        "step": epoch * 4,
        "model": model.state_dict(),
        # The format before the model record: the BasicCNNModel's config alone.
        "model_config": {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
        },
        "active_blocks": 2,  # deeper than the config's 1: restoring must apply it
        "optimizer": {},
        "scheduler": {},
        "stepper": {},
        "callbacks": {},
        "rng": {},
        "config": {"data": {"source": str(cache.meta["source"]["path"]), "split_seed": 0}},
        "class_names": list(CLASSES),
        "mean": list(CKPT_MEAN),
        "std": list(CKPT_STD),
        "data": {
            "name": cache.name,
            "cache": str(cache.path),
            "source": cache.meta["source"]["path"],
        },
        "best": {"metric": "val_macro_f1", "value": 0.5, "epoch": epoch},
    }


def make_run(base: Path, temperatures: dict | None = None) -> Path:
    """``base/runs/tiny`` with best.pt and swa.pt, trained (so to speak) on ``base/tiny.npz``.

    Args:
        base: the folder to build in.
        temperatures: weight set ("best", "swa") -> the value its checkpoint gets under
            "temperature"; a set not named has no such key, as in a run from before calibration.
    """
    cache, _ = prepare(write_npz(base / "tiny.npz"), base / "data_npy", progress=False)
    folder = base / "runs" / "tiny" / "checkpoints"
    folder.mkdir(parents=True)
    for name, seed, epoch in (("best", 0, 7), ("swa", 1, 9)):
        ckpt = make_checkpoint(cache, seed=seed, epoch=epoch)
        if name in (temperatures or {}):
            ckpt["temperature"] = temperatures[name]
        torch.save(ckpt, folder / f"{name}.pt")
    return folder.parent


def load_entry_script():
    # Loaded from its path: "import test" would find the standard library's test package.
    spec = importlib.util.spec_from_file_location("entry_test_script", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def logits_for(preds, n_classes: int, seed: int = 0) -> torch.Tensor:
    """Random logits whose argmax is ``preds``."""
    noise = torch.randn(len(preds), n_classes, generator=torch.Generator().manual_seed(seed))
    return noise + 10 * F.one_hot(torch.tensor(preds), n_classes).float()


# --------------------------------------------------------------------------- the script run
# The script needs ~8 s just to import torch, sklearn and albumentations on a small machine, so it
# starts before the first test and runs beside the in-process tests; the last test collects it.


@pytest.fixture(scope="module", autouse=True)
def script_run(tmp_path_factory):
    # best has a fitted temperature and swa none, so the script shows both cases.
    run_dir = make_run(tmp_path_factory.mktemp("script"), {"best": 1.6})
    proc = subprocess.Popen(
        [sys.executable, "test.py", "--run-dir", str(run_dir), "--batch-size", "5"],
        cwd=ROOT,
        # One compute thread: the script shares two cores with this process, on tiny tensors.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield run_dir, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


REPORT_MODULE = "training.evaluation.report"


@pytest.fixture(scope="module")
def ev(script_run):
    """The evaluation modules, imported once the script has started: they pull in scikit-learn
    and albumentations (~3 s), which then overlap with the script's own start-up."""
    names = (
        "training.evaluation.report",
        "training.evaluation.metrics",
        "training.engine.inference",
    )
    modules = [importlib.import_module(name) for name in names]
    return SimpleNamespace(**{k: v for m in modules for k, v in vars(m).items()})


# --------------------------------------------------------------------------- metrics


def test_perfect_predictions_score_one(ev):
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    metrics = ev.classification_metrics(logits_for(labels.tolist(), 3), labels, CLASSES)
    assert metrics["accuracy"] == metrics["macro_f1"] == metrics["balanced_accuracy"] == 1.0
    assert metrics["confusion_matrix"] == [[3, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert [c["support"] for c in metrics["per_class"]] == [3, 2, 2]
    assert [c["class"] for c in metrics["per_class"]] == CLASSES


def test_constructed_confusion_gives_exact_scores(ev):
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = logits_for([0, 1, 0, 1, 2, 2], 3, seed=3)
    metrics = ev.classification_metrics(logits, labels, CLASSES)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    recall = [2 / 3, 1 / 2, 1.0]
    precision = [1.0, 1 / 2, 1 / 2]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    assert metrics["balanced_accuracy"] == pytest.approx(sum(recall) / 3)
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / 3)
    for row, p, r, f in zip(metrics["per_class"], precision, recall, f1, strict=True):
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p, r, f))
    assert metrics["nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    json.dumps(metrics)  # plain Python types only


def test_absent_class_keeps_every_shape(ev):
    labels = torch.tensor([0, 0, 1, 1])
    names = ["a", "b", "c", "d"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warning about the missing classes
        metrics = ev.classification_metrics(logits_for([0, 3, 1, 1], 4), labels, names)
    assert metrics["confusion_matrix"] == [[1, 0, 0, 1], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert [c["support"] for c in metrics["per_class"]] == [2, 2, 0, 0]
    assert metrics["per_class"][3]["precision"] == 0.0
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # present classes only


def test_metrics_reject_logits_of_the_wrong_width(ev):
    with pytest.raises(ValueError, match=r"expected \(N, 3\)"):
        ev.classification_metrics(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), CLASSES)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_predict_returns_cpu_float_logits_in_eval_mode(ev, amp_dtype):
    torch.manual_seed(0)
    model = BasicCNNModel(num_classes=3, width=0.125, norm="batch", noise_std=0.5).train()
    x, y = torch.randn(7, 3, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    logits, labels = ev.predict(
        model, DataLoader(TensorDataset(x, y), batch_size=3), "cpu", amp_dtype
    )
    assert logits.dtype == torch.float32 and logits.shape == (7, 3) and logits.device.type == "cpu"
    assert labels.dtype == torch.int64 and labels.tolist() == y.tolist()
    assert model.training  # the caller's mode comes back
    with torch.no_grad():
        expected = model.eval()(x)  # eval: no input noise, running BatchNorm statistics
    tol = 1e-5 if amp_dtype is None else 0.1
    torch.testing.assert_close(logits, expected, atol=tol, rtol=tol)


# --------------------------------------------------------------------------- finding weights


def test_find_weights_prefers_best_and_adds_swa(ev, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.pt").touch()
    assert list(ev.find_weights(tmp_path)) == ["last"]
    (folder / "best.pt").touch()
    (folder / "swa.pt").touch()
    assert list(ev.find_weights(tmp_path)) == ["best", "swa"]


def test_find_weights_explains_a_missing_run(ev, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.find_weights(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="train first with python models/train.py"):
        ev.find_weights(tmp_path)


def test_latest_run_picks_the_newest_checkpoint(ev, tmp_path):
    for i, name in enumerate(["old", "new", "empty"]):
        folder = tmp_path / name / "checkpoints"
        folder.mkdir(parents=True)
        if name != "empty":
            (folder / "last.pt").touch()
            os.utime(folder / "last.pt", (1000 + i, 1000 + i))
    assert ev.latest_run(tmp_path) == tmp_path / "new"
    with pytest.raises(FileNotFoundError, match="no run with checkpoints"):
        ev.latest_run(tmp_path / "empty")


# --------------------------------------------------------------------------- a run in process


def test_evaluate_run_scores_each_weight_set_with_checkpoint_statistics(ev, tmp_path):
    run_dir = make_run(tmp_path, {"best": 1.6})
    report = ev.evaluate_run(run_dir, device="cpu", batch_size=5)
    assert list(report["weights"]) == ["best", "best+T", "swa"]
    assert report["n_test"] == 12 and report["class_names"] == CLASSES
    assert report["checkpoints"]["swa"]["epoch"] == 9

    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    model = ev.build_model(ckpt)
    assert model.active_blocks == 2
    images = torch.from_numpy(np.load(tmp_path / "data_npy" / "tiny" / "test_images.npy"))
    x = (images.float() / 255 - torch.tensor(CKPT_MEAN)) / torch.tensor(CKPT_STD)  # (N, H, W, C)
    with torch.no_grad():
        logits = model.eval()(x.permute(0, 3, 1, 2))
    labels = torch.arange(12) % 3
    expected = ev.classification_metrics(logits, labels, CLASSES)
    assert report["weights"]["best"]["confusion_matrix"] == expected["confusion_matrix"]
    assert report["weights"]["best"]["nll"] == pytest.approx(expected["nll"], rel=1e-4)
    assert report["weights"]["swa"]["nll"] != pytest.approx(expected["nll"], rel=1e-4)
    scaled = report["weights"]["best+T"]
    assert scaled["nll"] == pytest.approx(calibration.nll(logits, labels, 1.6), rel=1e-4)
    assert scaled["ece"] == pytest.approx(
        calibration.expected_calibration_error(logits / 1.6, labels), abs=1e-4
    )


def test_deleted_cache_is_rebuilt_from_the_source(ev, tmp_path):
    run_dir = make_run(tmp_path)
    shutil.rmtree(tmp_path / "data_npy" / "tiny")
    report = ev.evaluate_run(run_dir, device="cpu")
    assert report["n_test"] == 12
    assert (tmp_path / "data_npy" / "tiny" / "meta.json").is_file()


def test_data_override_with_the_same_classes(ev, tmp_path):
    run_dir = make_run(tmp_path)
    other = write_npz(tmp_path / "other.npz", n=(30, 9, 9), seed=5)
    loader, cache = ev.test_loader(
        torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True), str(other), 4, 0
    )
    assert cache.name == "other" and len(loader.dataset) == 9
    image, _ = loader.dataset[0]
    raw = torch.from_numpy(np.array(cache.images("test")[0])).float() / 255  # (H, W, C)
    expected = (raw - torch.tensor(CKPT_MEAN)) / torch.tensor(CKPT_STD)
    torch.testing.assert_close(image, expected.permute(2, 0, 1), atol=1e-4, rtol=1e-4)


def test_print_report_shows_every_weight_set(ev, tmp_path):
    report = ev.evaluate_run(make_run(tmp_path, {"best": 1.6}), device="cpu")
    out = StringIO()
    ev.print_report(report, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    for word in ("macro-F1", "balanced accuracy", "NLL", "ECE", "best (epoch 7)", "swa (epoch 9)"):
        assert word in text
    assert "confusion: best" in text and "confusion: swa" in text and "2 gamma" in text
    # Side by side in report order: best, best+T, swa (swa.pt has no temperature: no swa+T).
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if "best+T" in line)  # the +T header's 1st line
    bottom = lines[top + 1]
    assert bottom.index("best (epoch 7)") < lines[top].index("best+T") < bottom.index("swa (ep")
    assert bottom.index("best (epoch 7)") < bottom.index("T=1.60") < bottom.index("swa (ep")
    assert "swa+T" not in text
    assert "swa: temperature not fitted (swa.pt has no 'temperature')" in text
    assert "best: temperature not fitted" not in text
    # T changes no prediction, so the per-class scores and matrices are the weight sets' own.
    assert "confusion: best+T" not in text and "best+T F1" not in text


def _set_keys(path: Path, **keys) -> None:
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(keys)
    torch.save(ckpt, path)


def test_tta_averages_every_row_and_drops_a_temperature_fitted_without_it(ev, tmp_path):
    run_dir = make_run(tmp_path, {"best": 1.6, "swa": 0.8})
    _set_keys(run_dir / "checkpoints" / "swa.pt", temperature_tta="d4")
    single = ev.evaluate_run(run_dir, device="cpu")
    assert single["tta"] == "none" and list(single["weights"]) == ["best", "best+T", "swa"]
    report = ev.evaluate_run(run_dir, device="cpu", tta="auto")  # colour images: d4
    assert report["tta"] == "d4" and list(report["weights"]) == ["best", "swa", "swa+T"]
    assert report["checkpoints"]["best"]["temperature_tta"] == "none"

    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    model = ev.build_model(ckpt).eval()
    images = torch.from_numpy(np.load(tmp_path / "data_npy" / "tiny" / "test_images.npy"))
    x = (images.float() / 255 - torch.tensor(CKPT_MEAN)) / torch.tensor(CKPT_STD)
    with torch.no_grad():
        logits = tta_logits(model, x.permute(0, 3, 1, 2), "d4")
    expected = ev.classification_metrics(logits, torch.arange(12) % 3, CLASSES)
    assert report["weights"]["best"]["nll"] == pytest.approx(expected["nll"], rel=1e-4)
    assert report["weights"]["best"]["nll"] != pytest.approx(single["weights"]["best"]["nll"])

    out = StringIO()
    ev.print_report(report, Console(file=out, width=200, color_system=None))
    text = " ".join(out.getvalue().split())
    assert "logits averaged over 8 views (tta=d4)" in text
    assert "best: the temperature in best.pt was fitted with tta=none" in text


def test_the_run_config_chooses_the_default_tta(ev, tmp_path):
    run_dir = make_run(tmp_path, {"best": 1.6})
    best = run_dir / "checkpoints" / "best.pt"
    config = torch.load(best, weights_only=True)["config"]
    _set_keys(best, config={**config, "run": {"tta": "hflip"}}, temperature_tta="hflip")
    report = ev.evaluate_run(run_dir, device="cpu")
    assert report["tta"] == "hflip" and list(report["weights"]) == ["best", "best+T", "swa"]
    with pytest.raises(ValueError, match="tta='flips' is invalid"):
        ev.evaluate_run(run_dir, device="cpu", tta="flips")


# --------------------------------------------------------------------------- temperature rows


@pytest.mark.parametrize(
    ("temperatures", "rows"),
    [
        ({}, ["best", "swa"]),
        ({"best": 1.6}, ["best", "best+T", "swa"]),
        ({"swa": 0.7}, ["best", "swa", "swa+T"]),
        ({"best": 1.6, "swa": 2}, ["best", "best+T", "swa", "swa+T"]),
    ],
)
def test_scaled_rows_appear_exactly_for_checkpoints_with_a_temperature(
    ev, tmp_path, temperatures, rows
):
    report = ev.evaluate_run(make_run(tmp_path, temperatures), device="cpu")
    assert list(report["weights"]) == rows
    for name in ("best", "swa"):
        assert report["checkpoints"][name]["temperature"] == temperatures.get(name)
        assert report["weights"][name]["temperature"] == 1.0
        if name in temperatures:
            scaled = report["weights"][f"{name}+T"]
            assert scaled["temperature"] == temperatures[name]
            assert scaled["scaled_from"] == name
    for metrics in report["weights"].values():
        assert REPORT_KEYS <= set(metrics)
        assert metrics["ece"] == metrics["reliability"]["ece"]
        assert sum(metrics["reliability"]["count"]) == report["n_test"]


def test_a_temperature_kept_at_one_is_explained_not_scored(ev, tmp_path):
    run_dir = make_run(tmp_path, {"best": 1.0, "swa": 0.8})
    reason = "every validation image is right (12 of 12), so T is not identifiable"
    _set_keys(run_dir / "checkpoints" / "best.pt", temperature_reason=reason)
    report = ev.evaluate_run(run_dir, device="cpu")
    assert list(report["weights"]) == ["best", "swa", "swa+T"]  # best+T would repeat best
    assert report["checkpoints"]["best"]["temperature_reason"] == reason
    assert report["checkpoints"]["swa"]["temperature_reason"] is None
    out = StringIO()
    ev.print_report(report, Console(file=out, width=200, color_system=None))
    assert (
        f"best: temperature kept at 1 in best.pt: {reason}; the validation split may leak "
        "into training; no temperature-scaled row"
    ) in out.getvalue()
    assert "swa: temperature kept" not in out.getvalue()


def test_scaled_row_divides_the_same_logits_by_t(ev, tmp_path, monkeypatch):
    """No second forward pass: the +T row rescores the weight set's own logits."""
    report_module = importlib.import_module(REPORT_MODULE)
    gen = torch.Generator().manual_seed(4)
    outputs = [3 * torch.randn(12, 3, generator=gen), 3 * torch.randn(12, 3, generator=gen)]
    labels = torch.arange(12) % 3
    calls = []

    def fake_predict(model, loader, device, amp_dtype=None, tta="none"):
        calls.append(model)
        return outputs[len(calls) - 1], labels

    monkeypatch.setattr(report_module, "predict", fake_predict)
    report = ev.evaluate_run(make_run(tmp_path, {"best": 2.5, "swa": 0.4}), device="cpu")
    assert len(calls) == 2  # one per weight file, none for the +T rows
    for (name, t), logits in zip((("best", 2.5), ("swa", 0.4)), outputs, strict=True):
        plain, scaled = report["weights"][name], report["weights"][f"{name}+T"]
        assert scaled["nll"] == calibration.nll(logits, labels, t)
        assert plain["nll"] == calibration.nll(logits, labels)
        assert scaled["nll"] != pytest.approx(plain["nll"])  # T really was applied
        assert scaled["ece"] == calibration.expected_calibration_error(logits.double() / t, labels)
        after = calibration.calibration_report(logits, labels, t)["ece_after"]  # float32 division
        assert scaled["ece"] == pytest.approx(after, abs=1e-6)
        assert plain["ece"] == calibration.expected_calibration_error(logits, labels, 15)
        for key in ("accuracy", "macro_f1", "balanced_accuracy", "per_class", "confusion_matrix"):
            assert scaled[key] == plain[key]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.0, "0.0"),
        (-1.5, "-1.5"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        ("warm", "'warm'"),
        (None, "None"),
        (True, "True"),
    ],
)
def test_bad_temperature_is_refused_naming_file_key_and_value(ev, tmp_path, value, shown):
    run_dir = make_run(tmp_path, {"best": 1.5, "swa": value})
    with pytest.raises(CheckpointError) as caught:
        ev.evaluate_run(run_dir, device="cpu")
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert str(run_dir / "checkpoints" / "swa.pt") in message
    assert f"key 'temperature' is {shown};" in message
    assert "allowed: a finite number > 0" in message


def test_save_report_draws_one_reliability_curve_per_row(ev, tmp_path, monkeypatch):
    report_module = importlib.import_module(REPORT_MODULE)
    run_dir = make_run(tmp_path, {"best": 1.6, "swa": 0.8})
    report = ev.evaluate_run(run_dir, device="cpu")
    drawn = {}

    def spy(curves, path, n_bins=15):
        drawn.update(curves)
        return calibration.reliability_diagram(curves, path, n_bins)

    monkeypatch.setattr(report_module, "reliability_diagram", spy)
    paths = ev.save_report(report, run_dir)
    assert paths == (
        run_dir / "test_report.json",
        run_dir / "confusion_matrix.png",
        run_dir / "reliability.png",
    )
    assert list(drawn) == ["best", "best+T (T=1.60)", "swa", "swa+T (T=0.80)"]
    assert [c["ece"] for c in drawn.values()] == [m["ece"] for m in report["weights"].values()]
    assert (run_dir / "reliability.png").read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    saved = json.loads((run_dir / "test_report.json").read_text())
    assert saved["checkpoints"]["swa"]["temperature"] == 0.8 and saved["ece_bins"] == 15
    assert saved["weights"]["swa+T"]["ece"] == pytest.approx(report["weights"]["swa+T"]["ece"])
    assert all(math.isfinite(m["ece"]) for m in saved["weights"].values())


def test_report_from_before_calibration_still_prints_and_saves(ev, tmp_path):
    run_dir = make_run(tmp_path)
    report = ev.evaluate_run(run_dir, device="cpu")
    report.pop("ece_bins")
    for metrics in report["weights"].values():
        for key in ("ece", "temperature", "reliability"):
            metrics.pop(key)
    for info in report["checkpoints"].values():
        info.pop("temperature")
    out = StringIO()
    ev.print_report(report, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "best (epoch 7)" in text and "NLL" in text and "confusion: swa" in text
    assert "ECE" not in text and "temperature" not in text
    assert ev.save_report(report, run_dir) == (
        run_dir / "test_report.json",
        run_dir / "confusion_matrix.png",
    )
    assert not (run_dir / "reliability.png").exists()


# --------------------------------------------------------------------------- the entry script


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_script_refuses_data_with_other_classes(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    other = write_npz(tmp_path / "other.npz", class_names=["x", "y", "z"])
    code = load_entry_script().main(["--run-dir", str(run_dir), "--data", str(other)])
    assert code == 2
    err = one_line_error(capsys)
    assert "['x', 'y', 'z']" in err and "['alpha', 'beta', 'gamma']" in err


def test_script_refuses_a_bad_temperature_in_one_line(tmp_path, capsys):
    run_dir = make_run(tmp_path, {"best": -2.0})
    assert load_entry_script().main(["--run-dir", str(run_dir)]) == 2
    err = one_line_error(capsys)
    assert "best.pt" in err and "'temperature' is -2.0" in err


def test_script_tta_flag_sets_the_views_and_refuses_unknown_modes(tmp_path, capsys):
    run_dir = make_run(tmp_path, {"best": 1.6})
    assert load_entry_script().main(["--run-dir", str(run_dir), "--tta", "hflip"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "logits averaged over 2 views (tta=hflip)" in out
    saved = json.loads((run_dir / "test_report.json").read_text())
    assert saved["tta"] == "hflip" and "best+T" not in saved["weights"]
    with pytest.raises(SystemExit):
        load_entry_script().main(["--run-dir", str(run_dir), "--tta", "rot"])
    assert "invalid choice: 'rot'" in capsys.readouterr().err


def test_script_reports_a_missing_run_dir(tmp_path, capsys):
    code = load_entry_script().main(["--run-dir", str(tmp_path / "missing")])
    assert code == 2
    assert "does not exist" in one_line_error(capsys)


def test_script_without_run_dir_and_no_runs_says_to_train(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert load_entry_script().main([]) == 2
    assert "no run with checkpoints under runs/" in one_line_error(capsys)


def test_script_end_to_end_writes_report_and_figure(script_run):
    run_dir, proc = script_run
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads((run_dir / "test_report.json").read_text())
    assert list(report["weights"]) == ["best", "best+T", "swa"]
    assert report["checkpoints"]["best"]["temperature"] == 1.6
    assert report["checkpoints"]["swa"]["temperature"] is None
    for metrics in report["weights"].values():
        assert REPORT_KEYS <= set(metrics)
        assert sum(map(sum, metrics["confusion_matrix"])) == report["n_test"] == 12
    png, reliability = run_dir / "confusion_matrix.png", run_dir / "reliability.png"
    for figure in (png, reliability):
        assert figure.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    for path in (run_dir / "test_report.json", png, reliability):  # not a temp file's 0600
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert "test_report.json" in out and "reliability.png" in out and "macro-F1" in out
    assert "best+T" in out and "ECE" in out and "swa: temperature not fitted" in out


def test_a_deleted_cache_is_rebuilt_with_the_runs_own_size_and_split_options():
    from training.evaluation.report import prepare_kwargs

    stored = {"config": {"data": {"image_size": 0, "split_seed": 3, "val_fraction": 0.2}}}
    assert prepare_kwargs(stored) == {"image_size": None, "seed": 3, "val_fraction": 0.2}
    assert prepare_kwargs({"config": {"data": {"image_size": 64}}}) == {"image_size": 64}


def test_a_weight_set_borrows_metadata_but_never_another_sets_temperature(trained_run, tmp_path):
    from training.engine.checkpoint import load_checkpoint, save_checkpoint
    from training.evaluation.report import WEIGHT_METADATA, load_weight_set

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    best_path, swa_path = run / "checkpoints" / "best.pt", run / "checkpoints" / "swa.pt"
    best = load_checkpoint(best_path)
    best.update(temperature=2.5, temperature_tta="none")
    save_checkpoint(best, best_path)
    # An SWA file written without metadata and without a temperature fit of its own.
    bare = {k: v for k, v in load_checkpoint(swa_path).items() if k not in WEIGHT_METADATA}
    for key in ("temperature", "temperature_tta", "temperature_reason"):
        bare.pop(key, None)
    save_checkpoint(bare, swa_path)
    ckpt = load_weight_set(run, "swa")
    assert all(ckpt[k] == best[k] for k in ("class_names", "mean", "std", "model_record"))
    assert "temperature" not in ckpt and "temperature_tta" not in ckpt
