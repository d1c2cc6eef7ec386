"""Write a :class:`~inference.classifier.Classifier` to a folder for use outside this framework.

``export_model(classifier, folder)`` writes four files:

- ``model.safetensors``: the network's weights (its ``state_dict``), a plain tensor container;
- ``model.json``: everything else needed to use it (:meth:`Classifier.metadata`): the model
  record that rebuilds the network, the class names, the training split's per-channel mean and
  std (0..1 scale), the input size and channels, the fitted softmax temperature and the TTA mode
  it was fitted under, and the model card's figures. These two files are the portable form:
  :meth:`Classifier.from_export` rebuilds the classifier from them and neither is unpickled, so
  a folder from anyone can be loaded safely (``predict.py FOLDER images...``).
- ``model.onnx``: the eval-mode network as an ONNX graph (dynamo exporter, one self-contained
  file, the exporter's default opset) for onnxruntime and other runtimes. Input ``image``:
  normalised float32 ``(batch, channels, size, size)`` with any batch size; output ``logits``:
  ``(batch, classes)``. The temperature is *not* in the graph: divide the logits by
  ``model.json``'s ``temperature`` before the softmax to get the calibrated probabilities
  (it applies to logits of the ``temperature_tta`` mode; ``none`` is one plain forward).
- ``model.pt2``: the eval-mode network as a ``torch.export`` program with a dynamic batch, for
  PyTorch without this framework's code (``torch.export.load(path).module()``). Loading it goes
  through pickle, so load only files you trust; this package never reads it.

Each file is written to a temporary name in the folder and renamed into place, so a failed
export leaves no half-written file. The ONNX and ``torch.export`` programs are optional: when
an exporter fails for a model, that file is skipped with a line saying why (and an older copy
of it removed, as it would no longer match the weights), and the rest are still written.

Public API:
    export_model, EXPORT_ONNX, EXPORT_PT2, ONNX_INPUT, ONNX_OUTPUT.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from inference.classifier import EXPORT_JSON, EXPORT_WEIGHTS, Classifier
from training.engine.atomic import write_atomically

EXPORT_ONNX = "model.onnx"
EXPORT_PT2 = "model.pt2"
ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"

#: torch.export specialises a batch of 1 in the example to a fixed 1; 2 keeps the axis free.
_EXAMPLE_BATCH = 2


def export_model(classifier: Classifier, folder: str | Path) -> list[str]:
    """Write the four files of the module doc into ``folder`` (created if missing).

    Returns:
        One line per file: ``wrote NAME (SIZE)`` or ``skipped NAME: why``.

    Raises:
        OSError: the folder or the weights/JSON cannot be written (the programs are optional,
            these two are not).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = classifier.model
    was_training = model.training
    model.eval()  # the programs record the eval-mode graph (dropout off, BN running stats)
    try:
        lines = [
            _write(folder / EXPORT_WEIGHTS, lambda tmp: _save_weights(model, tmp)),
            _write(
                folder / EXPORT_JSON,
                lambda tmp: tmp.write_text(json.dumps(classifier.metadata(), indent=2) + "\n"),
            ),
        ]
        example = torch.zeros(
            _EXAMPLE_BATCH,
            classifier.channels,
            classifier.input_size,
            classifier.input_size,
            device=next(model.parameters()).device,
        )
        lines.append(_optional(folder / EXPORT_ONNX, lambda tmp: _save_onnx(model, example, tmp)))
        lines.append(_optional(folder / EXPORT_PT2, lambda tmp: _save_pt2(model, example, tmp)))
    finally:
        model.train(was_training)
    return lines


# ---------------------------------------------------------------------------- the writers


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses views and tensors that share storage; a CPU copy of each is neither.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def _batch_dim() -> dict[int, torch.export.Dim]:
    return {0: torch.export.Dim("batch", min=1)}


def _save_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,  # one file: the weights inside the graph
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_shapes=(_batch_dim(),),
            verbose=False,
        )


def _save_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet():
        program = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),))
        # An open file, not the temp name: torch.export.save warns on names not ending in .pt2.
        with path.open("wb") as handle:
            torch.export.save(program, handle)


# ---------------------------------------------------------------------------- helpers


def _write(path: Path, write: Callable[[Path], object]) -> str:
    write_atomically(path, write)
    return f"wrote {path.name} ({_size(path)})"


def _optional(path: Path, write: Callable[[Path], object]) -> str:
    """``_write``, or on failure a ``skipped`` line with the error's first line."""
    try:
        return _write(path, write)
    except Exception as error:  # noqa: BLE001 - any exporter failure only skips this file
        stale = path.is_file()
        path.unlink(missing_ok=True)
        text = str(error).strip()
        reason = type(error).__name__ + (f": {text.splitlines()[0]}" if text else "")
        tail = "; removed the older copy" if stale else ""
        return f"skipped {path.name}: {reason}{tail}"


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporters' progress lines, warnings and log records off the console."""
    sink = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
