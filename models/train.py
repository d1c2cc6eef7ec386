"""Train a registered network: ``python models/train.py [--model NAME] [--data SOURCE] [...]``.

Configuration: typed defaults -> ``--preset`` -> ``--config FILE.yaml`` -> ``--set key=value`` ->
the shortcut flags; ``--resume RUN_DIR`` continues a run from its ``checkpoints/last.pt``. A new
run needs an empty (or new) run folder; ``--overwrite`` clears one an earlier run used.
Without ``--data`` it trains on the embedded sample ``bloodcells_mini``; without a preset it
picks ``full`` on a CUDA GPU and ``cpu`` elsewhere.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from rich.console import Console

from dataset.errors import DataError
from dataset.sources import embedded_sample
from experiments.folder import StudyError, expand_runs
from training.build import build_trainer, default_run_dir, join_world, load_resume
from training.callbacks.console import warn
from training.config.cli import build_parser, config_from_args
from training.config.schema import ConfigError, format_changes
from training.engine.checkpoint import CheckpointError
from training.engine.distributed import DistributedError, World, barrier, broadcast, stop
from training.engine.run_dir import prepare_run_dir


def data_note(source: str) -> str | None:
    """One line when ``source`` is an embedded sample: what it is and how to train on more."""
    sample = embedded_sample(source)
    if sample is None:
        return None
    return (
        f"data: {sample.name}, the embedded sample ({sample.description}); "
        "the full BloodMNIST: --data bloodmnist; your own images: --data path/to/folder"
    )


def eval_command(run_dir: Path) -> str:
    """The command that scores ``run_dir`` on its test split."""
    return f"python test.py --run-dir {shlex.quote(str(run_dir))}"


def stopped_at_once(run_dir: Path | None) -> str:
    """What a second Ctrl-C (which skips saving the epoch in progress) leaves to resume from."""
    last = None if run_dir is None else run_dir / "checkpoints" / "last.pt"
    if last is None or not last.is_file():
        return "stopped at once, before any epoch was saved"
    return (
        "stopped at once; resume from the last epoch with: "
        f"python models/train.py --resume {shlex.quote(str(run_dir))}"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun every process runs this; rank 0 alone prints (errors included) and writes.
    try:
        launched = World.from_env()
    except DistributedError as exc:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 2
    main_process = launched.is_main
    console = Console(highlight=False, quiet=not main_process)
    notes: list[str] = []
    run_dir: Path | None = None
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
            cfg, ckpt = config_from_args(args, announce=notes.append), None
            # A study folder among the teachers stands for its finished members; the run's
            # config.yaml then names the runs themselves, so a resume rebuilds the same teacher.
            cfg.kd.teacher = [str(run) for run in expand_runs(cfg.kd.teacher)]
            run_dir = Path(cfg.run.run_dir) if cfg.run.run_dir else default_run_dir(cfg)
        world, _ = join_world(cfg, launched)
        run_dir = Path(broadcast(world, str(run_dir)))  # a timestamped name: rank 0's
        if world.is_main:
            prepare_run_dir(run_dir, resume=ckpt is not None, overwrite=args.overwrite)
        barrier(world)
        # What differs from the preset, not all ~100 settings: config.yaml holds every one. A
        # resumed run's stored settings were resolved before; listing them as changes would
        # count every epoch setting its plan scaled.
        stored = "configuration: the stored run's" if ckpt is not None else format_changes(cfg)
        notes.append(f"{stored}; every setting: {run_dir / 'config.yaml'}")
        notes.append(data_note(cfg.data.source) or "")
        for note in filter(None, notes):
            console.print(note, soft_wrap=True, markup=False)
        summary = build_trainer(cfg, run_dir, console=console, resume=ckpt, world=world).fit()
    except (ConfigError, StudyError) as exc:
        # From the command line and the config: the same on every process, rank 0 says it once.
        errors = Console(stderr=True, highlight=False, quiet=not main_process)
        errors.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 2
    except (DataError, CheckpointError, DistributedError) as exc:
        # Files and devices can differ between machines: every process says its own.
        where = "" if main_process else f"rank {launched.rank}: "
        errors = Console(stderr=True, highlight=False)
        errors.print(f"[bold red]error:[/] {where}{exc}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        console.print(stopped_at_once(run_dir), style="yellow", soft_wrap=True, markup=False)
        return 130
    finally:
        stop()
    if summary["stopped"] == "interrupted" and main_process:
        # The other processes exit cleanly: torchrun would otherwise take a non-zero status
        # for a failure and kill rank 0 while it still writes its logs.
        launch = "python models/train.py"
        if world.distributed:  # the same number of processes continues the same state
            launch = f"torchrun --standalone --nproc_per_node {world.size} models/train.py"
        console.print(f"[yellow]stopped; resume with: {launch} --resume {run_dir}[/]")
        return 130
    console.print(f"test it with: {eval_command(run_dir)}", soft_wrap=True, markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
