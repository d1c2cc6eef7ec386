"""What a run folder holds, read once for every section of the report.

Public API:
    RunFolder, ReportError, load_run, epoch_rows, final_set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from training.evaluation.report import WEIGHT_FILES, final_of


class ReportError(Exception):
    """A run folder the report cannot read; the message is one line naming the file."""


@dataclass
class RunFolder:
    """A trained run's files.

    Args:
        path: the run folder.
        config: ``config.yaml`` as a dict (every setting the run used).
        metrics: ``metrics.jsonl``, one dict per epoch in order.
        test_report: ``test_report.json`` (written by ``test.py``), or ``None`` before testing.
        checkpoints: weight set name (best, last, swa) -> its file, for those present.
    """

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    test_report: dict[str, Any] | None
    checkpoints: dict[str, Path]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def final_weights(self) -> str | None:
        """The weight set the run ends with (:func:`final_set` of its test report); ``None``
        before testing."""
        return final_set(self.test_report) if self.test_report else None

    def test_scores(self, weights: str | None = None) -> dict[str, Any]:
        """The test figures of ``weights`` (default: the final set), with ``ece_scaled`` from its
        ``+T`` row when it has one; ``{}`` before testing."""
        weights = weights or self.final_weights
        if not weights or not self.test_report:
            return {}
        rows = self.test_report.get("weights", {})
        scores = dict(rows.get(weights, {}))
        if "ece" in rows.get(f"{weights}+T", {}):
            scores["ece_scaled"] = rows[f"{weights}+T"]["ece"]
        return scores

    @property
    def epochs(self) -> int:
        """The last epoch the metrics log records (0 for an empty log)."""
        rows = epoch_rows(self.metrics)
        return int(rows[-1]["epoch"]) if rows else 0

    @property
    def training_seconds(self) -> float:
        """The seconds the run spent in its training loops (the sum of the epochs' ``epoch_s``)."""
        return sum(float(m.get("epoch_s", 0.0)) for m in self.metrics)

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A config value by its dotted name, e.g. ``"model.arch"``."""
        value: Any = self.config
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                return default
            value = value[part]
        return value


def final_set(report: dict[str, Any]) -> str:
    """The weight set a test report's run ends with: ``swa`` when scored, else ``best``, else
    the first one scored (``last`` in a run that never scored its validation set).

    Raises:
        ReportError: the report scores no weight set.
    """
    main = [n for n, m in report.get("weights", {}).items() if "scaled_from" not in m]
    if not main:
        raise ReportError("test_report.json scores no weight set; run python test.py again")
    return final_of(main) or main[0]


def epoch_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-epoch lines of a metrics log, without run-level lines such as ``fit_end``."""
    return [m for m in metrics if "epoch" in m and "event" not in m]


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # A run killed while writing leaves a partial last line; earlier ones are whole.
            if number == len(lines):
                break
            raise ReportError(
                f"{path}: line {number} is not JSON; the metrics log is damaged"
            ) from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(path: str | Path) -> RunFolder:
    """Read a run folder.

    Raises:
        ReportError: the folder is missing, holds no run (no ``config.yaml``), or a file in it
            cannot be read.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ReportError(f"run folder {folder} does not exist")
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise ReportError(
            f"{folder} holds no run (no config.yaml); give a folder models/train.py wrote"
        )
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ReportError(f"{config_path}: not valid YAML ({' '.join(str(err).split())})") from None
    metrics_path = folder / "metrics.jsonl"
    metrics = _read_metrics(metrics_path) if metrics_path.is_file() else []
    report_path = folder / "test_report.json"
    test_report = None
    if report_path.is_file():
        try:
            test_report = json.loads(report_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            message = f"{report_path}: not valid JSON ({err.msg}, line {err.lineno})"
            raise ReportError(message) from None
    ckpt_dir = folder / "checkpoints"
    checkpoints = {
        name: ckpt_dir / file for name, file in WEIGHT_FILES.items() if (ckpt_dir / file).is_file()
    }
    return RunFolder(folder, config, metrics, test_report, checkpoints)
