"""Tests for training.build: the data a model cannot train on is refused before training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dataset.errors import DataError
from models.basic_cnn_model import ModelConfig
from training.build import build_model, build_trainer
from training.config.schema import load_config


def small_config(source, tmp_path, *extra: str):
    return load_config(
        preset="cpu",
        overrides=[
            f"data.source={source}",
            f"data.root={tmp_path / 'cache'}",
            "model.block_channels=[8, 16, 16]",
            "optim.batch_size=8",
            "run.epochs=1",
            "run.progress=off",
            "run.tensorboard=false",
            f"run.run_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


def fake_cache(size: int, classes: int, width: int | None = None) -> SimpleNamespace:
    names = [f"c{i}" for i in range(classes)]
    shape = [size, width or size, 3]
    meta = {"image_shape": shape, "class_names": names}
    return SimpleNamespace(
        meta=meta, channels=3, num_classes=classes, image_size=size, class_names=names
    )


def test_images_below_the_models_minimum_are_refused_before_training(npz_factory, tmp_path):
    least = ModelConfig().min_input_size
    source = npz_factory("small.npz", n=(12, 6, 6), size=least - 1)
    with pytest.raises(DataError) as info:
        build_trainer(small_config(source, tmp_path), tmp_path / "run")
    side = least - 1
    assert str(info.value) == (
        f"{source}: {side}x{side} px images are smaller than basic_cnn takes as configured:"
        f" at least {least}x{least} px; resize them (data.image_size, for an image folder) or"
        " change model.block_strides"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_minimum_follows_the_configured_strides(tmp_path):
    cfg = small_config("unused.npz", tmp_path, "model.block_strides=[1, 2, 2]")
    model = build_model(cfg, fake_cache(16, 3))
    assert model.min_input_size <= 16 < ModelConfig().min_input_size
    with pytest.raises(DataError, match=r"28x12 px images .* at least 13x13 px"):
        build_model(cfg, fake_cache(28, 3, width=12))  # the narrow side counts


def test_a_single_class_is_refused_in_one_line(tmp_path):
    cfg = small_config("one.npz", tmp_path)
    with pytest.raises(DataError) as info:
        build_model(cfg, fake_cache(28, 1))
    assert str(info.value) == "one.npz: 1 class (c0); a classifier needs at least 2 classes"
