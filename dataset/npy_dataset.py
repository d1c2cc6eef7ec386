"""A ``torch.utils.data.Dataset`` over one split of a ``data_npy`` cache, memory-mapped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.cache import CacheInfo, load_cache
from dataset.transforms import eval_transform


class NpyDataset(Dataset):
    """Images of one split, read memory-mapped, returned as normalised CHW float tensors.

    The image array is opened lazily in each process that reads it (the main process or a
    DataLoader worker), so workers share the page cache instead of each holding a copy, and
    pickling the dataset to a worker sends paths, not pixels.

    Args:
        cache: a :class:`~dataset.cache.CacheInfo` or the path of a cache folder.
        split: ``train``, ``val`` or ``test``.
        transform: an Albumentations pipeline taking ``image=`` uint8 HWC and returning a CHW
            tensor under ``"image"``; by default normalisation with the cache's train mean/std.
    """

    def __init__(self, cache: CacheInfo | str | Path, split: str, transform=None) -> None:
        self.cache = cache if isinstance(cache, CacheInfo) else load_cache(cache)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        self.split = split
        self.images_path = self.cache.path / f"{split}_images.npy"
        self.labels = self.cache.labels(split)  # (N,) int64, small enough to hold
        self.transform = transform or eval_transform(self.cache.mean, self.cache.std)
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")  # (N, H, W, C) uint8
        return self._images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = np.array(self.images[index])  # copy one (H, W, C) image out of the map
        return self.transform(image=image)["image"], int(self.labels[index])

    def reseed(self, seed: int) -> None:
        """Seed the augmentation's random streams (Albumentations draws from its own generators,
        not from numpy's or torch's global state, so seeding those is not enough)."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed % 2**32)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None  # each worker maps the file itself
        return state
