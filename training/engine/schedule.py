"""Learning-rate schedules as pure functions of the optimizer step, and an object to apply them.

The loop owns the step count (the stepper increments it once per optimizer step, so gradient
accumulation does not stretch the schedule); the schedule only maps a step to a factor.

Two schedules live here: :func:`warmup_cosine` (warmup, one cosine) and the staged regimen
:class:`StagedSchedule` (warmup, one-cycle annealing, cosine, reduce-on-plateau, with floors),
whose plateau reductions are decided by :class:`PlateauState` from the validation metric.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup from ~0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``.

    Args:
        step: optimizer steps taken so far (0 before the first step).
        warmup_steps: length of the warmup; 0 starts at the peak.
        total_steps: step at which the cosine reaches ``min_ratio``; later steps stay there.
        min_ratio: floor as a fraction of the peak learning rate, in [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


#: A group that joins with a warmup starts at this fraction of its rate.
GROUP_WARMUP_START = 0.1


def group_multiplier(group: dict, step: int) -> float:
    """A parameter group's own factor at ``step``: ``lr_mult`` times its warmup since joining.

    Keys read from the group (all optional): ``lr_mult`` (default 1), ``joined_step`` and
    ``warmup_steps`` (a linear rise from :data:`GROUP_WARMUP_START` to 1 over ``warmup_steps``
    optimizer steps after ``joined_step``).
    """
    mult = float(group.get("lr_mult", 1.0))
    warmup = int(group.get("warmup_steps", 0))
    if warmup > 0:
        progress = min(1.0, max(0, step - int(group.get("joined_step", 0))) / warmup)
        mult *= GROUP_WARMUP_START + (1.0 - GROUP_WARMUP_START) * progress
    return mult


class LRSchedule:
    """Sets every group's lr to ``base_lr * factor(step) * scale * group_multiplier(group)``.

    Groups added to the optimizer later (a block activated by progressive unfreezing) follow the
    same schedule from the step they join: a group without ``base_lr`` takes its current ``lr`` as
    its base. This is what OneCycleLR and ReduceLROnPlateau do not do for late groups. The
    per-group keys (``lr_mult``, ``joined_step``, ``warmup_steps``) live in the optimizer's groups,
    so they travel in the optimizer's state dict.

    Args:
        optimizer: the optimizer whose groups it drives.
        factor: a pure function of the optimizer step.
        plateau: the reduce-on-plateau state ``factor`` reads, saved with this schedule.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: Callable[[int], float],
        plateau: PlateauState | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.plateau = plateau
        self.last_step = 0
        #: product of the cuts made by rollbacks; multiplies every group.
        self.scale = 1.0
        self.apply()

    def apply(self) -> None:
        f = self.factor(self.last_step) * self.scale
        for group in self.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * f * group_multiplier(group, self.last_step)

    def step(self) -> None:
        self.last_step += 1
        self.apply()

    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        state = {"last_step": self.last_step, "scale": self.scale}
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.scale = float(state.get("scale", 1.0))
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])
        self.apply()


#: The warmup starts at ``peak / 25``: the initial division of the one-cycle policy (Smith & Topin
#: 2019), also the default ``div_factor`` of torch's OneCycleLR.
WARMUP_START_DIV = 25.0


#: File name :func:`plot_schedule` uses when it is given a folder.
LR_PLOT_NAME = "lr_schedule.png"


PLATEAU_MODES = ("max", "min")


