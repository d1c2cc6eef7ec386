"""Training one model on several processes: the sharding, the launch checks, and real 2-process
gloo runs started with torchrun (a stage change, a rollback, an interrupt, a resume with the
same and with another number of processes, and a process that dies)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.conftest import brightness_npz
from training.build import build_trainer, load_resume
from training.callbacks.metrics_log import read_metrics
from training.config.schema import ConfigError, load_config
from training.engine.checkpoint import CheckpointError, load_checkpoint
from training.engine.data import (
    EpochBatchSampler,
    Shard,
    ShardedBatches,
    ShardedIndices,
    make_balanced_sampler,
    make_loaders,
    prepare_cache,
)
from training.engine.distributed import DistributedError, World, start
from training.engine.trainer import fingerprint

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"

# ---------------------------------------------------------------- units


def test_world_from_env_reads_torchrun_variables():
    assert World.from_env({}) == World(0, 1, 0)
    world = World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.is_main) == (3, 4, 1, False)
    assert world.distributed and not World().distributed


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "x"}, "RANK='x' is invalid; allowed: an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "0 <= RANK < WORLD_SIZE"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE >= 1"),
    ],
)
def test_world_from_env_refuses_a_bad_launch_in_one_line(env, message):
    with pytest.raises(DistributedError, match=message) as error:
        World.from_env(env)
    assert "\n" not in str(error.value)


def test_a_world_of_one_joins_nothing():
    assert start(World(), torch.device("cpu")) == torch.device("cpu")
    assert not dist.is_initialized()


def test_a_launch_the_machine_cannot_serve_is_refused_in_one_line(monkeypatch):
    two = World(rank=1, size=2, local_rank=1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DistributedError, match="LOCAL_RANK=1 needs GPU 1 but this machine has 1"):
        start(two, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(DistributedError, match="NCCL is not available.*run.device=cpu"):
        start(two, torch.device("cuda"))
    with pytest.raises(DistributedError, match="'mps' cannot train across processes"):
        start(two, torch.device("mps"))
    assert not dist.is_initialized()


@pytest.mark.parametrize("balanced", [False, True])
def test_shards_split_each_global_batch_of_a_one_process_run(balanced):
    labels = [0] * 30 + [1] * 7  # 37 images, batch 8: the last batch of 5 stays apart

    def batches(shard):
        g = torch.Generator().manual_seed(5)
        if balanced:
            sampler = make_balanced_sampler(labels, generator=g)
        else:
            sampler = torch.utils.data.RandomSampler(range(len(labels)), generator=g)
        epoch = EpochBatchSampler(sampler, 8, generator=g, min_batch=2 * shard.size)
        return list(ShardedBatches(epoch, shard))

    whole = batches(Shard())
    ranks = [batches(Shard(r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for one, a, b in zip(whole, *ranks, strict=True):
        assert (
            sorted(a + b) == sorted(one) and abs(len(a) - len(b)) <= 1 and min(len(a), len(b)) >= 2
        )


def test_sharded_indices_cover_every_image_once_and_whole_turns_sharding_off():
    shards = [Shard(r, 3) for r in range(3)]
    parts = [list(ShardedIndices(10, s)) for s in shards]
    assert sorted(sum(parts, [])) == list(range(10)) and [len(p) for p in parts] == [4, 3, 3]
    shards[2].whole()
    assert list(ShardedIndices(10, shards[2])) == list(range(10))


def test_a_batch_the_processes_cannot_share_is_refused_in_one_line(tmp_path):
    npz = brightness_npz(tmp_path / "b.npz")
    cfg = load_config(
        preset="cpu",
        overrides=[f"data.source={npz}", f"data.root={tmp_path}", "optim.batch_size=10"],
    )
    cache = prepare_cache(cfg.data, progress=False)
    g = torch.Generator()
    with pytest.raises(ConfigError, match=r"batch_size=10 is invalid for 4 processes.*multiple"):
        make_loaders(cache, cfg, torch.device("cpu"), g, shard=Shard(0, 4))
    loaders = make_loaders(cache, cfg, torch.device("cpu"), g, shard=Shard(1, 2))
    # 48 images: global batches of 10, 10, 10, 10 and 8; rank 1 takes every second image.
    assert [len(y) for _, y in loaders["train"]] == [5, 5, 5, 5, 4]


def test_a_resume_whose_last_batch_would_fold_differently_is_refused(tmp_path):
    npz = brightness_npz(tmp_path / "b.npz")
    cfg = load_config(
        preset="cpu",
        overrides=[f"data.source={npz}", f"data.root={tmp_path}", "optim.batch_size=16"],
    )
    trainer = build_trainer(cfg, tmp_path / "run")
    saved = trainer.checkpoint_payload()
    assert (saved["batches_per_epoch"], saved["processes"]) == (3, 1)  # 48 images
    saved.update(batches_per_epoch=4, processes=2)
    with pytest.raises(CheckpointError, match=r"4 batches an epoch on 2 process\(es\).*resume it"):
        trainer.load_state(saved)


def test_fingerprint_tells_weights_apart_and_nan_equals_nan():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert fingerprint(a) != fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        a.weight.fill_(math.nan), b.weight.fill_(math.nan)
    assert fingerprint(a) == fingerprint(b)


# ---------------------------------------------------------------- torchrun runs

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without gloo"
)

OVERRIDES = [
    "model.width=0.125",
    "model.block_channels=[]",
    "optim.batch_size=16",
    "run.epochs=6",
    "run.progress=plain",
    "run.tensorboard=false",
    "run.threads=1",
    "run.dist_timeout=2",
    "unfreeze.activate_at=[2, 3]",
    "unfreeze.plateau_patience=0",
    "safety.swa_start_epoch=5",
    "safety.early_stop=false",
]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={nproc}", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A 2-process run: stages join at epochs 2 and 3, rank 1's weights turn NaN in epoch 4
    (a rollback), and rank 1 alone is interrupted in epoch 5."""
    tmp = tmp_path_factory.mktemp("ddp")
    npz = brightness_npz(tmp / "b.npz", counts=(96, 24, 24))
    overrides = [*OVERRIDES, f"data.source={npz}", f"data.root={tmp / 'cache'}"]
    (tmp / "config.json").write_text(json.dumps(overrides))
    run = tmp / "run"
    options = ["--sabotage-epoch", "4", "--interrupt-epoch", "5"]
    done = torchrun(str(WORKER), str(run), str(tmp / "config.json"), *options)
    return tmp, run, overrides, done


