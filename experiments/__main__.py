"""``python -m experiments KIND --study-dir DIR [options] [-- training options]``.

Everything after the first ``--`` is passed to models/train.py for every member; everything
before it belongs to the study, so the two option sets can never be confused (train.py has a
``--seed`` beside the study's ``--seeds``). Each kind is a module with ``add_parser`` and
``run``; a new kind is one more entry in :data:`KINDS`.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from experiments import cv, search, seeds
from experiments.study import StudyError

#: subcommand modules, in help order.
KINDS = (seeds, search, cv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Studies: train and test several runs with one command, summarised "
        "together in one folder. Training options for models/train.py go after --.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind in KINDS:
        kind.add_parser(sub)
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The study's options and the training options (after the first ``--``)."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_argv = split_argv(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(own)
    err = Console(stderr=True, highlight=False)
    if unknown:
        err.print(
            f"[bold red]error:[/] unknown study option(s) {' '.join(unknown)}; training options "
            "go after --, e.g. python -m experiments seeds --study-dir DIR --seeds 0-2 -- "
            "--epochs 3",
            soft_wrap=True,
        )
        return 2
    args.command_line = argv
    kind = next(k for k in KINDS if k.KIND == args.kind)
    console = Console(highlight=False)
    try:
        return kind.run(args, train_argv, console)
    except StudyError as error:
        err.print("[bold red]error:[/]", end=" ")
        err.print(str(error), soft_wrap=True, markup=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]stopped; run the same command again to continue the study[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
