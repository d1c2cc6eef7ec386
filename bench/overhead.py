"""What does the training engine cost on top of a plain PyTorch loop?

Runs, in one process and on the same data, model and optimizer settings:

* **engine**: ``training.build.build_trainer(...).fit()`` with monitoring on, as a real run has
  it: ``ConsoleCallback`` in ``plain`` mode (printing into a ``rich`` console that writes to
  memory), ``MetricsLogger`` writing ``metrics.jsonl`` and TensorBoard, validation after every
  epoch and ``last.pt``/``best.pt`` checkpoints;
* **plain**: a hand-written loop over ``training.data.make_loaders`` (same config, so the same
  augmentation, batch size and shuffling) with a model from ``training.build.build_model``,
  ``torch.optim.AdamW`` with the config's lr, betas and weight decay, and per batch only
  forward, ``CrossEntropyLoss``, backward, ``clip_grad_norm_``, step and ``zero_grad``; then
  one pass over the validation split, as the engine makes every epoch; no logging, no
  checkpoints.

Two figures per epoch, each comparing the same work at the same precision: the engine's
``epoch_s`` (its training loop alone, from its metrics) against the plain loop's training
time, and the engine's whole epoch (training, validation, checkpoints, console and metrics
hooks) against the plain loop's training plus validation. Epoch 1 of both is a
warm-up and is left out of the summary, which gives the ratio of the medians of the remaining
epochs and the median of their per-epoch ratios; the target (``--target``, 1.10 by default; the
model zoo's is 1.05) applies to the per-epoch median, which a change of machine speed between
epochs moves least. The plain loop runs under the same autocast dtype as the engine (bf16 on a
CPU with native bf16 under the ``cpu`` preset's ``run.amp=auto``). ``--model`` picks any
registered network (``resnet18``, ``timm/resnet10t``, ...), trained with every stage at once.

By default the two alternate epoch by epoch (``--order interleaved``): one plain epoch runs
from a callback next to each engine epoch, outside the engine's timers, before it on odd
epochs and after it on even ones. Pairing the epochs keeps a change in machine load (other
processes on a shared machine) from landing on one side only, and alternating the order keeps
either side from always running first. ``--order sequential`` runs all plain epochs first,
then the engine. The load average printed at the end says whether something else competed for
the cores; per-epoch ratios far from the others point the same way.

``--subset N`` trains on N training images, drawn with a fixed seed, by writing a smaller copy
of the ``.npz`` source (validation and test splits unchanged); both loops read its cache. The
cache, the run folder and the subset file live in a temporary folder that is removed at the end.

Under ``torchrun`` both loops train on every process: the engine as a distributed run, the
plain loop inside ``DistributedDataParallel`` with the same shards of each batch and its
validation predictions gathered; rank 0 prints. On a GPU the plain loop waits for the GPU at
the end of each phase, as the engine's figures do.

Run from the repository root (about 2 minutes with the defaults on 2 idle cores; all 11,965
training images take about 6 minutes for 3 epochs)::

    .venv/bin/python bench/overhead.py
    .venv/bin/python bench/overhead.py --subset 0             # all training images
    .venv/bin/python bench/overhead.py --epochs 5 --subset 2000   # more epochs, less noise
    .venv/bin/python bench/overhead.py --model resnet18 --subset 2000 --target 1.05
    .venv/bin/torchrun --standalone --nproc_per_node 2 bench/overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from dataset.sources import read_npz
from training.build import build_model, build_trainer, join_world, shared_cache
from training.config.schema import ConfigError, TrainConfig, load_config
from training.engine.data import Shard, make_loaders
from training.engine.device import amp_dtype
from training.engine.distributed import World, barrier, broadcast, gather, stop, wrap
from training.engine.events import Callback
from training.engine.seeding import make_generator

DEFAULT_DATA = "../shared/data/bloodcells_pbc_28.npz"
TARGET_RATIO = 1.10
SUBSET_SEED = 0


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="an .npz source (default: %(default)s)")
    p.add_argument("--preset", default="cpu", help="config preset (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per loop, the first a warm-up")
    p.add_argument(
        "--subset",
        type=int,
        default=4000,
        help="training images to use; 0 = all (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and run.threads)")
    p.add_argument("--width", type=float, default=None, help="model.width (default: the preset's)")
    p.add_argument("--active-blocks", type=int, default=3, help="model.active_blocks (basic_cnn)")
    p.add_argument(
        "--model",
        default="basic_cnn",
        help="model.arch, any registered network (default: %(default)s)",
    )
    p.add_argument(
        "--target",
        type=float,
        default=TARGET_RATIO,
        help="engine/plain training-time ratio to meet (default: %(default)s)",
    )
    p.add_argument(
        "--order",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="alternate plain and engine epochs, or run all plain epochs first",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for both loops, e.g. --set optim.batch_size=64",
    )
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error(f"--epochs={args.epochs} is invalid; allowed: an int >= 2 (epoch 1 is a warm-up)")
    if args.subset < 0:
        p.error(f"--subset={args.subset} is invalid; allowed: an int >= 0 (0 = all)")
    if args.threads < 1:
        p.error(f"--threads={args.threads} is invalid; allowed: an int >= 1")
    return args


REGIMEN_OFF = (
    "unfreeze.enabled=false",
    "regularize.mixup=false",
    "regularize.dynamic_dropout=false",
    "balance.loss_weights=none",
    "balance.penalty=false",
    "safety.rollback=false",
    "safety.early_stop=false",
    "safety.swa=false",
    "safety.temperature=false",
    "schedule.kind=cosine",
)


def make_config(args: argparse.Namespace, source: Path, tmp: Path) -> TrainConfig:
    """The preset plus the benchmark's settings; both loops read this one config."""
    overrides = [
        f"data.source={source}",
        f"data.root={tmp / 'data_npy'}",
        f"run.epochs={args.epochs}",
        f"run.threads={args.threads}",
        f"run.run_dir={tmp / 'run'}",
        "run.progress=plain",
        "run.tensorboard=true",
        f"model.arch={args.model}",
        # The engine's own mechanics only: the regimen's features (which change what is trained,
        # not how fast the loop runs it) are off here; bench/regimen.py measures the regimen.
        *REGIMEN_OFF,
    ]
    if args.model == "basic_cnn":
        overrides.append(f"model.active_blocks={args.active_blocks}")
    if args.width is not None:
        # A preset's block_channels would otherwise win over width (and the config refuses that).
        overrides += [f"model.width={args.width}", "model.block_channels=[]"]
    return load_config(args.preset, overrides=[*overrides, *args.overrides])


