"""Load pretrained weights into a model, and fetch the libraries' ImageNet weights.

:func:`load_weights` reads a state dict from a ``.pth``/``.pt`` file (``torch.load`` with
``weights_only=True``: a file that would import code is refused, never unpickled) or a
``.safetensors`` file, matches its keys to the model's and loads every tensor whose shape fits.
Keys may carry a leading ``module.`` (DataParallel) or ``_orig_mod.`` (``torch.compile``), and
may be the wrapped library network's own keys (``conv1.weight`` for a zoo model's
``net.conv1.weight``, see :attr:`models.zoo.ZooModel.library_prefix`); a file holding a dict with
a ``"state_dict"`` or ``"model"`` entry (a framework checkpoint) is read through that entry.

Two differences are expected and repaired or accepted rather than reported as errors:

- an RGB input conv loaded into a model with one input channel is summed over its input channels
  (as timm and torchvision do for grey images): the response to a grey image equals the RGB
  network's response to that grey value in all three channels; reported as *adapted*;
- the classifier of another class count (ImageNet's 1000) stays the model's new one; reported
  as *classifier replaced*.

Everything else that does not fit is listed in the :class:`WeightReport`.

:func:`pretrained_imagenet` returns the ImageNet state dict of a registry arch: torchvision's
published weights (kept in torch hub's ``checkpoints`` folder, where torchvision itself caches
them) or timm's (through ``timm.create_model(pretrained=True)``, cached by Hugging Face). Without
a network the call fails in one line that names the file to fetch and the folder to put it in.

Public API:
    WeightsError, WeightReport, load_weights, read_state_dict, pretrained_imagenet.

"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import TIMM_PREFIX, TORCHVISION_ARCHS

SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".safetensors")
_LISTED = 5
_STRIPPED_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
# torch names a refused import "Unsupported global: GLOBAL mod.name" or "unsupported GLOBAL
# mod.name whose module mod is blocked".
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported (?:global: )?global ([\w.]+)", re.IGNORECASE)


class WeightsError(ValueError):
    """Weights that cannot be read, fetched or used; the message is one line."""


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


# --------------------------------------------------------------------------- the report


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    more = f", +{len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f" ({shown}{more})" if names else ""


@dataclass
class WeightReport:
    """What :func:`load_weights` did with each tensor.

    Attributes:
        source: the file (or "state dict") the weights came from.
        total: how many tensors the model's state dict holds.
        matched: model keys loaded as saved.
        adapted: model keys loaded after summing an RGB input conv over its input channels.
        classifier_replaced: model keys of the head whose saved shape differs (another class
            count): the model keeps its new classifier.
        missing: model keys the file does not provide (``num_batches_tracked`` is not counted).
        unexpected: saved keys that name nothing in the model.
        shape_mismatches: ``(model key, saved shape, model shape)`` for the rest, not loaded.
    """

    source: str = "state dict"
    total: int = 0
    matched: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    classifier_replaced: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list
    )

    @property
    def loaded(self) -> int:
        return len(self.matched) + len(self.adapted)

    def lines(self) -> list[str]:
        """4-5 short lines: the counts, then up to 5 names per kind of problem."""
        lines = [f"weights {self.source}: loaded {self.loaded} of {self.total} model tensors"]
        notes = []
        if self.adapted:
            notes.append(f"adapted to 1 input channel (RGB summed){_listed(self.adapted)}")
        if self.classifier_replaced:
            replaced = self.classifier_replaced
            notes.append(f"classifier replaced (other classes){_listed(replaced)}")
        if notes:
            lines.append("; ".join(notes))
        lines.append(f"missing: {len(self.missing)}{_listed(self.missing)}")
        lines.append(f"unexpected: {len(self.unexpected)}{_listed(self.unexpected)}")
        shapes = [
            f"{name} {_shape(saved)} vs {_shape(model)}"
            for name, saved, model in self.shape_mismatches
        ]
        lines.append(f"shape mismatches (saved vs model): {len(shapes)}{_listed(shapes)}")
        return lines


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


# --------------------------------------------------------------------------- reading files


def _describe_load_error(error: BaseException) -> str:
    message = str(error)
    unsupported = _UNSUPPORTED_GLOBAL.search(message)
    if unsupported:
        return (
            f"it would import {unsupported.group(1)}, which could run code, so it was not"
            " unpickled (weights_only=True); a weights file may hold only tensors and plain"
            " containers"
        )
    if "weights only load failed" in message.lower():
        # torch's long refusal; the line after "WeightsUnpickler error:" says what stopped it
        detail = message.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        reason = detail[0] if detail and detail[0] != message.splitlines()[0] else "refused"
        return f"it is not a readable weights file (weights-only unpickler: {reason})"
    return f"it is not a readable weights file ({_first_line(error)})"


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The state dict in a ``.pth``/``.pt`` (weights only) or ``.safetensors`` file.

    A dict with a ``"state_dict"`` or ``"model"`` entry that is itself a dict is read through
    that entry (training checkpoints).

    Raises:
        WeightsError: in one line, when the file is missing, of another kind, unreadable or
            would run code when unpickled.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise WeightsError(
            f"weights file {path} has an unknown suffix {path.suffix!r}; allowed: "
            + " | ".join(SUFFIXES)
        )
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise WeightsError(f"weights file {path} {problem}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types; all mean "unreadable"
        raise WeightsError(
            f"weights file {path} cannot be loaded: {_describe_load_error(error)}"
        ) from error
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not any(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WeightsError(f"weights file {path} holds no state dict (a dict of tensors)")
    return dict(state)


# --------------------------------------------------------------------------- loading


def _head_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's classifier head (none for a plain module)."""
    head_module = getattr(model, "head_module", None)
    if head_module is None:
        return set()
    head = head_module()
    ids = {id(t) for t in head.parameters()} | {id(t) for t in head.buffers()}
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {name for name, tensor in named if id(tensor) in ids}


