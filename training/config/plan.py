"""The run's plan in epochs: which settings count epochs, how they follow ``run.epochs``, and
the plan as printed at the start of a run and drawn in ``lr_schedule.png``.

A preset (or the defaults) describes one regimen for one length: 60 epochs by default, 30 for
``--preset cpu``. A run asked to last another number of epochs gets the same regimen compressed
or stretched: :func:`scale_plan` multiplies every epoch-valued setting the user did not set by
``epochs / base`` (:data:`EPOCH_FIELDS` says how each one rounds), then moves the derived values
just enough for the rules that tie them together to hold (warmup < one-cycle end < cosine end,
activations ``min_gap`` apart, SWA after the last activation's head blend). Values the user set
are never moved.

Everything here works on a flat ``{"section.field": value}`` mapping or reads a resolved config,
so it is tested without building one.

Public API:
    EpochField, EPOCH_FIELDS, Rescale, scale_value, scale_plan, first_swa_epoch, plan_lines,
    plan_markers.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.registry import capabilities, stage_names
from models.staged import start_depth
from training.engine.resize import schedule_text
from training.engine.schedule import WARMUP_START_DIV, Marker

if TYPE_CHECKING:
    from training.config.schema import TrainConfig


@dataclass(frozen=True)
class EpochField:
    """How one epoch-valued setting follows the run's length.

    Args:
        span: a length or a patience (kept >= 1 when it was >= 1, so 0 = off stays off and a
            one-epoch patience never becomes 0); otherwise a position on the run.
        whole: rounded half up to whole epochs (the field is an int, or a list of whole epochs);
            otherwise scaled as a float.
    """

    span: bool
    whole: bool


_AT = EpochField(span=False, whole=True)


_SPAN = EpochField(span=True, whole=True)


_FLOAT_SPAN = EpochField(span=True, whole=False)


#: Every setting counted in epochs, and how it scales. ``safety.rollback_patience`` is not one:
#: it counts the epochs that confirm a fall against one noisy validation, whatever the length.
EPOCH_FIELDS: dict[str, EpochField] = {
    # The warmup is a length that ends where the one-cycle starts.
    "schedule.warmup_epochs": _SPAN,
    "schedule.onecycle_end_epoch": _AT,
    "schedule.cosine_end_epoch": _AT,
    # Whole epochs, like cosine_end_epoch, so a floor that starts with the plateau phase in the
    # preset still does after scaling.
    "schedule.floor_epochs": _AT,
    "schedule.plateau_patience": _SPAN,
    "unfreeze.activate_at": _AT,
    "unfreeze.min_gap": _SPAN,
    "unfreeze.plateau_patience": _SPAN,
    "unfreeze.warmup_epochs": _FLOAT_SPAN,
    "unfreeze.head_blend_epochs": _FLOAT_SPAN,
    "regularize.mixup_end_epoch": EpochField(span=False, whole=False),
    "data.aug_ramp_epochs": _SPAN,
    "safety.swa_start_epoch": _AT,
    "safety.patience": _SPAN,
}


@dataclass(frozen=True)
class Rescale:
    """How a configuration's epoch settings were fitted to ``run.epochs`` when it was resolved.

    Args:
        base_epochs: the length the preset (or the defaults) plans for.
        epochs: the run's length.
        origin: whose plan it is, for messages: "cpu preset's" or "default".
        kept: the epoch-valued fields the user set, left as given.
    """

    base_epochs: int
    epochs: int
    origin: str
    kept: tuple[str, ...] = ()

    @property
    def factor(self) -> float:
        return self.epochs / self.base_epochs

    @property
    def scaled(self) -> bool:
        """Whether any epoch-valued field followed the new length."""
        return len(self.kept) < len(EPOCH_FIELDS)


def _round_half_up(x: float) -> int:
    # round() rounds halves to even (round(4.5) == 4); a plan should not depend on parity. The
    # inner round drops float noise such as 24 * 0.2 = 4.800000000000001.
    return math.floor(round(x, 9) + 0.5)


def _scale_one(value: float, rule: EpochField, factor: float) -> float:
    x = value * factor
    scaled: float = _round_half_up(x) if rule.whole else round(x, 6)
    if rule.span and value >= 1:
        scaled = max(scaled, 1)
    return scaled


def scale_value(value: Any, rule: EpochField, factor: float) -> Any:
    """One setting (a number or a list of them) times ``factor``, rounded by ``rule``."""
    if isinstance(value, (list, tuple)):
        return [_scale_one(v, rule, factor) for v in value]
    return _scale_one(value, rule, factor)


def first_swa_epoch(last_activation: float, head_blend_epochs: float) -> int:
    """The first epoch whose weights may enter the SWA average: after the last activation, and
    once the head blend that follows it is over."""
    return int(last_activation) + max(1, math.ceil(head_blend_epochs))


def scale_plan(
    values: Mapping[str, Any], base_epochs: int, fixed: Collection[str] = ()
) -> dict[str, Any]:
    """The epoch settings of ``values`` fitted to ``values["run.epochs"]``.

    Each field of :data:`EPOCH_FIELDS` not in ``fixed`` is multiplied by
    ``run.epochs / base_epochs`` and rounded by its rule; the derived values are then repaired so
    the cross-field rules hold: the staged boundaries keep ``0 <= warmup < one-cycle end < cosine
    end`` (ending the cosine within the run where the length allows; a ``cosine`` schedule
    keeps its last epoch after the warmup), floors increase, each
    activation comes ``min_gap`` after the previous one (the first ``min_gap`` after the start),
    a derived ``min_gap`` fits the user's own activations, and SWA starts no earlier than
    :func:`first_swa_epoch` (when unfreezing is on). A run too short for a phase keeps it beyond
    its end; the plan then says the phase is not reached.

    Args:
        values: ``{"section.field": value}`` holding ``run.epochs``, ``schedule.kind``,
            ``unfreeze.enabled`` and every field of :data:`EPOCH_FIELDS`, already of their field
            types.
        base_epochs: the length the values were planned for, >= 1.
        fixed: the fields the user set; they are returned unchanged.

    Returns:
        A new mapping with the same keys.
    """
    if not (isinstance(base_epochs, int) and base_epochs >= 1):
        raise ValueError(f"base_epochs={base_epochs!r} is invalid; allowed: an int >= 1")
    out = dict(values)
    epochs = int(out["run.epochs"])
    for path, rule in EPOCH_FIELDS.items():
        if path not in fixed:
            out[path] = scale_value(out[path], rule, epochs / base_epochs)
    _fit_staged(out, epochs, fixed)
    _fit_floors(out, fixed)
    _fit_activations(out, fixed)
    _fit_swa(out, epochs, fixed)
    return out


_STAGED = ("schedule.warmup_epochs", "schedule.onecycle_end_epoch", "schedule.cosine_end_epoch")


# The field rules: the warmup may be 0, the two phase ends are >= 1.
_STAGED_LOWEST = {"schedule.warmup_epochs": 0}


def _fit_staged(v: dict[str, Any], epochs: int, fixed: Collection[str]) -> None:
    warmup = "schedule.warmup_epochs"
    if v["schedule.kind"] == "cosine":
        # One cosine after the warmup: leave it at least the last epoch where the run allows.
        if warmup not in fixed:
            v[warmup] = min(v[warmup], max(0, epochs - 1))
    else:
        # Backwards first: where the length allows, the cosine ends within the run (so its last
        # epochs train at the end rate) and each earlier boundary comes before the next.
        upper = epochs
        for path in reversed(_STAGED):
            if path not in fixed:
                v[path] = max(_STAGED_LOWEST.get(path, 1), min(v[path], upper))
            upper = v[path] - 1
    # Then forwards, which must hold: each boundary after the previous one.
    previous = -1
    for path in _STAGED:
        if path not in fixed:
            v[path] = max(v[path], previous + 1)
        previous = v[path]


def _fit_floors(v: dict[str, Any], fixed: Collection[str]) -> None:
    path = "schedule.floor_epochs"
    if path in fixed:
        return
    floors, previous = [], -1
    for start in v[path]:
        previous = max(start, previous + 1)
        floors.append(previous)
    v[path] = floors


def _fit_activations(v: dict[str, Any], fixed: Collection[str]) -> None:
    at, gap = "unfreeze.activate_at", "unfreeze.min_gap"
    if at in fixed:
        if gap not in fixed:
            gaps = [b - a for a, b in zip([0, *v[at]], v[at], strict=False)]
            v[gap] = max(1, min(v[gap], *gaps))
        return
    epochs, previous = [], 0
    for epoch in v[at]:
        previous = max(epoch, previous + v[gap])
        epochs.append(previous)
    v[at] = epochs


def _fit_swa(v: dict[str, Any], epochs: int, fixed: Collection[str]) -> None:
    path = "safety.swa_start_epoch"
    if path in fixed:
        return
    first = 1
    if v["unfreeze.enabled"]:
        first = first_swa_epoch(v["unfreeze.activate_at"][-1], v["unfreeze.head_blend_epochs"])
    v[path] = max(min(v[path], epochs), first)


_Row = tuple[str, str, str]  # phase, its epochs, what happens


def _line(name: str, when: str, what: str = "") -> _Row:
    return name, when, what


def _epochs(first: int, last: int, total: int) -> str:
    """Trained epochs ``first..last`` (1-based) of a ``total``-epoch run, in words."""
    if first > total:
        return f"not reached: needs >= {first} epochs"
    last = min(last, total)
    return f"epoch {first}" if first >= last else f"epochs {first}-{last}"


def _lr(x: float) -> str:
    return f"{x:.1e}"


def plan_lines(
    cfg: TrainConfig, *, resumed: bool = False, stop_not_before: int | None = None
) -> list[str]:
    """The plan of a run, one line per phase with the epochs it covers.

    The first line gives the length and where the plan comes from (scaled, as designed, or the
    stored plan of a resumed run, which ``--epochs`` extends without rescaling).

    Args:
        cfg: the resolved configuration (its ``scaling`` says whether it was rescaled).
        resumed: the run continues a stored one.
        stop_not_before: the last epoch at which early stopping may not end the run yet.
    """
    rows = [
        *_schedule_lines(cfg),
        *_block_lines(cfg),
        *_resize_lines(cfg),
        *_regularise_lines(cfg),
        *_safety_lines(cfg, stop_not_before),
    ]
    names, whens = (max(len(row[i]) for row in rows) for i in (0, 1))
    body = [f"  {name:<{names}}  {when:<{whens}}  {what}".rstrip() for name, when, what in rows]
    return [_headline(cfg, resumed), *body]


def _headline(cfg: TrainConfig, resumed: bool) -> str:
    epochs = cfg.run.epochs
    if resumed:
        return f"plan: {_count(epochs)} (the resumed run's stored plan, not rescaled)"
    r = cfg.scaling
    if r is None:
        origin = f"{cfg.preset} preset's" if cfg.preset else "default"
        return f"plan: {_count(epochs)} ({origin} plan)"
    if not r.scaled:
        return f"plan: {_count(epochs)} (every epoch setting as given; not scaled)"
    kept = f"; as given: {', '.join(r.kept)}" if r.kept else ""
    scaled = f"{r.origin} {r.base_epochs}-epoch plan scaled x{r.factor:.2g}"
    return f"plan: {_count(epochs)} ({scaled}{kept})"


def _schedule_lines(cfg: TrainConfig) -> list[_Row]:
    s, total, peak = cfg.schedule, cfg.run.epochs, cfg.optim.lr
    w = int(s.warmup_epochs)
    if w:
        rise = f"lr {_lr(peak / WARMUP_START_DIV)} -> {_lr(peak)}"
        rows = [_line("warmup", _epochs(1, w, total), rise)]
    else:
        rows = [_line("warmup", "none", f"starts at the peak lr {_lr(peak)}")]
    if s.kind == "cosine":
        rows.append(_line("cosine", _epochs(w + 1, total, total), f"-> {_lr(s.min_lr)}"))
        return rows
    o, c = int(s.onecycle_end_epoch), int(s.cosine_end_epoch)
    rows.append(
        _line("one-cycle", _epochs(w + 1, o, total), f"-> {_lr(peak * s.onecycle_end_ratio)}")
    )
    rows.append(_line("cosine", _epochs(o + 1, c, total), f"-> {_lr(peak * s.cosine_end_ratio)}"))
    cut = f"lr x{s.plateau_factor:g} after {_count(s.plateau_patience)} without gain"
    rows.append(_line("plateau", _epochs(c + 1, total, total), cut))
    # A floor from schedule position f is in force from the epoch that trains over [f, f + 1).
    firsts = [math.floor(f) + 1 for f in s.floor_epochs]
    lasts = [first - 1 for first in firsts[1:]] + [total]
    for first, last, lr in zip(firsts, lasts, s.floor_lrs, strict=True):
        rows.append(_line("floor", _epochs(first, last, total), f"lr >= {_lr(lr)}"))
    return rows


def _count(n: float) -> str:
    return f"{n:g} epoch" + ("" if n == 1 else "s")


def unfreeze_direction(cfg: TrainConfig) -> str:
    """The direction stages join in (see :mod:`models.staged`): ``unfreeze.direction``, or for
    ``auto``: ``grow`` for a model with ``partial_depth`` (basic_cnn: its forward runs only the
    active blocks), ``thaw`` for any other whose weights are loaded (``model.pretrained`` or
    ``model.init``), and ``all`` for one trained from scratch."""
    direction = cfg.unfreeze.direction
    if direction != "auto":
        return direction
    if "partial_depth" in capabilities(cfg.model.arch):
        return "grow"
    return "thaw" if cfg.model.pretrained or cfg.model.init else "all"


@dataclass(frozen=True)
class StagePlan:
    """How a run's stages join: their names, the direction, the depth at the start, and the
    first depth that ``unfreeze.activate_at`` schedules (its entry 0)."""

    names: tuple[str, ...]
    direction: str
    start: int
    first: int

    def stage_at(self, depth: int) -> str:
        """The name of the stage that joins to make the depth ``depth``."""
        n = len(self.names)
        return self.names[depth - 1] if self.direction == "grow" else self.names[n - depth]

    @property
    def joins(self) -> int:
        """How many stages ``unfreeze.activate_at`` schedules."""
        return len(self.names) - self.first + 1


def stage_plan(cfg: TrainConfig) -> StagePlan:
    """The :class:`StagePlan` of ``cfg``'s model and unfreezing settings."""
    options = cfg.model.arch_options()
    names = stage_names(cfg.model.arch, options)
    direction = unfreeze_direction(cfg)
    if "partial_depth" in capabilities(cfg.model.arch):
        # activate_at lists the depths after the first (basic_cnn: blocks 2 and 3); a run that
        # starts deeper (model.active_blocks) skips the entries it passed.
        return StagePlan(names, direction, options.get("active_blocks", 1), 2)
    start = start_depth(direction, len(names))
    return StagePlan(names, direction, start, start + 1)


