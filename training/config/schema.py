"""The training configuration: typed defaults -> preset -> YAML file -> command line, validated.

Every setting lives in one :class:`TrainConfig` made of ten sections (:data:`SECTIONS`: ``data``,
``model``, ``optim``, ``schedule``, the regimen's ``unfreeze``, ``regularize``, ``balance`` and
``safety``, ``kd`` (distillation) and ``run``). A run's configuration is resolved in layers, later
ones winning:

1. the dataclass defaults (the designed long GPU run);
2. a preset from :data:`PRESETS` (``--preset cpu`` for a laptop run of minutes); the command
   line picks one from the hardware when neither ``--preset`` nor the file names one;
3. a YAML file with the same nested section names (``--config FILE.yaml``);
4. ``--set section.field=value`` overrides, values read as YAML (numbers, bools, lists);
5. the shortcut flags (``--epochs``, ``--lr``, ...).

A preset plans for its own length (``run.epochs`` after layer 2). When layers 3-5 ask for another
length, every setting counted in epochs that they do not set is scaled to it
(:func:`training.plan.scale_plan`); values the user sets stay as given.

Each field carries a rule (its allowed values in words plus a check), so one validator covers
every field and every error message names the field path, the bad value and what is allowed::

    optim.lr=-1.0 is invalid; allowed: a number > 0

A value the file, ``--set`` or a flag changes is refused when a setting the user left alone
makes it unused (:data:`_INACTIVE`: ``model.width`` beside ``model.block_channels``,
``model.gn_groups`` with ``norm=batch``, one schedule kind's fields under the other, a
switched-off feature's settings)::

    model.width=0.125 has no effect while model.block_channels=[32, 64, 128] (the cpu preset sets
    it); set model.block_channels=[] to use width, or leave width unset

When the user changed that setting too (switching a feature off for an ablation), the run keeps
the value and names it in one line at start (:func:`unused_note`, :attr:`TrainConfig.unused`).

Public API:
    DataConfig, ModelSection, OptimConfig, ScheduleConfig, UnfreezeConfig, RegularizeConfig,
    BalanceConfig, SafetyConfig, RunConfig, TrainConfig, SECTIONS, PRESETS, ConfigError,
    load_config, validate_config, config_to_dict, config_from_dict, save_config, LEGACY_DEFAULTS,
    format_config, config_changes, format_changes, unused_note,
    earliest_swa_epoch.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from models.basic_cnn_model import (
    ACTIVATIONS,
    CONV_BLOCKS,
    DEFAULT_DEPTHS,
    DEFAULT_STRIDES,
    DOWNSAMPLES,
    LEGACY_FIELDS,
    LINEAR_INITS,
    NORMS,
    STEM_STRIDES,
)
from models.registry import (
    ARCH_NAMES,
    DEFAULT_ARCH,
    capabilities,
    check_options,
    is_registered,
)
from models.staged import DIRECTIONS
from training.config.plan import (
    EPOCH_FIELDS,
    Rescale,
    StagePlan,
    first_swa_epoch,
    scale_plan,
    stage_plan,
    unfreeze_direction,
)
from training.engine.atomic import create_temp_beside
from training.engine.resize import schedule_problem
from training.evaluation.tta import TTA_MODES


class ConfigError(ValueError):
    """A configuration value, key, preset or file that cannot be used; the message is one line."""


#: Fewest images in a training batch: the model's heads normalise with BatchNorm1d, which in
#: training mode needs more than one value per channel.
MIN_TRAIN_BATCH = 2


MAX_SEED = 2**32 - 1  # numpy's seed range; torch accepts it too


DEVICES_TEXT = "auto, cpu, cuda, cuda:N, mps"


_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass(frozen=True)
class Rule:
    """What a field accepts: ``allowed`` in words (for messages) and ``ok`` to check a value.

    ``ok`` only ever sees a value already coerced to the field's type.
    """

    allowed: str
    ok: Callable[[Any], bool] = lambda value: True


def _choice(*options: str) -> Rule:
    return Rule(", ".join(options), lambda v: v in options)


def _int_at_least(low: int, note: str = "") -> Rule:
    return Rule(f"an int >= {low}{note}", lambda v: v >= low)


def _int_between(low: int, high: int) -> Rule:
    return Rule(f"an int in {low}..{high}", lambda v: low <= v <= high)


POSITIVE = Rule("a number > 0", lambda v: v > 0)


NON_NEGATIVE = Rule("a number >= 0", lambda v: v >= 0)


RATE = Rule("a number in [0, 1)", lambda v: 0 <= v < 1)


UNIT = Rule("a number in [0, 1]", lambda v: 0 <= v <= 1)


BOOL = Rule("true or false")


TEXT = Rule("a non-empty string", lambda v: bool(v.strip()))


SEED = _int_between(0, MAX_SEED)


def _rates(length: int) -> Rule:
    return Rule(
        f"a list of {length} numbers in [0, 1)",
        lambda v: len(v) == length and all(0 <= p < 1 for p in v),
    )


def _all_at_least(low: float) -> Callable[[list[float]], bool]:
    return lambda v: all(x >= low for x in v)


def _all_above(low: float) -> Callable[[list[float]], bool]:
    return lambda v: all(x > low for x in v)


def _n_above(length: int, low: float) -> Callable[[list[float]], bool]:
    return lambda v: len(v) == length and all(x > low for x in v)


# basic_cnn's lists have one entry per block; the model checks the count (check_options).
_BLOCK_CHANNELS = Rule(
    "[] (base widths x width) or a list of ints >= 1, one per block",
    lambda v: all(c >= 1 for c in v),
)


_BLOCK_DEPTHS = Rule("a list of ints >= 1, one per block", lambda v: all(d >= 1 for d in v))


_BLOCK_STRIDES = Rule(
    "a list of ints, each 1 or 2, one per block", lambda v: all(s in (1, 2) for s in v)
)
_STEM_STRIDE = Rule(
    "0 (auto: from the image size) or " + ", ".join(map(str, STEM_STRIDES)),
    lambda v: v == 0 or v in STEM_STRIDES,
)
_BLOCK_RATES = Rule(
    "a list of numbers in [0, 1), one per block", lambda v: all(0 <= p < 1 for p in v)
)


def _epochs_ok(v: list[float]) -> bool:
    ints = all(float(x).is_integer() and x >= 1 for x in v)
    return ints and all(a < b for a, b in zip(v, v[1:], strict=False))


def _field(default: Any, rule: Rule) -> Any:
    """A dataclass field with its rule in the metadata (lists get a fresh copy per instance)."""
    meta = {"rule": rule}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where the images come from and how they are split, augmented and loaded.

    Args:
        source: the embedded sample ``bloodcells_mini`` (the default: 3,000 blood-cell images
            shipped with the package, no download), a MedMNIST name (``bloodmnist``,
            ``bloodmnist_64``), an ``.npz`` path or an image folder.
        root: the cache root the source is converted into.
        val_fraction: share of train carved out as validation when the source has none.
        split_seed: seed of the carved splits.
        drop_leaked_test: drop test images whose pixels also occur in train or val.
        augment: apply training augmentation.
        aug_strength: augmentation strength in [0, 1] once the ramp is over.
        aug_start_strength: strength at epoch 1, in [0, 1]; it rises linearly to
            ``aug_strength`` over ``aug_ramp_epochs``.
        aug_ramp_epochs: epochs of the strength ramp; 0 uses ``aug_strength`` from the start.
        workers: DataLoader worker processes; -1 picks a number from the CPU count.
        balanced_sampling: draw training batches with class-balanced sampling.
        image_size: for an image folder, resize every image to this square size; 0 keeps the
            folder's most common size. Each size gets its own cache, ``<folder>_<size>px``.
        classes: train, validate and test on these classes only, labelled 0..k-1 in the order
            given (class names of the cache, at least 2); [] uses every class. The cache stays
            the same: the subset is an index over it, normalised with the full train split's
            mean/std.
        train_fraction: share of each class's training images used, in (0, 1]: the first
            ceil(fraction x n) of a per-class permutation seeded by ``split_seed``, so smaller
            fractions are nested in larger ones; val and test are not reduced. With
            ``cv_folds`` it reduces the fold's training part only.
        cv_folds: k-fold cross-validation: 0 (off), or k >= 2 to pool the cache's train and val
            splits, split them into k stratified folds seeded by ``split_seed`` (copies and
            near copies of one image in one fold), validate on fold ``cv_fold`` and train on
            the rest; the test split is unchanged. An index over the same cache, like
            ``classes``.
        cv_fold: the validation fold, 0..cv_folds-1 (``python -m experiments cv`` trains each).
        resize_schedule: progressive resizing: ``[start, size]`` pairs, ``start`` a fraction of
            the run in [0, 1) (the first 0, increasing) from which training batches are resized
            to ``size`` px (increasing; the last the images' size, each at least the model's
            minimum), e.g. ``[[0, 32], [0.4, 48], [0.7, 64]]``; validation and test stay at the
            full size; [] = off.
    """

    source: str = _field("bloodcells_mini", TEXT)
    root: str = _field("data_npy", TEXT)
    # dataset.cache.prepare accepts (0, 0.5); checking here fails before any data is touched.
    val_fraction: float = _field(0.1, Rule("a number in (0, 0.5)", lambda v: 0 < v < 0.5))
    split_seed: int = _field(0, SEED)
    drop_leaked_test: bool = _field(False, BOOL)
    augment: bool = _field(True, BOOL)
    aug_strength: float = _field(1.0, UNIT)
    aug_start_strength: float = _field(0.3, UNIT)
    aug_ramp_epochs: int = _field(10, _int_at_least(0, " (0 = no ramp)"))
    workers: int = _field(-1, _int_at_least(-1, " (-1 = auto)"))
    balanced_sampling: bool = _field(False, BOOL)
    image_size: int = _field(0, _int_at_least(0, " (0 = the folder's most common size)"))
    classes: list[str] = _field(
        [],
        Rule(
            "[] (all classes) or a list of at least 2 distinct class names",
            lambda v: not v or (len(v) >= 2 and len(set(v)) == len(v) and all(n for n in v)),
        ),
    )
    train_fraction: float = _field(1.0, Rule("a number in (0, 1]", lambda v: 0 < v <= 1))
    cv_folds: int = _field(0, Rule("0 (off) or an int >= 2", lambda v: v == 0 or v >= 2))
    cv_fold: int = _field(0, _int_at_least(0))
    resize_schedule: list[list[float]] = _field(
        [], Rule("[] (off) or a list of [start, size] pairs")
    )


