"""Train BasicCNNModel: ``python models/train.py [--preset cpu] [--data SOURCE] [...]``.

Configuration: typed defaults -> ``--preset`` -> ``--config FILE.yaml`` -> ``--set key=value`` ->
the shortcut flags; ``--resume RUN_DIR`` continues a run from its ``checkpoints/last.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from dataset.errors import DataError
from training.build import build_trainer, default_run_dir, load_resume
from training.checkpoint import CheckpointError
from training.config import ConfigError, build_parser, config_from_args, format_config
from training.console import warn


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    try:
        if args.resume:
            cfg, ckpt = load_resume(args.resume)
            ignored = [k for k, v in vars(args).items() if k not in ("resume", "epochs") and v]
            if ignored:
                warn(console, f"ignored with --resume (the run's stored config is used): {ignored}")
            if args.epochs:
                cfg.run.epochs = args.epochs  # allow extending a finished run
            run_dir = Path(args.resume)
        else:
            cfg, ckpt = config_from_args(args), None
            run_dir = Path(cfg.run.run_dir) if cfg.run.run_dir else default_run_dir(cfg)
        console.print("[bold]configuration[/]\n" + format_config(cfg), markup=True)
        summary = build_trainer(cfg, run_dir, console=console, resume=ckpt).fit()
    except (ConfigError, DataError, CheckpointError) as exc:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 2
    if summary["stopped"] == "interrupted":
        console.print(f"[yellow]stopped; resume with: python models/train.py --resume {run_dir}[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
