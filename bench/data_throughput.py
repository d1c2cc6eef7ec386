"""Is the data layer fast enough to keep CPU training busy?

Measures, on the images of one ``.npz`` source (the PBC blood-cell set by default):

1. cache build: ``dataset.cache.prepare(..., rebuild=True)`` into a temporary folder
   (seconds, and images per second over all splits);
2. data loading: ``NpyDataset`` of the train split with the full training augmentation
   (``train_transform(..., strength=1.0)``) read through a ``DataLoader`` (batch 128, shuffled)
   with 0 and with 2 worker processes, in samples per second, timed over ``--batches`` batches
   after one warm-up batch (which absorbs the worker start-up);
3. model training: ``BasicCNNModel`` at ``--width`` with group and batch norm, at depth 1
   (``initial_parameters()`` in AdamW) and depth 3 (``freeze_blocks_until(3)``, all parameters
   in AdamW); forward, backward and an AdamW step on one pre-made batch of the same images, so no
   data loading is involved; images per second after 2 warm-up steps, in float32 and, as an extra
   column, under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (time-boxed by
   ``--bf16-budget`` because CPUs without native bf16 run it very slowly);
4. the ratio of loader samples/s to training images/s, for the default configuration (group
   norm, depth 3) and for the fastest one, with a verdict on whether loading is the bottleneck.

Every stage runs alone. In a real training run on a small machine the loader workers and the
compute threads share the same cores, so the two rates do not simply combine; the ratio says
whether loading *could* keep up, not what a combined run will reach.

Run from the repository root (about a minute with the defaults on 2 cores)::

    .venv/bin/python bench/data_throughput.py
    .venv/bin/python bench/data_throughput.py --data ../shared/data/brain_tumor_mri_64.npz

``OMP_WAIT_POLICY=PASSIVE`` (set in the environment before starting) makes idle OpenMP threads
sleep instead of spin, which can matter when workers and compute threads share cores; it is not
set here because it has to be set before torch is imported and did not speed up the stages
measured alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dataset.cache import CacheInfo, prepare
from dataset.npy_dataset import NpyDataset
from dataset.transforms import train_transform
from models.basic_cnn_model import BasicCNNModel

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/bloodcells_pbc_28.npz"
WORKER_COUNTS = (0, 2)
NORMS = ("group", "batch")
DEPTHS = (1, 3)
DEFAULT_CONFIG = ("group", 3)  # the configuration a full training run ends in


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="an .npz source (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="loader and training batch")
    p.add_argument("--batches", type=int, default=40, help="timed loader batches (capped by split)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed training steps first")
    p.add_argument("--width", type=float, default=0.25, help="BasicCNNModel width multiplier")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for compute")
    p.add_argument(
        "--bf16-budget",
        type=float,
        default=8.0,
        help="seconds of timed bf16 steps per configuration (at least one step; 0: skip bf16)",
    )
    args = p.parse_args(argv)
    for name in ("batch_size", "batches", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0 or args.bf16_budget < 0:
        p.error("--warmup-steps and --bf16-budget must be >= 0")
    return args


def resolve_data(path: str) -> Path | None:
    """The source file, tried as given and then relative to the repository root."""
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates.append(REPO_ROOT / path)
    return next((c for c in candidates if c.is_file()), None)


# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Rate:
    """``items`` processed in ``seconds``."""

    items: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


def time_cache_build(source: Path, root: Path) -> tuple[CacheInfo, Rate]:
    start = time.perf_counter()
    info, _ = prepare(source, root, rebuild=True, progress=False)
    seconds = time.perf_counter() - start
    total = sum(sum(info.counts(split)) for split in ("train", "val", "test"))
    return info, Rate(total, seconds)


def time_loader(dataset: NpyDataset, batch_size: int, workers: int, batches: int) -> Rate:
    """Samples/s over ``batches`` batches after one untimed warm-up batch."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=False,
    )
    n = min(batches, len(loader) - 1)
    if n < 1:
        raise SystemExit(f"the train split has {len(dataset)} images: too few for 2 batches")
    iterator = iter(loader)
    next(iterator)  # warm-up: worker start-up and first transforms
    samples = 0
    start = time.perf_counter()
    for _ in range(n):
        images, _labels = next(iterator)
        samples += images.shape[0]
    seconds = time.perf_counter() - start
    del iterator  # shuts the workers down
    return Rate(samples, seconds)


