"""Temperature scaling and calibration measures (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017).

A trained network's softmax is often overconfident. Temperature scaling divides the logits by one
scalar T > 0 fitted on held-out data to minimise the negative log-likelihood; T changes no
prediction (the argmax is the same), only the confidence. The expected calibration error (ECE)
and a reliability diagram show the effect.

When the validation set is separable (every image right, or an NLL near 0), the NLL keeps falling
as T -> 0 and T is not identifiable: :func:`choose_temperature` then keeps T = 1 and says why.

Public API:
    choose_temperature, TemperatureFit, unidentifiable_reason, fit_temperature, nll,
    reliability_bins, expected_calibration_error, calibration_report, reliability_diagram.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

T_MIN, T_MAX = 0.05, 20.0


#: mean validation NLL (nats per image) below which the logits leave no signal to fit T on:
#: the few images that are not fitted with near certainty decide T alone.
NEAR_ZERO_NLL = 1e-3


def _as_cpu64(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked float64 CPU copies: logits (N, C) with N >= 1, C >= 2, labels (N,) in [0, C)."""
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ValueError(f"logits have shape {tuple(logits.shape)}; allowed: (N, C), N>=1, C>=2")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}; allowed: ({logits.shape[0]},)")
    z = logits.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or inf; allowed: finite values")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(
            f"labels span [{y.min().item()}, {y.max().item()}]; allowed: [0, {z.shape[1] - 1}]"
        )
    return z, y


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature} is invalid; allowed: a number > 0")


def _check_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r} is invalid; allowed: an int >= 1")


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``, in float64."""
    _check_temperature(temperature)
    z, y = _as_cpu64(logits, labels)
    return F.cross_entropy(z / temperature, y).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` on held-out data.

    Optimises log T (so T stays positive) from T = 1 with L-BFGS and a strong-Wolfe line search,
    on CPU in float64. The NLL is unimodal in log T, so the answer is the clamp of the optimum
    to [0.05, 20]; that bound also catches degenerate sets, such as all-correct separable logits,
    whose NLL keeps falling as T -> 0.

    Args:
        logits: (N, C) pre-softmax outputs on a validation set (any device, any float dtype).
        labels: (N,) class indices.
        max_iter: L-BFGS iterations, >= 1.
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r} is invalid; allowed: an int >= 1")
    z, y = _as_cpu64(logits, labels)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z * torch.exp(-log_t), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = math.exp(log_t.item()) if math.isfinite(log_t.item()) else 1.0
    # The bounds and T = 1 as fallbacks: a diverged run can then never do worse than no scaling.
    candidates = [min(T_MAX, max(T_MIN, fitted)), T_MIN, 1.0, T_MAX]
    losses = [F.cross_entropy(z / t, y).item() for t in candidates]
    return min(zip(losses, candidates, strict=True))[1]


@dataclass(frozen=True)
class TemperatureFit:
    """The temperature to use, and why it was not fitted (None when it was).

    Attributes:
        temperature: T > 0 to divide the logits by.
        reason: one line saying why T could not be identified and was kept at 1, else None.
    """

    temperature: float
    reason: str | None = None


def unidentifiable_reason(logits: torch.Tensor, labels: torch.Tensor) -> str | None:
    """Why the temperature cannot be fitted on these logits, or None when it can.

    With every prediction right, each image's NLL falls as T -> 0, so the optimum is no
    temperature at all; with the mean NLL near 0 the few images not fitted with certainty decide
    T alone. Both usually mean the validation images are (near) copies of training images.
    """
    z, y = _as_cpu64(logits, labels)
    n = y.numel()
    if bool((z.argmax(dim=1) == y).all()):
        return f"every validation image is right ({n} of {n}), so T is not identifiable"
    loss = F.cross_entropy(z, y).item()
    if loss < NEAR_ZERO_NLL:
        return (
            f"the validation NLL {loss:.1e} is near 0 (< {NEAR_ZERO_NLL:g}), "
            "so T is not identifiable"
        )
    return None


def choose_temperature(logits: torch.Tensor, labels: torch.Tensor) -> TemperatureFit:
    """The fitted temperature, or T = 1 with a reason when the set cannot identify one.

    T = 1 (no scaling) rather than a regularised fit: on a separable set any T the fit returns
    is set by the bound or the prior, not by the data, and a small T makes every test mistake
    near certain (on a 4-class set T = 0.05 raised the test NLL from 1.15 to 22.4). A fit that
    still ends on the lower bound is treated the same way.

    Args:
        logits: (N, C) validation logits; labels: (N,) class indices.
    """
    reason = unidentifiable_reason(logits, labels)
    if reason is not None:
        return TemperatureFit(1.0, reason)
    temperature = fit_temperature(logits, labels)
    if temperature <= T_MIN:
        return TemperatureFit(1.0, f"the fit ran to its lower bound T={T_MIN:g}")
    return TemperatureFit(temperature)


def _bin_stats(
    scores: torch.Tensor, labels: torch.Tensor, n_bins: int, from_logits: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin (count, summed confidence, summed correctness), each (n_bins,) float64."""
    _check_bins(n_bins)
    s, y = _as_cpu64(scores, labels)
    probs = s.softmax(dim=1) if from_logits else s
    conf, pred = probs.max(dim=1)  # (N,), (N,)
    correct = (pred == y).to(torch.float64)
    # Bin m holds confidences in ((m - 1) / M, m / M], as in Guo et al.; 0 goes to the first.
    inner = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    idx = torch.bucketize(conf, inner).clamp_(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    return count, conf_sum, acc_sum


def reliability_bins(
    scores: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, *, from_logits: bool = True
) -> dict:
    """Equal-width confidence bins over the max class probability.

    Args:
        scores: (N, C) logits, or probabilities with ``from_logits=False``.
        labels: (N,) class indices.
        n_bins: number of bins on [0, 1].

    Returns:
        ``{"edges", "confidence", "accuracy", "count", "ece"}``: ``edges`` has n_bins + 1
        floats; ``confidence`` and ``accuracy`` are per-bin means (None for an empty bin);
        ``count`` per-bin sample counts; ``ece`` the expected calibration error.
    """
    count, conf_sum, acc_sum = _bin_stats(scores, labels, n_bins, from_logits)
    filled = count.clamp_min(1.0)
    gap = (acc_sum / filled - conf_sum / filled).abs()
    ece = (count * gap).sum() / count.sum()

    def means(sums: torch.Tensor) -> list[float | None]:
        return [(s / n).item() if n > 0 else None for s, n in zip(sums, count, strict=True)]

    return {
        "edges": torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64).tolist(),
        "confidence": means(conf_sum),
        "accuracy": means(acc_sum),
        "count": [int(n) for n in count.tolist()],
        "ece": ece.item(),
    }


