"""Temperature scaling (Guo et al. 2017) at the end of a run, as a callback.

Fits one softmax temperature per saved weight set (``best.pt``, ``swa.pt``) on the validation
split under the run's test-time augmentation, and writes it into the checkpoint; the fit itself
is :func:`training.evaluation.calibration.choose_temperature`.

Public API:
    TemperatureScaling.
"""

from __future__ import annotations

import copy
from typing import Any

from training.engine.checkpoint import (
    load_checkpoint,
    restore_model,
    save_checkpoint,
)
from training.engine.events import Callback
from training.engine.inference import predict
from training.evaluation.calibration import calibration_report, choose_temperature
from training.evaluation.tta import resolve_tta


class TemperatureScaling(Callback):
    """Fits one temperature per weights file (best.pt, swa.pt) on the validation set at the end
    (Guo et al. 2017) and stores it, with NLL and ECE before and after, in that file.

    Args:
        tta: test-time augmentation mode (``training.tta``) of the validation logits the
            temperature is fitted on; the resolved mode is stored as ``"temperature_tta"``.
    """

    name = "temperature"

    def __init__(self, tta: str = "none") -> None:
        resolve_tta(tta, 3)  # an unknown mode fails here, before training
        self.tta = tta

    def on_fit_end(self, trainer: Any, summary: dict) -> None:
        if trainer.stopped == "interrupted" or not trainer.is_main:
            return
        results = {}
        for name in ("best", "swa"):
            path = trainer.checkpoint_dir / f"{name}.pt"
            if path.exists():
                trainer.check_interrupt()  # each file is rewritten whole or not at all
                results[name] = self._calibrate(trainer, path)
        mode = resolve_tta(self.tta, trainer.model.in_channels)
        summary["calibration"] = {name: {**r, "tta": mode} for name, r in results.items()}
        lines = [
            f"{name}: T={r['temperature']:.3f}  NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}"
            f"  ECE {100 * r['ece_before']:.2f}% -> {100 * r['ece_after']:.2f}%"
            for name, r in results.items()
        ]
        where = "validation set" if mode == "none" else f"validation set, tta={mode}"
        # A result, not a decision: the closing summary shows it.
        trainer.notify("calibration", f"temperature scaling ({where})", lines, banner=False)
        kept = [f"{name}: {r['reason']}" for name, r in results.items() if r.get("reason")]
        if kept:
            trainer.notify(
                "warning",
                "temperature kept at 1; the validation split may leak into training",
                kept,
            )

    def _calibrate(self, trainer: Any, path) -> dict:
        ckpt = load_checkpoint(path)
        model = copy.deepcopy(trainer.model)
        restore_model(model, ckpt)
        mode = resolve_tta(self.tta, model.in_channels)
        logits, labels = predict(
            model, trainer.loaders["val"], trainer.device, trainer.amp_dtype, tta=mode
        )
        fit = choose_temperature(logits, labels)
        report = calibration_report(logits, labels, fit.temperature)
        result: dict = {k: float(v) for k, v in report.items()}
        ckpt["temperature"] = float(fit.temperature)
        ckpt["temperature_tta"] = mode
        ckpt.pop("temperature_reason", None)
        if fit.reason is not None:  # test.py shows why this file's T is 1
            result["reason"] = ckpt["temperature_reason"] = fit.reason
        ckpt["calibration"] = result
        save_checkpoint(ckpt, path)
        return result