def make_batch(dataset: NpyDataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented batch of real images, reused for every training step."""
    items = [dataset[i % len(dataset)] for i in range(batch_size)]
    images = torch.stack([image for image, _ in items])  # (B, C, H, W) float32
    labels = torch.tensor([label for _, label in items], dtype=torch.long)  # (B,)
    return images, labels


def build_model(info: CacheInfo, width: float, norm: str, depth: int) -> BasicCNNModel:
    torch.manual_seed(0)
    model = BasicCNNModel(
        in_channels=info.channels,
        num_classes=info.num_classes,
        input_size=info.image_size,
        width=width,
        norm=norm,
    )
    model.freeze_blocks_until(depth)
    return model.train()


def optimizer_for(model: BasicCNNModel, depth: int) -> torch.optim.Optimizer:
    params = model.initial_parameters() if depth == 1 else list(model.parameters())
    return torch.optim.AdamW(params, lr=1e-3)


def train_step(
    model: BasicCNNModel,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    bf16: bool,
) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_training(
    info: CacheInfo,
    args: argparse.Namespace,
    batch: tuple[torch.Tensor, torch.Tensor],
    config: tuple[str, int],
    bf16: bool,
) -> Rate:
    """Images/s of full training steps; bf16 runs one warm-up and stops at ``--bf16-budget``."""
    norm, depth = config
    model = build_model(info, args.width, norm, depth)
    optimizer = optimizer_for(model, depth)
    images, labels = batch
    warmup = min(args.warmup_steps, 1) if bf16 else args.warmup_steps
    for _ in range(warmup):
        train_step(model, optimizer, images, labels, bf16)
    steps = 0
    start = time.perf_counter()
    while steps < args.steps:
        train_step(model, optimizer, images, labels, bf16)
        steps += 1
        if bf16 and time.perf_counter() - start >= args.bf16_budget:
            break
    return Rate(steps * images.shape[0], time.perf_counter() - start)


# --------------------------------------------------------------------------- printing


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table; the first column left-aligned, the others right-aligned."""
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]

    def render(line: Sequence[str]) -> str:
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(table[0]), rule, *map(render, table[1:])])


def section(title: str) -> None:
    print(f"\n== {title}")


