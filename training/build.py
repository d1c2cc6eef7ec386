"""Assemble a run from a config: device, data, model, features, trainer; and the run folder."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from dataset.errors import DataError
from losses import WeightedCrossEntropy, class_weights
from models.registry import build_model as build_registered
from models.staged import MIN_CLASSES, InputTooSmall, StagedModel, trainable_at
from models.weights import WeightsError, load_weights, pretrained_imagenet
from training.callbacks.console import ConsoleCallback, warn
from training.callbacks.metrics_log import MetricsLogger
from training.callbacks.regimen import earliest_stop_epoch, regimen_callbacks
from training.config.plan import plan_lines, plan_markers, stage_plan
from training.config.schema import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    save_config,
    staged_schedule,
)
from training.engine.checkpoint import (
    CheckpointError,
    check_resumable,
    load_checkpoint,
    model_record,
)
from training.engine.data import Shard, double_correction_warning, make_loaders, prepare_cache
from training.engine.device import amp_dtype, resolve_device, slow_settings_warning
from training.engine.distill import Distillation
from training.engine.distributed import World, barrier, rank_seed, start
from training.engine.events import Callback
from training.engine.mixup import Mixup
from training.engine.resize import ProgressiveResize, check_against_model, swa_note
from training.engine.run_dir import remove_temp_leftovers
from training.engine.schedule import plot_schedule
from training.engine.seeding import make_generator, seed_everything
from training.engine.trainer import Trainer
from training.evaluation.teachers import load_teachers
from training.evaluation.tta import resolve_tta_for_images


def join_world(cfg: TrainConfig, world: World | None = None) -> tuple[World, torch.device]:
    """This process's place among the processes torchrun started (a world of one for a plain
    launch) and its device, with the process group joined.

    Raises:
        ConfigError: a device this machine lacks.
        DistributedError: a launch that cannot work (one line; it may concern one process).
    """
    try:
        device = resolve_device(cfg.run.device)
    except ValueError as error:  # e.g. cuda asked for on a machine without one
        raise ConfigError(f"run.{error}") from None
    world = world or World.from_env()
    return world, start(world, device, cfg.run.dist_timeout)


def shared_cache(cfg: TrainConfig, world: World):
    """The run's cache (:func:`prepare_cache`), built by rank 0 while the other processes wait,
    then read by them (two processes writing one cache would race)."""
    if not world.is_main:
        barrier(world)
    cache = prepare_cache(cfg.data, progress=world.is_main)
    if world.is_main:
        barrier(world)
    return cache


def default_run_dir(cfg: TrainConfig) -> Path:
    name = Path(cfg.data.source.rstrip("/")).stem or "run"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_resume(run_dir: str | Path) -> tuple[TrainConfig, dict]:
    """The config and checkpoint of an earlier run, to continue it."""
    path = Path(run_dir) / "checkpoints" / "last.pt"
    if not path.is_file():
        started = (Path(run_dir) / "config.yaml").is_file()
        why = (
            "its run stopped before its first epoch was saved; start again there with"
            " --overwrite (it deletes what the folder holds) or pick another --run-dir"
            if started
            else "no run was saved there; give the folder of a run (it holds checkpoints/last.pt)"
        )
        raise CheckpointError(f"{path}: no checkpoint to resume from: {why}")
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, path)
    return config_from_dict(ckpt["config"]), ckpt


def build_model(cfg: TrainConfig, cache, weights_from: dict | None = None) -> StagedModel:
    """The configured model, shaped for the cache's channels, classes and image size.

    ``weights_from`` is the checkpoint whose weights the model will hold (the run resumed, or
    the ``model.init`` run): its stem and resize are kept (see :func:`model_options`).

    Raises:
        DataError: fewer than two classes, or images smaller than the model takes (each model
            states its own minimum, from its strides, stem and input resize).
    """
    if cache.num_classes < MIN_CLASSES:
        names = ", ".join(map(str, cache.class_names))
        raise DataError(
            cfg.data.source,
            f"{cache.num_classes} class ({names}); a classifier needs at least {MIN_CLASSES}"
            " classes",
        )
    height, width = cache.meta["image_shape"][:2]
    try:
        model = build_registered(
            cfg.model.arch,
            in_channels=cache.channels,
            num_classes=cache.num_classes,
            input_size=min(height, width),
            options=model_options(cfg, weights_from),
        )
    except InputTooSmall as error:
        fixes = "data.image_size, for an image folder"
        fixes += "; or model.resize" if "resize" in cfg.model.arch_options() else ""
        least = error.minimum
        raise DataError(
            cfg.data.source,
            f"{height}x{width} px images are smaller than {cfg.model.arch} takes as configured:"
            f" at least {least}x{least} px; resize them ({fixes}) or change {error.remedy}",
        ) from None
    except ValueError as error:  # an option the model refuses once it sees the images
        raise ConfigError(f"model: {error}") from None
    plan = stage_plan(cfg)
    model.set_trainable(trainable_at(plan.direction, plan.start, model.num_stages))
    return model


def model_options(cfg: TrainConfig, weights_from: dict | None = None) -> dict:
    """The arch's options for this run. A zoo model's ``stem: auto`` follows loaded weights: the
    stem and resize of ``weights_from`` (the checkpoint resumed, or the ``model.init`` run's), so
    its weights fit, else the ImageNet stem for ``model.pretrained`` (whose first conv is the 7x7
    one)."""
    options = cfg.model.arch_options()
    if options.get("stem") != "auto":  # a network without the stem option, or one chosen
        return options
    if weights_from is not None:
        saved = model_record(weights_from)["options"]
        options["stem"] = saved.get("stem", "auto")
        options["resize"] = options["resize"] or saved.get("resize", 0)
    elif cfg.model.pretrained:
        options["stem"] = "imagenet"
    return options


#: Below this side the ImageNet stem of a pretrained network leaves its last stage a map of
#: about 2 px or less (strides of 32).
SMALL_FOR_IMAGENET = 64


def small_image_note(cfg: TrainConfig, image_size: int) -> str | None:
    """A hint for ImageNet weights on small images with no resize, or None."""
    m = cfg.model
    options = m.arch_options()
    if not m.pretrained or "resize" not in options or m.resize or image_size >= SMALL_FOR_IMAGENET:
        return None
    return (
        f"{image_size} px images pass the pretrained ImageNet stem to a last feature map of about"
        f" {max(1, image_size // 32)} px; --set model.resize={SMALL_FOR_IMAGENET * 2} (or more)"
        " gives the pretrained features room"
    )


INIT_WEIGHTS: tuple[str, ...] = ("best", "swa", "last")


def init_checkpoint(spec: str) -> Path:
    """The checkpoint ``model.init`` names: ``RUN_DIR`` (its best.pt) or ``RUN_DIR:best|swa|last``.

    Raises:
        ConfigError: when the run folder holds no such checkpoint.
    """
    folder, _, name = spec.rpartition(":")
    if name not in INIT_WEIGHTS or not folder:
        folder, name = spec, "best"
    path = Path(folder) / "checkpoints" / f"{name}.pt"
    if not path.is_file():
        allowed = f"a run folder with checkpoints/{name}.pt, optionally :{'|'.join(INIT_WEIGHTS)}"
        raise ConfigError(f"model.init={spec!r}: {path} does not exist; allowed: {allowed}")
    return path


def load_init(cfg: TrainConfig) -> dict | None:
    """The checkpoint ``model.init`` names (None without one), read once for the model's options
    and its weights.

    Raises:
        ConfigError: when it holds a model of another arch.
    """
    if not cfg.model.init:
        return None
    path = init_checkpoint(cfg.model.init)
    ckpt = load_checkpoint(path)
    trained_as = model_record(ckpt)["arch"]
    if trained_as != cfg.model.arch:
        raise ConfigError(
            f"model.init={cfg.model.init!r}: {path} holds a {trained_as} model and this run"
            f" trains {cfg.model.arch}; allowed: a run of the same arch (--model {trained_as})"
        )
    return ckpt


def load_start_weights(
    cfg: TrainConfig,
    model: StagedModel,
    console: Console,
    class_names: list[str],
    init: dict | None = None,
) -> None:
    """Load ``model.pretrained`` and then ``init`` (the ``model.init`` checkpoint, see
    :func:`load_init`) into a new model, and print what matched (see
    :class:`models.weights.WeightReport`). The classifier is kept new for ImageNet weights, and
    for an init run whose class names differ from ``class_names`` (a head of the same shape
    would otherwise map old class i to new class i).

    Raises:
        ConfigError: in one line, for weights that cannot be fetched, read or used.
    """
    m, reports = cfg.model, []
    if m.pretrained:
        try:
            source = pretrained_imagenet(m.arch) if m.pretrained == "imagenet" else m.pretrained
            imagenet = m.pretrained == "imagenet"
            reports.append(load_weights(model, source, report=False, new_head=imagenet))
        except WeightsError as error:
            raise ConfigError(f"model.pretrained={m.pretrained!r}: {error}") from None
    if init is not None:
        try:
            other = list(init.get("class_names") or []) != list(class_names)
            reports.append(load_weights(model, init["model"], report=False, new_head=other))
        except WeightsError as error:
            raise ConfigError(f"model.init={m.init!r}: {error}") from None
    for report in reports:
        first, *rest = report.lines()  # "weights FILE: loaded n of m", then its details
        for line in [first, *(f"  {line}" for line in rest)]:
            console.print(line, markup=False, highlight=False, soft_wrap=True)


def build_trainer(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    console: Console | None = None,
    resume: dict | None = None,
    extra_callbacks: list[Callback] | None = None,
    world: World | None = None,
) -> Trainer:
    """Everything a run needs, in the order that keeps it reproducible: seed, then build.

    Under torchrun (``world``, else read from the environment) every process builds the same
    run; rank 0 alone prints, builds the cache and writes files, and the others' loaders yield
    their share of each batch.
    """
    world, device = join_world(cfg, world)
    is_main = world.is_main
    console = (console or Console()) if is_main else Console(quiet=True)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if is_main:
        remove_temp_leftovers(run_dir)
    if is_main and (message := slow_settings_warning(device, cfg.preset)):
        warn(console, message)
    cache = shared_cache(cfg, world)
    try:  # caught here, not after training, where the calibration would first use it
        resolve_tta_for_images(cfg.run.tta, tuple(cache.meta["image_shape"]))
    except ValueError as error:
        raise ConfigError(f"run.{error}") from None
    # The weights the model will hold decide its stem: a resumed run's, else model.init's.
    init = load_init(cfg) if resume is None else None
    model = build_model(cfg, cache, resume if resume is not None else init)
    if resume is None:  # a resumed run's weights come from its checkpoint
        load_start_weights(cfg, model, console, cache.class_names, init)
        if is_main and (note := small_image_note(cfg, cache.image_size)):
            console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    model = model.to(device)
    if world.rank:
        # Every process built the same model from the seed (and DDP hands out rank 0's weights
        # anyway); from here on each draws its own dropout and noise, as its images differ.
        torch.manual_seed(rank_seed(cfg.run.seed, world.rank))
    shard = Shard(world.rank, world.size)
    loaders = make_loaders(cache, cfg, device, make_generator(cfg.run.seed), shard=shard)
    criterion = build_criterion(cfg, cache).to(device)
    mixup = build_mixup(cfg, cache)
    distill = build_distillation(cfg, cache, device, console if is_main else None)
    resize = build_resize(cfg, cache, model, len(loaders["train"]), console if is_main else None)
    if is_main and cfg.regularize.dynamic_dropout and "dropout" not in model.capabilities:
        console.print(
            f"note: dynamic dropout is off: {cfg.model.arch} has no dropout a run can move",
            markup=False,
            highlight=False,
        )
    if is_main and (
        message := double_correction_warning(cfg.balance.loss_weights, cfg.data.balanced_sampling)
    ):
        warn(console, message)
    # Only rank 0 prints and logs.
    watchers: list[Callback] = (
        [ConsoleCallback(console, cfg.run.progress), MetricsLogger(run_dir, cfg.run.tensorboard)]
        if is_main
        else []
    )
    callbacks: list[Callback] = [
        # The regimen decides first, so the console and the log see the epoch's decisions.
        *regimen_callbacks(cfg, criterion, mixup, model.capabilities),
        *([resize] if resize else []),  # sets input_size before the console and log see it
        *([distill] if distill else []),  # adds kd_loss before the console and log see it
        *watchers,
        *(extra_callbacks or []),
    ]
    trainer = Trainer(
        cfg,
        model=model,
        cache=cache,
        loaders=loaders,
        device=device,
        amp_dtype=amp_dtype(device, cfg.run.amp),
        run_dir=run_dir,
        callbacks=callbacks,
        is_main=is_main,
        criterion=criterion,
        mixup=mixup,
        distill=distill,
        resize=resize,
        world=world,
        shard=shard,
    )
    if resume is not None:
        trainer.load_state(resume)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        print_plan(cfg, console, resumed=resume is not None)
        if cfg.schedule.kind == "staged":
            plot_schedule(
                staged_schedule(cfg),
                trainer.steps_per_epoch,
                cfg.run.epochs,
                run_dir,
                trainer.schedule.plateau.reductions,
                markers=plan_markers(cfg),
            )
    return trainer


def print_plan(cfg: TrainConfig, console: Console, *, resumed: bool = False) -> None:
    """The run's phases in epochs, one line each (:func:`training.plan.plan_lines`)."""
    stop = earliest_stop_epoch(cfg) if cfg.safety.early_stop else None
    lines = plan_lines(cfg, resumed=resumed, stop_not_before=stop)
    console.print(lines[0], style="bold", markup=False, highlight=False, soft_wrap=True)
    for line in lines[1:]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def build_criterion(cfg: TrainConfig, cache) -> WeightedCrossEntropy:
    """Cross-entropy (focal when ``optim.focal_gamma > 0``) with the configured class weights."""
    counts = np.bincount(cache.labels("train"), minlength=cache.num_classes)
    base = class_weights(counts.tolist(), cfg.balance.loss_weights, cfg.balance.beta)
    o = cfg.optim
    return WeightedCrossEntropy(cache.num_classes, base, o.label_smoothing, o.focal_gamma)


def build_mixup(cfg: TrainConfig, cache) -> Mixup | None:
    """Mixup with its own seeded generator (its state is checkpointed), or None when off."""
    r = cfg.regularize
    if not r.mixup or r.mixup_alpha == 0:
        return None
    generator = torch.Generator().manual_seed(cfg.run.seed + 1)
    return Mixup(
        cache.num_classes,
        start_alpha=r.mixup_alpha,
        end_epoch=r.mixup_end_epoch,
        label_smoothing=cfg.optim.label_smoothing,
        generator=generator,
    )


def build_resize(
    cfg: TrainConfig,
    cache,
    model: StagedModel,
    batches_per_epoch: int,
    console: Console | None = None,
) -> ProgressiveResize | None:
    """Progressive resizing along ``data.resize_schedule`` (None when it is empty), checked
    against the images' size and the model's minimum input size; warns on ``console`` when SWA
    averages weights trained below the final size.

    Raises:
        ConfigError: in one line, naming the field, the size and the limit.
    """
    schedule = cfg.data.resize_schedule
    if not schedule:
        return None
    if problem := check_against_model(schedule, cache.image_size, model.min_input_size):
        raise ConfigError(problem)
    s = cfg.safety
    note = swa_note(schedule, cfg.run.epochs, s.swa_start_epoch) if s.swa else None
    if console is not None and note:
        warn(console, note)
    return ProgressiveResize(schedule, cfg.run.epochs, batches_per_epoch)


def build_distillation(
    cfg: TrainConfig, cache, device: torch.device, console: Console | None = None
) -> Distillation | None:
    """Knowledge distillation from the ``kd.teacher`` runs (None when there are none), each
    rebuilt from its checkpoint on ``device``, frozen and in eval mode; prints on ``console`` a
    note per teacher whose batches are re-normalised.

    Raises:
        ConfigError: in one line naming the teacher and the field that does not fit.
    """
    kd = cfg.kd
    if not kd.teacher:
        return None
    height, width = cache.meta["image_shape"][:2]
    teachers, notes = load_teachers(
        kd.teacher,
        kd.weights,
        class_names=cache.class_names,
        input_size=min(height, width),
        channels=cache.channels,
        mean=cache.mean,
        std=cache.std,
        device=device,
    )
    if console is not None:
        names = ", ".join(f"{t.run_dir} ({t.weights})" for t in teachers)
        console.print(
            f"distillation: T={kd.temperature:g}, alpha={kd.alpha:g}, teacher: {names}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        for note in notes:
            console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    return Distillation(teachers, kd.temperature, kd.alpha)
