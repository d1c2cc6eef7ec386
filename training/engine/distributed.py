"""Several processes training one model: PyTorch's process group, set up from torchrun's
environment, and the few collectives the loop needs.

A plain run is a world of one: every function here then returns at once, with nothing to
set up, so the loop calls them unconditionally.

- :class:`World`: this process's rank, the number of processes and its local rank, read from
  the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
- :func:`start`: joins the process group (NCCL on CUDA, gloo on the CPU) with a timeout, so a
  peer that hangs or dies stops the others with an error instead of a wait without end.
- :func:`sum_`, :func:`broadcast`, :func:`gather`, :func:`barrier`: the collectives.

Public API:
    World, DistributedError, start, stop, sum_, broadcast, gather, barrier, broadcast_buffers,
    wrap, rank_seed, DEFAULT_TIMEOUT_MIN.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

#: minutes a collective waits for the other processes before it fails. Long enough for rank 0
#: to build a large cache while the others wait at a barrier; short enough that a job whose peer
#: hangs does not sit on its GPUs for hours.
DEFAULT_TIMEOUT_MIN = 30.0


class DistributedError(Exception):
    """A launch that cannot work (one line, naming the variable or setting and the fix)."""


@dataclass(frozen=True)
class World:
    """Where this process stands among the processes of one run.

    Attributes:
        rank: 0..size-1; rank 0 prints, logs and writes the run's files.
        size: the number of processes training the model.
        local_rank: the rank on this machine; selects the GPU.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """The world ``torchrun`` describes in ``env`` (``os.environ`` by default); a plain
        ``python`` launch sets none of its variables and is a world of one.

        Raises:
            DistributedError: a variable that is not an integer, or a rank outside the world.
        """
        env = os.environ if env is None else env
        values = {}
        for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            text = env.get(key, str(default))
            try:
                values[key] = int(text)
            except ValueError:
                raise DistributedError(
                    f"{key}={text!r} is invalid; allowed: an integer (torchrun sets it)"
                ) from None
        rank, size, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
        if size < 1 or not 0 <= rank < size or local < 0:
            raise DistributedError(
                f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} is invalid; allowed: "
                "WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0 (launch with torchrun)"
            )
        return cls(rank=rank, size=size, local_rank=local)


def start(
    world: World, device: torch.device, timeout_min: float = DEFAULT_TIMEOUT_MIN
) -> torch.device:
    """Join the process group of ``world`` (once) and return this process's device.

    On CUDA each process takes the GPU of its local rank (``cuda:LOCAL_RANK``) and the group
    uses NCCL; on the CPU it uses gloo. A world of one sets nothing up and returns ``device``.

    Raises:
        DistributedError: NCCL missing for a CUDA run, fewer GPUs on this machine than its
            processes, or another device type.
    """
    if not world.distributed:
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if world.local_rank >= count:
            raise DistributedError(
                f"LOCAL_RANK={world.local_rank} needs GPU {world.local_rank} but this machine "
                f"has {count}; allowed: --nproc_per_node at most {count}"
            )
        if not dist.is_nccl_available():
            raise DistributedError(
                "NCCL is not available in this PyTorch build, and CUDA training across "
                "processes needs it; install a CUDA build of torch, or train on the CPU with "
                "--set run.device=cpu (gloo)"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(
            f"run.device={device.type!r} cannot train across processes; allowed: cuda (NCCL) "
            "or cpu (gloo)"
        )
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_min)
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    return device


def stop() -> None:
    """Leave the process group (nothing to do in a world of one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _active(world: World) -> bool:
    return world.distributed and dist.is_initialized()


def barrier(world: World) -> None:
    """Wait until every process gets here."""
    if _active(world):
        dist.barrier()


def sum_(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes, in place, and returned."""
    if _active(world):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(world: World, obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (the others' own value is ignored). A picklable object
    travels between the processes of one job only; nothing is read from a file."""
    if not _active(world):
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not _active(world):
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s own random streams (augmentation, dropout): rank 0's is
    ``seed`` itself, so a world of one draws what a plain run draws."""
    return seed + 1_000_003 * rank


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` inside DistributedDataParallel on ``device`` (its GPU, or the CPU). Building
    it broadcasts rank 0's parameters and buffers to every process."""
    ids = None if device.type == "cpu" else [device.index]
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def broadcast_buffers(world: World, model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    DDP sends them at the start of each training forward pass, but each process then updates
    its own from its own batch; after the last batch of an epoch they differ until this call.
    """
    if not _active(world):
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
