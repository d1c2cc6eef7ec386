"""The training loop: owns the epoch and step counts, checkpoints and resume; features hook in.

The loop is deliberately plain: per epoch it trains (forward, loss, :class:`GradStepper`),
validates, writes ``checkpoints/last.pt`` (and ``best.pt`` on a new best), and calls the
callbacks' hooks at each named event (see :mod:`training.events`). Everything a resumed run needs
is in the checkpoint: model, optimizer, schedule, stepper (scaler and step count), every
callback's state, the RNG states, the history and the position inside an interrupted epoch.
"""

from __future__ import annotations

import functools
import math
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dataset.cache import CacheInfo
from models.staged import StagedModel, trainable_at
from training.config.schema import TrainConfig, config_to_dict, staged_schedule, unfreeze_direction
from training.engine.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    restore_model,
    save_checkpoint,
)
from training.engine.data import Shard
from training.engine.distributed import (
    World,
    broadcast,
    broadcast_buffers,
    gather,
    rank_seed,
    sum_,
    wrap,
)
from training.engine.events import Callback, StopTraining
from training.engine.inference import predict
from training.engine.mixup import Mixup
from training.engine.monitor import is_better, monitor_mode
from training.engine.schedule import LRSchedule, PlateauState, warmup_cosine
from training.engine.seeding import rng_state, set_rng_state
from training.engine.stepper import GradStepper, group_size, steps_per_epoch
from training.evaluation.metrics import classification_metrics, macro_f1_from_counts

CHECKPOINT_FORMAT = 1


SYNC_EVERY = 25  # batches between reads of the loss on an accelerator


class Interrupted(Exception):  # noqa: N818 - control flow: a user asked the run to stop
    """Raised inside the loop once the step in progress has finished after a SIGINT."""


class RanksDiverged(RuntimeError):
    """The processes of one run no longer hold the same model or decisions (a bug to report:
    the run stops rather than go on training different models)."""


def fingerprint(model: nn.Module) -> list[str]:
    """One exact number per parameter and buffer (its float64 sum, as hex so that NaN equals
    NaN): equal fingerprints on two processes mean, in practice, equal weights."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not tensors:
        return []
    sums = torch.stack([t.detach().double().sum() for t in tensors]).tolist()
    return [float(v).hex() for v in sums]


@dataclass
class EpochProgress:
    """Running sums of the epoch in progress; saved when a run is interrupted mid-epoch."""

    epoch: int
    batches_done: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    class_correct: list[int] | None = None
    class_seen: list[int] | None = None
    class_predicted: list[int] | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers that hold a NaN or inf."""
    named = [(k, t) for k, t in model.state_dict().items() if t.is_floating_point()]
    if not named:
        return []
    # One device read for all tensors, not one per tensor.
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [k for (k, _), ok in zip(named, finite, strict=True) if not ok]


def build_optimizer(
    model: StagedModel, cfg: TrainConfig, direction: str = "grow"
) -> torch.optim.AdamW:
    """AdamW with one parameter group per trainable stage, named after the stage.

    Growing, the first stage's group also holds the head (the classifier trains from the start
    with stage 1). Thawing (or with every stage trainable), the head is a group of its own named
    ``head``, followed by the stages from the deepest down, each at ``old_group_decay`` times
    the rate of the stage above it (discriminative rates). A stage that joins later becomes a
    group of its own, with its own learning rate (:meth:`Trainer.unfreeze_to`).
    """
    o = cfg.optim
    names, trainable = model.stage_names, sorted(model.trainable_stages)
    if direction == "grow":
        first, *rest = trainable
        groups = [
            {
                "params": [*model.stage_parameters(first), *model.head_parameters()],
                "name": names[first - 1],
            }
        ]
        groups += [{"params": model.stage_parameters(k), "name": names[k - 1]} for k in rest]
    else:
        decay = cfg.unfreeze.old_group_decay
        groups = [{"params": model.head_parameters(), "name": "head"}]
        groups += [
            {
                "params": model.stage_parameters(k),
                "name": names[k - 1],
                "lr_mult": decay ** (model.num_stages - k + 1),
            }
            for k in reversed(trainable)
        ]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


