"""Knowledge distillation: the loss by hand, ensemble teachers, the run, its checks and resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import models.train as train_script
from tests.conftest import brightness_npz, train_tiny_run
from tests.test_trainer import StopAfter, fit, same_weights, tiny_config
from training.build import load_resume
from training.callbacks.metrics_log import read_metrics
from training.config.schema import ConfigError, load_config
from training.engine.checkpoint import load_checkpoint
from training.engine.distill import Distillation, Teacher, distill_loss, kd_term
from training.engine.mixup import Mixup
from training.evaluation.teachers import load_teachers

STUDENT = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
TEACHER = torch.tensor([[3.0, 0.0, -2.0], [-1.0, 2.0, 1.0]])


def hand_kd(student, teacher, t):
    """T^2 * mean over rows of sum_c p_t (log p_t - log p_s), written out with math."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        zs = sum(math.exp(v / t) for v in s_row)
        zt = sum(math.exp(v / t) for v in t_row)
        for sv, tv in zip(s_row, t_row, strict=True):
            pt, ps = math.exp(tv / t) / zt, math.exp(sv / t) / zs
            total += pt * (math.log(pt) - math.log(ps))
    return t * t * total / len(student)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_term_equals_a_hand_computation(t):
    assert kd_term(STUDENT, TEACHER, t).item() == pytest.approx(hand_kd(STUDENT, TEACHER, t))
    # Logits scaled by T soften back to the T=1 distributions: only the T^2 factor remains.
    scaled = kd_term(STUDENT * t, TEACHER * t, t).item()
    assert scaled == pytest.approx(t * t * kd_term(STUDENT, TEACHER, 1.0).item(), rel=1e-5)


def test_alpha_blends_base_loss_and_kd_term():
    base = torch.tensor(0.7)
    kd = hand_kd(STUDENT, TEACHER, 4.0)
    assert distill_loss(base, STUDENT, TEACHER, 4.0, 0.0).item() == pytest.approx(0.7)
    assert distill_loss(base, STUDENT, TEACHER, 4.0, 1.0).item() == pytest.approx(kd)
    mixed = distill_loss(base, STUDENT, TEACHER, 4.0, 0.25).item()
    assert mixed == pytest.approx(0.75 * 0.7 + 0.25 * kd)
    assert kd_term(TEACHER, TEACHER, 4.0).item() == pytest.approx(0.0, abs=1e-7)


