"""Transfer within blood cells: does thawing a pretrained backbone beat training from scratch?

Issue 30, "Measure", "Transfer within blood cells". On ``bloodcells_pbc_28.npz``:

1. **pretrain**: one run on the source classes basophil, erythroblast, ig and platelet
   (``data.classes``), from scratch with every stage trainable (``unfreeze.direction=all``),
   ``--pretrain-epochs`` epochs, seed = the first of ``--seeds``.
2. **fine-tune** on the target classes eosinophil, lymphocyte, monocyte and neutrophil, with
   ``data.train_fraction`` in ``--fractions`` (stratified and nested; ``data.split_seed`` stays
   at its value, so every method and seed sees the same subset of a fraction), ``--epochs``
   epochs per run, once per seed in ``--seeds`` (``run.seed``), by each of ``--methods``:

   * ``thaw``: ``model.init=<pretrain run>:best`` (a new 4-class head), ``unfreeze.direction=
     thaw``: the head trains alone, then the stages join from the deepest to the shallowest.
     The schedule rule, for ``J`` stages and ``E`` epochs: one stage joins every
     ``gap = max(1, (E // 2) // J)`` epochs, ``unfreeze.activate_at = [gap, 2 gap, ..., J gap]``
     and ``unfreeze.min_gap = gap``, so the network is thawed by about half the run and the
     second half trains it whole (with 10 epochs and 4 stages: joins after epochs 1, 2, 3, 4,
     every stage trains from epoch 5). ``unfreeze.lr_mult`` is 1 for each join and
     ``unfreeze.old_group_decay=0.5`` gives the discriminative rates: each stage at half the
     rate of the stage above it (the head's is the peak). The preset's plateau trigger may bring
     a join forward; SWA starts where the preset's plan puts it, after the last join.
   * ``full``: ``model.init=<pretrain run>:best``, ``unfreeze.direction=all``: full
     fine-tuning, every stage at the peak rate from the start.
   * ``scratch``: random weights, ``unfreeze.direction=all``.

Every run uses the ``--preset`` (cpu by default) with ``run.tensorboard=false``, trains in this
process through ``training.build.build_trainer`` (its console goes to ``logs/<run>.log``), and
is scored on the test split of its own classes by ``training.evaluation.report.evaluate_run``:
the accuracy of ``best.pt`` and, when the run wrote it, ``swa.pt``. A run's *final* accuracy is
that of its swa weights if present, else its best.

Default model: ``timm/resnet10t`` at the native 28 px (timm models have no small-image stem, so
the 28 px reach its last stage at 1 px). Measured on this 2-core machine (one thread, bf16
autocast, batch 128, 28 px, one training step): timm/resnet10t 770 img/s (4.9M parameters,
4 stages), torchvision resnet18 with its ImageNet stem 480, timm/mobilenetv3_small_050 730
(6 stages), timm/resnet14t 390, timm/efficientnet_b0 120. resnet10t is a real ResNet (the
family the issue's users fine-tune), the fastest of them, and its 4 stages give thaw room to
join in a short run; timm/test_resnet is 4x faster but a test fixture of a few channels.

Output in ``--run-dir`` (default ``runs/transfer-bench-<timestamp>``): ``pretrain/``,
``frac-<f>/<method>/seed-<s>/`` (one run folder each), ``logs/``, ``transfer_bench.json``
(written atomically: settings, the pretrain run, every run with its val accuracy per epoch,
active stages per epoch, best/swa/final test accuracy and seconds, the table and the verdict)
and ``transfer_curves.png``: one panel per fraction with each method's validation accuracy per
epoch (mean over seeds), and a last panel with the final test accuracy against the fraction.
It prints one line per run, a table per fraction (mean (sd) over seeds and each seed's value)
and the verdict, judged at the smallest fraction (5% by default)::

    thaw at 5% beats scratch at 5% by more than the seed spread: yes/no (difference, spread)

where the difference is thaw's mean minus scratch's, and the spread is the larger of the two
methods' seed ranges (max - min). One seed has no spread: the verdict then only says which
mean is higher.

The whole study (defaults: 10 + 3 x 3 x 2 x 10 epochs) takes about an hour on 2 cores. Run it
from the repository root::

    .venv/bin/python bench/transfer.py
    .venv/bin/python bench/transfer.py --seeds 0 1 2 --run-dir runs/transfer-3seeds
    .venv/bin/python bench/transfer.py --skip-pretrain runs/transfer-bench-X/pretrain --methods thaw
    .venv/bin/python bench/transfer.py --model resnet18 --set model.stem=cifar --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from dataset.errors import DataError
from models.registry import DEFAULT_ARCH, TIMM_PREFIX, check_arch, stage_names
from training.build import build_trainer
from training.callbacks.metrics_log import read_metrics
from training.config.schema import ConfigError, TrainConfig, load_config
from training.engine.atomic import write_atomically
from training.engine.checkpoint import CheckpointError
from training.engine.run_dir import prepare_run_dir
from training.evaluation.report import evaluate_run

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/bloodcells_pbc_28.npz"
DEFAULT_MODEL = "timm/resnet10t"
RESULT_JSON = "transfer_bench.json"
FIGURE = "transfer_curves.png"
SOURCE_CLASSES = ("basophil", "erythroblast", "ig", "platelet")
TARGET_CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
METHODS = ("thaw", "full", "scratch")
#: each thawed stage's rate is this times the rate of the stage above it.
THAW_DECAY = 0.5


class BenchError(Exception):
    """Bad input to the benchmark, said in one line."""


# --------------------------------------------------------------------------- arguments


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="the 8-class .npz (default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a zoo model (default: %(default)s)")
    p.add_argument("--preset", default="cpu", help="config preset (default: %(default)s)")
    p.add_argument("--pretrain-epochs", type=_positive_int, default=10, help="default: 10")
    p.add_argument("--epochs", type=_positive_int, default=10, help="per fine-tune run (10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="run.seed values (0 1)")
    p.add_argument(
        "--fractions",
        type=_fraction,
        nargs="+",
        default=[0.05, 0.2, 1.0],
        help="data.train_fraction values (default: 0.05 0.2 1.0)",
    )
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: all three"
    )
    p.add_argument("--threads", type=_positive_int, default=2, help="torch threads (default: 2)")
    p.add_argument(
        "--skip-pretrain",
        metavar="RUN_DIR",
        default=None,
        help="reuse this pretrain run (its best.pt) instead of training one",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="where the runs, JSON and figure go (default: runs/transfer-bench-<timestamp>)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to every run (repeatable), e.g. --set optim.lr=1e-3",
    )
    args = p.parse_args(argv)
    args.seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would reuse a run folder
    args.fractions = sorted(set(args.fractions))
    args.methods = [m for m in METHODS if m in args.methods]
    return args


# --------------------------------------------------------------------------- configs


def thaw_schedule(joins: int, epochs: int) -> dict[str, Any]:
    """The thaw method's unfreezing settings for ``joins`` stages in ``epochs`` epochs (the rule
    is in the module docstring): one stage every ``gap`` epochs, thawed by about half the run."""
    gap = max(1, (epochs // 2) // joins)
    return {
        "activate_at": [gap * k for k in range(1, joins + 1)],
        "lr_mult": [1] * joins,
        "min_gap": gap,
        "old_group_decay": THAW_DECAY,
    }


def _as_overrides(section: str, values: dict[str, Any]) -> list[str]:
    return [f"{section}.{key}={json.dumps(value)}" for key, value in values.items()]


def base_overrides(args: argparse.Namespace, data: Path) -> list[str]:
    """What every run shares: the data, model, threads and a quiet, file-only run."""
    return [
        f"data.source={data}",
        f"model.arch={args.model}",
        f"run.threads={args.threads}",
        "run.progress=plain",  # per-epoch lines, in the run's log file
        "run.tensorboard=false",
    ]


def make_config(
    args: argparse.Namespace, data: Path, run_dir: Path, seed: int, epochs: int, *extra: str
) -> TrainConfig:
    """A run's config; the user's ``--set`` come last so that they win."""
    overrides = [
        *base_overrides(args, data),
        f"run.epochs={epochs}",
        f"run.seed={seed}",
        f"run.run_dir={run_dir}",
        *extra,
        *args.overrides,
    ]
    return load_config(preset=args.preset, overrides=overrides)


def method_overrides(method: str, init: str, schedule: dict[str, Any]) -> list[str]:
    """The settings that make ``method`` (fraction and classes come separately)."""
    if method == "thaw":
        thaw = _as_overrides("unfreeze", schedule)
        return [f"model.init={init}", "unfreeze.direction=thaw", *thaw]
    if method == "full":
        return [f"model.init={init}", "unfreeze.direction=all"]
    return ["unfreeze.direction=all"]


def _classes(names: Sequence[str]) -> str:
    return f"data.classes={json.dumps(list(names))}"


# --------------------------------------------------------------------------- checks


def resolve_data(text: str) -> Path:
    """The data file, relative to the working folder or else to the repository."""
    path = Path(text)
    for candidate in (path, REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise BenchError(
        f"data file {text} not found: put bloodcells_pbc_28.npz (the 28-px PBC blood cells,"
        f" see ../shared/data/README.md) at {(REPO_ROOT / DEFAULT_DATA).resolve()}, or pass"
        " --data PATH"
    )


def check_model(args: argparse.Namespace) -> tuple[str, ...]:
    """The model's stage names, or one line on a model the study cannot use."""
    if args.model == DEFAULT_ARCH:
        raise BenchError(
            f"--model {DEFAULT_ARCH} only grows from its first block; the study needs a zoo model"
            f" (e.g. {DEFAULT_MODEL}, resnet18)"
        )
    try:
        check_arch(args.model)
        overrides = [*base_overrides(args, Path("x")), *args.overrides]
        cfg = load_config(preset=args.preset, overrides=overrides)
        return stage_names(cfg.model.arch, cfg.model.arch_options())
    except ConfigError as error:
        raise BenchError(str(error)) from None
    except ValueError as error:  # check_arch, or timm without that name
        hint = f" (timm models: {TIMM_PREFIX}<name> with a name from timm.list_models())"
        raise BenchError(f"unknown model --model {args.model}: {error}{hint}") from None


