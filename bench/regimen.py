"""Does the full training regimen beat a plain PyTorch loop, and is it calibrated?

Trains two models on the same ``.npz`` source and scores both on the same test split:

* **regimen**: the real entry point, ``models/train.py --preset cpu`` (every feature the preset
  turns on), run as a subprocess whose wall clock is timed (interpreter start-up, cache check,
  validation and checkpoints included). Its ``checkpoints/best.pt`` and, when present,
  ``checkpoints/swa.pt`` are then scored here on the test split, raw and divided by the
  checkpoint's ``temperature`` (fitted on validation at the end of training; a checkpoint
  without one has no scaled row).
* **plain**: the hand-written reference loop of ``../shared/data/README.md``, in this process:
  a 6-conv BatchNorm CNN (three stages of two 3x3 conv -> BatchNorm -> ReLU at 32, 64 and 128
  channels, each stage ending in a 2x2 max-pool; global average pooling and one linear layer;
  288,488 parameters for 3-channel images and 8 classes), ``torch.optim.AdamW`` (torch's
  default weight decay 0.01) with ``OneCycleLR`` (max lr 3e-3, torch's defaults otherwise),
  batch 128, plain cross-entropy, 15 epochs, seed 0 by default. Augmentation is random flips
  only: horizontal, plus vertical for colour (3-channel) images; greyscale scans keep their
  up-down orientation, as in ``dataset.transforms``. The README leaves those details open;
  these are the choices made here. The images come from the same ``data_npy`` cache the
  regimen builds (same train/val/test split, normalised with the training split's mean/std);
  the loop trains on the train split only, does no validation or model selection, and is
  scored with its final weights. Its wall time is its training loop alone.

``--plain-net`` picks the plain arm's network. ``reference`` is the loop above. ``same`` trains
the regimen's own network (``--set model.arch=resnet18``, any registered one, every stage at
once) in that loop, so a zoo model is compared with itself. ``wbc4`` is a short loop's
4-stage BatchNorm CNN (32-32 / 64-64 / 128-128 / 256 channels), with right-angle rotations added
to the flips of colour images. ``same`` and ``wbc4`` train under bf16 autocast where the CPU has
native bf16, as the ``cpu`` preset does. Every plain arm also gets a ``plain+T`` row: its test
logits divided by a temperature fitted on the validation split, as the regimen calibrates its
own, so the ECE comparison is after temperature scaling on both sides. The training images per
second of both arms (training loops alone) are printed and kept in the JSON.

With ``--set run.tta=MODE`` (test-time augmentation, ``training.tta``) the regimen's rows are
scored on logits averaged over the mode's flipped and rotated views, as ``test.py`` scores that
run, and the table gains ``plain tta=MODE`` (the plain network scored the same way) and
``regimen-best 1-view`` / ``regimen-swa 1-view`` (the regimen's weights with one pass), so the
gain from the views is not mistaken for a gain from training. The views lift both arms, so the
accuracy verdict compares single passes (the regimen's ``1-view`` row against ``plain``); the ECE
verdict is on the run's calibrated output (``+T``, the temperature fitted under its mode).

Scores per model: test accuracy, macro-F1 (scikit-learn), NLL and ECE with 15 equal-width bins
(``training.calibration``). A table with the rows plain / regimen-best / regimen-best+T /
regimen-swa / regimen-swa+T is printed, then two verdicts, both on the regimen's final weights
(``swa`` when the run wrote it, else ``best``)::

    regimen beats plain: yes/no (x vs y)
    temperature-scaled ECE < 1.5%: yes/no

The figures go to ``regimen_bench.json`` in the run folder: ``plain`` (epochs, seed, parameters,
scores), ``regimen`` (command, returncode, wall_s, train_loop_s = the sum of the run's per-epoch
training-loop seconds, and per weight set its file, epoch, temperature, raw and scaled scores),
``rows`` (the table), ``targets`` (the two verdicts and the figures behind them),
``same_test_split`` (both arms scored the same test labels) and ``tta`` (the resolved mode;
``plain`` then also has ``scores_tta`` and each weight set ``single_view``). Scores are
accuracy, macro_f1, nll, ece and wall_s. With ``--skip-plain`` the regimen is compared with the
reference accuracy ``../shared/data/README.md`` gives for the file, when it has one (for the brain
MRI that is a weaker loop than the one measured here, so run both arms to judge it).

One run is one sample: test accuracy moves by a few tenths of a point from seed to seed.
``--seeds 0 1 2`` runs both arms once per seed, each in ``RUN_DIR/seed-N`` with its own JSON as
above, then prints the mean (sd) of every row and judges the targets on the means: the mean
accuracy of the regimen's final weights against the plain loop's mean, and the mean
temperature-scaled ECE. ``RUN_DIR/regimen_bench.json`` then holds ``seeds``, ``rows`` (per row
``n`` and the mean and sd of each figure) and ``targets`` (the means, the verdicts, ``wins``,
the seeds whose regimen beat their own plain loop, and ``paired``). When every seed trained both
arms, a third line gives the per-seed difference (regimen - plain, in accuracy points) with its
sd, the paired t statistic and a 95% interval, and says whether the interval holds zero: the
seeds' spread is often as large as the gap between the means, and the interval says whether
the seeds run can tell the two arms apart.

Run from the repository root. It takes a while on 2 cores: on bloodcells, alone on them with the
``cpu`` preset of the README, the plain loop took 289 s and the regimen 670 s per seed; the brain
MRI runs in the README took two to three times as long as bloodcells runs under the same load::

    .venv/bin/python bench/regimen.py
    .venv/bin/python bench/regimen.py --data ../shared/data/brain_tumor_mri_64.npz
    .venv/bin/python bench/regimen.py --skip-regimen --plain-epochs 3
    .venv/bin/python bench/regimen.py --set run.epochs=12 --run-dir runs/regimen-12
    .venv/bin/python bench/regimen.py --seeds 0 1 2 --run-dir runs/regimen-3seeds
    .venv/bin/python bench/regimen.py --set model.arch=timm/resnet10t --plain-net same --seeds 0 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn

from dataset.cache import CacheInfo
from dataset.errors import DataError
from training.build import build_model as build_run_model
from training.config.schema import ConfigError, TrainConfig, load_config
from training.engine.checkpoint import CheckpointError, load_checkpoint
from training.engine.data import prepare_cache
from training.engine.device import amp_dtype
from training.engine.inference import predict
from training.evaluation.calibration import choose_temperature, expected_calibration_error, nll
from training.evaluation.report import TEMPERATURE_TTA_KEY, build_model, find_weights, test_loader
from training.evaluation.stats import mean_sd, paired_difference
from training.evaluation.tta import resolve_tta, tta_logits

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "models" / "train.py"
DEFAULT_DATA = "../shared/data/bloodcells_pbc_28.npz"
RESULT_JSON = "regimen_bench.json"
ECE_BINS = 15
ECE_TARGET = 0.015
#: where :data:`REFERENCE_ACCURACY` comes from: the data folder's README, not this project's.
REFERENCE_SOURCE = "../shared/data/README.md"
#: test accuracy of the plain loop as published in :data:`REFERENCE_SOURCE`, by file name.
REFERENCE_ACCURACY: dict[str, float] = {
    "bloodcells_pbc_28.npz": 0.9851,
    "brain_tumor_mri_64.npz": 0.9214,
}
PLAIN_WIDTHS = (32, 64, 128)
#: the plain arm's networks (see ``--plain-net``).
PLAIN_NETS = ("reference", "same", "wbc4")
PLAIN_MAX_LR = 3e-3
PLAIN_BATCH = 128
EVAL_BATCH = 512
MIN_IMAGE_SIZE = 8  # three 2x2 max-pools


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="an .npz source (default: %(default)s)")
    p.add_argument("--preset", default="cpu", help="config preset (default: %(default)s)")
    p.add_argument("--plain-epochs", type=int, default=15, help="epochs of the plain loop")
    p.add_argument(
        "--plain-net",
        choices=PLAIN_NETS,
        default="reference",
        help="the plain arm's network: reference (the data README's 6-conv CNN, fp32, flips), "
        "same (the regimen's own model.arch, every stage trained, bf16 where native), wbc4 (a "
        "4-stage BatchNorm CNN, flips and right-angle rotations, bf16 where native)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads for both arms")
    p.add_argument("--skip-plain", action="store_true", help="do not train the plain loop")
    p.add_argument("--skip-regimen", action="store_true", help="do not train the regimen")
    p.add_argument(
        "--run-dir",
        default=None,
        help="the regimen's run folder, also where the JSON goes "
        "(default: runs/regimen-bench-<timestamp> in the repository)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to training (repeatable), e.g. --set run.epochs=12",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="run both arms once per seed (in RUN_DIR/seed-N) and judge the targets on the means; "
        "default: one run with the config's run.seed",
    )
    args = p.parse_args(argv)
    if args.seeds is not None:
        if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
            p.error(f"--seeds {args.seeds} is invalid; allowed: distinct ints >= 0")
        if any(kv.split("=", 1)[0].strip() == "run.seed" for kv in args.overrides):
            p.error("--seeds and --set run.seed=... both choose the seed; give one of them")
    if args.plain_epochs < 1:
        p.error(f"--plain-epochs={args.plain_epochs} is invalid; allowed: an int >= 1")
    if args.threads < 1:
        p.error(f"--threads={args.threads} is invalid; allowed: an int >= 1")
    if args.skip_plain and args.skip_regimen:
        p.error("--skip-plain and --skip-regimen together leave nothing to run; drop one")
    return args


def resolve_data(path: str) -> Path | None:
    """The source (an ``.npz`` file or an image folder) as an absolute path, tried as given and
    then relative to the repository."""
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates.append(REPO_ROOT / path)
    found = next((c for c in candidates if c.exists()), None)
    return found.resolve() if found else None


def seed_dir(run_dir: Path, seed: int) -> Path:
    """Where the run with ``seed`` goes when ``--seeds`` asks for several."""
    return run_dir / f"seed-{seed}"


def default_run_dir() -> Path:
    return REPO_ROOT / "runs" / f"regimen-bench-{time.strftime('%Y%m%d-%H%M%S')}"


def make_config(args: argparse.Namespace, data: Path) -> TrainConfig:
    """The configuration training will resolve, read here for the data and seed settings."""
    return load_config(args.preset, overrides=[f"data.source={data}", *args.overrides])


# --------------------------------------------------------------------------- scores


@dataclass
class Scores:
    """Test-split figures of one set of logits.

    Args:
        accuracy: share of correct argmax predictions.
        macro_f1: unweighted mean of the per-class F1 over every class.
        nll: mean negative log-likelihood of the softmax.
        ece: expected calibration error, 15 equal-width confidence bins.
        wall_s: training wall time of the model, seconds.
    """

    accuracy: float
    macro_f1: float
    nll: float
    ece: float
    wall_s: float


def score(
    logits: torch.Tensor, labels: torch.Tensor, wall_s: float, temperature: float = 1.0
) -> Scores:
    """Scores of ``softmax(logits / temperature)`` against ``labels``.

    Args:
        logits: ``(N, C)`` raw scores.
        labels: ``(N,)`` class indices.
        wall_s: the training time to report with them.
        temperature: divides the logits before NLL and ECE; accuracy and F1 do not change.
    """
    scaled = logits.double() / temperature  # (N, C)
    y_true, y_pred = labels.numpy(), logits.argmax(dim=1).numpy()
    classes = list(range(logits.shape[1]))
    return Scores(
        accuracy=float((y_true == y_pred).mean()),
        macro_f1=float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        nll=nll(scaled, labels),
        ece=expected_calibration_error(scaled, labels, ECE_BINS),
        wall_s=wall_s,
    )


# --------------------------------------------------------------------------- the plain loop


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class PlainCNN(nn.Module):
    """The reference network: three stages of two conv-BN-ReLU layers and a max-pool, then
    global average pooling and a linear classifier.

    Args:
        in_channels: image channels.
        num_classes: output classes.
        widths: channels of the three stages.
    """

    def __init__(
        self, in_channels: int, num_classes: int, widths: Sequence[int] = PLAIN_WIDTHS
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [*_conv_bn_relu(c, w), *_conv_bn_relu(w, w), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images -> ``(B, num_classes)`` logits."""
        return self.head(self.features(x).mean(dim=(2, 3)))


