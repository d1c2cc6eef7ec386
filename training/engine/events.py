"""The event vocabulary that features hook into, and the exceptions that steer the loop.

A feature is a :class:`Callback`: it overrides the hooks it needs and, if it holds state that a
resumed run must get back, ``state_dict``/``load_state_dict``. The trainer calls the hooks in the
order the callbacks were given. Hooks receive the trainer and read its public attributes
(``epoch``, ``step``, ``model``, ``optimizer``, ``config``, ``history``); they change the loop only
through those, through their return values, or by raising :class:`StopTraining`.
"""

from __future__ import annotations

from typing import Any


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook to end training after the current epoch's bookkeeping."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Callback:
    """Base class of a training feature; every hook is optional.

    Events, in order: ``on_fit_start`` -> per epoch ``on_epoch_start`` -> per batch
    ``on_batch_end`` (after the forward/backward, with ``stepped`` telling whether the optimizer
    stepped) -> ``on_validation_end`` (with the epoch's metrics dict, which hooks may extend) ->
    ``on_epoch_end`` (after checkpoints are written) -> ``on_fit_end``. ``on_notice`` comes
    whenever something calls ``trainer.notify(kind, title, lines, banner=...)``: a block
    activated, a feature intervened. ``banner`` says whether the console should show it (a
    decision a user should see, or a warning) or only the logs should keep it.
    """

    #: key of this callback's state in a checkpoint; defaults to the class name.
    name: str | None = None

    @property
    def key(self) -> str:
        return self.name or type(self).__name__

    def on_fit_start(self, trainer: Any) -> None: ...

    def on_epoch_start(self, trainer: Any, epoch: int) -> None: ...

    def on_batch_end(self, trainer: Any, batch: int, loss: float, stepped: bool) -> None: ...

    def on_validation_end(self, trainer: Any, metrics: dict) -> None: ...

    def on_epoch_end(self, trainer: Any, metrics: dict) -> None: ...

    def on_fit_end(self, trainer: Any, summary: dict) -> None: ...

    def on_notice(
        self, trainer: Any, kind: str, title: str, lines: list[str], banner: bool = True
    ) -> None:
        """A feature intervened or the stage changed (``kind``: "stage", "warning", ...)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
