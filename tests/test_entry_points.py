"""``models/train.py`` and ``test.py`` as a user runs them: separate processes, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.callbacks.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def train_cmd(tiny_npz, tmp_path, run, *extra):
    return [
        sys.executable,
        str(ROOT / "models" / "train.py"),
        "--preset",
        "cpu",
        "--data",
        str(tiny_npz),
        "--run-dir",
        str(run),
        "--set",
        f"data.root={tmp_path / 'cache'}",
        "--set",
        "model.width=0.125",
        "--set",
        "model.block_channels=[]",  # the preset's block_channels would win over width
        "--set",
        "model.active_blocks=1",
        "--set",
        "optim.batch_size=8",
        "--set",
        "run.tensorboard=false",
        "--set",
        "run.progress=plain",
        *extra,
    ]


def run(cmd, cwd, **kw):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=240, **kw)


def test_train_then_test_report(tiny_npz, tmp_path):
    run_dir = tmp_path / "run"
    # From another folder: the scripts need no PYTHONPATH, the venv has the project installed.
    proc = run(train_cmd(tiny_npz, tmp_path, run_dir, "--epochs", "2"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2/2" in proc.stdout and "training finished" in proc.stdout
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    proc = run([sys.executable, str(ROOT / "test.py"), "--run-dir", str(run_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "test_report.json").read_text())
    best = report["weights"]["best"] if "weights" in report else report["best"]
    assert 0.0 <= best["accuracy"] <= 1.0
    assert sum(map(sum, best["confusion_matrix"])) == 12
    assert (run_dir / "confusion_matrix.png").stat().st_size > 0


def test_config_error_is_one_line(tiny_npz, tmp_path):
    proc = run(train_cmd(tiny_npz, tmp_path, tmp_path / "r", "--set", "optim.lr=-1"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: optim.lr=-1.0 is invalid; allowed: a number > 0"


def test_ctrl_c_saves_and_says_how_to_resume(tiny_npz, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_cmd(tiny_npz, tmp_path, run_dir, "--epochs", "40")
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until training is under way
        # "epoch 2/40" or "epoch  2/40": the console may pad the number to the total's width.
        if line.split()[:2] == ["epoch", "2/40"] or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"resume with: python models/train.py --resume {run_dir}" in out
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    proc = run(
        [*train_cmd(tiny_npz, tmp_path, run_dir)[:2], "--resume", str(run_dir), "--epochs", "3"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "resuming at epoch" in proc.stdout and "epoch 3/3" in proc.stdout
    # --epochs extends the stored plan as it is: the 40-epoch boundaries are not rescaled.
    assert "plan: 3 epochs (the resumed run's stored plan, not rescaled)" in proc.stdout
    assert "configuration: the stored run's; every setting:" in proc.stdout


def test_epochs_compresses_the_presets_plan(tiny_npz, tmp_path):
    """--epochs 6 runs the cpu preset's 30-epoch regimen in 6: every block joins, SWA averages
    the last epochs and the lr ends at the end of its schedule."""
    run_dir = tmp_path / "run"
    # A fall of validation accuracy on 12 images would roll back and halve the lr for good.
    cmd = train_cmd(tiny_npz, tmp_path, run_dir, "--epochs", "6", "--set", "safety.rollback=false")
    proc = run(cmd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "plan: 6 epochs (cpu preset's 30-epoch plan scaled x0.2)" in proc.stdout
    assert (run_dir / "checkpoints" / "swa.pt").is_file()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["active_blocks"] == 3
    assert rows[-1]["swa_models"] == 2  # epochs 5 and 6
    # Block 1's rate (multiplier 1) ends at the cosine's end rate, the lowest of the run.
    cosine_end = 3e-3 * 0.05  # the preset's optim.lr x schedule.cosine_end_ratio
    assert rows[-1]["lr"][0] == pytest.approx(cosine_end)
    assert min(r["lr"][0] for r in rows) == rows[-1]["lr"][0]
