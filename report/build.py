"""Assemble a run's report page from its sections.

Public API:
    build_report, headline, run_title.
"""

from __future__ import annotations

import re
from pathlib import Path

from report import DEFAULT_ERRORS, DEFAULT_PER_CLASS
from report.curves import add_training_section
from report.data_section import add_data_section
from report.page import Page
from report.run import RunFolder, load_run
from report.saliency import add_errors_and_saliency
from report.test_section import add_test_section


def run_title(run: RunFolder) -> str:
    """The run's folder name, with its parent's when the name alone says little (``seed-0``
    of a seeds study, ``run``)."""
    if re.fullmatch(r"seed-\d+|run", run.name):
        return f"{run.path.resolve().parent.name}/{run.name}"
    return run.name


def headline(run: RunFolder) -> list[tuple[str, str]]:
    """(label, value) pairs shown at the top of the page: the final weights' test figures
    when the run was tested, and what the run was."""
    items: list[tuple[str, str]] = []
    scores = run.test_scores()
    if "accuracy" in scores:
        items.append((f"test accuracy ({run.final_weights})", f"{scores['accuracy']:.2%}"))
    if "macro_f1" in scores:
        items.append(("test macro-F1", f"{scores['macro_f1']:.2%}"))
    if "ece_scaled" in scores:
        items.append(("test ECE after T", f"{scores['ece_scaled']:.2%}"))
    elif "ece" in scores:
        items.append(("test ECE", f"{scores['ece']:.2%}"))
    if run.epochs:
        items.append(("epochs", str(run.epochs)))
        items.append(("training time", f"{run.training_seconds / 60:.1f} min"))
    items.append(("model", str(run.setting("model.arch", "basic_cnn"))))
    return items


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    errors: int = DEFAULT_ERRORS,
    per_class: int = DEFAULT_PER_CLASS,
    device: str = "cpu",
) -> Path:
    """Write the run's report page and return the path of its ``index.html``.

    Args:
        run_dir: the run folder.
        out: the page's folder; default ``RUN_DIR/report``.
        errors: test images in the highest-loss gallery.
        per_class: correctly classified test images per class in the saliency section.
        device: where the model runs for the errors and saliency sections.

    Raises:
        report.run.ReportError: the run folder cannot be read.
    """
    run = load_run(run_dir)
    page = Page(Path(out) if out else run.path / "report", f"Run report: {run_title(run)}")
    page.subtitle = f"{run.path} · data {run.setting('data.source', '?')}"
    page.headline = headline(run)
    add_data_section(page, run)
    add_training_section(page, run)
    if run.test_report is None:
        section = page.section("test", "Test")
        section.note(
            f"This run has no test_report.json yet: python test.py --run-dir {run.path} --report"
            " scores it and adds the test, errors and saliency sections."
        )
    else:
        add_test_section(page, run)
        add_errors_and_saliency(page, run, errors=errors, per_class=per_class, device=device)
    return page.write()
