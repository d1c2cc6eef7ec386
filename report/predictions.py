"""The final weights of a tested run, rebuilt as ``test.py`` rebuilds them, and their test logits.

The errors and saliency sections both need the model, the test images and one forward pass over
the test split; this module does that once. The weight set is the one the run ends with (``swa``
when it was scored, else ``best``), and its temperature is the one ``test.py`` applied (the
``<name>+T`` row of ``test_report.json``), so the losses here are those of the report's figures.

Public API:
    FinalModel, load_final, top_loss_indices, denormalise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from models.staged import StagedModel
from report.run import ReportError, RunFolder
from training.engine.data import resolve_workers
from training.engine.device import resolve_device
from training.engine.inference import predict
from training.evaluation.report import SCALED_SUFFIX, build_model, load_weight_set, test_loader


@dataclass
class FinalModel:
    """A run's final weights and their test predictions.

    Attributes:
        name: the weight set (``swa``, ``best`` or ``last``).
        model: the network, in eval mode, on ``device``.
        device: where it runs.
        dataset: the test split, normalised as in training (items ``(image CHW, label)``).
        class_names: one per class.
        mean, std: the training set's per-channel statistics (0..1 scale), to undo the
            normalisation for display.
        temperature: the softmax temperature the losses and probabilities use (1 when none).
        logits: ``(N, C)`` test logits (unscaled), on the CPU.
        labels: ``(N,)`` true classes.
    """

    name: str
    model: StagedModel
    device: torch.device
    dataset: Dataset
    class_names: list[str]
    mean: list[float]
    std: list[float]
    temperature: float
    logits: torch.Tensor
    labels: torch.Tensor

    @property
    def probabilities(self) -> torch.Tensor:
        """``softmax(logits / T)``, ``(N, C)``."""
        return (self.logits.double() / self.temperature).softmax(dim=1)

    @property
    def losses(self) -> torch.Tensor:
        """Per-image cross-entropy of ``softmax(logits / T)``, ``(N,)`` float64."""
        scaled = self.logits.double() / self.temperature
        return F.cross_entropy(scaled, self.labels, reduction="none")

    @property
    def predictions(self) -> torch.Tensor:
        """``(N,)`` predicted classes (T changes none)."""
        return self.logits.argmax(dim=1)

    def images(self, indices: list[int] | torch.Tensor) -> torch.Tensor:
        """The normalised test images at ``indices`` as one batch ``(B, C, H, W)``."""
        return torch.stack([self.dataset[int(i)][0] for i in indices])


def _temperature(report: dict[str, Any], name: str) -> float:
    # The +T row exists only where test.py applied the temperature (fitted, same TTA mode).
    scaled = report.get("weights", {}).get(name + SCALED_SUFFIX)
    return float(scaled["temperature"]) if scaled else 1.0


def load_final(run: RunFolder, *, device: str = "cpu", batch_size: int = 256) -> FinalModel:
    """Rebuild the run's final weights and score them on the test split (one forward pass).

    Raises:
        ReportError: the run has no test report, or no checkpoint file for its final weights.
        training.engine.checkpoint.CheckpointError: a checkpoint cannot be read or rebuilt.
    """
    if run.test_report is None:
        raise ReportError(f"{run.path} has no test_report.json; run python test.py first")
    name = run.final_weights
    if name not in run.checkpoints:
        raise ReportError(
            f"{run.path / 'checkpoints'} has no file for the {name!r} weights that"
            " test_report.json scored"
        )
    ckpt = load_weight_set(run.path, name)
    dev = resolve_device(device)
    model = build_model(ckpt).to(dev).eval()
    loader, _ = test_loader(ckpt, None, batch_size, resolve_workers(-1, dev))
    logits, labels = predict(model, loader, dev, tta=str(run.test_report.get("tta", "none")))
    return FinalModel(
        name=name,
        model=model.eval(),
        device=dev,
        dataset=loader.dataset,
        class_names=[str(c) for c in ckpt["class_names"]],
        mean=[float(v) for v in ckpt["mean"]],
        std=[float(v) for v in ckpt["std"]],
        temperature=_temperature(run.test_report, name),
        logits=logits,
        labels=labels,
    )


def top_loss_indices(losses: torch.Tensor | np.ndarray, k: int) -> list[int]:
    """The indices of the ``k`` largest losses, largest first (ties: the lower index first);
    all of them when there are fewer than ``k``."""
    values = torch.as_tensor(losses)
    if values.ndim != 1:
        raise ValueError(f"losses have shape {tuple(values.shape)}; allowed: (N,)")
    if k <= 0:
        return []
    order = torch.argsort(values, descending=True, stable=True)
    return order[:k].tolist()


def denormalise(images: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """Normalised ``(B, C, H, W)`` images back to displayable ``(B, H, W, C)`` floats in [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    restored = (images.detach().cpu() * s + m).clamp(0.0, 1.0)
    return restored.permute(0, 2, 3, 1).numpy()