class Wbc4CNN(nn.Module):
    """A short loop's network: four stages of conv-BN-ReLU at 32-32, 64-64, 128-128 and 256
    channels, the first three ending in a 2x2 max-pool; global average pooling and a linear
    classifier.

    Args:
        in_channels: image channels.
        num_classes: output classes.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in (32, 64, 128):
            layers += [*_conv_bn_relu(c, w), *_conv_bn_relu(w, w), nn.MaxPool2d(2)]
            c = w
        layers += _conv_bn_relu(c, 256)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images -> ``(B, num_classes)`` logits."""
        return self.head(self.features(x).mean(dim=(2, 3)))


def plain_network(kind: str, cfg: TrainConfig, cache: CacheInfo) -> nn.Module:
    """The plain arm's network for ``--plain-net``, every part of it trainable."""
    if kind == "wbc4":
        return Wbc4CNN(cache.channels, cache.num_classes)
    if kind == "same":
        model = build_run_model(cfg, cache)
        model.set_trainable(range(1, model.num_stages + 1))
        return model
    return PlainCNN(cache.channels, cache.num_classes)


def random_rot90(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate each square image by 0, 90, 180 or 270 degrees, drawn uniformly."""
    turns = torch.randint(0, 4, (x.shape[0],), generator=generator)  # (B,)
    out = x.clone()
    for k in (1, 2, 3):
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
    return out


@dataclass
class Split:
    """One split held in memory: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor


def load_split(cache: CacheInfo, split: str) -> Split:
    """A cache split as channel-first tensors."""
    images = torch.from_numpy(np.array(cache.images(split))).permute(0, 3, 1, 2)
    return Split(images.contiguous(), torch.from_numpy(cache.labels(split)).long())


class Normalise:
    """uint8 ``(B, C, H, W)`` -> float32, scaled to [0, 1] and standardised per channel.

    Args:
        mean, std: per-channel statistics of the training split, on the [0, 1] scale.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std


def random_flips(x: torch.Tensor, vertical: bool, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 0.5 and, if ``vertical``, up-down too.

    Args:
        x: ``(B, C, H, W)`` batch.
        vertical: also draw up-down flips.
        generator: the random stream.
    """
    flip = torch.rand(x.shape[0], generator=generator) < 0.5  # (B,)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if vertical:
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)
    return x