@dataclass
class ModelSection:
    """The network: which one, its weights, and its shape; the dataset fills in channels,
    classes and image size.

    Args:
        arch: the registered network (``--model``): ``basic_cnn``, a torchvision family
            (``resnet18``, ``resnet50``, ``densenet121``, ``efficientnet_b0``, ``vgg16_bn``,
            ``mobilenet_v2``, ``inception_v3``) or ``timm/<name>`` for any timm model.
        stem: zoo models: "imagenet" (the library's stem), "cifar" (a 3x3 stride-1 first conv
            and no max-pool, for small images) or "auto" (cifar below 64 px where the arch has
            it, imagenet otherwise).
        resize: zoo models: resize every image to this many px inside the model; 0 = off.
        pretrained: "" (random weights), "imagenet" (the library's own ImageNet weights) or a
            weights file (``.pth``/``.pt`` state dict or ``.safetensors``).
        init: start from another run's weights: ``RUN_DIR`` or ``RUN_DIR:best|swa|last``
            (best by default); the classifier is replaced when the classes differ.
        width: basic_cnn: channel multiplier > 0.
        norm: basic_cnn: normalisation inside the conv blocks, "group" or "batch".
        activation: basic_cnn: "silu", "gelu" or "mish".
        gn_groups: basic_cnn: GroupNorm groups (``norm="group"`` only).
        noise_std: basic_cnn: std of the Gaussian input noise in training mode.
        dropout: basic_cnn: Dropout2d rates of blocks 1, 2 and 3, each in [0, 1).
        active_blocks: basic_cnn: blocks active at the start of training; the unfreezing
            schedule (section ``unfreeze``) activates the others during the run.
        downsample: basic_cnn: "maxpool" or "stride", how each block halves the resolution.
        block_channels: basic_cnn: output channels of blocks 1, 2 and 3 (``width`` is then not
            used: a ``width`` set under a preset's channels is refused); ``[]`` scales the base
            widths (64, 512, 256) by ``width``.
        linear_init: basic_cnn: "kaiming" (like the convolutions) or "torch" (PyTorch's
            ``nn.Linear`` default) for the heads' adapters and the classifier.
        conv_block: basic_cnn: "single" (one conv per residual block) or "basic" (two,
            ResNet-style).
        block_depths: basic_cnn: how many residual blocks each of blocks 1, 2 and 3 stacks,
            each >= 1.
        block_strides: basic_cnn: 1 (keep) or 2 (halve the feature map) at the end of blocks 1,
            2 and 3.
        stem_stride: basic_cnn: how much a strided conv (and a max-pool beyond 2) shrinks the
            images before block 1: 1 (no stem), 2, 4, 8 or 16; 0 (auto) picks the largest that
            leaves block 1 at least 28 px, so the blocks see 28-55 px whatever the image size
            (none below 56 px, 2 for 64 px, 4 for 128 px).
    """

    arch: str = _field(DEFAULT_ARCH, Rule(", ".join(ARCH_NAMES), is_registered))
    stem: str = _field("auto", _choice("auto", "imagenet", "cifar"))
    resize: int = _field(0, _int_at_least(0, " (0 = off)"))
    pretrained: str = _field("", Rule("'', imagenet or a weights file (.pth, .pt, .safetensors)"))
    init: str = _field("", Rule("'' or a run folder, optionally :best, :swa or :last"))
    width: float = _field(1.0, POSITIVE)
    norm: str = _field("group", _choice(*NORMS))
    activation: str = _field("silu", _choice(*ACTIVATIONS))
    gn_groups: int = _field(8, _int_at_least(1))
    noise_std: float = _field(0.05, NON_NEGATIVE)
    dropout: list[float] = _field([0.1, 0.2, 0.3], _BLOCK_RATES)
    active_blocks: int = _field(1, _int_at_least(1, ", at most the block count"))
    downsample: str = _field("maxpool", _choice(*DOWNSAMPLES))
    block_channels: list[int] = _field([], _BLOCK_CHANNELS)
    linear_init: str = _field("kaiming", _choice(*LINEAR_INITS))
    conv_block: str = _field("single", _choice(*CONV_BLOCKS))
    block_depths: list[int] = _field(list(DEFAULT_DEPTHS), _BLOCK_DEPTHS)
    block_strides: list[int] = _field(list(DEFAULT_STRIDES), _BLOCK_STRIDES)
    stem_stride: int = _field(0, _STEM_STRIDE)

    def arch_options(self) -> dict[str, Any]:
        """The options of this section that shape ``arch`` (:func:`models.registry.build_model`)."""
        if self.arch != DEFAULT_ARCH:
            return {"stem": self.stem, "resize": self.resize}
        return {name: getattr(self, name) for name in BASIC_CNN_FIELDS}


