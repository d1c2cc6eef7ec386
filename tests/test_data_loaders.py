"""Augmentation strength schedule, epoch state reaching DataLoader workers, and the loaders."""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, get_worker_info

from dataset.cache import prepare
from dataset.npy_dataset import NpyDataset
from dataset.transforms import StrengthRamp, augment_strength, train_transform
from training.config.schema import TrainConfig
from training.engine.data import EpochBatchSampler, make_loaders

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- strength schedule


@pytest.mark.parametrize(
    "epoch, expected",
    [(1, 0.2), (2, 0.4), (3, 0.6), (4, 0.8), (5, 1.0), (6, 1.0), (50, 1.0)],
)
def test_strength_ramps_linearly_then_holds(epoch, expected):
    assert augment_strength(epoch, 0.2, 1.0, 4) == pytest.approx(expected)


def test_strength_ramp_ends_exactly_on_final_and_can_fall():
    assert augment_strength(11, 0.3, 0.7, 10) == 0.7
    assert augment_strength(3, 1.0, 0.0, 4) == pytest.approx(0.5)
    assert [augment_strength(e, 0.3, 0.8, 0) for e in (1, 2, 9)] == [0.8, 0.8, 0.8]


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 0.3, 1.0, 5), r"epoch=0 is invalid; allowed: an int >= 1"),
        ((1.5, 0.3, 1.0, 5), r"epoch=1.5 is invalid"),
        ((1, -0.1, 1.0, 5), r"start strength=-0.1 is invalid; allowed: a number in \[0, 1\]"),
        ((1, 0.3, 1.2, 5), r"final strength=1.2 is invalid"),
        ((1, 0.3, float("nan"), 5), r"final strength=nan is invalid"),
        ((1, 0.3, 1.0, -1), r"ramp_epochs=-1 is invalid; allowed: an int >= 0"),
        ((1, 0.3, 1.0, 2.0), r"ramp_epochs=2.0 is invalid"),
    ],
)
def test_strength_arguments_checked(args, match):
    with pytest.raises(ValueError, match=match):
        augment_strength(*args)


def test_strength_ramp_object_validates_and_matches_function():
    ramp = StrengthRamp(0.3, 0.9, 3)
    assert [ramp(e) for e in (1, 2, 4, 7)] == [
        augment_strength(e, 0.3, 0.9, 3) for e in (1, 2, 4, 7)
    ]
    with pytest.raises(ValueError, match="ramp_epochs=-2 is invalid"):
        StrengthRamp(0.3, 0.9, -2)


# --------------------------------------------------------------------------- epoch in workers


class StrengthProbe:
    """A pipeline stand-in whose output reports the strength it was built for, where it ran and
    the seed its stream was last given."""

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.seed = -1

    def set_random_seed(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, image: np.ndarray) -> dict:
        info = get_worker_info()
        worker = -1 if info is None else info.id
        report = [self.strength, worker, os.getpid(), self.seed]
        return {"image": torch.tensor(report, dtype=torch.float64)}


@pytest.fixture
def cache(npz_factory, tmp_path):
    return prepare(npz_factory(n=(16, 4, 4)), tmp_path / "cache")[0]


def probe_dataset(cache) -> NpyDataset:
    ramp = StrengthRamp(0.2, 1.0, 4)
    return NpyDataset(cache, "train", transform_for_strength=StrengthProbe, ramp=ramp)


def run_epochs(loader: DataLoader, epochs, seed: int = 7) -> list[torch.Tensor]:
    """Everything one loader yields in each epoch, with the per-epoch calls a trainer makes."""
    out = []
    for epoch in epochs:
        loader.generator.manual_seed(seed * 1000 + epoch)
        loader.dataset.set_epoch(epoch)
        loader.dataset.reseed(seed * 1000 + epoch)
        out.append(torch.cat([x for x, _ in loader]))
    return out


def test_set_epoch_reaches_persistent_workers(cache):
    ds = probe_dataset(cache)
    loader = DataLoader(
        ds,
        batch_size=4,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="fork",
        generator=torch.Generator(),
    )
    first, second = run_epochs(loader, [1, 3])
    # Each epoch's items were built at that epoch's strength, inside the workers.
    assert first[:, 0].tolist() == [pytest.approx(0.2)] * 16
    assert second[:, 0].tolist() == [pytest.approx(0.6)] * 16
    assert set(first[:, 1].tolist()) == {0.0, 1.0}
    # Same worker processes in both epochs, none of them this one.
    pids = set(first[:, 2].tolist())
    assert pids == set(second[:, 2].tolist()) and len(pids) == 2 and os.getpid() not in pids
    # Every worker restarted its stream for the new epoch, and the two workers' streams differ.
    seeds = [set(e[e[:, 1] == k, 3].tolist()) for e in (first, second) for k in (0, 1)]
    assert all(len(s) == 1 for s in seeds)
    assert len(set.union(*seeds)) == 4
    assert ds.strength == pytest.approx(0.6)