# --------------------------------------------------------------------------- runs


def train(cfg: TrainConfig, run_dir: Path, log: Path) -> tuple[dict, float]:
    """Train one run in this process, its console into ``log``; returns (summary, seconds)."""
    prepare_run_dir(run_dir)  # refuses a folder holding an earlier run
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as handle:
        console = Console(file=handle, width=120, highlight=False, force_terminal=False)
        start = time.perf_counter()
        summary = build_trainer(cfg, run_dir, console=console).fit()
        seconds = time.perf_counter() - start
    if summary.get("stopped") == "interrupted":
        raise KeyboardInterrupt
    return summary, seconds


def score(run_dir: Path) -> dict[str, Any]:
    """Test accuracy of the run's best and swa weights, and the final one (swa, else best)."""
    report = evaluate_run(run_dir, device="cpu")
    rows = report["weights"]
    out: dict[str, Any] = {
        "best_acc": rows["best"]["accuracy"] if "best" in rows else None,
        "swa_acc": rows["swa"]["accuracy"] if "swa" in rows else None,
        "class_names": report["class_names"],
        "n_test": report["n_test"],
    }
    out["final"] = "swa" if out["swa_acc"] is not None else "best"
    out["final_acc"] = out["swa_acc"] if out["final"] == "swa" else out["best_acc"]
    return out