#: The fields of the model section that shape basic_cnn only.
BASIC_CNN_FIELDS: tuple[str, ...] = (
    "width",
    "norm",
    "activation",
    "gn_groups",
    "noise_std",
    "dropout",
    "active_blocks",
    "downsample",
    "block_channels",
    "linear_init",
    "conv_block",
    "block_depths",
    "block_strides",
    "stem_stride",
)
#: Fields of the model section that shape zoo models only.
ZOO_FIELDS: tuple[str, ...] = ("stem", "resize")


@dataclass
class OptimConfig:
    """The optimizer (AdamW) and the loss.

    Args:
        lr: peak learning rate (the end of the warmup).
        weight_decay: decoupled weight decay.
        betas: Adam's two moment coefficients.
        batch_size: images per optimizer step.
        accumulation: micro-batches accumulated per optimizer step.
        clip_grad: max gradient norm; 0 turns clipping off.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        focal_gamma: 0 trains with cross-entropy; > 0 with the focal loss (Lin et al. 2017),
            which scales each sample's loss by ``(1 - p_true)^focal_gamma`` (2 in the paper).
    """

    lr: float = _field(1e-2, POSITIVE)
    weight_decay: float = _field(0.05, NON_NEGATIVE)
    betas: list[float] = _field([0.9, 0.999], _rates(2))
    batch_size: int = _field(128, _int_at_least(MIN_TRAIN_BATCH, " (BatchNorm needs two images)"))
    accumulation: int = _field(1, _int_at_least(1))
    clip_grad: float = _field(1.0, Rule("a number >= 0 (0 = off)", lambda v: v >= 0))
    label_smoothing: float = _field(0.0, RATE)
    focal_gamma: float = _field(0.0, NON_NEGATIVE)


@dataclass
class ScheduleConfig:
    """The learning-rate schedule, a function of the optimizer step (accumulation-proof).

    ``staged`` (the design): linear warmup to the peak ``optim.lr`` -> one-cycle annealing to
    ``onecycle_end_lr`` -> cosine to ``cosine_end_lr`` -> reduce-on-plateau, with floors.
    ``cosine``: linear warmup, then one cosine down to ``min_lr`` at the last epoch.

    Args:
        kind: "staged" or "cosine".
        warmup_epochs: epochs of linear warmup.
        onecycle_end_epoch: end of the one-cycle phase (staged).
        onecycle_end_ratio: learning rate at ``onecycle_end_epoch``, as a fraction of the peak.
        cosine_end_epoch: end of the cosine phase, start of the plateau phase (staged).
        cosine_end_ratio: learning rate at ``cosine_end_epoch``, as a fraction of the peak, at
            most ``onecycle_end_ratio``.
        plateau_factor: multiplier of each reduce-on-plateau cut (staged).
        plateau_patience: validation epochs without improvement before a cut (staged).
        floor_epochs: epochs from which each floor applies, increasing (staged).
        floor_lrs: the floors, one per ``floor_epochs`` entry (staged).
        min_lr: the learning rate the cosine decays to, at most ``optim.lr`` (cosine).
    """

    kind: str = _field("staged", _choice("staged", "cosine"))
    warmup_epochs: int = _field(5, _int_at_least(0))
    onecycle_end_epoch: int = _field(20, _int_at_least(1))
    onecycle_end_ratio: float = _field(0.2, Rule("a number in (0, 1]", lambda v: 0 < v <= 1))
    cosine_end_epoch: int = _field(40, _int_at_least(1))
    cosine_end_ratio: float = _field(0.1, Rule("a number in (0, 1]", lambda v: 0 < v <= 1))
    plateau_factor: float = _field(0.1, Rule("a number in (0, 1)", lambda v: 0 < v < 1))
    plateau_patience: int = _field(3, _int_at_least(1))
    floor_epochs: list[float] = _field([40, 50], Rule("a list of epochs >= 0", _all_at_least(0)))
    floor_lrs: list[float] = _field([1e-3, 1e-4], Rule("a list of numbers > 0", _all_above(0)))
    min_lr: float = _field(1e-5, NON_NEGATIVE)


@dataclass
class UnfreezeConfig:
    """Progressive unfreezing: stages join the trainable set one at a time.

    Args:
        direction: "grow" (stage 1 first, deeper ones join; basic_cnn starts with
            ``model.active_blocks``), "thaw" (the head alone first, then stages from the deepest
            down, each a group at ``old_group_decay`` times the rate of the one above), "all"
            (every stage from the start) or "auto": grow for basic_cnn, thaw for a zoo model
            with loaded weights (``model.pretrained`` or ``model.init``), all otherwise.
        enabled: let stages join during the run; false keeps the starting set throughout (a
            linear probe, when thawing).
        activate_at: epochs at whose end stages join at the latest, one per joining stage
            (basic_cnn: blocks 2 and 3, one entry never activates block 3). A zoo model whose
            stage count differs from the preset's entries gets one stage per
            ``(last - first) / (joins - 1)`` epochs from the preset's first entry.
        plateau_patience: epochs without improvement of ``run.monitor`` that bring the next
            activation forward; 0 turns the plateau trigger off.
        min_gap: least number of epochs between two activations.
        lr_mult: learning-rate multipliers of the joining stages' parameter groups, one per
            entry of ``activate_at`` (1 for a zoo model whose count differs from the preset's).
        old_group_decay: discriminative rates, in (0, 1]: growing, the older groups' rates are
            multiplied by this at each activation; thawing, each stage's rate is this times the
            rate of the stage above it (the head's is the peak).
        warmup_epochs: a new group's rate rises from 0.1x to its full rate over this many epochs.
        head_blend_epochs: the classifier's input fades from the previous block's head to the
            new block's over this many epochs (0: switch at once, with the new head untrained).
    """

    direction: str = _field("auto", _choice("auto", *DIRECTIONS))
    enabled: bool = _field(True, BOOL)
    activate_at: list[float] = _field([15, 30], Rule("increasing epochs >= 1", _epochs_ok))
    plateau_patience: int = _field(5, _int_at_least(0, " (0 = off)"))
    min_gap: int = _field(5, _int_at_least(1))
    lr_mult: list[float] = _field([1.0, 1.0], Rule("numbers > 0", _all_above(0)))
    old_group_decay: float = _field(1.0, Rule("a number in (0, 1]", lambda v: 0 < v <= 1))
    warmup_epochs: float = _field(1.0, NON_NEGATIVE)
    head_blend_epochs: float = _field(1.0, NON_NEGATIVE)


@dataclass
class RegularizeConfig:
    """Mixup and dynamic dropout.

    Args:
        mixup: mix training batches (Zhang et al. 2018) with a soft-target loss.
        mixup_alpha: Beta(alpha, alpha) concentration at epoch 0; decays linearly to 0.
        mixup_end_epoch: epoch at which alpha reaches 0.
        dynamic_dropout: move the Dropout2d rates once per epoch from the train-val gap.
        dropout_signal: "acc" (train_acc - val_acc) or "loss" (val_loss - train_loss).
        dropout_min, dropout_max: bounds of every rate.
        dropout_step: change of a rate per decision.
        overfit_gap: a gap above this raises the rates.
        underfit_gap: a gap below this lowers them.
    """

    mixup: bool = _field(True, BOOL)
    mixup_alpha: float = _field(0.4, NON_NEGATIVE)
    mixup_end_epoch: float = _field(15.0, POSITIVE)
    dynamic_dropout: bool = _field(True, BOOL)
    dropout_signal: str = _field("acc", _choice("acc", "loss"))
    dropout_min: float = _field(0.0, RATE)
    dropout_max: float = _field(0.5, RATE)
    dropout_step: float = _field(0.05, POSITIVE)
    overfit_gap: float = _field(0.05, Rule("a number"))
    underfit_gap: float = _field(0.01, Rule("a number"))


