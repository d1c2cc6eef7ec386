"""Classify many inputs in batches, keep going past bad files, and write the results.

:func:`classify` reads and conforms the images of one batch on a thread pool (PIL decodes with
the GIL released), runs one forward pass per batch, and returns one :class:`Row` per input: its
calibrated probabilities, or the reason it was skipped. Nothing one file does stops the others.

:func:`write_rows` writes the rows as CSV (one ``p_<class>`` column per class) or JSON, chosen by
the file's suffix, through a temporary file renamed into place.

Public API:
    Row, classify, write_rows, rows_csv, OUTPUT_SUFFIXES.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.classifier import Classifier
from inference.inputs import InputError, InputItem, conform, read_item
from training.engine.atomic import write_atomically

#: Output formats by file suffix.
OUTPUT_SUFFIXES: tuple[str, ...] = (".csv", ".json")


@dataclass
class Row:
    """The result for one input.

    Attributes:
        file: the input's name (a path, or ``path:key[i]`` for an ``.npz`` row).
        probabilities: calibrated probability of every class, in class order; empty when skipped.
        notes: what was changed to fit the model (resized, converted to grey, ...).
        error: why the input was skipped; ``None`` when it was classified.
    """

    file: str
    probabilities: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def top(self) -> int:
        """Index of the most probable class."""
        return int(np.argmax(self.probabilities))

    @property
    def confidence(self) -> float:
        return float(max(self.probabilities))


def _prepare(item: InputItem, classifier: Classifier) -> tuple[np.ndarray | None, Row]:
    row = Row(item.name)
    try:
        image, row.notes = conform(read_item(item), classifier.channels, classifier.input_size)
    except InputError as error:
        row.error = str(error)
        return None, row
    return image, row


def classify(
    classifier: Classifier,
    items: Sequence[InputItem],
    *,
    tta: str = "none",
    batch_size: int = 64,
    workers: int = 2,
    on_batch: Callable[[int], None] | None = None,
) -> list[Row]:
    """Calibrated probabilities for every item, in order; unreadable ones carry their reason.

    Args:
        classifier: the model.
        items: the inputs (:func:`inference.inputs.collect_inputs`).
        tta: test-time augmentation mode; the temperature applies only to the mode it was
            fitted under (:meth:`Classifier.temperature_for`).
        batch_size: images per forward pass, >= 1.
        workers: threads that read and resize images, >= 1.
        on_batch: called with the number of inputs done after each batch (a progress bar).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an int >= 1")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid; allowed: an int >= 1")
    rows: list[Row] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            prepared = list(pool.map(lambda item: _prepare(item, classifier), chunk))
            images = [image for image, _ in prepared if image is not None]
            if images:
                probabilities = iter(classifier.probabilities(images, tta).tolist())
                for image, row in prepared:
                    if image is not None:
                        row.probabilities = next(probabilities)
            rows.extend(row for _, row in prepared)
            if on_batch is not None:
                on_batch(len(chunk))
    return rows


def _columns(class_names: Sequence[str]) -> list[str]:
    return [
        "file",
        "prediction",
        "confidence",
        "low_confidence",
        *(f"p_{name}" for name in class_names),
        "notes",
        "error",
    ]


def rows_csv(rows: Iterable[Row], class_names: Sequence[str], min_confidence: float) -> str:
    """The rows as CSV text: a skipped input has empty probabilities and its ``error``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_columns(class_names))
    for row in rows:
        if row.error is not None:
            blanks = [""] * (3 + len(class_names))
            writer.writerow([row.file, *blanks, "; ".join(row.notes), row.error])
            continue
        writer.writerow(
            [
                row.file,
                class_names[row.top],
                f"{row.confidence:.6f}",
                int(row.confidence < min_confidence),
                *(f"{p:.6f}" for p in row.probabilities),
                "; ".join(row.notes),
                "",
            ]
        )
    return buffer.getvalue()


def _rows_json(
    rows: Sequence[Row], classifier: Classifier, tta: str, min_confidence: float
) -> dict[str, Any]:
    predicted, skipped = [], []
    for row in rows:
        if row.error is not None:
            skipped.append({"file": row.file, "reason": row.error})
            continue
        predicted.append(
            {
                "file": row.file,
                "prediction": classifier.class_names[row.top],
                "confidence": row.confidence,
                "low_confidence": row.confidence < min_confidence,
                "probabilities": dict(zip(classifier.class_names, row.probabilities, strict=True)),
                "notes": row.notes,
            }
        )
    return {
        "model": str(classifier.source),
        "weights": classifier.weights,
        "tta": tta,
        "temperature": classifier.temperature_for(tta),
        "min_confidence": min_confidence,
        "class_names": list(classifier.class_names),
        "predictions": predicted,
        "skipped": skipped,
    }


def write_rows(
    path: Path, rows: Sequence[Row], classifier: Classifier, tta: str, min_confidence: float
) -> None:
    """Write the rows to ``path`` (``.csv`` or ``.json``), atomically.

    Raises:
        ValueError: the suffix is neither.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        text = rows_csv(rows, classifier.class_names, min_confidence)
    elif suffix == ".json":
        text = json.dumps(_rows_json(rows, classifier, tta, min_confidence), indent=2) + "\n"
    else:
        raise ValueError(
            f"--out {path}: unknown format {suffix or '(no suffix)'}; allowed: "
            + " ".join(OUTPUT_SUFFIXES)
        )
    write_atomically(path, lambda temp: temp.write_text(text, encoding="utf-8"))
