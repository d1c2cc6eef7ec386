"""Checkpoints: atomic writes, safe loading, and clear refusals of ones that do not fit."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.basic_cnn_model import BasicCNNModel
from training.engine.checkpoint import (
    FORMAT,
    CheckpointError,
    check_compatible,
    load_checkpoint,
    model_record,
    restore_model,
    save_checkpoint,
)
from training.evaluation.report import build_model

CLASSES = ["benign", "malignant", "normal"]


def legacy_payload(model: BasicCNNModel | None = None, **extra) -> dict:
    """A checkpoint as written before the model record: the BasicCNNModel's config alone."""
    model = model or tiny_model()
    ckpt = payload(model, **extra)
    del ckpt["model_record"], ckpt["trainable_stages"]
    config = dataclasses.asdict(model.config)
    ckpt["model_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    return ckpt


def tiny_model(**overrides) -> BasicCNNModel:
    torch.manual_seed(0)
    return BasicCNNModel(**{"width": 0.125, "num_classes": 3, "in_channels": 1, **overrides})


def payload(model: BasicCNNModel | None = None, **extra) -> dict:
    model = model or tiny_model()
    return {
        "format": FORMAT,
        "epoch": 3,
        "step": 42,
        "model": model.state_dict(),
        "model_record": model.record(),  # as the trainer writes it
        "trainable_stages": sorted(model.trainable_stages),
        "active_blocks": model.active_blocks,
        "class_names": list(CLASSES),
        "mean": [0.5],
        "std": [0.25],
        "best": {"metric": "val_macro_f1", "value": 0.75, "epoch": 2},
        **extra,
    }


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_one_line_naming(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


# --------------------------------------------------------------------------- round trip


def test_round_trip_keeps_every_entry(tmp_path):
    original = payload()
    path = tmp_path / "runs" / "last.pt"  # the folder does not exist yet
    save_checkpoint(original, path)
    loaded = load_checkpoint(path)
    assert files_in(path.parent) == ["last.pt"]
    assert loaded.keys() == original.keys()
    for key, tensor in original["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    assert {k: v for k, v in loaded.items() if k != "model"} == {
        k: v for k, v in original.items() if k != "model"
    }


def test_saving_a_value_that_safe_loading_would_refuse_fails_before_writing(tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(TypeError, match=r"payload\['rng'\]\['numpy'\] \(numpy.ndarray\)"):
        save_checkpoint(payload(rng={"numpy": np.zeros(3)}), path)
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------- safe loading


def _touch(path: str) -> None:
    Path(path).write_text("unpickling ran code")


class Sneaky:
    """Unpickling an instance calls ``_touch``: the kind of payload weights_only must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


def test_a_file_with_pickled_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": {}, "extra": Sneaky(marker)}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert_one_line_naming(error, str(path), "_touch", "weights_only")
    assert not marker.exists()


class CallsSystem:
    """Pickles as a call of os.system (posix.system on Linux); never unpickled by the tests."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {marker}"

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_file_that_would_run_os_system_names_the_import_and_why_it_was_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": {}, "extra": CallsSystem(marker)}, path)
    assert b"system" in path.read_bytes()  # the pickle really references the function
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    target = f"{os.system.__module__}.system"  # posix.system, nt.system on Windows
    assert_one_line_naming(error, str(path), f"would import {target}", "could execute code")
    assert "weights_only` set to `False`" not in str(error.value)
    assert not marker.exists()


@dataclasses.dataclass
class Settings:
    lr: float = 0.1


def test_a_file_with_a_dataclass_is_refused(tmp_path):
    path = tmp_path / "dc.pt"
    torch.save({"format": FORMAT, "model": {}, "config": Settings()}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert_one_line_naming(error, str(path), "Settings")


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("interrupt", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_write_killed_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch, interrupt):
    path = tmp_path / "last.pt"
    save_checkpoint(payload(epoch=1), path)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # what a kill mid-write leaves behind
        raise interrupt

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(type(interrupt)):
        save_checkpoint(payload(epoch=2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert files_in(tmp_path) == ["last.pt"]


# --------------------------------------------------------------------------- unreadable files


def _truncated(path: Path) -> None:
    save_checkpoint(payload(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "write",
    [
        _truncated,
        lambda p: p.write_bytes(b""),
        lambda p: p.write_text("not a checkpoint"),
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    ],
    ids=["truncated", "empty", "text", "random-bytes"],
)
def test_a_corrupt_file_gives_one_line_naming_the_path(tmp_path, write):
    path = tmp_path / "bad.pt"
    write(path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert_one_line_naming(error, str(path), "cannot be loaded")


def test_a_missing_file_or_a_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"weights": torch.ones(2)}, r"lacks key\(s\) \['format', 'model'\]"),
        ({"format": FORMAT}, r"lacks key\(s\) \['model'\]"),
        (torch.ones(2), "holds a Tensor, expected a dict"),
        ({"format": 99, "model": {}}, "has format 99; this version reads format 1"),
    ],
)
def test_a_file_that_is_not_our_checkpoint_is_refused(tmp_path, content, message):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


# --------------------------------------------------------------------------- compatibility


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 0.25),
        ("norm", "batch"),
        ("in_channels", 3),
        ("num_classes", 4),
        ("downsample", "stride"),
        ("block_channels", [8, 16, 24]),
    ],
)
def test_another_architecture_is_refused_naming_the_field_and_both_values(field, value):
    ckpt = payload()
    current = ckpt_record = ckpt["model_record"]
    if field in ckpt_record:
        current = {**ckpt_record, field: value}
        old = ckpt_record[field]
    else:
        current = {**ckpt_record, "options": {**ckpt_record["options"], field: value}}
        old = ckpt_record["options"][field]
    with pytest.raises(CheckpointError) as error:
        check_compatible(ckpt, current, CLASSES)
    assert_one_line_naming(error, f"{field}: checkpoint {old!r} vs current {value!r}")


@pytest.mark.parametrize(
    ("field", "value"),
    [("conv_block", "basic"), ("block_depths", [1, 1, 1]), ("block_strides", [1, 2, 2])],
)
def test_every_architecture_option_is_compared_not_a_hand_list(field, value):
    """The options a checkpoint must match come from the model's record: fields added to the
    model later are compared without anyone listing them."""
    trained = tiny_model(**{field: value})
    with pytest.raises(CheckpointError, match=f"{field}: checkpoint"):
        check_compatible(payload(trained), tiny_model().record(), CLASSES)


def test_another_arch_is_refused_naming_both():
    ckpt = payload()
    current = {**ckpt["model_record"], "arch": "resnet18", "options": {}}
    with pytest.raises(CheckpointError) as error:
        check_compatible(ckpt, current, CLASSES)
    assert_one_line_naming(error, "arch: checkpoint 'basic_cnn' vs current 'resnet18'")


def test_another_class_list_is_refused_naming_the_classes():
    ckpt = payload()
    with pytest.raises(CheckpointError) as error:
        check_compatible(ckpt, ckpt["model_record"], ["benign", "malignant", "cyst"])
    assert_one_line_naming(error, "class_names", "only in checkpoint: ['normal']", "'cyst'")
    with pytest.raises(CheckpointError, match="another order"):
        check_compatible(ckpt, ckpt["model_record"], list(reversed(CLASSES)))


def test_block_channels_round_trip_through_a_checkpoint_and_older_ones_lack_none():
    trained = tiny_model(block_channels=(8, 16, 24))
    ckpt = payload(trained)
    check_compatible(ckpt, trained.record(), CLASSES)  # tuple in the model, list in the file
    rebuilt = build_model(ckpt).eval()
    assert rebuilt.config.channels() == (8, 16, 24)
    with pytest.raises(CheckpointError, match=r"block_channels: checkpoint \[8, 16, 24\] vs"):
        check_compatible(ckpt, tiny_model().record(), CLASSES)
    legacy = legacy_payload()
    del legacy["model_config"]["block_channels"]  # written before the option existed
    check_compatible(legacy, tiny_model().record(), CLASSES)
    assert build_model(legacy).config.block_channels == ()


def test_the_linear_init_is_kept_in_a_checkpoint_but_does_not_bar_loading_it():
    trained = tiny_model(linear_init="torch")
    ckpt = payload(trained)
    check_compatible(ckpt, tiny_model().record(), CLASSES)  # only the starting weights differ
    rebuilt = build_model(ckpt)
    assert rebuilt.config.linear_init == "torch"
    assert torch.equal(rebuilt.classifier.weight, trained.classifier.weight)
    legacy = legacy_payload()
    del legacy["model_config"]["linear_init"]  # written before the option existed
    assert build_model(legacy).config.linear_init == "kaiming"


def test_a_checkpoint_from_before_the_downsample_option_is_rebuilt_strided():
    trained = tiny_model(downsample="stride")
    legacy = legacy_payload(trained)
    del legacy["model_config"]["downsample"]
    assert model_record(legacy)["options"]["downsample"] == "stride"
    check_compatible(legacy, trained.record(), CLASSES)
    with pytest.raises(
        CheckpointError, match="downsample: checkpoint 'stride' vs current 'maxpool'"
    ):
        check_compatible(legacy, tiny_model().record(), CLASSES)
    rebuilt = build_model(legacy).eval()
    assert rebuilt.config.downsample == "stride"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained.eval()(x))


