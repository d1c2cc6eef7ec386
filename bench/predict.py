"""Is predict.py as fast as test.py's forward pass over the same test images?

Runs, in one process, with the same weights, device, threads and batch size:

* **test.py**: the forward pass ``test.py`` runs per weight set: :func:`training.engine.inference.
  predict` over :func:`training.evaluation.report.test_loader` (the test split of the run's
  ``.npy`` cache, or of ``--data``; each image normalised by Albumentations; no TTA);
* **predict.py**: :func:`inference.batch.classify` over the same test images given as new
  inputs (``--inputs``, as ``predict.py`` takes them): each image read, brought to the model's
  size and channels, normalised, classified, and its calibrated probabilities kept. From an
  ``.npz`` (the default, ``DATA.npz:test_images``) that is the work ``test.py`` does; from a
  folder of JPEG or PNG files, reading, decoding and resizing the files count too.

Each side runs ``--repeats`` times after one warm-up pass, alternating which goes first; the
figure judged is the ratio of the median images/s (target: predict.py within 10% of test.py,
``ratio >= 0.90``). The two must also agree: the predicted classes are compared image by image.

Run from the repository root with a trained run (about a minute for 3,418 28-px images)::

    .venv/bin/python bench/predict.py runs/NAME --data ../shared/data/bloodcells_pbc_28.npz
    .venv/bin/python bench/predict.py runs/NAME --inputs ../shared/data/bloodcells_pbc_128/test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from inference.batch import classify
from inference.classifier import Classifier
from inference.inputs import collect_inputs
from training.engine.device import resolve_device
from training.engine.inference import predict
from training.evaluation.report import build_model, load_weight_set, test_loader

TARGET_RATIO = 0.90


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a trained run folder")
    parser.add_argument("--data", help="test.py's source; default: the run's own cache")
    parser.add_argument(
        "--inputs", help="predict.py's inputs; default: DATA.npz:test_images (needs --data)"
    )
    parser.add_argument("--weights", help="weight set; default: the run's final one")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    return parser


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    classifier = Classifier.from_run(args.run_dir, args.weights, args.device)
    ckpt = load_weight_set(args.run_dir, classifier.weights)
    device = resolve_device(args.device)
    model = build_model(ckpt).to(device).eval()
    loader, _ = test_loader(ckpt, args.data, args.batch_size, 0)
    if args.inputs is None and args.data is None:
        raise SystemExit("give --inputs, or --data with an .npz whose test_images are read")
    source = args.inputs or f"{args.data}:test_images"
    items = collect_inputs([source])
    skipped = [item for item in items if item.problem]
    if skipped:
        print(f"listed, not images: {[i.name for i in skipped[:3]]}", file=sys.stderr)
    n_test, n_items = len(loader.dataset), len(items)
    print(
        f"{args.run_dir} ({classifier.weights}, {classifier.input_size} px, "
        f"{classifier.channels} ch); test.py: {n_test} cached test images; predict.py: "
        f"{n_items} images from {source}; batch {args.batch_size}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    sides = {
        "test.py": lambda: predict(model, loader, device)[0],
        "predict.py": lambda: classify(
            classifier, items, batch_size=args.batch_size, workers=args.threads
        ),
    }
    counts = {"test.py": n_test, "predict.py": n_items}
    outputs = {name: fn() for name, fn in sides.items()}  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            seconds, outputs[name] = _timed(sides[name])
            rates[name].append(counts[name] / seconds)
            print(f"repeat {repeat + 1} {name:<10} {counts[name] / seconds:8.1f} images/s")
    if len(items) == n_test:  # the same images in the same order (an .npz, a sorted folder)
        test_pred = outputs["test.py"].argmax(dim=1).tolist()
        ours = [row.top for row in outputs["predict.py"]]
        agree = sum(a == b for a, b in zip(test_pred, ours, strict=True))
        print(f"predicted classes agree on {agree} of {n_test} images (same order assumed)")
    medians = {name: statistics.median(r) for name, r in rates.items()}
    ratio = medians["predict.py"] / medians["test.py"]
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(
        f"median images/s: test.py {medians['test.py']:.1f}, predict.py "
        f"{medians['predict.py']:.1f}; predict/test = {ratio:.3f} "
        f"(target >= {TARGET_RATIO}: {verdict}); load average {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
