"""Albumentations pipelines: normalisation for evaluation, augmentation for training.

The training pipeline takes a ``strength`` in [0, 1] that scales the magnitude and probability of
every transform that interpolates or changes intensities, so a schedule can start gentle and ramp
up; flips (and, for colour, right-angle rotations) lose no information and stay at p = 0.5 whenever
the strength is above 0. :func:`augment_strength` gives the strength of an
epoch and :class:`StrengthRamp` holds that schedule as a picklable value. Which transforms are
used depends on the modality, read from the channel count: colour microscopy (3 channels) is
rotation- and flip-invariant and varies in stain colour; greyscale MRI slices keep their up-down
orientation and vary in contrast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
from albumentations.pytorch import ToTensorV2


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """uint8 HWC -> normalised float32 CHW tensor; no randomness."""
    return A.Compose(
        [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    )


def train_transform(
    mean: Sequence[float], std: Sequence[float], channels: int, strength: float = 1.0
) -> A.Compose:
    """Augmentation for training, then the same normalisation as :func:`eval_transform`.

    Args:
        mean, std: per-channel statistics of the training split (0..1 scale).
        channels: 3 selects the colour-microscopy set, 1 the greyscale (MRI) set.
        strength: 0 gives no augmentation, 1 the full set; values between scale every
            transform but the flips and right-angle rotations, which keep p = 0.5.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    s = strength
    ops: list[A.BasicTransform] = []
    if s > 0:
        ops.append(A.HorizontalFlip(p=0.5))
        if channels == 3:
            # Cells on a slide have no up or down: every right-angle rotation is a valid view.
            ops += [A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
        ops.append(
            A.Affine(
                scale=(1 - 0.1 * s, 1 + 0.1 * s),
                translate_percent=(-0.06 * s, 0.06 * s),
                rotate=(-15 * s, 15 * s),
                border_mode=0,
                p=0.7 * s,
            )
        )
        ops.append(
            A.RandomBrightnessContrast(
                brightness_limit=0.15 * s, contrast_limit=0.15 * s, p=0.5 * s
            )
        )
        if channels == 3:
            # Stain intensity and hue differ between slides and labs.
            ops.append(
                A.HueSaturationValue(
                    hue_shift_limit=int(6 * s),
                    sat_shift_limit=int(12 * s),
                    val_shift_limit=0,
                    p=0.4 * s,
                )
            )
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)


# --------------------------------------------------------------------------- strength schedule


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def augment_strength(epoch: int, start: float, final: float, ramp_epochs: int) -> float:
    """Augmentation strength of an epoch: ``start`` at epoch 1, rising linearly to ``final``.

    Epoch ``1 + ramp_epochs`` and every later one get ``final``; ``ramp_epochs=0`` gives
    ``final`` from the start. ``start`` may also be above ``final`` (a falling ramp).

    Args:
        epoch: the epoch, counted from 1.
        start: strength at epoch 1, in [0, 1].
        final: strength once the ramp is over, in [0, 1].
        ramp_epochs: epochs the ramp takes, an int >= 0.
    """
    if not _is_int(epoch) or epoch < 1:
        raise ValueError(f"epoch={epoch!r} is invalid; allowed: an int >= 1")
    for name, value in (("start", start), ("final", final)):
        if not _is_real(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} strength={value!r} is invalid; allowed: a number in [0, 1]")
    if not _is_int(ramp_epochs) or ramp_epochs < 0:
        raise ValueError(f"ramp_epochs={ramp_epochs!r} is invalid; allowed: an int >= 0")
    if epoch >= 1 + ramp_epochs:
        return float(final)
    fraction = (epoch - 1) / ramp_epochs
    return float(start + (final - start) * fraction)


@dataclass(frozen=True)
class StrengthRamp:
    """The strength schedule of :func:`augment_strength` as a picklable value.

    Args:
        start: strength at epoch 1, in [0, 1].
        final: strength from epoch ``1 + ramp_epochs`` on, in [0, 1].
        ramp_epochs: epochs of the linear ramp, an int >= 0 (0 = ``final`` throughout).
    """

    start: float
    final: float
    ramp_epochs: int

    def __post_init__(self) -> None:
        augment_strength(1, self.start, self.final, self.ramp_epochs)  # validates the fields

    def __call__(self, epoch: int) -> float:
        """Strength of ``epoch`` (counted from 1)."""
        return augment_strength(epoch, self.start, self.final, self.ramp_epochs)