def test_set_epoch_reaches_persistent_spawned_worker(cache):
    # A spawned worker receives a pickled copy of the dataset; the epoch must still get there.
    loader = DataLoader(
        probe_dataset(cache),
        batch_size=8,
        num_workers=1,
        persistent_workers=True,
        multiprocessing_context="spawn",
        generator=torch.Generator(),
    )
    first, second = run_epochs(loader, [2, 5])
    assert first[:, 0].tolist() == [pytest.approx(0.4)] * 16
    assert second[:, 0].tolist() == [1.0] * 16
    assert set(first[:, 2].tolist()) == set(second[:, 2].tolist()) != {os.getpid()}
    assert len(set(first[:, 3].tolist()) | set(second[:, 3].tolist())) == 2


def test_pipelines_built_once_per_strength_in_main_process(cache):
    built = []

    def factory(strength):
        built.append(strength)
        return StrengthProbe(strength)

    ds = NpyDataset(cache, "train", transform_for_strength=factory, ramp=StrengthRamp(0.5, 1, 2))
    for epoch in (1, 1, 2, 3, 4, 5):
        ds.set_epoch(epoch)
        strengths = {ds[i][0][0].item() for i in range(len(ds))}
        assert strengths == {ds.strength}
    assert built == [0.5, 0.75, 1.0]


# --------------------------------------------------------------------------- make_loaders


def loader_config(workers: int = 0, **data) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.workers = workers
    cfg.data.aug_strength, cfg.data.aug_start_strength, cfg.data.aug_ramp_epochs = 1.0, 0.5, 2
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.optim.batch_size = 4
    return cfg


def epochs_of(cache, cfg, persistent: bool, epochs=(1, 2, 3), seed: int = 7):
    loaders = make_loaders(cache, cfg, CPU, torch.Generator(), persistent_workers=persistent)
    assert loaders["train"].persistent_workers == (persistent and cfg.data.workers > 0)
    return run_epochs(loaders["train"], epochs, seed)


@pytest.mark.parametrize("balanced", [False, True])
def test_persistent_workers_give_the_same_batches_as_fresh_ones(cache, balanced):
    cfg = loader_config(workers=2, balanced_sampling=balanced)
    persistent = epochs_of(cache, cfg, persistent=True)
    fresh = epochs_of(cache, cfg, persistent=False)
    for a, b in zip(persistent, fresh, strict=True):
        assert torch.equal(a, b)
    # Augmentation is on and differs between epochs, so the equality above means something.
    assert not torch.equal(persistent[1], persistent[2])
    # Same order without augmentation (the order comes from the generator alone), other pixels.
    plain_cfg = loader_config(augment=False, balanced_sampling=balanced)
    plain = make_loaders(cache, plain_cfg, CPU, torch.Generator())["train"]
    for a, b in zip(persistent, run_epochs(plain, (1, 2, 3)), strict=True):
        assert a.shape == b.shape and not torch.equal(a, b)


