"""The HTML page: sections of text, tables and figures, written as one self-contained file.

Every figure is a PNG beside ``index.html``, linked by a relative path, so the folder can be
copied or zipped and opened anywhere without a network. Text is escaped once, here.

Public API:
    Page, Section, Figure.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.engine.atomic import write_atomically

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 24px;
       color: #1d1d1f; line-height: 1.45; }
header { border-bottom: 1px solid #ddd; margin-bottom: 12px; }
nav a { margin-right: 14px; }
.headline { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0 20px; }
.headline div { background: #f3f5f8; border-radius: 8px; padding: 8px 14px; min-width: 110px; }
.headline b { display: block; font-size: 1.35em; }
.headline span { color: #555; font-size: 0.85em; }
section { margin-bottom: 36px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f5f8; }
figure { display: inline-block; margin: 6px 12px 16px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #e3e3e3; }
figcaption { font-size: 0.85em; color: #444; max-width: 560px; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 12px; }
"""


@dataclass
class Figure:
    """An image file beside the page.

    Args:
        path: the PNG, inside the page's folder.
        caption: one line shown under it.
        width: display width in CSS pixels; ``None`` shows it at its own size (capped by the
            page width).
    """

    path: Path
    caption: str = ""
    width: int | None = None


@dataclass
class Section:
    """One section of the page: a title and blocks in the order they were added."""

    key: str
    title: str
    blocks: list[str] = field(default_factory=list)

    def text(self, text: str) -> None:
        """A paragraph of plain text."""
        self.blocks.append(f"<p>{html.escape(text)}</p>")

    def note(self, text: str) -> None:
        """A highlighted paragraph: something the reader should know about this section."""
        self.blocks.append(f'<p class="note">{html.escape(text)}</p>')

    def heading(self, text: str) -> None:
        """A sub-heading inside the section."""
        self.blocks.append(f"<h3>{html.escape(text)}</h3>")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table; cells are shown with ``str`` (format numbers before passing them)."""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in rows
        )
        self.blocks.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figures(self, figures: Sequence[Figure], root: Path) -> None:
        """Figures side by side; their paths are written relative to the page folder ``root``."""
        items = []
        for fig in figures:
            src = html.escape(fig.path.relative_to(root).as_posix(), quote=True)
            alt = html.escape(fig.caption or fig.path.stem, quote=True)
            width = f' width="{fig.width}"' if fig.width else ""
            caption = f"<figcaption>{html.escape(fig.caption)}</figcaption>" if fig.caption else ""
            items.append(f'<figure><img src="{src}" alt="{alt}"{width}>{caption}</figure>')
        self.blocks.append("<div>" + "".join(items) + "</div>")


class Page:
    """A report page under construction.

    Args:
        folder: where ``index.html`` and the figures go; created if missing.
        title: the page's title (the run's name).
    """

    def __init__(self, folder: str | Path, title: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.subtitle = ""
        self.headline: list[tuple[str, str]] = []
        self.sections: list[Section] = []

    def section(self, key: str, title: str) -> Section:
        """Add a section (``key`` is its anchor) and return it for filling."""
        section = Section(key, title)
        self.sections.append(section)
        return section

    def figure_path(self, name: str) -> Path:
        """Where a figure called ``name`` (``.png`` added) goes."""
        return self.folder / f"{name}.png"

    def save(self, fig: Any, name: str, caption: str = "", width: int | None = None) -> Figure:
        """Save a ``matplotlib.figure.Figure`` as ``name.png`` beside the page (atomically) and
        return it as a :class:`Figure` to place in a section. The report builds its figures
        without pyplot, so no global backend state is touched and none is left open."""
        path = self.figure_path(name)
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        return Figure(path, caption, width)

    def render(self) -> str:
        """The whole page as HTML."""
        nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in self.sections)
        headline = "".join(
            f"<div><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>"
            for label, value in self.headline
        )
        sections = "".join(
            f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>{"".join(s.blocks)}</section>'
            for s in self.sections
        )
        subtitle = f"<p>{html.escape(self.subtitle)}</p>" if self.subtitle else ""
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>{html.escape(self.title)}</h1>{subtitle}<nav>{nav}</nav></header>"
            f'<div class="headline">{headline}</div>{sections}</body></html>\n'
        )

    def write(self) -> Path:
        """Write ``index.html`` (to a temporary name, then renamed) and return its path."""
        path = self.folder / "index.html"
        text = self.render()
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path
