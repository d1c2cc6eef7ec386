"""Stochastic weight averaging (Izmailov et al. 2018) as a callback.

The average runs over the epochs from ``safety.swa_start_epoch``; at the end of the run its
BatchNorm statistics are recomputed on the training set (``update_bn``, on fixed seeds) and it is
saved as ``checkpoints/swa.pt``. A Ctrl-C there stops the end phase; a resume redoes it.

Public API:
    StochasticWeightAveraging.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel, update_bn

from training.engine.events import Callback


class StochasticWeightAveraging(Callback):
    """SWA (Izmailov et al. 2018) with :class:`torch.optim.swa_utils.AveragedModel`.

    From ``start_epoch`` on, each epoch's final weights enter the average. At the end of a run
    that was not interrupted, the BatchNorm statistics of the average are recomputed with
    :func:`~torch.optim.swa_utils.update_bn` on the training data and the weights are saved as
    ``checkpoints/swa.pt``. The average is part of the checkpoint, so a resumed run continues it.
    """

    name = "swa"

    def __init__(self, start_epoch: int) -> None:
        self.start_epoch = start_epoch
        self.averaged: AveragedModel | None = None
        self._pending: dict | None = None

    def _ensure(self, trainer: Any) -> AveragedModel:
        if self.averaged is None:
            self.averaged = AveragedModel(trainer.model, use_buffers=False)
            if self._pending is not None:
                self.averaged.load_state_dict(self._pending)
                self._pending = None
        return self.averaged

    def on_fit_start(self, trainer: Any) -> None:
        if self._pending is not None:
            self._ensure(trainer)

    @property
    def n_averaged(self) -> int:
        return 0 if self.averaged is None else int(self.averaged.n_averaged)

    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        if metrics["epoch"] < self.start_epoch:
            return
        averaged = self._ensure(trainer)
        averaged.update_parameters(trainer.model)
        metrics["swa_models"] = self.n_averaged
        if self.n_averaged == 1:
            first = f"the weights of epoch {metrics['epoch']} and every later epoch are averaged"
            trainer.notify("swa", "SWA started", [first])

    def on_fit_end(self, trainer: Any, summary: dict) -> None:
        if trainer.stopped == "interrupted" or not trainer.is_main:
            return
        if self.n_averaged == 0:
            summary["swa"] = {"models": 0, "note": "no epoch reached swa_start_epoch"}
            ended = f"the run ended before epoch {self.start_epoch}"
            trainer.notify("swa", "no weights averaged", [ended])
            return
        averaged = self._ensure(trainer)
        # Frozen stages are averaged too (their weights do not change); the trainable stages,
        # head mix and dropout are the live model's, not those of the epoch the average began
        # (or of a resumed run's start): update_bn must see what swa.pt will run.
        live, module = trainer.model, averaged.module
        module.load_state_dict({**live.state_dict(), **module.state_dict()})
        module.set_trainable(live.trainable_stages)
        module.set_head_mix(live.head_mix)
        for block, rate in enumerate(live.dropout_rates(), start=1):
            module.set_dropout(block, rate)
        self._update_bn(trainer, module)
        path = trainer.save_weights(
            "swa.pt", averaged.module.state_dict(), swa={"models": self.n_averaged}
        )
        summary["swa"] = {"models": self.n_averaged, "file": str(path)}
        summary["files"]["swa"] = str(path)
        trainer.notify(
            "swa",
            f"SWA finished: {self.n_averaged} epochs averaged",
            [f"BatchNorm statistics recomputed on the training data; saved {path.name}"],
        )

    @staticmethod
    def _update_bn(trainer: Any, module: Any) -> None:
        """Recompute ``module``'s BatchNorm statistics on the training data, reproducibly.

        The pass draws its batches, augmentation and dropout from seeds of the run (the data
        seeded as for the last epoch), not from whatever state the run ended in, so a resumed
        end phase gives the same statistics as an uninterrupted one; the run's own random
        state is left as it was. A Ctrl-C stops it between batches.
        """
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(trainer.config.run.seed)
            trainer.seed_epoch(int(trainer.history[-1]["epoch"]))
            batches = _until_interrupted(trainer.loaders["train"], trainer)
            was_training = module.training
            module.train()  # frozen stages stay in eval mode (models.staged)
            update_bn(batches, _TrainableNorms(module), device=trainer.device)
            module.train(was_training)

    def state_dict(self) -> dict:
        return {"averaged": None if self.averaged is None else self.averaged.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.averaged = None
        self._pending = state.get("averaged")


class _TrainableNorms(nn.Module):
    """``module`` as ``update_bn`` should see it: only the BatchNorm layers outside its frozen
    stages are reset and re-estimated. A frozen stage (a pretrained backbone's) keeps its
    running statistics and normalises with them, as it did throughout the run."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        frozen = {
            id(m)
            for stage, part in enumerate(module.stage_modules(), start=1)
            if stage not in module.trainable_stages
            for m in part.modules()
        }
        norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and id(m) not in frozen]
        self.norms = nn.ModuleList(norms)  # what update_bn finds in .modules()
        object.__setattr__(self, "_net", module)  # not a submodule: its modes are its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net(x)


def _until_interrupted(batches: Iterable, trainer: Any) -> Iterator:
    """``batches``, stopping with :class:`~training.trainer.Interrupted` after a Ctrl-C."""
    for batch in batches:
        trainer.check_interrupt()
        yield batch