def curves(run_dir: Path) -> dict[str, list]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {
        "epochs": [r["epoch"] for r in rows],
        "val_acc": [r.get("val_acc") for r in rows],
        "active_blocks": [r.get("active_blocks") for r in rows],
    }


def frac_label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


# --------------------------------------------------------------------------- summary


def summarize(values: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) >= 2 else None,
        "range": max(values) - min(values) if values else None,
        "values": list(values),
    }


def build_table(runs: list[dict], fractions: Sequence[float], methods: Sequence[str]) -> dict:
    table: dict[str, dict[str, Any]] = {}
    for f in fractions:
        table[f"{f:g}"] = {
            m: summarize([r["final_acc"] for r in runs if r["fraction"] == f and r["method"] == m])
            for m in methods
        }
    return table


def verdict(table: dict, fractions: Sequence[float]) -> dict[str, Any] | None:
    """thaw against scratch at the smallest fraction; None when either method was not run."""
    f = min(fractions)
    row = table[f"{f:g}"]
    if "thaw" not in row or "scratch" not in row:
        return None
    thaw, scratch = row["thaw"], row["scratch"]
    difference = thaw["mean"] - scratch["mean"]
    spread = max(thaw["range"], scratch["range"])
    return {
        "fraction": f,
        "thaw_mean": thaw["mean"],
        "scratch_mean": scratch["mean"],
        "difference": difference,
        "spread": spread,
        "seeds": thaw["n"],
        "beats": difference > spread,
    }