def _invalid(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")


def _is_number(value: object) -> bool:
    # bool is an int subclass; True as an epoch or a learning rate is a mistake, not a number.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cosine(start: float, end: float, progress: float) -> float:
    """Half a cosine from ``start`` (progress 0) to ``end`` (progress 1)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StagedSchedule:
    """The staged learning-rate regimen; epochs are positions on the schedule, floats allowed.

    Phases, by schedule position ``epoch = step / steps_per_epoch``:

    - ``[0, warmup_epochs)``: linear warmup from ``peak / 25`` to ``peak`` (Goyal et al. 2017,
      "Accurate, Large Minibatch SGD").
    - ``[warmup_epochs, onecycle_end_epoch)``: the annealing half of a one-cycle, a cosine from
      ``peak`` down to ``onecycle_end`` (Smith & Topin 2019, "Super-Convergence").
    - ``[onecycle_end_epoch, cosine_end_epoch)``: cosine annealing from ``onecycle_end`` down to
      ``cosine_end`` (Loshchilov & Hutter 2017, SGDR, a single cycle without restart).
    - from ``cosine_end_epoch`` on: ``cosine_end`` times the product of the reduce-on-plateau
      cuts so far (:class:`PlateauState`, the rule of torch's ReduceLROnPlateau).

    Floors apply to the whole curve: from each ``(from_epoch, min_lr)`` on, until the next floor
    starts, the lr is at least ``min_lr``.

    Args:
        peak: the largest learning rate, reached at the end of the warmup.
        warmup_epochs: end of the warmup; 0 starts at the peak.
        onecycle_end_epoch: end of the one-cycle annealing, after ``warmup_epochs``.
        onecycle_end: lr at ``onecycle_end_epoch``, in (0, peak].
        cosine_end_epoch: end of the cosine phase and start of the plateau phase.
        cosine_end: lr at ``cosine_end_epoch``, in (0, onecycle_end].
        plateau_factor: multiplier of each plateau reduction, in (0, 1).
        plateau_patience: validation epochs without improvement that trigger a reduction.
        plateau_min_delta: the least change of the metric that counts as an improvement.
        floors: ``(from_epoch, min_lr)`` pairs with increasing ``from_epoch``.
    """

    peak: float = 1e-2
    warmup_epochs: float = 5
    onecycle_end_epoch: float = 20
    onecycle_end: float = 2e-3
    cosine_end_epoch: float = 40
    cosine_end: float = 1e-3
    plateau_factor: float = 0.1
    plateau_patience: int = 3
    plateau_min_delta: float = 0.0
    floors: tuple[tuple[float, float], ...] = ((40, 1e-3), (50, 1e-4))

    def __post_init__(self) -> None:
        # A list given by a config file becomes a tuple, so the frozen dataclass stays hashable.
        object.__setattr__(self, "floors", _as_floors(self.floors))
        for name in ("peak", "warmup_epochs", "onecycle_end_epoch", "onecycle_end"):
            _check_number(name, getattr(self, name))
        for name in ("cosine_end_epoch", "cosine_end", "plateau_factor", "plateau_min_delta"):
            _check_number(name, getattr(self, name))
        _check_epochs(self)
        _check_lrs(self)
        _check_plateau(self)

    def phase(self, epoch: float) -> str:
        """The phase at schedule position ``epoch``: warmup, onecycle, cosine or plateau."""
        if epoch < self.warmup_epochs:
            return "warmup"
        if epoch < self.onecycle_end_epoch:
            return "onecycle"
        return "cosine" if epoch < self.cosine_end_epoch else "plateau"

    def floor_at(self, epoch: float) -> float:
        """The floor in force at schedule position ``epoch``; 0.0 before the first floor."""
        starts = [start for start, _ in self.floors]
        i = bisect.bisect_right(starts, epoch)
        return self.floors[i - 1][1] if i else 0.0

    def factor_fn(
        self, steps_per_epoch: int, base_lr: float, plateau: PlateauState | None = None
    ) -> Callable[[int], float]:
        """``step -> staged_lr(step) / base_lr``, the factor :class:`LRSchedule` expects.

        ``LRSchedule`` multiplies each group's ``base_lr`` by this factor, so a group whose base is
        ``base_lr`` follows the staged curve exactly and a group with its own multiplier keeps its
        ratio. ``plateau.scale`` is read at every call, so a reduction applies from the next step.
        """
        if not (_is_number(base_lr) and base_lr > 0):
            raise _invalid("base_lr", base_lr, "a finite number > 0")
        _check_steps_per_epoch(steps_per_epoch)

        def factor(step: int) -> float:
            scale = 1.0 if plateau is None else plateau.scale
            return staged_lr(step, steps_per_epoch, self, scale) / base_lr

        return factor


def _as_floors(floors: object) -> tuple[tuple[float, float], ...]:
    allowed = "a sequence of (from_epoch, min_lr) pairs, from_epoch >= 0 increasing, min_lr > 0"
    try:
        pairs = tuple((start, min_lr) for start, min_lr in floors)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise _invalid("floors", floors, allowed) from None
    for i, (start, min_lr) in enumerate(pairs):
        if not (_is_number(start) and start >= 0):
            raise _invalid(f"floors[{i}].from_epoch", start, "a finite number >= 0")
        if not (_is_number(min_lr) and min_lr > 0):
            raise _invalid(f"floors[{i}].min_lr", min_lr, "a finite number > 0")
        if i and start <= pairs[i - 1][0]:
            raise _invalid(f"floors[{i}].from_epoch", start, f"> {pairs[i - 1][0]} (increasing)")
    return pairs


def _check_number(name: str, value: object) -> None:
    if not _is_number(value):
        raise _invalid(name, value, "a finite number")


def _check_epochs(s: StagedSchedule) -> None:
    if s.warmup_epochs < 0:
        raise _invalid("warmup_epochs", s.warmup_epochs, ">= 0")
    if s.onecycle_end_epoch <= s.warmup_epochs:
        raise _invalid(
            "onecycle_end_epoch", s.onecycle_end_epoch, f"> warmup_epochs={s.warmup_epochs}"
        )
    if s.cosine_end_epoch <= s.onecycle_end_epoch:
        allowed = f"> onecycle_end_epoch={s.onecycle_end_epoch}"
        raise _invalid("cosine_end_epoch", s.cosine_end_epoch, allowed)


def _check_lrs(s: StagedSchedule) -> None:
    # Each phase anneals downwards; a cosine that climbs would make the phases fight each other.
    if s.peak <= 0:
        raise _invalid("peak", s.peak, "> 0")
    if not 0 < s.onecycle_end <= s.peak:
        raise _invalid("onecycle_end", s.onecycle_end, f"(0, peak={s.peak}]")
    if not 0 < s.cosine_end <= s.onecycle_end:
        raise _invalid("cosine_end", s.cosine_end, f"(0, onecycle_end={s.onecycle_end}]")


def _check_plateau(s: StagedSchedule) -> None:
    if not 0 < s.plateau_factor < 1:
        raise _invalid("plateau_factor", s.plateau_factor, "(0, 1)")
    patience = s.plateau_patience
    if not (isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1):
        raise _invalid("plateau_patience", patience, "an integer >= 1")
    if s.plateau_min_delta < 0:
        raise _invalid("plateau_min_delta", s.plateau_min_delta, ">= 0")


def _check_steps_per_epoch(steps_per_epoch: int) -> None:
    ok = isinstance(steps_per_epoch, int) and not isinstance(steps_per_epoch, bool)
    if not (ok and steps_per_epoch >= 1):
        raise _invalid("steps_per_epoch", steps_per_epoch, "an integer >= 1")


def staged_lr(
    step: int, steps_per_epoch: int, sched: StagedSchedule, plateau_scale: float = 1.0
) -> float:
    """The absolute learning rate of the staged regimen after ``step`` optimizer steps.

    Args:
        step: optimizer steps taken so far (0 before the first step); position
            ``step / steps_per_epoch`` on the schedule.
        steps_per_epoch: optimizer steps per epoch, >= 1.
        sched: the schedule.
        plateau_scale: product of the plateau reductions so far, in (0, 1]; used only in the
            plateau phase. The floor in force is applied last.
    """
    _check_steps_per_epoch(steps_per_epoch)
    if step < 0:
        raise _invalid("step", step, ">= 0")
    if not 0 < plateau_scale <= 1:
        raise _invalid("plateau_scale", plateau_scale, "(0, 1]")
    epoch = step / steps_per_epoch
    return max(_phase_lr(sched, epoch, plateau_scale), sched.floor_at(epoch))


def _phase_lr(s: StagedSchedule, epoch: float, plateau_scale: float) -> float:
    if epoch < s.warmup_epochs:
        start = s.peak / WARMUP_START_DIV
        return start + (s.peak - start) * epoch / s.warmup_epochs
    if epoch < s.onecycle_end_epoch:
        progress = (epoch - s.warmup_epochs) / (s.onecycle_end_epoch - s.warmup_epochs)
        return _cosine(s.peak, s.onecycle_end, progress)
    if epoch < s.cosine_end_epoch:
        progress = (epoch - s.onecycle_end_epoch) / (s.cosine_end_epoch - s.onecycle_end_epoch)
        return _cosine(s.onecycle_end, s.cosine_end, progress)
    return s.cosine_end * plateau_scale


def _next_scale(scale: float, sched: StagedSchedule, epoch: float) -> float:
    """The plateau scale after one reduction that takes effect at schedule position ``epoch``.

    The scale shrinks at most to where the lr meets the floor in force: a scale that kept
    shrinking under the floor would change nothing now but drop the lr by several factors at
    once when a lower floor starts.
    """
    floor_scale = sched.floor_at(epoch) / sched.cosine_end
    return min(scale, max(scale * sched.plateau_factor, floor_scale))


class PlateauState:
    """Reduce-on-plateau decisions for the last phase of a :class:`StagedSchedule`.

    Epochs whose training started before the plateau phase are ignored altogether: the metric
    still improves there because the lr is falling, and it is not the lr the plateau rule
    controls. From the first plateau epoch on, ``plateau_patience`` epochs in a row without an
    improvement of more than ``plateau_min_delta`` multiply :attr:`scale` by ``plateau_factor``
    (as torch's ReduceLROnPlateau does, but reducing after exactly ``patience`` bad epochs rather
    than ``patience + 1``). The count restarts after each reduction, and also when the floor
    already blocks one. A NaN metric counts as no improvement.

    Args:
        sched: the schedule whose plateau phase and floors apply.
    """

    def __init__(self, sched: StagedSchedule) -> None:
        self.sched = sched
        self.scale = 1.0
        self.best: float | None = None
        self.bad_epochs = 0
        #: epochs from which a reduction applied; :func:`plot_schedule` redraws the run from them.
        self.reductions: list[int] = []

    def update(self, epoch: int, metric: float, mode: str) -> bool:
        """Record one validation; returns True when it reduced the scale.

        Args:
            epoch: epochs completed, counting the one just validated (the trainer's 1-based
                epoch number); a reduction applies from schedule position ``epoch`` on.
            metric: the monitored validation metric.
            mode: "max" when higher is better (accuracy), "min" when lower is (loss).
        """
        if mode not in PLATEAU_MODES:
            raise _invalid("mode", mode, " | ".join(PLATEAU_MODES))
        if epoch - 1 < self.sched.cosine_end_epoch:
            return False
        if self._improved(float(metric), mode):
            self.best, self.bad_epochs = float(metric), 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs < self.sched.plateau_patience:
            return False
        self.bad_epochs = 0
        new = _next_scale(self.scale, self.sched, epoch)
        if new >= self.scale:
            return False
        self.scale = new
        self.reductions.append(int(epoch))
        return True

    def _improved(self, metric: float, mode: str) -> bool:
        if math.isnan(metric):
            return False
        if self.best is None:
            return True
        delta = self.sched.plateau_min_delta
        return metric > self.best + delta if mode == "max" else metric < self.best - delta

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "reductions": list(self.reductions),
        }

    def load_state_dict(self, state: dict) -> None:
        scale = float(state["scale"])
        if not 0 < scale <= 1:
            raise _invalid("state['scale']", scale, "(0, 1]")
        self.scale = scale
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.reductions = [int(e) for e in state["reductions"]]


#: Points drawn per curve: enough that a per-step jump looks vertical, few enough to stay fast.
_PLOT_POINTS = 2000


class Marker(NamedTuple):
    """An event of the run drawn on the schedule's epoch axis (schedule positions).

    ``end`` None: a moment, drawn as a vertical line at ``start`` (a block joining after epoch
    ``start``). Otherwise a span from ``start`` to ``end``, drawn as a bar in a lane of its own
    under the learning rate (the SWA window, Mixup, the augmentation ramp), named ``label`` and
    annotated with ``note``.
    """

    label: str
    start: float
    end: float | None = None
    note: str = ""


def _illustrative_scales(
    sched: StagedSchedule, plateau_epochs: Sequence[int]
) -> tuple[list[float], list[float]]:
    """Reduction epochs (sorted) and the plateau scale from each on, by the rule of PlateauState."""
    starts = sorted(float(e) for e in plateau_epochs)
    for e in starts:
        if e < sched.cosine_end_epoch:
            allowed = f">= cosine_end_epoch={sched.cosine_end_epoch} (the plateau phase)"
            raise _invalid("plateau_epochs", tuple(plateau_epochs), allowed)
    scales, scale = [], 1.0
    for e in starts:
        scale = _next_scale(scale, sched, e)
        scales.append(scale)
    return starts, scales


def plot_schedule(
    sched: StagedSchedule,
    steps_per_epoch: int,
    total_epochs: int,
    path: str | Path,
    plateau_epochs: Sequence[int] = (),
    markers: Sequence[Marker] = (),
) -> Path:
    """Draw lr against epoch (log scale) with phase boundaries and floors; write it atomically.

    The plateau phase is illustrative: it assumes reductions at ``plateau_epochs`` (schedule
    positions, as in :attr:`PlateauState.reductions`), clipped at the floors as the real rule is.

    Args:
        sched: the schedule.
        steps_per_epoch: optimizer steps per epoch.
        total_epochs: length of the run drawn.
        path: the figure's file if it ends in ``.png``, else a folder (created if missing) to
            write ``lr_schedule.png`` into.
        plateau_epochs: epochs from which a plateau reduction applies.
        markers: the run's other events (block activations, SWA, Mixup, ...); a span gets a
            lane under the curve, a moment a vertical line across it.

    Returns:
        The path of the written figure.
    """
    _check_steps_per_epoch(steps_per_epoch)
    if not (_is_number(total_epochs) and total_epochs > 0):
        raise _invalid("total_epochs", total_epochs, "a finite number > 0")
    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path / LR_PLOT_NAME
    starts, scales = _illustrative_scales(sched, plateau_epochs)
    total_steps = max(1, round(total_epochs * steps_per_epoch))
    n = min(total_steps, _PLOT_POINTS)
    steps = sorted({round(i * total_steps / n) for i in range(n + 1)})
    epochs, lrs = [], []
    for step in steps:
        epoch = step / steps_per_epoch
        i = bisect.bisect_right(starts, epoch)
        epochs.append(epoch)
        lrs.append(staged_lr(step, steps_per_epoch, sched, scales[i - 1] if i else 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    # A pid-named temp file beside the target (plain open, so the umask's mode), renamed into
    # place: a reader never sees half a PNG.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        _draw(sched, (epochs, lrs), starts, list(markers), float(total_epochs), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _draw(
    sched: StagedSchedule,
    curve: tuple[list[float], list[float]],
    reductions: list[float],
    markers: list[Marker],
    total: float,
    out: Path,
) -> None:
    # Figure without pyplot: the Agg canvas renders it, and no global backend state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spans = [m for m in markers if m.end is not None and m.start < total]
    fig = Figure(figsize=(9, 5.5 if spans else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    if spans:
        # The lanes' share of the height grows with their number.
        ratios = [4.0, max(1.0, 0.45 * len(spans))]
        ax, lanes = fig.subplots(2, 1, sharex=True, height_ratios=ratios)
    else:
        ax, lanes = fig.subplots(), None
    _draw_curve(ax, sched, curve, reductions, total)
    ax.set_title("staged learning-rate schedule" + (" and the run's plan" if markers else ""))
    moments = [m for m in markers if m.end is None and 0 < m.start < total]
    _draw_moments(ax, lanes, moments)
    ax.set_xlim(0, total)
    # Above the axes: inside, any corner can hide a phase label, a block label or the curve.
    fig.legend(loc="outside upper center", ncols=4, fontsize=8, frameon=False)
    if lanes is not None:
        _draw_lanes(lanes, spans, total)
        lanes.set_xlabel("epoch")
    else:
        ax.set_xlabel("epoch")
    fig.savefig(out, format="png", dpi=110)


def _draw_moments(ax, lanes, moments: list[Marker]) -> None:
    """A vertical line per moment across the curve (and the lanes), named at its foot."""
    for i, m in enumerate(moments):
        ax.axvline(m.start, color="C1", ls="-.", lw=1.1, label="block joins" if i == 0 else None)
        if lanes is not None:
            lanes.axvline(m.start, color="C1", ls="-.", lw=1.1)
        text = f"{m.label} "
        foot = ax.get_xaxis_transform()
        ax.text(
            m.start,
            0.03,
            text,
            transform=foot,
            rotation=90,
            ha="right",
            va="bottom",
            fontsize=8,
            color="C1",
        )


def _draw_curve(
    ax, sched: StagedSchedule, curve: tuple[list[float], list[float]], reductions, total: float
) -> None:
    ax.plot(*curve, color="C0", lw=1.6, label="learning rate")
    ax.set_yscale("log")
    phases = [
        (0.0, sched.warmup_epochs, "warmup"),
        (sched.warmup_epochs, sched.onecycle_end_epoch, "one-cycle"),
        (sched.onecycle_end_epoch, sched.cosine_end_epoch, "cosine"),
        (sched.cosine_end_epoch, math.inf, "plateau"),
    ]
    previous, y_last = -math.inf, 0.98
    for start, end, label in phases:
        if end <= start or start >= total:
            continue
        if start > 0:
            ax.axvline(start, color="0.45", lw=0.9)
        # A label too close to the previous one goes a line lower, so short phases stay legible.
        y = 0.98 if start - previous > 0.1 * total or y_last < 0.98 else 0.92
        previous, y_last = start, y
        # x in data units, y in axes units: the label sits at the top whatever the lr range.
        ax.text(start, y, f" {label}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    # Each floor holds until the next one starts; a schedule may have none.
    bounds = [start for start, _ in sched.floors[1:]] + [math.inf] * bool(sched.floors)
    for i, ((start, min_lr), end) in enumerate(zip(sched.floors, bounds, strict=True)):
        if start < total:
            label = "floor" if i == 0 else None
            ax.hlines(min_lr, start, min(end, total), colors="C3", linestyles="--", label=label)
    for i, epoch in enumerate(e for e in reductions if e < total):
        label = "plateau reduction (illustrative)" if i == 0 else None
        ax.axvline(epoch, color="C2", ls=":", lw=1.0, label=label)
    ax.set_ylabel("learning rate")
    ax.grid(True, which="both", alpha=0.25)


def _draw_lanes(lanes, spans: list[Marker], total: float) -> None:
    """One horizontal bar per span, top to bottom in the given order, named on the y axis."""
    rows = range(len(spans))
    pad = 0.01 * total
    for row, m in zip(rows, spans, strict=True):
        end = min(float(m.end), total)  # type: ignore[arg-type]
        lanes.barh(row, end - m.start, left=m.start, height=0.6, color=f"C{row + 4}", alpha=0.45)
        # The note goes after a bar that ends early, inside a long one, else before it.
        if end <= 0.6 * total:
            x, ha = end + pad, "left"
        elif end - m.start >= 0.4 * total:
            x, ha = m.start + pad, "left"
        else:
            x, ha = m.start - pad, "right"
        box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}
        lanes.text(x, row, m.note, va="center", ha=ha, fontsize=8, bbox=box)
    lanes.set_yticks(list(rows), [m.label for m in spans], fontsize=8)
    lanes.set_ylim(len(spans) - 0.5, -0.5)
    lanes.grid(True, axis="x", alpha=0.25)
