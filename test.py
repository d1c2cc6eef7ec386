"""Evaluate a trained run on the test split: ``python test.py [--run-dir runs/NAME]``.

Scores the run's best (or last) and SWA weights side by side, each also divided by its fitted
temperature where its checkpoint has one, prints the report, and writes ``test_report.json``,
``confusion_matrix.png`` and ``reliability.png`` into the run folder. ``--tta`` averages the
logits over flipped and rotated views (default: the run's own ``run.tta``). ``--report`` then
writes the run's report page (``python -m report RUN_DIR``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from dataset.errors import DataError
from report.run import ReportError
from training.engine.checkpoint import CheckpointError
from training.evaluation.report import evaluate_run, latest_run, print_report, save_report
from training.evaluation.tta import TTA_MODES


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run-dir", type=Path, help="run folder; default: the newest under runs/ with checkpoints"
    )
    parser.add_argument("--data", help="test on this source instead (same classes required)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=-1, help="-1: none on CPU, 4 on a GPU")
    parser.add_argument("--amp", default="off", help="off | auto | fp16 | bf16")
    parser.add_argument(
        "--tta",
        choices=TTA_MODES,
        help="test-time augmentation: average the logits over flips/rotations; "
        "default: the run's run.tta",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="then write the run's report page, RUN_DIR/report/index.html (python -m report)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    console = Console()
    try:
        run_dir = args.run_dir
        if run_dir is None:
            run_dir = latest_run(Path("runs"))
            console.print(f"evaluating the most recent run: {run_dir}", highlight=False)
        report = evaluate_run(
            run_dir,
            data=args.data,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            amp=args.amp,
            tta=args.tta,
        )
        print_report(report, console)
        written = save_report(report, run_dir)
        if args.report:
            from report.build import build_report  # grad-cam and the plots: only when asked

            written = (*written, build_report(run_dir, device=args.device))
    except (CheckpointError, DataError, ReportError, ValueError, FileNotFoundError) as exc:
        message = " ".join(f"error: {exc}".split())
        # soft_wrap keeps the message on one line whatever the terminal width.
        Console(stderr=True).print(Text(message, style="red"), soft_wrap=True)
        return 2
    names = [str(path) for path in written]
    console.print(f"wrote {', '.join(names[:-1])} and {names[-1]}", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
