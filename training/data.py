"""DataLoaders for training and evaluation, built from the ``data_npy`` cache."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, get_worker_info

from dataset.cache import CacheInfo, prepare
from dataset.npy_dataset import NpyDataset
from dataset.transforms import eval_transform, train_transform


def resolve_workers(requested: int, device: torch.device) -> int:
    """``-1`` (auto): 4 workers on an accelerator, none on the CPU.

    On the CPU the workers compete with the compute threads for the same cores; measured on a
    2-core machine, the main process alone delivers several times what training consumes.
    """
    if requested >= 0:
        return requested
    return 4 if device.type in ("cuda", "mps") else 0


def _reseed_worker(worker_id: int) -> None:
    # Each worker gets its own augmentation stream, derived from the loader's per-epoch seed.
    info = get_worker_info()
    info.dataset.reseed(info.seed)


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


def make_loaders(
    cache: CacheInfo,
    cfg,
    device: torch.device,
    generator: torch.Generator,
) -> dict[str, DataLoader]:
    """``train`` (shuffled, augmented) and ``val`` loaders for a ``TrainConfig``."""
    data = cfg.data
    if data.augment:
        train_tf = train_transform(cache.mean, cache.std, cache.channels, data.aug_strength)
    else:
        train_tf = eval_transform(cache.mean, cache.std)
    workers = resolve_workers(data.workers, device)
    common = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0 and device.type == "cuda",
        "worker_init_fn": _reseed_worker if workers else None,
    }
    train = DataLoader(
        NpyDataset(cache, "train", train_tf),
        batch_size=cfg.optim.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=False,
        **common,
    )
    val = DataLoader(NpyDataset(cache, "val"), batch_size=max(256, cfg.optim.batch_size), **common)
    return {"train": train, "val": val}
