"""A ``torch.utils.data.Dataset`` over one split of a ``data_npy`` cache, memory-mapped.

The epoch and the augmentation seed live in a small shared-memory tensor, so that
:meth:`NpyDataset.set_epoch` and :meth:`NpyDataset.reseed`, called in the main process between
epochs, reach DataLoader workers too, including persistent ones started in an earlier epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from dataset.cache import CacheInfo, load_cache
from dataset.transforms import StrengthRamp, eval_transform

# Slots of the shared state tensor.
_EPOCH, _SEED, _GENERATION = 0, 1, 2
_UNSEEDED = -1  # no reseed() yet: workers fall back to the DataLoader's per-worker seed
_SEED_RANGE = 2**63  # seeds are stored in an int64


def _stream_seed(*entropy: int) -> int:
    """A 32-bit seed mixed from non-negative integers (independent streams for nearby inputs)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class NpyDataset(Dataset):
    """Images of one split, read memory-mapped, returned as normalised CHW float tensors.

    The image array is opened lazily in each process that reads it (the main process or a
    DataLoader worker), so workers share the page cache instead of each holding a copy, and
    pickling the dataset to a worker sends paths, not pixels.

    The augmentation is either one fixed ``transform`` or a strength schedule: a factory
    ``transform_for_strength(strength)`` and a :class:`~dataset.transforms.StrengthRamp`; then
    every item uses the pipeline of the current epoch's strength (built once per strength and
    process). Call :meth:`set_epoch` and :meth:`reseed` in the main process before each epoch.
    Each process (the main one, or every worker) restarts its augmentation stream the first time
    it reads an item after either call, from (seed, epoch, worker id), so an epoch's
    augmentation depends on those alone, whether workers are persistent or not.

    Args:
        cache: a :class:`~dataset.cache.CacheInfo` or the path of a cache folder; a
            :class:`~dataset.subset.CacheSubset` gives its rows only, with its renumbered labels.
        split: ``train``, ``val`` or ``test``.
        transform: an Albumentations pipeline taking ``image=`` uint8 HWC and returning a CHW
            tensor under ``"image"``; by default normalisation with the cache's train mean/std.
        transform_for_strength: builds the pipeline for a strength in [0, 1] (for example
            ``functools.partial(train_transform, mean, std, channels)``); picklable when the
            DataLoader starts workers with ``spawn``. Needs ``ramp``; excludes ``transform``.
        ramp: the strength of every epoch; needs ``transform_for_strength``.
    """

    def __init__(
        self,
        cache: CacheInfo | str | Path,
        split: str,
        transform: Callable | None = None,
        *,
        transform_for_strength: Callable[[float], Callable] | None = None,
        ramp: StrengthRamp | None = None,
    ) -> None:
        self.cache = cache if isinstance(cache, CacheInfo) else load_cache(cache)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        if (transform_for_strength is None) != (ramp is None):
            raise ValueError("transform_for_strength and ramp go together; got only one of them")
        if transform is not None and ramp is not None:
            raise ValueError("give either transform or transform_for_strength with ramp, not both")
        self.split = split
        self.images_path = self.cache.path / f"{split}_images.npy"
        self.labels = self.cache.labels(split)  # (N,) int64, small enough to hold
        # A subset cache reads some rows of the full file; its labels are already renumbered.
        self.rows = self.cache.rows(split)
        self.transform_for_strength = transform_for_strength
        self.ramp = ramp
        if ramp is None:
            self._fixed = transform or eval_transform(self.cache.mean, self.cache.std)
        else:
            self._fixed = None
        # [epoch, seed, generation]: written by the main process, read by every worker.
        self._state = torch.tensor([1, _UNSEEDED, 0], dtype=torch.int64).share_memory_()
        self._pipelines: dict[float, Callable] = {}  # per process: strength -> pipeline
        self._seeded: tuple[int, int] | None = None  # (pid, generation) the stream was seeded at
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")  # (N, H, W, C) uint8
        return self._images

    @property
    def epoch(self) -> int:
        """The epoch last given to :meth:`set_epoch` (1 before any call)."""
        return int(self._state[_EPOCH])

    @property
    def strength(self) -> float | None:
        """Augmentation strength of the current epoch; ``None`` without a strength schedule."""
        return None if self.ramp is None else self.ramp(self.epoch)

    @property
    def transform(self) -> Callable:
        """The pipeline items of the current epoch go through (in this process)."""
        if self.ramp is None:
            return self._fixed
        strength = round(self.ramp(self.epoch), 6)  # one pipeline per distinct strength
        if strength not in self._pipelines:
            self._pipelines[strength] = self.transform_for_strength(strength)
        return self._pipelines[strength]

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` (counted from 1) current in this process and in every worker.

        Call it in the main process between epochs, before iterating the DataLoader.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise ValueError(f"epoch={epoch!r} is invalid; allowed: an int >= 1")
        self._state[_EPOCH] = epoch
        self._state[_GENERATION] += 1

    def reseed(self, seed: int) -> None:
        """Restart the augmentation's random streams from ``seed`` in this process and workers.

        Albumentations draws from its own generators, not from numpy's or torch's global state,
        so seeding those is not enough. Each process seeds its stream from (seed, epoch, worker
        id) at its next item. Call it in the main process between epochs.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is invalid; allowed: an int")
        self._state[_SEED] = seed % _SEED_RANGE
        self._state[_GENERATION] += 1

    def _current_transform(self) -> Callable:
        """The current pipeline, its stream restarted if the epoch or seed changed."""
        epoch, seed, generation = self._state.tolist()
        transform = self.transform
        key = (os.getpid(), generation)
        if key != self._seeded:
            self._seeded = key
            self._seed_stream(transform, epoch, seed)
        return transform

    @staticmethod
    def _seed_stream(transform: Callable, epoch: int, seed: int) -> None:
        if not hasattr(transform, "set_random_seed"):
            return
        info = get_worker_info()
        if seed == _UNSEEDED:
            if info is None:
                return  # main process, never reseeded: keep the pipeline's own stream
            # The DataLoader's seed differs per worker (and per epoch unless workers persist).
            transform.set_random_seed(_stream_seed(info.seed % 2**64, epoch))
            return
        slot = 0 if info is None else info.id + 1
        transform.set_random_seed(_stream_seed(seed, epoch, slot))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = index if self.rows is None else int(self.rows[index])
        image = np.array(self.images[row])  # copy one (H, W, C) image out of the map
        return self._current_transform()(image=image)["image"], int(self.labels[index])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None  # each worker maps the file itself
        state["_pipelines"] = {}  # each process builds its own pipelines
        state["_seeded"] = None
        return state