class Trainer:
    """Train a :class:`~models.staged.StagedModel` on a cache with the features as callbacks.

    Args:
        config: the resolved :class:`~training.config.TrainConfig`.
        model: the model, already on ``device``.
        cache: the dataset cache (class names, normalisation statistics).
        loaders: ``{"train": ..., "val": ...}``; the train loader's ``generator`` is reseeded
            each epoch so that an epoch's order does not depend on what ran before.
        device: where to train.
        amp_dtype: autocast dtype, or ``None`` for full precision.
        run_dir: the run folder (``checkpoints/`` goes inside).
        callbacks: the features, called in this order at every event.
        is_main: ``False`` on ranks other than 0, which then write no files.
        criterion: loss on (logits, targets), targets being labels (B,) or, with Mixup, soft
            targets (B, C); cross-entropy with the config's label smoothing by default.
        mixup: mixes training batches (and makes soft targets) while active; ``None``: off.
        distill: knowledge distillation, ``distill(x, logits, loss) -> loss`` on the batch the
            student saw (:class:`training.engine.distill.Distillation`); ``None``: off.
        resize: resizes a training batch for its position in epochs, before Mixup (progressive
            resizing, :class:`training.engine.resize.ProgressiveResize`); ``None``: off.
        world: the processes training this model together (``torchrun``); ``None``: a world
            of one.
        shard: the share of each batch the loaders take (:class:`training.engine.data.Shard`),
            which the end phase, on rank 0 alone, turns off; ``None`` when they are not sharded.

    With several processes, the model trains inside ``DistributedDataParallel``, which averages
    the gradients; the epoch's sums and the validation predictions are combined over the
    processes, so every process sees the same metrics; the decisions are taken on rank 0's
    metrics and checked against rank 0's after every epoch (:meth:`_agree`).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: StagedModel,
        cache: CacheInfo,
        loaders: dict[str, DataLoader],
        device: torch.device,
        amp_dtype: torch.dtype | None,
        run_dir: Path,
        callbacks: Sequence[Callback] = (),
        is_main: bool = True,
        criterion: nn.Module | None = None,
        mixup: Mixup | None = None,
        distill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        resize: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
        world: World | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.cache = cache
        self.loaders = loaders
        self.device = device
        self.amp_dtype = amp_dtype
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        self.is_main = is_main
        self.criterion = criterion or nn.CrossEntropyLoss(
            label_smoothing=config.optim.label_smoothing
        )
        self.mixup = mixup
        self.distill = distill
        self.resize = resize
        self.num_classes = len(cache.class_names)
        self.batches_per_epoch = len(loaders["train"])
        self.steps_per_epoch = steps_per_epoch(self.batches_per_epoch, config.optim.accumulation)
        self.direction = unfreeze_direction(config)
        self.optimizer = build_optimizer(model, config, self.direction)
        self.schedule = self._make_schedule()
        self.stepper = GradStepper(
            self.optimizer,
            device=device,
            amp_dtype=amp_dtype,
            accumulation=config.optim.accumulation,
            clip_grad=config.optim.clip_grad,
            scheduler=self.schedule,
        )
        self.epoch = 0
        self.start_epoch = 1
        self.history: list[dict] = []
        self.best: dict[str, Any] = {"metric": config.run.monitor, "value": None, "epoch": None}
        self.stopped: str | None = None
        self._progress: EpochProgress | None = None
        self._interrupt_requested = False
        self._events: list[dict] = []
        self._nonfinite_epoch = 0
        #: ``last.pt``'s note that the end phase had completed, when resuming from it.
        self._resumed_finished: dict | None = None
        #: set by a rollback during the epoch in progress; later decisions of that epoch skip.
        self.rolled_back = False
        self.world = world or World()
        self.shard = shard
        #: the end phase runs on rank 0 alone: no collectives from then on.
        self._solo = not self.world.distributed
        self._ddp: nn.Module | None = None
        self._ddp_params: tuple[int, ...] = ()

    # ----------------------------------------------------------------- public state

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.stepper.step

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def notify(
        self, kind: str, title: str, lines: Sequence[str] = (), *, banner: bool = True
    ) -> None:
        """Tell every callback that something happened (a stage change, an intervention).

        The notice is also kept in the epoch's ``events`` list in ``metrics.jsonl``. ``banner``
        False: worth keeping in the logs, not worth interrupting the console for.
        """
        self._events.append({"kind": kind, "title": title, "lines": list(lines), "banner": banner})
        for cb in self.callbacks:
            cb.on_notice(self, kind, title, list(lines), banner=banner)

    @property
    def depth(self) -> int:
        """How many stages are trainable (have joined), whichever direction they join in."""
        return len(self.model.trainable_stages)

    def unfreeze_to(
        self,
        depth: int,
        *,
        lr_mult: float = 1.0,
        warmup_epochs: float = 0.0,
        old_group_decay: float = 1.0,
        head_blend_epochs: float = 0.0,
        reason: str = "",
    ) -> list[str]:
        """Make ``depth`` stages trainable in the run's direction; each stage that joins becomes
        an optimizer group named after it.

        A new group follows the schedule from the step it joins, times ``lr_mult`` and a linear
        warmup from 0.1x over ``warmup_epochs``. Discriminative rates: growing, the groups
        already there have their multiplier multiplied by ``old_group_decay`` (the stage 1 group
        holds the head); thawing, the new, shallower stage starts at ``old_group_decay`` times
        the rate of the stage above it. With the model's ``head_blend``, the classifier's input
        switches to the new depth at once or, when one stage joins and ``head_blend_epochs`` >
        0, fades in linearly over that many epochs of optimizer steps. Returns the names of the
        groups added; announces the stage change.
        """
        model, n = self.model, self.model.num_stages
        before = sum(p.numel() for p in model.parameters() if p.requires_grad)
        old = self.depth
        if not old < depth <= n:
            raise ValueError(f"unfreeze_to: depth={depth} is invalid; allowed: {old + 1}..{n}")
        joining = sorted(trainable_at(self.direction, depth, n) - model.trainable_stages)
        if self.direction != "grow":
            joining.reverse()  # thawing: from the deepest down
        model.set_trainable(trainable_at(self.direction, depth, n))
        if self.direction == "grow":
            for group in self.optimizer.param_groups:
                group["lr_mult"] = group.get("lr_mult", 1.0) * old_group_decay
        added = []
        step = self.schedule.last_step
        for i, stage in enumerate(joining, start=1):
            mult = float(lr_mult)
            if self.direction != "grow":
                mult *= old_group_decay ** (old + i)
            name = model.stage_names[stage - 1]
            self.optimizer.add_param_group(
                {
                    "params": model.stage_parameters(stage),
                    "name": name,
                    "base_lr": self.config.optim.lr,
                    "lr_mult": mult,
                    "joined_step": step,
                    "warmup_steps": round(warmup_epochs * self.steps_per_epoch),
                    "blend_steps": round(head_blend_epochs * self.steps_per_epoch),
                }
            )
            added.append(name)
        blend = (
            "head_blend" in model.capabilities
            and depth == old + 1
            and self.optimizer.param_groups[-1]["blend_steps"] > 0
        )
        if blend:
            model.set_head_mix(0.0)
        self.schedule.apply()
        after = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lrs = ", ".join(f"{g['name']} {g['lr']:.2e}" for g in self.optimizer.param_groups)
        lines = [
            f"trainable parameters {before:,} -> {after:,}",
            f"new groups: {', '.join(added)} (lr x{lr_mult:g}, warmup {warmup_epochs:.3g} ep)",
            f"learning rates now: {lrs}",
        ]
        if "head_blend" in model.capabilities:
            how = f"blended over {head_blend_epochs:.3g} ep" if blend else "switched at once"
            lines.append(f"head {old} -> {depth}: {how}")
        self.notify(
            "stage",
            f"STAGE {depth}: {', '.join(added)} "
            + ("active" if self.direction == "grow" else "unfrozen")
            + (f" ({reason})" if reason else ""),
            lines,
        )
        return added

    def _advance_head_mix(self) -> None:
        """After an optimizer step: move the head mix along the blend of the group that joined
        last (a blend starts only when one stage joins, and the new group is the last)."""
        if self.model.head_mix >= 1.0:
            return
        group = self.optimizer.param_groups[-1]
        done = (self.step - group["joined_step"]) / max(1, group.get("blend_steps", 0))
        self.model.set_head_mix(min(1.0, done))

    def restore_best(self, lr_factor: float, path: Path | None = None) -> Path:
        """Roll back to a checkpoint of this run (``best.pt`` by default): load its weights and
        optimizer state, multiply every lr by ``lr_factor``. Blocks activated since then stay
        active with the weights they had then (their initial ones, as frozen blocks do not
        train), and their groups restart their optimizer moments.
        """
        path = path or self.checkpoint_dir / "best.pt"
        # Only rank 0 writes checkpoints (and other machines may not see its disk): the weights
        # every process restores are the ones rank 0 reads.
        if self._solo:
            ckpt = load_checkpoint(path)
        else:
            ckpt = broadcast(self.world, load_checkpoint(path) if self.world.is_main else None)
        best_model = ckpt["model"]
        own = self.model.state_dict()
        # Weights of blocks that were frozen at the best epoch equal their values then.
        self.model.load_state_dict({k: best_model.get(k, v) for k, v in own.items()})
        if ckpt.get("active_blocks") == self.depth:
            self.model.set_head_mix(ckpt.get("head_mix", 1.0))
        saved = ckpt["optimizer"]
        state = self.optimizer.state_dict()
        n_saved = sum(len(g["params"]) for g in saved["param_groups"])
        state["state"] = {i: s for i, s in saved["state"].items() if int(i) < n_saved}
        self.optimizer.load_state_dict(state)
        self.schedule.scale *= lr_factor
        self.schedule.apply()
        self.rolled_back = True
        return path

    # ----------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train until ``run.epochs``, then run the end phase; returns the summary given to
        ``on_fit_end``.

        The end phase is the ``on_fit_end`` hooks of a run that was not interrupted (SWA's
        average and BatchNorm statistics, the temperature fit, the logs). A Ctrl-C there stops
        it like one in an epoch; ``last.pt`` is marked finished only once the whole phase is
        done, so a resumed run redoes an interrupted end phase, and a finished run resumed with
        no more epochs does nothing and says so.
        """
        if self._finished_already():
            return self._nothing_to_do()
        start = time.perf_counter()
        try:
            with self._sigint_finishes_step():
                self._emit("on_fit_start")
                try:
                    for epoch in range(self.start_epoch, self.config.run.epochs + 1):
                        self._run_epoch(epoch)
                        self._agreed_interrupt()  # a Ctrl-C during validation or the writes
                    self._agreed_interrupt()
                except StopTraining as stop:
                    self.stopped = stop.reason
                except Interrupted:
                    self.stopped = "interrupted"
                summary = self._end_phase(start)
        finally:
            for cb in self.callbacks:  # a live progress bar must give the terminal back
                close = getattr(cb, "close", None)
                if close is not None:
                    close()
        return summary

    def _end_phase(self, start: float) -> dict:
        # SWA's BatchNorm pass and the temperature fit see every image, on rank 0 alone; the
        # other processes are done once training is.
        self._solo = True
        if self.shard is not None:
            self.shard.whole()
        summary = self._summary(time.perf_counter() - start)
        if self.stopped == "interrupted":
            self._emit("on_fit_end", summary)
            return summary
        try:
            self._emit("on_fit_end", summary)
        except Interrupted:
            # The hooks that ran before the interrupt wrote files a resume rewrites; the ones
            # still to come (console, logs) learn that the run stopped.
            self.stopped = "interrupted"
            summary = self._summary(time.perf_counter() - start)
            self._emit("on_fit_end", summary)
            return summary
        self._mark_finished()
        return summary

    def check_interrupt(self) -> None:
        """Raise :class:`Interrupted` when a Ctrl-C has asked the run to stop.

        Work outside the training steps (the end phase's passes over the data) calls it between
        units, so that a stop leaves no half-done state behind.
        """
        if self._interrupt_requested:
            raise Interrupted

    def sum_over_processes(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the processes (as they are in a world of one, or in the end
        phase). Every process must call it at the same point, as for any collective."""
        if self._solo:
            return [float(v) for v in values]
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return sum_(self.world, total).tolist()

    def _agreed_interrupt(self) -> None:
        """:meth:`check_interrupt` for every process at once: one that got a Ctrl-C stops them
        all at the same batch (a process stopping alone would leave the others waiting)."""
        if not self._solo:
            self._ask_about_interrupt()
        self.check_interrupt()

    def _ask_about_interrupt(self) -> bool:
        """Whether any process got a Ctrl-C (a collective); every process then knows."""
        (count,) = self.sum_over_processes([float(self._interrupt_requested)])
        self._interrupt_requested = count > 0
        return self._interrupt_requested

    def _finished_already(self) -> bool:
        done = self._resumed_finished
        return done is not None and self.config.run.epochs <= int(done["epochs"])

    def _nothing_to_do(self) -> dict:
        done = self._resumed_finished
        summary = self._summary(0.0)
        summary.update(stopped=done.get("stopped"), already_finished=True)
        self.notify(
            "stop",
            "nothing to do: this run has finished",
            [
                f"its {done['epochs']} epochs and the end phase (SWA, calibration) are done",
                f"to train longer: --resume {self.run_dir} --epochs N (N > {done['epochs']})",
            ],
        )
        return summary

    def _mark_finished(self) -> None:
        """Note in ``last.pt`` that the end phase is complete (the training state is untouched,
        so a run extended later with more epochs continues exactly)."""
        path = self.checkpoint_dir / "last.pt"
        if not self.is_main or not path.exists():
            return
        ckpt = load_checkpoint(path)
        ckpt["finished"] = {"epochs": self.config.run.epochs, "stopped": self.stopped}
        save_checkpoint(ckpt, path)

    def _run_epoch(self, epoch: int) -> None:
        try:
            self._epoch(epoch)
        except StopTraining as stop:
            self._agree(stop.reason)
            raise
        self._agree(None)

    def _agree(self, stopped: str | None) -> None:
        """Check, after an epoch's decisions, that this process holds what rank 0 holds: the
        same weights, stages, rates, dropout, head mix, best epoch and stop.

        The decisions run on every process on rank 0's metrics (broadcast before the hooks),
        and a rollback restores the weights rank 0 read, so they agree by construction; this
        check makes a divergence an error at the epoch it happens, not a silent fork.

        Raises:
            RanksDiverged: naming the first field that differs.
        """
        if self._solo:
            return
        mine = {
            "stop": stopped,
            "stages": sorted(self.model.trainable_stages),
            "lr": [float(g["lr"]).hex() for g in self.optimizer.param_groups],
            "head_mix": self.model.head_mix,
            "dropout": self.model.dropout_rates(),
            "best": self.best,
            "weights": fingerprint(self.model),
        }
        reference = broadcast(self.world, mine)
        for key, value in mine.items():
            if value != reference[key]:
                raise RanksDiverged(
                    f"rank {self.world.rank} diverged from rank 0 after epoch {self.epoch}: "
                    f"its {key} differs; please report this with the run's config.yaml"
                )

    def _epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._emit("on_epoch_start", epoch)
        train = self._train_epoch(epoch)
        metrics = {"epoch": epoch, **train, **self._validate()}
        metrics["lr"] = [g["lr"] for g in self.optimizer.param_groups]
        metrics["active_blocks"] = self.depth
        metrics["head_mix"] = self.model.head_mix
        metrics["dropout"] = self.model.dropout_rates()
        strength = getattr(self.loaders["train"].dataset, "strength", None)
        if strength is not None:
            metrics["aug_strength"] = strength
        if self.mixup is not None:
            metrics["mixup_alpha"] = self.mixup.alpha_at(epoch - 1) if self.mixup.enabled else 0.0
        if bad := nonfinite_tensors(self.model):
            metrics["nonfinite_state"] = bad  # never a best; the rollback restores a finite one
        # Every process decides on rank 0's numbers (its clock's epoch_s included).
        metrics = metrics if self._solo else broadcast(self.world, metrics)
        self.rolled_back = False
        self._progress = None  # the epoch's training is complete
        # best.pt holds the model exactly as it was validated: written before the features'
        # decisions (a block activated now would change what the weights compute).
        if self._update_best(metrics):
            self.save("best.pt")
        metrics["events"] = self._events  # notices of this epoch, decisions below included
        self._emit("on_validation_end", metrics)
        self.history.append({k: v for k, v in metrics.items() if k != "events"})
        self.save("last.pt")
        self._emit("on_epoch_end", metrics)
        self._events = []

    def seed_epoch(self, epoch: int) -> None:
        """Seed the training data's shuffle and augmentation for ``epoch``.

        They depend on (seed, epoch) only, so a resumed run draws the same batches as an
        uninterrupted one; the end phase seeds its pass over the training data the same way.
        """
        seed = self.config.run.seed * 100_003 + epoch
        loader = self.loaders["train"]
        if loader.generator is not None:
            loader.generator.manual_seed(seed)
        if hasattr(loader.dataset, "reseed"):
            # Each process augments its own images with its own stream; rank 0's is a plain
            # run's.
            loader.dataset.reseed(rank_seed(seed, self.world.rank))
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)

    @property
    def net(self) -> nn.Module:
        """The module the training step calls: the model itself, or with several processes the
        model inside DistributedDataParallel, wrapped anew whenever the set of trainable
        parameters has changed (DDP fixes the parameters it averages when it is built, so a
        stage that joined later would otherwise train on each process's own gradients)."""
        if self._solo:
            return self.model
        params = tuple(id(p) for p in self.model.parameters() if p.requires_grad)
        if self._ddp is None or params != self._ddp_params:
            # The processes start every stage from rank 0's weights (wrap broadcasts them).
            self._ddp = wrap(self.model, self.device)
            self._ddp_params = params
        return self._ddp

    def _train_epoch(self, epoch: int) -> dict:
        self.model.train()
        net = self.net
        self.seed_epoch(epoch)
        progress = self._progress if self._progress and self._progress.epoch == epoch else None
        progress = progress or EpochProgress(epoch)
        if not self.world.is_main:
            # A resumed epoch's sums so far are the whole world's: rank 0 carries them, the
            # others add only their own batches, and the epoch's sums add the processes up.
            progress = EpochProgress(epoch, batches_done=progress.batches_done)
        n, acc = self.batches_per_epoch, self.config.optim.accumulation
        # Running sums stay on the device: reading a GPU value each batch would make the host wait
        # for the GPU and stop it from queueing the next batch. The loss is read every batch on
        # the CPU (free there) and every SYNC_EVERY batches elsewhere.
        sync_every = 1 if self.device.type == "cpu" else SYNC_EVERY
        loss_sum = torch.tensor(progress.loss_sum, device=self.device)
        correct = torch.tensor(progress.correct, device=self.device)
        zeros = [0] * self.num_classes
        class_correct = torch.tensor(progress.class_correct or zeros, device=self.device)
        class_seen = torch.tensor(progress.class_seen or zeros, device=self.device)
        class_predicted = torch.tensor(progress.class_predicted or zeros, device=self.device)
        sums = (loss_sum, correct, class_correct, class_seen, class_predicted)
        loss_value = float("nan")
        t0 = time.perf_counter() - progress.seconds
        for b, (x, y) in enumerate(self.loaders["train"]):
            if b < progress.batches_done:
                continue  # already trained before an interruption; drawn again to keep RNG streams
            x = x.to(self.device, non_blocking=True)  # (B, C, H, W)
            y = y.to(self.device, non_blocking=True)  # (B,)
            target = y
            x = x if self.resize is None else self.resize(x, epoch - 1 + b / n)
            if self.mixup is not None and self.mixup.active(epoch - 1 + b / n):
                x, target, _ = self.mixup(x, y, epoch - 1 + b / n)  # target: (B, C) soft
            with self.stepper.autocast():
                logits = net(x)  # (B, num_classes)
                loss = self.criterion(logits, target)
                if self.distill is not None:  # the teacher sees x as mixed, under this autocast
                    loss = self.distill(x, logits, loss)
            stepped = self.stepper.backward(loss, group_size=group_size(b, n, acc))
            if stepped:
                self._advance_head_mix()
            loss_sum += loss.detach().float() * len(y)
            # Under Mixup an image is counted as its dominant component's class (lam >= 0.5).
            label = target.argmax(1) if target.ndim == 2 else y
            guess = logits.detach().argmax(1)
            hit = guess == label
            correct += hit.sum()
            class_correct += torch.bincount(label[hit], minlength=self.num_classes)
            class_seen += torch.bincount(label, minlength=self.num_classes)
            class_predicted += torch.bincount(guess, minlength=self.num_classes)
            progress.batches_done = b + 1
            progress.seen += len(y)
            if b % sync_every == 0 or b == n - 1:
                loss_value = self._read_loss(loss, epoch, b)
            self._emit("on_batch_end", b, loss_value, stepped)
            if stepped and self._stop_requested():
                self._keep_progress(progress, sums, t0)
                self.save("last.pt")
                raise Interrupted
        self._keep_progress(progress, sums, t0)
        broadcast_buffers(self.world, self.model)
        counts = zip(progress.class_correct, progress.class_seen, strict=True)
        per_class = [c / max(1, n) for c, n in counts]
        return {
            "train_loss": progress.loss_sum / max(1, progress.seen),
            "train_acc": progress.correct / max(1, progress.seen),
            "train_acc_per_class": per_class,
            "train_macro_f1": macro_f1_from_counts(
                progress.class_correct, progress.class_seen, progress.class_predicted
            ),
            "epoch_s": progress.seconds,
            "images_per_s": progress.seen / max(progress.seconds, 1e-9),
        }

    def _read_loss(self, loss: torch.Tensor, epoch: int, batch: int) -> float:
        value = float(loss.detach())
        if not math.isfinite(value) and self._nonfinite_epoch != epoch:
            self._nonfinite_epoch = epoch  # one warning per epoch, at the first bad batch
            self.notify(
                "warning", "non-finite loss", [f"epoch {epoch}, batch {batch + 1}: {value}"]
            )
        return value

    def _stop_requested(self) -> bool:
        """After an optimizer step: whether to stop, for a Ctrl-C here or, with several
        processes, on any of them. They ask one another after every step on the CPU and every
        :data:`SYNC_EVERY` batches' worth of steps on an accelerator (whose queue a question
        would stall), counted in steps, which are the same on every process: the question is a
        collective."""
        if self._solo:
            return self._interrupt_requested
        every = 1 if self.device.type == "cpu" else SYNC_EVERY // self.config.optim.accumulation
        if self.step % max(1, every):
            return False
        return self._ask_about_interrupt()

    def _keep_progress(self, progress, sums, t0: float) -> None:
        """Store the epoch's sums so far in ``progress`` (the whole world's, once summed)."""
        # float64 holds these counts exactly; some devices (MPS) lack it, the CPU never does.
        where = "cpu" if self._solo else self.device
        parts = [t.reshape(-1).to(where, torch.float64) for t in sums]
        parts.append(torch.tensor([progress.seen], dtype=torch.float64, device=where))
        flat = torch.cat(parts)
        if not self._solo:
            flat = sum_(self.world, flat)
        sizes = [len(part) for part in parts]
        loss_sum, correct, class_correct, class_seen, class_predicted, seen = flat.split(sizes)
        progress.loss_sum = float(loss_sum)
        progress.correct = int(correct)
        progress.class_correct = [int(v) for v in class_correct.tolist()]
        progress.class_seen = [int(v) for v in class_seen.tolist()]
        progress.class_predicted = [int(v) for v in class_predicted.tolist()]
        progress.seen = int(seen)
        progress.seconds = time.perf_counter() - t0
        self._progress = progress

    def _validate(self) -> dict:
        transform = None
        if self.resize is not None:
            # At the size the epoch ended on: the validation-driven decisions (best weights,
            # plateau, rollback, early stop, dynamic dropout's train-val gap) then compare like
            # with like; from the last size on this is the images' own size.
            end = self.epoch - 1 + (self.batches_per_epoch - 1) / self.batches_per_epoch
            transform = functools.partial(self.resize, position=end)
        logits, labels = predict(
            self.model, self.loaders["val"], self.device, self.amp_dtype, transform=transform
        )
        if not self._solo:  # each process predicted its share of the images
            shares = gather(self.world, (logits, labels))
            logits = torch.cat([share[0] for share in shares])
            labels = torch.cat([share[1] for share in shares])
        if not torch.isfinite(logits).all():
            # Diverged weights: report NaN so that the rollback (or the user) sees it.
            nan = float("nan")
            return {
                "val_loss": nan,
                "val_acc": nan,
                "val_macro_f1": nan,
                "val_recall_per_class": [nan] * self.num_classes,
            }
        m = classification_metrics(logits, labels, self.cache.class_names)
        return {
            "val_loss": m["nll"],
            "val_acc": m["accuracy"],
            "val_macro_f1": m["macro_f1"],
            "val_recall_per_class": [c["recall"] for c in m["per_class"]],
        }

    def _update_best(self, metrics: dict) -> bool:
        monitor = self.config.run.monitor
        value = float(metrics[monitor])
        old = self.best["value"]
        better = (
            is_better(value, old, monitor_mode(monitor))
            and math.isfinite(value)
            and not metrics.get("nonfinite_state")
        )
        if better:
            self.best = {"metric": monitor, "value": value, "epoch": metrics["epoch"]}
        metrics["is_best"] = better
        return better

    def _make_schedule(self) -> LRSchedule:
        """The lr schedule of ``schedule.kind``; the staged one carries its plateau state."""
        cfg = self.config
        spe = self.steps_per_epoch
        if cfg.schedule.kind == "staged":
            staged = staged_schedule(cfg)
            plateau = PlateauState(staged)
            return LRSchedule(
                self.optimizer, staged.factor_fn(spe, cfg.optim.lr, plateau), plateau=plateau
            )
        factor = partial(
            warmup_cosine,
            warmup_steps=spe * cfg.schedule.warmup_epochs,
            total_steps=spe * cfg.run.epochs,
            min_ratio=min(1.0, cfg.schedule.min_lr / cfg.optim.lr),
        )
        return LRSchedule(self.optimizer, factor)

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def _summary(self, seconds: float) -> dict:
        ck = self.checkpoint_dir
        files = {"run": str(self.run_dir), "last": str(ck / "last.pt")}
        if (ck / "best.pt").exists():
            files["best"] = str(ck / "best.pt")
        return {
            "best_epoch": self.best["epoch"],
            "best_value": self.best["value"],
            "monitor": self.best["metric"],
            "seconds": seconds,
            "stopped": self.stopped,
            "files": files,
        }

    @contextmanager
    def _sigint_finishes_step(self):
        """First Ctrl-C: finish the optimizer step, save, stop. Second: stop at once.

        Under torchrun the workers run in their own session: a Ctrl-C reaches torchrun, which
        passes it on to each of them once (and kills them 30 s later); a scheduler's SIGTERM
        is passed on the same way, so there SIGTERM is handled like a Ctrl-C too.
        """

        def handler(signum, frame):
            if self._interrupt_requested:
                raise KeyboardInterrupt
            self._interrupt_requested = True
            self.notify(
                "warning", "interrupt received", ["finishing the current step, then saving last.pt"]
            )

        kinds = [signal.SIGINT] + ([signal.SIGTERM] if self.world.distributed else [])
        previous = {}
        try:
            for kind in kinds:
                previous[kind] = signal.signal(kind, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield
        finally:
            for kind, old in previous.items():
                signal.signal(kind, old)

    # ----------------------------------------------------------------- checkpoints

    def checkpoint_payload(self) -> dict:
        """Everything needed to resume this run or to evaluate its weights."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch if self._progress is None else self.epoch - 1,
            "step": self.step,
            "model": self.model.state_dict(),
            "model_record": self.model.record(),
            "trainable_stages": sorted(self.model.trainable_stages),
            "active_blocks": self.depth,
            "head_mix": self.model.head_mix,
            "dropout_rates": self.model.dropout_rates(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "stepper": self.stepper.state_dict(),
            "callbacks": {cb.key: cb.state_dict() for cb in self.callbacks},
            "mixup": None if self.mixup is None else self.mixup.state_dict(),
            "rng": rng_state(),
            "config": config_to_dict(self.config),
            "class_names": self.cache.class_names,
            "mean": self.cache.mean,
            "std": self.cache.std,
            "data": {
                "name": self.cache.name,
                "cache": str(self.cache.path),
                "source": self.config.data.source,
            },
            "best": dict(self.best),
            "history": list(self.history),
            "progress": None if self._progress is None else self._progress.as_dict(),
            "batches_per_epoch": self.batches_per_epoch,
            "processes": self.world.size,
        }

    def save(self, name: str) -> Path | None:
        """Write ``checkpoints/<name>`` atomically (rank 0 writes; with several processes every
        one calls it, at the same point, to hand in its random state)."""
        ranks = None if self._solo else gather(self.world, rng_state())
        if not self.is_main:
            return None
        path = self.checkpoint_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = self.checkpoint_payload()
        if ranks is not None:
            payload["rng_ranks"] = ranks  # each process's own dropout and noise stream
        save_checkpoint(payload, path)
        return path

    def save_weights(self, name: str, model_state: dict, **extra: Any) -> Path | None:
        """Write ``checkpoints/<name>`` holding other weights of this model (e.g. the SWA average)
        with the run's metadata, for evaluation only (no optimizer or resume state)."""
        if not self.is_main:
            return None
        resume_only = ("optimizer", "scheduler", "stepper", "callbacks", "rng", "progress")
        payload = {k: v for k, v in self.checkpoint_payload().items() if k not in resume_only}
        payload.update(model=model_state, **extra)
        path = self.checkpoint_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(payload, path)
        return path

    def load_state(self, ckpt: dict) -> None:
        """Restore a checkpoint written by :meth:`checkpoint_payload`, to continue exactly.

        Raises:
            CheckpointError: a model or classes that differ, or another number of batches per
                epoch (a last batch that folds differently over another number of processes).
        """
        check_compatible(ckpt, self.model.record(), self.cache.class_names)
        saved = ckpt.get("batches_per_epoch", self.batches_per_epoch)
        if saved != self.batches_per_epoch:
            was = int(ckpt.get("processes", 1))
            raise CheckpointError(
                f"the run made {saved} batches an epoch on {was} process(es) and would make "
                f"{self.batches_per_epoch} on {self.world.size}: its last batch is too small "
                f"to share; allowed: resume it on {was} process(es)"
            )
        restore_model(self.model, ckpt)
        for block, p in enumerate(ckpt.get("dropout_rates", []), start=1):
            self.model.set_dropout(block, p)
        # Rebuild the optimizer with the checkpoint's groups (one per active block) before
        # loading its state, so group count and order match.
        self.optimizer = build_optimizer(self.model, self.config, self.direction)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"optimizer state does not fit this model: {exc}") from exc
        self.schedule = self._make_schedule()
        self.schedule.load_state_dict(ckpt["scheduler"])
        self.stepper.optimizer = self.optimizer
        self.stepper.scheduler = self.schedule
        self.stepper.load_state_dict(ckpt["stepper"])
        if self.mixup is not None and ckpt.get("mixup") is not None:
            self.mixup.load_state_dict(ckpt["mixup"])
        states = ckpt.get("callbacks", {})
        for cb in self.callbacks:
            if cb.key in states:
                cb.load_state_dict(states[cb.key])
        self.history = list(ckpt.get("history", []))
        self.best = dict(ckpt["best"])
        self._resumed_finished = ckpt.get("finished")
        progress = ckpt.get("progress")
        self._progress = EpochProgress(**progress) if progress else None
        self.start_epoch = self._progress.epoch if self._progress else int(ckpt["epoch"]) + 1
        self.epoch = self.start_epoch - 1
        ranks = ckpt.get("rng_ranks") or []
        if len(ranks) == self.world.size:
            set_rng_state(ranks[self.world.rank])  # each process continues its own stream
        else:
            set_rng_state(ckpt["rng"])
            if self.world.rank:  # another number of processes: a stream of its own
                torch.manual_seed(rank_seed(self.config.run.seed + self.epoch, self.world.rank))
