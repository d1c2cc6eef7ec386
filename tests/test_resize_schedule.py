"""Progressive resizing: the schedule, its checks, a tiny run at two sizes and its exact resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from tests.test_trainer import InterruptAt, same_weights, tiny_config
from training.build import build_trainer, load_resume
from training.callbacks.metrics_log import read_metrics
from training.config.plan import plan_lines
from training.config.schema import ConfigError, load_config
from training.engine.checkpoint import load_checkpoint
from training.engine.events import Callback
from training.engine.resize import ProgressiveResize, size_at, swa_note

SCHEDULE = [[0, 32], [0.4, 48], [0.7, 64]]

# --------------------------------------------------------------------------- size_at


@pytest.mark.parametrize(
    "progress, size",
    [(0.0, 32), (0.399, 32), (0.4, 48), (0.5, 48), (0.6999, 48), (0.7, 64), (0.99, 64), (1.0, 64)],
)
def test_size_at_changes_at_each_start(progress, size):
    assert size_at(SCHEDULE, progress) == size


def test_a_single_pair_is_one_size_throughout():
    assert {size_at([[0, 28]], p) for p in (0, 0.5, 1)} == {28}


def test_resize_downscales_with_antialias_and_leaves_the_full_size_alone():
    resize = ProgressiveResize([[0, 16], [0.5, 28]], epochs=4, batches_per_epoch=6)
    # A one-pixel checkerboard: plain bilinear sampling at 16/28 keeps a strong pattern
    # (aliasing); the antialiased filter averages it to a nearly flat grey.
    board = (torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2
    x = board.float().expand(2, 3, 28, 28).contiguous()
    small = resize(x, 0.5)  # 0.5 of 4 epochs: the first size
    assert small.shape == (2, 3, 16, 16)
    aliased = F.interpolate(x, (16, 16), mode="bilinear", align_corners=False)
    assert small.std() < 0.5 * aliased.std()
    assert resize(x, 2.0) is x  # the final size: the batch itself, no copy


# --------------------------------------------------------------------------- validation


def schedule_error(value: str, *extra: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config("cpu", overrides=[f"data.resize_schedule={value}", *extra])
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data.resize_schedule=")
    return message


@pytest.mark.parametrize(
    "value, says",
    [
        ("[[0, 32], [0.7, 48], [0.4, 64]]", "strictly increasing starts"),
        ("[[0.1, 32], [0.5, 64]]", "first start is 0"),
        ("[[0, 32], [1, 64]]", "in [0, 1)"),
        ("[[0, 48], [0.5, 32]]", "strictly increasing sizes"),
        ("[[0, 32.5], [0.5, 64]]", "whole number of px"),
        ("[[0, 32, 1]]", "[start, size] pairs"),
    ],
)
def test_a_bad_schedule_is_refused_in_one_line(value, says):
    assert says in schedule_error(value)


def test_the_last_size_must_be_the_image_size_set_for_a_folder():
    message = schedule_error("[[0, 32], [0.5, 60]]", "data.image_size=64")
    assert "data.image_size=64" in message and "got 60" in message


def test_empty_is_off_and_a_good_schedule_is_kept():
    assert load_config("cpu").data.resize_schedule == []
    cfg = load_config("cpu", overrides=[f"data.resize_schedule={SCHEDULE}"])
    assert cfg.data.resize_schedule == SCHEDULE


def test_the_plan_shows_the_sizes():
    cfg = load_config("cpu", overrides=[f"data.resize_schedule={SCHEDULE}", "run.epochs=30"])
    (line,) = [line for line in plan_lines(cfg) if "input size" in line]
    assert "32 px, 48 px from epoch 13 (40%), 64 px from epoch 22 (70%)" in line
    off = load_config("cpu")
    assert not [line for line in plan_lines(off) if "input size" in line]


def test_swa_before_the_last_size_is_named():
    assert "mixes weights" in swa_note(SCHEDULE, 30, 10)
    assert "safety.swa_start_epoch >= 22" in swa_note(SCHEDULE, 30, 10)
    assert swa_note(SCHEDULE, 30, 22) is None  # epoch 22 trains over [21, 22), all at 64 px
    assert swa_note([[0, 64]], 30, 1) is None


# --------------------------------------------------------------------------- a tiny run


def resize_config(tiny_npz, tmp_path, run="run", *extra):
    # Block strides (1, 2, 2) take 13 px and more (28 px with the default ones), so 16 px fits.
    return tiny_config(
        tiny_npz,
        tmp_path,
        run,
        "model.block_strides=[1, 2, 2]",
        "data.resize_schedule=[[0, 16], [0.5, 28]]",
        "run.epochs=4",
        "unfreeze.enabled=false",
        "safety.early_stop=false",
        "safety.swa_start_epoch=2",  # averages epoch 2, trained at 16 px
        *extra,
    )


class ForwardShapes(Callback):
    """Records every forward's input side and mode, and the phase of the run it came in."""

    def __init__(self):
        self.calls: list[tuple[str, bool, int]] = []
        self.phase = "epoch 1"

    def attach(self, model):
        model.register_forward_pre_hook(
            lambda module, args: self.calls.append((self.phase, module.training, args[0].shape[-1]))
        )

    def on_epoch_start(self, trainer, epoch):
        self.phase = f"epoch {epoch}"

    def on_validation_end(self, trainer, metrics):
        if metrics["epoch"] == trainer.config.run.epochs:
            self.phase = "end"  # after the last validation: SWA's BatchNorm update, temperature

    def sizes(self, phase, training):
        return {s for p, t, s in self.calls if p == phase and t == training}