def test_single_process_loader_is_reproducible_given_seed_and_epoch(cache):
    cfg = loader_config(workers=0)
    a = epochs_of(cache, cfg, persistent=False, epochs=(1, 2))
    b = epochs_of(cache, cfg, persistent=False, epochs=(1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Reseeding the same dataset with the same seed restarts its stream.
    loader = make_loaders(cache, cfg, CPU, torch.Generator())["train"]
    assert torch.equal(run_epochs(loader, [2])[0], run_epochs(loader, [2])[0])
    other = epochs_of(cache, cfg, persistent=False, epochs=(1, 2), seed=8)
    assert not torch.equal(a[1], other[1])


def test_workers_draw_independent_augmentations(npz_factory, tmp_path):
    # Every train image is the same, so two workers with one stream would yield equal batches.
    image = np.random.default_rng(0).integers(0, 256, size=(1, 8, 8, 3), dtype=np.uint8)
    path = npz_factory(n=(8, 4, 4), train_images=np.repeat(image, 8, axis=0))
    cache = prepare(path, tmp_path / "same")[0]
    cfg = loader_config(workers=2, aug_start_strength=1.0)
    batches = list(
        make_loaders(cache, cfg, CPU, torch.Generator(), persistent_workers=True)["train"]
    )
    assert len(batches) == 2 and not torch.equal(batches[0][0], batches[1][0])


def test_strength_reported_for_the_current_epoch(cache):
    train = make_loaders(cache, loader_config(), CPU, torch.Generator())["train"]
    values = []
    for epoch in (1, 2, 3, 9):
        train.dataset.set_epoch(epoch)
        values.append(train.dataset.strength)
    assert values == [0.5, 0.75, 1.0, 1.0]
    plain = make_loaders(cache, loader_config(augment=False), CPU, torch.Generator())["train"]
    assert plain.dataset.strength is None


def test_balanced_sampling_draws_classes_about_equally(npz_factory, tmp_path):
    labels = np.array([0] * 90 + [1] * 10, dtype=np.int64)
    path = npz_factory(n=(100, 4, 4), classes=2, train_labels=labels)
    cache = prepare(path, tmp_path / "imbalanced")[0]
    drawn = {}
    for balanced in (False, True):
        cfg = loader_config(balanced_sampling=balanced, augment=False)
        cfg.optim.batch_size = 50
        train = make_loaders(cache, cfg, CPU, torch.Generator().manual_seed(0))["train"]
        assert len(train) == 2  # N draws an epoch either way
        drawn[balanced] = torch.cat([y for _ in range(40) for _, y in train])  # 4000 draws
    assert drawn[False].float().mean().item() == pytest.approx(0.1)  # every image once an epoch
    share = drawn[True].float().mean().item()
    assert 0.45 < share < 0.55  # binomial sd 0.008: the seeded draw is 6 sd inside either edge


# --------------------------------------------------------------------------- batch sampler


def test_epoch_batch_sampler_batches_every_index():
    gen = torch.Generator().manual_seed(3)
    sampler = EpochBatchSampler(RandomSampler(range(10), generator=gen), 4, generator=gen)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2] and len(sampler) == 3
    assert sorted(sum(batches, [])) == list(range(10))
    dropped = EpochBatchSampler(RandomSampler(range(10), generator=gen), 4, drop_last=True)
    assert [len(b) for b in dropped] == [4, 4] and len(dropped) == 2
    with pytest.raises(ValueError, match="batch_size=0 is invalid; allowed: an int >= 1"):
        EpochBatchSampler(RandomSampler(range(10)), 0)


def test_epoch_batch_sampler_orders_as_a_new_loader_iterator_would():
    # Just seeded: it makes the DataLoader's base-seed draw itself before shuffling.
    gen = torch.Generator().manual_seed(5)
    order = sum(EpochBatchSampler(RandomSampler(range(10), generator=gen), 4, generator=gen), [])
    ref = torch.Generator().manual_seed(5)
    torch.empty((), dtype=torch.int64).random_(generator=ref)
    assert order == torch.randperm(10, generator=ref).tolist()
    # Already drawn from since seeding (by a new DataLoader iterator): no extra draw.
    gen.manual_seed(5)
    torch.empty((), dtype=torch.int64).random_(generator=gen)
    again = sum(EpochBatchSampler(RandomSampler(range(10), generator=gen), 4, generator=gen), [])
    assert again == order


def test_train_order_is_that_of_a_plain_shuffled_loader(cache):
    train = make_loaders(cache, loader_config(augment=False), CPU, torch.Generator())["train"]
    plain = DataLoader(train.dataset, batch_size=4, shuffle=True, generator=torch.Generator())
    for epoch in (1, 2):
        orders = []
        for loader in (train, plain):
            loader.generator.manual_seed(epoch)
            orders.append(torch.cat([y for _, y in loader]).tolist())
        assert orders[0] == orders[1]


def test_train_transform_factory_pickles_for_spawned_workers(cache):
    import pickle

    factory = partial(train_transform, tuple(cache.mean), tuple(cache.std), cache.channels)
    ds = NpyDataset(cache, "train", transform_for_strength=factory, ramp=StrengthRamp(0, 1, 3))
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    clone.set_epoch(3)
    assert clone.strength == pytest.approx(2 / 3) and clone[0][0].shape == (3, 8, 8)


def test_data_image_size_resizes_a_folder_into_its_own_cache(folder_factory, tmp_path):
    from training.config.schema import DataConfig
    from training.engine.data import prepare_cache

    folder = folder_factory({"train": {"a": 6, "b": 6}, "test": {"a": 3, "b": 3}}, size=(8, 8))
    root = str(tmp_path / "cache")
    small = prepare_cache(DataConfig(source=str(folder), root=root, image_size=4), progress=False)
    native = prepare_cache(DataConfig(source=str(folder), root=root), progress=False)
    assert (small.image_size, native.image_size) == (4, 8)
    assert small.path.name == "images_4px" and native.path.name == "images"


def test_data_image_size_is_refused_for_sources_that_are_not_folders(npz_factory, tmp_path):
    from training.config.schema import ConfigError, DataConfig
    from training.engine.data import prepare_cache

    npz = npz_factory()
    with pytest.raises(ConfigError, match=r"data.image_size=4 is invalid .*only image folders"):
        prepare_cache(DataConfig(source=str(npz), root=str(tmp_path), image_size=4))
