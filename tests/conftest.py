"""Shared fixtures: tiny generated datasets, and the real ones in ../shared/data when present."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or a skip that says why the test cannot run."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real dataset {path} is absent (../shared/data is not beside this checkout)")
    return path


def shared_folder(name: str) -> Path:
    """A folder of ../shared/data, or a skip that says why the test cannot run."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {path} is absent (../shared/data is not beside this checkout)")
    return path


def make_arrays(n: int, size: int = 8, channels: int = 3, classes: int = 3, seed: int = 0):
    """``n`` random uint8 images ``(n, size, size, channels)`` and balanced labels ``(n,)``."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % classes
    return images, labels


@pytest.fixture
def npz_factory(tmp_path):
    """Write a MedMNIST-layout .npz; keyword arguments replace or drop (None) any key."""

    def make(name: str = "tiny.npz", *, n=(30, 9, 12), size=8, channels=3, classes=3, **override):
        arrays = {}
        for seed, (split, count) in enumerate(zip(("train", "val", "test"), n, strict=True)):
            images, labels = make_arrays(count, size, channels, classes, seed=seed + 1)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        arrays.update(override)
        arrays = {k: v for k, v in arrays.items() if v is not None}
        path = tmp_path / name
        np.savez_compressed(path, **arrays)
        return path

    return make


@pytest.fixture
def folder_factory(tmp_path):
    """Write an image-folder tree: ``{split: {class: count}}`` or ``{class: count}``."""

    def make(layout: dict, size=(8, 8), mode="RGB", name="images", ext=".png"):
        root = tmp_path / name
        rng = np.random.default_rng(0)

        def write(folder: Path, count: int) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                Image.fromarray(pixels, mode=None).convert(mode).save(folder / f"img{i}{ext}")

        for key, value in layout.items():
            if isinstance(value, dict):
                for cls, count in value.items():
                    write(root / key / cls, count)
            else:
                write(root / key, value)
        return root

    return make


def brightness_npz(path: Path, counts=(48, 12, 12), noise: int = 25) -> Path:
    """28x28 RGB, 3 classes whose mean brightness differs (+-``noise``), so a model can learn."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        labels = np.arange(n) % 3
        base = (labels * 70 + 30)[:, None, None, None]
        images = np.clip(base + rng.integers(-noise, noise, size=(n, 28, 28, 3)), 0, 255)
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def tiny_npz(tmp_path):
    """The small brightness-classes dataset of :func:`brightness_npz`."""
    return brightness_npz(tmp_path / "tiny.npz")


def load_bench(name: str):
    """The script ``bench/<name>.py`` imported as a module (``bench`` is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    """A benchmark sets torch's thread count; put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train_tiny_run(
    base: Path, *, channels: int = 3, size: int = 28, epochs: int = 4, arch: str = "basic_cnn"
) -> Path:
    """A real run folder: ``models/train.py`` on a tiny learnable dataset for a few epochs (SWA
    from epoch 3, so ``swa.pt`` and temperatures exist), then ``test.py``'s evaluation; for the
    tests of what reads run folders (the report, predict). ``arch`` picks any registered model;
    ``basic_cnn`` is made narrow and grows over two stages."""
    import models.train as train_script
    from training.evaluation.report import evaluate_run, save_report

    npz = brightness_npz(base / "tiny.npz", counts=(96, 24, 24))
    if channels == 1 or size != 28:
        data = dict(np.load(npz))
        for key in [k for k in data if k.endswith("_images")]:
            images = torch.from_numpy(data[key]).permute(0, 3, 1, 2).float()
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="nearest")
            images = images.mean(dim=1, keepdim=True) if channels == 1 else images
            data[key] = images.permute(0, 2, 3, 1).round().clamp(0, 255).byte().numpy()
        np.savez(npz, **data)
    run = base / "run"
    if arch == "basic_cnn":
        model = ["--set", "model.width=0.125", "--set", "model.block_channels=[]",
                 "--set", "unfreeze.activate_at=[1, 2]"]  # fmt: skip
    else:
        model = ["--model", arch]
    code = train_script.main(
        [
            "--preset", "cpu", "--data", str(npz), "--run-dir", str(run),
            "--epochs", str(epochs), *model,
            "--set", f"data.root={base / 'cache'}",
            "--set", "optim.batch_size=16", "--set", "run.progress=plain",
            "--set", "run.tensorboard=false", "--set", "safety.swa_start_epoch=3",
        ]
    )  # fmt: skip
    assert code == 0, "the tiny run did not train"
    save_report(evaluate_run(run, batch_size=32), run)
    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny trained and tested run (3-channel, 28 px), shared by every test that reads it:
    copy it before changing it."""
    return train_tiny_run(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def trained_grey_run(tmp_path_factory) -> Path:
    """One tiny trained and tested greyscale run (1 channel, 64 px), shared like
    :func:`trained_run`: copy it before changing it."""
    return train_tiny_run(tmp_path_factory.mktemp("trained_grey"), channels=1, size=64)
