"""Zoo models through the whole regimen: thaw and grow, frozen BatchNorm, weights, exact resume.

The runs are tiny (48 images of 28 px, a few epochs) but real: the engine, the callbacks, the
checkpoints and test.py's report, with torchvision's resnet18 and a timm test network.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from models.registry import build_model, stage_names
from tests.test_trainer import StopAfter, same_weights
from training.build import build_trainer, load_resume
from training.callbacks.metrics_log import read_metrics
from training.config.schema import ConfigError, load_config
from training.engine.checkpoint import load_checkpoint
from training.engine.events import Callback
from training.evaluation.report import evaluate_run

TIMM = "timm/test_resnet"


def zoo_config(npz, tmp_path, run, arch, *extra):
    return load_config(
        preset="cpu",
        overrides=[
            f"data.source={npz}",
            f"data.root={tmp_path / 'cache'}",
            f"model.arch={arch}",
            "optim.batch_size=16",
            "run.epochs=3",
            "run.progress=off",
            "run.tensorboard=false",
            f"run.run_dir={tmp_path / run}",
            *extra,
        ],
    )


THAW = (
    "unfreeze.activate_at=[1, 2, 3, 4]",
    "unfreeze.lr_mult=[1, 1, 1, 1]",
    "unfreeze.min_gap=1",
    "unfreeze.old_group_decay=0.5",
    "unfreeze.warmup_epochs=0",
    "run.epochs=5",
    "safety.swa_start_epoch=5",
    "model.stem=imagenet",  # 28 px shrink to 1 px: a fast network for these checks
)


GROW = (
    "unfreeze.direction=grow",
    "unfreeze.activate_at=[1, 2, 3]",
    "unfreeze.lr_mult=[1, 1, 1]",
    "unfreeze.min_gap=1",
    "run.epochs=5",
    "safety.swa_start_epoch=5",
)


def fit(cfg, resume=None, callbacks=None, console=None):
    trainer = build_trainer(
        cfg,
        Path(cfg.run.run_dir),
        resume=resume,
        extra_callbacks=callbacks,
        console=console or Console(file=StringIO()),
    )
    return trainer, trainer.fit()


@pytest.fixture
def imagenet_like(tmp_path):
    """Random resnet18 weights saved as a file, standing in for pretrained ones."""
    torch.manual_seed(7)
    model = build_model(
        "resnet18", in_channels=3, num_classes=1000, input_size=224, options={"stem": "imagenet"}
    )
    with torch.no_grad():  # statistics a reset or an update would visibly change
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.5)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18.pth"
    torch.save(model.net.state_dict(), path)  # the library's own keys, as published
    return path


class Snapshot(Callback):
    """The model's state at the end of each epoch, before the epoch's unfreezing decision."""

    def __init__(self):
        self.states = {}

    def on_validation_end(self, trainer, metrics):
        state = trainer.model.state_dict()
        self.states[metrics["epoch"]] = {k: v.clone() for k, v in state.items()}


def test_thaw_from_loaded_weights_joins_deepest_first_with_discriminative_rates(
    tiny_npz, tmp_path, imagenet_like
):
    cfg = zoo_config(
        tiny_npz, tmp_path, "thaw", "resnet18", f"model.pretrained={imagenet_like}", *THAW
    )
    out = StringIO()
    snapshot = Snapshot()
    trainer, summary = fit(cfg, callbacks=[snapshot], console=Console(file=out, width=200))
    # auto: weights loaded, so the head trains alone first, then stages join from the deepest
    rows = read_metrics(tmp_path / "thaw" / "metrics.jsonl")
    assert [r["active_blocks"] for r in rows] == [0, 1, 2, 3, 4]
    groups = trainer.optimizer.param_groups
    assert [g["name"] for g in groups] == ["head", "layer4", "layer3", "layer2", "stem+layer1"]
    assert [g.get("lr_mult", 1.0) for g in groups] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    text = out.getvalue()
    assert f"weights {imagenet_like}: loaded" in text and "\n  classifier replaced" in text
    assert "STAGE 1: layer4 unfrozen" in text and "STAGE 4: stem+layer1 unfrozen" in text
    # Until it joins, a stage keeps the loaded weights and BatchNorm statistics exactly.
    loaded = torch.load(imagenet_like, weights_only=True)
    first = snapshot.states[1]
    for key in ("layer1.0.bn1.running_mean", "layer3.1.conv2.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(first[f"net.{key}"], loaded[key]), key
    # layer4 joined after epoch 1: it trained in epoch 2; layer1 still had not.
    second = snapshot.states[2]
    assert not torch.equal(second["net.layer4.1.conv2.weight"], loaded["layer4.1.conv2.weight"])
    assert torch.equal(second["net.layer1.0.bn1.running_mean"], loaded["layer1.0.bn1.running_mean"])
    assert summary["stopped"] is None


def test_a_frozen_stage_keeps_its_batchnorm_statistics_in_the_swa_model(
    tiny_npz, tmp_path, imagenet_like
):
    """A thaw run that never unfreezes (a linear probe): update_bn must not reset the frozen
    backbone's statistics in swa.pt."""
    cfg = zoo_config(
        tiny_npz,
        tmp_path,
        "probe",
        "resnet18",
        f"model.pretrained={imagenet_like}",
        "unfreeze.enabled=false",
        "unfreeze.direction=thaw",
        "safety.swa_start_epoch=2",
        "model.stem=imagenet",
    )
    fit(cfg)
    swa = load_checkpoint(tmp_path / "probe" / "checkpoints" / "swa.pt")["model"]
    loaded = torch.load(imagenet_like, weights_only=True)
    for key in ("layer1.0.bn1.running_mean", "layer4.1.bn2.running_var", "bn1.running_var"):
        assert torch.equal(swa[f"net.{key}"], loaded[key]), key


