"""The ``cv`` study: k-fold cross-validation over the cache's pooled train and val splits.

``python -m experiments cv --study-dir DIR --folds 5 [-- TRAIN OPTIONS]`` trains members
``fold-0`` ... ``fold-4``, each with the training options after ``--`` plus
``--set data.cv_folds=5 --set data.cv_fold=i``: fold i of the pooled train+val images
(stratified, copies and near copies in one fold, seeded by ``data.split_seed``:
:mod:`dataset.folds`) is its validation split, the other folds its training split. Each member
is tested as usual on the cache's test split, which every fold shares.

After a member finishes, its final weight set (swa > best > last) scores its own validation
fold; the logits are saved in the member's folder (:data:`FOLD_LOGITS`) with each image's pooled
index, so the folds' predictions together are out-of-fold (OOF) predictions for every pooled
image exactly once. The study writes ``oof.csv`` (pooled index, the split it came from, fold,
label, prediction, probabilities after the member's temperature) and ``summary.json``: per fold
its validation and test figures, their mean and sd, the OOF accuracy and macro-F1 over the
pooled images, and, with every fold finished, the k fold models as an ensemble on the test split
(:func:`training.evaluation.ensemble.evaluate_ensemble`) beside the mean single model.

Public API:
    add_parser, plan, run, fold_logits, summarize, summary_table, FOLD_LOGITS, OOF_CSV, KIND.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from dataset.cache import load_cache
from dataset.errors import DataError
from dataset.folds import POOLED_SPLITS
from dataset.transforms import eval_transform
from experiments.seeds import FIGURES, member_figures
from experiments.study import (
    FORMAT,
    SUMMARY_JSON,
    Member,
    Study,
    StudyError,
    check_train_options,
    member_dir,
    member_state,
    open_study,
    run_members,
    write_summary,
)
from training.config.schema import ConfigError, config_from_dict
from training.engine.atomic import write_atomically
from training.engine.checkpoint import CheckpointError, load_checkpoint
from training.engine.data import prepare_cache, resolve_workers, select_subset, split_dataset
from training.engine.device import resolve_device
from training.engine.inference import predict
from training.evaluation.ensemble import ENSEMBLE_ROW, evaluate_ensemble
from training.evaluation.metrics import classification_metrics
from training.evaluation.report import (
    TEMPERATURE_REASON_KEY,
    TEMPERATURE_TTA_KEY,
    build_model,
    checkpoint_temperature,
    final_of,
    find_weights,
    load_weight_set,
)
from training.evaluation.stats import mean_sd

KIND = "cv"

#: a member's validation-fold logits, in its run folder.
FOLD_LOGITS = "cv_fold_logits.npz"

#: the study's out-of-fold table.
OOF_CSV = "oof.csv"

#: (summary key, table label) of the validation figures of each fold's final weights.
VAL_FIGURES: tuple[tuple[str, str], ...] = (
    ("val_accuracy", "val accuracy"),
    ("val_macro_f1", "val macro-F1"),
)

#: the ensemble's test figures compared with the mean single model.
ENSEMBLE_FIGURES = ("accuracy", "macro_f1", "balanced_accuracy", "nll", "ece")

#: training options the study sets itself, per member; refused after ``--``.
_OWN_SETTINGS = {"data.cv_folds": "--folds", "data.cv_fold": "the member"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        KIND,
        help="k-fold cross-validation over train+val; OOF predictions and the fold ensemble",
        description="Pool the train and val splits, split them into k stratified folds (copies "
        "of an image in one fold) and train one member per fold, validated on it; each is "
        "tested on the test split. The summary gives the per-fold figures' mean and sd, the "
        "out-of-fold accuracy and the k models as an ensemble. Training options go after --.",
        epilog="example: python -m experiments cv --study-dir runs/cv5 --folds 5 "
        "-- --preset cpu --data bloodmnist --epochs 10",
        allow_abbrev=False,
    )
    parser.add_argument("--study-dir", required=True, metavar="DIR", help="the study folder")
    parser.add_argument("--folds", required=True, type=int, metavar="K", help="folds, k >= 2")
    return parser


def _check_train_argv(train_argv: Sequence[str]) -> None:
    """Refuse, in one line, training options that train.py rejects or that the study sets."""
    check_train_options(train_argv, settings=_OWN_SETTINGS)


def plan(folds: int, train_argv: Sequence[str]) -> list[Member]:
    """The members in training order: ``fold-0`` ... ``fold-(k-1)``."""
    return [
        Member(
            f"fold-{i}",
            [*train_argv, "--set", f"data.cv_folds={folds}", "--set", f"data.cv_fold={i}"],
        )
        for i in range(folds)
    ]


def _fold_cache(ckpt: dict):
    """The fold's view of the run's cache, rebuilt from the checkpoint's own configuration."""
    data_cfg = config_from_dict(ckpt["config"]).data
    try:
        cache = load_cache(Path(ckpt["data"]["cache"]))
    except DataError:  # deleted or damaged since training: rebuild it as training did
        return prepare_cache(data_cfg, progress=False)
    return select_subset(cache, data_cfg)


