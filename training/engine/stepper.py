"""One object that owns autocast, loss scaling, clipping, accumulation and the step count.

The training loop runs ``with stepper.autocast(): loss = ...`` and then
``stepped = stepper.backward(loss, group_size=sizes[b])``; everything between the loss and the
optimizer update happens here, so no feature has to know whether AMP or accumulation is on.

Public API:
    GradStepper, group_size, group_sizes, steps_per_epoch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn


class _Steppable(Protocol):
    def step(self) -> Any: ...


def _check_positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an int >= 1")
    return value


def steps_per_epoch(num_batches: int, accumulation: int) -> int:
    """Optimizer steps in an epoch of ``num_batches`` micro-batches: ceil(batches / accum)."""
    _check_positive_int("num_batches", num_batches)
    _check_positive_int("accumulation", accumulation)
    return math.ceil(num_batches / accumulation)


def group_size(batch: int, num_batches: int, accumulation: int) -> int:
    """Size of the accumulation group that holds micro-batch ``batch`` (0-based).

    Groups are ``accumulation`` micro-batches long, except the last one of the epoch, which
    holds what is left (10 batches, accumulation 4: 4, 4, 2).
    """
    _check_positive_int("num_batches", num_batches)
    _check_positive_int("accumulation", accumulation)
    if not isinstance(batch, int) or not 0 <= batch < num_batches:
        raise ValueError(f"batch={batch!r} is invalid; allowed: an int in 0..{num_batches - 1}")
    start = batch - batch % accumulation
    return min(accumulation, num_batches - start)


def group_sizes(num_batches: int, accumulation: int) -> list[int]:
    """:func:`group_size` for every batch of the epoch (10, 4 -> [4]*8 + [2]*2)."""
    _check_positive_int("num_batches", num_batches)
    return [group_size(b, num_batches, accumulation) for b in range(num_batches)]


class GradStepper:
    """Autocast, GradScaler, gradient accumulation, clipping and the optimizer step in one place.

    Each micro-batch's mean loss is divided by the size of its accumulation group, so a group of
    ``n`` micro-batches produces the gradient of the mean over all its samples (for equal-sized
    micro-batches), the same as one big batch. A GradScaler is used only for float16 on CUDA;
    bfloat16 has fp32's exponent range and needs no scaling. The optimizer's gradients are
    cleared on construction so the first group starts from zero.

    Args:
        optimizer: the optimizer to step.
        device: the training device (decides the autocast device type and the scaler).
        amp_dtype: ``torch.float16``, ``torch.bfloat16`` or ``None`` (no autocast).
        accumulation: micro-batches per optimizer step, >= 1.
        clip_grad: max total L2 norm of the gradients; 0 turns clipping off.
        scheduler: anything with ``.step()``; stepped once per optimizer step.

    Attributes:
        step: optimizer steps taken (kept across :meth:`load_state_dict`).
        last_grad_norm: total gradient norm (after unscaling, before clipping) of the last
            optimizer step, or ``None`` before the first; read lazily to avoid a device sync.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        accumulation: int = 1,
        clip_grad: float = 0.0,
        scheduler: _Steppable | None = None,
    ) -> None:
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(
                f"amp_dtype={amp_dtype!r} is invalid; allowed: None | torch.float16 | "
                "torch.bfloat16"
            )
        self.accumulation = _check_positive_int("accumulation", accumulation)
        if not isinstance(clip_grad, (int, float)) or not (0 <= clip_grad < math.inf):
            raise ValueError(f"clip_grad={clip_grad!r} is invalid; allowed: a finite number >= 0")
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.clip_grad = float(clip_grad)
        self.scheduler = scheduler
        use_scaler = amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.step = 0
        self._pending = 0  # micro-batches backwarded in the current group
        self._group = 0  # size of the current group, fixed by its first micro-batch
        self._grad_norm: torch.Tensor | None = None
        self.optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------- forward

    def autocast(self) -> AbstractContextManager[Any]:
        """Context for the forward pass and the loss: autocast when amp_dtype is set."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ----------------------------------------------------------------- backward and step

    @property
    def pending(self) -> int:
        """Micro-batches backwarded since the last optimizer step."""
        return self._pending

    @property
    def last_grad_norm(self) -> float | None:
        return None if self._grad_norm is None else float(self._grad_norm)

    def backward(self, loss: torch.Tensor, *, group_size: int) -> bool:
        """Backward the mean ``loss`` of one micro-batch; step when its group is complete.

        Args:
            loss: the scalar mean loss of the micro-batch.
            group_size: micro-batches in this batch's accumulation group (1..accumulation);
                the last group of an epoch may be smaller, see :func:`group_sizes`.

        Returns:
            True when this call completed the group and the optimizer stepped.
        """
        self._start_or_continue_group(group_size)
        self.scaler.scale(loss / group_size).backward()
        self._pending += 1
        if self._pending < self._group:
            return False
        self._optimizer_step()
        return True

    def _start_or_continue_group(self, size: int) -> None:
        is_int = isinstance(size, int) and not isinstance(size, bool)
        if not is_int or not 1 <= size <= self.accumulation:
            raise ValueError(
                f"group_size={size!r} is invalid; allowed: an int in 1..{self.accumulation}"
            )
        if self._pending == 0:
            self._group = size
        elif size != self._group:
            # Mixing sizes inside one group would weight its micro-batches unequally.
            raise ValueError(
                f"group_size={size} differs from {self._group}, the size this group started "
                f"with ({self._pending} micro-batch(es) in); pass the same size for every batch "
                "of a group"
            )

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)  # no-op without a scaler; clipping needs true grads
        self._grad_norm = self._clip_or_measure()
        self.scaler.step(self.optimizer)  # skips the step when fp16 grads overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self._pending = 0
        self._group = 0

    def _params_with_grad(self) -> Iterator[nn.Parameter]:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p

    def _clip_or_measure(self) -> torch.Tensor | None:
        params = list(self._params_with_grad())
        if not params:
            return None
        if self.clip_grad > 0:
            return nn.utils.clip_grad_norm_(params, self.clip_grad).detach()
        return nn.utils.get_total_norm([p.grad for p in params]).detach()

    def reset(self) -> None:
        """Drop the gradients of an unfinished group (e.g. after a rollback)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = 0
        self._group = 0

    # ----------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """Step count and GradScaler state; take it between groups (``pending == 0``)."""
        return {"step": self.step, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a scaler state from a run without a scaler is ignored."""
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"stepper state 'step'={step!r} is invalid; allowed: an int >= 0")
        self.step = step
        scaler_state = state.get("scaler") or {}
        # An enabled scaler refuses an empty state; a disabled one has nothing to restore.
        if self.scaler.is_enabled() and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        self.reset()
