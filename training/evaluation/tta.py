"""Test-time augmentation: average a model's logits over flipped and rotated copies of a batch.

The views are exact symmetries of the pixel grid (flips and right-angle rotations), so no
interpolation is involved. The modes:

* ``"none"``: the batch as it is (one forward pass).
* ``"hflip"``: the batch and its left-right mirror (2 passes).
* ``"d4"``: the eight symmetries of the square, the four right-angle rotations with and without
  a mirror (8 passes).
* ``"auto"``: the views the training augmentation of :mod:`dataset.transforms` itself draws:
  ``"d4"`` for colour (3-channel) microscopy, which trains with both flips and right-angle
  rotations, ``"hflip"`` for greyscale scans, which keep their up-down orientation.

Logits, not probabilities, are averaged, so a temperature divides the averaged logits exactly as
it divides a single pass's, and :mod:`training.calibration` applies unchanged.

Public API:
    TTA_MODES, resolve_tta, resolve_tta_for_images, tta_views, tta_logits.
"""

from __future__ import annotations

import torch
from torch import nn

TTA_MODES: tuple[str, ...] = ("none", "hflip", "d4", "auto")


def resolve_tta(mode: str, channels: int) -> str:
    """The concrete mode (``"none"``, ``"hflip"`` or ``"d4"``) for images with ``channels``.

    Raises:
        ValueError: when ``mode`` is not one of :data:`TTA_MODES`, or ``"auto"`` meets a channel
            count other than 1 or 3.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"tta={mode!r} is invalid; allowed: {' | '.join(TTA_MODES)}")
    if mode != "auto":
        return mode
    if channels == 3:
        return "d4"
    if channels == 1:
        return "hflip"
    raise ValueError(f"tta='auto' needs 1- or 3-channel images; these have {channels}")


def resolve_tta_for_images(mode: str, image_shape: tuple[int, ...]) -> str:
    """:func:`resolve_tta` for images of ``image_shape`` ``(H, W, C)``, checked before a run.

    Raises:
        ValueError: as :func:`resolve_tta`, or when the mode is ``"d4"`` and the images are not
            square (a quarter turn would change their shape).
    """
    height, width, channels = image_shape
    resolved = resolve_tta(mode, channels)
    if resolved == "d4" and height != width:
        shown = mode if mode == "d4" else f"{mode} (d4 for {channels}-channel images)"
        raise ValueError(
            f"tta={shown} needs square images; these are {height}x{width}; use hflip or none"
        )
    return resolved


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a ``(B, C, H, W)`` batch that ``mode`` averages over (the batch first).

    ``"auto"`` is resolved from ``C``. ``"d4"`` needs square images: a quarter turn of a
    non-square image has another shape.

    Raises:
        ValueError: on an unknown mode, a tensor that is not 4-d, or ``"d4"`` on non-square images.
    """
    if x.ndim != 4:
        raise ValueError(
            f"tta_views: input shape {tuple(x.shape)} is invalid; expected (B, C, H, W)"
        )
    mode = resolve_tta(mode, x.shape[1])
    if mode == "none":
        return [x]
    if mode == "hflip":
        return [x, x.flip(3)]
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"tta='d4' needs square images; these are {x.shape[2]}x{x.shape[3]}")
    views = []
    for quarter_turns in range(4):
        turned = torch.rot90(x, quarter_turns, dims=(2, 3))
        views += [turned, turned.flip(3)]
    return views


def tta_logits(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean of ``model``'s logits over :func:`tta_views`; ``(B, C, H, W)`` -> ``(B, classes)``.

    With ``"none"`` this is exactly ``model(x)``. The model is called once per view, so the
    batch size (and memory) of each call is that of ``x``. Call it in eval mode, as
    :func:`training.evaluate.predict` does: in training mode BatchNorm would normalise each view
    by its own statistics, and fails outright on a batch of one image.
    """
    views = tta_views(x, mode)
    if len(views) == 1:
        return model(x)
    total = model(views[0]).float()
    for view in views[1:]:
        total = total + model(view).float()
    return total / len(views)
