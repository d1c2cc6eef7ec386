"""Teachers for knowledge distillation, rebuilt from their run folders and checked against the
student: the same class names in the same order, input size and channels. A teacher trained
with another normalisation gets each batch re-normalised
(:class:`~training.engine.distill.Teacher`).

Public API:
    load_teachers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dataset.cache import same_statistics
from training.config.schema import ConfigError
from training.engine.checkpoint import CheckpointError, model_record
from training.engine.distill import Teacher
from training.evaluation.report import build_model, final_of, find_weights, load_weight_set


def _load_teacher(
    run_dir: Path,
    weights: str,
    *,
    class_names: Sequence[str],
    input_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    notes: list[str],
) -> Teacher:
    """Rebuild one teacher run's weight set and check it can teach this student."""
    where = f"kd.teacher {run_dir}"
    try:
        name = final_of(find_weights(run_dir)) if weights == "final" else weights
        ckpt = load_weight_set(run_dir, name)
        model = build_model(ckpt)
        record = model_record(ckpt)
    except (FileNotFoundError, CheckpointError) as error:
        raise ConfigError(f"{where}: {error}") from None
    theirs = list(ckpt.get("class_names") or [])
    if theirs != list(class_names):
        raise ConfigError(
            f"{where}: class names {theirs} differ from this run's data classes "
            f"{list(class_names)}; a teacher must predict the student's classes in the same order"
        )
    if record.get("in_channels") != channels:
        raise ConfigError(
            f"{where}: input channels {record.get('in_channels')} differ from this run's "
            f"{channels}; a teacher must take the student's images"
        )
    if record.get("input_size") != input_size:
        raise ConfigError(
            f"{where}: input size {record.get('input_size')} px differs from this run's "
            f"{input_size} px; a teacher must take the student's images"
        )
    teacher = Teacher(run_dir, name, model)
    t_mean, t_std = list(ckpt["mean"]), list(ckpt["std"])
    if not (same_statistics(t_mean, mean) and same_statistics(t_std, std)):
        # x_student = (img - mean_s) / std_s, so x_teacher = (img - mean_t) / std_t
        #           = x_student * std_s / std_t + (mean_s - mean_t) / std_t.
        shape = (1, len(mean), 1, 1)
        s_mean, s_std = torch.tensor(mean), torch.tensor(std)
        tm, ts = torch.tensor(t_mean), torch.tensor(t_std)
        teacher.scale = (s_std / ts).reshape(shape).to(device)
        teacher.shift = ((s_mean - tm) / ts).reshape(shape).to(device)
        notes.append(
            f"{where}: trained with mean/std {_fmt(t_mean)}/{_fmt(t_std)}, this run uses "
            f"{_fmt(mean)}/{_fmt(std)}; each batch is re-normalised for the teacher"
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    teacher.model = model.to(device)
    return teacher


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"


def load_teachers(
    run_dirs: Sequence[str | Path],
    weights: str,
    *,
    class_names: Sequence[str],
    input_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> tuple[list[Teacher], list[str]]:
    """The teachers of ``run_dirs`` and the start-up notes (re-normalisation) they need.

    Raises:
        ConfigError: in one line naming the teacher and what does not fit (missing run or
            checkpoints, class names, input channels or size).
    """
    notes: list[str] = []
    teachers = []
    # Rebuilding a model draws its initial weights from the global RNG before the checkpoint
    # overwrites them; forking keeps the student's random stream what it is without a teacher.
    with torch.random.fork_rng(devices=[]):
        for run_dir in run_dirs:
            teachers.append(
                _load_teacher(
                    Path(run_dir),
                    weights,
                    class_names=class_names,
                    input_size=input_size,
                    channels=channels,
                    mean=mean,
                    std=std,
                    device=device,
                    notes=notes,
                )
            )
    return teachers, notes
