"""Every command in the README's shell blocks is one the project accepts.

Each ``python models/train.py`` line is parsed and its configuration resolved (a renamed flag,
field or preset fails here); each ``python test.py``, ``predict.py``, ``demo.py``,
``python -m dataset`` and ``python -m report`` line is parsed; each ``torchrun`` line is parsed by
torchrun's own parser and its script's options by the training parser; and each ``make`` target
exists.
What the commands do is covered by the end-to-end tests (tests/test_entry_points.py and the
others); this file keeps the guide from drifting.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from pathlib import Path

import pytest

from dataset.cli import build_parser as dataset_parser
from training.config.cli import build_parser, config_from_args
from training.config.schema import TrainConfig, save_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _load_test_entry():
    # Loaded by path: "import test" could find the standard library's test package instead.
    spec = importlib.util.spec_from_file_location("test_entry", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shell_commands(markdown: str) -> list[str]:
    """The command lines of the ```bash blocks, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        block = re.sub(r"\\\n\s*", "", block)  # a line continued with a backslash
        for line in block.splitlines():
            command = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


COMMANDS = shell_commands(README)


def _args(command: str, prefix: str) -> list[str]:
    return shlex.split(command)[len(shlex.split(prefix)) :]


def test_the_readme_has_the_quick_start_first():
    assert COMMANDS[:2] == ["make train", "make test"]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_make_targets_exist(command):
    targets = re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
    assert shlex.split(command)[1] in targets


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python models/train.py")])
def test_train_commands_resolve(command, tmp_path):
    stored = tmp_path / "config.yaml"
    save_config(TrainConfig(), stored)
    argv = [
        str(stored) if a == "runs/NAME/config.yaml" else a
        for a in _args(command, "python models/train.py")
    ]
    args = build_parser().parse_args(argv)
    if not args.resume:
        cfg = config_from_args(args)
        assert cfg.run.epochs >= 1


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python test.py")])
def test_test_commands_parse(command):
    _load_test_entry().get_args_parser().parse_args(_args(command, "python test.py"))


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m dataset")])
def test_dataset_commands_parse(command):
    dataset_parser().parse_args(_args(command, "python -m dataset"))


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m report")])
def test_report_commands_parse(command):
    from report.__main__ import run_parser
    from report.compare import compare_parser

    args = _args(command, "python -m report")
    if args[:1] == ["compare"]:
        assert len(compare_parser().parse_args(args[1:]).runs) >= 2
    else:
        run_parser().parse_args(args)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python predict.py")])
def test_predict_commands_parse(command):
    import predict

    args = predict.get_args_parser().parse_args(_args(command, "python predict.py"))
    assert args.inputs or args.export  # what main() requires before it loads anything


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python demo.py")])
def test_demo_commands_parse(command):
    import demo

    demo.get_args_parser().parse_args(_args(command, "python demo.py"))


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m experiments")])
def test_study_commands_parse(command):
    from experiments.__main__ import build_parser as study_parser
    from experiments.__main__ import split_argv

    own, train_argv = split_argv(_args(command, "python -m experiments"))
    args, unknown = study_parser().parse_known_args(own)
    assert unknown == [] and args.study_dir
    build_parser().parse_args(train_argv)  # the members' training options


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("torchrun ")])
def test_torchrun_commands_parse(command):
    from torch.distributed.run import get_args_parser as torchrun_parser

    args = torchrun_parser().parse_args(_args(command, "torchrun"))
    assert args.training_script == "models/train.py"
    build_parser().parse_args(args.training_script_args)


def test_every_command_is_checked_by_one_of_the_tests_above():
    known = (
        "make ",
        "torchrun ",
        "python models/train.py",
        "python test.py",
        "python -m dataset",
        "python -m report",
        "python predict.py",
        "python demo.py",
        "python -m experiments",
    )
    assert [c for c in COMMANDS if not c.startswith(known)] == []


def test_the_plan_shown_is_what_that_command_prints():
    from rich.console import Console

    from training.build import print_plan

    command = "python models/train.py --preset cpu --epochs 8"
    assert f"`{command}` prints:" in README
    shown = README.split(f"`{command}` prints:", 1)[1].split("```", 2)[1].strip("\n")
    console = Console(record=True, width=200, file=open(os.devnull, "w"))  # noqa: SIM115
    print_plan(
        config_from_args(build_parser().parse_args(_args(command, "python models/train.py"))),
        console,
    )
    assert shown == console.export_text().rstrip("\n")
