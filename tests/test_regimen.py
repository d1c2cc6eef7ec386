"""The regimen wired into the loop: every feature acting in one small run, and exact resume.

The run is a tiny, easily separable dataset (classes differ in brightness) trained with the CPU
preset and boundaries shrunk to a few epochs. A callback fills the weights with NaN at the first
batch of epoch 5, so the rollback has something to undo; the dropout gaps are set so that every
decision raises the rates. Validation reaches 100% early, so the later epochs cannot improve:
that drives the plateau cut and early stopping.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from losses import WeightedCrossEntropy
from tests.conftest import brightness_npz
from tests.test_trainer import StopAfter
from training.build import build_trainer, load_resume
from training.callbacks.class_penalty import ClassPenalty, ClassPenaltyControl
from training.callbacks.early_stop import EarlyStop
from training.callbacks.metrics_log import read_metrics
from training.callbacks.regimen import earliest_stop_epoch, regimen_callbacks
from training.config.schema import load_config, staged_schedule
from training.engine.checkpoint import load_checkpoint
from training.engine.events import Callback
from training.engine.inference import predict
from training.engine.schedule import group_multiplier, staged_lr
from training.evaluation.calibration import nll
from training.evaluation.report import build_model, evaluate_run

SABOTAGED_EPOCH = 5


@pytest.fixture
def separable_npz(tmp_path):
    return brightness_npz(tmp_path / "separable.npz", counts=(96, 24, 24), noise=60)


def regimen_config(npz: Path, tmp_path: Path, run: str, *extra: str):
    return load_config(
        preset="cpu",
        overrides=[
            f"data.source={npz}",
            f"data.root={tmp_path / 'cache'}",
            "data.aug_start_strength=0.2",
            "data.aug_strength=0.5",
            "data.aug_ramp_epochs=3",
            "model.width=0.125",
            "model.block_channels=[]",  # the preset's block_channels would win over width
            "optim.batch_size=16",
            "run.epochs=12",
            "run.progress=plain",
            "run.tensorboard=false",
            f"run.run_dir={tmp_path / run}",
            "unfreeze.activate_at=[2, 4]",
            "unfreeze.plateau_patience=0",
            "schedule.onecycle_end_epoch=3",
            "schedule.cosine_end_epoch=4",
            "schedule.floor_epochs=[4, 8]",
            "schedule.onecycle_end_ratio=1.0",
            "schedule.cosine_end_ratio=0.5",
            "schedule.floor_lrs=[5e-4, 1e-4]",
            "regularize.mixup_end_epoch=3",
            "regularize.overfit_gap=-1.0",
            "regularize.underfit_gap=-2.0",
            "safety.swa_start_epoch=5",
            "safety.patience=6",
            *extra,
        ],
    )


class Sabotage(Callback):
    """Fills every weight with NaN after the first batch of ``SABOTAGED_EPOCH``."""

    def on_batch_end(self, trainer, batch, loss, stepped):
        if trainer.epoch == SABOTAGED_EPOCH and batch == 0:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.fill_(math.nan)


def fit(cfg, resume=None, callbacks=()):
    trainer = build_trainer(
        cfg, Path(cfg.run.run_dir), resume=resume, extra_callbacks=[Sabotage(), *callbacks]
    )
    return trainer, trainer.fit()


def kinds(row: dict) -> list[str]:
    return [event["kind"] for event in row["events"]]


@pytest.fixture
def straight_run(separable_npz, tmp_path, capsys):
    trainer, summary = fit(regimen_config(separable_npz, tmp_path, "straight"))
    return trainer, summary, capsys.readouterr().out


def test_every_feature_acts_in_metrics_and_on_the_console(straight_run, tmp_path):
    trainer, summary, out = straight_run
    run = tmp_path / "straight"
    rows = read_metrics(run / "metrics.jsonl")
    by_epoch = {r["epoch"]: r for r in rows}
    # progressive unfreezing: blocks 2 and 3 at the end of epochs 2 and 4
    assert [r["active_blocks"] for r in rows][:5] == [1, 1, 2, 2, 3]
    assert "stage" in kinds(by_epoch[2]) and "stage" in kinds(by_epoch[4])
    assert "STAGE 2: block2 active" in out and "STAGE 3: block3 active" in out
    assert len(by_epoch[5]["lr"]) == 3  # one parameter group per active block
    # Mixup: alpha decays to 0 by epoch 3; augmentation strength ramps up over 3 epochs
    alphas = [r["mixup_alpha"] for r in rows]
    assert alphas[0] > alphas[1] > alphas[2] > 0 and alphas[3] == 0
    strengths = [r["aug_strength"] for r in rows]
    assert strengths[0] < strengths[1] < strengths[2] < strengths[3] == strengths[-1]
    # dynamic dropout: not while Mixup distorts the gap, then raised once per epoch
    assert by_epoch[2]["dropout"] == by_epoch[1]["dropout"]
    assert all(b > a for a, b in zip(by_epoch[4]["dropout"], by_epoch[6]["dropout"], strict=True))
    assert "dropout" in kinds(by_epoch[4])
    # class penalty: per-class weights in every row (but a rolled-back one), bounded
    for r in (r for r in rows if "rollback" not in r):
        assert len(r["class_penalty"]) == 3
        assert all(0.5 <= w <= 2.0 for w in r["class_penalty"])
    # rollback after the NaN epoch: banner, best weights back, lr cut
    assert by_epoch[SABOTAGED_EPOCH]["rollback"].startswith("rollback: non-finite loss")
    assert "ROLLBACK 1/3" in out
    assert by_epoch[SABOTAGED_EPOCH + 1]["train_loss"] < 10  # training went on from the best
    # reduce-on-plateau in the last phase (val accuracy is at 100% and cannot improve)
    assert any("lr_plateau_scale" in r for r in rows)
    # early stopping, never before the last activation
    assert summary["stopped"].startswith("early stop")
    assert rows[-1]["epoch"] < 12 and "early_stop" in rows[-1]
    # SWA from epoch 5, saved with BatchNorm statistics recomputed
    assert summary["swa"]["models"] == rows[-1]["epoch"] - 5 + 1
    swa = load_checkpoint(run / "checkpoints" / "swa.pt")
    assert swa["swa"]["models"] == summary["swa"]["models"]
    # temperature stored in best.pt and swa.pt, logged in metrics.jsonl; every val image is
    # right, so T cannot be fitted: kept at 1, with the reason and a one-line warning
    end = read_metrics(run / "metrics.jsonl", events=True)[-1]
    assert end["event"] == "fit_end" and set(end["calibration"]) == {"best", "swa"}
    for name in ("best", "swa"):
        ckpt = load_checkpoint(run / "checkpoints" / f"{name}.pt")
        assert ckpt["temperature"] == end["calibration"][name]["temperature"] == 1.0
        assert ckpt["temperature_tta"] == "none"  # run.tta's default: one pass
        assert ckpt["temperature_reason"].startswith("every validation image is right")
    assert "WARNING: temperature kept at 1; the validation split may leak into training" in out
    assert "temperature best" in out and "temperature swa" in out and "SWA finished" in out
    assert (run / "lr_schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_from_the_middle_is_exact(straight_run, separable_npz, tmp_path):
    straight, summary, _ = straight_run
    # The same run stopped right after the rollback (block 3 active, SWA started), resumed.
    cfg = regimen_config(separable_npz, tmp_path, "resumed")
    _, first = fit(cfg, callbacks=[StopAfter(SABOTAGED_EPOCH)])
    assert first["stopped"] == "interrupted"
    cfg2, ckpt = load_resume(tmp_path / "resumed")
    resumed, second = fit(cfg2, resume=ckpt)
    assert resumed.start_epoch == SABOTAGED_EPOCH + 1
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second["stopped"] == summary["stopped"]
    skip = {"epoch_s", "images_per_s", "events"}
    rows_a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k not in skip} for r in rows_a] == [
        {k: v for k, v in r.items() if k not in skip} for r in rows_b
    ]
    swa_a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "swa.pt")["model"]
    swa_b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "swa.pt")["model"]
    assert all(torch.equal(swa_a[k], swa_b[k]) for k in swa_a)


def test_report_puts_best_and_swa_side_by_side_with_why_t_was_kept(straight_run, tmp_path):
    report = evaluate_run(tmp_path / "straight", device="cpu")
    # A temperature kept at 1 would repeat its weight set's row: no +T rows, the reason instead.
    assert list(report["weights"]) == ["best", "swa"]
    for name in ("best", "swa"):
        assert report["checkpoints"][name]["temperature"] == 1.0
        assert "is not identifiable" in report["checkpoints"][name]["temperature_reason"]


def test_every_group_follows_the_schedule_after_activation(separable_npz, tmp_path):
    cfg = regimen_config(separable_npz, tmp_path, "groups", "unfreeze.enabled=false")
    trainer = build_trainer(cfg, tmp_path / "groups")
    spe = trainer.steps_per_epoch
    for _ in range(spe):
        trainer.schedule.step()
    trainer.unfreeze_to(2, lr_mult=0.5, warmup_epochs=1.0, old_group_decay=0.8)
    groups = trainer.optimizer.param_groups
    assert [g["name"] for g in groups] == ["block1", "block2"]
    staged = staged_schedule(cfg)
    for _ in range(3 * spe):  # through warmup into one-cycle; the new group keeps its ratio
        trainer.schedule.step()
        step = trainer.schedule.last_step
        lr = staged_lr(step, spe, staged)
        assert groups[0]["lr"] == pytest.approx(lr * 0.8)
        warm = min(1.0, (step - spe) / spe)
        assert groups[1]["lr"] == pytest.approx(lr * 0.5 * (0.1 + 0.9 * warm))
        assert group_multiplier(groups[1], step) == pytest.approx(0.5 * (0.1 + 0.9 * warm))


def test_rollback_restores_the_best_weights_and_cuts_the_lr(separable_npz, tmp_path):
    cfg = regimen_config(separable_npz, tmp_path, "rb", "run.epochs=2", "safety.swa=false")
    trainer = build_trainer(cfg, tmp_path / "rb")
    trainer.fit()
    best = load_checkpoint(tmp_path / "rb" / "checkpoints" / "best.pt")
    before = trainer.schedule.lrs()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    trainer.restore_best(0.5)
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], best["model"][k]) for k in state)
    assert trainer.schedule.lrs() == pytest.approx([lr * 0.5 for lr in before])


def test_switches_turn_features_off(separable_npz, tmp_path):
    off = [
        "unfreeze.enabled=false",
        "regularize.mixup=false",
        "regularize.dynamic_dropout=false",
        "balance.penalty=false",
        "safety.rollback=false",
        "safety.early_stop=false",
        "safety.swa=false",
        "safety.temperature=false",
        "run.epochs=3",
    ]
    cfg = regimen_config(separable_npz, tmp_path, "off", *off)
    trainer = build_trainer(cfg, tmp_path / "off")
    assert trainer.mixup is None
    names = [cb.key for cb in trainer.callbacks]
    assert names[0] == "lr_plateau" and "unfreeze" not in names and "swa" not in names
    trainer.fit()
    rows = read_metrics(tmp_path / "off" / "metrics.jsonl")
    assert [r["active_blocks"] for r in rows] == [1, 1, 1]
    assert not (tmp_path / "off" / "checkpoints" / "swa.pt").exists()
    assert "temperature" not in load_checkpoint(tmp_path / "off" / "checkpoints" / "best.pt")
    assert all("class_penalty" not in r and "mixup_alpha" not in r for r in rows)


def test_temperature_is_fitted_on_the_test_time_augmented_logits(separable_npz, tmp_path, capsys):
    from training.evaluation.calibration import choose_temperature
    from training.evaluation.report import evaluate_run

    off = ["unfreeze.enabled=false", "safety.swa=false", "safety.early_stop=false"]
    cfg = regimen_config(separable_npz, tmp_path, "tta", *off, "run.epochs=2", "run.tta=auto")
    trainer = build_trainer(cfg, tmp_path / "tta")
    trainer.fit()
    assert "tta=d4" in capsys.readouterr().out
    best = load_checkpoint(tmp_path / "tta" / "checkpoints" / "best.pt")
    assert best["temperature_tta"] == "d4"  # "auto" on colour images
    model = build_model(best)
    # The logits as the fit saw them: under the run's autocast dtype.
    val, cpu = trainer.loaders["val"], torch.device("cpu")
    logits, labels = predict(model, val, cpu, trainer.amp_dtype, tta="d4")
    fitted = choose_temperature(logits, labels).temperature
    assert best["temperature"] == pytest.approx(fitted, rel=1e-5)
    single, _ = predict(model, trainer.loaders["val"], torch.device("cpu"), None)
    assert not torch.allclose(single, logits)

    report = evaluate_run(tmp_path / "tta", device="cpu")  # the run's own mode by default
    assert report["tta"] == "d4" and list(report["weights"]) == ["best", "best+T"]
    one_pass = evaluate_run(tmp_path / "tta", device="cpu", tta="none")
    assert one_pass["tta"] == "none" and list(one_pass["weights"]) == ["best"]  # T is d4's
    assert one_pass["weights"]["best"]["nll"] != report["weights"]["best"]["nll"]


def test_weighted_loss_takes_labels_or_soft_targets():
    from losses import WeightedCrossEntropy

    torch.manual_seed(0)
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = WeightedCrossEntropy(3, torch.tensor([1.0, 2.0, 0.5]))
    loss.set_penalty([1.0, 1.5, 1.0])
    weight = torch.tensor([1.0, 3.0, 0.5])
    hard = torch.nn.functional.cross_entropy(logits, y, weight=weight)
    assert loss(logits, y) == pytest.approx(hard.item())
    soft = torch.nn.functional.one_hot(y, 3).float()
    assert loss(logits, soft) == pytest.approx(hard.item())
    with pytest.raises(ValueError, match=r"penalty has shape \(2,\); allowed: \(3,\)"):
        loss.set_penalty([1.0, 1.0])
    plain = WeightedCrossEntropy(3)
    assert plain(logits, y) == pytest.approx(nll(logits, y), rel=1e-5)


def test_focal_gamma_reaches_the_training_loss(separable_npz, tmp_path):
    from rich.console import Console

    quiet = Console(file=io.StringIO())
    cfg = regimen_config(separable_npz, tmp_path, "ce")
    ce = build_trainer(cfg, tmp_path / "ce", console=quiet).criterion
    cfg = regimen_config(separable_npz, tmp_path, "focal", "optim.focal_gamma=2")
    focal = build_trainer(cfg, tmp_path / "focal", console=quiet).criterion
    assert (ce.gamma, focal.gamma) == (0.0, 2.0)
    assert torch.equal(focal.base, ce.base)  # the class weights do not change


def test_balanced_sampling_with_weighted_loss_warns_once_at_start(separable_npz, tmp_path):
    from rich.console import Console

    out = io.StringIO()
    cfg = regimen_config(separable_npz, tmp_path, "both", "data.balanced_sampling=true")
    build_trainer(cfg, tmp_path / "both", console=Console(file=out, width=200))
    assert out.getvalue().count("class imbalance is corrected twice") == 1
    out = io.StringIO()
    cfg = regimen_config(
        separable_npz, tmp_path, "one", "data.balanced_sampling=true", "balance.loss_weights=none"
    )
    build_trainer(cfg, tmp_path / "one", console=Console(file=out, width=200))
    assert "corrected twice" not in out.getvalue()


def test_best_checkpoint_holds_the_model_as_validated(separable_npz, tmp_path):
    # Block 2 activates at the end of epoch 1, which is also the best epoch: best.pt must hold
    # the depth-1 model that was validated, not the one the activation made.
    cfg = regimen_config(
        separable_npz,
        tmp_path,
        "asval",
        "run.epochs=1",
        "unfreeze.activate_at=[1]",
        "unfreeze.min_gap=1",
        "safety.temperature=false",
        "safety.swa=false",  # the fixture's swa_start_epoch=5 would never start in one epoch
    )
    trainer = build_trainer(cfg, tmp_path / "asval")
    trainer.fit()
    assert trainer.model.active_blocks == 2
    ckpt = load_checkpoint(tmp_path / "asval" / "checkpoints" / "best.pt")
    assert ckpt["active_blocks"] == 1 and ckpt["epoch"] == 1
    model = build_model(ckpt)
    logits, labels = predict(model, trainer.loaders["val"], torch.device("cpu"), None)
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    assert accuracy == pytest.approx(trainer.best["value"])


def test_head_blend_starts_from_the_old_head_and_fades_in_over_its_steps(separable_npz, tmp_path):
    cfg = regimen_config(separable_npz, tmp_path, "blend", "unfreeze.enabled=false")
    trainer = build_trainer(cfg, tmp_path / "blend")
    model = trainer.model.eval()
    x = torch.randn(5, 3, 28, 28)
    before = model(x)
    trainer.unfreeze_to(2, head_blend_epochs=0.5)
    # No jump at the switch: the classifier still reads block 1's head.
    assert model.head_mix == 0.0
    assert torch.allclose(model(x), before, atol=1e-6)
    blend_steps = trainer.optimizer.param_groups[-1]["blend_steps"]
    assert blend_steps == round(0.5 * trainer.steps_per_epoch) > 1
    mixes = []
    for _ in range(blend_steps + 2):
        trainer.stepper.step += 1  # as an optimizer step does
        trainer._advance_head_mix()
        mixes.append(model.head_mix)
    assert mixes[:blend_steps] == pytest.approx([(i + 1) / blend_steps for i in range(blend_steps)])
    assert mixes[-2:] == [1.0, 1.0]


def test_head_mix_is_saved_and_restored_with_the_checkpoint(separable_npz, tmp_path):
    cfg = regimen_config(separable_npz, tmp_path, "mixck", "unfreeze.enabled=false")
    trainer = build_trainer(cfg, tmp_path / "mixck")
    trainer.unfreeze_to(2, head_blend_epochs=2.0)
    trainer.model.set_head_mix(0.375)
    path = trainer.save("last.pt")
    assert load_checkpoint(path)["head_mix"] == 0.375
    resumed = build_trainer(cfg, tmp_path / "mixck", resume=load_checkpoint(path))
    assert resumed.model.active_blocks == 2 and resumed.model.head_mix == 0.375


def test_an_activation_without_blend_switches_heads_at_once(separable_npz, tmp_path, capsys):
    cfg = regimen_config(separable_npz, tmp_path, "hard", "unfreeze.enabled=false")
    trainer = build_trainer(cfg, tmp_path / "hard")
    trainer.unfreeze_to(2, head_blend_epochs=0.0)
    assert trainer.model.head_mix == 1.0
    assert "head 1 -> 2: switched at once" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "last_quiet_epoch"),
    [
        ([], 24),  # the cpu preset: blocks in by epoch 4, SWA from 24
        (["safety.swa=false"], 4),
        (["unfreeze.enabled=false"], 24),
        (["unfreeze.enabled=false", "safety.swa=false"], 0),
    ],
)
def test_early_stopping_waits_for_every_block_and_for_swa(overrides, last_quiet_epoch):
    cfg = load_config(preset="cpu", overrides=overrides)
    assert earliest_stop_epoch(cfg) == last_quiet_epoch
    criterion = WeightedCrossEntropy(3)
    stop = next(c for c in regimen_callbacks(cfg, criterion, None) if isinstance(c, EarlyStop))
    assert stop.stopper.not_before_epoch == last_quiet_epoch


# ------------------------------------------------------------------------------- banners


def test_the_console_shows_each_decision_once_right_after_its_epoch_line(straight_run, tmp_path):
    _, _, out = straight_run
    rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    lines = out.splitlines()
    for row in rows:
        # The epoch's line, then its decisions' banners in the order they were taken, then the
        # next epoch's progress (warnings are printed the moment they come).
        start = next(i for i, x in enumerate(lines) if x.startswith(f"epoch {row['epoch']:>2}/"))
        titles = []
        for line in lines[start + 1 :]:
            if line.startswith(("epoch ", "  epoch ", "─")):
                break
            if not line.startswith(("   ", "WARNING: ")):  # a banner's body, a warning
                titles.append(line.removeprefix("-- ").removeprefix("== "))
        if row is rows[-1]:  # the run's end follows its last epoch
            assert titles.pop().startswith("SWA finished: ")
        events = [e for e in row["events"] if e["banner"] and e["kind"] != "warning"]
        assert len(titles) == len(events), row["epoch"]
        for title, event in zip(titles, events, strict=True):
            assert title.startswith(event["title"])
    warnings = [e for r in rows for e in r["events"] if e["kind"] == "warning"]
    assert warnings and all(f"WARNING: {e['title']}" in out for e in warnings)
    # The stage changes always get a banner; the plateau cut is kept in the log only.
    assert sum(line.startswith("== STAGE ") for line in lines) == 2
    quiet = [e for r in rows for e in r["events"] if not e["banner"]]
    assert {e["kind"] for e in quiet} == {"schedule"}
    assert all(e["title"] not in out for e in quiet)


def penalty_run(recalls: list[list[float]], resume_at: int | None = None) -> list[str]:
    """Feed ClassPenaltyControl one epoch per recall vector (train accuracy alike, so only the
    recall shortfall counts); returns the banners' lines. ``resume_at``: restart the control
    from its state_dict after that epoch, as a resumed run does."""
    names = ["benign", "malignant", "normal"]
    notices: list[str] = []

    def notify(kind, title, lines=(), banner=True):
        assert kind == "balance" and banner
        notices.extend(lines)

    trainer = SimpleNamespace(rolled_back=False, cache=SimpleNamespace(class_names=names))
    trainer.notify = notify
    control = ClassPenaltyControl(ClassPenalty(3), WeightedCrossEntropy(3))
    for epoch, recall in enumerate(recalls, start=1):
        metrics = {"epoch": epoch, "train_acc_per_class": recall, "val_recall_per_class": recall}
        control.on_validation_end(trainer, metrics)
        if epoch == resume_at:
            state = control.state_dict()
            control = ClassPenaltyControl(ClassPenalty(3), WeightedCrossEntropy(3))
            control.load_state_dict(state)
    return notices


def test_a_class_penalty_that_jitters_every_epoch_gives_no_banner():
    # "normal" is recalled badly every other epoch: its weight moves by 0.05-0.1 each epoch
    # (a banner per epoch under a fixed 0.05 rule) but never drifts far from where it started.
    recalls = [[0.9, 0.9, 0.3] if epoch % 2 else [0.9, 0.9, 0.9] for epoch in range(30)]
    assert penalty_run(recalls) == []


def test_a_class_penalty_that_drifts_past_the_threshold_gives_one_banner_per_drift():
    # "normal" is badly recalled for 10 epochs, then as well as the others.
    recalls = [[0.9, 0.9, 0.1]] * 10 + [[0.9, 0.9, 0.9]] * 20
    notices = penalty_run(recalls)
    assert len(notices) == 2
    assert notices[0].startswith("normal 1.00 -> ") and notices[0].endswith("since the start")
    assert notices[1].startswith("normal ") and " since epoch " in notices[1]
    assert penalty_run(recalls, resume_at=12) == notices  # the reference survives a resume


class InfiniteVariances(Callback):
    """Sets every BatchNorm running variance to inf at the end of an epoch, as --lr 1e3 did."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_batch_end(self, trainer, batch, loss, stepped):
        if trainer.epoch == self.epoch and batch == trainer.batches_per_epoch - 1:
            for module in trainer.model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_var.fill_(math.inf)


def test_a_non_finite_state_is_never_kept_and_rolls_back_to_the_last_finite_one(
    separable_npz, tmp_path
):
    cfg = regimen_config(separable_npz, tmp_path, "inf", "run.epochs=5")
    _, summary = fit(cfg, callbacks=[InfiniteVariances(2)])
    assert summary["stopped"] is None
    rows = read_metrics(tmp_path / "inf" / "metrics.jsonl")
    assert rows[1]["rollback"].startswith("rollback: non-finite")
    assert not rows[1]["is_best"]
    for name in ("rollback.pt", "best.pt", "last.pt"):
        state = load_checkpoint(tmp_path / "inf" / "checkpoints" / name)["model"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), name