def test_runtime_fields_may_differ():
    ckpt = payload()
    # 48 px: larger than the checkpoint's 28 px, and still without a stem (auto adds one at 56).
    model = tiny_model(dropout=(0.0, 0.0, 0.0), active_blocks=2, noise_std=0.0, input_size=48)
    check_compatible(ckpt, model.record(), CLASSES)


# --------------------------------------------------------------------------- restoring


def test_restore_model_sets_the_depth_and_the_weights(tmp_path):
    trained = tiny_model()
    trained.freeze_blocks_until(2)
    with torch.no_grad():
        trained.classifier.weight.add_(1.0)
    save_checkpoint(payload(trained), tmp_path / "last.pt")
    fresh = tiny_model()
    restore_model(fresh, load_checkpoint(tmp_path / "last.pt"))
    assert fresh.active_blocks == 2
    assert all(p.requires_grad for p in fresh.blocks[1].parameters())
    for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_restore_model_summarises_shape_mismatches():
    ckpt = payload(tiny_model(width=0.25))
    with pytest.raises(CheckpointError) as error:
        restore_model(tiny_model(), ckpt)
    assert_one_line_naming(
        error, "shape mismatches (checkpoint vs model)", "blocks.0.0.conv.weight"
    )


def test_restore_model_summarises_missing_and_unexpected_keys():
    ckpt = payload()
    ckpt["model"]["extra.weight"] = ckpt["model"].pop("classifier.weight")
    with pytest.raises(CheckpointError) as error:
        restore_model(tiny_model(), ckpt)
    assert_one_line_naming(error, "missing keys 1: classifier.weight", "unexpected keys 1")


