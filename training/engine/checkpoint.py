"""Write checkpoints atomically, read them safely, and refuse ones that do not fit the model.

A checkpoint is a plain dict (see ``FORMAT``) saved with ``torch.save``. It is read back with
``weights_only=True``, so loading never runs code from the file; in exchange the dict may hold
only tensors, dicts, lists, tuples, sets, str, bytes, numbers, bool and None (plus torch sizes,
dtypes and devices). :func:`save_checkpoint` checks that before writing, so a stray numpy array
fails at save time rather than at resume.

Public API:
    CheckpointError, FORMAT, RESUME_KEYS, save_checkpoint, load_checkpoint, check_resumable,
    model_record, check_compatible, restore_model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import record_of_checkpoint
from models.staged import trainable_at
from training.engine.atomic import create_temp_beside

#: version of the checkpoint layout this module writes and reads.
FORMAT = 1


_SAFE_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.Size, torch.dtype)


_MAX_LISTED = 5


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# torch names the refused import two ways: "Unsupported global: GLOBAL mod.name was not an
# allowed global" and (for blocked modules such as os or posix) "unsupported GLOBAL mod.name
# whose module mod is blocked".
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported (?:global: )?global ([\w.]+)", re.IGNORECASE)


_WEIGHTS_ONLY_REFUSAL = "weights only load failed"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model; one-line message."""


def _unsafe_entry(obj: Any, where: str) -> str | None:
    """The key path of the first value ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, (torch.Tensor, torch.device, *_SAFE_LEAVES)):
        return None
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found = _unsafe_entry(key, f"{where} key {key!r}") or _unsafe_entry(
                value, f"{where}[{key!r}]"
            )
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(obj):
            found = _unsafe_entry(value, f"{where}[{i}]")
            if found:
                return found
        return None
    return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"


def save_checkpoint(payload: dict, path: Path) -> None:
    """Write ``payload`` to ``path`` atomically: the file is either the old one or the new one.

    The dict goes to a temporary file in the same folder, is flushed to disk, then renamed onto
    ``path``. On any failure (including Ctrl-C) the temporary file is removed and a previous
    file at ``path`` is left untouched. Missing parent folders are created.

    Raises:
        TypeError: when the payload holds a value that weights-only loading would refuse.
    """
    path = Path(path)
    bad = _unsafe_entry(payload, "payload")
    if bad:
        raise TypeError(
            f"cannot save checkpoint {path}: {bad} is not allowed; a checkpoint may hold only "
            "tensors, dicts, lists, tuples, str, numbers, bool and None"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = create_temp_beside(path)  # the umask's mode, like any other output
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a written checkpoint file to ``dst`` atomically (temporary file, then rename)."""
    dst = Path(dst)
    fd, tmp_name = create_temp_beside(dst)
    try:
        with os.fdopen(fd, "wb") as f, open(src, "rb") as source:
            shutil.copyfileobj(source, f, length=1 << 22)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(dst.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; Windows cannot open folders, which is harmless.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _first_line(text: str, limit: int = 200) -> str:
    line = _ANSI.sub("", text).strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _describe_load_error(error: BaseException) -> str:
    message = str(error)
    unsupported = _UNSUPPORTED_GLOBAL.search(message)
    if unsupported or _WEIGHTS_ONLY_REFUSAL in message.lower():
        what = f"would import {unsupported.group(1)}" if unsupported else "holds pickled objects"
        return (
            f"it {what}, which could execute code, so it was not unpickled "
            "(torch.load with weights_only=True refuses it); a checkpoint may hold only tensors "
            "and plain containers"
        )
    detail = _first_line(message)
    name = type(error).__name__
    if not detail:  # EOFError and friends carry no message
        return f"it is not a readable torch checkpoint ({name}; empty or truncated file?)"
    return f"it is not a readable torch checkpoint ({name}: {detail})"


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check its outline.

    Args:
        path: the checkpoint file.
        map_location: where tensors go, as for ``torch.load``.

    Raises:
        CheckpointError: when the file is missing, corrupt, holds non-weights objects, is not a
            dict with "format" and "model", or has an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {problem}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for bad files; all mean "unreadable"
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded: {_describe_load_error(error)}"
        ) from error
    _check_outline(ckpt, path)
    return ckpt


#: what :meth:`training.trainer.Trainer.load_state` needs beyond the outline to continue a run;
#: weights-only files (best.pt, swa.pt) lack the optimizer and RNG entries.
RESUME_KEYS: tuple[str, ...] = (
    "config",
    "epoch",
    "optimizer",
    "scheduler",
    "stepper",
    "best",
    "rng",
)