class Fixed(nn.Module):
    """A 'network' answering fixed logits, and remembering what it was shown."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return self.logits


def test_an_ensemble_teacher_averages_its_members_logits():
    a, b = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, -2.0]])
    distill = Distillation(
        [Teacher(Path("a"), "best", Fixed(a)), Teacher(Path("b"), "best", Fixed(b))],
        temperature=2.0,
        alpha=0.5,
    )
    x = torch.zeros(1, 3, 4, 4)
    assert torch.equal(distill.teacher_logits(x), (a + b) / 2)
    student, base = torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor(1.5)
    expected = 0.5 * 1.5 + 0.5 * hand_kd(student, (a + b) / 2, 2.0)
    assert distill(x, student, base).item() == pytest.approx(expected)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("teacher"), epochs=3)


def student_argv(npz, tmp_path, *extra):
    return [
        "--preset", "cpu", "--data", str(npz), "--run-dir", str(tmp_path / "student"),
        "--epochs", "2", "--set", "model.width=0.125", "--set", "model.block_channels=[]",
        "--set", f"data.root={tmp_path / 'cache'}", "--set", "optim.batch_size=16",
        "--set", "run.progress=off", "--set", "run.tensorboard=false", *extra,
    ]  # fmt: skip


def test_a_run_with_a_teacher_trains_and_records_it(teacher_run, tiny_npz, tmp_path, capsys):
    second = tmp_path / "teacher-copy"
    shutil.copytree(teacher_run, second)
    code = train_script.main(
        student_argv(tiny_npz, tmp_path, "--teacher", str(teacher_run), str(second))
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"distillation: T=4, alpha=0.5, teacher: {teacher_run} (swa)" in out
    run = tmp_path / "student"
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["config"]["kd"]["teacher"] == [str(teacher_run), str(second)]
    assert "teacher:" in (run / "config.yaml").read_text()
    rows = read_metrics(run / "metrics.jsonl")
    assert all(r["kd_loss"] > 0 and math.isfinite(r["kd_loss"]) for r in rows)


def test_a_study_folder_as_teacher_stands_for_its_finished_members(teacher_run, tiny_npz, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(teacher_run, study / "members" / "seed-0")
    (study / "members" / "seed-1").mkdir(parents=True)  # not finished: no test_report.json
    (study / "study.json").write_text(json.dumps({"members": ["seed-0", "seed-1"]}))
    config = tmp_path / "kd.yaml"
    config.write_text(f"kd: {{teacher: [{study}]}}\n")  # from a config file, not --teacher
    assert train_script.main(student_argv(tiny_npz, tmp_path, "--config", str(config))) == 0
    ckpt = load_checkpoint(tmp_path / "student" / "checkpoints" / "last.pt")
    assert ckpt["config"]["kd"]["teacher"] == [str(study / "members" / "seed-0")]


def test_the_teacher_sees_the_batch_as_mixed(teacher_run, tiny_npz, tmp_path, monkeypatch):
    cfg = tiny_config(
        tiny_npz, tmp_path, "run", f"kd.teacher={teacher_run}", "run.epochs=1",
        "regularize.mixup=true", "regularize.mixup_alpha=1.0", "regularize.mixup_end_epoch=5",
    )  # fmt: skip
    from training.build import build_trainer

    trainer = build_trainer(cfg, Path(cfg.run.run_dir))
    mixed, shown = [], []
    mix, teacher_logits = Mixup.__call__, trainer.distill.teacher_logits

    def spy_mixup(self, x, y, epoch):
        out = mix(self, x, y, epoch)
        mixed.append((x, out[0]))
        return out

    def spy_teacher(x):
        shown.append(x)
        return teacher_logits(x)

    monkeypatch.setattr(Mixup, "__call__", spy_mixup)
    trainer.distill.teacher_logits = spy_teacher
    trainer.fit()
    assert len(mixed) == len(shown) == trainer.batches_per_epoch
    for (before, after), seen in zip(mixed, shown, strict=True):
        assert seen is after and not torch.equal(before, after)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def resized_npz(path: Path, size: int) -> Path:
    data = dict(np.load(brightness_npz(path)))
    for key in [k for k in data if k.endswith("_images")]:
        data[key] = np.repeat(np.repeat(data[key], 2, axis=1), 2, axis=2)[:, :size, :size]
    np.savez(path, **data)
    return path


def test_a_teacher_that_does_not_fit_is_one_line_and_exit_2(
    teacher_run, tiny_npz, tmp_path, capsys
):
    cases = [
        (tiny_npz, ["--set", "data.classes=['0', '1']"], "class names ['0', '1', '2'] differ"),
        (resized_npz(tmp_path / "big.npz", 40), [], "input size 28 px differs from this run's 40"),
    ]
    for i, (npz, extra, expected) in enumerate(cases):
        argv = student_argv(npz, tmp_path / str(i), "--teacher", str(teacher_run), *extra)
        assert train_script.main(argv) == 2
        line = error_line(capsys)
        assert line.startswith(f"error: kd.teacher {teacher_run}: ") and expected in line, line
    missing = tmp_path / "nowhere"
    assert train_script.main(student_argv(tiny_npz, tmp_path / "m", "--teacher", str(missing))) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: kd.teacher {missing}: ") and "does not exist" in line
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert train_script.main(student_argv(tiny_npz, tmp_path / "e", "--teacher", str(empty))) == 2
    assert "no checkpoints in" in error_line(capsys)


def test_resume_with_a_teacher_is_bit_exact(teacher_run, tiny_npz, tmp_path):
    kd = [f"kd.teacher={teacher_run}", "kd.alpha=0.7"]
    straight, _ = fit(tiny_config(tiny_npz, tmp_path, "a", *kd))
    _, summary = fit(tiny_config(tiny_npz, tmp_path, "b", *kd), callbacks=[StopAfter(2)])
    assert summary["stopped"] == "interrupted"
    cfg, ckpt = load_resume(tmp_path / "b")
    assert cfg.kd.teacher == [str(teacher_run)]  # the stored config rebuilds the teacher
    resumed, _ = fit(cfg, resume=ckpt)
    assert resumed.distill is not None and resumed.start_epoch == 3
    assert same_weights(straight.model.state_dict(), resumed.model.state_dict())
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # alpha 0 leaves the student's training exactly as it is without a teacher.
    plain, _ = fit(tiny_config(tiny_npz, tmp_path, "c"))
    zero, _ = fit(tiny_config(tiny_npz, tmp_path, "d", f"kd.teacher={teacher_run}", "kd.alpha=0"))
    assert same_weights(plain.model.state_dict(), zero.model.state_dict())
    assert not same_weights(plain.model.state_dict(), straight.model.state_dict())


def test_a_teacher_with_other_normalisation_gets_the_batch_renormalised(teacher_run):
    ckpt = load_checkpoint(teacher_run / "checkpoints" / "best.pt")
    mean, std = [0.2, 0.3, 0.4], [0.1, 0.2, 0.3]
    kwargs = {"class_names": ["0", "1", "2"], "input_size": 28, "channels": 3}
    teachers, notes = load_teachers(
        [teacher_run], "final", **kwargs, mean=mean, std=std, device=torch.device("cpu")
    )
    (teacher,) = teachers
    assert len(notes) == 1 and "re-normalised" in notes[0] and str(teacher_run) in notes[0]
    image = torch.rand(2, 3, 28, 28)
    as_student = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    t_mean, t_std = torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])
    as_teacher = (image - t_mean[:, None, None]) / t_std[:, None, None]
    spy = Fixed(torch.zeros(2, 3))
    teacher.model = spy
    teacher(as_student)
    assert torch.allclose(spy.seen[0], as_teacher, atol=1e-5)
    # The same statistics: no note and the batch goes in untouched.
    same, notes = load_teachers(
        [teacher_run], "final", **kwargs, mean=ckpt["mean"], std=ckpt["std"],
        device=torch.device("cpu"),
    )  # fmt: skip
    assert notes == [] and same[0].scale is None
    assert not any(p.requires_grad for p in same[0].model.parameters())
    assert not same[0].model.training


def test_a_teacher_with_progressive_resizing_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="kd.teacher and data.resize_schedule cannot be combined"):
        load_config(
            "cpu", overrides=["kd.teacher=runs/a", "data.resize_schedule=[[0, 16], [0.5, 28]]"]
        )


def test_kd_config_fields():
    assert load_config("cpu", overrides=["kd.teacher=runs/a"]).kd.teacher == ["runs/a"]
    assert load_config("cpu", overrides=["kd.teacher=[a, b]"]).kd.teacher == ["a", "b"]
    assert load_config("cpu", overrides=["kd.teacher="]).kd.teacher == []
    with pytest.raises(
        ConfigError, match=r"kd.alpha=1.5 is invalid; allowed: a number in \[0, 1\]"
    ):
        load_config("cpu", overrides=["kd.teacher=a", "kd.alpha=1.5"])
    with pytest.raises(ConfigError, match="kd.temperature=0.0 is invalid; allowed: a number > 0"):
        load_config("cpu", overrides=["kd.teacher=a", "kd.temperature=0"])
    with pytest.raises(
        ConfigError, match="kd.temperature=2.0 has no effect while kd.teacher=\\[\\]"
    ):
        load_config("cpu", overrides=["kd.temperature=2"])
