"""DataLoaders for training and evaluation, built from the ``data_npy`` cache.

- :func:`make_loaders`: train and val loaders; the train loader's batches come from
  :class:`EpochBatchSampler`, which folds a last batch of one image into the one before it.
- :func:`sample_weights` and :func:`make_balanced_sampler`: draw training images with
  probability proportional to their class weight (inverse frequency, or the effective number of
  samples of Cui et al. 2019), so that classes are balanced in expectation.
- :func:`double_correction_warning`: a class-weighted loss on top of balanced sampling corrects
  the imbalance twice and over-favours the rare classes; this says so.
- :func:`prepare_cache` and :func:`sized_cache_name`: the run's cache, and the name of a resized
  folder's cache (the report finds the cache of a run by it too).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

import losses
from dataset.cache import CacheInfo, prepare
from dataset.folds import PooledNpyDataset
from dataset.npy_dataset import NpyDataset
from dataset.subset import subset_cache
from dataset.transforms import StrengthRamp, eval_transform, train_transform
from training.config.schema import MIN_TRAIN_BATCH, ConfigError


def resolve_workers(requested: int, device: torch.device) -> int:
    """``-1`` (auto): 4 workers on an accelerator, none on the CPU.

    On the CPU the workers compete with the compute threads for the same cores; measured on a
    2-core machine, the main process alone delivers several times what training consumes.
    """
    if requested >= 0:
        return requested
    return 4 if device.type in ("cuda", "mps") else 0


def sized_cache_name(folder: str | Path, size: int) -> str:
    """The cache folder's name for an image folder resized to ``size`` px: its own name per
    size, so a folder trained at two sizes keeps both caches."""
    return f"{Path(folder).resolve().name}_{size}px"


def prepare_cache(data_cfg, progress: bool = True) -> CacheInfo:
    """Build or reuse the cache that ``data_cfg`` (a ``DataConfig``) names.

    With ``data.classes`` or ``data.train_fraction`` set, the result is a
    :class:`~dataset.subset.CacheSubset` of it: the same interface, so the class weights, the
    balanced sampler, the counts table and the checkpoint's class names all see the subset, while
    the images are read from the full cache (no cache is written for a subset).

    Raises:
        ConfigError: ``data.image_size`` set for a source that is not an image folder, or
            ``data.classes`` naming classes the cache lacks.
    """
    size, name = data_cfg.image_size or None, None
    if size is not None:
        folder = Path(data_cfg.source)
        if not folder.is_dir():
            raise ConfigError(
                f"data.image_size={size} is invalid for data.source={data_cfg.source!r}; "
                "allowed: 0 (only image folders are resized; MedMNIST names choose a size "
                "themselves, e.g. bloodmnist_64)"
            )
        name = sized_cache_name(folder, size)
    cache, _ = prepare(
        data_cfg.source,
        data_cfg.root,
        name=name,
        val_fraction=data_cfg.val_fraction,
        seed=data_cfg.split_seed,
        image_size=size,
        drop_leaked_test=data_cfg.drop_leaked_test,
        progress=progress,
    )
    return select_subset(cache, data_cfg)


def select_subset(cache: CacheInfo, data_cfg) -> CacheInfo:
    """``cache`` restricted to ``data_cfg.classes`` and ``data_cfg.train_fraction``, and with
    ``data_cfg.cv_folds`` its train and val pooled and split into folds (val: ``cv_fold``).

    The fraction's permutations and the folds are seeded by ``data_cfg.split_seed``, so runs
    with one seed train on the same images whatever their ``run.seed``.

    Raises:
        ConfigError: unknown, repeated or too few class names, or a class with fewer distinct
            images than ``data.cv_folds``, in one line.
    """
    classes = list(getattr(data_cfg, "classes", []) or [])
    fraction = float(getattr(data_cfg, "train_fraction", 1.0))
    folds = int(getattr(data_cfg, "cv_folds", 0) or 0)
    fold = int(getattr(data_cfg, "cv_fold", 0) or 0)
    try:
        return subset_cache(cache, classes, fraction, data_cfg.split_seed, folds, fold)
    except ValueError as error:
        text = str(error)
        if text.startswith("cv fold"):
            key = "data.cv_folds"
        elif text.startswith("train fraction"):
            key = "data.train_fraction"
        else:
            key = "data.classes"
        raise ConfigError(f"{key}: {error} (dataset {cache.name})") from None


def split_dataset(cache: CacheInfo, split: str, transform=None, **schedule) -> NpyDataset:
    """:class:`NpyDataset` of ``split``, or :class:`~dataset.folds.PooledNpyDataset` when the
    split is a cross-validation fold's (its rows index train and val pooled)."""
    pooled = split in getattr(cache, "pooled", ())
    kind = PooledNpyDataset if pooled else NpyDataset
    return kind(cache, split, transform, **schedule)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of ``sampler``, whose order depends on the generator's seed, not on worker reuse.

    A DataLoader draws one number from its ``generator`` (its workers' base seed) each time it
    makes an iterator: every epoch, except with persistent workers, where it makes one only in
    the first epoch. A sampler drawing from the same generator therefore gets a different
    order from epoch 2 on when workers persist, and a resumed run differs from an uninterrupted
    one. When an epoch starts with the generator just seeded and untouched (the persistent
    case), this sampler makes that one draw itself, so the order after ``manual_seed(s)`` is the
    same either way.

    A last batch shorter than ``min_batch`` joins the batch before it (10 indices, batch 3,
    ``min_batch`` 2: 3, 3, 4), so no batch but an epoch's only one is below ``min_batch``.

    Args:
        sampler: yields the epoch's sample indices (shuffled, or weighted by class) and draws
            from ``generator``.
        batch_size: indices per batch, an int >= 1.
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        generator: the generator ``sampler`` and the DataLoader share; ``None`` for none.
        min_batch: the smallest last batch kept apart, an int in 1..batch_size; 1 never folds.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        min_batch: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an int >= 1")
        if isinstance(min_batch, bool) or not isinstance(min_batch, int):
            raise ValueError(f"min_batch={min_batch!r} is invalid; allowed: an int")
        if not 1 <= min_batch <= batch_size:
            raise ValueError(f"min_batch={min_batch} is invalid; allowed: 1..{batch_size}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.generator = generator
        self.min_batch = min_batch

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
        held: list[int] | None = None  # a full batch, kept until the next one reaches min_batch
        batch: list[int] = []
        for index in self.sampler:
            batch.append(int(index))
            if held is not None and len(batch) >= self.min_batch:
                yield held
                held = None
            if len(batch) == self.batch_size:
                held, batch = batch, []
        if batch and len(batch) < self.min_batch and held is not None and not self.drop_last:
            held, batch = held + batch, []
        if held is not None:
            yield held
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        folded = 0 < rest < self.min_batch and full > 0
        return full if self.drop_last or rest == 0 or folded else full + 1


class Shard:
    """Which share of each batch this process takes: the ``rank``-th of every ``size`` indices.

    One object is shared by a run's train and val samplers, so that the end phase, which runs
    on rank 0 alone, can turn sharding off for both (:meth:`whole`).
    """

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank={rank} is invalid for {size} processes; allowed: 0..{size - 1}")
        self.rank, self.size = rank, size

    def whole(self) -> None:
        """From now on every process takes every index (a world of one)."""
        self.rank, self.size = 0, 1

    def take(self, indices: list[int]) -> list[int]:
        return indices[self.rank :: self.size]


class ShardedBatches(Sampler[list[int]]):
    """This process's share of each batch of ``batches``: the global batch is the batch a
    1-process run trains on, drawn from the same (seed, epoch) order, and each of the N
    processes takes every N-th of its images.

    Unlike ``DistributedSampler``, which shuffles and splits the dataset itself, this keeps
    whatever ``batches`` draws (uniform or class-balanced, with the last-batch fold), so a
    run's order, its step count and its schedule do not depend on how many processes train
    it, and a run resumes with another number of processes at the same batch.
    """

    def __init__(self, batches: Sampler[list[int]], shard: Shard) -> None:
        self.batches, self.shard = batches, shard

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield self.shard.take(batch)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


class ShardedIndices(Sampler[int]):
    """Every ``shard.size``-th index of ``0..n-1`` from ``shard.rank`` on, in order: a process's
    share of an evaluation set, whose predictions are gathered afterwards (no padding, so no
    image counts twice)."""

    def __init__(self, n: int, shard: Shard) -> None:
        self.n, self.shard = n, shard

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.shard.rank, self.n, self.shard.size))

    def __len__(self) -> int:
        return len(range(self.shard.rank, self.n, self.shard.size))


