"""The staged-model contract: what the training engine may know about a network.

A staged model is a backbone cut into ``num_stages`` stages, numbered 1 (next to the input) to
``num_stages`` (next to the head), plus a classifier head. Progressive unfreezing makes stages
trainable a few at a time; everything else is frozen: no gradients, and in eval mode, so that a
frozen stage's BatchNorm keeps its running statistics and its dropout is off (a frozen stage of a
pretrained network is a fixed feature extractor, as in fastai's ``freeze_to`` with
``train_bn=False``).

The engine talks to a model only through :class:`StagedModel`: the stage split and its
parameters, the head, :meth:`~StagedModel.set_trainable`, and the capabilities a model declares
rather than the engine assuming them:

- ``partial_depth``: the forward pass runs only the stages that are trainable, so the network
  grows stage by stage (the engine then only unfreezes in the ``grow`` direction);
- ``head_blend``: :meth:`~StagedModel.set_head_mix` fades the classifier's input from the
  previous depth's features to the new depth's;
- ``dropout``: :meth:`~StagedModel.dropout_rates` and :meth:`~StagedModel.set_dropout` move one
  dropout rate per stage (dynamic dropout).

Directions of unfreezing (:func:`trainable_at`): ``grow`` makes stages 1..d trainable at depth
``d`` (shallow first); ``thaw`` makes the ``d`` deepest stages trainable (head first, then
downwards, the recipe for a pretrained backbone); ``all`` makes every stage trainable at once.

Public API:
    StagedModel, DIRECTIONS, CAPABILITIES, MIN_CLASSES, InputTooSmall, trainable_at, start_depth,
    stage_summary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

DIRECTIONS: tuple[str, ...] = ("grow", "thaw", "all")
#: A classifier separates at least two classes (one class leaves nothing to learn).
MIN_CLASSES = 2


class InputTooSmall(ValueError):
    """Images smaller than a model takes.

    Args:
        message: the model's own one-line message.
        minimum: the least square side in pixels the model takes as configured.
        remedy: the settings that would lower the minimum, for the user (e.g.
            ``"model.block_strides"``).
    """

    def __init__(self, message: str, minimum: int, remedy: str) -> None:
        super().__init__(message)
        self.minimum = minimum
        self.remedy = remedy


CAPABILITIES: tuple[str, ...] = ("partial_depth", "head_blend", "dropout")


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        allowed = " | ".join(map(repr, DIRECTIONS))
        raise ValueError(f"direction={direction!r} is invalid; allowed: {allowed}")


def trainable_at(direction: str, depth: int, num_stages: int) -> frozenset[int]:
    """The stages trainable at ``depth`` (how many stages have joined) in ``direction``.

    ``grow``: stages ``1..depth``; ``thaw``: the ``depth`` deepest stages; ``all``: every stage
    whatever the depth.
    """
    _check_direction(direction)
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= num_stages:
        raise ValueError(f"depth={depth!r} is invalid; allowed: an int in 0..{num_stages}")
    if direction == "all":
        return frozenset(range(1, num_stages + 1))
    if direction == "grow":
        return frozenset(range(1, depth + 1))
    return frozenset(range(num_stages - depth + 1, num_stages + 1))


def start_depth(direction: str, num_stages: int) -> int:
    """Where a run starts: one stage to grow from, only the head to thaw from, or everything."""
    _check_direction(direction)
    return {"grow": 1, "thaw": 0, "all": num_stages}[direction]


class StagedModel(nn.Module):
    """Base class of every network the engine trains.

    Subclasses build their layers, then call :meth:`set_trainable` once, and implement
    :meth:`stage_modules`, :meth:`head_module`, :attr:`stage_names`, :meth:`record` and the
    attributes ``in_channels``, ``num_classes`` and ``min_input_size``. They may override
    :meth:`stage_parameters` when a stage owns parameters outside its module (a per-stage head),
    and declare ``capabilities`` with the methods that go with them.

    Class attributes:
        arch: the registry name the model is built under (``"basic_cnn"``, ``"resnet18"``, ...).
        capabilities: a subset of :data:`CAPABILITIES`.
    """

    arch: str = ""
    capabilities: frozenset[str] = frozenset()
    in_channels: int
    num_classes: int
    min_input_size: int

    def __init__(self) -> None:
        super().__init__()
        self._trainable: frozenset[int] = frozenset()

    # ----------------------------------------------------------------- what subclasses define

    def stage_modules(self) -> Sequence[nn.Module]:
        """The modules of stages 1..num_stages, shallow to deep."""
        raise NotImplementedError

    def head_module(self) -> nn.Module:
        """The classifier head (always trainable)."""
        raise NotImplementedError

    @property
    def stage_names(self) -> tuple[str, ...]:
        """One short name per stage, used for parameter groups and the console."""
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """What rebuilds this model: ``{"arch": ..., "options": {...}}`` plus the stage names.

        Stored in every checkpoint; :func:`models.registry.build_from_record` takes it back.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------- the stage split

    @property
    def num_stages(self) -> int:
        return len(self.stage_modules())

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """The parameters stage ``stage`` (1-based) brings to an optimizer when it joins."""
        return list(self.stage_modules()[self._check_stage(stage) - 1].parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head_module().parameters())

    def _check_stage(self, stage: object) -> int:
        n = self.num_stages
        if not isinstance(stage, int) or isinstance(stage, bool) or not 1 <= stage <= n:
            raise ValueError(f"stage={stage!r} is invalid; allowed: an int in 1..{n}")
        return stage

    # ----------------------------------------------------------------- freezing

    @property
    def trainable_stages(self) -> frozenset[int]:
        return self._trainable

    @property
    def forward_stages(self) -> int:
        """How many stages, from stage 1, the forward pass runs (all, unless partial depth)."""
        if "partial_depth" in self.capabilities:
            return max(self._trainable, default=0)
        return self.num_stages

    def set_trainable(self, stages: Iterable[int]) -> None:
        """Make exactly ``stages`` (and the head) trainable; freeze the rest.

        A frozen stage gets ``requires_grad=False`` and stays in eval mode through
        ``model.train()``, so its BatchNorm statistics do not drift and its dropout is off.
        A model with ``partial_depth`` only accepts ``1..k``.
        """
        chosen = frozenset(self._check_stage(s) for s in stages)
        if "partial_depth" in self.capabilities and chosen != frozenset(range(1, len(chosen) + 1)):
            raise ValueError(
                f"{type(self).__name__} grows from stage 1: trainable stages {sorted(chosen)} are"
                f" invalid; allowed: 1..k with k in 1..{self.num_stages}"
            )
        for index, module in enumerate(self.stage_modules(), start=1):
            module.requires_grad_(index in chosen)
        self.head_module().requires_grad_(True)
        self._trainable = chosen
        self.train(self.training)

    def train(self, mode: bool = True) -> StagedModel:
        super().train(mode)
        if mode:
            for index, module in enumerate(self.stage_modules(), start=1):
                if index not in self._trainable:
                    module.eval()
        return self

    # ----------------------------------------------------------------- optional capabilities

    @property
    def head_mix(self) -> float:
        """Weight of the deepest features in the classifier's input (1 without ``head_blend``)."""
        return 1.0

    def set_head_mix(self, mix: float) -> None:
        if mix != 1.0:
            raise ValueError(f"{type(self).__name__} has no head blend: mix={mix!r}; allowed: 1")

    def dropout_rates(self) -> list[float]:
        """One rate per stage with ``dropout``; empty otherwise."""
        return []

    def set_dropout(self, stage: int, p: float) -> None:
        raise ValueError(f"{type(self).__name__} has no dropout that a run can move")


def stage_summary(model: StagedModel) -> list[dict[str, Any]]:
    """One row per stage and one for the head: ``name``, ``params``, ``trainable`` (counts) and
    ``active`` (trainable now; the head always is). Parameters in no stage and not in the head
    (none in the registered models) get a row ``other``, so the rows add up to the model."""
    rows, seen = [], set()

    def row(name: str, params: list, active: bool) -> None:
        seen.update(id(p) for p in params)
        rows.append(
            {
                "name": name,
                "params": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "active": active,
            }
        )

    for stage, name in enumerate(model.stage_names, start=1):
        row(name, model.stage_parameters(stage), stage in model.trainable_stages)
    row("head", model.head_parameters(), True)
    other = [p for p in model.parameters() if id(p) not in seen]
    if other:
        row("other", other, any(p.requires_grad for p in other))
    return rows
