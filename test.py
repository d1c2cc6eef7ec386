"""Evaluate a trained run on the test split: ``python test.py [--run-dir runs/NAME]``.

Scores the run's best (or last) and SWA weights side by side, each also divided by its fitted
temperature where its checkpoint has one, prints the report, and writes ``test_report.json``,
``confusion_matrix.png`` and ``reliability.png`` into the run folder. ``--tta`` averages the
logits over flipped and rotated views (default: the run's own ``run.tta``). ``--report`` then
writes the run's report page (``python -m report RUN_DIR``). ``--ensemble RUN RUN ...`` (or a
study folder) scores the mean of several runs' logits instead (``training.evaluation.ensemble``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from dataset.errors import DataError
from experiments.folder import StudyError, expand_runs, is_study
from report.run import ReportError
from training.engine.checkpoint import CheckpointError
from training.evaluation.ensemble import (
    ENSEMBLE_JSON,
    SCALINGS,
    evaluate_ensemble,
    print_ensemble_report,
    save_json,
)
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
    parser.add_argument(
        "--ensemble",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="score the mean logits of these runs' final weights (not with --run-dir/--report); "
        "a study folder (with study.json) stands for its finished members",
    )
    parser.add_argument(
        "--ensemble-scaling",
        choices=SCALINGS,
        help="member (default): divide each member's logits by its own fitted temperature "
        "before averaging; none: average the raw logits",
    )
    parser.add_argument(
        "--ensemble-out",
        type=Path,
        metavar="FILE.json",
        help="write the ensemble report here; default: STUDY/ensemble_report.json when one "
        "study folder is given, else the report is only printed",
    )
    return parser


def _scoring(args: argparse.Namespace) -> dict[str, Any]:
    """How a run or an ensemble is scored: the options both take from the command line."""
    return {
        "data": args.data,
        "device": args.device,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "amp": args.amp,
        "tta": args.tta,
    }


def run_ensemble(args: argparse.Namespace, console: Console) -> Path | None:
    """Score ``--ensemble``'s members, print the report and write its JSON where asked."""
    report = evaluate_ensemble(
        expand_runs(args.ensemble),
        **_scoring(args),
        scaling=args.ensemble_scaling or "member",
    )
    print_ensemble_report(report, console)
    out = args.ensemble_out
    if out is None and len(args.ensemble) == 1 and is_study(args.ensemble[0]):
        out = args.ensemble[0] / ENSEMBLE_JSON
    return None if out is None else save_json(report, out)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.ensemble and (args.run_dir or args.report):
        parser.error("--ensemble cannot be combined with --run-dir or --report")
    if not args.ensemble and (args.ensemble_scaling or args.ensemble_out):
        parser.error("--ensemble-scaling and --ensemble-out need --ensemble")
    console = Console()
    try:
        if args.ensemble:
            out = run_ensemble(args, console)
            done = f"wrote {out}" if out else "ensemble report not written: no --ensemble-out"
            console.print(done, highlight=False, soft_wrap=True)
            return 0
        run_dir = args.run_dir
        if run_dir is None:
            run_dir = latest_run(Path("runs"))
            console.print(f"evaluating the most recent run: {run_dir}", highlight=False)
        report = evaluate_run(run_dir, **_scoring(args))
        print_report(report, console)
        written = save_report(report, run_dir)
        if args.report:
            from report.build import build_report  # grad-cam and the plots: only when asked

            written = (*written, build_report(run_dir, device=args.device))
    except (
        CheckpointError,
        DataError,
        ReportError,
        StudyError,
        ValueError,
        OSError,  # a missing run folder, an unwritable --ensemble-out
    ) as exc:
        message = " ".join(f"error: {exc}".split())
        # soft_wrap keeps the message on one line whatever the terminal width.
        Console(stderr=True).print(Text(message, style="red"), soft_wrap=True)
        return 2
    names = [str(path) for path in written]
    console.print(f"wrote {', '.join(names[:-1])} and {names[-1]}", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