@pytest.mark.parametrize(
    ("arch", "extra"),
    [("resnet18", THAW), (TIMM, ()), (TIMM, GROW)],
    ids=["resnet18-thaw", "timm-all", "timm-grow"],
)
def test_a_zoo_run_resumes_to_the_same_weights(tiny_npz, tmp_path, imagenet_like, arch, extra):
    weights = (f"model.pretrained={imagenet_like}",) if arch == "resnet18" else ()
    straight, _ = fit(zoo_config(tiny_npz, tmp_path, "a", arch, *weights, *extra))
    _, summary = fit(
        zoo_config(tiny_npz, tmp_path, "b", arch, *weights, *extra), callbacks=[StopAfter(2)]
    )
    assert summary["stopped"] == "interrupted"
    cfg, ckpt = load_resume(tmp_path / "b")
    resumed, _ = fit(cfg, resume=ckpt)
    assert resumed.start_epoch == 3
    assert same_weights(straight.model.state_dict(), resumed.model.state_dict())
    for name in ("best.pt", "swa.pt"):
        a = load_checkpoint(tmp_path / "a" / "checkpoints" / name)
        b = load_checkpoint(tmp_path / "b" / "checkpoints" / name)
        assert same_weights(a["model"], b["model"]), name
        assert a.get("temperature") == b.get("temperature"), name


def test_grow_on_a_zoo_model_joins_shallow_stages_first(tiny_npz, tmp_path):
    names = stage_names(TIMM, {"stem": "auto", "resize": 0})
    joins = len(names) - 1
    cfg = zoo_config(
        tiny_npz,
        tmp_path,
        "grow",
        TIMM,
        "unfreeze.direction=grow",
        f"unfreeze.activate_at={list(range(1, joins + 1))}",
        f"unfreeze.lr_mult={[1] * joins}",
        "unfreeze.min_gap=1",
        f"run.epochs={joins + 1}",
        f"safety.swa_start_epoch={joins + 1}",
    )
    trainer, _ = fit(cfg)
    assert [g["name"] for g in trainer.optimizer.param_groups] == list(names)
    assert trainer.model.trainable_stages == frozenset(range(1, len(names) + 1))
    rows = read_metrics(tmp_path / "grow" / "metrics.jsonl")
    assert [r["active_blocks"] for r in rows] == list(range(1, len(names) + 1))