def fold_logits(run_dir: Path, *, batch_size: int = 256, device: str = "auto") -> Path:
    """Score a finished member's final weight set on its validation fold; the saved file.

    The file (:data:`FOLD_LOGITS`) holds ``index`` (pooled train+val index of each image),
    ``labels``, ``logits`` (raw, float32), ``temperature`` (the one the OOF probabilities use:
    the weight set's fitted T, else 1), ``class_names``, ``weights`` and ``pooled`` (train and
    val sizes). No test-time augmentation: the temperature was fitted without it.
    """
    files = find_weights(run_dir)
    weights = final_of(files)
    ckpt = load_weight_set(run_dir, weights)
    own = load_checkpoint(files[weights])  # temperature keys from the file itself
    fitted = checkpoint_temperature(own, files[weights])
    applies = own.get(TEMPERATURE_TTA_KEY, "none") == "none" and not own.get(TEMPERATURE_REASON_KEY)
    temperature = fitted if applies and fitted is not None else 1.0
    cache = _fold_cache(ckpt)
    cv = (cache.meta.get("subset") or {}).get("cv")
    if cv is None:
        raise StudyError(f"{run_dir}: the run was not trained on a fold (data.cv_folds is 0)")
    dev = resolve_device(device)
    dataset = split_dataset(cache, "val", eval_transform(ckpt["mean"], ckpt["std"]))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=resolve_workers(-1, dev))
    logits, labels = predict(build_model(ckpt), loader, dev)
    path = Path(run_dir) / FOLD_LOGITS
    arrays = {
        "index": cache.rows("val"),
        "labels": labels.numpy(),
        "logits": logits.float().numpy(),
        "temperature": np.float64(temperature),
        "class_names": np.array(list(ckpt["class_names"])),
        "weights": np.array(weights),
        "fold": np.int64(cv["fold"]),
        "pooled": np.array([cv["pooled"][s] for s in POOLED_SPLITS], dtype=np.int64),
    }

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(handle, **arrays)

    write_atomically(path, write)
    return path


def _read_fold(run_dir: Path) -> dict[str, Any]:
    with np.load(run_dir / FOLD_LOGITS, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _val_figures(fold: dict[str, Any]) -> dict[str, float]:
    metrics = classification_metrics(
        torch.from_numpy(fold["logits"]), torch.from_numpy(fold["labels"]), fold["class_names"]
    )
    return {"val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"]}


def _probabilities(fold: dict[str, Any]) -> np.ndarray:
    logits = torch.from_numpy(fold["logits"]).double() / float(fold["temperature"])
    return torch.softmax(logits, dim=1).numpy()