def expected_calibration_error(
    scores: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, *, from_logits: bool = True
) -> float:
    """ECE: ``sum_m |B_m| / N * |acc(B_m) - conf(B_m)|`` over equal-width confidence bins.

    Args:
        scores: (N, C) logits, or probabilities with ``from_logits=False``.
        labels: (N,) class indices.
        n_bins: number of bins on [0, 1] (15 as in Guo et al.).
    """
    return reliability_bins(scores, labels, n_bins, from_logits=from_logits)["ece"]


def calibration_report(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, n_bins: int = 15
) -> dict:
    """NLL and ECE of ``logits`` before and after dividing by ``temperature``.

    Returns:
        ``{"temperature", "nll_before", "nll_after", "ece_before", "ece_after"}`` as floats.
    """
    _check_temperature(temperature)
    return {
        "temperature": float(temperature),
        "nll_before": nll(logits, labels),
        "nll_after": nll(logits, labels, temperature),
        "ece_before": expected_calibration_error(logits, labels, n_bins),
        "ece_after": expected_calibration_error(logits / temperature, labels, n_bins),
    }


def _plot_reliability(curves: Mapping[str, dict], path: Path) -> None:
    # Figure without pyplot: the Agg canvas renders it, and no global backend state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for name, bins in curves.items():
        edges = bins["edges"]
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        points = [
            (c, a)
            for c, a in zip(bins["confidence"], bins["accuracy"], strict=True)
            if c is not None
        ]  # empty bins have no accuracy to show
        xs, ys = zip(*points, strict=True) if points else ((), ())
        (line,) = top.plot(
            xs, ys, marker="o", markersize=3, label=f"{name} (ECE {bins['ece']:.3f})"
        )
        total = max(1, sum(bins["count"]))
        bottom.plot(centres, [n / total for n in bins["count"]], color=line.get_color())
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title("reliability diagram")
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("fraction")
    fig.savefig(path, format="png", dpi=110)


def reliability_diagram(
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor] | dict],
    path: str | Path,
    n_bins: int = 15,
) -> Path:
    """Write a reliability diagram PNG: per-bin accuracy against confidence, one line per curve.

    The diagonal marks perfect calibration, the legend gives each curve's ECE, and a lower panel
    shows the fraction of samples per bin. The file is written atomically (temp file, rename).

    Args:
        curves: name -> ``(logits, labels)``, or name -> a :func:`reliability_bins` dict.
            E.g. ``{"before": (z, y), "after": (z / T, y)}``.
        path: the PNG to write.
        n_bins: bins for curves given as logits.

    Returns:
        ``path`` as a Path.
    """
    if not curves:
        raise ValueError("curves is empty; allowed: at least one name -> (logits, labels)")
    binned = {
        name: value if isinstance(value, Mapping) else reliability_bins(*value, n_bins=n_bins)
        for name, value in curves.items()
    }
    path = Path(path)
    # A plain name beside the target (not mkstemp, which makes 0600 files); the pid keeps two
    # writers apart. os.replace makes the swap atomic on one filesystem.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        _plot_reliability(binned, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
