"""One process of a run that ``tests/test_distributed.py`` starts with torchrun.

It trains through :func:`training.build.build_trainer` like ``models/train.py`` does, with
callbacks that let the test see inside the processes:

- every process writes its weights' fingerprint after each epoch to ``rank<R>.jsonl``;
- ``--sabotage-epoch E``: rank 1 alone fills its weights with NaN after the first batch of
  epoch E (the averaged gradients carry the NaN to every process, and the rollback must
  restore the same weights everywhere);
- ``--interrupt-epoch E``: rank 1 alone gets a Ctrl-C after the second batch of epoch E (every
  process must stop at the same step);
- ``--die-epoch E``: rank 1 exits at once at the start of epoch E (the others must not hang).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py RUN_DIR
CONFIG.json [options]``, CONFIG.json being a list of ``--set`` overrides on the cpu preset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from training.build import build_trainer
from training.config.schema import load_config
from training.engine.distributed import stop
from training.engine.events import Callback
from training.engine.trainer import fingerprint


class Fingerprints(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_epoch_end(self, trainer, metrics) -> None:
        with self.path.open("a") as out:
            row = {"epoch": trainer.epoch, "weights": fingerprint(trainer.model)}
            out.write(json.dumps(row) + "\n")


class OnRankOne(Callback):
    def __init__(self, sabotage: int, interrupt: int, die: int) -> None:
        self.sabotage, self.interrupt, self.die = sabotage, interrupt, die

    def on_epoch_start(self, trainer, epoch) -> None:
        if trainer.world.rank == 1 and epoch == self.die:
            os._exit(3)

    def on_batch_end(self, trainer, batch, loss, stepped) -> None:
        if trainer.world.rank != 1:
            return
        if trainer.epoch == self.sabotage and batch == 0:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.fill_(math.nan)
        if trainer.epoch == self.interrupt and batch == 1:
            trainer._interrupt_requested = True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("config", type=Path)
    for name in ("sabotage", "interrupt", "die"):
        parser.add_argument(f"--{name}-epoch", type=int, default=0)
    args = parser.parse_args()
    overrides = json.loads(args.config.read_text())
    cfg = load_config(preset="cpu", overrides=[*overrides, f"run.run_dir={args.run_dir}"])
    rank = int(os.environ["RANK"])
    callbacks = [
        Fingerprints(args.run_dir / f"rank{rank}.jsonl"),
        OnRankOne(args.sabotage_epoch, args.interrupt_epoch, args.die_epoch),
    ]
    args.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        summary = build_trainer(cfg, args.run_dir, extra_callbacks=callbacks).fit()
    finally:
        stop()
    # As models/train.py: rank 0 alone reports the interrupt, so torchrun lets it finish.
    return 130 if summary["stopped"] == "interrupted" and rank == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
