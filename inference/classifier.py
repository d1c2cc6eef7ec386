"""A trained network ready to classify new images, from a run folder or an exported model.

:class:`Classifier` holds what using a model needs beyond its weights: the class names, the
training set's normalisation, the input size and channels, and the softmax temperature fitted on
the validation set (Guo et al. 2017). It is built either from a run's checkpoint
(:meth:`Classifier.from_run`) or from the two files :mod:`inference.export` writes
(:meth:`Classifier.from_export`, no pickle involved), and both give the same probabilities.

The temperature was fitted on logits of one test-time augmentation mode (``temperature_tta``);
logits of another mode are not what it was fitted to, so they are left unscaled
(:meth:`Classifier.temperature_for`), as ``test.py`` does.

Public API:
    Classifier, EXPORT_JSON, EXPORT_WEIGHTS, EXPORT_FORMAT, ExportError, final_weight_set,
    read_export_json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset.transforms import eval_transform
from models.staged import StagedModel
from training.engine.checkpoint import CheckpointError
from training.engine.device import resolve_device
from training.evaluation.report import (
    REPORT_JSON,
    SCALED_SUFFIX,
    TEMPERATURE_TTA_KEY,
    WEIGHT_FILES,
    build_model,
    checkpoint_temperature,
    checkpoint_temperature_reason,
    final_of,
    load_weight_set,
    run_tta,
)
from training.evaluation.tta import TTA_MODES, resolve_tta, tta_logits

#: The exported model's files (see :mod:`inference.export`).
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_JSON = "model.json"
EXPORT_FORMAT = 1


class ExportError(ValueError):
    """An exported model folder that cannot be loaded; the message names the file and field."""


def final_weight_set(run_dir: Path) -> str:
    """The weight set a run ends with: ``swa`` when it has one, else ``best``, else ``last``.

    Raises:
        FileNotFoundError: the run has no checkpoint.
    """
    folder = Path(run_dir) / "checkpoints"
    name = final_of(n for n, file in WEIGHT_FILES.items() if (folder / file).is_file())
    if name is not None:
        return name
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    raise FileNotFoundError(f"no checkpoints in {folder}: train first with python models/train.py")


@dataclass
class Classifier:
    """A network with what it needs to classify images as it was trained to.

    Attributes:
        model: the network, in eval mode, on ``device``.
        class_names: one per output, in label order.
        mean, std: per-channel normalisation of the training split (0..1 scale).
        input_size: the side of the square images it takes.
        channels: 1 (greyscale) or 3 (RGB).
        temperature: the fitted softmax temperature; 1.0 when none was fitted.
        temperature_tta: the TTA mode the temperature was fitted under.
        tta: the run's own TTA mode (``run.tta``), the default for prediction.
        weights: which weight set (``best``, ``last`` or ``swa``).
        source: the run folder or export folder it came from.
        device: where it runs.
        card: what is known about how it scored: ``dataset``, ``trained`` (ISO date) and, when the
            run was tested, ``test_accuracy`` and ``test_ece`` (calibrated where a temperature
            applies).
        notes: lines worth telling the user (why the temperature is 1, say).
        config: the run's resolved training config, for the record.
    """

    model: StagedModel
    class_names: list[str]
    mean: list[float]
    std: list[float]
    input_size: int
    channels: int
    temperature: float
    temperature_tta: str
    tta: str
    weights: str
    source: Path
    device: torch.device
    card: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._normalise = eval_transform(self.mean, self.std)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_run(
        cls, run_dir: str | Path, weights: str | None = None, device: str = "cpu"
    ) -> Classifier:
        """The run's ``weights`` (default: :func:`final_weight_set`), rebuilt from its checkpoint.

        Raises:
            FileNotFoundError: no such run or weight file.
            CheckpointError: the checkpoint cannot be read or rebuilt.
        """
        run_dir = Path(run_dir)
        name = weights or final_weight_set(run_dir)
        ckpt = load_weight_set(run_dir, name)
        path = run_dir / "checkpoints" / WEIGHT_FILES[name]
        dev = resolve_device(device)
        temperature = checkpoint_temperature(ckpt, path)
        reason = checkpoint_temperature_reason(ckpt)
        notes = [f"{name} weights: temperature kept at 1 ({reason})"] if reason else []
        record = ckpt["model_record"]
        return cls(
            model=build_model(ckpt).to(dev).eval(),
            class_names=[str(c) for c in ckpt["class_names"]],
            mean=[float(v) for v in ckpt["mean"]],
            std=[float(v) for v in ckpt["std"]],
            input_size=int(record["input_size"]),
            channels=int(record["in_channels"]),
            temperature=1.0 if temperature is None or reason else temperature,
            temperature_tta=str(ckpt.get(TEMPERATURE_TTA_KEY, "none")),
            tta=run_tta(ckpt),
            weights=name,
            source=run_dir,
            device=dev,
            card=_run_card(run_dir, name, ckpt, path),
            notes=notes,
            config=dict(ckpt.get("config") or {}),
        )

    @classmethod
    def from_export(cls, folder: str | Path, device: str = "cpu") -> Classifier:
        """The model :mod:`inference.export` wrote to ``folder``: ``model.json`` rebuilds the
        network, ``model.safetensors`` gives its weights (neither is unpickled).

        Raises:
            ExportError: a file is missing or a field is absent or invalid.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = read_export_json(folder / EXPORT_JSON)
        weights_path = folder / EXPORT_WEIGHTS
        if not weights_path.is_file():
            raise ExportError(f"{weights_path} does not exist; export the run again")
        try:
            state = load_file(weights_path)
        except (SafetensorError, OSError) as error:
            raise ExportError(f"{weights_path} cannot be read: {error}") from None
        ckpt = {
            "model_record": meta["model_record"],
            "trainable_stages": meta["trainable_stages"],
            "head_mix": meta["head_mix"],
            "model": state,
        }
        try:
            model = build_model(ckpt)
        except CheckpointError as error:
            raise ExportError(f"{folder}: {error}") from None
        dev = resolve_device(device)
        return cls(
            model=model.to(dev).eval(),
            class_names=list(meta["class_names"]),
            mean=list(meta["mean"]),
            std=list(meta["std"]),
            input_size=int(meta["input_size"]),
            channels=int(meta["channels"]),
            temperature=float(meta["temperature"]),
            temperature_tta=str(meta["temperature_tta"]),
            tta=str(meta["tta"]),
            weights=str(meta["weights"]),
            source=folder,
            device=dev,
            card=dict(meta.get("card") or {}),
            config=dict(meta.get("config") or {}),
        )

    @classmethod
    def load(cls, path: str | Path, weights: str | None = None, device: str = "cpu"):
        """:meth:`from_export` when ``path`` holds ``model.json``, else :meth:`from_run`."""
        if (Path(path) / EXPORT_JSON).is_file():
            if weights is not None:
                raise ExportError(
                    f"{path} is an exported model with one weight set; --weights applies to runs"
                )
            return cls.from_export(path, device)
        return cls.from_run(path, weights, device)

    def metadata(self) -> dict[str, Any]:
        """What ``model.json`` holds: all :meth:`from_export` needs besides the weights."""
        return {
            "format": EXPORT_FORMAT,
            "model_record": self.model.record(),
            "trainable_stages": sorted(self.model.trainable_stages),
            "head_mix": float(self.model.head_mix),
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
            "channels": self.channels,
            "temperature": self.temperature,
            "temperature_tta": self.temperature_tta,
            "tta": self.tta,
            "weights": self.weights,
            "card": dict(self.card),
            "config": dict(self.config),
        }

    # ------------------------------------------------------------------ using

    def temperature_for(self, tta: str) -> float:
        """The temperature for logits averaged under ``tta``: the fitted one for the mode it was
        fitted under, else 1."""
        mode = resolve_tta(tta, self.channels)
        return self.temperature if mode == self.temperature_tta else 1.0

    def normalise(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``(H, W, C)`` uint8 images -> one normalised ``(B, C, H, W)`` float32 batch."""
        return torch.stack([self._normalise(image=image)["image"] for image in images])

    @torch.no_grad()
    def logits(self, batch: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """Logits ``(B, classes)`` float32 on the CPU for a normalised batch, averaged over the
        views of ``tta``."""
        self.model.eval()
        mode = resolve_tta(tta, self.channels)
        return tta_logits(self.model, batch.to(self.device), mode).float().cpu()

    def probabilities(self, images: Sequence[np.ndarray], tta: str = "none") -> torch.Tensor:
        """Calibrated class probabilities ``(B, classes)`` float64 of ``(H, W, C)`` uint8 images
        already at the model's size and channels (:func:`inference.inputs.conform`)."""
        logits = self.logits(self.normalise(images), tta)
        return (logits.double() / self.temperature_for(tta)).softmax(dim=1)


def _run_card(run_dir: Path, name: str, ckpt: dict, path: Path) -> dict[str, Any]:
    """The model card's figures: the dataset, the training date, and the test figures of this
    weight set (its temperature-scaled row where there is one) when the run was tested."""
    card: dict[str, Any] = {
        "dataset": str((ckpt.get("data") or {}).get("name", "unknown")),
        "trained": _date_of(path),
        "arch": str(ckpt["model_record"].get("arch", "unknown")),
        "weights": name,
    }
    report_path = run_dir / REPORT_JSON
    try:
        report = json.loads(report_path.read_text())
        rows = report["weights"]
    except (OSError, ValueError, KeyError, TypeError):
        return card
    row = rows.get(name + SCALED_SUFFIX) or rows.get(name)
    if isinstance(row, dict) and "accuracy" in row:
        card["test_accuracy"] = float(row["accuracy"])
        if "ece" in row:
            card["test_ece"] = float(row["ece"])
        card["test_images"] = report.get("n_test")
        card["tested"] = _date_of(report_path)
    return card


def _date_of(path: Path) -> str:
    import datetime as dt

    stamp = path.stat().st_mtime
    return dt.datetime.fromtimestamp(stamp, tz=dt.timezone.utc).date().isoformat()


#: the TTA modes a temperature can be fitted under ("auto" is resolved before fitting).
_CONCRETE_TTA = tuple(mode for mode in TTA_MODES if mode != "auto")

#: model.json fields and their checks: (field, type check, allowed-values text).
_EXPORT_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("format", lambda v: v == EXPORT_FORMAT, str(EXPORT_FORMAT)),
    ("model_record", lambda v: isinstance(v, dict) and "arch" in v, "a model record with 'arch'"),
    ("trainable_stages", lambda v: isinstance(v, list), "a list of stage numbers"),
    ("head_mix", lambda v: isinstance(v, (int, float)), "a number"),
    ("class_names", lambda v: isinstance(v, list) and len(v) >= 2, "a list of >= 2 names"),
    ("mean", lambda v: isinstance(v, list) and v, "a list of numbers"),
    ("std", lambda v: isinstance(v, list) and v, "a list of numbers"),
    ("input_size", lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
    ("channels", lambda v: v in (1, 3), "1 or 3"),
    ("temperature", lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
    ("temperature_tta", lambda v: v in _CONCRETE_TTA, " | ".join(_CONCRETE_TTA)),
    ("tta", lambda v: isinstance(v, str), "a TTA mode"),
    ("weights", lambda v: isinstance(v, str), "a weight-set name"),
)


def read_export_json(path: Path) -> dict[str, Any]:
    """``model.json``, checked field by field.

    Raises:
        ExportError: the file is missing or not JSON, or a field is absent or invalid (named).
    """
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist; export a run with predict.py --export") from None
    except (OSError, ValueError) as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path} holds {type(meta).__name__}; expected a JSON object")
    for key, check, allowed in _EXPORT_FIELDS:
        if key not in meta:
            raise ExportError(f"{path}: field {key!r} is missing")
        if not check(meta[key]):
            shown = json.dumps(meta[key])[:60]
            raise ExportError(f"{path}: field {key!r} is {shown}; allowed: {allowed}")
    _check_consistent(meta, path)
    return meta


def _check_consistent(meta: dict[str, Any], path: Path) -> None:
    """The fields that describe one thing twice must agree: a row's ``p_<class>`` columns and
    the normalisation depend on it."""
    record = meta["model_record"]
    pairs = (
        ("class_names", len(meta["class_names"]), "model_record.num_classes", "num_classes"),
        ("mean", len(meta["mean"]), "channels", None),
        ("std", len(meta["std"]), "channels", None),
        ("channels", meta["channels"], "model_record.in_channels", "in_channels"),
        ("input_size", meta["input_size"], "model_record.input_size", "input_size"),
    )
    for key, value, other, record_key in pairs:
        expected = meta["channels"] if record_key is None else record.get(record_key)
        if expected is not None and value != expected:
            counted = key in ("class_names", "mean", "std")
            what = f"has {value} entries" if counted else f"is {value}"
            raise ExportError(f"{path}: field {key!r} {what}; {other} is {expected}")
