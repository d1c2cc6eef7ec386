"""Is the exported ONNX model as fast as PyTorch on the CPU, and which archs export at all?

**Latency** (the default): each model is exported with ``inference.export.export_model`` into a
temporary folder, then ``model.onnx`` in onnxruntime (``CPUExecutionProvider``) and the same
network in PyTorch (eval mode, ``torch.inference_mode``) classify one normalised batch of 1 and
of 64 images, in one process with the same thread count (``--threads``, default 2: torch's
``set_num_threads`` and onnxruntime's intra-op threads, inter-op 1). After ``--warmup`` calls
each, the two alternate call by call for ``--repeats`` calls (so a change in machine load lands
on both sides) and the table gives the median milliseconds per call, images per second and the
ratio onnxruntime / PyTorch (below 1: onnxruntime is faster). The models are the run folders
given as arguments (their final weights), or by default two untrained ones: ``basic_cnn`` (28 px,
3 channels, 8 classes, the blood-cell setting) and ``resnet18`` with the cifar stem (same input).
Untrained weights are fine for latency; their BN statistics are gathered on random batches first
so no layer works on denormal numbers, which would slow either side artificially.

**Which archs export** (``--all-archs``): every registered torchvision arch, ``basic_cnn`` and
``timm/resnet10t`` at a small input (32 px, 3 channels; inception_v3 at 80 px, its minimum is
75), exported with ``export_model``; prints each program's line (``wrote``/``skipped`` and why)
and, for the programs that were written, the largest logit difference from PyTorch at a batch
of 3 (relative to max(1, |logits|)).

Run from the repository root (about 2 minutes for the latency part on 2 idle cores, about 3 more
for ``--all-archs``)::

    .venv/bin/python bench/export.py
    .venv/bin/python bench/export.py --threads 1 --repeats 50
    .venv/bin/python bench/export.py runs/my_run
    .venv/bin/python bench/export.py --all-archs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.classifier import Classifier
from inference.export import EXPORT_ONNX, export_model
from models.registry import TORCHVISION_ARCHS, build_model

BATCHES = (1, 64)
#: the default models: (name, arch, build options)
DEFAULT_MODELS = (
    ("basic_cnn", "basic_cnn", {}),
    ("resnet18 (cifar stem)", "resnet18", {"stem": "cifar"}),
)
DEFAULT_SIZE, DEFAULT_CHANNELS, DEFAULT_CLASSES = 28, 3, 8
ALL_ARCHS = ("basic_cnn", *TORCHVISION_ARCHS, "timm/resnet10t")
#: the small side each arch is tried at in --all-archs (inception_v3 takes no less than 75 px).
ARCH_SIDES = {"inception_v3": 80}
ARCH_SIDE = 32


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders; default: two new models")
    parser.add_argument("--threads", type=_positive, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=_positive, default=10, help="timed calls per side")
    parser.add_argument("--warmup", type=_positive, default=2, help="untimed calls per side first")
    parser.add_argument(
        "--all-archs", action="store_true", help="export every registered arch and list which work"
    )
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is invalid; allowed: an int >= 1")
    return value


# --------------------------------------------------------------------------- models


def new_classifier(
    arch: str, options: dict, *, side: int, channels: int, classes: int, folder: Path
) -> Classifier:
    """An untrained model of ``arch`` at full depth as a Classifier, its BN statistics gathered
    on random batches (an untrained net's logits otherwise vanish or explode)."""
    torch.manual_seed(0)
    model = build_model(
        arch, in_channels=channels, num_classes=classes, input_size=side, options=options
    )
    # Every stage on: basic_cnn is built at depth 1 and would otherwise run one stage only.
    model.set_trainable(range(1, model.num_stages + 1))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, channels, side, side))
    return Classifier(
        model=model.eval(),
        class_names=[f"class_{i}" for i in range(classes)],
        mean=[0.5] * channels,
        std=[0.25] * channels,
        input_size=side,
        channels=channels,
        temperature=1.0,
        temperature_tta="none",
        tta="none",
        weights="untrained",
        source=folder,
        device=torch.device("cpu"),
    )


def onnx_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- latency


@dataclass
class Row:
    model: str
    batch: int
    torch_ms: float
    onnx_ms: float
    max_diff: float


def _time_pair(
    first: Callable[[], object], second: Callable[[], object], warmup: int, repeats: int
) -> tuple[float, float]:
    """Median seconds per call of each, the two alternating call by call after a warm-up."""
    for _ in range(warmup):
        first(), second()
    a, b = [], []
    for i in range(repeats):
        # Alternate which goes first, so neither always follows the other's cache state.
        order = ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a))
        for call, times in order:
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def measure(name: str, classifier: Classifier, folder: Path, args) -> list[Row]:
    lines = export_model(classifier, folder)
    print(f"{name}: " + "; ".join(lines), flush=True)
    session = onnx_session(folder / EXPORT_ONNX, args.threads)
    model = classifier.model.eval()
    shape = (classifier.channels, classifier.input_size, classifier.input_size)
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        feed = {"image": x.numpy()}

        def run_torch(x=x):
            with torch.inference_mode():
                return model(x)

        def run_onnx(feed=feed):
            return session.run(None, feed)

        torch_s, onnx_s = _time_pair(run_torch, run_onnx, args.warmup, args.repeats)
        ref = run_torch().numpy()
        diff = float(np.abs(run_onnx()[0] - ref).max()) / max(1.0, float(np.abs(ref).max()))
        rows.append(Row(name, batch, torch_s * 1e3, onnx_s * 1e3, diff))
    return rows