@torch.no_grad()
def plain_logits(
    model: nn.Module, split: Split, normalise: Normalise, tta: str = "none"
) -> torch.Tensor:
    """Eval-mode logits ``(N, C)`` of a whole split, averaged over the ``tta`` views."""
    model.eval()
    chunks = [
        tta_logits(model, normalise(split.images[i : i + EVAL_BATCH]), tta)
        for i in range(0, len(split.labels), EVAL_BATCH)
    ]
    return torch.cat(chunks).float()


def train_plain(
    cache: CacheInfo, epochs: int, seed: int, net: str = "reference", cfg: TrainConfig | None = None
) -> tuple[nn.Module, float]:
    """Train the plain loop on the cache's train split.

    Args:
        cache: the ``data_npy`` cache both arms read.
        epochs: passes over the train split.
        seed: seeds the weights, the shuffling and the flips.
        net: ``--plain-net``; ``same`` and ``wbc4`` train under bf16 autocast where the CPU has
            native bf16, and ``wbc4`` adds right-angle rotations to the flips of colour images.
        cfg: the regimen's config (``same`` builds its model).

    Returns:
        The trained model and the loop's wall time in seconds.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_split(cache, "train")
    normalise = Normalise(cache.mean, cache.std)
    model = plain_network(net, cfg or load_config("cpu"), cache)
    dtype = None if net == "reference" else amp_dtype(torch.device("cpu"), "auto")
    autocast = {"dtype": dtype, "enabled": dtype is not None}
    rotate = net == "wbc4" and cache.channels == 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=PLAIN_MAX_LR)
    steps = (len(train.labels) + PLAIN_BATCH - 1) // PLAIN_BATCH
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=PLAIN_MAX_LR, total_steps=epochs * steps
    )
    criterion = nn.CrossEntropyLoss()
    vertical = cache.channels == 3
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        t0, loss_sum, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(train.labels), generator=generator)
        for i in range(0, len(order), PLAIN_BATCH):
            idx = order[i : i + PLAIN_BATCH]
            x = random_flips(normalise(train.images[idx]), vertical, generator)  # (B, C, H, W)
            if rotate:
                x = random_rot90(x, generator)
            y = train.labels[idx]  # (B,)
            with torch.autocast("cpu", **autocast):
                logits = model(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        n = len(train.labels)
        print(
            f"plain epoch {epoch}/{epochs}  loss {loss_sum / n:.4f}  "
            f"train acc {correct / n:.4f}  {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    return model, time.perf_counter() - start


def run_plain(
    cache: CacheInfo,
    epochs: int,
    seed: int,
    tta: str = "none",
    net: str = "reference",
    cfg: TrainConfig | None = None,
) -> tuple[Scores, Scores | None, dict[str, Any]]:
    """Train and score the plain arm.

    Returns:
        Its scores from one pass, its scores with the logits averaged over the ``tta`` views
        (``None`` when ``tta`` is "none"), and a description for the JSON: its network, the
        training images per second, and ``scaled``, the scores with a temperature fitted on
        the validation split as the regimen fits its own (``temperature``, or why none).
    """
    model, wall_s = train_plain(cache, epochs, seed, net, cfg)
    test = load_split(cache, "test")
    normalise = Normalise(cache.mean, cache.std)
    logits = plain_logits(model, test, normalise)
    val = load_split(cache, "val")
    fit = choose_temperature(plain_logits(model, val, normalise), val.labels)
    with_tta = None
    if tta != "none":
        with_tta = score(plain_logits(model, test, normalise, tta), test.labels, wall_s)
    info = {
        "net": net,
        "epochs": epochs,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "images_per_s": epochs * len(load_split(cache, "train").labels) / wall_s,
        "temperature": fit.temperature if fit.reason is None else None,
        "temperature_reason": fit.reason,
        "scaled": None if fit.reason else score(logits, test.labels, wall_s, fit.temperature),
        "test_labels_sha": _labels_digest(test.labels),
    }
    return score(logits, test.labels, wall_s), with_tta, info


def _labels_digest(labels: torch.Tensor) -> str:
    """A short fingerprint of a label array, to check both arms scored the same test split."""
    return hashlib.sha256(labels.numpy().astype(np.int64).tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- the regimen


def regimen_command(
    args: argparse.Namespace, data: Path, run_dir: Path, data_root: Path
) -> list[str]:
    """The ``models/train.py`` command line; the user's ``--set`` overrides come last and win."""
    fixed = ["run.progress=plain", f"run.threads={args.threads}", f"data.root={data_root}"]
    sets = [item for kv in [*fixed, *args.overrides] for item in ("--set", kv)]
    return [
        sys.executable,
        str(TRAIN_SCRIPT),
        "--preset",
        args.preset,
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        *sets,
    ]