def _block_lines(cfg: TrainConfig) -> list[_Row]:
    u, total, plan = cfg.unfreeze, cfg.run.epochs, stage_plan(cfg)
    n = len(plan.names)
    if plan.direction == "all":
        return [_line("stages", f"all {n} trainable throughout", "unfreeze.direction all")]
    if not u.enabled:
        return [_line("stages", f"{plan.start} of {n} trainable throughout", "unfreezing off")]
    rows = []
    if plan.direction == "thaw":
        rows.append(_line("head", "from the start", f"the {n} stages below it frozen"))
    for depth in range(plan.first, n + 1):
        name, i = plan.stage_at(depth), depth - plan.first
        if depth <= plan.start:
            rows.append(_line(name, "active from the start"))
        elif i >= len(u.activate_at):
            rows.append(_line(name, "never joins", "unfreeze.activate_at has no entry for it"))
        elif (at := int(u.activate_at[i])) >= total:
            rows.append(_line(name, _epochs(at + 1, total, total), f"joins after epoch {at}"))
        else:
            # A plateau can bring an activation forward only where min_gap leaves room.
            early = u.plateau_patience > 0 and at > (i + 1) * u.min_gap
            sooner = f", sooner after {_count(u.plateau_patience)} without gain" if early else ""
            blend = f"; head blend {_count(u.head_blend_epochs)}" if _blends(cfg) else ""
            rows.append(
                _line(name, f"joins after epoch {at}", f"trains from epoch {at + 1}{sooner}{blend}")
            )
    return rows