def print_latency(rows: list[Row]) -> None:
    print(
        f"\n{'model':<24} {'batch':>5}  {'torch ms':>9}  {'onnx ms':>9}  {'onnx/torch':>10}  "
        f"{'torch img/s':>11}  {'onnx img/s':>10}  {'max diff':>8}"
    )
    for r in rows:
        print(
            f"{r.model:<24} {r.batch:>5}  {r.torch_ms:9.3f}  {r.onnx_ms:9.3f}  "
            f"{r.onnx_ms / r.torch_ms:10.2f}  {r.batch / r.torch_ms * 1e3:11.0f}  "
            f"{r.batch / r.onnx_ms * 1e3:10.0f}  {r.max_diff:8.1e}"
        )


def latency(args: argparse.Namespace, tmp: Path) -> int:
    models: list[tuple[str, Classifier]] = []
    try:
        for run in args.runs:
            classifier = Classifier.load(run)
            arch = classifier.model.record()["arch"]
            models.append((f"{arch} {classifier.input_size}px", classifier))
    except (FileNotFoundError, ValueError) as err:  # CheckpointError/ExportError are ValueErrors
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if not args.runs:
        for name, arch, options in DEFAULT_MODELS:
            classifier = new_classifier(
                arch, options, side=DEFAULT_SIZE, channels=DEFAULT_CHANNELS,
                classes=DEFAULT_CLASSES, folder=tmp,
            )  # fmt: skip
            models.append((name, classifier))
    rows = []
    for i, (name, classifier) in enumerate(models):
        rows += measure(name, classifier, tmp / str(i), args)
    print_latency(rows)
    return 0


# --------------------------------------------------------------------------- all archs


def _program_diff(path: Path, classifier: Classifier, threads: int) -> str:
    side, channels = classifier.input_size, classifier.channels
    x = torch.randn(3, channels, side, side, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = classifier.model(x).numpy()
    if path.name == EXPORT_ONNX:
        got = onnx_session(path, threads).run(None, {"image": x.numpy()})[0]
    else:
        # Our own file, just written: torch.export.load unpickles, fine for a trusted file.
        with torch.inference_mode():
            got = torch.export.load(path).module()(x).numpy()
    return f"{np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())):.1e}"


def all_archs(args: argparse.Namespace, tmp: Path) -> int:
    print(f"\n{'arch':<16} {'side':>4}  {'file':<11} {'s':>6}  {'MB':>7}  {'rel diff':>8}  result")
    for arch in ALL_ARCHS:
        side = ARCH_SIDES.get(arch, ARCH_SIDE)
        folder = tmp / arch.replace("/", "_")
        try:
            classifier = new_classifier(arch, {}, side=side, channels=3, classes=4, folder=folder)
        except Exception as err:  # noqa: BLE001 - a model that cannot be built is a row too
            print(f"{arch:<16} {side:>4}  {'-':<11} build failed: {_first_line(err)}")
            continue
        start = time.perf_counter()
        lines = export_model(classifier, folder)
        elapsed = time.perf_counter() - start
        for line in lines[2:]:  # the programs; the weights and JSON never fail here
            name = line.split()[1].rstrip(":")
            path = folder / name
            if line.startswith("wrote"):
                size = f"{path.stat().st_size / 1e6:7.1f}"
                diff = _program_diff(path, classifier, args.threads)
                print(f"{arch:<16} {side:>4}  {name:<11} {elapsed:6.1f}  {size}  {diff:>8}  ok")
            else:
                reason = line.split(": ", 1)[1]
                print(f"{arch:<16} {side:>4}  {name:<11} {elapsed:6.1f}  {'-':>7}  {'-':>8}  "
                      f"FAILED: {reason}")  # fmt: skip
        for path in folder.iterdir():  # vgg16_bn's files are ~0.5 GB each
            path.unlink()
        print(flush=True, end="")
    print("(s: seconds of the whole export_model call for the arch: weights, JSON, both programs)")
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return type(err).__name__ + (f": {text.splitlines()[0]}" if text else "")


# --------------------------------------------------------------------------- main


def load_text() -> str:
    """The 1-minute load average: above the thread count, something else wants the cores."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    print(
        f"{args.threads} threads, {args.warmup} warm-up + {args.repeats} timed calls per side, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"CPU {_cpu_name()} ({os.cpu_count()} cores visible)"
    )
    load_before = load_text()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp_name:
        tmp = Path(tmp_name)
        status = all_archs(args, tmp) if args.all_archs else latency(args, tmp)
    print(f"\nbenchmark wall time {time.perf_counter() - started:.1f} s")
    print(f"load average (1 min): {load_before} at the start, {load_text()} at the end")
    return status


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
