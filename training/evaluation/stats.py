"""Statistics over repeated runs: the mean and spread of a figure, and the paired difference of
two arms measured on the same seeds (shared by the benchmarks and the report's run comparison).

Public API:
    mean_sd, paired_difference.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from scipy import stats


def mean_sd(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "sd"}`` of ``values`` (sample sd; 0 for a single value).

    Raises:
        ValueError: when ``values`` is empty.
    """
    if not values:
        raise ValueError("mean_sd: no values; allowed: one or more numbers")
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """How far arm ``a`` lies from arm ``b``, pair by pair (``a[i]`` and ``b[i]`` share seed i).

    Two arms run on the same seed share its split of hard and easy images, which moves both
    alike, so the per-seed difference is a sharper measure than two separate means.

    Returns:
        ``n``, the ``mean`` and ``sd`` of ``a - b``, the paired ``t`` statistic (``None`` when
        every difference is the same) and the two-sided 95% interval of the mean difference
        (``low``, ``high``; Student's t with n - 1 degrees of freedom); ``None`` for fewer than
        two pairs, which give no spread to judge by.

    Raises:
        ValueError: when the two arms have different lengths.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} vs {len(b)} values; allowed: equal counts")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    t = mean / (sd / math.sqrt(n)) if sd > 0 else None
    return {"n": n, "mean": mean, "sd": sd, "t": t, "low": mean - half, "high": mean + half}