@dataclass
class BalanceConfig:
    """Class-balanced loss weights and the per-class penalty.

    Args:
        loss_weights: "none", "inverse" (inverse frequency) or "effective" (Cui et al. 2019).
        beta: the effective-number hyper-parameter in [0, 1).
        penalty: adjust per-class loss weights each epoch from the train-val accuracy gap and
            the validation recall of each class.
        penalty_strength: scale of the penalty, >= 0.
        penalty_momentum: smoothing of the penalty weights, in [0, 1).
        penalty_min, penalty_max: bounds of a class's penalty weight.
    """

    loss_weights: str = _field("effective", _choice("none", "inverse", "effective"))
    beta: float = _field(0.999, RATE)
    penalty: bool = _field(True, BOOL)
    penalty_strength: float = _field(1.0, NON_NEGATIVE)
    penalty_momentum: float = _field(0.7, RATE)
    penalty_min: float = _field(0.5, Rule("a number in (0, 1]", lambda v: 0 < v <= 1))
    penalty_max: float = _field(2.0, Rule("a number >= 1", lambda v: v >= 1))


@dataclass
class SafetyConfig:
    """Rollback, early stopping, SWA and temperature scaling.

    Args:
        rollback: restore the best weights and optimizer state when the monitored metric falls
            more than ``rollback_threshold`` below the best, or the loss is not finite.
        rollback_threshold: allowed drop (absolute, in the metric's units).
        rollback_patience: epochs in a row the drop must last before a rollback (a non-finite
            loss or metric rolls back at once).
        max_rollbacks: rollbacks allowed per run.
        rollback_lr_cut: learning-rate multiplier applied at each rollback.
        early_stop: stop when the metric has not improved for ``patience`` epochs (never at or
            before the last scheduled activation).
        patience: epochs without improvement before stopping.
        min_delta: the least improvement that counts.
        swa: average the weights (Izmailov et al. 2018) from ``swa_start_epoch`` on; saved as
            ``checkpoints/swa.pt`` with BatchNorm statistics recomputed.
        swa_start_epoch: first epoch whose weights enter the average; after the last activation.
        temperature: fit one temperature on the validation set at the end (Guo et al. 2017) and
            store it in best.pt and swa.pt.
    """

    rollback: bool = _field(True, BOOL)
    rollback_threshold: float = _field(0.05, POSITIVE)
    rollback_patience: int = _field(1, _int_at_least(1))
    max_rollbacks: int = _field(3, _int_at_least(0))
    rollback_lr_cut: float = _field(0.5, Rule("a number in (0, 1]", lambda v: 0 < v <= 1))
    early_stop: bool = _field(True, BOOL)
    patience: int = _field(10, _int_at_least(1))
    min_delta: float = _field(0.0, NON_NEGATIVE)
    swa: bool = _field(True, BOOL)
    swa_start_epoch: int = _field(45, _int_at_least(1))
    temperature: bool = _field(True, BOOL)


@dataclass
class RunConfig:
    """How and where the run executes.

    Args:
        epochs: epochs to train. The other settings counted in epochs follow it: a length other
            than the preset's (60, 30 for ``cpu``) scales those not set explicitly
            (``training.plan``).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        amp: mixed precision, "auto" (float16 on CUDA, bfloat16 on a CPU with native bf16,
            off elsewhere), "off", "fp16", "bf16".
        seed: seed of torch, numpy and random.
        deterministic: ask torch for deterministic kernels (slower).
        run_dir: output folder; "" means ``runs/<dataset>-<timestamp>``.
        monitor: metric that picks the best checkpoint.
        threads: torch CPU threads; 0 keeps torch's default.
        progress: console progress, "auto", "bar", "plain" or "off".
        tensorboard: write TensorBoard event files.
        tta: test-time augmentation of the final calibration and of ``test.py``: "none",
            "hflip", "d4" or "auto" (the flips and rotations training augments with, see
            ``training.tta``); validation during training stays a single pass.
        dist_timeout: minutes a process launched by torchrun waits for the others at a
            collective before it stops with an error (rank 0 may build the cache meanwhile).
    """

    epochs: int = _field(60, _int_at_least(1))
    device: str = _field("auto", Rule(DEVICES_TEXT, lambda v: bool(_DEVICE_RE.fullmatch(v))))
    amp: str = _field("auto", _choice("auto", "off", "fp16", "bf16"))
    seed: int = _field(0, SEED)
    deterministic: bool = _field(False, BOOL)
    run_dir: str = _field("", Rule("a folder path, or '' for runs/<dataset>-<timestamp>"))
    monitor: str = _field("val_acc", _choice("val_acc", "val_macro_f1", "val_loss"))
    threads: int = _field(0, _int_at_least(0, " (0 = torch default)"))
    progress: str = _field("auto", _choice("auto", "bar", "plain", "off"))
    tensorboard: bool = _field(True, BOOL)
    tta: str = _field("none", _choice(*TTA_MODES))
    dist_timeout: float = _field(30.0, POSITIVE)


#: ``kd.weights``: the weight set taken from each teacher run; "final" is the one a run ends with
#: (SWA, else best, else last).
KD_WEIGHT_SETS: tuple[str, ...] = ("final", "best", "swa", "last")


@dataclass
class KdConfig:
    """Knowledge distillation from trained runs (Hinton et al. 2015; see docs/distillation.md).

    Args:
        teacher: the teacher's run folders: [] (off), one run folder, or several (an ensemble
            teacher: the mean of their logits). ``--teacher`` on models/train.py sets it and
            turns a study folder into its finished members.
        temperature: softmax temperature T of teacher and student in the distillation term.
        alpha: weight of the distillation term: (1 - alpha) x the base loss + alpha x T^2 x
            KL(teacher || student).
        weights: each teacher run's weight set: final (the one the run ends with: SWA, else
            best, else last), best, swa or last.
    """

    teacher: list[str] = _field(
        [],
        Rule("[] (off), a run folder or a list of run folders", lambda v: all(map(str.strip, v))),
    )
    temperature: float = _field(4.0, POSITIVE)
    alpha: float = _field(0.5, UNIT)
    weights: str = _field("final", _choice(*KD_WEIGHT_SETS))

    def __post_init__(self) -> None:
        # One folder may be given as text (--set kd.teacher=runs/a); "" or empty is off.
        if self.teacher is None or isinstance(self.teacher, str):
            self.teacher = [self.teacher] if self.teacher and self.teacher.strip() else []


