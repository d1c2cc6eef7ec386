"""What a training run prints: a header, per-epoch progress and results, banners, a summary.

:class:`ConsoleCallback` renders with ``rich``. On a terminal it shows a live progress bar per
epoch; in a log file or CI (``plain`` mode) it prints a few progress lines per epoch and never a
cursor-moving escape sequence. Each epoch ends with one line that says where the run is: the
epoch, the stage (active blocks), the losses and accuracies, the lr and the best so far. The
decisions taken on that epoch follow it as banners: a block for a stage change or a rollback, one
line for the smaller ones; notices sent with ``banner=False`` are left to the logs. Only the main
process (``trainer.is_main``) prints.

Public API:
    ConsoleCallback, warn, resolve_mode, counts_table, model_table, settings_grid, summary_grid,
    MODES.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from models.staged import stage_summary
from training.engine.events import Callback
from training.engine.monitor import monitor_mode

MODES: tuple[str, ...] = ("auto", "bar", "plain", "off")


SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


# Fractions of an epoch at which plain mode reports progress: at most three lines, plus the
# epoch's result line, keeps a log readable however many batches an epoch has.
PLAIN_MILESTONES: tuple[float, ...] = (0.25, 0.5, 0.75)


# A progress line only says the run is alive, which nobody wonders about in an epoch of a few
# seconds: plain mode skips the milestones reached before this many seconds of the epoch.
PLAIN_QUIET_SECONDS = 10.0


# Border and title style of a banner, by kind; unknown kinds fall back to "info".
NOTICE_STYLES: dict[str, tuple[str, str]] = {
    "stage": ("magenta", "bold cyan"),
    "rollback": ("red", "bold red"),
    "stop": ("magenta", "bold magenta"),
    "swa": ("cyan", "bold cyan"),
    "intervention": ("yellow", "bold yellow"),
    "warning": ("yellow", "bold yellow"),
    "error": ("red", "bold red"),
    "info": ("blue", "bold"),
}


# Kinds printed the moment they come, even in the middle of an epoch (a NaN loss, a Ctrl-C);
# every other banner waits for the epoch's line, since it is a decision taken on that epoch.
URGENT_KINDS: frozenset[str] = frozenset({"warning", "error"})


# Widest '=' frame of a block banner in plain mode; the epoch line is about as wide.
FRAME_WIDTH = 100


def resolve_mode(mode: str, console: Console) -> str:
    """``"bar"``, ``"plain"`` or ``"off"``: ``"auto"`` becomes a bar only on a terminal."""
    if mode not in MODES:
        raise ValueError(f"progress mode={mode!r} is invalid; allowed: {' | '.join(MODES)}")
    if mode == "auto":
        return "bar" if console.is_terminal else "plain"
    return mode


def warn(console: Console, text: str) -> None:
    """Print a start-up warning in yellow (e.g. "no GPU found: ...")."""
    console.print(Text.assemble(("warning: ", "bold yellow"), (text, "yellow")))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {sec:02d}s" if hours else f"{minutes}m {sec:02d}s"


def _metric(name: str, value: Any) -> str:
    """Losses with 4 decimals, accuracies and F1 as percentages; "-" when missing."""
    if value is None or not isinstance(value, (int, float)):
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if name.endswith("loss") else f"{100 * value:.2f}%"


def _lr_text(lr: Any) -> str:
    """The first group's rate (the head's, with stage 1 when the network grows); every group's
    is in metrics.jsonl and TensorBoard, and the stage banner lists them when a group joins."""
    rates = list(lr) if isinstance(lr, (list, tuple)) else [lr]
    if not rates or rates[0] is None:
        return "-"
    return f"{float(rates[0]):.2e}"


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "off" if dtype is None else str(dtype).removeprefix("torch.")


def _device_text(device: torch.device, amp_dtype: torch.dtype | None) -> str:
    name = str(device)
    # Only ask CUDA for the card's name when the run is on CUDA: the CPU path makes no CUDA call.
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return f"{name}, AMP {_dtype_name(amp_dtype)}"


def _previous_value(history: Sequence[Mapping], epoch: int, monitor: str) -> float | None:
    """The monitored value of the last epoch before ``epoch`` in the history, if any."""
    earlier = [m for m in history if isinstance(m.get("epoch"), int) and m["epoch"] < epoch]
    return earlier[-1].get(monitor) if earlier else None


def _monitor_style(value: Any, previous: Any, is_best: bool, monitor: str) -> str:
    """Green for a new best, red when worse than the previous epoch, else the default."""
    if is_best:
        return "bold green"
    if isinstance(value, (int, float)) and isinstance(previous, (int, float)):
        worse = value > previous if monitor_mode(monitor) == "min" else value < previous
        if worse:
            return "red"
    return ""


def counts_table(cache: Any) -> Table:
    """Images per class (rows) and split (columns), with a total row."""
    table = Table(title=f"dataset {cache.name}", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("class")
    for split in SPLIT_NAMES:
        table.add_column(split, justify="right")
    columns = [cache.counts(split) for split in SPLIT_NAMES]
    for i, name in enumerate(cache.class_names):
        table.add_row(name, *(f"{col[i]:,}" for col in columns))
    table.add_section()
    table.add_row("total", *(f"{sum(col):,}" for col in columns), style="bold")
    return table


def model_table(model: torch.nn.Module) -> Table:
    """Trainable and total parameters of every stage and the head, and which are trainable."""
    rows = stage_summary(model)
    table = Table(title="model", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("part")
    table.add_column("trainable", justify="right")
    table.add_column("total", justify="right")
    table.add_column("active")
    for row in rows:
        style = "" if row["active"] else "dim"
        active = "yes" if row["active"] else "no"
        table.add_row(
            row["name"], f"{row['trainable']:,}", f"{row['params']:,}", active, style=style
        )
    table.add_section()
    trainable = sum(r["trainable"] for r in rows)
    total = sum(r["params"] for r in rows)
    table.add_row("total", f"{trainable:,}", f"{total:,}", "", style="bold")
    return table


#: How each direction of unfreezing reads in the header (see models.staged).
_DIRECTION_TEXT: dict[str, str] = {
    "grow": "grows from stage 1",
    "thaw": "thaws from the head down",
    "all": "every stage trains",
}


def _model_text(trainer: Any) -> str:
    """``resnet18, 4 stages, thaws from the head down``: the arch and how its stages join."""
    model = trainer.model
    arch = getattr(model, "arch", "") or type(model).__name__
    how = _DIRECTION_TEXT.get(getattr(trainer, "direction", ""), "")
    stages = getattr(model, "num_stages", None)
    parts = [arch, f"{stages} stages" if stages else "", how]
    return ", ".join(p for p in parts if p)


def _data_name(cache_name: str, source: str) -> str:
    """The cache's name, and the source it came from when that says more (a path, a URL)."""
    return cache_name if source == cache_name else f"{cache_name} ({source})"


