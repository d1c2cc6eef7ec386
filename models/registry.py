"""Build any registered network by name, and rebuild one from a checkpoint's record.

Names:
- ``basic_cnn``: :class:`~models.basic_cnn_model.BasicCNNModel`, the framework's own CNN;
- the torchvision families of :data:`TORCHVISION_ARCHS` (``resnet18``, ``resnet50``,
  ``densenet121``, ``efficientnet_b0``, ``vgg16_bn``, ``mobilenet_v2``, ``inception_v3``);
- ``timm/<name>``: any timm model, its stages taken from timm's own grouping.

Every model implements :class:`~models.staged.StagedModel`, so the engine needs nothing else.

Public API:
    DEFAULT_ARCH, TORCHVISION_ARCHS, ARCH_NAMES, build_model, build_from_record,
    record_of_checkpoint, stage_names, capabilities, is_registered, check_arch, check_options,
    describe_arch.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from typing import Any

import torch

from models.basic_cnn_model import BasicCNNModel, ModelConfig, complete_record, config_record
from models.staged import StagedModel

DEFAULT_ARCH = "basic_cnn"
TIMM_PREFIX = "timm/"
#: The torchvision families the registry builds (see :mod:`models.zoo`).
TORCHVISION_ARCHS: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "vgg16_bn",
    "mobilenet_v2",
    "inception_v3",
)
#: Every registered name; ``timm/<name>`` stands for every timm model.
ARCH_NAMES: tuple[str, ...] = (DEFAULT_ARCH, *TORCHVISION_ARCHS, TIMM_PREFIX + "<name>")


def _zoo():
    # torchvision's and timm's model modules take a second to import; only zoo runs need them.
    from models import zoo

    return zoo


def is_registered(arch: str) -> bool:
    """Whether ``arch`` names a registered network (any ``timm/<name>`` counts; timm itself
    says whether it has the name when the model is built)."""
    if arch.startswith(TIMM_PREFIX):
        return len(arch) > len(TIMM_PREFIX)
    return arch in ARCH_NAMES


def check_arch(arch: object) -> str:
    """``arch`` itself, or a ValueError naming the registered names."""
    if not isinstance(arch, str) or not is_registered(arch):
        allowed = ", ".join(ARCH_NAMES)
        raise ValueError(f"model.arch={arch!r} is not registered; allowed: {allowed}")
    return arch


def check_options(arch: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError when ``options`` cannot build ``arch`` (the model's own message, which
    names the option, its value and what is allowed). basic_cnn checks its config alone; a timm
    name must be one timm has; the rest of a zoo model is checked when it is built."""
    if arch == DEFAULT_ARCH:
        ModelConfig(**{**dict(options), "input_size": 10**4})
    elif arch.startswith(TIMM_PREFIX):
        import timm  # only runs that name a timm model pay for importing it

        name = arch[len(TIMM_PREFIX) :]
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5)
            hint = f" (names like it: {', '.join(close)})" if close else ""
            raise ValueError(
                f"model.arch={arch!r} is not a timm model; allowed: timm/<name> with a name from"
                f" timm.list_models(){hint}"
            )


def build_model(
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    input_size: int,
    options: Mapping[str, Any] | None = None,
) -> StagedModel:
    """A new model of ``arch`` for images of ``in_channels`` x ``input_size`` px and
    ``num_classes`` classes, with random weights (pretrained ones are loaded afterwards, see
    :mod:`models.weights`).

    ``options`` are the arch's own settings: :class:`~models.basic_cnn_model.ModelConfig` fields
    for ``basic_cnn``; ``stem`` and ``resize`` for the zoo (see :mod:`models.zoo`).
    """
    options = dict(options or {})
    check_arch(arch)
    if arch == DEFAULT_ARCH:
        config = ModelConfig(
            in_channels=in_channels, num_classes=num_classes, input_size=input_size, **options
        )
        return BasicCNNModel(config)
    return _zoo().build_zoo_model(
        arch, in_channels=in_channels, num_classes=num_classes, input_size=input_size, **options
    )


RECORD_KEYS: tuple[str, ...] = ("arch", "in_channels", "num_classes", "input_size", "options")


def build_from_record(record: Mapping[str, Any]) -> StagedModel:
    """Rebuild the model a checkpoint describes (``model.record()``), without its weights."""
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"model record lacks {', '.join(missing)}; it cannot rebuild a model")
    return build_model(
        record["arch"],
        in_channels=record["in_channels"],
        num_classes=record["num_classes"],
        input_size=record["input_size"],
        options={**record["options"], **record.get("settings", {})},
    )


def record_of_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's model record; checkpoints written before the registry stored the
    BasicCNNModel's config alone (``model_config``), which maps to a ``basic_cnn`` record. A
    basic_cnn record gets the options added after it was written, at the values it trained with
    (:func:`~models.basic_cnn_model.complete_record`)."""
    if isinstance(ckpt.get("model_record"), Mapping):
        record = dict(ckpt["model_record"])
        return complete_record(record) if record.get("arch") == DEFAULT_ARCH else record
    if isinstance(ckpt.get("model_config"), Mapping):
        return config_record(ckpt["model_config"])
    return None


def stage_names(arch: str, options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The stage names of ``arch`` built with ``options`` (its split does not depend on the
    image channels, classes or size); cached, as config checks ask for them more than once."""
    items = ((k, tuple(v) if isinstance(v, list) else v) for k, v in (options or {}).items())
    return _stage_names(arch, tuple(sorted(items)))


@functools.lru_cache(maxsize=32)
def _stage_names(arch: str, options: tuple[tuple[str, Any], ...]) -> tuple[str, ...]:
    values = dict(options)
    # ImageNet's size, which every arch takes (fixed-size ViTs take only their own, 224 for
    # most; the split is the same at any size), on the meta device: no memory and no compute
    # for a network that is only asked its stage names.
    with torch.device("meta"):
        model = build_model(arch, in_channels=3, num_classes=2, input_size=224, options=values)
    return tuple(model.stage_names)


def capabilities(arch: str) -> frozenset[str]:
    """The optional capabilities ``arch``'s models declare (:data:`models.staged.CAPABILITIES`),
    without building one."""
    if arch == DEFAULT_ARCH:
        return BasicCNNModel.capabilities
    return _zoo().ZooModel.capabilities


def describe_arch(arch: str) -> str:
    """One line for the console: the arch and, for a timm model, that it comes from timm."""
    return f"{arch[len(TIMM_PREFIX) :]} (timm)" if arch.startswith(TIMM_PREFIX) else arch
