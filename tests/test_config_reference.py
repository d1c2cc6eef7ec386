"""The generated configuration reference: every field documented, and the committed page current."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from training.config.reference import field_meanings, reference_markdown
from training.config.schema import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_has_a_meaning_from_its_docstring():
    missing = [
        f"{name}.{f.name}"
        for name, cls in SECTIONS.items()
        for f in fields(cls)
        if not field_meanings(cls).get(f.name)
    ]
    assert missing == []


def test_shared_and_continued_docstring_entries_are_read_whole():
    meanings = field_meanings(SECTIONS["regularize"])
    assert meanings["dropout_min"] == meanings["dropout_max"] == "bounds of every rate."
    # "source" continues on a second, deeper-indented line in DataConfig's docstring.
    assert field_meanings(SECTIONS["data"])["source"].endswith("image folder.")


def test_committed_reference_matches_the_code():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), (
        "docs/configuration.md is stale: run "
        "`python -m training.config.reference > docs/configuration.md`"
    )