def print_header(args: argparse.Namespace, source: Path, info: CacheInfo) -> None:
    counts = {s: sum(info.counts(s)) for s in ("train", "val", "test")}
    print("data throughput benchmark")
    print(f"  source      {source}")
    print(
        f"  images      {info.image_size}x{info.image_size}x{info.channels}, "
        f"{info.num_classes} classes, train/val/test {counts['train']}/{counts['val']}/"
        f"{counts['test']}"
    )
    print(
        f"  torch       {torch.__version__}, {args.threads} compute thread(s), "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


def print_cache(rate: Rate) -> None:
    section("1. cache build: prepare(..., rebuild=True) into a temporary folder")
    row = ["prepare", str(rate.items), f"{rate.seconds:.2f}", f"{rate.per_second:,.0f}"]
    print(format_table(["step", "images", "seconds", "images/s"], [row]))


def print_loader(rates: dict[int, Rate], batch_size: int) -> None:
    section(
        f"2. DataLoader over NpyDataset(train), train_transform(strength=1.0), batch {batch_size}"
    )
    rows = [
        [f"{w} workers", str(r.items), f"{r.seconds:.2f}", f"{r.per_second:,.0f}"]
        for w, r in rates.items()
    ]
    print(format_table(["loader", "samples", "seconds", "samples/s"], rows))


def print_training(
    fp32: dict[tuple[str, int], Rate],
    bf16: dict[tuple[str, int], Rate],
    params: dict[tuple[str, int], int],
    args: argparse.Namespace,
) -> None:
    section(
        f"3. BasicCNNModel training on CPU, width {args.width}, batch {args.batch_size}, AdamW, "
        "pre-made batch"
    )
    headers = ["norm / depth", "trainable", "fp32 img/s", "fp32 ms/step"]
    if bf16:
        headers += ["bf16 img/s", "bf16 steps"]
    rows = []
    for config, rate in fp32.items():
        norm, depth = config
        steps = rate.items // args.batch_size
        row = [f"{norm} / {depth}", f"{params[config]:,}", f"{rate.per_second:,.0f}"]
        row.append(f"{1000 * rate.seconds / steps:.0f}")
        if config in bf16:
            row += [f"{bf16[config].per_second:,.0f}", str(bf16[config].items // args.batch_size)]
        rows.append(row)
    print(format_table(headers, rows))
    print(f"  fp32: {args.warmup_steps} warm-up steps, then {args.steps} timed steps")
    if bf16:
        print(
            "  bf16: torch.autocast('cpu', dtype=torch.bfloat16); 1 warm-up step, then up to "
            f"{args.steps} steps or {args.bf16_budget:g} s"
        )


def verdict(workers: int, ratio: float, against: str) -> str:
    if ratio >= 1:
        return (
            f"data layer is not the bottleneck: loader ({workers} workers) delivers "
            f"{ratio:.1f} x what training ({against}) consumes"
        )
    return (
        f"data layer IS the bottleneck: loader ({workers} workers) delivers only "
        f"{ratio:.2f} x what training ({against}) consumes"
    )


def print_ratios(
    loader: dict[int, Rate], fp32: dict[tuple[str, int], Rate], bf16: dict[tuple[str, int], Rate]
) -> None:
    section("4. loader samples/s divided by training images/s")
    default = fp32[DEFAULT_CONFIG].per_second
    measured = {(c, "fp32"): r for c, r in fp32.items()} | {(c, "bf16"): r for c, r in bf16.items()}
    (fast_config, fast_kind), fast_rate = max(measured.items(), key=lambda kv: kv[1].per_second)
    fastest = fast_rate.per_second
    default_name = f"{DEFAULT_CONFIG[0]} norm, depth {DEFAULT_CONFIG[1]}, fp32"
    fastest_name = f"{fast_config[0]} norm, depth {fast_config[1]}, {fast_kind}"
    headers = ["loader", "samples/s", f"/ default ({default:,.0f})", f"/ fastest ({fastest:,.0f})"]
    rows = [
        [f"{w} workers", f"{r.per_second:,.0f}"]
        + [f"{r.per_second / default:.2f}", f"{r.per_second / fastest:.2f}"]
        for w, r in loader.items()
    ]
    print(format_table(headers, rows))
    print(f"  default = {default_name}; fastest = {fastest_name}")
    print()
    for w, r in loader.items():
        print(verdict(w, r.per_second / default, default_name))
    for w, r in loader.items():
        print(verdict(w, r.per_second / fastest, fastest_name))


def print_notes(threads: int) -> None:
    print(
        "\nnotes: each stage was measured alone. In a real run the loader workers and the "
        f"{threads} compute\nthread(s) share this machine's {_cpu_count()} core(s), so the rates "
        "above do not combine; a ratio\nclose to 1 means loading will slow training in practice. "
        "OMP_WAIT_POLICY=PASSIVE (set\nbefore starting Python) stops idle OpenMP threads from "
        "spinning on cores the workers need."
    )


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace, source: Path) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as root:
        info, cache_rate = time_cache_build(source, Path(root))
        print_header(args, source, info)
        print_cache(cache_rate)

        transform = train_transform(info.mean, info.std, info.channels, strength=1.0)
        dataset = NpyDataset(info, "train", transform)
        loader = {w: time_loader(dataset, args.batch_size, w, args.batches) for w in WORKER_COUNTS}
        print_loader(loader, args.batch_size)

        batch = make_batch(dataset, args.batch_size)
        configs = [(norm, depth) for norm in NORMS for depth in DEPTHS]
        params = {c: _trainable(build_model(info, args.width, *c)) for c in configs}
        fp32 = {c: time_training(info, args, batch, c, bf16=False) for c in configs}
        bf16 = {}
        if args.bf16_budget > 0:
            bf16 = {c: time_training(info, args, batch, c, bf16=True) for c in configs}
        print_training(fp32, bf16, params, args)
        print_ratios(loader, fp32, bf16)
        print_notes(args.threads)


def _trainable(model: BasicCNNModel) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    source = resolve_data(args.data)
    if source is None:
        tried = "" if Path(args.data).is_absolute() else f" (also tried {REPO_ROOT / args.data})"
        print(
            f"data file not found: {args.data}{tried}; pass an .npz source with --data",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    run(args, source)
    print(f"\ntotal benchmark time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
