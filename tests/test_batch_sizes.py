"""Training sets of every size: no training batch of one image reaches the heads' BatchNorm1d.

BatchNorm in training mode cannot normalise a single value per channel, so a train split with
``N % batch_size == 1`` would end every epoch with a batch the model cannot train on; the loader
folds that image into the batch before. These tests cover the sampler, the loaders, the loop
(with accumulation, the class-balanced sampler and exact resume), the SWA BatchNorm pass and
evaluation of one-image batches.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from dataset.cache import prepare
from models.basic_cnn_model import BasicCNNModel
from tests.conftest import brightness_npz
from tests.test_trainer import InterruptAt, StepCounter, fit, same_weights, tiny_config
from training.build import load_resume
from training.config.schema import ConfigError, TrainConfig
from training.engine.checkpoint import load_checkpoint
from training.engine.data import EpochBatchSampler, make_loaders
from training.engine.inference import predict

CPU = torch.device("cpu")
BATCH = 4

# --------------------------------------------------------------------------- the batch sampler


@pytest.mark.parametrize(
    "n, batch, sizes",
    [
        (8, 4, [4, 4]),
        (9, 4, [4, 5]),  # the last image joins the batch before
        (10, 4, [4, 4, 2]),
        (5, 4, [5]),
        (3, 4, [3]),
        (1, 4, [1]),  # nothing to join: an epoch's only batch stays as it is
        (7, 2, [2, 2, 3]),
        (8961, 128, [128] * 69 + [129]),  # 8,961 training images at batch 128
    ],
)
def test_a_last_batch_below_min_batch_joins_the_one_before(n, batch, sizes):
    gen = torch.Generator().manual_seed(1)
    sampler = EpochBatchSampler(
        RandomSampler(range(n), generator=gen), batch, generator=gen, min_batch=2
    )
    batches = list(sampler)
    assert [len(b) for b in batches] == sizes and len(sampler) == len(sizes)
    assert sorted(sum(batches, [])) == list(range(n))


def test_folding_keeps_the_order_and_min_batch_one_never_folds():
    def order(min_batch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(4)
        sampler = RandomSampler(range(9), generator=gen)
        return list(EpochBatchSampler(sampler, 4, generator=gen, min_batch=min_batch))

    plain, folded = order(1), order(2)
    assert [len(b) for b in plain] == [4, 4, 1]
    assert folded == [plain[0], plain[1] + plain[2]]


def test_drop_last_still_drops_a_short_last_batch():
    sampler = EpochBatchSampler(RandomSampler(range(9)), 4, drop_last=True, min_batch=2)
    assert [len(b) for b in sampler] == [4, 4] and len(sampler) == 2


@pytest.mark.parametrize(
    "batch, min_batch, match",
    [
        (4, 0, r"min_batch=0 is invalid; allowed: 1\.\.4"),
        (4, 5, r"min_batch=5 is invalid; allowed: 1\.\.4"),
        (4, 2.0, r"min_batch=2\.0 is invalid; allowed: an int"),
        (4, True, r"min_batch=True is invalid"),
    ],
)
def test_min_batch_is_checked(batch, min_batch, match):
    with pytest.raises(ValueError, match=match):
        EpochBatchSampler(RandomSampler(range(9)), batch, min_batch=min_batch)


# --------------------------------------------------------------------------- the train loader


def tiny_cache(tmp_path: Path, n_train: int, name: str = "sized"):
    npz = brightness_npz(tmp_path / f"{name}{n_train}.npz", counts=(n_train, 6, 6))
    return prepare(npz, tmp_path / f"cache{n_train}")[0]


def sized_config(batch: int = BATCH, balanced: bool = False) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.workers = 0
    cfg.data.balanced_sampling = balanced
    cfg.optim.batch_size = batch
    return cfg


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("n_train, sizes", [(8, [4, 4]), (9, [4, 5]), (10, [4, 4, 2])])
def test_train_loader_never_yields_one_image(tmp_path, n_train, sizes, balanced):
    cache = tiny_cache(tmp_path, n_train)
    train = make_loaders(cache, sized_config(balanced=balanced), CPU, torch.Generator())["train"]
    for epoch in (1, 2):
        train.generator.manual_seed(epoch)
        labels = [y for _, y in train]
        assert [len(y) for y in labels] == sizes and len(train) == len(sizes)
        if not balanced:  # drawn without replacement: every image once
            assert sorted(torch.cat(labels).tolist()) == sorted(train.dataset.labels.tolist())


def test_batch_size_one_is_a_config_error(tmp_path):
    cache = tiny_cache(tmp_path, 9)
    with pytest.raises(ConfigError, match=r"optim\.batch_size=1 is invalid; allowed: an int >= 2"):
        make_loaders(cache, sized_config(batch=1), CPU, torch.Generator())


def test_swa_batchnorm_pass_gets_no_one_image_batch(tmp_path):
    # update_bn runs the model in training mode over the train loader, as the SWA callback does.
    cache = tiny_cache(tmp_path, 9)
    train = make_loaders(cache, sized_config(), CPU, torch.Generator())["train"]
    model = BasicCNNModel(num_classes=3, in_channels=3, width=0.125, norm="batch", active_blocks=2)
    model.set_head_mix(0.5)  # both heads' BatchNorm1d see the batch
    before = model.heads[1].norm.running_mean.clone()
    update_bn(train, model, device=CPU)
    assert not torch.equal(model.heads[1].norm.running_mean, before)
    assert int(model.heads[1].norm.num_batches_tracked) == len(train) == 2


# --------------------------------------------------------------------------- the training loop


def sized_run(tmp_path: Path, n_train: int, run: str, *extra: str):
    npz = brightness_npz(tmp_path / f"run{n_train}.npz", counts=(n_train, 6, 6))
    return tiny_config(npz, tmp_path, run, f"optim.batch_size={BATCH}", "run.epochs=2", *extra)


@pytest.mark.parametrize(
    "n_train, batches, accumulation, balanced",
    [
        (8, 2, 1, False),
        (9, 2, 1, False),  # 4 + 5: the last image joins the batch before
        (10, 3, 1, False),
        (9, 2, 1, True),
        (9, 2, 2, False),
        (9, 2, 3, True),
        (10, 3, 2, True),
    ],
)
def test_every_train_size_trains(tmp_path, n_train, batches, accumulation, balanced):
    cfg = sized_run(
        tmp_path,
        n_train,
        "run",
        f"optim.accumulation={accumulation}",
        f"data.balanced_sampling={str(balanced).lower()}",
    )
    counter = StepCounter()
    trainer, summary = fit(cfg, callbacks=[counter])
    assert summary["stopped"] is None and trainer.batches_per_epoch == batches
    assert counter.batches == 2 * batches
    assert counter.steps == trainer.step == 2 * math.ceil(batches / accumulation)
    assert trainer.schedule.last_step == trainer.step


def test_an_interrupted_epoch_resumes_into_the_folded_batch_exactly(tmp_path):
    # 13 images at batch 4 are batches of 4, 4 and 5; with accumulation 2 the folded batch is
    # a group of its own. Ctrl-C in epoch 2's first group saves after it; the resumed run
    # replays the folded batch and ends with the uninterrupted run's weights.
    extra = ("optim.accumulation=2", "run.epochs=3")
    straight, _ = fit(sized_run(tmp_path, 13, "a", *extra))
    _, summary = fit(sized_run(tmp_path, 13, "b", *extra), callbacks=[InterruptAt(2, 0)])
    assert summary["stopped"] == "interrupted"
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert ckpt["progress"]["batches_done"] == 2 and ckpt["progress"]["seen"] == 8
    cfg, ckpt = load_resume(tmp_path / "b")
    resumed, _ = fit(cfg, resume=ckpt)
    assert same_weights(straight.model.state_dict(), resumed.model.state_dict())
    assert resumed.step == straight.step == 3 * 2


def test_unfreeze_blend_and_swa_with_a_last_image_over(tmp_path):
    # Block 2 joins at epoch 2 with its head blended in over epoch 3, SWA averages epoch 3 and
    # recomputes the BatchNorm statistics on the train loader at the end.
    cfg = sized_run(
        tmp_path,
        9,
        "regimen",
        "run.epochs=3",
        "unfreeze.activate_at=[2]",
        "unfreeze.min_gap=1",
        "unfreeze.plateau_patience=0",
        "safety.swa=true",
        "safety.swa_start_epoch=3",
    )
    mixes = []

    class HeadMix(StepCounter):
        def on_batch_end(self, trainer, batch, loss, stepped):
            mixes.append(trainer.model.head_mix)

    trainer, summary = fit(cfg, callbacks=[HeadMix()])
    assert trainer.model.active_blocks == 2 and 0 < min(mixes) < 1
    assert summary["swa"]["models"] == 1 and Path(summary["files"]["swa"]).is_file()


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("tta", ["none", "d4"])
def test_evaluation_of_one_image_batches_runs_in_eval_mode(tta):
    # Test sets, calibration and TTA predict with batches of any size; a model left in training
    # mode must still not normalise one image with batch statistics.
    model = BasicCNNModel(num_classes=3, in_channels=3, width=0.125, norm="batch").train()
    images = torch.rand(3, 3, 28, 28)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 2])), batch_size=1)
    logits, labels = predict(model, loader, CPU, tta=tta)
    assert logits.shape == (3, 3) and labels.tolist() == [0, 1, 2] and model.training