def _input_conv_key(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first 4-d floating-point tensor of the model: its input conv's (or patch) kernel."""
    for key, value in state.items():
        if value.ndim == 4 and value.is_floating_point():
            return key
    return None


def _model_key(key: str, model_keys: Mapping[str, Any], prefix: str) -> str | None:
    for stripped in _STRIPPED_PREFIXES:
        if key.startswith(stripped):
            key = key[len(stripped) :]
    if key in model_keys:
        return key
    if prefix and prefix + key in model_keys:
        return prefix + key
    return None


def load_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    report: bool = True,
    new_head: bool = False,
) -> WeightReport:
    """Load the tensors of ``source`` that fit ``model``; return (and print) what happened.

    Args:
        model: any module; a :class:`~models.staged.StagedModel` also gets its head recognised.
        source: a weights file (see :func:`read_state_dict`) or a state dict.
        report: print :meth:`WeightReport.lines`.
        new_head: keep the model's own classifier even where the saved one has its shape: the
            saved weights were trained on other classes (the same count in another meaning).

    Raises:
        WeightsError: in one line, when the file cannot be read or not a single tensor fits
            (weights of another network altogether).
    """
    if isinstance(source, Mapping):
        saved, name = dict(source), "state dict"
    else:
        saved, name = read_state_dict(source), str(source)
    own = model.state_dict()
    prefix = getattr(model, "library_prefix", "")
    head = _head_keys(model)
    first_conv = _input_conv_key(own)
    result = WeightReport(source=name, total=len(own))
    to_load: dict[str, torch.Tensor] = {}
    for key, value in saved.items():
        target = _model_key(key, own, prefix)
        if target is None or not isinstance(value, torch.Tensor):
            result.unexpected.append(key)
            continue
        want = tuple(own[target].shape)
        if new_head and target in head:
            result.classifier_replaced.append(target)
        elif tuple(value.shape) == want:
            to_load[target] = value
            result.matched.append(target)
        elif (
            target == first_conv
            and want[1] == 1
            and value.shape[:1] + value.shape[2:] == (own[target].shape[:1] + own[target].shape[2:])
        ):
            # RGB kernels summed: a grey image x gives the RGB network's response to (x, x, x).
            to_load[target] = value.sum(dim=1, keepdim=True)
            result.adapted.append(target)
        elif target in head:
            result.classifier_replaced.append(target)
        else:
            result.shape_mismatches.append((target, tuple(value.shape), want))
    if not to_load:
        raise WeightsError(
            f"weights {name} do not fit {type(model).__name__}: none of its {len(saved)} tensors"
            f" matches a model key and shape (saved keys start {list(saved)[:3]},"
            f" model keys {list(own)[:3]})"
        )
    seen = set(to_load) | set(result.classifier_replaced) | {n for n, *_ in result.shape_mismatches}
    result.missing = [k for k in own if k not in seen and not k.endswith("num_batches_tracked")]
    model.load_state_dict(to_load, strict=False)
    if report:
        for line in result.lines():
            print(line)
    return result


# --------------------------------------------------------------------------- ImageNet weights


def _torchvision_imagenet(arch: str) -> dict[str, Any]:
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    folder = Path(torch.hub.get_dir()) / "checkpoints"  # where torch.hub caches downloads
    try:
        # torchvision's own loader: cached in the folder above, the download written to a
        # temporary file and moved into place, its sha256 prefix checked, read weights-only.
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError and timeouts are OSErrors
        raise WeightsError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded"
            f" ({_first_line(error)}): download {weights.url} into {folder}/ so that runs find it"
        ) from error


def _timm_imagenet(arch: str, name: str) -> dict[str, Any]:
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for {arch}")
    if cfg.hf_hub_id:
        from huggingface_hub.constants import HF_HUB_CACHE

        what = f"the Hugging Face repo {cfg.hf_hub_id} (huggingface-cli download {cfg.hf_hub_id})"
        folder = HF_HUB_CACHE
    else:
        what, folder = cfg.url or str(cfg.file), str(Path(torch.hub.get_dir()) / "checkpoints")
    try:
        net = timm.create_model(name, pretrained=True)
    except Exception as error:  # HF hub, urllib and timm raise many types; all mean "not here"
        raise WeightsError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded"
            f" ({_first_line(error)}): download {what} into {folder}/ so that runs find it"
        ) from error
    return net.state_dict()


def pretrained_imagenet(arch: str) -> dict[str, Any]:
    """The library's ImageNet state dict for a registry arch (its own keys, 1000 classes).

    Raises:
        WeightsError: in one line, when the arch has no ImageNet weights, or they are neither
            cached nor downloadable; the line names the file (URL or Hugging Face repo) and the
            folder a later offline run looks in.
    """
    if arch in TORCHVISION_ARCHS:
        return _torchvision_imagenet(arch)
    if isinstance(arch, str) and arch.startswith(TIMM_PREFIX):
        return _timm_imagenet(arch, arch[len(TIMM_PREFIX) :])
    allowed = ", ".join(TORCHVISION_ARCHS)
    raise WeightsError(
        f"model.arch={arch!r} has no ImageNet weights; allowed: {allowed}, timm/<name>"
    )
