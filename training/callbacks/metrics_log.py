"""Per-epoch metrics on disk: ``metrics.jsonl`` (one JSON object a line) and TensorBoard scalars.

Public API:
    MetricsLogger, read_metrics, to_plain, TENSORBOARD_TAGS.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from training.engine.atomic import create_temp_beside
from training.engine.events import Callback

METRICS_FILE = "metrics.jsonl"


TENSORBOARD_DIR = "tensorboard"


# metrics key -> TensorBoard tag; "lr" is a list and gets one tag per parameter group.
TENSORBOARD_TAGS: dict[str, str] = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "train_macro_f1": "train/macro_f1",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "val_macro_f1": "val/macro_f1",
    "active_blocks": "active_blocks",
    "images_per_s": "images_per_s",
}


def to_plain(value: Any) -> Any:
    """``value`` with tensors, numpy values and tuples made JSON types (lists stay lists).

    NaN and infinities become None: strict JSON has no such numbers, and a bare ``NaN`` in
    ``metrics.jsonl`` breaks every parser but Python's. They read back as None (``null``).
    """
    if isinstance(value, torch.Tensor):
        return to_plain(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return to_plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_line(row: Mapping[str, Any]) -> str:
    # allow_nan=False: to_plain has turned every non-finite number into null, so the file is
    # strict JSON (RFC 8259) that any reader parses.
    return json.dumps(to_plain(row), allow_nan=False) + "\n"


def read_metrics(path: str | Path, events: bool = False) -> list[dict]:
    """The per-epoch dicts of a ``metrics.jsonl``, in file order.

    Blank lines and lines that are not a JSON object (a write cut short by a crash) are skipped.
    With ``events``, the run-level lines (``{"event": "fit_end", ...}``) are kept too. A value
    that was NaN or infinite is ``null`` in the file and None here (a log written before that
    rule still reads, its bare ``NaN`` as a float NaN).
    """
    rows = []
    for line in Path(path).read_text().splitlines():
        row = _parse(line)
        if row is not None and (events or "event" not in row):
            rows.append(row)
    return rows


def _parse(line: str) -> dict | None:
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def truncate_metrics(path: Path, start_epoch: int) -> None:
    """Keep only the lines of epochs before ``start_epoch``, replacing the file atomically.

    A run resumed at epoch N redoes epoch N and later; their lines from the interrupted run
    would otherwise appear twice.
    """
    kept = [line for line in path.read_text().splitlines() if _keeps(line, start_epoch)]
    fd, tmp = create_temp_beside(path)  # the umask's mode (mkstemp would make it 0600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _keeps(line: str, start_epoch: int) -> bool:
    row = _parse(line)
    epoch = None if row is None else row.get("epoch")
    return isinstance(epoch, int) and epoch < start_epoch


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value for the finite numbers among the metrics."""
    out = {tag: metrics.get(key) for key, tag in TENSORBOARD_TAGS.items()}
    lr = metrics.get("lr")
    rates = lr if isinstance(lr, (list, tuple)) else [] if lr is None else [lr]
    out.update({f"lr/group{i}": rate for i, rate in enumerate(rates)})
    return {
        tag: float(v)
        for tag, v in out.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _heading(kind: str, title: str) -> str:
    """A notice's heading: its title, after its kind unless the title already starts with it
    ("SWA finished", not "swa: SWA finished")."""
    return title if title.casefold().startswith(kind.casefold()) else f"{kind}: {title}"


class MetricsLogger(Callback):
    """Append each epoch's metrics to ``run_dir/metrics.jsonl`` and, optionally, TensorBoard.

    A row is written at ``on_validation_end``, after the decisions of the callbacks before this
    one and before the epoch's checkpoint. On a resumed run (``trainer.start_epoch > 1``) the
    lines of the epochs about to be redone are dropped first, and TensorBoard hides the
    interrupted run's events from that step on, so both logs hold each epoch once. Notices go to
    TensorBoard as text under "notices". Only the main process writes.

    Args:
        run_dir: the run's folder (created if missing).
        tensorboard: also write scalars to ``run_dir/tensorboard`` (global step = epoch).
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.tensorboard = bool(tensorboard)
        self.path = self.run_dir / METRICS_FILE
        self._file: IO[str] | None = None
        self._writer: Any = None

    def _open(self, start_epoch: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_epoch > 1 and self.path.exists():
            truncate_metrics(self.path, start_epoch)
        self._file = open(self.path, "a", encoding="utf-8")
        if self.tensorboard:
            # Imported here: tensorboard is slow to import and a run without it need not pay.
            from torch.utils.tensorboard import SummaryWriter

            purge = start_epoch if start_epoch > 1 else None
            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)

    def on_fit_start(self, trainer: Any) -> None:
        if trainer.is_main:
            self.close()
            self._open(trainer.start_epoch)

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        # Written before the trainer saves last.pt (this logger runs after the regimen's
        # decisions): a kill between the two leaves a row that the resume drops and redoes,
        # never a checkpointed epoch without its row.
        if not trainer.is_main:
            return
        if self._file is None:
            self._open(trainer.start_epoch)
        row = to_plain(dict(metrics))
        self._file.write(_json_line(row))
        self._file.flush()
        if self._writer is not None:
            step = int(row.get("epoch", trainer.epoch))
            for tag, value in _scalars(row).items():
                self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()

    def on_notice(
        self, trainer: Any, kind: str, title: str, lines: list[str], banner: bool = True
    ) -> None:
        # Every notice, banner or not: the log keeps what the console leaves out.
        if not trainer.is_main or self._writer is None:
            return
        # Markdown: a blank line between lines keeps them apart in TensorBoard's text view.
        text = "\n\n".join([f"**{_heading(kind, title)}**", *lines])
        self._writer.add_text("notices", text, global_step=trainer.epoch)
        self._writer.flush()

    def on_fit_end(self, trainer: Any, summary: dict) -> None:
        """Append one ``{"event": "fit_end", ...}`` line (how the run ended, SWA, calibration)."""
        if not trainer.is_main:
            return
        if self._file is not None:
            keys = ("stopped", "best_epoch", "best_value", "monitor", "swa", "calibration")
            row = {"event": "fit_end", **{k: summary[k] for k in keys if k in summary}}
            self._file.write(_json_line(row))
        self.close()

    def close(self) -> None:
        """Close the metrics file and the TensorBoard writer (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
