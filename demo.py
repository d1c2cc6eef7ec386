"""Try a trained run in the browser: ``python demo.py RUN_DIR [--port 7860] [--host 127.0.0.1]``.

Serves a local page (``inference.demo``) that classifies one uploaded image, or a sample of the
run's test split, with the run's calibrated probabilities, a Grad-CAM overlay and a model card.
It binds 127.0.0.1 unless ``--host`` says otherwise and uses no internet.

Exit status: 0 when the server was stopped, 2 on an error that stops it from starting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.evaluation.report import WEIGHT_FILES


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a trained run folder")
    parser.add_argument(
        "--port", type=int, default=7860, help="port to serve on (default 7860; 0: any free one)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument(
        "--weights",
        choices=tuple(WEIGHT_FILES),
        help="weight set selected first; default: swa when the run has it, else best, else last",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from inference.demo import DemoError, launch
    from training.engine.checkpoint import CheckpointError

    try:
        launch(
            args.run_dir, host=args.host, port=args.port, weights=args.weights, device=args.device
        )
    except (DemoError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(" ".join(f"error: {exc}".split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