@dataclass
class TrainConfig:
    """The whole training configuration; build it with :func:`load_config`.

    Args:
        data, model, optim, schedule, run: the sections.
        preset: name of the preset the run started from ("" for none).
        scaling: how the epoch settings were fitted to ``run.epochs`` when the configuration was
            resolved (None: as planned, or rebuilt from a stored config); not saved.
        unused: the user's settings that a setting the user also changed leaves unused, as
            ``path=value (switch=value)`` notes for the start of the run; not saved.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    run: RunConfig = field(default_factory=RunConfig)
    kd: KdConfig = field(default_factory=KdConfig)
    preset: str = ""
    scaling: Rescale | None = field(default=None, compare=False, repr=False)
    unused: tuple[str, ...] = field(default=(), compare=False, repr=False)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelSection,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "unfreeze": UnfreezeConfig,
    "regularize": RegularizeConfig,
    "balance": BalanceConfig,
    "safety": SafetyConfig,
    "run": RunConfig,
    "kd": KdConfig,
}


#: Fields added after runs were first stored, by section, with the value those older runs used
#: (their stored section lacks the key): such a run resumes, or is rebuilt, as it was trained.
LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {"model": LEGACY_FIELDS}


#: The presets, in the order they are offered: nested overrides on the defaults, one YAML file
#: each in ``training/config/presets/`` ("full" is the defaults themselves; "cpu" is narrow and
#: short so a laptop finishes in minutes). The files say why each value is what it is.
PRESET_NAMES: tuple[str, ...] = ("full", "cpu")
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def _read_presets() -> dict[str, dict]:
    presets = {}
    for name in PRESET_NAMES:
        tree = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        presets[name] = tree or {}
    return presets


PRESETS: dict[str, dict] = _read_presets()


class _BadType(Exception):
    """A value that cannot be coerced to its field's type."""


def _field_types(section: str) -> dict[str, Any]:
    # get_type_hints resolves the string annotations that `from __future__ import annotations`
    # leaves on the dataclass fields.
    return get_type_hints(SECTIONS[section])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_float(value: Any) -> float:
    # Strings are accepted because YAML 1.1 reads "1e-3" (no dot) as a string, not a float.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _BadType from None
    if not _is_number(value) or not math.isfinite(value):
        raise _BadType
    return float(value)


