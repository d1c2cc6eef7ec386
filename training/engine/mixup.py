"""Mixup with an alpha that decays linearly to zero (Zhang et al., "mixup: Beyond Empirical Risk
Minimization", ICLR 2018).

Each batch is replaced by ``lam * x + (1 - lam) * x[perm]`` with targets mixed the same way,
``lam ~ Beta(alpha, alpha)``. Alpha starts at ``start_alpha`` and falls linearly to 0 at
``end_epoch``, so the last epochs train on clean images and the model ends sharp on real data.

Mixup is a training-only transform: the caller applies it to training batches (when
:meth:`Mixup.active` is true) and never to validation or test batches. The soft targets go to
:func:`losses.soft_target_cross_entropy`.

Public API:
    mixup_alpha, Mixup.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mixup_alpha(epoch: float, start_alpha: float, end_epoch: float) -> float:
    """Beta concentration at ``epoch``: ``start_alpha * (1 - epoch / end_epoch)``, floored at 0.

    Args:
        epoch: 0-based training progress in epochs, fractional within an epoch
            (``epoch_index + batch / batches``); must be >= 0.
        start_alpha: alpha at epoch 0, >= 0.
        end_epoch: progress at which alpha reaches 0 (and stays there), > 0.
    """
    if not epoch >= 0:  # also rejects NaN
        raise ValueError(f"epoch={epoch} is invalid; allowed: a number >= 0")
    return max(0.0, start_alpha * (1.0 - epoch / end_epoch))


def _log_gamma_sample(alpha: float, generator: torch.Generator | None) -> float:
    """log of one Gamma(alpha, 1) draw (Marsaglia & Tsang 2000), using only ``generator``.

    torch's own Gamma/Beta samplers take no generator, so they could not be reproduced from
    one. The log keeps Beta draws finite for tiny alphas, where the Gamma draw underflows to 0.
    """
    device = generator.device if generator is not None else "cpu"

    def uniform() -> float:  # in (0, 1], so its log is finite
        return 1.0 - torch.rand((), generator=generator, device=device, dtype=torch.float64).item()

    if alpha < 1.0:
        # Gamma(a) = Gamma(a + 1) * U^(1/a): the boost that keeps the squeeze method valid.
        return _log_gamma_sample(alpha + 1.0, generator) + math.log(uniform()) / alpha
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:  # accepts with probability > 0.95 for every alpha >= 1
        z = torch.randn((), generator=generator, device=device, dtype=torch.float64).item()
        v = (1.0 + c * z) ** 3
        if v > 0 and math.log(uniform()) < 0.5 * z * z + d - d * v + d * math.log(v):
            return math.log(d * v)


def sample_beta(alpha: float, generator: torch.Generator | None = None) -> float:
    """One draw of Beta(alpha, alpha) as ``G1 / (G1 + G2)`` with Gamma(alpha) draws G1, G2."""
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} is invalid; allowed: a number > 0")
    log_g1 = _log_gamma_sample(alpha, generator)
    log_g2 = _log_gamma_sample(alpha, generator)
    # G1 / (G1 + G2) = sigmoid(log G1 - log G2), finite even when both draws underflow.
    return 1.0 / (1.0 + math.exp(min(700.0, log_g2 - log_g1)))


class Mixup:
    """Mixes training batches and their one-hot targets, with alpha decaying linearly to 0.

    Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.

    Args:
        num_classes: number of classes C (>= 2), the width of the targets.
        start_alpha: Beta(alpha, alpha) concentration at epoch 0, >= 0 (0 never mixes).
        end_epoch: progress in epochs at which alpha reaches 0, > 0.
        label_smoothing: eps in [0, 1); each one-hot becomes ``(1 - eps) * onehot + eps / C``,
            as in ``F.cross_entropy(label_smoothing=eps)``.
        enabled: False turns mixing off (targets are still one-hot/smoothed).
        generator: draws lam and the permutation; give a seeded one for reproducible runs.
            None uses torch's global RNG.

    Apply it to training batches only; evaluation uses the plain images and labels.
    """

    def __init__(
        self,
        num_classes: int,
        start_alpha: float = 0.4,
        end_epoch: float = 15.0,
        label_smoothing: float = 0.0,
        enabled: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} is invalid; allowed: an int >= 2")
        if not (math.isfinite(start_alpha) and start_alpha >= 0):
            raise ValueError(f"start_alpha={start_alpha} is invalid; allowed: a number >= 0")
        if not (math.isfinite(end_epoch) and end_epoch > 0):
            raise ValueError(f"end_epoch={end_epoch} is invalid; allowed: a number > 0")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing={label_smoothing} is invalid; allowed: a number in [0, 1)"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator={generator!r} is invalid; allowed: a torch.Generator or None"
            )
        self.num_classes = num_classes
        self.start_alpha = float(start_alpha)
        self.end_epoch = float(end_epoch)
        self.label_smoothing = float(label_smoothing)
        self.enabled = bool(enabled)
        self.generator = generator

    def alpha_at(self, epoch: float) -> float:
        """The Beta concentration at ``epoch`` (0-based, fractional), ignoring ``enabled``."""
        return mixup_alpha(epoch, self.start_alpha, self.end_epoch)

    def active(self, epoch: float) -> bool:
        """Whether a batch at ``epoch`` gets mixed."""
        return self.enabled and self.alpha_at(epoch) > 0

    def one_hot(self, y: torch.Tensor) -> torch.Tensor:
        """Label-smoothed one-hot targets (B, C), float32 on ``y``'s device."""
        eps = self.label_smoothing
        return F.one_hot(y, self.num_classes).float() * (1.0 - eps) + eps / self.num_classes

    def sample(self, batch_size: int, epoch: float) -> tuple[float, torch.Tensor | None]:
        """Draw ``(lam, perm)`` for one batch; ``(1.0, None)`` when not :meth:`active`.

        ``perm`` is a CPU permutation of ``range(batch_size)``.
        """
        if not self.active(epoch):
            return 1.0, None
        lam = sample_beta(self.alpha_at(epoch), self.generator)
        device = self.generator.device if self.generator is not None else "cpu"
        perm = torch.randperm(batch_size, generator=self.generator, device=device).cpu()
        return lam, perm

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, epoch: float
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Mix a training batch.

        Args:
            x: images (B, ...), floating point, on any device.
            y: class indices (B,).
            epoch: 0-based progress in epochs (``epoch_index + batch / batches``).

        Returns:
            ``(x_mixed, targets, lam)``: ``x_mixed = lam * x + (1 - lam) * x[perm]``, targets
            (B, C) float32 on ``x``'s device whose rows sum to 1, and lam in [0, 1]. When not
            active, ``x`` itself, the (smoothed) one-hots and ``lam = 1.0``.
        """
        if not x.is_floating_point():
            raise ValueError(f"x has dtype {x.dtype}; allowed: a floating-point tensor")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"y has shape {tuple(y.shape)}; allowed: ({x.shape[0]},), one label per image"
            )
        targets = self.one_hot(y.to(x.device))  # (B, C)
        lam, perm = self.sample(x.shape[0], epoch)
        if perm is None:
            return x, targets, lam
        perm = perm.to(x.device)
        x_mixed = lam * x + (1.0 - lam) * x[perm]
        return x_mixed, lam * targets + (1.0 - lam) * targets[perm], lam

    def state_dict(self) -> dict:
        state: dict = {"enabled": self.enabled}
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.enabled = bool(state["enabled"])
        # Without a generator of its own, mixup draws from the global RNG, which the
        # checkpoint restores elsewhere; a saved generator state then has nowhere to go.
        if self.generator is not None and state.get("generator_state") is not None:
            self.generator.set_state(state["generator_state"])