def subset_source(data: Path, n: int, tmp: Path, write: bool = True) -> tuple[Path, int]:
    """A copy of ``data`` with ``n`` training images drawn with a fixed seed (0: ``data`` itself);
    ``write`` False only names it (another process writes it).

    Returns the source to use and its number of training images.
    """
    with np.load(data, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    total = len(arrays["train_labels"])
    if n == 0 or n >= total:
        return data, total
    keep = np.sort(np.random.default_rng(SUBSET_SEED).permutation(total)[:n])
    for key in ("train_images", "train_labels", "train_files"):
        if key in arrays:
            arrays[key] = arrays[key][keep]
    # Stored explicitly: names derived from the subset's file names could miss a class.
    arrays["class_names"] = np.array(read_npz(data).class_names)
    path = tmp / f"{data.stem}_train{n}.npz"
    if write:
        np.savez(path, **arrays)
    return path, n


# --------------------------------------------------------------------------- the plain loop


@dataclass
class PlainLoop:
    """The reference: one model, loader and AdamW, trained with nothing but the essentials.

    Args:
        model: the network, on ``device`` (inside DDP when several processes train it).
        loader: the shuffled, augmented training loader.
        optimizer: AdamW over the trainable parameters.
        clip_grad: max gradient norm; 0 skips clipping.
        device: where the model lives.
        amp_dtype: the autocast dtype the engine uses for the same config (bf16 on a CPU with
            native bf16 under ``run.amp=auto``), or None: both loops compute at one precision.
        val_loader: the validation split, predicted after each epoch as the engine does.
        world: the processes; their validation predictions are gathered as the engine's are.
    """

    model: nn.Module
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    clip_grad: float
    device: torch.device
    criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    amp_dtype: torch.dtype | None = None
    val_loader: DataLoader | None = None
    world: World = field(default_factory=World)
    val_s: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)

    def epoch(self) -> float:
        """Train one epoch; returns its seconds (data loading included, as in ``epoch_s``)."""
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        autocast = {"dtype": self.amp_dtype, "enabled": self.amp_dtype is not None}
        t0 = time.perf_counter()
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)  # (B, C, H, W)
            y = y.to(self.device, non_blocking=True)  # (B,)
            with torch.autocast(self.device.type, **autocast):
                loss = self.criterion(self.model(x), y)
            loss.backward()
            if self.clip_grad > 0:
                nn.utils.clip_grad_norm_(params, self.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":  # queued kernels belong to this epoch's time
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.val_s.append(self.validate())
        return seconds

    @torch.no_grad()
    def validate(self) -> float:
        """Predict the validation split (gathered over the processes); returns its seconds."""
        if self.val_loader is None:
            return 0.0
        self.model.eval()
        autocast = {"dtype": self.amp_dtype, "enabled": self.amp_dtype is not None}
        t0 = time.perf_counter()
        logits, labels = [], []
        for x, y in self.val_loader:
            with torch.autocast(self.device.type, **autocast):
                logits.append(self.model(x.to(self.device, non_blocking=True)).float().cpu())
            labels.append(y)
        shares = gather(self.world, (torch.cat(logits), torch.cat(labels)))
        hits = torch.cat([s[0] for s in shares]).argmax(1) == torch.cat([s[1] for s in shares])
        self.val_acc.append(hits.float().mean().item())  # the engine computes its metrics too
        return time.perf_counter() - t0


def build_plain(cfg: TrainConfig) -> PlainLoop:
    """The plain loop's parts, seeded and built from ``cfg`` as the engine builds its own."""
    torch.manual_seed(cfg.run.seed)
    world, device = join_world(cfg)
    cache = shared_cache(cfg, world)
    model = build_model(cfg, cache).to(device)
    shard = Shard(world.rank, world.size)
    loaders = make_loaders(cache, cfg, device, make_generator(cfg.run.seed), shard=shard)
    if world.distributed:
        model = wrap(model, device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=o.lr,
        betas=tuple(o.betas),
        weight_decay=o.weight_decay,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    dtype = amp_dtype(device, cfg.run.amp)
    return PlainLoop(
        model, loaders["train"], optimizer, o.clip_grad, device, criterion, dtype,
        val_loader=loaders["val"], world=world,
    )  # fmt: skip


# --------------------------------------------------------------------------- timing


class EpochClock(Callback):
    """Times each engine epoch from its start hook to its end hook; may interleave plain epochs.

    ``on_epoch_start`` comes before the engine starts its ``epoch_s`` timer, and ``on_epoch_end``
    (this being the last callback) after validation, checkpoints and the other callbacks' work,
    so a plain epoch run in either hook is outside the engine's figures. The plain epoch goes
    before the engine's on odd epochs and after it on even ones, so that neither side always
    runs first (right after the other's validation and checkpoint writes, say).

    Args:
        plain: the plain loop to interleave, or ``None`` to time the engine alone.
    """

    def __init__(self, plain: PlainLoop | None = None) -> None:
        self.plain = plain
        self.plain_s: list[float] = []
        self.plain_first: list[bool] = []
        self.engine_wall_s: list[float] = []
        self._start = 0.0

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if self.plain is not None and epoch % 2 == 1:
            self._plain_epoch(first=True)
        self._start = time.perf_counter()

    def on_epoch_end(self, trainer: Any, metrics: dict) -> None:
        self.engine_wall_s.append(time.perf_counter() - self._start)
        if self.plain is not None and metrics["epoch"] % 2 == 0:
            self._plain_epoch(first=False)

    def _plain_epoch(self, first: bool) -> None:
        self.plain_s.append(self.plain.epoch())
        self.plain_first.append(first)


@dataclass
class Result:
    """Per-epoch seconds of both loops and the engine's whole fit."""

    plain_s: list[float]
    plain_val_s: list[float]  # the plain loop's validation pass after each epoch
    engine_s: list[float]  # the engine's own epoch_s: its training loop
    engine_wall_s: list[float]  # training + validation + checkpoints + hooks
    plain_first: list[bool]  # per epoch: did the plain epoch run before the engine's?
    images: int
    fit_s: float  # the engine's fit(), minus any plain epochs run inside it
    console_chars: int


def run_benchmark(cfg: TrainConfig, order: str, images: int) -> Result:
    plain = build_plain(cfg)
    sequential = order == "sequential"
    plain_s = [plain.epoch() for _ in range(cfg.run.epochs)] if sequential else []
    clock = EpochClock(None if sequential else plain)
    sink = io.StringIO()  # the console prints in full, to memory
    console = Console(file=sink, width=120, force_terminal=False)
    trainer = build_trainer(cfg, Path(cfg.run.run_dir), console=console, extra_callbacks=[clock])
    t0 = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - t0 - sum(clock.plain_s)
    return Result(
        plain_s=plain_s if sequential else clock.plain_s,
        plain_val_s=plain.val_s,
        engine_s=[float(m["epoch_s"]) for m in trainer.history],
        engine_wall_s=clock.engine_wall_s,
        plain_first=[True] * len(plain_s) if sequential else clock.plain_first,
        images=images,
        fit_s=fit_s,
        console_chars=len(sink.getvalue()),
    )


# --------------------------------------------------------------------------- report


def load_text() -> str:
    """The 1-minute load average: above the thread count, something else wants the cores."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def print_table(r: Result) -> None:
    print(
        f"{'epoch':>5}  {'first':>6}  {'plain s':>8}  {'engine s':>8}  {'ratio':>6}  "
        f"{'plain+val s':>11}  {'engine wall s':>13}  {'ratio':>6}  {'plain img/s':>11}  "
        f"{'engine img/s':>12}"
    )
    rows = zip(r.plain_s, r.plain_val_s, r.engine_s, r.engine_wall_s, r.plain_first, strict=True)
    for i, (p, v, e, w, plain_first) in enumerate(rows):
        first = "plain" if plain_first else "engine"
        note = "  (warm-up, not counted)" if i == 0 else ""
        print(
            f"{i + 1:>5}  {first:>6}  {p:8.2f}  {e:8.2f}  {e / p:6.3f}  {p + v:11.2f}  {w:13.2f}  "
            f"{w / (p + v):6.3f}  {r.images / p:11.0f}  {r.images / e:12.0f}{note}"
        )


def print_summary(r: Result, target: float = TARGET_RATIO) -> bool:
    """The median ratios over epochs 2..N; returns whether the median of the per-epoch
    training ratios meets the target."""
    plain = statistics.median(r.plain_s[1:])
    plain_whole = statistics.median(
        p + v for p, v in zip(r.plain_s[1:], r.plain_val_s[1:], strict=True)
    )
    engine = statistics.median(r.engine_s[1:])
    wall = statistics.median(r.engine_wall_s[1:])
    # Each engine epoch against the plain epoch beside it: a machine that speeds up or slows
    # down between epochs moves both sides of a pair alike.
    paired = statistics.median(e / p for e, p in zip(r.engine_s[1:], r.plain_s[1:], strict=True))
    ratio = engine / plain
    ok = paired <= target
    print(f"\nmedian over epochs 2..{len(r.plain_s)}:")
    print(f"  plain training loop        {plain:8.2f} s")
    print(f"  plain training+validation  {plain_whole:8.2f} s")
    print(f"  engine training (epoch_s)  {engine:8.2f} s")
    print(f"  engine whole epoch         {wall:8.2f} s  (+ validation, checkpoints, hooks)")
    print(f"  engine fit() in all        {r.fit_s:8.2f} s  (every epoch, header and summary too)")
    print(f"  console output             {r.console_chars:8,d} characters")
    print(f"\nratio engine/plain, training:     {ratio:.3f}  (of the medians)")
    print(f"median of the per-epoch ratios:   {paired:.3f}  (paired; judged against the target)")
    print(f"ratio engine/plain, whole epoch:  {wall / plain_whole:.3f}  (both validate each epoch)")
    print(f"target <= {target:.2f}: {'met' if ok else 'NOT met'}")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    if not data.is_file():
        print(f"error: data file {data} not found; pass --data PATH.npz", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    world = World.from_env()
    say = print if world.is_main else (lambda *a, **k: None)
    try:  # the process group first (its device comes from the preset and --set)
        _, device = join_world(load_config(args.preset, overrides=list(args.overrides)), world)
    except ConfigError as err:
        say(f"error: {err}", file=sys.stderr)
        return 2
    # Under torchrun the processes share rank 0's folder (its cache, the run's checkpoints).
    tmp = Path(
        broadcast(world, tempfile.mkdtemp(prefix="bench-overhead-") if world.is_main else "")
    )
    try:
        source, images = subset_source(data, args.subset, tmp, write=world.is_main)
        barrier(world)
        cfg = make_config(args, source, tmp)
        say(
            f"data {data.name}: {images:,} training images, preset {args.preset}, "
            f"model {args.model}, batch {cfg.optim.batch_size}, {args.epochs} epochs, "
            f"{args.threads} threads x {world.size} process(es), device {device}, "
            f"order {args.order}, torch {torch.__version__}"
        )
        load_before = load_text()
        started = time.perf_counter()
        result = run_benchmark(cfg, args.order, images)
        elapsed = time.perf_counter() - started
    except ConfigError as err:
        say(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        barrier(world)
        stop()
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    if not world.is_main:
        return 0
    print()
    print_table(result)
    print_summary(result, args.target)
    print(f"\nbenchmark wall time {elapsed:.1f} s")
    print(f"load average (1 min): {load_before} at the start, {load_text()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