def test_a_zoo_model_from_scratch_trains_every_stage_from_the_start(tiny_npz, tmp_path):
    trainer, _ = fit(zoo_config(tiny_npz, tmp_path, "all", TIMM))
    assert trainer.direction == "all"
    assert trainer.model.trainable_stages == frozenset(range(1, trainer.model.num_stages + 1))
    assert not any(type(cb).__name__ == "Unfreeze" for cb in trainer.callbacks)
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_test_py_rebuilds_a_zoo_model_from_its_checkpoint_alone(tiny_npz, tmp_path):
    fit(zoo_config(tiny_npz, tmp_path, "r", "resnet18", "safety.swa_start_epoch=3", "run.epochs=3"))
    report = evaluate_run(tmp_path / "r", device="cpu")
    assert {"best", "swa"} <= set(report["weights"])
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")
    record = ckpt["model_record"]
    assert record["arch"] == "resnet18" and record["options"]["stem"] == "cifar"
    assert record["stages"] == ["stem+layer1", "layer2", "layer3", "layer4"]


def four_class_npz(path: Path) -> Path:
    """28 px RGB, 4 brightness classes: another class list than the tiny set's 3."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 48), ("val", 16), ("test", 16)):
        labels = np.arange(n) % 4
        base = (labels * 55 + 30)[:, None, None, None]
        images = np.clip(base + rng.integers(-20, 20, size=(n, 28, 28, 3)), 0, 255)
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    np.savez(path, **arrays)
    return path


def test_init_from_a_run_with_other_classes_replaces_the_classifier(tiny_npz, tmp_path):
    fit(zoo_config(tiny_npz, tmp_path, "source", TIMM, "run.epochs=1"))
    target = four_class_npz(tmp_path / "four.npz")
    out = StringIO()
    cfg = zoo_config(target, tmp_path, "target", TIMM, f"model.init={tmp_path / 'source'}:last")
    trainer = build_trainer(cfg, tmp_path / "target", console=Console(file=out, width=200))
    text = out.getvalue()
    assert "\n  classifier replaced" in text and "weights state dict: loaded" in text
    assert trainer.direction == "thaw"  # auto: weights were loaded
    source = load_checkpoint(tmp_path / "source" / "checkpoints" / "last.pt")["model"]
    own = trainer.model.state_dict()
    body = [k for k in source if own[k].shape == source[k].shape and "head" not in k]
    assert body and all(torch.equal(own[k], source[k]) for k in body)


def test_init_from_a_run_of_another_arch_is_refused_in_one_line(tiny_npz, tmp_path):
    fit(zoo_config(tiny_npz, tmp_path, "source", TIMM, "run.epochs=1"))
    cfg = zoo_config(tiny_npz, tmp_path, "t", "resnet18", f"model.init={tmp_path / 'source'}")
    with pytest.raises(ConfigError) as error:
        build_trainer(cfg, tmp_path / "t", console=Console(file=StringIO()))
    message = str(error.value)
    assert "\n" not in message and "holds a timm/test_resnet model" in message


def test_basic_cnn_cannot_thaw(tiny_npz, tmp_path):
    with pytest.raises(ConfigError, match=r"unfreeze.direction='thaw' is invalid; allowed: auto"):
        zoo_config(tiny_npz, tmp_path, "x", "basic_cnn", "unfreeze.direction=thaw")


def test_a_zoo_schedule_of_the_wrong_length_is_refused_naming_the_count(tiny_npz, tmp_path):
    with pytest.raises(ConfigError) as error:
        zoo_config(
            tiny_npz,
            tmp_path,
            "x",
            "resnet18",
            "unfreeze.direction=thaw",
            "unfreeze.activate_at=[2, 4]",
        )
    assert "unfreeze.activate_at=[2.0, 4.0] is invalid; allowed: 4 entries" in str(error.value)


def test_a_zoo_schedule_is_derived_from_the_presets_when_not_given(tiny_npz, tmp_path):
    cfg = zoo_config(
        tiny_npz, tmp_path, "x", "resnet18", "unfreeze.direction=thaw", "run.epochs=30"
    )
    # The cpu preset's blocks join at epochs 2 and 4; four stages thaw one per epoch from 2.
    assert cfg.unfreeze.activate_at == [2, 3, 4, 5]
    assert cfg.unfreeze.lr_mult == [1.0, 1.0, 1.0, 1.0]
    assert cfg.safety.swa_start_epoch >= 6


def test_an_unknown_timm_name_is_refused_at_load_naming_close_ones(tiny_npz, tmp_path):
    with pytest.raises(ConfigError) as error:
        zoo_config(tiny_npz, tmp_path, "x", "timm/resnet10")
    message = str(error.value)
    assert "\n" not in message and "is not a timm model" in message and "resnet10t" in message


@pytest.mark.parametrize(
    ("extra", "activate_at", "min_gap"),
    [
        (("unfreeze.min_gap=3",), [3, 6, 9, 12], 3),  # the user's gap is kept, not refused
        (("run.epochs=6",), [1, 2, 3, 4], 1),  # a short run: every stage joins before its end
        ((), [2, 3, 4, 5], 1),  # the cpu preset's 30 epochs
    ],
)
def test_a_derived_thaw_schedule_fits_the_run_and_the_users_gap(extra, activate_at, min_gap):
    cfg = load_config("cpu", overrides=["model.arch=resnet18", "model.pretrained=w.pth", *extra])
    assert cfg.unfreeze.activate_at == activate_at and cfg.unfreeze.min_gap == min_gap
    assert cfg.unfreeze.activate_at[-1] < cfg.run.epochs


def test_thawing_gets_discriminative_rates_unless_set(tiny_npz, tmp_path):
    thaw = zoo_config(tiny_npz, tmp_path, "x", "resnet18", "model.pretrained=w.pth")
    assert thaw.unfreeze.old_group_decay == 0.5
    own = zoo_config(
        tiny_npz, tmp_path, "x", "resnet18", "model.pretrained=w.pth", "unfreeze.old_group_decay=1"
    )
    assert own.unfreeze.old_group_decay == 1.0
    scratch = zoo_config(tiny_npz, tmp_path, "x", "resnet18")
    assert scratch.unfreeze.old_group_decay == 1.0  # every stage at once: nothing to thaw


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("model.pretrained=w.pth", "model.stem=cifar"), "model.stem='cifar' is invalid"),
        (("model.stem=cifar", "unfreeze.direction=thaw"), "is not available for vgg16_bn"),
    ],
)
def test_model_options_that_cannot_work_are_refused_at_load(tiny_npz, tmp_path, extra, expected):
    arch = "resnet18" if "model.pretrained=w.pth" in extra else "vgg16_bn"
    with pytest.raises(ConfigError) as error:
        zoo_config(tiny_npz, tmp_path, "x", arch, *extra)
    assert "\n" not in str(error.value) and expected in str(error.value)


def renamed_npz(source: Path, path: Path, names: list[str]) -> Path:
    """``source`` with other class names: the same count and images, another meaning."""
    arrays = dict(np.load(source))
    arrays["class_names"] = np.array(names)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(("names", "replaced"), [(["0", "1", "2"], False), (["a", "b", "c"], True)])
def test_init_keeps_the_classifier_only_for_the_same_classes(tiny_npz, tmp_path, names, replaced):
    fit(zoo_config(tiny_npz, tmp_path, "source", TIMM, "run.epochs=1"))
    target = renamed_npz(tiny_npz, tmp_path / "renamed.npz", names)
    out = StringIO()
    cfg = zoo_config(target, tmp_path, "t", TIMM, f"model.init={tmp_path / 'source'}:last")
    trainer = build_trainer(cfg, tmp_path / "t", console=Console(file=out, width=200))
    source = load_checkpoint(tmp_path / "source" / "checkpoints" / "last.pt")["model"]
    head = [k for k in source if k.startswith("net.fc.")]
    own = trainer.model.state_dict()
    assert head and all(torch.equal(own[k], source[k]) != replaced for k in head)
    assert ("classifier replaced (other classes)" in out.getvalue()) == replaced


def test_a_run_started_from_another_resumes_without_it(tiny_npz, tmp_path):
    """The init run is read once, at the start: a resume builds the model from its own
    checkpoint, even after the init run's folder is gone."""
    import shutil

    fit(zoo_config(tiny_npz, tmp_path, "source", TIMM, "run.epochs=1"))
    init = f"model.init={tmp_path / 'source'}:last"
    _, summary = fit(
        zoo_config(tiny_npz, tmp_path, "t", TIMM, init, "run.epochs=2"), callbacks=[StopAfter(1)]
    )
    assert summary["stopped"] == "interrupted"
    shutil.rmtree(tmp_path / "source")
    cfg, ckpt = load_resume(tmp_path / "t")
    resumed, summary = fit(cfg, resume=ckpt)
    assert resumed.start_epoch == 2 and summary["stopped"] is None