def test_restore_model_refuses_a_bad_depth():
    legacy = legacy_payload(active_blocks=7)
    with pytest.raises(CheckpointError, match="depth=7 is invalid"):
        restore_model(tiny_model(), legacy)
    with pytest.raises(CheckpointError, match="k=4 is invalid"):
        restore_model(tiny_model(), payload(trainable_stages=[1, 2, 3, 4]))


def test_restore_model_refuses_stages_a_growing_model_cannot_take():
    with pytest.raises(CheckpointError, match="grows from block 1"):
        restore_model(tiny_model(), payload(trainable_stages=[3]))


def test_a_checkpoint_without_a_record_is_refused_in_one_line():
    ckpt = payload()
    del ckpt["model_record"]
    with pytest.raises(CheckpointError) as error:
        check_compatible(ckpt, tiny_model().record(), CLASSES)
    assert_one_line_naming(error, "no 'model_record'")


def test_copy_checkpoint_is_atomic_and_readable(tmp_path, monkeypatch):
    import shutil as shutil_mod
    import stat

    from training.engine.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint

    src, dst = tmp_path / "last.pt", tmp_path / "best.pt"
    save_checkpoint({"format": 1, "model": {"w": torch.ones(3)}}, src)
    copy_checkpoint(src, dst)
    assert torch.equal(load_checkpoint(dst)["model"]["w"], torch.ones(3))
    assert stat.S_IMODE(dst.stat().st_mode) == 0o644
    save_checkpoint({"format": 1, "model": {"w": torch.zeros(3)}}, src)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shutil_mod, "copyfileobj", broken)
    with pytest.raises(OSError):
        copy_checkpoint(src, dst)
    assert torch.equal(load_checkpoint(dst)["model"]["w"], torch.ones(3))  # previous copy intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_record_from_before_the_stem_option_is_rebuilt_without_a_stem():
    # Written at 64 px, where today's default (stem_stride 0, auto) would add a stride-2 stem.
    trained = tiny_model(input_size=64, stem_stride=1)
    ckpt = payload(trained)
    del ckpt["model_record"]["options"]["stem_stride"]
    assert model_record(ckpt)["options"]["stem_stride"] == 1
    check_compatible(ckpt, trained.record(), CLASSES)
    with pytest.raises(CheckpointError, match="stem_stride: checkpoint 1 vs current 2"):
        check_compatible(ckpt, tiny_model(input_size=64).record(), CLASSES)
    rebuilt = build_model(ckpt).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained.eval()(x))