@needs_gloo
def test_two_processes_hold_the_same_weights_after_every_epoch(two_process_run):
    _, run, _, done = two_process_run
    # Rank 0 reports the interrupt (torchrun then exits with 1). Rank 1 ends cleanly, but
    # should rank 0 exit first, torchrun stops rank 1 (which has nothing left to write) with a
    # signal: its status is not part of the contract.
    assert "rank      : 0 (local_rank: 0)\n  exitcode  : 130" in done.stderr, done.stderr[-3000:]
    ranks = [
        [json.loads(x) for x in (run / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    assert [row["epoch"] for row in ranks[0]] == [1, 2, 3, 4] == [row["epoch"] for row in ranks[1]]
    assert ranks[0] == ranks[1]
    rows = read_metrics(run / "metrics.jsonl")
    epochs = {r["epoch"]: r for r in rows if "epoch" in r and "train_loss" in r}
    assert [epochs[e]["active_blocks"] for e in (1, 2, 3, 4)] == [1, 1, 2, 3]  # joined after 2, 3
    # Rank 1's NaN reached both through the averaged gradients; both restored rank 0's weights.
    assert epochs[4]["rollback"].startswith("rollback")
    assert all(math.isfinite(float.fromhex(v)) for v in ranks[0][3]["weights"])
    # Both stopped at the same step of epoch 5, which last.pt can resume.
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["progress"]["epoch"] == 5 and last["progress"]["batches_done"] == 2
    # Each process keeps its own dropout stream, and last.pt keeps both for a resume.
    first, second = (state["torch"] for state in last["rng_ranks"])
    assert len(last["rng_ranks"]) == 2 and not torch.equal(first, second)


@needs_gloo
def test_two_processes_train_like_one_with_the_same_global_batch(two_process_run, tmp_path):
    tmp, run, overrides, _ = two_process_run
    cfg = load_config(preset="cpu", overrides=[*overrides, f"run.run_dir={tmp_path / 'one'}"])
    trainer = build_trainer(cfg, tmp_path / "one")
    trainer.config.run.epochs = 2  # the same 6-epoch plan, stopped after its first two epochs
    trainer.fit()
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "train_loss" in r]
    two = [r for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r][:2]
    # Same images per step, averaged gradients. What differs: BatchNorm's batch statistics
    # (half the batch on each process), each process's own augmentation and dropout streams,
    # and the summation order. Stated tolerance over the first two epochs: validation loss
    # within 5%, training loss within 10%, and validation accuracy within 10 points once the
    # model has learned (epoch 2; after one epoch 24 images sit near the decision boundary).
    for a, b in zip(one, two, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=0.05)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.10)
    assert abs(one[1]["val_acc"] - two[1]["val_acc"]) <= 0.1


@needs_gloo
def test_an_interrupted_two_process_run_resumes_on_two_or_one(two_process_run, tmp_path):
    _, run, _, _ = two_process_run
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)
    done = torchrun("models/train.py", "--resume", str(run))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "test it with" in done.stdout and done.stdout.count("test it with") == 1
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 6 and last["finished"] and (run / "checkpoints" / "swa.pt").is_file()
    # Another number of processes: the global batches and the schedule are the same.
    cfg, ckpt = load_resume(alone)
    build_trainer(cfg, alone, resume=ckpt).fit()
    resumed = load_checkpoint(alone / "checkpoints" / "last.pt")
    assert resumed["epoch"] == 6 and resumed["step"] == last["step"]


@needs_gloo
def test_a_process_that_dies_stops_the_others(two_process_run, tmp_path):
    tmp, *_ = two_process_run
    done = torchrun(str(WORKER), str(tmp_path / "r"), str(tmp / "config.json"), "--die-epoch", "2")
    assert done.returncode != 0
    assert "exitcode  : 3" in done.stderr


@needs_gloo
def test_torchrun_of_the_entry_script_refuses_a_batch_it_cannot_split(two_process_run, tmp_path):
    tmp, *_ = two_process_run
    done = torchrun(
        "models/train.py", "--preset", "cpu", "--data", str(tmp / "b.npz"),
        "--set", f"data.root={tmp / 'cache'}", "--set", "optim.batch_size=15",
        "--run-dir", str(tmp_path / "odd"),
    )  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: optim.batch_size=15 is invalid for 2 processes; allowed: a multiple of 2 that is"
        " >= 4 (the global batch, split evenly across the processes) (the model's BatchNorm"
        " needs two images per training batch)"
    ]
