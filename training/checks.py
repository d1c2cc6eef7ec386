"""Type checks shared by the constructors that validate their arguments."""

from __future__ import annotations

import math


def is_int(value: object) -> bool:
    """An int that is not a bool (True is never a sensible count, epoch or index)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
