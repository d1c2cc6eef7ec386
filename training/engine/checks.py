"""Argument checks shared by the constructors that validate their arguments, and their messages."""

from __future__ import annotations

import math


def is_int(value: object) -> bool:
    """An int that is not a bool (True is never a sensible count, epoch or index)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def invalid(where: str, value: object, allowed: str) -> ValueError:
    """The error of an argument check: names the argument, the bad value and what is allowed."""
    return ValueError(f"{where}={value!r} is invalid; allowed: {allowed}")


def check_int_at_least(where: str, value: object, minimum: int) -> None:
    if not is_int(value) or value < minimum:
        raise invalid(where, value, f"an int >= {minimum}")


def check_mode(where: str, mode: object) -> None:
    """``mode`` must be ``"max"`` (higher is better) or ``"min"``."""
    if mode not in ("max", "min"):
        raise invalid(where, mode, "'max' | 'min'")
