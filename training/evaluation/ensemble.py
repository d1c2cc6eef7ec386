"""Score an ensemble of trained runs on one test split: ``python test.py --ensemble RUN RUN ...``.

Each member contributes its final weight set (:func:`~training.evaluation.report.final_of`: SWA,
else best, else last), scored once on the shared test loader. The ensemble's logits are the mean
over members of each member's logits divided by its own temperature (``scaling="member"``; the
temperature applies under the same rule as ``evaluate_run``'s ``+T`` rows: fitted under the
TTA mode in use and not kept at 1), or of the raw logits (``scaling="none"``). Averaging scaled
logits keeps one over-confident member from dominating the mean.

Members must have been trained for the same task on the same split: the same class names,
normalisation, input size and channels, data source and split options. Otherwise one member's
test images may be another's training images, or one loader cannot feed them all.

Public API:
    EnsembleError, evaluate_ensemble, print_ensemble_report, save_json,
    member_names, SCALINGS, ENSEMBLE_ROW, ENSEMBLE_JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from dataset.cache import same_statistics
from training.engine.atomic import write_atomically
from training.engine.checkpoint import model_record
from training.engine.data import resolve_workers
from training.engine.device import amp_dtype as resolve_amp_dtype
from training.engine.device import resolve_device
from training.engine.inference import predict
from training.evaluation.metrics import ECE_BINS, scored_metrics
from training.evaluation.report import (
    SUMMARY_METRICS,
    TEMPERATURE_REASON_KEY,
    TEMPERATURE_TTA_KEY,
    build_model,
    checkpoint_temperature,
    checkpoint_temperature_reason,
    final_of,
    find_weights,
    load_weight_set,
    prepare_kwargs,
    run_tta,
    temperature_notes,
    test_loader,
)
from training.evaluation.tta import resolve_tta

#: how each member's logits enter the mean: divided by its own fitted temperature, or raw.
SCALINGS: tuple[str, ...] = ("member", "none")

#: the report row of the averaged logits.
ENSEMBLE_ROW = "ensemble"

#: file a study folder's ensemble report is written to by default.
ENSEMBLE_JSON = "ensemble_report.json"


class EnsembleError(ValueError):
    """Members that cannot be ensembled (or too few of them); the message is one line."""


def member_names(run_dirs: Sequence[Path]) -> list[str]:
    """A short unique name per run folder: its folder name, lengthened by parent folders where
    two would clash (``A/seed-0`` and ``B/seed-0``), or clash with the ensemble row."""
    parts = [Path(p).resolve().parts for p in run_dirs]
    depth = {i: 1 for i in range(len(parts))}
    while True:
        names = {i: "/".join(parts[i][-depth[i] :]) for i in depth}
        clashing = [
            i
            for i, name in names.items()
            if (name == ENSEMBLE_ROW or list(names.values()).count(name) > 1)
            and depth[i] < len(parts[i])
        ]
        if not clashing:
            return [names[i] for i in range(len(parts))]
        for i in clashing:
            depth[i] += 1


def _load_member(run_dir: Path) -> dict[str, Any]:
    """The member's final weight set: its name, file, checkpoint (metadata borrowed from the
    run's other checkpoint where the file lacks it, :func:`load_weight_set`) and its own
    temperature keys."""
    files = find_weights(run_dir)
    weights = final_of(files)
    ckpt = load_weight_set(run_dir, weights)
    return {
        "run_dir": Path(run_dir),
        "weights": weights,
        "file": files[weights],
        "ckpt": ckpt,
        "temperature": checkpoint_temperature(ckpt, files[weights]),
        "temperature_tta": str(ckpt.get(TEMPERATURE_TTA_KEY, "none")),
        TEMPERATURE_REASON_KEY: checkpoint_temperature_reason(ckpt),
    }


def _same_source(a: Any, b: Any) -> bool:
    if str(a) == str(b):
        return True
    # The same file spelled two ways (relative and absolute) is the same data.
    pa, pb = Path(str(a)), Path(str(b))
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _fingerprint(ckpt: dict) -> list[tuple[str, Any, Any]]:
    """(what, value, how to compare) of everything members must share, in the order checked."""
    record = model_record(ckpt)
    data = ckpt.get("data") or {}
    return [
        ("class names", list(ckpt["class_names"]), None),
        ("normalisation mean", list(ckpt["mean"]), same_statistics),
        ("normalisation std", list(ckpt["std"]), same_statistics),
        ("input size", record.get("input_size"), None),
        ("input channels", record.get("in_channels"), None),
        ("data source", data.get("source"), _same_source),
        ("split options", prepare_kwargs(ckpt), None),
    ]


def _check_agreement(names: list[str], members: list[dict]) -> None:
    """Refuse members that differ from the first in anything :func:`_fingerprint` lists."""
    first = _fingerprint(members[0]["ckpt"])
    for name, member in zip(names[1:], members[1:], strict=True):
        for (what, expected, same), (_, value, _) in zip(
            first, _fingerprint(member["ckpt"]), strict=True
        ):
            agree = same(value, expected) if same is not None else value == expected
            if not agree:
                raise EnsembleError(
                    f"member {name} ({member['run_dir']}) has {what} {value!r}, member "
                    f"{names[0]} has {expected!r}; an ensemble needs members trained on the "
                    "same classes and split with the same preprocessing"
                )


def evaluate_ensemble(
    run_dirs: Sequence[Path | str],
    *,
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 256,
    workers: int = -1,
    amp: str = "off",
    tta: str | None = None,
    scaling: str = "member",
) -> dict[str, Any]:
    """Score each member's final weight set and the mean of their logits on one test split.

    Args:
        run_dirs: two or more run folders (with ``checkpoints/``).
        data: another source to test on (see ``report.test_loader``); ``None`` uses the first
            member's test split, which every member shares (checked).
        device, batch_size, workers, amp: as for ``report.evaluate_run``.
        tta: test-time augmentation mode; ``None`` uses the first member's ``run.tta``.
        scaling: "member" divides each member's logits by its own temperature where it applies
            (fitted under this TTA mode, not kept at 1), else by 1; "none" averages raw logits.

    Returns:
        A report shaped like ``evaluate_run``'s: ``weights`` has a row per member (named as
        :func:`member_names`; its metrics on its scaled logits, ``temperature`` the T used) and
        the ``ensemble`` row (:func:`scored_metrics` of the mean logits); ``checkpoints`` holds
        each member's file, epoch and saved temperature; plus ``members`` (name -> run_dir,
        weights, file, temperature used), ``scaling``, ``tta``, ``n_test``, ``class_names``,
        ``dataset`` and ``ece_bins``.

    Raises:
        EnsembleError: fewer than two members, one given twice, or members that differ.
        CheckpointError, FileNotFoundError, DataError: as ``evaluate_run``.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r} is invalid; allowed: {' | '.join(SCALINGS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an int >= 1")
    run_dirs = [Path(p) for p in run_dirs]
    if len(run_dirs) < 2:
        shown = ", ".join(map(str, run_dirs)) or "none"
        raise EnsembleError(f"an ensemble needs at least 2 members; got {len(run_dirs)}: {shown}")
    seen: dict[Path, Path] = {}
    for path in run_dirs:
        if path.resolve() in seen:
            raise EnsembleError(f"member {path} is given twice (also as {seen[path.resolve()]})")
        seen[path.resolve()] = path
    names = member_names(run_dirs)
    # Every checkpoint is read and checked before the first forward pass, so a mismatch or a
    # bad temperature fails at once.
    members = [_load_member(path) for path in run_dirs]
    _check_agreement(names, members)

    dev = resolve_device(device)
    dtype = resolve_amp_dtype(dev, amp)
    reference = members[0]["ckpt"]
    loader, cache = test_loader(reference, data, batch_size, resolve_workers(workers, dev))
    mode = resolve_tta(run_tta(reference) if tta is None else tta, cache.channels)
    class_names = list(reference["class_names"])
    report: dict[str, Any] = {
        "dataset": cache.name,
        "class_names": class_names,
        "n_test": len(loader.dataset),
        "ece_bins": ECE_BINS,
        "tta": mode,
        "scaling": scaling,
        "members": {},
        "checkpoints": {},
        "weights": {},
    }
    scaled_logits = []
    labels = None
    for name, member in zip(names, members, strict=True):
        logits, labels = predict(build_model(member["ckpt"]), loader, dev, dtype, tta=mode)
        applies = member["temperature_tta"] == mode and member[TEMPERATURE_REASON_KEY] is None
        fitted = member["temperature"] if applies else None
        used = fitted if scaling == "member" and fitted is not None else 1.0
        try:
            report["weights"][name] = scored_metrics(logits, labels, class_names, used)
        except ValueError as error:  # NaN or inf logits: say which member gave them
            raise ValueError(f"member {name} ({member['file']}): {error}") from error
        # float64, as scored_metrics divides, so a member's row and its share of the mean agree.
        scaled_logits.append(logits.double() / used)
        report["members"][name] = {
            "run_dir": str(member["run_dir"]),
            "weights": member["weights"],
            "file": str(member["file"]),
            "temperature": used,
        }
        report["checkpoints"][name] = {
            "file": str(member["file"]),
            "epoch": member["ckpt"].get("epoch"),
            "temperature": member["temperature"],
            "temperature_tta": member["temperature_tta"],
            TEMPERATURE_REASON_KEY: member[TEMPERATURE_REASON_KEY],
        }
    mean_logits = torch.stack(scaled_logits).mean(dim=0)
    report["weights"][ENSEMBLE_ROW] = scored_metrics(mean_logits, labels, class_names)
    return report


def print_ensemble_report(report: dict, console: Console) -> None:
    """Print the members (weights, T used), a summary with a column per member and one for the
    ensemble, the temperature notes, and the ensemble's per-class scores and confusion matrix."""
    scaling = report.get("scaling", "member")
    how = "logits / each member's T" if scaling == "member" else "raw logits"
    tta = report.get("tta", "none")
    console.print(
        f"[bold]ensemble[/] of {len(report['members'])} members, mean of {how}; "
        f"test set: {report['dataset']}, {report['n_test']} images, tta={tta}",
        highlight=False,
        soft_wrap=True,
    )
    members = Table(title="members", box=box.SIMPLE_HEAD)
    for column in ("member", "weights", "epoch", "T used", "run folder"):
        members.add_column(column, justify="right" if column in ("epoch", "T used") else "left")
    for name, info in report["members"].items():
        epoch = report.get("checkpoints", {}).get(name, {}).get("epoch")
        members.add_row(
            name,
            info["weights"],
            "-" if epoch is None else str(epoch),
            f"{info['temperature']:.3f}",
            info["run_dir"],
        )
    console.print(members)

    summary = Table(title="summary", box=box.SIMPLE_HEAD)
    summary.add_column("metric")
    for name in report["weights"]:
        summary.add_column(name, justify="right", style="bold" if name == ENSEMBLE_ROW else None)
    rows = report["weights"].values()
    for label, key in SUMMARY_METRICS:
        summary.add_row(label, *(f"{m[key]:.4f}" if key in m else "-" for m in rows))
    console.print(summary)
    if scaling == "member":
        for note in temperature_notes(report):
            console.print(note, highlight=False, soft_wrap=True)

    ensemble = report["weights"][ENSEMBLE_ROW]
    per_class = Table(title="ensemble per class", box=box.SIMPLE_HEAD)
    for column in ("class", "support", "precision", "recall", "F1"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for c in ensemble["per_class"]:
        scores = (f"{c[k]:.3f}" for k in ("precision", "recall", "f1"))
        per_class.add_row(c["class"], str(c["support"]), *scores)
    console.print(per_class)
    console.print("confusion: rows are the true class, column j the predicted class j")
    confusion = Table(title="confusion: ensemble", box=box.SIMPLE_HEAD)
    confusion.add_column("true \\ pred")
    matrix = ensemble["confusion_matrix"]
    for j in range(len(matrix)):
        confusion.add_column(str(j), justify="right")
    for i, (cls, row) in enumerate(zip(report["class_names"], matrix, strict=True)):
        cells = [f"[bold]{v}[/]" if i == j else str(v) for j, v in enumerate(row)]
        confusion.add_row(f"{i} {cls}", *cells)
    console.print(confusion)


def save_json(report: dict, path: Path | str) -> Path:
    """Write ``report`` as indented JSON to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))
    return path