def train_dataset(cache: CacheInfo, data_cfg) -> NpyDataset:
    """The train split with the augmentation of ``data_cfg`` (a ``DataConfig``).

    With ``augment`` on, the strength follows the ramp from ``aug_start_strength`` (epoch 1) to
    ``aug_strength`` over ``aug_ramp_epochs``; :meth:`NpyDataset.set_epoch` selects the epoch.
    """
    if not data_cfg.augment:
        return split_dataset(cache, "train", eval_transform(cache.mean, cache.std))
    ramp = StrengthRamp(
        data_cfg.aug_start_strength, data_cfg.aug_strength, data_cfg.aug_ramp_epochs
    )
    factory = partial(train_transform, tuple(cache.mean), tuple(cache.std), cache.channels)
    return split_dataset(cache, "train", transform_for_strength=factory, ramp=ramp)


def make_loaders(
    cache: CacheInfo,
    cfg,
    device: torch.device,
    generator: torch.Generator,
    *,
    persistent_workers: bool | None = None,
    shard: Shard | None = None,
) -> dict[str, DataLoader]:
    """``train`` (shuffled or class-balanced, augmented) and ``val`` loaders for a ``TrainConfig``.

    The train loader draws its order from ``generator`` (also its ``.generator``): uniformly
    without replacement, or with ``cfg.data.balanced_sampling`` by class-balanced weights with
    replacement (:func:`training.balance.make_balanced_sampler`), N draws an epoch either way.
    Before each epoch, reseed ``generator`` and call the train dataset's ``set_epoch(epoch)`` and
    ``reseed(seed)``; the epoch's batches then depend on (seed, epoch) and the worker count only.
    A last train batch of one image joins the batch before it (see :data:`MIN_TRAIN_BATCH`), so
    an epoch has ``N // batch_size`` batches when ``N % batch_size == 1``.

    Args:
        cache: the dataset cache.
        cfg: a ``TrainConfig``.
        device: where the batches go (workers and pinned memory are chosen for it).
        generator: random generator of the train order.
        persistent_workers: keep worker processes between epochs; ``None`` keeps them on CUDA.
        shard: this process's share of each batch when several train one model
            (:class:`ShardedBatches`); ``optim.batch_size`` is then the global batch, split
            evenly. ``None``: a world of one.

    Raises:
        ConfigError: ``optim.batch_size`` below :data:`MIN_TRAIN_BATCH` per process, or not a
            multiple of the number of processes.
    """
    data = cfg.data
    batch_size = cfg.optim.batch_size
    shard = shard or Shard()
    if batch_size < MIN_TRAIN_BATCH * shard.size or batch_size % shard.size:
        each = "" if shard.size == 1 else f" for {shard.size} processes"
        allowed = (
            f"an int >= {MIN_TRAIN_BATCH}"
            if shard.size == 1
            else (
                f"a multiple of {shard.size} that is >= {MIN_TRAIN_BATCH * shard.size} (the global"
                " batch, split evenly across the processes)"
            )
        )
        raise ConfigError(
            f"optim.batch_size={batch_size!r} is invalid{each}; allowed: {allowed} "
            "(the model's BatchNorm needs two images per training batch)"
        )
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
    # A last batch of one image is folded into the one before, not dropped: every image still
    # trains every epoch and the balanced sampler's N draws are all used; the batch count the
    # schedule and the accumulation groups are computed from is len(loader) either way, and the
    # batches stay a function of the sampler's order, i.e. of (seed, epoch), so a resumed epoch
    # replays them. The cost is one image more in one batch of the epoch. Inside an
    # accumulation group the folded micro-batch's images weigh 1/(B+1) instead of 1/B, the same
    # small unevenness that any shorter last batch already brings.
    # Sharded, the folded last batch must still leave each process two images.
    least = MIN_TRAIN_BATCH * shard.size
    batches = EpochBatchSampler(sampler, batch_size, generator=generator, min_batch=least)
    train = DataLoader(
        train_set,
        batch_sampler=ShardedBatches(batches, shard) if shard.size > 1 else batches,
        generator=generator,
        **common,
    )
    val_set = split_dataset(cache, "val")
    val = DataLoader(
        val_set,
        batch_size=max(256, batch_size // shard.size),
        sampler=ShardedIndices(len(val_set), shard) if shard.size > 1 else None,
        **common,
    )
    return {"train": train, "val": val}


def _check_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"labels of shape {array.shape} and dtype {array.dtype} are invalid; "
            "allowed: a non-empty 1-d array of integer class indices"
        )
    if array.min() < 0:
        raise ValueError(f"labels contain {array.min()}; allowed: class indices >= 0")
    return array.astype(np.int64)