def _blends(cfg: TrainConfig) -> bool:
    """Whether the model fades its classifier's input to a new depth (``head_blend``)."""
    return "head_blend" in capabilities(cfg.model.arch)


def _resize_lines(cfg: TrainConfig) -> list[_Row]:
    """Progressive resizing (``data.resize_schedule``), when on: the sizes and where each
    starts; an independent schedule of its own beside the stages'."""
    schedule, total = cfg.data.resize_schedule, cfg.run.epochs
    if not schedule:
        return []
    return [_line("input size", _epochs(1, total, total), schedule_text(schedule, total))]


def _regularise_lines(cfg: TrainConfig) -> list[_Row]:
    r, d, total = cfg.regularize, cfg.data, cfg.run.epochs
    if r.mixup and r.mixup_alpha > 0:
        end = r.mixup_end_epoch
        after = " (after the run)" if end > total else ""
        what = f"alpha {r.mixup_alpha:g} -> 0 at epoch {end:g}{after}"
        rows = [_line("Mixup", _epochs(1, math.ceil(end), total), what)]
    else:
        rows = [_line("Mixup", "off")]
    if not d.augment:
        rows.append(_line("augmentation", "off"))
    elif not _ramps(d):
        rows.append(_line("augmentation", "no ramp", f"strength {d.aug_strength:g} throughout"))
    else:
        what = f"strength {d.aug_start_strength:g} -> {d.aug_strength:g}"
        rows.append(_line("aug. ramp", _epochs(1, d.aug_ramp_epochs, total), what))
    return rows