def check_resumable(ckpt: Mapping[str, Any], path: Path) -> None:
    """Refuse a checkpoint that lacks what resuming a run needs (see :data:`RESUME_KEYS`).

    Raises:
        CheckpointError: naming the missing keys, or a ``config`` that is not a mapping.
    """
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} cannot resume a run: it lacks {', '.join(missing)} (a run's "
            "checkpoints/last.pt holds them; best.pt and swa.pt hold weights only)"
        )
    if not isinstance(ckpt["config"], Mapping):
        raise CheckpointError(
            f"checkpoint {path} cannot resume a run: its config is a "
            f"{type(ckpt['config']).__name__}, expected a dict of sections"
        )


def _check_outline(ckpt: Any, path: Path) -> None:
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict with 'format' "
            "and 'model'"
        )
    missing = [key for key in ("format", "model") if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks key(s) {missing}; is it a checkpoint of this project? "
            f"(keys found: {sorted(map(str, ckpt))[:_MAX_LISTED]})"
        )
    if ckpt["format"] != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {ckpt['format']!r}; this version reads format {FORMAT}"
        )


def _as_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config)


def _shorten(values: Sequence[Any]) -> str:
    shown = ", ".join(repr(v) for v in values[:_MAX_LISTED])
    more = f", ... ({len(values)} in all)" if len(values) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _record_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs in the architecture: the arch, the image channels, the class count and every
    option of the record (the model's ``settings`` may change between runs)."""
    missing = "<absent>"
    pairs = [(k, saved.get(k, missing), current.get(k, missing)) for k in _SHAPE_KEYS]
    old_options, new_options = saved.get("options", {}), current.get("options", {})
    names = sorted(set(old_options) | set(new_options))
    pairs += [(k, old_options.get(k, missing), new_options.get(k, missing)) for k in names]
    return [
        f"{name}: checkpoint {old!r} vs current {new!r}" for name, old, new in pairs if old != new
    ]


_SHAPE_KEYS: tuple[str, ...] = ("arch", "in_channels", "num_classes")


def _class_difference(saved: Sequence[str], current: Sequence[str]) -> str | None:
    saved, current = list(saved), list(current)
    if saved == current:
        return None
    if sorted(saved) == sorted(current):
        return (
            f"class_names: same classes in another order ({_shorten(saved)} vs {_shorten(current)})"
        )
    only_saved = [c for c in saved if c not in current]
    only_current = [c for c in current if c not in saved]
    return (
        f"class_names: checkpoint {_shorten(saved)} vs current {_shorten(current)} "
        f"(only in checkpoint: {_shorten(only_saved)}, only in current: {_shorten(only_current)})"
    )


def model_record(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's model record (arch, options, settings, stage names); see
    :func:`models.registry.record_of_checkpoint`.

    Raises:
        CheckpointError: when the checkpoint holds none.
    """
    record = record_of_checkpoint(ckpt)
    if record is None:
        raise CheckpointError("checkpoint has no 'model_record' dict; cannot rebuild its model")
    return record


def check_compatible(ckpt: dict, record: Mapping[str, Any], class_names: list[str]) -> None:
    """Refuse a checkpoint whose architecture or class list differs from the current run's.

    Args:
        ckpt: a dict from :func:`load_checkpoint`.
        record: the current model's ``record()``.
        class_names: the current dataset's class names, in label order.

    Raises:
        CheckpointError: naming every differing field (the arch, channels, classes and the
            record's options) with both values.
    """
    problems = _record_differences(model_record(ckpt), record)
    saved_classes = ckpt.get("class_names")
    if saved_classes is None:
        problems.append("class_names: absent from the checkpoint")
    else:
        class_problem = _class_difference(saved_classes, class_names)
        if class_problem:
            problems.append(class_problem)
    if problems:
        raise CheckpointError(f"checkpoint does not fit this run: {'; '.join(problems)}")


def _state_differences(model: nn.Module, state: Mapping[str, Any]) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    parts = [
        f"{label} {len(keys)}: {', '.join(map(str, keys[:_MAX_LISTED]))}"
        + (", ..." if len(keys) > _MAX_LISTED else "")
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", mismatched),
        )
        if keys
    ]
    return "; ".join(parts)


def restore_model(model: nn.Module, ckpt: dict) -> None:
    """Give a staged model the checkpoint's trainable stages and head mix (1 when absent) and
    load its weights. Checkpoints from before the stage contract name only ``active_blocks``
    (blocks 1..k of a network that grows).

    Raises:
        CheckpointError: when the stages or ``head_mix`` are invalid, or the state dict
            does not fit, summarising the first few missing, unexpected and mismatched keys.
    """
    try:
        stages = ckpt.get("trainable_stages")
        if stages is None:
            stages = trainable_at("grow", ckpt.get("active_blocks"), model.num_stages)
        model.set_trainable(stages)
        model.set_head_mix(ckpt.get("head_mix", 1.0))
    except (ValueError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint trainable stages/head_mix cannot be applied: {_first_line(str(error))}"
        ) from error
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as error:
        summary = _state_differences(model, ckpt["model"]) or _first_line(str(error))
        raise CheckpointError(f"checkpoint weights do not fit the model: {summary}") from error