def write_oof(study_dir: Path, folds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Write ``oof.csv`` from the finished folds' logits (rows by pooled index); its figures:
    ``n`` images, ``pooled`` images in train+val, ``accuracy`` and ``macro_f1``."""
    if not folds:
        return {"n": 0}
    names = [str(n) for n in folds[0]["class_names"]]
    n_train, n_val = (int(v) for v in folds[0]["pooled"])
    index = np.concatenate([f["index"] for f in folds])
    labels = np.concatenate([f["labels"] for f in folds])
    fold_of = np.concatenate([np.full(len(f["index"]), int(f["fold"])) for f in folds])
    probs = np.concatenate([_probabilities(f) for f in folds])
    order = np.argsort(index, kind="stable")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "split", "fold", "label", "predicted", *(f"p_{n}" for n in names)])
    for i in order:
        split = POOLED_SPLITS[0] if index[i] < n_train else POOLED_SPLITS[1]
        predicted = int(np.argmax(probs[i]))
        writer.writerow(
            [int(index[i]), split, int(fold_of[i]), names[labels[i]], names[predicted]]
            + [f"{p:.6f}" for p in probs[i]]
        )
    text = buffer.getvalue()
    write_atomically(study_dir / OOF_CSV, lambda tmp: tmp.write_text(text))
    # log p keeps each fold's temperature-scaled probabilities as they are in the table.
    metrics = classification_metrics(
        torch.from_numpy(np.log(np.clip(probs, 1e-300, None))), torch.from_numpy(labels), names
    )
    return {
        "n": int(len(index)),
        "pooled": n_train + n_val,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
    }


def _ensemble(runs: Sequence[Path], *, batch_size: int, device: str) -> dict[str, Any]:
    """The fold models' ensemble on test and, per figure, the mean and sd of its members' rows
    (each member's logits divided by its own temperature, the same logits the mean takes)."""
    report = evaluate_ensemble(runs, batch_size=batch_size, device=device)
    rows = report["weights"]
    members = [name for name in rows if name != ENSEMBLE_ROW]
    figures = {}
    for key in ENSEMBLE_FIGURES:
        values = [float(rows[name][key]) for name in members]
        figures[key] = {
            "ensemble": float(rows[ENSEMBLE_ROW][key]),
            "single": {"n": len(values), **mean_sd(values), "values": values},
        }
    return {"members": members, "n_test": report["n_test"], "figures": figures}


def summarize(
    study: Study, *, ensemble: bool = False, batch_size: int = 256, device: str = "auto"
) -> dict[str, Any]:
    """The summary of the finished folds (see the module docstring); scores any finished
    member's validation fold that has no :data:`FOLD_LOGITS` yet, and rewrites ``oof.csv``.
    With ``ensemble`` and at least two finished folds, adds the ensemble on test."""
    k = int(study.options["folds"])
    planned = plan(k, study.train_argv)
    members: dict[str, Any] = {}
    folds = []
    for i, member in enumerate(planned):
        run_dir = member_dir(study.path, member.name)
        if member_state(run_dir) != "finished":
            continue
        if not (run_dir / FOLD_LOGITS).is_file():
            try:
                fold_logits(run_dir, batch_size=batch_size, device=device)
            except (CheckpointError, DataError, ConfigError, OSError) as error:
                raise StudyError(
                    f"member {member.name}: scoring its validation fold failed: {error}"
                ) from None
        fold = _read_fold(run_dir)
        folds.append(fold)
        entry = {"fold": i, "run": str(run_dir), **member_figures(run_dir)}
        entry["val"] = {**_val_figures(fold), "n": int(len(fold["index"]))}
        members[member.name] = entry
    figures: dict[str, Any] = {}
    for key, _ in VAL_FIGURES:
        values = [m["val"][key] for m in members.values()]
        if values:
            figures[key] = {"n": len(values), **mean_sd(values), "values": values}
    for key, *_ in FIGURES:
        values = [m["figures"][key] for m in members.values() if key in m["figures"]]
        if values:
            figures[key] = {"n": len(values), **mean_sd(values), "values": values}
    summary: dict[str, Any] = {
        "format": FORMAT,
        "kind": KIND,
        "folds": k,
        "complete": len(members) == k,
        "pending": [m.name for m in planned if m.name not in members],
        "members": members,
        "figures": figures,
        "oof": write_oof(study.path, folds),
    }
    if ensemble and len(members) >= 2:
        runs = [Path(m["run"]) for m in members.values()]
        summary["ensemble"] = _ensemble(runs, batch_size=batch_size, device=device)
    return summary


def summary_table(summary: dict[str, Any]) -> Table:
    """Mean ± sd over the folds of the validation and test figures, and the OOF row."""
    n = len(summary["members"])
    table = Table(
        title=f"{summary['folds']}-fold cross-validation: final weights", box=box.SIMPLE_HEAD
    )
    table.add_column("figure", no_wrap=True)
    table.add_column(f"mean ± sd (n={n})", justify="right", no_wrap=True)
    labels = dict(VAL_FIGURES) | {key: f"test {label}" for key, label, *_ in FIGURES}
    for key, label in labels.items():
        stat = summary["figures"].get(key)
        if stat is None:
            continue
        table.add_row(label, f"{stat['mean']:.4f} ± {stat['sd']:.4f}")
    oof = summary["oof"]
    if oof.get("n"):
        images = f"{oof['n']}/{oof['pooled']} images"
        table.add_row(f"OOF accuracy ({images})", f"{oof['accuracy']:.4f}")
        table.add_row(f"OOF macro-F1 ({images})", f"{oof['macro_f1']:.4f}")
    return table


def ensemble_table(summary: dict[str, Any]) -> Table:
    """The fold ensemble against the mean single model on test, on the same (scaled) logits."""
    ensemble = summary["ensemble"]
    table = Table(
        title=f"ensemble of {len(ensemble['members'])} fold models on test "
        f"({ensemble['n_test']} images)",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("figure", no_wrap=True)
    table.add_column("single: mean ± sd", justify="right", no_wrap=True)
    table.add_column("ensemble", justify="right", no_wrap=True)
    labels = {key: label for key, label, *_ in FIGURES}
    for key in ENSEMBLE_FIGURES:
        row = ensemble["figures"][key]
        single = row["single"]
        table.add_row(
            labels[key], f"{single['mean']:.4f} ± {single['sd']:.4f}", f"{row['ensemble']:.4f}"
        )
    return table


def run(args: argparse.Namespace, train_argv: list[str], console: Console) -> int:
    """Create or continue the study, train and test its folds, then write and print the
    summary; the exit code."""
    if args.folds < 2:
        raise StudyError(f"--folds {args.folds} is invalid; allowed: an int >= 2")
    _check_train_argv(train_argv)
    planned = plan(args.folds, train_argv)
    study = open_study(
        args.study_dir,
        kind=KIND,
        options={"folds": args.folds},
        train_argv=train_argv,
        members=[m.name for m in planned],
        command=args.command_line,
    )

    def refresh(ensemble: bool = False) -> dict[str, Any]:
        summary = summarize(study, ensemble=ensemble)
        write_summary(study.path, summary)
        return summary

    code = run_members(study, planned, console, after_each=refresh)
    summary = refresh(ensemble=True)
    console.print(summary_table(summary))
    if "ensemble" in summary:
        console.print(ensemble_table(summary))
    if summary["pending"]:
        console.print(f"not finished: {', '.join(summary['pending'])}", soft_wrap=True)
    console.print(f"out-of-fold predictions: {study.path / OOF_CSV}", soft_wrap=True, markup=False)
    console.print(f"summary: {study.path / SUMMARY_JSON}", soft_wrap=True, markup=False)
    return code
