"""The memory-mapped Dataset and the augmentation pipelines."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset.cache import prepare
from dataset.npy_dataset import NpyDataset
from dataset.transforms import StrengthRamp, eval_transform, train_transform


@pytest.fixture
def cache(npz_factory, tmp_path):
    return prepare(npz_factory(), tmp_path / "cache")[0]


def test_item_is_normalised_chw_float(cache):
    ds = NpyDataset(cache, "train")
    image, label = ds[4]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    raw = cache.images("train")[4].astype(np.float32) / 255  # (H, W, C)
    expected = (raw - np.array(cache.mean)) / np.array(cache.std)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert label == int(cache.labels("train")[4])
    assert len(ds) == 30


def test_images_are_memory_mapped_and_not_pickled(cache):
    ds = NpyDataset(cache, "val")
    ds[0]
    assert isinstance(ds.images, np.memmap)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._images is None  # a worker maps the file itself
    assert len(pickle.dumps(ds)) < 20_000


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_workers_sees_every_image_once(cache, workers):
    ds = NpyDataset(
        cache, "train", transform=train_transform(cache.mean, cache.std, 3, strength=1.0)
    )
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers)
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == sorted(cache.labels("train").tolist())
    xb, _ = next(iter(loader))
    assert xb.shape[1:] == (3, 8, 8) and torch.isfinite(xb).all()


def test_bad_split_rejected(cache):
    with pytest.raises(ValueError, match="split must be train, val or test, got 'dev'"):
        NpyDataset(cache, "dev")


@pytest.mark.parametrize("channels", [1, 3])
def test_strength_zero_is_plain_normalisation(channels):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 16, channels), dtype=np.uint8)
    mean, std = [0.5] * channels, [0.25] * channels
    a = train_transform(mean, std, channels, strength=0.0)(image=image)["image"]
    b = eval_transform(mean, std)(image=image)["image"]
    assert torch.equal(a, b)


def test_full_strength_changes_images():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    t = train_transform([0.5] * 3, [0.25] * 3, 3, strength=1.0)
    plain = eval_transform([0.5] * 3, [0.25] * 3)(image=image)["image"]
    changed = sum(not torch.equal(t(image=image)["image"], plain) for _ in range(20))
    assert changed >= 15


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels": 3, "strength": 1.5}, r"strength must be in \[0, 1\], got 1.5"),
        ({"channels": 2, "strength": 1.0}, "channels must be 1 or 3, got 2"),
    ],
)
def test_transform_arguments_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_transform([0.5], [0.2], **kwargs)


def test_reseed_restarts_the_augmentation_stream(cache):
    ds = NpyDataset(cache, "train", train_transform(cache.mean, cache.std, 3, strength=1.0))

    def first_items(seed: int) -> torch.Tensor:
        ds.reseed(seed)
        return torch.stack([ds[i][0] for i in range(6)])

    a = first_items(5)
    assert torch.equal(a, first_items(5))  # the same seed again gives the same augmentations
    assert not torch.equal(a, first_items(6))
    ds.set_epoch(2)  # a new epoch restarts the stream too, from (seed, epoch)
    b = first_items(5)
    assert not torch.equal(a, b)
    assert torch.equal(b, first_items(5))


def test_epoch_state_defaults_and_survives_pickling(cache):
    ds = NpyDataset(cache, "train")
    assert ds.epoch == 1 and ds.strength is None
    ds.set_epoch(4)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.epoch == 4 and len(pickle.dumps(ds)) < 20_000


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda ds: ds.set_epoch(0), r"epoch=0 is invalid; allowed: an int >= 1"),
        (lambda ds: ds.set_epoch(True), r"epoch=True is invalid"),
        (lambda ds: ds.reseed(1.5), r"seed=1.5 is invalid; allowed: an int"),
    ],
)
def test_epoch_and_seed_checked(cache, call, match):
    with pytest.raises(ValueError, match=match):
        call(NpyDataset(cache, "train"))


def test_strength_schedule_arguments_checked(cache):
    ramp = StrengthRamp(0.2, 1.0, 3)
    with pytest.raises(ValueError, match="transform_for_strength and ramp go together"):
        NpyDataset(cache, "train", ramp=ramp)
    with pytest.raises(ValueError, match="either transform or transform_for_strength"):
        NpyDataset(cache, "train", eval_transform(cache.mean, cache.std), ramp=ramp,
                   transform_for_strength=lambda s: None)  # fmt: skip


@pytest.mark.parametrize("strength", [0.1, 0.5, 1.0])
def test_symmetries_keep_full_probability_while_the_rest_scales(strength):
    t = train_transform([0.5] * 3, [0.25] * 3, 3, strength=strength)
    p = {type(op).__name__: op.p for op in t.transforms}
    # Flips and right-angle rotations lose nothing from a cell image: always at p = 0.5.
    assert p["HorizontalFlip"] == p["VerticalFlip"] == p["RandomRotate90"] == 0.5
    # The transforms that interpolate or change colour ramp with the strength.
    assert p["Affine"] == pytest.approx(0.7 * strength)
    assert p["RandomBrightnessContrast"] == pytest.approx(0.5 * strength)
    assert p["HueSaturationValue"] == pytest.approx(0.4 * strength)
    grey = {type(op).__name__ for op in train_transform([0.5], [0.25], 1, strength).transforms}
    assert "VerticalFlip" not in grey and "RandomRotate90" not in grey  # MRI keeps up and down