def train_regimen(command: list[str]) -> tuple[int, float]:
    """Run the training command with its output passed through; returns (exit code, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(command, check=False)
    return proc.returncode, time.perf_counter() - start


def regimen_loop_s(run_dir: Path) -> float | None:
    """Seconds the run spent in its training loops (the sum of ``epoch_s`` in ``last.pt``).

    Comparable with the plain arm's wall time; ``None`` when ``last.pt`` has no history.
    """
    try:
        history = load_checkpoint(run_dir / "checkpoints" / "last.pt").get("history") or []
    except CheckpointError:
        return None
    seconds = [float(m["epoch_s"]) for m in history if "epoch_s" in m]
    return sum(seconds) if seconds else None


def regimen_images_per_s(run_dir: Path) -> float | None:
    """The run's median training images per second over its epochs (``metrics.jsonl``)."""
    try:
        history = load_checkpoint(run_dir / "checkpoints" / "last.pt").get("history") or []
    except CheckpointError:
        return None
    rates = [float(m["images_per_s"]) for m in history if m.get("images_per_s")]
    return statistics.median(rates) if rates else None


def _temperature(ckpt: dict) -> float | None:
    value = ckpt.get("temperature")
    if value is None:
        return None
    value = float(value)
    return value if value > 0 else None


