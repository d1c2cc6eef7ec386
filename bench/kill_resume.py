"""Kill a small training run at random moments, resume it, and compare with an uninterrupted run.

One uninterrupted run of ``models/train.py`` (cpu preset, a generated dataset of noisy brightness
classes, a few epochs, progressive unfreezing, SWA and the temperature fit on) is the reference;
a second one checks that two uninterrupted runs agree, and times the epochs. Then, ``--runs``
times, the same command is started in a new folder and sent SIGKILL (or, for ``--sigint-share``
of the runs, SIGINT, as Ctrl-C would) at a random moment, timed from the run's own epoch lines:
late in a random epoch (its training, validation and checkpoint writes), during the end phase
(SWA average, BatchNorm update, temperature fit: after the last epoch line), or anywhere from
the start. After the kill every ``checkpoints/*.pt`` must load, then ``--resume`` must finish
(exit 0), and the final weights of ``last.pt``, ``best.pt`` and ``swa.pt``, their temperatures,
and ``metrics.jsonl`` must equal the reference's. The metrics lines are compared without what
differs between any two runs (the timings ``epoch_s`` and ``images_per_s``, the run folder in
paths, and the notice of a Ctrl-C).

Where the kill landed is read from the folder it left: no ``last.pt`` yet (startup), a
checkpoint half written (a ``.tmp`` file), an epoch's metrics line written but its checkpoint
not yet, inside training, the end phase (``last.pt`` at the last epoch but not marked finished),
or after the run had finished.

Run from the repository root (about 30 s a run on 2 idle cores)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/kill_resume.py --runs 20
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import brightness_npz  # noqa: E402
from training.callbacks.metrics_log import read_metrics  # noqa: E402
from training.engine.checkpoint import load_checkpoint  # noqa: E402

TIMING = ("epoch_s", "images_per_s")
COMPARED = ("last.pt", "best.pt", "swa.pt")
EPOCH_LINE = re.compile(r"^epoch\s+(\d+)/\d+")


def train_command(npz: Path, work: Path, run_dir: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "models" / "train.py"),
        "--preset",
        "cpu",
        "--data",
        str(npz),
        "--epochs",
        str(epochs),
        "--run-dir",
        str(run_dir),
        "--set",
        f"data.root={work / 'cache'}",
        "--set",
        "run.progress=plain",
        "--set",
        "run.tensorboard=false",
    ]


def resume_command(run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "models" / "train.py"), "--resume", str(run_dir)]


def run(command: list[str], env: dict) -> int:
    return subprocess.run(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ).returncode


def comparable_rows(run_dir: Path) -> list[dict]:
    rows = []
    for row in read_metrics(run_dir / "metrics.jsonl", events=True):
        row = {k: v for k, v in row.items() if k not in TIMING}
        if "events" in row:
            row["events"] = [e for e in row["events"] if e.get("title") != "interrupt received"]
        rows.append(row)
    return [_without_folder(row, str(run_dir)) for row in rows]


def _without_folder(value, folder: str):
    if isinstance(value, str):
        return value.replace(folder, "<run>")
    if isinstance(value, dict):
        return {k: _without_folder(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_folder(v, folder) for v in value]
    return value


def final_state(run_dir: Path) -> dict:
    state = {}
    for name in COMPARED:
        ckpt = load_checkpoint(run_dir / "checkpoints" / name)
        state[name] = (ckpt["model"], ckpt.get("temperature"))
    return state


def differences(reference: dict, other: dict) -> list[str]:
    found = []
    for name in COMPARED:
        (a, ta), (b, tb) = reference[name], other[name]
        if a.keys() != b.keys():
            found.append(f"{name}: other tensors")
            continue
        tensors = [k for k in a if not torch.equal(a[k], b[k])]
        if tensors:
            found.append(f"{name}: {len(tensors)} tensors differ ({tensors[0]}, ...)")
        if ta != tb:
            found.append(f"{name}: temperature {tb} vs {ta}")
    return found


def where_killed(run_dir: Path, epochs: int) -> str:
    ck = run_dir / "checkpoints"
    if list(ck.glob(".*.tmp")):
        return "checkpoint write"
    if not (ck / "last.pt").exists():
        return "startup"
    last = load_checkpoint(ck / "last.pt")
    if last.get("finished"):
        return "after the end"
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    if any(r.get("epoch", 0) > last["epoch"] for r in rows) and last.get("progress") is None:
        if last["epoch"] + 1 == max(r["epoch"] for r in rows):
            return "epoch end (row written, checkpoint not)"
    if last["epoch"] < epochs:
        return "training"
    return "end phase"


def check_loadable(run_dir: Path) -> list[str]:
    bad = []
    for path in sorted((run_dir / "checkpoints").glob("*.pt")):
        try:
            load_checkpoint(path)
        except Exception as error:  # noqa: BLE001 - any failure to load is the finding
            bad.append(f"{path.name}: {error}")
    return bad


class Watched:
    """A training process whose epoch lines are timed as they come (its stdout is read on a
    thread, so the pipe never fills)."""

    def __init__(self, command: list[str], env: dict) -> None:
        self.start = time.perf_counter()
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.epochs: dict[int, float] = {}  # epoch -> seconds from start to its line
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            match = EPOCH_LINE.match(line)
            if match:
                self.epochs[int(match.group(1))] = time.perf_counter() - self.start

    def wait_for_epoch(self, epoch: int) -> bool:
        """Wait until the line of ``epoch`` is out (True) or the process has ended (False)."""
        while epoch not in self.epochs:
            if self.process.poll() is not None:
                return False
            time.sleep(0.002)
        return True

    def wait(self) -> int:
        code = self.process.wait()
        self._reader.join()
        return code


def timed_reference(command: list[str], env: dict) -> tuple[Watched, float]:
    watched = Watched(command, env)
    code = watched.wait()
    if code != 0:
        raise SystemExit(f"the reference run failed with exit code {code}")
    return watched, time.perf_counter() - watched.start


def kill_moment(rng: random.Random, epochs: int, timing: dict) -> tuple[str, int, float]:
    """(aim, epoch line to wait for (0: none), seconds to wait after it)."""
    lines, total = timing["lines"], timing["total"]
    draw = rng.random()
    if draw < 0.4:
        epoch = rng.randint(2, epochs)
        gap = lines[epoch] - lines[epoch - 1]
        # The last fifth of an epoch holds its validation and checkpoint writes.
        return f"late in epoch {epoch}", epoch - 1, gap * rng.uniform(0.8, 1.02)
    if draw < 0.8:
        # The end phase takes well under half of what follows the last epoch line (the rest
        # is the closing summary and the interpreter's exit).
        return "end phase", epochs, rng.uniform(0, 0.5 * (total - lines[epochs]))
    return "anywhere", 0, rng.uniform(0, total)


def trial(i: int, args, npz: Path, work: Path, env: dict, timing: dict, reference: dict):
    rng = random.Random(args.seed * 1000 + i)
    run_dir = work / f"run{i:02d}"
    aim, after, delay = kill_moment(rng, args.epochs, timing)
    sig = signal.SIGINT if rng.random() < args.sigint_share else signal.SIGKILL
    watched = Watched(train_command(npz, work, run_dir, args.epochs), env)
    if not after or watched.wait_for_epoch(after):
        time.sleep(delay)
    sent = watched.process.poll() is None
    if sent:
        watched.process.send_signal(sig)
    code = watched.wait()
    place = where_killed(run_dir, args.epochs) if sent else "after the end"
    problems = check_loadable(run_dir) if (run_dir / "checkpoints").exists() else []
    # A Ctrl-C while a finished run exits (its handler is gone by then) may end it by the signal.
    if sig == signal.SIGINT and sent and code not in (0, 130) and place != "after the end":
        problems.append(f"Ctrl-C exit code {code} (expected 130, or 0 when already done)")
    command = resume_command(run_dir)
    if not (run_dir / "checkpoints" / "last.pt").exists():
        command = train_command(npz, work, run_dir, args.epochs) + ["--overwrite"]
    resumed = run(command, env)
    if resumed != 0:
        problems.append(f"resume exit code {resumed}")
    else:
        problems += differences(reference["state"], final_state(run_dir))
        if comparable_rows(run_dir) != reference["rows"]:
            problems.append("metrics.jsonl differs")
    label = signal.Signals(sig).name if sent else "none"
    return label, aim, place, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="killed runs (default 20)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each run (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--sigint-share", type=float, default=0.25, help="share sent SIGINT")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONUNBUFFERED": "1",
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # Noisy brightness classes that overlap, so the temperature is fitted, not kept at 1.
        npz = brightness_npz(work / "noisy.npz", counts=(480, 96, 48), noise=110)
        timed_reference(train_command(npz, work, work / "reference", args.epochs), env)
        watched, total = timed_reference(train_command(npz, work, work / "again", args.epochs), env)
        reference = {
            "state": final_state(work / "reference"),
            "rows": comparable_rows(work / "reference"),
        }
        same = not differences(reference["state"], final_state(work / "again"))
        same = same and comparable_rows(work / "again") == reference["rows"]
        timing = {"lines": watched.epochs, "total": total}
        last = timing["lines"][args.epochs]
        print(
            f"reference: {total:.1f} s, {args.epochs} epochs (last epoch line at {last:.1f} s);"
            f" a second uninterrupted run {'equals' if same else 'DIFFERS FROM'} it"
        )
        tally: Counter = Counter()
        failures = 0
        for i in range(args.runs):
            label, aim, place, problems = trial(i, args, npz, work, env, timing, reference)
            tally[place] += 1
            failures += bool(problems)
            verdict = "same as reference" if not problems else "; ".join(problems)
            print(f"run {i + 1:2d}: {label:7s} {aim:16s} landed: {place:40s} {verdict}")
        print(f"\n{args.runs - failures} of {args.runs} runs resumed to the reference's files")
        for place, count in tally.most_common():
            print(f"  killed in {place}: {count}")
        failures += not same
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
