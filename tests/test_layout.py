"""The package layout is the architecture: lower layers never import higher ones.

Layers, bottom up: ``models`` (networks, knowing nothing of training); the primitives of
``training.engine`` and ``training.evaluation`` (pure functions and small classes);
``training.config``; the loop (``engine.trainer``, ``engine.data``, ``engine.run_dir``);
``training.callbacks`` (the features, handed the trainer, never importing it);
``training.evaluation.report``; ``training.build``, the one module that assembles every
layer; ``report``, the report pages, which read run folders; ``inference``, which uses a
trained model (predict, export, demo); and ``experiments``, studies of many runs, which nothing
below imports. ``dataset`` stands beside ``models`` at the bottom. The rules are read from the
import statements themselves, so a new upward import fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LOOP = ("training.engine.trainer", "training.engine.data", "training.engine.run_dir")
TOP = ("training.build", "training.evaluation.report")

# module prefix -> prefixes it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "models": ("training", "dataset", "report", "inference", "experiments"),
    "dataset": ("training", "models", "report", "inference", "experiments"),
    "training": ("report", "inference", "experiments"),
    "report": ("inference", "experiments"),
    "inference": ("experiments",),
    "report.page": ("report.build", "report.compare", "report.run"),
    "report.run": ("report.build", "report.compare"),
    "training.engine": ("training.callbacks", *TOP),
    "training.engine.checkpoint": ("training.config", *LOOP),
    "training.evaluation.metrics": ("training.config", "training.engine", "training.callbacks"),
    "training.evaluation.calibration": ("training.config", "training.engine", "training.callbacks"),
    "training.evaluation.tta": ("training.config", "training.engine", "training.callbacks"),
    "training.config": ("training.callbacks", *LOOP, *TOP, "training.engine.checkpoint"),
    "training.callbacks": (*TOP, "training.engine.trainer"),
    "training.evaluation.report": ("training.callbacks", "training.build", "training.config"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


SOURCES = sorted(
    p
    for d in ("models", "training", "dataset", "report", "inference", "experiments")
    for p in (ROOT / d).rglob("*.py")
)


def upward_imports(name: str, path: Path) -> list[str]:
    """The imports of module ``name`` (read from ``path``) that its layer's rules forbid."""
    rules = [bad for prefix, bad in FORBIDDEN.items() if under(name, prefix)]
    return sorted(
        f"{name} imports {target}"
        for target in imported_modules(path)
        for bad in rules
        for prefix in bad
        if under(target, prefix)
    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_it(path: Path) -> None:
    name = module_name(path)
    if name == "models.train":  # the entry script sits on top of everything
        return
    assert upward_imports(name, path) == []


def test_the_rules_catch_an_upward_import(tmp_path: Path) -> None:
    """The check reads real import statements: a planted upward import is found."""
    planted = tmp_path / "probe.py"
    planted.write_text("from training.callbacks.console import ConsoleCallback\n")
    found = upward_imports("training.engine.stepper", planted)
    assert found == ["training.engine.stepper imports training.callbacks.console"]
    assert upward_imports("training.build", planted) == []  # the top may import anything


TRAINING = sorted((ROOT / "training").rglob("*.py"))


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: str(p.relative_to(ROOT)))
def test_training_talks_to_models_only_through_the_contract(path: Path) -> None:
    """No module under training/ names the concrete network or its block count."""
    tree = ast.parse(path.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not names & {"BasicCNNModel", "NUM_BLOCKS", "ModelConfig"}


def test_every_training_module_lives_in_a_role_package() -> None:
    """No flat modules return: training/ holds build.py and the four role packages."""
    flat = sorted(p.name for p in (ROOT / "training").glob("*.py"))
    assert flat == ["__init__.py", "build.py"]
    packages = sorted(p.name for p in (ROOT / "training").iterdir() if (p / "__init__.py").exists())
    assert packages == ["callbacks", "config", "engine", "evaluation"]
