"""The training command line: ``python models/train.py [--preset] [--config] [--set] [flags]``.

:func:`build_parser` is returned so other scripts can reuse or extend it; :func:`config_from_args`
resolves a parsed command line through the same layers as :func:`training.config.schema.load_config`
(defaults -> preset -> YAML file -> ``--set`` -> the shortcut flags), choosing the preset from the
hardware when none is named.

Public API:
    SHORTCUTS, build_parser, config_from_args.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from training.config.schema import (
    DEVICES_TEXT,
    PRESETS,
    TrainConfig,
    _parse_override,
    _read_yaml,
    _resolve,
    unused_note,
)
from training.engine.device import choose_preset

# Shortcut flag (argparse dest) -> field path; applied after every --set.
SHORTCUTS: dict[str, str] = {
    "data": "data.source",
    "epochs": "run.epochs",
    "batch_size": "optim.batch_size",
    "lr": "optim.lr",
    "seed": "run.seed",
    "device": "run.device",
    "run_dir": "run.run_dir",
    "workers": "data.workers",
    "image_size": "data.image_size",
    "deterministic": "run.deterministic",
    "model": "model.arch",
    "pretrained": "model.pretrained",
    "init": "model.init",
}


def build_parser() -> argparse.ArgumentParser:
    """The training command line; returned so other scripts can reuse or extend it."""
    parser = argparse.ArgumentParser(
        prog="python models/train.py",
        description="Train a network with progressive unfreezing. Settings resolve as: defaults -> "
        "--preset -> --config file -> --set overrides -> the shortcut flags below.",
        epilog="example: python models/train.py --preset cpu --data bloodmnist "
        "--set model.dropout=[0.1,0.2,0.3] --epochs 3",
    )
    add = parser.add_argument
    add("--config", metavar="FILE.yaml", help="YAML file with data/model/optim/schedule/run")
    add(
        "--preset",
        metavar="NAME",
        choices=list(PRESETS),
        help=f"one of {', '.join(PRESETS)}; default (unless the --config file names one): "
        "full on a CUDA GPU, cpu otherwise",
    )
    add(
        "--data",
        metavar="SOURCE",
        help="bloodcells_mini (the embedded sample, default), a MedMNIST name such as "
        "bloodmnist, an .npz file or an image folder (data.source)",
    )
    add(
        "--model",
        metavar="NAME",
        help="basic_cnn (default), resnet18, resnet50, densenet121, efficientnet_b0, vgg16_bn, "
        "mobilenet_v2, inception_v3 or timm/<name> (model.arch)",
    )
    add(
        "--pretrained",
        metavar="WEIGHTS",
        help="imagenet (the library's weights) or a .pth/.pt/.safetensors file (model.pretrained)",
    )
    add(
        "--init",
        metavar="RUN_DIR[:best|swa|last]",
        help="start from another run's weights; a new classifier when the classes differ "
        "(model.init)",
    )
    add(
        "--teacher",
        nargs="+",
        metavar="RUN_DIR",
        help="distil from these trained runs (several: an ensemble teacher, their logits "
        "averaged); a study folder gives its finished members (kd.teacher)",
    )
    add("--epochs", type=int, metavar="N", help="epochs to train (run.epochs)")
    add("--batch-size", type=int, metavar="N", help="images per step (optim.batch_size)")
    add("--lr", type=float, metavar="LR", help="peak learning rate (optim.lr)")
    add("--seed", type=int, metavar="N", help="random seed (run.seed)")
    add("--device", metavar="DEVICE", help=f"{DEVICES_TEXT} (run.device)")
    add("--run-dir", metavar="DIR", help="output folder (run.run_dir)")
    add("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    add(
        "--overwrite",
        action="store_true",
        help="delete what an earlier run left in --run-dir first (a new run needs an empty one)",
    )
    add("--deterministic", action="store_true", default=None, help="slower, repeatable kernels")
    add("--no-amp", action="store_true", help="no mixed precision (run.amp=off)")
    add("--workers", type=int, metavar="N", help="DataLoader workers, -1 = auto (data.workers)")
    add(
        "--image-size",
        type=int,
        metavar="PX",
        help="image folders: resize to PX x PX (data.image_size; default: the common size)",
    )
    add(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any field, e.g. --set run.epochs=3 (repeatable)",
    )
    return parser


def _requested_device(
    layer: Mapping[str, Any], overrides: Sequence[str], values: Mapping[str, Any]
) -> str:
    """The ``run.device`` the file, ``--set`` and ``--device`` ask for, the last one winning."""
    device: Any = "auto"
    run = layer.get("run")
    if isinstance(run, Mapping) and "device" in run:
        device = run["device"]
    for item in overrides:
        if item.partition("=")[0].strip() == "run.device":
            device = _parse_override(item)[2]
    device = values.get("run.device", device)
    return str(device) if device else "auto"


def config_from_args(
    args: argparse.Namespace,
    *,
    cuda_available: Callable[[], bool] | None = None,
    announce: Callable[[str], None] | None = None,
) -> TrainConfig:
    """Resolve the configuration from parsed :func:`build_parser` arguments.

    ``--set`` overrides come first, then the shortcut flags, so ``--epochs`` beats
    ``--set run.epochs=...``. ``args.resume`` is left for the caller.

    When neither ``--preset`` nor the ``--config`` file's ``preset:`` key names a preset, the
    run's device picks one (:func:`training.device.choose_preset`: "full" on CUDA, "cpu"
    elsewhere), so a first run on a laptop takes minutes; the config records the choice.
    :func:`load_config` keeps the plain defaults.

    Args:
        args: the parsed command line.
        cuda_available: the CUDA probe of that choice (default ``torch.cuda.is_available``).
        announce: receives the one-line message of a choice made here; ``None`` stays silent.
    """
    values = {
        path: getattr(args, dest)
        for dest, path in SHORTCUTS.items()
        if getattr(args, dest, None) is not None
    }
    if getattr(args, "no_amp", False):
        values["run.amp"] = "off"
    if getattr(args, "teacher", None):  # run folders; models/train.py expands study folders first
        values["kd.teacher"] = [str(path) for path in args.teacher]
    yaml_path = getattr(args, "config", None)
    overrides = getattr(args, "overrides", None) or []
    preset, choice = getattr(args, "preset", None) or "", None
    if not preset:
        layer = _read_yaml(Path(yaml_path)) if yaml_path is not None else {}
        if not layer.get("preset"):
            choice = choose_preset(_requested_device(layer, overrides, values), cuda_available)
            preset = choice.preset
    cfg = _resolve(preset, yaml_path, overrides, values)
    if choice is not None and announce is not None:
        announce(choice.message())
    if announce is not None and (note := unused_note(cfg)):
        announce(note)
    return cfg
