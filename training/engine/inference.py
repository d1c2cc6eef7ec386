"""Run a model over a loader and collect its logits: the one inference loop.

Validation, temperature fitting and the test report all call :func:`predict`, with or without
test-time augmentation.

Public API:
    predict.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import DataLoader

from training.evaluation.tta import tta_logits


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    tta: str = "none",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader`` in eval mode.

    Args:
        model: the network; moved to ``device``, and put back in its previous train/eval mode.
        loader: yields ``(images, labels)`` batches.
        device: where to compute.
        amp_dtype: autocast dtype (``torch.float16``/``torch.bfloat16``), ``None`` for fp32.
        tta: test-time augmentation (``training.tta``): the logits are averaged over the
            views of this mode; "none" is a single pass.
        transform: applied to each batch on the device before the forward pass (progressive
            resizing's current size during training); ``None``: the batch as loaded.

    Returns:
        Logits ``(N, C)`` float32 and labels ``(N,)`` int64, both on the CPU.
    """
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    non_blocking = device.type == "cuda"
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    )
    all_logits, all_labels = [], []
    try:
        for images, labels in loader:
            with autocast:
                images = images.to(device, non_blocking=non_blocking)
                if transform is not None:
                    images = transform(images)
                logits = tta_logits(model, images, tta)  # (B, C)
            all_logits.append(logits.float().cpu())
            all_labels.append(torch.as_tensor(labels, dtype=torch.int64))
    finally:
        model.train(was_training)
    if not all_logits:
        raise ValueError("predict: the loader yielded no batches (empty test split?)")
    return torch.cat(all_logits), torch.cat(all_labels)
