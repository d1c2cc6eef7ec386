"""Seed every random number generator, and capture or restore them all for resume.

The state from :func:`rng_state` holds only types that ``torch.load(weights_only=True)``
accepts (numpy's key array becomes an int64 tensor), so it can go into a checkpoint.

Public API:
    seed_everything, worker_init_fn, make_generator, rng_state, set_rng_state.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

_MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 32-bit seeds


def _check_seed(seed: object) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed={seed!r} is invalid; allowed: an int in 0..{_MAX_SEED}")
    return seed


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device).

    Args:
        seed: an int in 0..2**32-1.
        deterministic: also ask torch for deterministic kernels (warning, not failing, where an
            op has none), set cuDNN to deterministic and turn its autotuner off; slower. With
            False the deterministic switches are turned off again and cuDNN's autotuner is left
            as it is.
    """
    _check_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device, now or when CUDA starts later
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this at CUDA start-up.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.are_deterministic_algorithms_enabled():
        # Only when needed: the call imports torch's compiler config, seconds on a cold start.
        torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = deterministic


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random`` and numpy from the worker's torch seed.

    Torch gives each worker the seed ``base_seed + worker_id`` (the base drawn from the loader's
    generator), but forked workers would otherwise share the parent's numpy and random state and
    draw the same augmentations.
    """
    seed = torch.initial_seed() % (_MAX_SEED + 1)
    random.seed(seed)
    np.random.seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``, for DataLoaders and samplers."""
    generator = torch.Generator()
    generator.manual_seed(_check_seed(seed))
    return generator


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,) uint32 values, widened
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def rng_state() -> dict[str, Any]:
    """The states of python ``random``, numpy, torch CPU and (when present) CUDA and MPS."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = np.asarray(torch.as_tensor(state["keys"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state(
        (
            state["bit_generator"],
            keys,
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    )


def _set_python_state(state: Any) -> None:
    # random.setstate wants tuples; a state that went through JSON or YAML comes back as lists.
    version, internal, gauss_next = state
    random.setstate((version, tuple(internal), gauss_next))


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a dict from :func:`rng_state`.

    Missing entries are left alone. CUDA states are restored for the devices present (a run
    resumed on fewer GPUs, or on the CPU, skips the rest); MPS likewise.
    """
    if not isinstance(state, dict):
        raise ValueError(f"rng state must be a dict from rng_state(), got {type(state).__name__}")
    if "python" in state:
        _set_python_state(state["python"])
    if "numpy" in state:
        _set_numpy_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if state.get("cuda") and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
    if "mps" in state and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"].cpu())
