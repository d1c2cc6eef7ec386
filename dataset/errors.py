"""The one error type the data layer raises for bad input."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: the message is one line that names the file and the problem.

    Args:
        source: the file, folder or URL the problem is in (``None`` when there is none).
        problem: what is wrong, with the offending key, shape, value or allowed range.
    """

    def __init__(self, source: str | Path | None, problem: str) -> None:
        self.source = None if source is None else str(source)
        self.problem = problem
        text = problem if source is None else f"{source}: {problem}"
        # One line, whatever the caller passed in.
        super().__init__(" ".join(text.split()))