def sample_weights(
    labels: np.ndarray | Sequence[int], class_weights: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """Per-sample weights (N,) for ``WeightedRandomSampler``: each sample gets its class weight.

    With inverse-frequency class weights every class carries the same total weight, so the
    sampler draws the classes equally often in expectation.

    Args:
        labels: class index of every training sample, shape (N,).
        class_weights: weight of every class, shape (C,), non-negative, C > max(labels).
    """
    array = _check_labels(labels)
    cw = torch.as_tensor(class_weights, dtype=torch.float64).flatten()
    if len(cw) <= array.max():
        raise ValueError(
            f"class_weights has {len(cw)} entries but labels go up to {array.max()}; "
            f"allowed: at least {array.max() + 1} weights"
        )
    if not torch.isfinite(cw).all() or (cw < 0).any():
        raise ValueError(f"class_weights={cw.tolist()} is invalid; allowed: finite numbers >= 0")
    weights = cw[torch.from_numpy(array)]  # (N,)
    if weights.sum() <= 0:
        raise ValueError("every sample has weight 0; the sampler would have nothing to draw")
    return weights


def make_balanced_sampler(
    labels: np.ndarray | Sequence[int],
    scheme: str = "inverse",
    beta: float = 0.999,
    generator: torch.Generator | None = None,
    num_samples: int | None = None,
) -> WeightedRandomSampler:
    """A sampler that draws training samples with replacement, weighted by their class.

    ``scheme="inverse"`` balances the classes exactly in expectation; ``"effective"`` (Cui et al.
    2019) sits between the natural distribution (beta=0) and inverse frequency (beta -> 1).

    Args:
        labels: class index of every training sample, shape (N,).
        scheme: ``"inverse"``, ``"effective"`` or ``"none"`` (uniform over samples), as in
            :func:`losses.class_weights`.
        beta: effective-number hyper-parameter in [0, 1).
        generator: random generator of the draws; pass a seeded one for reproducible epochs.
        num_samples: draws per epoch, > 0; ``None`` keeps the epoch length at N.
    """
    array = _check_labels(labels)
    if num_samples is None:
        num_samples = len(array)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples={num_samples!r} is invalid; allowed: an int > 0 or None")
    counts = np.bincount(array)
    weights = sample_weights(array, losses.class_weights(counts.tolist(), scheme, beta))
    return WeightedRandomSampler(weights, num_samples, replacement=True, generator=generator)


def double_correction_warning(loss_weighting: str, balanced_sampling: bool) -> str | None:
    """A warning when a class-weighted loss and balanced sampling are both on, else ``None``.

    Balanced sampling already shows the model every class about equally often; weighting the
    loss by class as well multiplies the rare classes' influence a second time (about 1/n_c^2
    instead of 1/n_c), which over-predicts them.

    Args:
        loss_weighting: the loss's class-weight scheme, one of ``losses.WEIGHT_SCHEMES``.
        balanced_sampling: whether training batches are drawn by :func:`make_balanced_sampler`.
    """
    if loss_weighting not in losses.WEIGHT_SCHEMES:
        allowed = " | ".join(map(repr, losses.WEIGHT_SCHEMES))
        raise ValueError(f"loss_weighting={loss_weighting!r} is invalid; allowed: {allowed}")
    if loss_weighting == "none" or not balanced_sampling:
        return None
    return (
        f"class imbalance is corrected twice: the loss is weighted by class "
        f"({loss_weighting!r}) and batches are drawn with balanced sampling; rare classes will "
        f"be over-weighted. Use one of the two (loss weighting 'none' or balanced_sampling off)."
    )
