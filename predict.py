"""Classify new images with a trained run: ``python predict.py RUN_DIR INPUT... [--out preds.csv]``.

INPUT is image files, folders (searched recursively) or ``.npz`` files (``FILE.npz:KEY`` for one
array). Every image is brought to the run's input size and channels and normalised as in
training; the output has one row per image: the predicted class, the calibrated probability of
every class (the weight set's fitted temperature), and a low-confidence flag. A file that cannot
be used is listed with its reason and the rest are still classified. Without ``--out`` the CSV
goes to standard output and everything else to standard error.

``python predict.py RUN_DIR --export DIR`` writes the model for use elsewhere: safetensors
weights with a JSON description, ONNX and ``torch.export`` programs (``inference.export``).
RUN_DIR may also be such an exported folder.

Exit status: 0 when every input was classified (or the export was written), 1 when some inputs
were skipped, 2 on an error that stops everything.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from inference.batch import OUTPUT_SUFFIXES, classify, rows_csv, write_rows
from inference.classifier import Classifier, ExportError
from inference.inputs import collect_inputs
from training.engine.checkpoint import CheckpointError
from training.evaluation.report import WEIGHT_FILES
from training.evaluation.tta import TTA_MODES


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder, or a folder from --export")
    parser.add_argument("inputs", nargs="*", help="image files, folders or .npz[:KEY] files")
    parser.add_argument(
        "--weights",
        choices=tuple(WEIGHT_FILES),
        help="which weights of the run; default: swa when the run has it, else best, else last",
    )
    parser.add_argument(
        "--tta", choices=TTA_MODES, help="test-time augmentation; default: the run's run.tta"
    )
    parser.add_argument(
        "--out", type=Path, help=f"write the rows here ({' or '.join(OUTPUT_SUFFIXES)})"
    )
    parser.add_argument(
        "--min-confidence",
        type=_probability,
        default=0.5,
        help="flag rows whose top probability is below this (default 0.5; 0 flags none)",
    )
    parser.add_argument("--batch-size", type=_positive, default=64)
    parser.add_argument("--workers", type=_positive, default=2, help="image-reading threads")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--export", type=Path, metavar="DIR", help="export the model to DIR")
    return parser


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside the allowed range 0..1")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is invalid; allowed: an int >= 1")
    return value


def _classify(args: argparse.Namespace, classifier: Classifier, err: Console) -> int:
    items = collect_inputs(args.inputs)
    tta = args.tta or classifier.tta
    err.print(
        f"{classifier.source}: {classifier.weights} weights, {len(classifier.class_names)}"
        f" classes, {classifier.input_size}x{classifier.input_size}x{classifier.channels},"
        f" tta {tta}, T={classifier.temperature_for(tta):.3f}; {len(items)} input(s)",
        highlight=False,
        soft_wrap=True,
    )
    for note in classifier.notes:
        err.print(note, highlight=False)
    progress = Progress(
        TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, transient=True,
    )  # fmt: skip
    with progress:
        task = progress.add_task("", total=len(items))
        rows = classify(
            classifier,
            items,
            tta=tta,
            batch_size=args.batch_size,
            workers=args.workers,
            on_batch=lambda n: progress.advance(task, n),
        )
    if args.out is None:
        sys.stdout.write(rows_csv(rows, classifier.class_names, args.min_confidence))
    else:
        write_rows(args.out, rows, classifier, tta, args.min_confidence)
    failed = [row for row in rows if row.error is not None]
    for row in failed:
        err.print(Text(f"skipped {row.file}: {row.error}", style="yellow"), soft_wrap=True)
    done = len(rows) - len(failed)
    low = sum(1 for r in rows if r.error is None and r.confidence < args.min_confidence)
    where = f"; wrote {args.out}" if args.out else ""
    err.print(
        f"classified {done}, skipped {len(failed)}, below {args.min_confidence:g} confidence"
        f" {low}{where}",
        highlight=False,
    )
    return 1 if failed else 0


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that could not be written before any image is classified."""
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out}: unknown format; allowed: {' '.join(OUTPUT_SUFFIXES)}")
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: folder {folder} is not writable")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        if args.export is None and not args.inputs:
            raise ValueError("nothing to do: give INPUT files or folders, or --export DIR")
        if args.out is not None:
            _check_out(args.out)
        classifier = Classifier.load(args.run_dir, args.weights, args.device)
        status = 0
        if args.export is not None:
            from inference.export import export_model  # onnx and torch.export: only when asked

            for line in export_model(classifier, args.export):
                err.print(line, highlight=False, soft_wrap=True)
        if args.inputs:
            status = _classify(args, classifier, err)
    except (CheckpointError, ExportError, ValueError, OSError) as exc:
        message = " ".join(f"error: {exc}".split())
        err.print(Text(message, style="red"), soft_wrap=True)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
