"""Loss functions and class weighting for imbalanced medical datasets.

- :func:`class_weights`: per-class loss weights from class counts, by inverse frequency or by the
  effective number of samples (Cui et al., "Class-Balanced Loss Based on Effective Number of
  Samples", CVPR 2019).
- :func:`soft_target_cross_entropy`: cross-entropy against probability targets (Mixup, label
  smoothing), with optional class weights.
- :func:`focal_cross_entropy` and :class:`FocalLoss`: Lin et al., "Focal Loss for Dense Object
  Detection", ICCV 2017.
- :class:`WeightedCrossEntropy`: the training loss; class weights times a per-class penalty, hard
  or soft targets, focal when ``gamma > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_SCHEMES = ("none", "inverse", "effective")


def class_weights(
    counts: Sequence[int], scheme: str = "effective", beta: float = 0.999
) -> torch.Tensor:
    """Per-class weights, normalised to mean 1 over the classes present.

    Args:
        counts: training images per class.
        scheme: ``"inverse"`` (1 / n_c), ``"effective"`` ((1 - beta) / (1 - beta^n_c)) or
            ``"none"`` (all ones).
        beta: the effective-number hyper-parameter in [0, 1); 0 gives equal weights, values
            towards 1 approach inverse frequency.

    A class with no images gets weight 0 (it never appears as a target).
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"scheme={scheme!r} is invalid; allowed: {', '.join(WEIGHT_SCHEMES)}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta} is invalid; allowed: a number in [0, 1)")
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    if n.ndim != 1 or len(n) == 0 or (n < 0).any():
        raise ValueError(f"counts={list(counts)} is invalid; allowed: non-negative class counts")
    present = n > 0
    w = torch.zeros_like(n)
    if scheme == "none":
        w[present] = 1.0
    elif scheme == "inverse":
        w[present] = 1.0 / n[present]
    else:
        w[present] = (1.0 - beta) / (1.0 - beta ** n[present])
    w[present] = w[present] / w[present].mean()
    return w.float()


def soft_target_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    gamma: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, C) against probability ``targets`` (B, C).

    With ``weight`` (C,), each sample's loss is weighted by its target's expected class weight
    and the mean is taken over those weights, matching ``F.cross_entropy(weight=...)`` for
    one-hot targets. With ``gamma > 0`` each class's term ``-t_c log p_c`` is scaled by
    ``(1 - p_c)^gamma``, so a one-hot target gives the focal loss of :func:`focal_cross_entropy`.
    """
    logp = F.log_softmax(logits.float(), dim=1)  # (B, C)
    terms = -targets * logp  # (B, C)
    if gamma > 0:
        terms = terms * _focal_factor(logp, gamma)
    if weight is None:
        return terms.sum(dim=1).mean()
    w = weight.to(logp)
    per_sample = (terms * w).sum(dim=1)  # (B,)
    norm = (targets * w).sum(dim=1).sum()
    return per_sample.sum() / norm.clamp_min(1e-12)


#: ``1 - p`` is kept at or above this in the focal factor: the gradient of ``x^gamma`` is infinite
#: at ``x = 0`` for ``gamma < 1``, and a saturated softmax (p == 1.0 in float32) would turn it
#: into NaN.
_FOCAL_MIN_BASE = 1e-12


def _focal_factor(logp: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(1 - p)^gamma`` from log-probabilities; ``-expm1(log p)`` keeps ``1 - p`` accurate."""
    return (-torch.expm1(logp)).clamp_min(_FOCAL_MIN_BASE).pow(gamma)


def focal_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Focal loss on hard labels: per-sample cross-entropy times ``(1 - p_t)^gamma``.

    Args:
        logits: (B, C) raw scores.
        target: (B,) class indices.
        gamma: focusing parameter >= 0 (0 gives ``F.cross_entropy``).
        weight: optional per-class weights (C,); the mean is then taken over the targets'
            weights, as ``F.cross_entropy`` does.
        label_smoothing: as in ``F.cross_entropy``, in [0, 1).
    """
    if gamma < 0:
        raise ValueError(f"gamma={gamma} is invalid; allowed: a number >= 0")
    logits = logits.float()
    ce = F.cross_entropy(
        logits, target, weight=weight, reduction="none", label_smoothing=label_smoothing
    )  # (B,)
    logp_t = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)  # (B,)
    loss = _focal_factor(logp_t, gamma) * ce
    if weight is None:
        return loss.mean()
    return loss.sum() / weight[target].sum()


class FocalLoss(nn.Module):
    """Focal loss: cross-entropy scaled by ``(1 - p_t)^gamma`` to focus on hard examples.

    Args:
        gamma: focusing parameter >= 0 (0 gives plain cross-entropy).
        weight: optional per-class weights (C,).
        label_smoothing: as in ``F.cross_entropy``, in [0, 1).
    """

    def __init__(
        self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma={gamma} is invalid; allowed: a number >= 0")
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_cross_entropy(logits, target, self.gamma, self.weight, self.label_smoothing)


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy (or focal loss) on hard labels (B,) or soft targets (B, C), class-weighted.

    The weight of class c is ``base[c] * penalty[c]``: ``base`` is fixed for the run (from the
    class counts, :func:`class_weights`), ``penalty`` may change between epochs (a class penalty
    schedule calls :meth:`set_penalty`). Soft targets (Mixup) go through
    :func:`soft_target_cross_entropy`; with weights, a mixed target's loss is weighted by the
    targets' expected class weight, so it is not exactly ``lam * CE(a) + (1 - lam) * CE(b)``.

    Args:
        num_classes: C.
        base: per-class weights (C,); ``None`` for all ones.
        label_smoothing: applied to hard labels only (soft targets carry their own).
        gamma: focal-loss focusing parameter (Lin et al. 2017) >= 0; 0 is plain cross-entropy.
    """

    def __init__(
        self,
        num_classes: int,
        base: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma={gamma} is invalid; allowed: a number >= 0")
        self.gamma = float(gamma)
        base = torch.ones(num_classes) if base is None else torch.as_tensor(base).float()
        if base.shape != (num_classes,):
            raise ValueError(
                f"base weights have shape {tuple(base.shape)}; allowed: ({num_classes},)"
            )
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("base", base)
        self.register_buffer("penalty", torch.ones(num_classes))

    @property
    def weight(self) -> torch.Tensor:
        """The class weights in use now (C,)."""
        return self.base * self.penalty

    def set_penalty(self, penalty: torch.Tensor | Sequence[float]) -> None:
        """Replace the per-class penalty factors (C,)."""
        value = torch.as_tensor(penalty, dtype=self.penalty.dtype).to(self.penalty.device)
        if value.shape != self.penalty.shape:
            raise ValueError(
                f"penalty has shape {tuple(value.shape)}; allowed: {tuple(self.penalty.shape)}"
            )
        self.penalty.copy_(value)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 2:
            return soft_target_cross_entropy(logits, target, self.weight, self.gamma)
        if self.gamma > 0:
            return focal_cross_entropy(
                logits, target, self.gamma, self.weight, self.label_smoothing
            )
        return F.cross_entropy(
            logits.float(), target, weight=self.weight, label_smoothing=self.label_smoothing
        )