def _to_int(value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _BadType from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not _is_number(value) or not isinstance(value, int):
        raise _BadType
    return value


def _to_str(value: Any) -> str:
    if value is None:  # an empty YAML value, e.g. "run_dir:"
        return ""
    if isinstance(value, str):
        return value
    if _is_number(value):
        return str(value)
    raise _BadType


def _to_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _BadType
    return value


_SCALARS: dict[Any, Callable[[Any], Any]] = {
    float: _to_float,
    int: _to_int,
    str: _to_str,
    bool: _to_bool,
}


def _coerce(value: Any, kind: Any) -> Any:
    if kind in _SCALARS:
        return _SCALARS[kind](value)
    # The only container types in the sections are list[float] and list[int].
    if not isinstance(value, (list, tuple)):
        raise _BadType
    (item_kind,) = get_args(kind)
    return [_coerce(item, item_kind) for item in value]  # list[list[float]] nests


def _invalid(path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}={value!r} is invalid; allowed: {allowed}")


def _check_section(name: str, section: Any) -> None:
    """Coerce every field of one section to its type in place, then check its rule."""
    kinds = _field_types(name)
    for f in fields(section):
        path, rule = f"{name}.{f.name}", f.metadata["rule"]
        raw = getattr(section, f.name)
        try:
            value = _coerce(raw, kinds[f.name])
        except _BadType:
            raise _invalid(path, raw, rule.allowed) from None
        if not rule.ok(value):
            raise _invalid(path, value, rule.allowed)
        setattr(section, f.name, value)


def _check_fields(cfg: TrainConfig) -> None:
    """Coerce and check every field on its own (no rule between fields)."""
    for name in SECTIONS:
        section = getattr(cfg, name)
        if not isinstance(section, SECTIONS[name]):
            raise ConfigError(f"{name} must be a {SECTIONS[name].__name__}, got {section!r}")
        _check_section(name, section)


def validate_config(cfg: TrainConfig) -> None:
    """Check every field (normalising types in place, e.g. an int lr becomes a float).

    Raises:
        ConfigError: naming the first bad field, its value and the allowed values.
    """
    _check_fields(cfg)
    if cfg.schedule.min_lr > cfg.optim.lr:
        allowed = f"a number in [0, optim.lr={cfg.optim.lr!r}]"
        raise _invalid("schedule.min_lr", cfg.schedule.min_lr, allowed)
    _check_staged(cfg)
    _check_regimen(cfg)
    _check_resize(cfg.data)
    if cfg.kd.teacher and cfg.data.resize_schedule:
        # The teacher would be given the shrunken batches, not the images it was trained on.
        raise ConfigError(
            "kd.teacher and data.resize_schedule cannot be combined: the teacher would see the "
            "resized batches, not images of the size it was trained at; use one of them"
        )
    if cfg.data.cv_folds and cfg.data.cv_fold >= cfg.data.cv_folds:
        allowed = f"an int in 0..{cfg.data.cv_folds - 1} (data.cv_folds={cfg.data.cv_folds})"
        raise _invalid("data.cv_fold", cfg.data.cv_fold, allowed)
    if cfg.preset and cfg.preset not in PRESETS:
        raise _invalid("preset", cfg.preset, ", ".join(PRESETS) + " or ''")


def staged_schedule(cfg: TrainConfig):
    """The :class:`~training.schedule.StagedSchedule` that ``cfg.schedule`` describes."""
    from training.engine.schedule import (
        StagedSchedule,  # imported here: the schedule needs matplotlib
    )

    s = cfg.schedule
    return StagedSchedule(
        peak=cfg.optim.lr,
        warmup_epochs=s.warmup_epochs,
        onecycle_end_epoch=s.onecycle_end_epoch,
        onecycle_end=cfg.optim.lr * s.onecycle_end_ratio,
        cosine_end_epoch=s.cosine_end_epoch,
        cosine_end=cfg.optim.lr * s.cosine_end_ratio,
        plateau_factor=s.plateau_factor,
        plateau_patience=s.plateau_patience,
        floors=tuple(zip(s.floor_epochs, s.floor_lrs, strict=True)),
    )


def _check_resize(d: DataConfig) -> None:
    """The schedule's own rules, and its last size against ``data.image_size`` when set; the
    images' and the model's sizes are checked once both are known (``training.build``)."""
    if problem := schedule_problem(d.resize_schedule):
        raise _invalid("data.resize_schedule", d.resize_schedule, problem)
    last = int(d.resize_schedule[-1][1]) if d.resize_schedule else 0
    if d.image_size and last and last != d.image_size:
        allowed = f"a last size equal to data.image_size={d.image_size} (got {last})"
        raise _invalid("data.resize_schedule", d.resize_schedule, allowed)


def _check_staged(cfg: TrainConfig) -> None:
    s = cfg.schedule
    if len(s.floor_epochs) != len(s.floor_lrs):
        allowed = f"one floor per schedule.floor_epochs entry ({len(s.floor_epochs)})"
        raise _invalid("schedule.floor_lrs", s.floor_lrs, allowed)
    if s.kind != "staged":
        return
    try:
        staged_schedule(cfg)
    except ValueError as exc:
        # The schedule names its own field (e.g. "onecycle_end=0.02 is invalid; ...").
        raise ConfigError(f"schedule (staged, peak optim.lr={cfg.optim.lr!r}): {exc}") from None


def unfreezes(cfg: TrainConfig) -> bool:
    """Whether stages join during the run (unfreezing on, and not every stage from the start)."""
    return cfg.unfreeze.enabled and unfreeze_direction(cfg) != "all"


def earliest_swa_epoch(u: UnfreezeConfig) -> int:
    """The first epoch whose weights may enter the SWA average: after the last activation in
    ``u.activate_at``, and once the head blend that follows it is over."""
    return first_swa_epoch(u.activate_at[-1], u.head_blend_epochs) if u.activate_at else 1


def _check_regimen(cfg: TrainConfig) -> None:
    r = cfg.regularize
    if r.underfit_gap > r.overfit_gap:
        allowed = f"a number <= regularize.overfit_gap={r.overfit_gap!r}"
        raise _invalid("regularize.underfit_gap", r.underfit_gap, allowed)
    if r.dropout_min > r.dropout_max:
        allowed = f"a number <= regularize.dropout_max={r.dropout_max!r}"
        raise _invalid("regularize.dropout_min", r.dropout_min, allowed)
    _check_model(cfg)
    u = cfg.unfreeze
    if not u.activate_at:
        return
    last = int(u.activate_at[-1])
    first = earliest_swa_epoch(u)
    if unfreezes(cfg) and cfg.safety.swa and cfg.safety.swa_start_epoch < first:
        allowed = (
            f"an epoch after the last activation and its head blend (unfreeze.activate_at ends"
            f" at {last}, unfreeze.head_blend_epochs={u.head_blend_epochs:g}): >= {first}"
        )
        raise _invalid("safety.swa_start_epoch", cfg.safety.swa_start_epoch, allowed)
    gaps = [b - a for a, b in zip([0, *u.activate_at], u.activate_at, strict=False)]
    if unfreezes(cfg) and min(gaps) < u.min_gap:
        allowed = f"epochs at least unfreeze.min_gap={u.min_gap} apart (and from the start)"
        raise _invalid("unfreeze.activate_at", u.activate_at, allowed)


def _check_model(cfg: TrainConfig) -> None:
    """The model's own checks of its options, the direction it can unfreeze in, and how many
    stages ``unfreeze.activate_at`` and ``unfreeze.lr_mult`` schedule."""
    m = cfg.model
    try:
        check_options(m.arch, m.arch_options())
    except ValueError as error:
        raise ConfigError(_as_config_message(str(error), m)) from None
    if m.pretrained and m.stem == "cifar":
        allowed = (
            "auto or imagenet with pretrained weights (the cifar stem replaces the pretrained"
            " first conv with an untrained one); for small images set model.resize instead"
        )
        raise _invalid("model.stem", m.stem, allowed)
    direction = unfreeze_direction(cfg)
    grows = "partial_depth" in capabilities(m.arch)
    if grows and direction != "grow":
        allowed = f"auto or grow ({m.arch} runs only its active stages, so it grows from stage 1)"
        raise _invalid("unfreeze.direction", cfg.unfreeze.direction, allowed)
    if grows or direction == "all" or not cfg.unfreeze.enabled:
        return  # a growing model's schedule may stop short: later stages never join
    joins = _stages(cfg).joins
    for name in ("activate_at", "lr_mult"):
        value = getattr(cfg.unfreeze, name)
        if len(value) != joins:
            allowed = f"{joins} entries, one per stage that joins ({m.arch}, direction {direction})"
            raise _invalid(f"unfreeze.{name}", value, allowed)


def _as_config_message(message: str, section: ModelSection) -> str:
    """The model's refusal of an option ("ModelConfig.dropout=(0.1,) is invalid; allowed: a
    tuple of 3 rates") in the config's words: the field's path and value as the user gave them."""
    found = re.match(r"ModelConfig\.(\w+)=.*? is invalid; allowed: (.*)$", message)
    if not found or not hasattr(section, found[1]):
        return message.replace("ModelConfig.", "model.", 1)
    name, allowed = found[1], found[2].replace("a tuple", "a list").replace("() or", "[] or")
    return f"model.{name}={getattr(section, name)!r} is invalid; allowed: {allowed}"


def _stages(cfg: TrainConfig) -> StagePlan:
    """:func:`stage_plan`, with a model that cannot be built for its options refused in one
    line (the model's own message)."""
    try:
        return stage_plan(cfg)
    except ValueError as error:
        raise ConfigError(f"model: {_as_config_message(str(error), cfg.model)}") from None


#: thawing's discriminative rate when none is set: each stage at half the rate of the stage
#: above it (a convention of fine-tuning, as ULMFiT's 1/2.6 per layer; not tuned here).
THAW_DECAY = 0.5


def fit_stages(cfg: TrainConfig, given: Collection[str]) -> None:
    """Fit a zoo model's unfreezing to its stages where the user left it to the preset.

    - ``activate_at``: one entry per joining stage when the preset's count differs, spread from
      the preset's first activation, one per ``(last - first) // (joins - 1)`` epochs (at least
      1, at least a ``min_gap`` the user set); in a run too short for that, squeezed so that the
      last stage joins before the last epoch where one join per epoch allows (the plan says
      which stages join after the run otherwise).
    - ``min_gap`` shrinks to that spacing where not set; ``lr_mult`` gets 1 per joining stage.
    - thawing: ``old_group_decay`` is :data:`THAW_DECAY` where not set, so each lower stage
      trains slower (discriminative rates).
    - a derived SWA start moves after the last join.
    """
    u = cfg.unfreeze
    direction = unfreeze_direction(cfg)
    if "partial_depth" in capabilities(cfg.model.arch) or direction == "all" or not u.enabled:
        return  # a growing model's presets are written for it
    joins = _stages(cfg).joins
    if "unfreeze.activate_at" not in given and len(u.activate_at) != joins and joins:
        gap_given = "unfreeze.min_gap" in given
        floor = u.min_gap if gap_given else 1
        first, last = max(int(u.activate_at[0]), floor), int(u.activate_at[-1])
        step = max(floor, (last - first) // (joins - 1)) if joins > 1 else floor
        room = cfg.run.epochs - 1  # the last stage to join trains for at least one epoch
        if first + step * (joins - 1) > room:
            step = max(floor, (room - first) // max(1, joins - 1))
            first = max(floor, min(first, room - step * (joins - 1)))
        u.activate_at = [float(first + i * step) for i in range(joins)]
        if not gap_given:
            u.min_gap = min(u.min_gap, step, first)
    if "unfreeze.lr_mult" not in given and len(u.lr_mult) != joins:
        u.lr_mult = [1.0] * joins
    if direction == "thaw" and "unfreeze.old_group_decay" not in given:
        u.old_group_decay = THAW_DECAY
    swa = "safety.swa_start_epoch"
    if swa not in given and u.activate_at and cfg.safety.swa_start_epoch < earliest_swa_epoch(u):
        cfg.safety.swa_start_epoch = earliest_swa_epoch(u)


def _field_names(section: str) -> list[str]:
    return [f.name for f in fields(SECTIONS[section])]


def _unknown_key(path: str, allowed: Sequence[str], origin: str) -> ConfigError:
    where = f" in {origin}" if origin else ""
    return ConfigError(f"unknown config key '{path}'{where}; allowed: {', '.join(allowed)}")


def _check_key(section: str, key: str, origin: str) -> None:
    if section not in SECTIONS:
        raise _unknown_key(f"{section}.{key}", [f"{name}.*" for name in SECTIONS], origin)
    if key not in _field_names(section):
        allowed = [f"{section}.{name}" for name in _field_names(section)]
        raise _unknown_key(f"{section}.{key}", allowed, origin)


def _merge(tree: dict, layer: Mapping[str, Any], origin: str) -> set[str]:
    """Copy a nested ``{section: {field: value}}`` mapping onto ``tree``, rejecting unknown keys.

    A top-level ``preset`` key is skipped: callers that honour it read it themselves.

    Returns:
        The ``section.field`` paths the layer set.
    """
    paths: set[str] = set()
    for section, values in layer.items():
        if section == "preset":
            continue
        if section not in SECTIONS:
            raise _unknown_key(str(section), [*SECTIONS, "preset"], origin)
        if values is None:  # an empty section in YAML ("model:")
            continue
        if not isinstance(values, Mapping):
            where = f" in {origin}" if origin else ""
            raise ConfigError(f"'{section}'{where} must be a mapping of fields, got {values!r}")
        for key, value in values.items():
            _check_key(section, str(key), origin)
            tree[section][key] = copy.deepcopy(value)
            paths.add(f"{section}.{key}")
    return paths


def _parse_override(item: str) -> tuple[str, str, Any]:
    """Split ``section.field=value`` and read the value as YAML (``3``, ``true``, ``[1, 2]``)."""
    path, sep, text = item.partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot:
        raise ConfigError(f"override {item!r} is invalid; expected section.field=value")
    _check_key(section, key, "overrides")
    if _field_types(section)[key] is str:
        # Keep text as typed for string fields, so "yes", "null" or "123" stay strings.
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        return section, key, value if isinstance(value, str) else text.strip()
    try:
        return section, key, yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{path}={text!r} is invalid; the value is not valid YAML") from None


def _preset_layer(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is invalid; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {str(path)!r}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return dict(data)


def _build(tree: Mapping[str, Any], preset: str) -> TrainConfig:
    sections = {name: cls(**tree[name]) for name, cls in SECTIONS.items()}
    cfg = TrainConfig(**sections, preset=preset)
    validate_config(cfg)
    return cfg


def _resolve(
    preset: str,
    yaml_path: str | Path | None,
    overrides: Sequence[str],
    values: Mapping[str, Any],
) -> TrainConfig:
    """Defaults -> preset -> YAML -> ``overrides`` strings -> typed ``values`` (path -> value).

    When ``run.epochs`` ends up other than the preset's (or the defaults') length, the epoch
    settings the YAML file and the overrides do not set follow it (:func:`_fit_to_length`).
    """
    tree = config_to_dict(TrainConfig())
    layer = _read_yaml(Path(yaml_path)) if yaml_path is not None else {}
    # An explicit preset beats the file's "preset:" key, as the command line beats the file.
    preset = preset or str(layer.get("preset") or "")
    if preset:
        _merge(tree, _preset_layer(preset), f"preset {preset!r}")
    base_epochs = tree["run"]["epochs"]
    base = copy.deepcopy(tree)
    given = _merge(tree, layer, str(yaml_path))
    typed: set[str] = set()  # set on the command line, not by the file
    for item in overrides:
        section, key, value = _parse_override(item)
        tree[section][key] = value
        typed.add(f"{section}.{key}")
    for path, value in values.items():
        section, _, key = path.partition(".")
        _check_key(section, key, "")
        tree[section][key] = value
        typed.add(path)
    given |= typed
    cfg = TrainConfig(**{name: cls(**tree[name]) for name, cls in SECTIONS.items()}, preset=preset)
    _check_fields(cfg)  # typed values first: the scaling does arithmetic on them
    blends = "head_blend" in capabilities(cfg.model.arch)
    if not blends and "unfreeze.head_blend_epochs" not in given:
        cfg.unfreeze.head_blend_epochs = 0.0  # no head to blend: no blend to wait for
    _fit_to_length(cfg, base_epochs, given)
    fit_stages(cfg, given)
    _check_given(cfg, typed)
    validate_config(cfg)
    cfg.unused = _check_unused(cfg, {p for p in given if _get(cfg, p) != _tree_get(base, p)})
    return cfg


def _fit_to_length(cfg: TrainConfig, base_epochs: int, given: set[str]) -> None:
    """Scale the epoch settings not in ``given`` from a ``base_epochs`` plan to ``run.epochs``.

    At the plan's own length the factor is 1 and only the repairs act: derived values make room
    for the user's own (activations the user moved later push a derived SWA start after them).
    """
    paths = [*EPOCH_FIELDS, "run.epochs", "schedule.kind", "unfreeze.enabled"]
    flat = {path: _get(cfg, path) for path in paths}
    flat["unfreeze.enabled"] = unfreezes(cfg)  # what the repairs must make room for
    scaled = scale_plan(flat, base_epochs, given)
    scaled["unfreeze.enabled"] = cfg.unfreeze.enabled
    for path, value in scaled.items():
        section, _, key = path.partition(".")
        setattr(getattr(cfg, section), key, value)
    if cfg.run.epochs == base_epochs:
        return
    origin = f"{cfg.preset} preset's" if cfg.preset else "default"
    kept = tuple(path for path in EPOCH_FIELDS if path in given)
    cfg.scaling = Rescale(base_epochs, cfg.run.epochs, origin, kept)


def _get(cfg: TrainConfig, path: str) -> Any:
    section, _, key = path.partition(".")
    return getattr(getattr(cfg, section), key)


def _check_given(cfg: TrainConfig, given: set[str]) -> None:
    """Refuse values typed on the command line (``given``) that cannot work in a run of
    ``run.epochs`` epochs.

    Derived values that do not fit a short run are not refused: the plan says what is not reached.
    Nor are a config file's: a run's own ``config.yaml`` records its derived values, and loading
    it back (``--config``) must give that run again, "not reached" included.
    """
    s, epochs = cfg.safety, cfg.run.epochs
    if "safety.swa_start_epoch" in given and s.swa and s.swa_start_epoch > epochs:
        allowed = (
            f"an epoch <= run.epochs={epochs} (SWA would never start), or set safety.swa=false"
        )
        raise _invalid("safety.swa_start_epoch", s.swa_start_epoch, allowed)


@dataclass(frozen=True)
class _Inactive:
    """Fields that a setting makes unused: ``fields`` do nothing while ``switch`` is ``off``."""

    fields: tuple[str, ...]
    switch: str
    off: Callable[[Any], bool]
    remedy: str


_STAGED_ONLY = (
    "onecycle_end_epoch",
    "onecycle_end_ratio",
    "cosine_end_epoch",
    "cosine_end_ratio",
    "plateau_factor",
    "plateau_patience",
    "floor_epochs",
    "floor_lrs",
)


#: The settings that leave others unused, read from where each field is consumed.
_INACTIVE: tuple[_Inactive, ...] = (
    _Inactive(
        tuple(f"model.{name}" for name in BASIC_CNN_FIELDS) + ("unfreeze.head_blend_epochs",),
        "model.arch",
        lambda v: v != DEFAULT_ARCH,
        "set model.arch=basic_cnn",
    ),
    _Inactive(
        tuple(f"model.{name}" for name in ZOO_FIELDS),
        "model.arch",
        lambda v: v == DEFAULT_ARCH,
        "set model.arch (--model) to a zoo network",
    ),
    _Inactive(("model.width",), "model.block_channels", bool, "set model.block_channels=[]"),
    _Inactive(("data.cv_fold",), "data.cv_folds", lambda v: v == 0, "set data.cv_folds=k"),
    _Inactive(("model.gn_groups",), "model.norm", lambda v: v == "batch", "set model.norm=group"),
    _Inactive(
        tuple(f"schedule.{name}" for name in _STAGED_ONLY),
        "schedule.kind",
        lambda v: v == "cosine",
        "set schedule.kind=staged",
    ),
    _Inactive(
        ("schedule.min_lr",), "schedule.kind", lambda v: v == "staged", "set schedule.kind=cosine"
    ),
    _Inactive(
        ("balance.beta",),
        "balance.loss_weights",
        lambda v: v != "effective",
        "set balance.loss_weights=effective",
    ),
    _Inactive(
        tuple(f"balance.penalty_{name}" for name in ("strength", "momentum", "min", "max")),
        "balance.penalty",
        lambda v: not v,
        "set balance.penalty=true",
    ),
    _Inactive(
        ("regularize.mixup_alpha", "regularize.mixup_end_epoch"),
        "regularize.mixup",
        lambda v: not v,
        "set regularize.mixup=true",
    ),
    _Inactive(
        tuple(
            f"regularize.{name}"
            for name in (
                "dropout_signal",
                "dropout_min",
                "dropout_max",
                "dropout_step",
                "overfit_gap",
                "underfit_gap",
            )
        ),
        "regularize.dynamic_dropout",
        lambda v: not v,
        "set regularize.dynamic_dropout=true",
    ),
    _Inactive(
        tuple(
            f"safety.{name}"
            for name in (
                "rollback_threshold",
                "rollback_patience",
                "max_rollbacks",
                "rollback_lr_cut",
            )
        ),
        "safety.rollback",
        lambda v: not v,
        "set safety.rollback=true",
    ),
    _Inactive(
        ("safety.patience", "safety.min_delta"),
        "safety.early_stop",
        lambda v: not v,
        "set safety.early_stop=true",
    ),
    _Inactive(("safety.swa_start_epoch",), "safety.swa", lambda v: not v, "set safety.swa=true"),
    _Inactive(
        ("kd.temperature", "kd.alpha", "kd.weights"),
        "kd.teacher",
        lambda v: not v,
        "set kd.teacher (--teacher RUN_DIR)",
    ),
    _Inactive(
        ("data.aug_strength", "data.aug_start_strength", "data.aug_ramp_epochs"),
        "data.augment",
        lambda v: not v,
        "set data.augment=true",
    ),
    _Inactive(
        tuple(
            f"unfreeze.{name}"
            for name in (
                "activate_at",
                "plateau_patience",
                "min_gap",
                "lr_mult",
                "old_group_decay",
                "warmup_epochs",
                "head_blend_epochs",
            )
        ),
        "unfreeze.enabled",
        lambda v: not v,
        "set unfreeze.enabled=true",
    ),
)


def _tree_get(tree: Mapping[str, Any], path: str) -> Any:
    section, _, key = path.partition(".")
    return tree[section][key]


def _check_unused(cfg: TrainConfig, changed: set[str]) -> tuple[str, ...]:
    """Refuse a value the user changed that a setting the user left alone makes unused.

    Where the user changed the setting too (an ablation: ``--set regularize.mixup=false`` beside
    a file that tunes mixup), the value is kept and returned as a note for the start of the run.
    ``changed`` holds the paths the file, ``--set`` or a flag set to something other than the
    defaults' (or the preset's) value; a value equal to it changes nothing, so a resolved
    ``config.yaml`` given back as ``--config`` still loads.
    """
    notes = []
    for rule in _INACTIVE:
        switch = _get(cfg, rule.switch)
        if not rule.off(switch):
            continue
        for path in (p for p in rule.fields if p in changed):
            value, name = _show(_get(cfg, path)), path.partition(".")[2]
            if rule.switch in changed:
                notes.append(f"{path}={value} ({rule.switch}={_show(switch)})")
                continue
            raise ConfigError(
                f"{path}={value} has no effect while {rule.switch}={_show(switch)}"
                f"{_origin(cfg, rule.switch)}; {rule.remedy} to use {name}, or leave {name} unset"
            )
    return tuple(notes)


def unused_note(cfg: TrainConfig) -> str | None:
    """One line naming the settings the run does not use (:attr:`TrainConfig.unused`), or None."""
    if not cfg.unused:
        return None
    return f"not used in this run: {', '.join(cfg.unused)}"


def _show(value: Any) -> str:
    # As the user would type it after --set: true/false, not Python's True/False.
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _origin(cfg: TrainConfig, path: str) -> str:
    """Where a setting the user left alone came from, for the message: the preset or the default."""
    section, _, key = path.partition(".")
    if key in PRESETS.get(cfg.preset, {}).get(section, {}):
        return f" (the {cfg.preset} preset sets it)"
    return " (the default)"


def load_config(
    preset: str = "",
    yaml_path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> TrainConfig:
    """Resolve a configuration: defaults -> preset -> YAML file -> ``section.field=value``.

    Args:
        preset: a key of :data:`PRESETS`, or "" for the file's ``preset:`` key or none.
        yaml_path: a YAML file with the section names as top-level keys (and optionally
            ``preset``); unknown keys are errors.
        overrides: ``section.field=value`` strings, values read as YAML.

    Raises:
        ConfigError: an unknown preset, key or file, or an invalid value.
    """
    return _resolve(preset, yaml_path, overrides, {})


def config_to_dict(cfg: TrainConfig) -> dict:
    """The configuration as nested plain dicts, lists and scalars (fit for YAML and checkpoints)."""
    return {**{name: asdict(getattr(cfg, name)) for name in SECTIONS}, "preset": cfg.preset}


def config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a validated configuration from :func:`config_to_dict` output.

    Fields missing from ``d`` keep their defaults, so configs stored by older versions still
    load, except the fields of :data:`LEGACY_DEFAULTS`: a stored section that lacks one was
    written before it existed and gets the value such runs used. The ``preset`` key is kept
    as a label only (its overrides are not applied again).
    """
    tree = config_to_dict(TrainConfig())
    for section, legacy in LEGACY_DEFAULTS.items():
        if isinstance(d.get(section), Mapping):
            tree[section].update(copy.deepcopy(legacy))
    _merge(tree, d, "stored config")
    preset = d.get("preset") or ""
    if not isinstance(preset, str):
        raise _invalid("preset", preset, ", ".join(PRESETS) + " or ''")
    return _build(tree, preset)


class _ConfigDumper(yaml.SafeDumper):
    """Block-style mappings with inline lists: one field per line, ``dropout: [0.1, 0.2, 0.3]``."""


_ConfigDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True)
)


def format_config(cfg: TrainConfig) -> str:
    """The configuration as readable YAML, in field order, one field per line."""
    return yaml.dump(
        config_to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False
    )


def config_changes(cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{"section.field": (preset's value, value)}`` for the settings that differ from the
    preset the run started from (the defaults when none), the console's short account of a run.

    Epoch settings that only followed ``run.epochs`` are left out (the printed plan shows them),
    and so is ``run.run_dir`` (the header shows it); ``config.yaml`` holds everything.
    """
    base = config_to_dict(load_config(cfg.preset))
    ours = config_to_dict(cfg)
    derived = set(EPOCH_FIELDS) - set(cfg.scaling.kept) if cfg.scaling else set()
    changes = {}
    for section in SECTIONS:
        for key, value in ours[section].items():
            path = f"{section}.{key}"
            if value != base[section][key] and path not in derived | {"run.run_dir"}:
                changes[path] = (base[section][key], value)
    return changes


def format_changes(cfg: TrainConfig) -> str:
    """One line: the preset and what differs from it (see :func:`config_changes`)."""
    changes = config_changes(cfg)
    start = f"{cfg.preset} preset" if cfg.preset else "the defaults"
    if not changes:
        return f"configuration: {start}, unchanged"
    items = ", ".join(f"{path} {old!r} -> {new!r}" for path, (old, new) in changes.items())
    return f"configuration: {start}, changed: {items}"


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the configuration as YAML; a crash mid-write never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_beside(path)  # the umask's mode (mkstemp would make it 0600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("# resolved training configuration\n")
            handle.write(format_config(cfg))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