def settings_grid(trainer: Any) -> Table:
    """Key-value lines: device, data, batch, epochs, monitor, run folder."""
    cfg, cache = trainer.config, trainer.cache
    batch, accumulation = cfg.optim.batch_size, cfg.optim.accumulation
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    size = f"{cache.image_size}x{cache.image_size}x{cache.channels}"
    rows = [
        ("device", _device_text(trainer.device, trainer.amp_dtype)),
        ("data", f"{_data_name(cache.name, cfg.data.source)}, images {size}"),
        ("model", _model_text(trainer)),
        ("batch", f"{batch} x {accumulation} accumulation = {batch * accumulation} per step"),
        ("epochs", f"{cfg.run.epochs}, {trainer.batches_per_epoch:,} batches each"),
        ("monitor", cfg.run.monitor),
        ("run dir", str(trainer.run_dir)),
    ]
    for key, value in rows:
        grid.add_row(key, Text(str(value)))
    return grid


class ConsoleCallback(Callback):
    """Print the run: header, per-epoch progress, one result line per epoch, banners, summary.

    Args:
        console: where to print; a new ``rich.console.Console()`` (stdout) by default.
        mode: "auto" (a live bar on a terminal, plain lines otherwise), "bar", "plain"
            (at most three progress lines per epoch, for logs and CI) or "off" (nothing per
            batch; the header, epoch lines, banners and summary are still printed).
        quiet_seconds: plain mode prints no progress line in an epoch's first this many
            seconds, so short epochs leave one line each in a log.
    """

    def __init__(
        self,
        console: Console | None = None,
        mode: str = "auto",
        quiet_seconds: float = PLAIN_QUIET_SECONDS,
    ) -> None:
        self.console = console if console is not None else Console()
        self.mode = resolve_mode(mode, self.console)
        self.quiet_seconds = quiet_seconds
        self._progress: Progress | None = None
        self._task: Any = None
        self._in_epoch = False
        self._pending: list[tuple[str, str, list[str]]] = []
        self._reset_epoch(0, 0)

    # -- plumbing

    def _reset_epoch(self, epoch: int, total: int) -> None:
        self._epoch, self._total = epoch, total
        self._seen, self._loss_sum = 0, 0.0
        self._started = time.perf_counter()
        marks = {math.ceil(total * q) for q in PLAIN_MILESTONES}
        # The last batch is left out: the epoch's result line follows right after it.
        self._milestones = sorted(m for m in marks if 0 < m < total)

    def close(self) -> None:
        """Stop a live bar (restoring the cursor) and print any banner still held back; for a
        trainer's ``finally`` after a crash."""
        self._stop_bar()
        self._flush()

    def _stop_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress, self._task = None, None

    @property
    def _framed_text(self) -> bool:
        # Panels are for terminals; a log gets '=' frames that survive any viewer.
        return self.mode == "plain" or not self.console.is_terminal

    def _epochs_text(self, trainer: Any, epoch: int) -> str:
        total = trainer.config.run.epochs
        # Padded to the width of the total, so the columns of the epoch lines stay aligned.
        return f"{epoch:>{len(str(total))}}/{total}"

    # -- hooks

    def on_fit_start(self, trainer: Any) -> None:
        if not trainer.is_main:
            return
        self.console.rule(Text("training", style="bold"))
        self.console.print(settings_grid(trainer))
        self.console.print(counts_table(trainer.cache))
        self.console.print(model_table(trainer.model))
        if trainer.start_epoch > 1:
            self.console.print(Text(f"resuming at epoch {trainer.start_epoch}", style="bold cyan"))

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if not trainer.is_main:
            return
        self._stop_bar()
        self._flush()
        self._in_epoch = True
        self._reset_epoch(epoch, trainer.batches_per_epoch)
        if self.mode != "bar":
            return
        self._progress = Progress(
            TextColumn("epoch {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,  # the epoch's result line takes the bar's place
        )
        self._task = self._progress.add_task(
            self._epochs_text(trainer, epoch), total=self._total, loss="-"
        )
        self._progress.start()

    def on_batch_end(self, trainer: Any, batch: int, loss: float, stepped: bool) -> None:
        if not trainer.is_main or self.mode == "off":
            return
        # Counting calls rather than trusting ``batch`` keeps the bar right whatever its base.
        self._seen += 1
        self._loss_sum += float(loss)
        running = f"{self._loss_sum / self._seen:.4f}"
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=running)
        elif self.mode == "plain" and self._milestones and self._seen >= self._milestones[0]:
            while self._milestones and self._seen >= self._milestones[0]:
                self._milestones.pop(0)
            if time.perf_counter() - self._started >= self.quiet_seconds:
                self._print_progress_line(trainer, running)

    def _print_progress_line(self, trainer: Any, running: str) -> None:
        share = 100 * self._seen / max(self._total, 1)
        elapsed = _duration(time.perf_counter() - self._started)
        line = (
            f"  epoch {self._epochs_text(trainer, self._epoch)}  {share:3.0f}%  "
            f"batch {self._seen}/{self._total}  loss {running}  {elapsed}"
        )
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def on_epoch_end(self, trainer: Any, metrics: dict) -> None:
        if not trainer.is_main:
            return
        self._stop_bar()
        # soft_wrap: one epoch, one line, also in a log read by grep.
        self.console.print(self.epoch_line(trainer, metrics), soft_wrap=True)
        self._in_epoch = False
        self._flush()

    def epoch_line(self, trainer: Any, metrics: Mapping[str, Any]) -> Text:
        """The epoch's result line: where the run is (epoch, stage), the epoch's losses and
        accuracies, the lr, the time and the best so far; the monitored metric is coloured."""
        epoch = int(metrics.get("epoch", trainer.epoch))
        monitor = trainer.best.get("metric") or trainer.config.run.monitor
        is_best = trainer.best.get("epoch") == epoch and trainer.best.get("value") is not None
        previous = _previous_value(trainer.history, epoch, monitor)
        style = _monitor_style(metrics.get(monitor), previous, is_best, monitor)

        def field(label: str, key: str) -> tuple[str, str]:
            value = _metric(key, metrics.get(key)).rjust(6)  # "91.25%", " 9.50%": aligned
            return f"{label}{value}", style if key == monitor else ""

        parts: list[tuple[str, str] | str] = [
            (f"epoch {self._epochs_text(trainer, epoch)}", "bold"),
            ("  " + _stage_text(metrics.get("active_blocks"), trainer.model), "cyan"),
            "  train ",
            field("", "train_loss"),
            " ",
            field("", "train_acc"),
            "  val ",
            field("", "val_loss"),
            " ",
            field("", "val_acc"),
            "  ",
            field("f1 ", "val_macro_f1"),
            f"  lr {_lr_text(metrics.get('lr'))}",
            f"  {_duration(float(metrics.get('epoch_s') or 0.0)):>5}",
            "  ",
            _best_text(trainer.best, is_best),
        ]
        return Text.assemble(*parts)

    def on_notice(
        self, trainer: Any, kind: str, title: str, lines: list[str], banner: bool = True
    ) -> None:
        if not trainer.is_main or not banner:
            return
        if self._in_epoch and kind not in URGENT_KINDS:
            self._pending.append((kind, title, list(lines)))
            return
        self._print_banner(kind, title, lines)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for kind, title, lines in pending:
            self._print_banner(kind, title, lines)

    def _print_banner(self, kind: str, title: str, lines: Sequence[str]) -> None:
        """A block (title, then its lines) when there is more than one line to say, else one
        line; warnings are always one line."""
        if kind in URGENT_KINDS or len(lines) <= 1:
            self._print_one_line(kind, title, lines)
        elif self._framed_text:
            self._print_framed(title, lines)
        else:
            border, title_style = NOTICE_STYLES.get(kind, NOTICE_STYLES["info"])
            panel = Panel(
                Text("\n".join(lines)),
                title=Text(title, style=title_style),
                title_align="left",
                border_style=border,
                expand=False,
            )
            self.console.print(panel)

    def _print_one_line(self, kind: str, title: str, lines: Sequence[str]) -> None:
        urgent = kind in URGENT_KINDS
        # A decision reads "what: how it changed"; a warning lists all it has to say.
        if self._framed_text:
            text = ("; " if urgent else ": ").join([title, *lines])
            prefix = f"{kind.upper()}: " if urgent else "-- "
            self.console.print(prefix + text, markup=False, highlight=False, soft_wrap=True)
            return
        border, title_style = NOTICE_STYLES.get(kind, NOTICE_STYLES["info"])
        if urgent:
            line = Text.assemble((f"{kind}: ", title_style), ("; ".join([title, *lines]), border))
        else:
            line = Text.assemble(("» ", border), (title, title_style), *(f": {x}" for x in lines))
        self.console.print(line, soft_wrap=True)

    def _print_framed(self, title: str, lines: Sequence[str]) -> None:
        width = min(self.console.width, FRAME_WIDTH)
        head = f"== {title} "
        text = [head + "=" * max(2, width - len(head)), *(f"   {line}" for line in lines)]
        self.console.print("\n".join(text), markup=False, highlight=False, soft_wrap=True)

    def on_fit_end(self, trainer: Any, summary: dict) -> None:
        if not trainer.is_main:
            return
        self._stop_bar()
        self._in_epoch = False
        self._flush()  # a run stopped inside an epoch (divergence) still shows its decisions
        stopped = summary.get("stopped")
        # The reason's first part only: the whole reason is a row of the grid below.
        headline = f"training stopped: {stopped.split(':')[0]}" if stopped else "training finished"
        self.console.rule(Text(headline, style="bold"))
        self.console.print(summary_grid(summary))


