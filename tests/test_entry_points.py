"""``models/train.py`` and ``test.py`` as a user runs them: separate processes, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
        if line.startswith("epoch 2/40") or time.monotonic() > deadline:
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
