"""Seeding: equal seeds give equal draws, and a captured RNG state replays exactly after resume."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from training.engine.seeding import (
    make_generator,
    rng_state,
    seed_everything,
    set_rng_state,
    worker_init_fn,
)


def draws() -> tuple[torch.Tensor, np.ndarray, list[float]]:
    return torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)]


def assert_same_draws(a, b) -> None:
    assert torch.equal(a[0], b[0])
    assert np.array_equal(a[1], b[1])
    assert a[2] == b[2]


@pytest.fixture
def restore_torch_flags():
    """Put the process-wide determinism switches back after a test changes them."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    now = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if now != saved[:2]:  # the call costs seconds the first time, so skip it when nothing changed
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def test_seed_everything_twice_gives_equal_draws(restore_torch_flags):
    seed_everything(7)
    first = draws()
    seed_everything(7)
    assert_same_draws(first, draws())
    seed_everything(8)
    assert not torch.equal(first[0], torch.rand(5))


def test_deterministic_mode_switches_on_and_off(restore_torch_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # a user's choice is kept
    seed_everything(0)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic


def test_deterministic_mode_sets_the_cublas_workspace_when_unset(restore_torch_flags, monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    seed_everything(0, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "3"])
def test_a_bad_seed_is_named(seed):
    with pytest.raises(ValueError, match=f"seed={seed!r} is invalid"):
        seed_everything(seed)


# --------------------------------------------------------------------------- capture / restore


def test_set_rng_state_replays_every_generator():
    seed_everything(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state, which must come back too
    state = rng_state()
    first = draws()
    set_rng_state(state)
    assert_same_draws(first, draws())


def test_rng_state_survives_a_weights_only_checkpoint():
    seed_everything(4)
    state = rng_state()
    first = draws()
    buffer = io.BytesIO()
    torch.save({"rng": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng"]
    seed_everything(99)  # move every generator elsewhere first
    set_rng_state(loaded)
    assert_same_draws(first, draws())


def test_python_state_that_went_through_json_still_restores():
    state = rng_state()
    first = random.random()
    state["python"] = json.loads(json.dumps(state["python"]))  # tuples become lists
    set_rng_state({"python": state["python"]})
    assert random.random() == first


def test_set_rng_state_refuses_a_non_dict():
    with pytest.raises(ValueError, match="got list"):
        set_rng_state([1, 2])


# --------------------------------------------------------------------------- data loading


def test_equal_generator_seeds_shuffle_alike():
    data = list(range(20))
    order = [list(DataLoader(data, shuffle=True, generator=make_generator(s))) for s in (5, 5, 6)]
    assert [int(x) for x in order[0]] == [int(x) for x in order[1]]
    assert [int(x) for x in order[0]] != [int(x) for x in order[2]]


def test_worker_init_fn_seeds_numpy_and_random_from_the_torch_seed():
    torch.manual_seed(123)
    worker_init_fn(0)
    assert np.random.rand() == np.random.RandomState(123).rand()
    assert random.random() == random.Random(123).random()


class NumpyNoise(Dataset):
    """Each item is a numpy draw, as an augmentation would make."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> float:
        return float(np.random.rand())


def _worker_draws(seed: int) -> list[float]:
    loader = DataLoader(
        NumpyNoise(),
        batch_size=1,
        num_workers=2,
        worker_init_fn=worker_init_fn,
        generator=make_generator(seed),
    )
    return [float(x) for x in loader]


def test_workers_draw_differently_from_each_other_and_repeat_across_runs():
    first = _worker_draws(1)
    assert len(set(first)) == 4  # workers 0 and 1 do not share a numpy stream
    assert _worker_draws(1) == first
    assert _worker_draws(2) != first