def _stage_text(active: Any, model: Any) -> str:
    """``"stage 2/3"``: stages trainable now, out of the model's stages."""
    total = f"/{model.num_stages}" if hasattr(model, "num_stages") else ""
    return f"stage {active if active is not None else '-'}{total}"


def _best_text(best: Mapping[str, Any], is_best: bool) -> tuple[str, str]:
    if is_best:
        return "new best", "bold green"
    if best.get("value") is None:
        return "", ""
    monitor = best.get("metric") or "metric"
    return f"best {_metric(monitor, best['value'])} @{best.get('epoch')}", ""


def summary_grid(summary: Mapping[str, Any]) -> Table:
    """Best epoch and value, total time, stop reason, temperatures and where the files are."""
    monitor = summary.get("monitor") or "metric"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [
        ("best epoch", str(summary.get("best_epoch") or "-")),
        (f"best {monitor}", _metric(monitor, summary.get("best_value"))),
        ("total time", _duration(float(summary.get("seconds") or 0.0))),
    ]
    if summary.get("stopped"):
        rows.append(("stopped", str(summary["stopped"])))
    for name, result in (summary.get("calibration") or {}).items():
        rows.append((f"temperature {name}", _calibration_text(result)))
    rows += [(name, str(path)) for name, path in (summary.get("files") or {}).items()]
    for key, value in rows:
        grid.add_row(key, Text(value))
    return grid


def _calibration_text(result: Mapping[str, Any]) -> str:
    """``"T=1.066  NLL 0.1185 -> 0.1181  ECE 2.03% -> 2.54%"`` on the validation set, with the
    test-time augmentation it was fitted under when there was one, and why T was kept at 1 when
    it could not be fitted."""
    tta = result.get("tta", "none")
    kept = f"  (kept at 1: {result['reason']})" if result.get("reason") else ""
    return (
        f"T={result['temperature']:.3f}  NLL {result['nll_before']:.4f} -> "
        f"{result['nll_after']:.4f}  ECE {100 * result['ece_before']:.2f}% -> "
        f"{100 * result['ece_after']:.2f}%" + ("" if tta == "none" else f"  tta={tta}") + kept
    )
