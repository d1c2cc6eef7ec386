"""DataLoaders for training and evaluation, built from the ``data_npy`` cache."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler

from dataset.cache import CacheInfo, prepare
from dataset.npy_dataset import NpyDataset
from dataset.transforms import StrengthRamp, eval_transform, train_transform
from training.balance import make_balanced_sampler


def resolve_workers(requested: int, device: torch.device) -> int:
    """``-1`` (auto): 4 workers on an accelerator, none on the CPU.

    On the CPU the workers compete with the compute threads for the same cores; measured on a
    2-core machine, the main process alone delivers several times what training consumes.
    """
    if requested >= 0:
        return requested
    return 4 if device.type in ("cuda", "mps") else 0


def prepare_cache(data_cfg, progress: bool = True) -> CacheInfo:
    """Build or reuse the cache that ``data_cfg`` (a ``DataConfig``) names."""
    cache, _ = prepare(
        data_cfg.source,
        data_cfg.root,
        val_fraction=data_cfg.val_fraction,
        seed=data_cfg.split_seed,
        drop_leaked_test=data_cfg.drop_leaked_test,
        progress=progress,
    )
    return cache


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of ``sampler``, whose order depends on the generator's seed, not on worker reuse.

    A DataLoader draws one number from its ``generator`` (its workers' base seed) each time it
    makes an iterator: every epoch, except with persistent workers, where it makes one only in
    the first epoch. A sampler drawing from the same generator therefore gets a different
    order from epoch 2 on when workers persist, and a resumed run differs from an uninterrupted
    one. When an epoch starts with the generator just seeded and untouched (the persistent
    case), this sampler makes that one draw itself, so the order after ``manual_seed(s)`` is the
    same either way.

    Args:
        sampler: yields the epoch's sample indices (shuffled, or weighted by class) and draws
            from ``generator``.
        batch_size: indices per batch, an int >= 1.
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        generator: the generator ``sampler`` and the DataLoader share; ``None`` for none.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an int >= 1")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.generator = generator

    def _as_after_new_iterator(self) -> None:
        """Make the base-seed draw of a new DataLoader iterator if none followed the seeding."""
        g = self.generator
        if g is None:
            return
        just_seeded = torch.Generator(device=g.device).manual_seed(g.initial_seed())
        if torch.equal(g.get_state(), just_seeded.get_state()):
            torch.empty((), dtype=torch.int64).random_(generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator function: nothing runs until the first batch is asked for, after the
        # DataLoader's own draw (it calls iter() on the sampler before and after that draw).
        self._as_after_new_iterator()
        batch: list[int] = []
        for index in self.sampler:
            batch.append(int(index))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def train_dataset(cache: CacheInfo, data_cfg) -> NpyDataset:
    """The train split with the augmentation of ``data_cfg`` (a ``DataConfig``).

    With ``augment`` on, the strength follows the ramp from ``aug_start_strength`` (epoch 1) to
    ``aug_strength`` over ``aug_ramp_epochs``; :meth:`NpyDataset.set_epoch` selects the epoch.
    """
    if not data_cfg.augment:
        return NpyDataset(cache, "train", eval_transform(cache.mean, cache.std))
    ramp = StrengthRamp(
        data_cfg.aug_start_strength, data_cfg.aug_strength, data_cfg.aug_ramp_epochs
    )
    factory = partial(train_transform, tuple(cache.mean), tuple(cache.std), cache.channels)
    return NpyDataset(cache, "train", transform_for_strength=factory, ramp=ramp)


def make_loaders(
    cache: CacheInfo,
    cfg,
    device: torch.device,
    generator: torch.Generator,
    *,
    persistent_workers: bool | None = None,
) -> dict[str, DataLoader]:
    """``train`` (shuffled or class-balanced, augmented) and ``val`` loaders for a ``TrainConfig``.

    The train loader draws its order from ``generator`` (also its ``.generator``): uniformly
    without replacement, or with ``cfg.data.balanced_sampling`` by class-balanced weights with
    replacement (:func:`training.balance.make_balanced_sampler`), N draws an epoch either way.
    Before each epoch, reseed ``generator`` and call the train dataset's ``set_epoch(epoch)`` and
    ``reseed(seed)``; the epoch's batches then depend on (seed, epoch) and the worker count only.

    Args:
        cache: the dataset cache.
        cfg: a ``TrainConfig``.
        device: where the batches go (workers and pinned memory are chosen for it).
        generator: random generator of the train order.
        persistent_workers: keep worker processes between epochs; ``None`` keeps them on CUDA.
    """
    data = cfg.data
    workers = resolve_workers(data.workers, device)
    if persistent_workers is None:
        persistent_workers = device.type == "cuda"
    common = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0 and persistent_workers,
    }
    train_set = train_dataset(cache, data)
    if data.balanced_sampling:
        sampler = make_balanced_sampler(train_set.labels, generator=generator)
    else:
        sampler = RandomSampler(train_set, generator=generator)
    train = DataLoader(
        train_set,
        batch_sampler=EpochBatchSampler(sampler, cfg.optim.batch_size, generator=generator),
        generator=generator,
        **common,
    )
    val = DataLoader(NpyDataset(cache, "val"), batch_size=max(256, cfg.optim.batch_size), **common)
    return {"train": train, "val": val}