def _safety_lines(cfg: TrainConfig, stop_not_before: int | None) -> list[_Row]:
    s, total = cfg.safety, cfg.run.epochs
    if not s.swa:
        rows = [_line("SWA", "off")]
    else:
        averaged = max(0, total - s.swa_start_epoch + 1)
        what = f"{_count(averaged)} averaged" if averaged else ""
        rows = [_line("SWA", _epochs(s.swa_start_epoch, total, total), what)]
    if not s.early_stop:
        rows.append(_line("early stop", "off"))
    else:
        first = 1 if stop_not_before is None else stop_not_before + 1
        patience = f"may stop after {_count(s.patience)} without gain"
        rows.append(_line("early stop", _epochs(first, total, total), patience))
    return rows


def _ramps(d: Any) -> bool:
    """Whether the augmentation strength changes during the run (a ramp from a value to itself,
    as in the cpu preset, is no ramp to show)."""
    return d.aug_ramp_epochs > 0 and d.aug_start_strength != d.aug_strength


def plan_markers(cfg: TrainConfig) -> list[Marker]:
    """The plan's events on the schedule's epoch axis, for :func:`training.schedule.plot_schedule`.

    A block that joins after epoch ``a`` is a line at ``a``; SWA, Mixup and the augmentation ramp
    are spans (SWA averages epochs ``swa_start_epoch``..end, i.e. positions from
    ``swa_start_epoch - 1``). Events after the run are left out.
    """
    total = cfg.run.epochs
    u, r, d, s = cfg.unfreeze, cfg.regularize, cfg.data, cfg.safety
    marks: list[Marker] = []
    plan = stage_plan(cfg)
    if u.enabled and plan.direction != "all":
        for i, at in enumerate(u.activate_at[: plan.joins]):
            if plan.first + i > plan.start and at < total:
                marks.append(Marker(f"{plan.stage_at(plan.first + i)} joins", float(at)))
    if s.swa and s.swa_start_epoch <= total:
        note = f"{_epochs(s.swa_start_epoch, total, total)} averaged"
        marks.append(Marker("SWA", float(s.swa_start_epoch - 1), float(total), note))
    if r.mixup and r.mixup_alpha > 0:
        end = r.mixup_end_epoch
        note = f"alpha {r.mixup_alpha:g} -> 0 at epoch {end:g}"
        marks.append(Marker("Mixup", 0.0, float(min(end, total)), note))
    if d.augment and _ramps(d):
        ramp = d.aug_ramp_epochs
        note = f"strength {d.aug_start_strength:g} -> {d.aug_strength:g}, {_epochs(1, ramp, total)}"
        marks.append(Marker("aug. ramp", 0.0, float(min(ramp, total)), note))
    return marks
