"""``python -m dataset prepare|inspect|check SOURCE``: build a cache and report on it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dataset.cache import DEFAULT_ROOT, CacheInfo, load_cache, prepare
from dataset.errors import DataError
from dataset.leakage import LeakageReport, find_duplicates
from dataset.near_duplicates import (
    DEFAULT_MAX_DISTANCE,
    HASH_BITS,
    NearDuplicateReport,
    check_distance,
    find_near_duplicates,
    orientation,
)
from dataset.pair_figure import write_pairs_png
from dataset.sources import EMBEDDED, SPLITS


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say how a source becomes a cache (shared with the training script)."""
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="cache root (default: data_npy)"
    )
    parser.add_argument("--name", help="cache folder name (default: from the source)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of train carved out as val when the source has none (default 0.1)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="share carved out as test for a folder without split folders (default 0.2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of carved splits (default 0)")
    parser.add_argument("--image-size", type=int, help="folders: resize every image to this size")
    parser.add_argument(
        "--strict-size",
        action="store_true",
        help="folders: refuse images of another size instead of resizing",
    )
    parser.add_argument(
        "--drop-leaked-test",
        action="store_true",
        help="drop test images whose pixels also occur in train or val",
    )
    parser.add_argument(
        "--near-distance",
        type=int,
        help=f"Hamming distance (of {HASH_BITS} hash bits) within which images count as near "
        f"duplicates, flips and rotations included; -1: off (default {DEFAULT_MAX_DISTANCE})",
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild the cache even if it is up to date"
    )
    parser.add_argument("--no-progress", action="store_true", help="no download progress bar")


def _build_distance(args: argparse.Namespace) -> int:
    """The near-duplicate distance the cache is built with. ``check`` only reads: its
    ``--near-distance`` sets the report's distance, never the cache's (and so never the carve
    that training reuses)."""
    if args.command == "check" or args.near_distance is None:
        return DEFAULT_MAX_DISTANCE
    return args.near_distance


def open_source(args: argparse.Namespace) -> tuple[CacheInfo, bool, float]:
    """The cache for ``args.source``: an existing cache name under the root, or built from it."""
    start = time.perf_counter()
    existing = Path(args.root) / str(args.source)
    looks_like_name = not Path(args.source).exists() and (existing / "meta.json").is_file()
    if looks_like_name and not args.rebuild:
        return load_cache(existing), False, time.perf_counter() - start
    cache, built = prepare(
        args.source,
        args.root,
        name=args.name,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        image_size=args.image_size,
        strict_size=args.strict_size,
        drop_leaked_test=args.drop_leaked_test,
        near_distance=_build_distance(args),
        rebuild=args.rebuild,
        progress=not args.no_progress,
    )
    return cache, built, time.perf_counter() - start


# --------------------------------------------------------------------- reports


def print_summary(console: Console, cache: CacheInfo, built: bool, seconds: float) -> None:
    meta = cache.meta
    verb = "built" if built else "up to date"
    console.print(f"[bold cyan]{cache.name}[/] [dim]({verb} in {seconds:.1f} s: {cache.path})[/]")
    src = meta["source"]
    console.print(
        f"source: {src.get('url') or src['path']} [dim]({src['kind']}, "
        + ", ".join(f"{k} {v[:12]}" for k, v in src["checksum"].items())
        + ")[/]"
    )
    table = Table(title="images per split and class", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("class")
    for split in SPLITS:
        table.add_column(split, justify="right")
    for i, name in enumerate(cache.class_names):
        table.add_row(str(i), name, *(str(meta["counts"][s][i]) for s in SPLITS))
    table.add_row("", "[bold]total", *(f"[bold]{sum(meta['counts'][s])}" for s in SPLITS))
    console.print(table)
    h, w, c = meta["image_shape"]
    stats = ", ".join(f"{m:.4f}/{s:.4f}" for m, s in zip(cache.mean, cache.std, strict=True))
    console.print(f"images: {h}x{w}, {c} channel(s), uint8; train mean/std per channel: {stats}")
    split = meta["split"]
    if split.get("val") != "source":
        console.print(
            f"val: {split['val']} (fraction {split['val_fraction']}, seed {split['seed']})"
        )
    if split.get("test") != "source":
        console.print(
            f"test: {split['test']} (fraction {split['test_fraction']}, seed {split['seed']})"
        )
    for note in meta.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _pair_cells(pair, files: dict | None) -> list[str]:
    """Image and label cells of both sides of a pair: ``split[index] original-name``, label."""
    cells = []
    for split, idx, label in (pair.a, pair.b):
        name = files[split][idx] if files and split in files else ""
        cells += [f"{split}[{idx}] {name}", str(label)]
    return cells


def print_leakage(
    console: Console, leak: dict, report: LeakageReport | None = None, files=None
) -> None:
    within = ", ".join(f"{s} {n}" for s, n in leak["within"].items())
    across = ", ".join(
        f"{k} {n} ({leak['across_distinct'][k]} distinct)" for k, n in leak["across"].items()
    )
    dirty = any(leak["within"].values()) or leak["across"]
    style = "yellow" if dirty else "green"
    console.print(
        f"[{style}]exact duplicates[/]: within splits: {within or 'none'}; "
        f"across splits: [{'red' if leak['across'] else 'green'}]{across or 'none'}[/]; "
        f"label conflicts: {leak['label_conflicts']}"
    )
    for split, n in leak["leaked"].items():
        console.print(
            f"[yellow]{split}: {n} image(s) ({leak['leaked_distinct'][split]} distinct) also "
            f"occur in an earlier split: {split} scores are optimistic.[/]"
        )
    if leak["leaked"].get("test"):
        console.print(
            "[yellow]`--drop-leaked-test` rebuilds the cache without those test images.[/]"
        )
    if report and report.worst:
        table = Table(
            title="worst pairs (label conflicts first, then across splits)", title_justify="left"
        )
        for col in ("image A", "label A", "image B", "label B"):
            table.add_column(col)
        for pair in report.worst:
            row = _pair_cells(pair, files)
            style = "red" if pair.label_conflict else None
            table.add_row(*row, style=style)
        console.print(table)


def print_near(console: Console, near: dict | None) -> None:
    """One line: the near-duplicate groups of ``meta.json`` (or of a fresh check)."""
    if near is None:
        console.print(
            "[yellow]near duplicates[/]: not checked (cache built before the check; "
            "`--rebuild` adds it)"
        )
        return
    if "skipped" in near:
        console.print(f"near duplicates: not checked ({near['skipped']})")
        return
    within = ", ".join(f"{s} {n}" for s, n in near["within"].items() if n)
    beyond = near["across_beyond_exact"]
    across = ", ".join(
        f"{k} {n} ({beyond.get(k, 0)} not byte-identical)" for k, n in near["across"].items()
    )
    leaked = ", ".join(f"{s} {n}" for s, n in near["leaked"].items())
    style = "yellow" if near["groups"] else "green"
    console.print(
        f"[{style}]near duplicates[/] (hash distance <= {near['max_distance']} of "
        f"{near['bits']} bits, flips and rotations included): {near['groups']} group(s) of "
        f"{near['images']} images (largest {near['largest']}); within splits: "
        f"{within or 'none'}; across splits: [{'red' if beyond else 'green'}]"
        f"{across or 'none'}[/]"
        + (f"; images in a group reaching an earlier split: {leaked}" if leaked else "")
        + f"; label conflicts: {near['label_conflicts']}"
    )


def print_near_pairs(console: Console, report: NearDuplicateReport, files=None) -> None:
    if not report.closest:
        return
    table = Table(
        title="closest near-duplicate pairs that are not byte-identical (across splits first)",
        title_justify="left",
    )
    for col in ("image A", "label A", "image B", "label B", "distance", "B vs A"):
        table.add_column(col)
    for pair in report.closest:
        row = _pair_cells(pair, files)
        row += [str(pair.distance), orientation(pair.transform)]
        table.add_row(*row, style="red" if pair.label_conflict else None)
    console.print(table)


def _near_distance(args: argparse.Namespace, cache: CacheInfo) -> int:
    if args.near_distance is not None:
        return check_distance(args.near_distance)
    return cache.meta["params"].get("near_distance", DEFAULT_MAX_DISTANCE)


def run(args: argparse.Namespace, console: Console) -> int:
    cache, built, seconds = open_source(args)
    if args.command in ("prepare", "inspect"):
        print_summary(console, cache, built, seconds)
    if args.command not in ("prepare", "check"):
        return 0
    files_path = cache.path / "files.json"
    files = json.loads(files_path.read_text()) if files_path.is_file() else None
    if args.command == "prepare":
        print_leakage(console, cache.meta["leakage"], None, files)
        print_near(console, cache.meta.get("near_duplicates"))
        return 0
    images = {s: cache.images(s) for s in SPLITS}
    labels = {s: cache.labels(s) for s in SPLITS}
    report = find_duplicates(images, labels, max_examples=args.examples)
    print_leakage(console, cache.meta["leakage"], report, files)
    distance = _near_distance(args, cache)
    near = None
    if distance >= 0:
        near = find_near_duplicates(images, labels, distance, max_examples=args.examples)
    if near is None:
        print_near(console, {"skipped": "turned off" if distance < 0 else "images under 16x16"})
    else:
        print_near(console, near.summary())
        print_near_pairs(console, near, files)
    if args.pairs_png and near is not None:
        path = write_pairs_png(args.pairs_png, near.closest, images, cache.class_names, files)
        console.print(f"pairs drawn in {path}")
    return 0


SOURCE_HELP = (
    "an embedded sample ("
    + ", ".join(f"{name}: {sample.description}" for name, sample in EMBEDDED.items())
    + "), a MedMNIST name (bloodmnist, bloodmnist_64), an .npz file, an image folder, "
    "or a cache name under --root"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dataset", description=__doc__, epilog=f"SOURCE: {SOURCE_HELP}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "prepare": "build the cache (download if needed); print counts, statistics and duplicates",
        "inspect": "print counts per split and class, image shape and channel statistics",
        "check": "print the exact- and near-duplicate (leakage) reports with example pairs",
    }
    for command, text in helps.items():
        p = sub.add_parser(command, help=text, description=text)
        p.add_argument("source", help=SOURCE_HELP)
        add_source_arguments(p)
        if command == "check":
            p.add_argument("--examples", type=int, default=10, help="pairs to list (default 10)")
            p.add_argument(
                "--pairs-png",
                type=Path,
                help="draw the closest near-duplicate pairs (not byte-identical) in this PNG",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    try:
        return run(args, console)
    except DataError as exc:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