def test_a_run_trains_and_validates_small_first_and_ends_at_full_size(tiny_npz, tmp_path):
    cfg = resize_config(tiny_npz, tmp_path)
    spy = ForwardShapes()
    trainer = build_trainer(cfg, tmp_path / "run", extra_callbacks=[spy])
    spy.attach(trainer.model)  # AveragedModel's copy keeps the hook: SWA's forwards count too
    summary = trainer.fit()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["input_size"] for r in rows] == [16, 16, 28, 28]
    changes = [e["title"] for r in rows for e in r.get("events", []) if e["kind"] == "resize"]
    assert changes == ["INPUT SIZE 16 -> 28 px"]
    for epoch, size in ((1, 16), (2, 16), (3, 28), (4, 28)):
        assert spy.sizes(f"epoch {epoch}", training=True) == {size}
        # Validation at the size the epoch trained at, so its decisions compare like with like.
        assert spy.sizes(f"epoch {epoch}", training=False) == {size}
    assert summary["swa"]["models"] == 3
    # The end phase: SWA's BatchNorm update (train mode) and the temperature fit at 28 px.
    assert spy.sizes("end", training=True) == {28}
    assert spy.sizes("end", training=False) == {28}


def test_resume_inside_the_epoch_of_the_size_change_is_exact(tiny_npz, tmp_path):
    # 6 batches an epoch; the change at 0.6 of 4 epochs = 2.4 epochs: epoch 3, batch index 3.
    change = "data.resize_schedule=[[0, 16], [0.6, 28]]"
    straight = build_trainer(resize_config(tiny_npz, tmp_path, "a", change), tmp_path / "a")
    straight.fit()
    cfg = resize_config(tiny_npz, tmp_path, "b", change)
    interrupted = build_trainer(cfg, tmp_path / "b", extra_callbacks=[InterruptAt(3, 1)])
    assert interrupted.fit()["stopped"] == "interrupted"
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert ckpt["progress"]["epoch"] == 3 and ckpt["progress"]["batches_done"] == 2  # at 16 px
    cfg2, ckpt2 = load_resume(tmp_path / "b")
    resumed = build_trainer(cfg2, tmp_path / "b", resume=ckpt2)
    resumed.fit()
    assert same_weights(straight.model.state_dict(), resumed.model.state_dict())
    swa = [load_checkpoint(tmp_path / r / "checkpoints" / "swa.pt")["model"] for r in "ab"]
    assert same_weights(*swa)
    sizes = [[r["input_size"] for r in read_metrics(tmp_path / d / "metrics.jsonl")] for d in "ab"]
    assert sizes[0] == sizes[1] == [16, 16, 28, 28]


def test_a_size_below_the_model_minimum_is_refused_with_the_minimum(tiny_npz, tmp_path):
    cfg = tiny_config(tiny_npz, tmp_path, "run", "data.resize_schedule=[[0, 16], [0.5, 28]]")
    with pytest.raises(ConfigError) as caught:
        build_trainer(cfg, tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("data.resize_schedule=[[0, 16], [0.5, 28]] is invalid")
    assert "sizes >= 25 px" in message and "(got 16)" in message


def test_a_last_size_other_than_the_images_is_refused(tiny_npz, tmp_path):
    cfg = resize_config(tiny_npz, tmp_path, "run", "data.resize_schedule=[[0, 16], [0.5, 24]]")
    with pytest.raises(ConfigError, match=r"equal to the images' size, 28 px \(got 24\)"):
        build_trainer(cfg, tmp_path / "run")