def verdict_line(v: dict[str, Any] | None) -> str:
    if v is None:
        return "verdict: not judged (needs the methods thaw and scratch)"
    at = frac_label(v["fraction"])
    yes = "yes" if v["beats"] else "no"
    note = "; one seed, so no spread" if v["seeds"] < 2 else ""
    return (
        f"thaw at {at} beats scratch at {at} by more than the seed spread: {yes} "
        f"({v['difference'] * 100:+.2f} points, spread {v['spread'] * 100:.2f} points{note})"
    )


def table_lines(table: dict, seeds: Sequence[int]) -> list[str]:
    lines = []
    seed_cols = "".join(f"  seed {s:<3d}" for s in seeds)
    for key, rows in table.items():
        lines.append(f"fraction {frac_label(float(key))} (test accuracy of the final weights)")
        lines.append(f"  {'method':<8}  {'mean (sd)':<16}{seed_cols}")
        for method, s in rows.items():
            if s["mean"] is None:
                continue
            sd = f"({s['sd']:.4f})" if s["sd"] is not None else "(-)"
            values = "".join(f"  {v:<8.4f}" for v in s["values"])
            lines.append(f"  {method:<8}  {s['mean']:.4f} {sd:<9}{values}")
    return lines


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically: a temporary file beside it, then a rename."""
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _mean_curve(series: list[list]) -> tuple[list[int], list[float]]:
    """Mean val accuracy per epoch over the runs that reached the epoch (early stops end
    sooner) and scored it."""
    longest = max((len(s) for s in series), default=0)
    xs, ys = [], []
    for i in range(longest):
        values = [s[i] for s in series if i < len(s) and s[i] is not None]
        if values:
            xs.append(i + 1)
            ys.append(statistics.fmean(values))
    return xs, ys


def plot(runs: list[dict], table: dict, fractions, methods, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    panels = len(fractions) + 1
    cols = 2 if panels > 1 else 1
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    flat = axes.ravel()
    colours = {"thaw": "tab:blue", "full": "tab:orange", "scratch": "tab:gray"}
    for ax, f in zip(flat, fractions, strict=False):
        for m in methods:
            series = [r["val_acc"] for r in runs if r["fraction"] == f and r["method"] == m]
            xs, ys = _mean_curve(series)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, color=colours[m], label=m)
        ax.set_title(f"{frac_label(f)} of the target training images")
        ax.set_xlabel("epoch")
        longest = max((len(r["val_acc"]) for r in runs if r["fraction"] == f), default=1)
        ax.set_xticks(range(1, longest + 1, max(1, math.ceil(longest / 12))))  # whole epochs
        ax.set_xlim(0.5, longest + 0.5)
        ax.set_ylabel("validation accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    ax = flat[len(fractions)]
    for i, m in enumerate(methods):
        # each method a little to the side (x factor on the log axis), so error bars stay apart
        dodge = 1.04 ** (i - (len(methods) - 1) / 2)
        xs = [f * 100 * dodge for f in fractions if table[f"{f:g}"][m]["mean"] is not None]
        stats = [table[f"{f:g}"][m] for f in fractions if table[f"{f:g}"][m]["mean"] is not None]
        means = [s["mean"] for s in stats]
        # error bars: each seed's lowest and highest accuracy
        low = [s["mean"] - min(s["values"]) for s in stats]
        high = [max(s["values"]) - s["mean"] for s in stats]
        ax.errorbar(xs, means, yerr=[low, high], marker="o", capsize=3, color=colours[m], label=m)
    ax.set_xscale("log")
    ax.set_xticks([f * 100 for f in fractions])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(fractions) * 100 / 1.5, max(fractions) * 100 * 1.5)
    ax.set_xticklabels([frac_label(f) for f in fractions])
    ax.set_title("final test accuracy (seed min-max)")
    ax.set_xlabel("share of the target training images")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    for extra in flat[panels:]:
        extra.axis("off")
    fig.suptitle(f"Transfer within blood cells ({model}): 4 source -> 4 target classes")
    fig.tight_layout()
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- main


def run_study(args: argparse.Namespace, out: Console) -> dict[str, Any]:
    data = resolve_data(args.data)
    names = check_model(args)
    bench_dir = Path(
        args.run_dir or REPO_ROOT / "runs" / f"transfer-bench-{datetime.now():%Y%m%d-%H%M%S}"
    )
    if (bench_dir / RESULT_JSON).exists():
        raise BenchError(f"{bench_dir} already holds {RESULT_JSON}: pick another --run-dir")
    bench_dir.mkdir(parents=True, exist_ok=True)
    logs = bench_dir / "logs"
    torch.set_num_threads(args.threads)
    schedule = thaw_schedule(len(names), args.epochs)
    out.print(
        f"transfer bench: {args.model} ({len(names)} stages), {data.name}, preset {args.preset},"
        f" {args.threads} threads -> {bench_dir}"
    )
    out.print(
        f"thaw: stages join after epochs {schedule['activate_at']} of {args.epochs},"
        f" each at {THAW_DECAY}x the rate of the stage above"
    )

    # ---- pretrain
    if args.skip_pretrain:
        pre_dir = Path(args.skip_pretrain)
        if not (pre_dir / "checkpoints" / "best.pt").is_file():
            raise BenchError(f"--skip-pretrain {pre_dir}: no checkpoints/best.pt in it")
        pretrain: dict[str, Any] = {"run_dir": str(pre_dir), "reused": True, "wall_s": None}
        out.print(f"pretrain: reusing {pre_dir}")
    else:
        pre_dir = bench_dir / "pretrain"
        cfg = make_config(
            args,
            data,
            pre_dir,
            args.seeds[0],
            args.pretrain_epochs,
            _classes(SOURCE_CLASSES),
            "unfreeze.direction=all",
        )
        _, seconds = train(cfg, pre_dir, logs / "pretrain.log")
        pretrain = {"run_dir": str(pre_dir), "reused": False, "wall_s": seconds}
    pretrain.update(score(pre_dir))
    out.print(
        f"pretrain  {'/'.join(pretrain['class_names'])}  test acc {pretrain['final_acc']:.4f}"
        f" ({pretrain['final']})"
        + (f"  {pretrain['wall_s']:.0f} s" if pretrain["wall_s"] is not None else "")
    )
    init = f"{pre_dir}:best"

    # ---- fine-tune
    runs: list[dict] = []
    for f in args.fractions:
        for method in args.methods:
            for seed in args.seeds:
                name = f"frac-{f:g}/{method}/seed-{seed}"
                run_dir = bench_dir / name
                cfg = make_config(
                    args,
                    data,
                    run_dir,
                    seed,
                    args.epochs,
                    _classes(TARGET_CLASSES),
                    f"data.train_fraction={f}",
                    *method_overrides(method, init, schedule),
                )
                _, seconds = train(cfg, run_dir, logs / (name.replace("/", "_") + ".log"))
                entry = {
                    "fraction": f,
                    "method": method,
                    "seed": seed,
                    "run_dir": str(run_dir),
                    "wall_s": seconds,
                    **score(run_dir),
                    **curves(run_dir),
                }
                runs.append(entry)
                out.print(
                    f"{frac_label(f):>5} {method:<8} seed {seed}  test acc"
                    f" {entry['final_acc']:.4f} ({entry['final']})  {seconds:.0f} s"
                )

    table = build_table(runs, args.fractions, args.methods)
    v = verdict(table, args.fractions)
    for line in table_lines(table, args.seeds):
        out.print(line)
    out.print(verdict_line(v))
    result = {
        "data": str(data),
        "model": args.model,
        "stages": list(names),
        "preset": args.preset,
        "pretrain_epochs": args.pretrain_epochs,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "fractions": args.fractions,
        "methods": args.methods,
        "threads": args.threads,
        "overrides": args.overrides,
        "source_classes": list(SOURCE_CLASSES),
        "target_classes": list(TARGET_CLASSES),
        "thaw_schedule": schedule,
        "pretrain": pretrain,
        "runs": runs,
        "table": table,
        "verdict": v,
        "verdict_line": verdict_line(v),
    }
    write_json(bench_dir / RESULT_JSON, result)
    plot(runs, table, args.fractions, args.methods, bench_dir / FIGURE, args.model)
    out.print(f"wrote {bench_dir / RESULT_JSON} and {bench_dir / FIGURE}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Console(highlight=False, soft_wrap=True, markup=False)
    try:
        run_study(args, out)
    except (BenchError, ConfigError, DataError, CheckpointError) as error:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {error}", markup=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("stopped", markup=False)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