def score_regimen(
    run_dir: Path, wall_s: float, tta: str = "none"
) -> tuple[dict[str, dict[str, Any]], str]:
    """Score the run's ``best`` (or ``last``) and ``swa`` weights on the test split.

    Args:
        run_dir: the run folder.
        wall_s: the run's wall time, copied into the scores.
        tta: the resolved test-time augmentation mode the logits are averaged over; the
            temperature scales them only when it was fitted under the same mode.

    Returns:
        Per weight set ``{"file", "epoch", "temperature", "raw": Scores, "scaled": Scores or
        None, "single_view": Scores or None}`` (``single_view``: one pass, when ``tta`` is not
        "none"), and the digest of the test labels (to check both arms saw the same split).
    """
    files = find_weights(run_dir)
    ckpts = {name: load_checkpoint(path) for name, path in files.items()}
    reference = ckpts.get("best") or ckpts.get("last") or next(iter(ckpts.values()))
    loader, _ = test_loader(reference, None, EVAL_BATCH, 0)
    results: dict[str, dict[str, Any]] = {}
    digest = ""
    for name, ckpt in ckpts.items():
        # A weight set saved without metadata (SWA) borrows the reference's.
        model = build_model({**reference, **ckpt})
        logits, labels = predict(model, loader, "cpu", tta=tta)
        digest = _labels_digest(labels)
        temperature = _temperature(ckpt)
        if ckpt.get(TEMPERATURE_TTA_KEY, "none") != tta:
            temperature = None  # fitted on logits of another kind
        single = None
        if tta != "none":
            single = score(predict(model, loader, "cpu")[0], labels, wall_s)
        results["best" if name == "last" else name] = {
            "file": str(files[name]),
            "epoch": ckpt.get("epoch"),
            "temperature": temperature,
            "raw": score(logits, labels, wall_s),
            "scaled": None if temperature is None else score(logits, labels, wall_s, temperature),
            "single_view": single,
        }
    return results, digest


