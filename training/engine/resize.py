"""Progressive resizing: train on smaller images early in the run, at the full size at the end.

``data.resize_schedule`` is a list of ``[start, size]`` pairs: from the fraction ``start`` of
the run on, training batches are resized to ``size`` px (fastai's progressive resizing, as in
Howard's DAWNBench entries). The images come from the one cache of the final size and are
downscaled per batch on the device, before Mixup. Each epoch's validation is resized to the
size that epoch trained at, so the decisions validation drives compare like with like; the
temperature fit, the test and SWA's BatchNorm update read the cache's full-size images, so the
model is calibrated and judged (and its BatchNorm statistics recomputed) at the size it will be
used at.

The size is a pure function of the position in the run (:func:`size_at`), so a resumed run
resizes exactly as an uninterrupted one and nothing is checkpointed.

Public API:
    size_at, schedule_problem, check_against_model, schedule_text, swa_note,
    ProgressiveResize.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from training.engine.events import Callback

Schedule = Sequence[Sequence[float]]


def size_at(schedule: Schedule, progress: float) -> int:
    """The training image size at ``progress``, the fraction of the run done (0 at the start,
    1 at the end): the size of the last pair whose start is <= ``progress``.

    A boundary belongs to the pair that starts there (at exactly 0.4 of ``[[0, 32], [0.4,
    48]]`` the size is 48). ``schedule`` must be non-empty and start at 0
    (:func:`schedule_problem`).
    """
    size = schedule[0][1]
    for start, pair_size in schedule:
        if progress < start:
            break
        size = pair_size
    return int(size)


def schedule_problem(schedule: Schedule) -> str | None:
    """What is wrong with ``schedule`` in words (for ``data.resize_schedule=... is invalid;
    allowed: ...``), or None when it is usable. The sizes' relation to the images and the model
    is checked once they are known (:func:`check_against_model`)."""
    if not schedule:
        return None
    if any(len(pair) != 2 for pair in schedule):
        return "[] (off) or a list of [start, size] pairs"
    starts = [float(p[0]) for p in schedule]
    sizes = [float(p[1]) for p in schedule]
    if starts[0] != 0:
        return f"[start, size] pairs whose first start is 0 (got {starts[0]:g})"
    if any(not 0 <= s < 1 for s in starts):
        return "[start, size] pairs with each start a fraction of the run in [0, 1)"
    if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        return "[start, size] pairs with strictly increasing starts"
    if any(not s.is_integer() or s < 1 for s in sizes):
        return "[start, size] pairs with each size a whole number of px >= 1"
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
        return "[start, size] pairs with strictly increasing sizes (small images first)"
    return None


def check_against_model(schedule: Schedule, image_size: int, min_size: int) -> str | None:
    """The one-line refusal of a schedule that the images or the model cannot follow, or None.

    The last size must be the cache's image size (training ends at the size the model is
    validated and used at; the cache holds no larger images), and the smallest must be at least
    the model's minimum input size (``min_size``, from its strides and stem as built for
    ``image_size``).
    """
    if not schedule:
        return None
    sizes = [int(p[1]) for p in schedule]
    shown = [[f"{p[0]:g}", int(p[1])] for p in schedule]
    shown_text = "[" + ", ".join(f"[{a}, {b}]" for a, b in shown) + "]"
    if sizes[-1] != image_size:
        return (
            f"data.resize_schedule={shown_text} is invalid; allowed: a last size equal to the"
            f" images' size, {image_size} px (got {sizes[-1]}): the cache holds {image_size} px"
            " images and validation runs at that size"
        )
    if sizes[0] < min_size:
        return (
            f"data.resize_schedule={shown_text} is invalid; allowed: sizes >= {min_size} px, the"
            f" model's minimum input size as configured for {image_size} px images (got"
            f" {sizes[0]})"
        )
    return None


def _first_epoch(start: float, epochs: int) -> str:
    """The epoch in which a pair starting at the fraction ``start`` takes over, for messages."""
    position = start * epochs
    epoch = math.floor(position) + 1
    return f"epoch {epoch}" if position.is_integer() else f"mid-epoch {epoch}"


def schedule_text(schedule: Schedule, epochs: int) -> str:
    """The schedule in words for the plan: ``32 px, 48 px from epoch 13 (40%), ...``."""
    parts = [f"{int(schedule[0][1])} px"]
    parts += [
        f"{int(size)} px from {_first_epoch(start, epochs)} ({start:.0%})"
        for start, size in schedule[1:]
    ]
    return ", ".join(parts) + "; validation, test and SWA's BatchNorm at the last size"


def swa_note(schedule: Schedule, epochs: int, swa_start_epoch: int) -> str | None:
    """A warning when SWA averages weights of epochs trained below the final size, or None.

    SWA's BatchNorm update runs at the final size, so swa.pt's statistics fit the images it
    will see; the averaged weights, though, then include epochs trained on smaller images.
    """
    if not schedule or len(schedule) < 2:
        return None
    start, size = schedule[-1]
    if swa_start_epoch - 1 >= start * epochs or swa_start_epoch > epochs:
        return None  # the first averaged epoch trains at the final size throughout
    return (
        f"SWA averages epochs {swa_start_epoch}-{epochs}, but training reaches the final size"
        f" ({int(size)} px) only at {_first_epoch(start, epochs)}: the average mixes weights"
        f" trained on smaller images (its BatchNorm statistics are still recomputed at"
        f" {int(size)} px); set safety.swa_start_epoch >= {math.ceil(start * epochs) + 1} to"
        " average final-size epochs only"
    )


class ProgressiveResize(Callback):
    """Resizes training batches along the schedule (and each epoch's validation batches to the
    size the epoch ended at: the trainer calls it with that position); as a callback it logs the
    size.

    Call it on a batch with the position in epochs (``epoch - 1 + b / n``). It records the
    epoch's input size in the metrics (``input_size``: the size of the epoch's last batch) and
    announces each change of size.

    Args:
        schedule: the ``data.resize_schedule`` pairs (checked).
        epochs: ``run.epochs``, to turn positions in epochs into fractions of the run.
        batches_per_epoch: training batches per epoch, to know an epoch's last batch.
    """

    name = "resize"

    def __init__(self, schedule: Schedule, epochs: int, batches_per_epoch: int) -> None:
        self.schedule = [(float(a), int(b)) for a, b in schedule]
        self.epochs = epochs
        self.batches_per_epoch = batches_per_epoch

    def size_at_epoch(self, position: float) -> int:
        """The size at ``position`` epochs into the run."""
        return size_at(self.schedule, position / self.epochs)

    def __call__(self, x: torch.Tensor, position: float) -> torch.Tensor:
        """``x`` (B, C, H, W) resized so that its height is the scheduled size (the width
        keeps the aspect ratio); returned unchanged at its own size."""
        size = self.size_at_epoch(position)
        h, w = x.shape[-2:]
        if size == h:
            return x
        # Bilinear with antialias: downscaling by plain bilinear interpolation samples only
        # the 2x2 pixels nearest each output point and aliases fine texture (cell edges,
        # chromatin) into moire; the antialiased filter widens to the scale factor, an area
        # average like the one a resized image file gets. Interpolation is a weighted mean
        # (weights sum to 1), so resizing normalised values equals normalising resized ones.
        target = (size, max(1, round(w * size / h)))
        return F.interpolate(x, target, mode="bilinear", antialias=True, align_corners=False)

    def on_batch_end(self, trainer: Any, batch: int, loss: float, stepped: bool) -> None:
        n, epoch = self.batches_per_epoch, trainer.epoch
        if epoch == 1 and batch == 0:
            return  # the first size is in the plan
        # The previous batch's position written as the trainer writes it (epoch - 1 + b / n):
        # subtracting 1 / n instead can land a hair below a boundary and announce it twice.
        previous = epoch - 1 + (batch - 1) / n if batch else epoch - 2 + (n - 1) / n
        before, now = self.size_at_epoch(previous), self.size_at_epoch(epoch - 1 + batch / n)
        if now != before:
            trainer.notify(
                "resize",
                f"INPUT SIZE {before} -> {now} px",
                [f"epoch {trainer.epoch}, batch {batch + 1}: training batches are now {now} px"],
            )

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        n = self.batches_per_epoch
        metrics["input_size"] = self.size_at_epoch(metrics["epoch"] - 1 + (n - 1) / n)
