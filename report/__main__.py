"""``python -m report RUN_DIR`` and ``python -m report compare RUN_A RUN_B ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dataset.errors import DataError
from report import DEFAULT_ERRORS, DEFAULT_PER_CLASS
from report.run import ReportError
from training.engine.checkpoint import CheckpointError


def _count(text: str) -> int:
    """An image count for the command line: an int >= 0, or argparse's one-line refusal."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: an int >= 0")
    return value


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m report",
        description="Write RUN_DIR/report/index.html: data, training curves, test figures, "
        "the highest-loss test images and Grad-CAM maps. 'python -m report compare RUN_A RUN_B "
        "...' compares runs.",
    )
    p.add_argument("run_dir", help="a run folder written by models/train.py")
    p.add_argument("--out", help="the page's folder (default: RUN_DIR/report)")
    p.add_argument(
        "--errors", type=_count, default=DEFAULT_ERRORS, help="images in the errors gallery"
    )
    p.add_argument(
        "--per-class",
        type=_count,
        default=DEFAULT_PER_CLASS,
        help="correct test images per class in the saliency section",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compare"]:
            from report.compare import main as compare_main

            return compare_main(argv[1:])
        args = run_parser().parse_args(argv)
        from report.build import build_report  # torch, grad-cam: only the run page needs them

        path = build_report(
            args.run_dir,
            args.out,
            errors=args.errors,
            per_class=args.per_class,
            device=args.device,
        )
    except (ReportError, CheckpointError, DataError, FileNotFoundError) as err:
        print(" ".join(f"error: {err}".split()), file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