# --------------------------------------------------------------------------- report


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table; the first column left-aligned, the others right-aligned."""
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]

    def render(line: Sequence[str]) -> str:
        pairs = enumerate(zip(line, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(table[0]), rule, *map(render, table[1:])])


def table_rows(
    plain: Scores | None,
    regimen: dict[str, dict[str, Any]] | None,
    regimen_status: str,
    tta: str = "none",
    plain_tta: Scores | None = None,
) -> dict[str, Scores | str]:
    """Row name -> ``Scores`` or the reason it has none, in the printed order.

    Args:
        plain: the plain arm's scores, ``None`` when skipped.
        regimen: :func:`score_regimen` results, ``None`` when skipped or failed.
        regimen_status: why ``regimen`` is ``None`` ("skipped", "failed").
        tta: the test-time augmentation mode of the regimen rows; with a mode other than
            "none" the table also has ``plain tta=<mode>`` (the plain network scored the same
            way) and ``regimen-<name> 1-view`` (the regimen's weights without it).
        plain_tta: the plain arm's scores under ``tta``.
    """
    rows: dict[str, Scores | str] = {"plain": plain if plain else "skipped"}
    if tta != "none":
        rows[f"plain tta={tta}"] = plain_tta if plain_tta else "skipped"
    for name in ("best", "swa"):
        entry = (regimen or {}).get(name)
        names = [f"regimen-{name}", f"regimen-{name}+T"]
        if tta != "none":
            names.append(f"regimen-{name} 1-view")
        if regimen is None:
            rows.update(dict.fromkeys(names, regimen_status))
        elif entry is None:
            rows.update(dict.fromkeys(names, f"no {name}.pt"))
        else:
            rows[names[0]] = entry["raw"]
            rows[names[1]] = entry["scaled"] or "no temperature fitted for these logits"
            if tta != "none":
                rows[names[2]] = entry.get("single_view") or "not scored"
    return rows


def render_table(rows: dict[str, Scores | str]) -> str:
    headers = ["model", "test acc", "macro-F1", "NLL", "ECE", "wall s"]
    lines = []
    for name, s in rows.items():
        if isinstance(s, Scores):
            cells = [f"{s.accuracy:.4f}", f"{s.macro_f1:.4f}", f"{s.nll:.4f}"]
            lines.append([name, *cells, f"{100 * s.ece:.2f}%", f"{s.wall_s:.1f}"])
        else:
            lines.append([name, "-", "-", "-", "-", f"({s})"])
    return format_table(headers, lines)


def verdicts(
    plain: Scores | None, regimen: dict[str, dict[str, Any]] | None, reference: float | None
) -> dict[str, Any]:
    """The two targets, judged on the regimen's final weights (``swa`` if present, else ``best``).

    Accuracy is that of one forward pass (the weight set's ``single_view`` scores when the run
    used test-time augmentation), as the plain figure is; ECE is that of the ``scaled`` scores.

    Args:
        plain: the plain arm's scores, or ``None`` when skipped.
        regimen: :func:`score_regimen` results, or ``None`` when skipped.
        reference: the README's plain accuracy for this file, used when ``plain`` is ``None``.
    """
    out: dict[str, Any] = {
        "weights": None,
        "regimen_accuracy": None,
        "plain_accuracy": plain.accuracy if plain else reference,
        "plain_source": "measured" if plain else ("reference" if reference else None),
        "regimen_beats_plain": None,
        "scaled_ece": None,
        "scaled_ece_target": ECE_TARGET,
        "scaled_ece_met": None,
    }
    if not regimen:
        return out
    weights = "swa" if "swa" in regimen else "best"
    entry = regimen[weights]
    out["weights"] = weights
    # One pass against one pass: test-time views would lift the regimen alone otherwise.
    single = entry.get("single_view") or entry["raw"]
    out["regimen_accuracy"] = single.accuracy
    if out["plain_accuracy"] is not None:
        out["regimen_beats_plain"] = single.accuracy > out["plain_accuracy"]
    if entry["scaled"] is not None:
        out["scaled_ece"] = entry["scaled"].ece
        out["scaled_ece_met"] = entry["scaled"].ece < ECE_TARGET
    else:
        out["scaled_ece_met"] = False
    return out


def verdict_lines(v: dict[str, Any]) -> list[str]:
    """The two target lines as printed."""
    if v["weights"] is None:
        return [
            "regimen beats plain: n/a (no regimen scores)",
            "temperature-scaled ECE < 1.5%: n/a",
        ]
    if v["regimen_beats_plain"] is None:
        beats = f"regimen beats plain: n/a (regimen-{v['weights']} {v['regimen_accuracy']:.4f})"
    else:
        beats = _beats_line(
            "",
            v["regimen_beats_plain"],
            v["regimen_accuracy"],
            v["weights"],
            v["plain_accuracy"],
            v["plain_source"],
        )
    if v["scaled_ece"] is None:
        ece = f"temperature-scaled ECE < 1.5%: no (regimen-{v['weights']} has no temperature)"
    else:
        ece = _ece_line("", v["scaled_ece_met"], v["scaled_ece"], v["weights"])
    return [beats, ece]


def _beats_line(
    scope: str,
    beats: bool,
    regimen: float,
    weights: str,
    plain: float,
    plain_source: str,
    tail: str = "",
) -> str:
    """``regimen beats plain<scope>: yes/no (<regimen> regimen-<weights> vs <plain> ...<tail>)``."""
    label = "plain" if plain_source == "measured" else f"plain, the reference in {REFERENCE_SOURCE}"
    return (
        f"regimen beats plain{scope}: {'yes' if beats else 'no'} ({regimen:.4f} "
        f"regimen-{weights} vs {plain:.4f} {label}{tail})"
    )


def _ece_line(scope: str, met: bool, ece: float, weights: str) -> str:
    """``temperature-scaled ECE < 1.5%<scope>: yes/no (<ece>% regimen-<weights>+T)``."""
    answer = "yes" if met else "no"
    return f"temperature-scaled ECE < 1.5%{scope}: {answer} ({100 * ece:.2f}% regimen-{weights}+T)"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Scores):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` as JSON atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(_jsonable(payload), handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- several seeds


def summarize(payloads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd over seeds of every row's figures, and the two targets judged on the means.

    Args:
        payloads: what :func:`run_once` returned for each seed.

    Returns:
        ``rows``: row name -> ``{"n": runs with scores, and per figure (accuracy, macro_f1, nll,
        ece, wall_s) {"mean", "sd"}}``; ``targets``: the means the verdicts compare, the verdicts,
        ``wins``, the seeds whose own regimen beat their own plain figure, and ``paired``
        (:func:`~training.evaluation.stats.paired_difference` of the regimen's and the plain
        loop's accuracies over the seeds, when every seed measured both arms).
    """
    rows: dict[str, dict[str, Any]] = {}
    for name in payloads[0]["rows"]:
        scores = [p["rows"][name] for p in payloads if isinstance(p["rows"].get(name), Scores)]
        rows[name] = {"n": len(scores)}
        if scores:
            for field in ("accuracy", "macro_f1", "nll", "ece", "wall_s"):
                rows[name][field] = mean_sd([getattr(s, field) for s in scores])
    targets = [p["targets"] for p in payloads]

    def mean_of(key: str) -> float | None:
        values = [t[key] for t in targets if t[key] is not None]
        return statistics.fmean(values) if len(values) == len(targets) else None

    regimen, plain, ece = (
        mean_of("regimen_accuracy"),
        mean_of("plain_accuracy"),
        mean_of("scaled_ece"),
    )
    judged = [t["regimen_beats_plain"] for t in targets if t["regimen_beats_plain"] is not None]
    paired = None
    if all(t["plain_source"] == "measured" and t["regimen_accuracy"] is not None for t in targets):
        paired = paired_difference(
            [t["regimen_accuracy"] for t in targets], [t["plain_accuracy"] for t in targets]
        )
    return {
        "rows": rows,
        "targets": {
            "runs": len(targets),
            "weights": sorted({t["weights"] for t in targets if t["weights"]}),
            "regimen_accuracy_mean": regimen,
            "plain_accuracy_mean": plain,
            "plain_source": targets[0]["plain_source"],
            "regimen_beats_plain": None if regimen is None or plain is None else regimen > plain,
            "wins": sum(judged),
            "judged": len(judged),
            "paired": paired,
            "scaled_ece_mean": ece,
            "scaled_ece_target": ECE_TARGET,
            "scaled_ece_met": None if regimen is None else (ece is not None and ece < ECE_TARGET),
        },
    }


def render_summary(summary: dict[str, Any]) -> str:
    """The per-row means (sd in brackets) as a plain-text table."""
    headers = ["model", "runs", "test acc", "macro-F1", "NLL", "ECE", "wall s"]
    lines = []
    for name, row in summary["rows"].items():
        if not row["n"]:
            lines.append([name, "0", "-", "-", "-", "-", "-"])
            continue
        cells = [
            f"{row[f]['mean']:.4f} ({row[f]['sd']:.4f})" for f in ("accuracy", "macro_f1", "nll")
        ]
        ece = f"{100 * row['ece']['mean']:.2f}% ({100 * row['ece']['sd']:.2f})"
        wall = f"{row['wall_s']['mean']:.1f} ({row['wall_s']['sd']:.1f})"
        lines.append([name, str(row["n"]), *cells, ece, wall])
    return format_table(headers, lines)


def summary_verdict_lines(t: dict[str, Any]) -> list[str]:
    """The two target lines for several seeds, judged on the means."""
    n = t["runs"]
    if t["regimen_accuracy_mean"] is None:
        return [
            f"regimen beats plain (mean of {n} seeds): n/a (a regimen run has no scores)",
            f"temperature-scaled ECE < 1.5% (mean of {n} seeds): n/a",
        ]
    weights, scope = "/".join(t["weights"]), f" (mean of {n} seeds)"
    if t["regimen_beats_plain"] is None:
        beats = f"regimen beats plain{scope}: n/a (no plain figure)"
    else:
        beats = _beats_line(
            scope,
            t["regimen_beats_plain"],
            t["regimen_accuracy_mean"],
            weights,
            t["plain_accuracy_mean"],
            t["plain_source"],
            f"; won {t['wins']} of {t['judged']} seeds",
        )
    if t["scaled_ece_mean"] is None:
        ece = f"temperature-scaled ECE < 1.5%{scope}: no (a run has no temperature)"
    else:
        ece = _ece_line(scope, t["scaled_ece_met"], t["scaled_ece_mean"], weights)
    lines = [beats, ece]
    if t["paired"]:
        lines.append(paired_line(t["paired"], weights))
    return lines


def paired_line(d: dict[str, Any], weights: str) -> str:
    """The per-seed difference in accuracy points, its 95% interval and what the interval says."""
    if d["low"] > 0:
        reading = "above zero: the regimen is ahead beyond the seed-to-seed spread"
    elif d["high"] < 0:
        reading = "below zero: the plain loop is ahead beyond the seed-to-seed spread"
    else:
        reading = "it holds zero: a tie at this many seeds"
    t = "n/a" if d["t"] is None else f"{d['t']:+.2f}"
    return (
        f"paired difference regimen-{weights} - plain over {d['n']} seeds: "
        f"{100 * d['mean']:+.2f} points (sd {100 * d['sd']:.2f}, t {t}; "
        f"95% interval {100 * d['low']:+.2f} to {100 * d['high']:+.2f}): {reading}"
    )


# --------------------------------------------------------------------------- main


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _check_run_dir(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot take a new run (stale checkpoints would be scored), or None."""
    if any((run_dir / "checkpoints").glob("*.pt")):
        return f"run folder {run_dir} already holds checkpoints; pass a new --run-dir"
    return None


def run_once(
    args: argparse.Namespace, data: Path, run_dir: Path, cfg: TrainConfig, cache: CacheInfo
) -> tuple[int, dict[str, Any]]:
    """Train and score both arms with ``cfg.run.seed``; prints the table and writes the JSON.

    Returns:
        The exit code (1 if training or scoring failed, else 0) and the payload written to
        ``run_dir / RESULT_JSON``.
    """
    reference, seed = REFERENCE_ACCURACY.get(data.name), cfg.run.seed
    payload: dict[str, Any] = {
        "data": str(data),
        "cache": str(cache.path),
        "preset": args.preset,
        "overrides": list(args.overrides),
        "seed": seed,
        "threads": args.threads,
        "torch": torch.__version__,
        "reference_plain_accuracy": reference,
        "plain": None,
        "regimen": None,
    }
    plain = plain_tta = regimen = None
    tta = resolve_tta(cfg.run.tta, cache.channels)
    payload["tta"] = tta
    if not args.skip_plain:
        net = args.plain_net
        print(f"\n== plain loop ({net}): {args.plain_epochs} epochs, seed {seed}", flush=True)
        plain, plain_tta, info = run_plain(cache, args.plain_epochs, seed, tta, args.plain_net, cfg)
        payload["plain"] = {**info, "scores": plain, "scores_tta": plain_tta}
    code = 0
    if not args.skip_regimen:
        data_root = Path(cfg.data.root).resolve()
        command = regimen_command(args, data, run_dir, data_root)
        print(f"\n== regimen: {' '.join(command)}", flush=True)
        returncode, wall_s = train_regimen(command)
        payload["regimen"] = {"command": command, "returncode": returncode, "wall_s": wall_s}
        if returncode != 0:
            print(f"error: training exited with code {returncode}", file=sys.stderr)
            code = 1
        else:
            try:
                regimen, digest = score_regimen(run_dir, wall_s, tta)
            except (FileNotFoundError, CheckpointError, DataError) as err:
                print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
                code = 1
            else:
                loop_s = regimen_loop_s(run_dir)
                payload["regimen"].update(
                    weights=regimen, test_labels_sha=digest, train_loop_s=loop_s
                )
    if plain and regimen:
        payload["same_test_split"] = payload["plain"]["test_labels_sha"] == digest
    status = "skipped" if args.skip_regimen else "failed"
    rows = table_rows(plain, regimen, status, tta, plain_tta)
    if plain:
        scaled = payload["plain"]["scaled"]
        rows = {"plain": rows.pop("plain"), "plain+T": scaled or "no temperature", **rows}
    v = verdicts(plain, regimen, reference)
    payload["rows"] = rows
    payload["targets"] = v
    print("\n" + render_table(rows) + "\n")
    if regimen and payload["regimen"]["train_loop_s"] is not None:
        print(
            f"(regimen wall s is the whole train.py process; its training loops alone took "
            f"{payload['regimen']['train_loop_s']:.1f} s)"
        )
    print("\n".join(verdict_lines(v)))
    speeds = []
    if plain:
        speeds.append(f"plain {payload['plain']['images_per_s']:.0f}")
    if regimen and (rate := regimen_images_per_s(run_dir)) is not None:
        payload["regimen"]["images_per_s"] = rate
        speeds.append(f"regimen {rate:.0f}")
    if speeds:
        print(f"training images/s (training loops alone): {', '.join(speeds)}")
    json_path = run_dir / RESULT_JSON
    write_json(payload, json_path)
    print(f"\nfigures written to {json_path}")
    return code, payload


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (2 for bad input, 1 if training failed)."""
    args = parse_args(argv)
    data = resolve_data(args.data)
    if data is None:
        return _error(f"data {args.data} not found; give --data an .npz file or an image folder")
    run_dir = Path(args.run_dir).resolve() if args.run_dir else default_run_dir()
    # One seed runs in run_dir itself; several run in run_dir/seed-N, summarised in run_dir.
    runs = {None: run_dir} if args.seeds is None else {s: seed_dir(run_dir, s) for s in args.seeds}
    for folder in runs.values():
        if not args.skip_regimen and (problem := _check_run_dir(folder)):
            return _error(problem)
    try:
        cfg = make_config(args, data)
        cache = prepare_cache(cfg.data, progress=False)
    except (ConfigError, DataError) as err:
        return _error(" ".join(str(err).split()))
    if cache.image_size < MIN_IMAGE_SIZE and not args.skip_plain:
        return _error(
            f"images are {cache.image_size} px; the plain CNN needs >= {MIN_IMAGE_SIZE} px"
        )
    torch.set_num_threads(args.threads)
    reference = REFERENCE_ACCURACY.get(data.name)
    print(
        f"data {data}: train/val/test {sum(cache.counts('train'))}/{sum(cache.counts('val'))}/"
        f"{sum(cache.counts('test'))}, {cache.num_classes} classes, {args.threads} threads, "
        f"torch {torch.__version__}; README plain reference: {reference or 'none for this file'}",
        flush=True,
    )
    if args.seeds is None:
        return run_once(args, data, run_dir, cfg, cache)[0]
    code, payloads = 0, []
    for seed, folder in runs.items():
        overrides = [*args.overrides, f"run.seed={seed}"]
        seeded = argparse.Namespace(**{**vars(args), "overrides": overrides})
        seed_code, payload = run_once(seeded, data, folder, make_config(seeded, data), cache)
        code = max(code, seed_code)
        payloads.append(payload)
    summary = summarize(payloads)
    print(f"\n== {len(payloads)} seeds ({', '.join(map(str, args.seeds))}): mean (sd)\n")
    print(render_summary(summary))
    print("\n".join(summary_verdict_lines(summary["targets"])))
    json_path = run_dir / RESULT_JSON
    write_json({"data": str(data), "seeds": list(args.seeds), **summary}, json_path)
    print(f"\nsummary written to {json_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
