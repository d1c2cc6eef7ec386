"""Tests for training.config: defaults, presets, layering, parsing, validation, files, CLI."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from models.basic_cnn_model import ModelConfig
from training.config.cli import build_parser, config_from_args
from training.config.schema import (
    PRESETS,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    earliest_swa_epoch,
    format_config,
    load_config,
    save_config,
    staged_schedule,
    validate_config,
)
from training.engine.schedule import staged_lr


def field_value(cfg: TrainConfig, path: str):
    section, key = path.split(".")
    return getattr(getattr(cfg, section), key)


def write_yaml(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def from_cli(*argv: str) -> TrainConfig:
    # A CUDA machine's choice (the full preset) wherever the tests run; see tests/test_device.py.
    return config_from_args(build_parser().parse_args(list(argv)), cuda_available=lambda: True)


# --------------------------------------------------------------------------- defaults and presets


def test_defaults_are_the_designed_gpu_run_and_valid() -> None:
    cfg = TrainConfig()
    validate_config(cfg)
    assert load_config() == cfg
    assert cfg.preset == ""
    assert (cfg.run.epochs, cfg.model.width, cfg.model.norm, cfg.optim.batch_size) == (
        60,
        1.0,
        "group",
        128,
    )
    assert cfg.model.dropout == [0.1, 0.2, 0.3] and cfg.optim.betas == [0.9, 0.999]
    # Lists are per instance, so changing one config never leaks into the defaults.
    cfg.model.dropout[0] = 0.5
    assert TrainConfig().model.dropout[0] == 0.1


def test_full_preset_is_the_defaults() -> None:
    assert load_config("full") == replace(TrainConfig(), preset="full")


def test_cpu_preset_is_narrow_and_short() -> None:
    cfg = load_config("cpu")
    assert cfg.preset == "cpu"
    assert cfg.model.block_channels == [32, 64, 128] and cfg.model.norm == "batch"
    assert cfg.optim.batch_size == 128 and cfg.run.epochs == 30
    assert cfg.data.workers == 0 and cfg.run.amp == "auto"  # bf16 only where native
    assert cfg.model.downsample == "maxpool" and cfg.safety.rollback_threshold == 0.1
    # Half the 60-epoch design: blocks join no later than the scaled design epochs, and every
    # phase ends within the run.
    full = TrainConfig()
    scale = cfg.run.epochs / full.run.epochs
    scaled = [e * scale for e in full.unfreeze.activate_at]
    assert all(a <= b for a, b in zip(cfg.unfreeze.activate_at, scaled, strict=True))
    sched = cfg.schedule
    assert sched.warmup_epochs < sched.onecycle_end_epoch < sched.cosine_end_epoch
    assert sched.cosine_end_epoch <= cfg.run.epochs
    # On a short run a block must join while the rate is still high, or it never catches up:
    # the lr stays at half the peak or more until the last activation.
    staged = staged_schedule(cfg)
    last = int(cfg.unfreeze.activate_at[-1])
    assert all(staged_lr(e * 10, 10, staged) >= 0.5 * cfg.optim.lr for e in range(1, last + 1))
    # SWA averages several epochs, all after the last activation's head blend.
    assert earliest_swa_epoch(cfg.unfreeze) <= cfg.safety.swa_start_epoch <= cfg.run.epochs - 2
    assert cfg.model.activation == TrainConfig().model.activation  # untouched fields keep defaults


def test_presets_do_not_change_when_used() -> None:
    before = yaml.safe_dump(PRESETS)
    load_config("cpu", overrides=["model.block_channels=[8, 8, 8]"])
    assert yaml.safe_dump(PRESETS) == before


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError, match=r"preset='gpu' is invalid; allowed: full, cpu"):
        load_config("gpu")


def as_model_config(section, in_channels: int, num_classes: int, input_size: int) -> ModelConfig:
    """The basic_cnn config a model section builds (as the registry does)."""
    return ModelConfig(
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        **section.arch_options(),
    )


def test_model_section_builds_a_model_config() -> None:
    section = load_config("cpu", overrides=["model.dropout=[0.0,0.1,0.2]"]).model
    mc = as_model_config(section, in_channels=1, num_classes=4, input_size=28)
    assert isinstance(mc, ModelConfig)
    assert (mc.in_channels, mc.num_classes, mc.width, mc.norm) == (1, 4, 1.0, "batch")
    assert mc.dropout == (0.0, 0.1, 0.2)
    assert mc.block_channels == (32, 64, 128) and mc.linear_init == "torch"  # the cpu preset's
    defaults = as_model_config(load_config().model, in_channels=3, num_classes=8, input_size=28)
    assert defaults.block_channels == () and defaults.linear_init == "kaiming"
    channels = load_config(overrides=["model.block_channels=[16, 24, 40]"]).model
    assert channels.block_channels == [16, 24, 40]
    assert all(type(c) is int for c in channels.block_channels)  # echoed as ints, not 16.0
    mc = as_model_config(channels, in_channels=3, num_classes=8, input_size=28)
    assert mc.block_channels == (16, 24, 40) and all(type(c) is int for c in mc.block_channels)
    torch_init = load_config(overrides=["model.linear_init=torch"]).model
    assert as_model_config(torch_init, 3, 8, 28).linear_init == "torch"


# --------------------------------------------------------------------------- layering


def test_preset_then_yaml_then_overrides(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path, {"model": {"noise_std": 0.5}, "run": {"epochs": 5}, "optim": {"lr": 0.01}}
    )
    cfg = load_config("cpu", yaml_path=path, overrides=["run.epochs=3"])
    assert cfg.model.norm == "batch"  # preset
    assert cfg.model.noise_std == 0.5 and cfg.optim.lr == 0.01  # YAML beats preset
    assert cfg.run.epochs == 3  # override beats YAML


def test_yaml_preset_key_is_applied_unless_a_preset_is_given(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"preset": "cpu", "run": {"epochs": 2}})
    from_file = load_config(yaml_path=path)
    assert (
        from_file.preset == "cpu" and from_file.model.norm == "batch" and from_file.run.epochs == 2
    )
    explicit = load_config("full", yaml_path=path)
    assert explicit.preset == "full" and explicit.model.norm == "group" and explicit.run.epochs == 2


def test_empty_yaml_and_empty_section_mean_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_config(yaml_path=empty) == TrainConfig()
    section = tmp_path / "section.yaml"
    section.write_text("model:\n", encoding="utf-8")
    assert load_config(yaml_path=section) == TrainConfig()


def test_cli_precedence_yaml_then_set_then_flags(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"run": {"epochs": 5, "seed": 9}, "optim": {"lr": 0.01}})
    cfg = from_cli("--config", str(path), "--set", "run.epochs=4", "--epochs", "7")
    assert cfg.run.epochs == 7  # the shortcut flag beats --set, which beats the file
    assert cfg.run.seed == 9 and cfg.optim.lr == 0.01
    cfg = from_cli("--config", str(path), "--set", "run.epochs=4")
    assert cfg.run.epochs == 4


@pytest.mark.parametrize(
    "item, path, expected",
    [
        ("run.epochs=3", "run.epochs", 3),
        ("optim.lr=0.02", "optim.lr", 0.02),
        ("optim.lr=1e-3", "optim.lr", 1e-3),  # YAML 1.1 reads this as a string
        ("optim.lr=2", "optim.lr", 2.0),
        ("run.deterministic=true", "run.deterministic", True),
        ("data.augment=false", "data.augment", False),
        ("model.dropout=[0.0, 0.1, 0.25]", "model.dropout", [0.0, 0.1, 0.25]),
        ("optim.betas=[0.8,0.99]", "optim.betas", [0.8, 0.99]),
        ("run.device=cuda:1", "run.device", "cuda:1"),
        ("model.norm=batch", "model.norm", "batch"),
        ("data.source=yes", "data.source", "yes"),  # not the bool True
        ("data.source=123", "data.source", "123"),
        ("run.run_dir=", "run.run_dir", ""),
        ("run.run_dir=runs/a=b", "run.run_dir", "runs/a=b"),  # split on the first "=" only
    ],
)
def test_set_parses_values_by_field_type(item: str, path: str, expected) -> None:
    cfg = from_cli("--set", item)
    value = field_value(cfg, path)
    assert value == expected and type(value) is type(expected)


def test_set_is_repeatable() -> None:
    cfg = from_cli("--set", "run.epochs=2", "--set", "model.width=0.5", "--set", "run.epochs=3")
    assert cfg.run.epochs == 3 and cfg.model.width == 0.5


@pytest.mark.parametrize(
    "argv, path, expected",
    [
        (["--data", "scans.npz"], "data.source", "scans.npz"),
        (["--epochs", "3"], "run.epochs", 3),
        (["--batch-size", "32"], "optim.batch_size", 32),
        (["--lr", "0.005"], "optim.lr", 0.005),
        (["--seed", "7"], "run.seed", 7),
        (["--device", "cpu"], "run.device", "cpu"),
        (["--run-dir", "runs/x"], "run.run_dir", "runs/x"),
        (["--deterministic"], "run.deterministic", True),
        (["--no-amp"], "run.amp", "off"),
        (["--workers", "2"], "data.workers", 2),
        (["--image-size", "64"], "data.image_size", 64),
        (["--preset", "cpu"], "model.norm", "batch"),
    ],
)
def test_shortcut_flags_map_to_fields(argv: list[str], path: str, expected) -> None:
    assert field_value(from_cli(*argv), path) == expected
    assert field_value(from_cli(), path) != expected  # the flag, not the default, set it


def test_resume_stays_on_args() -> None:
    args = build_parser().parse_args(["--resume", "runs/old", "--epochs", "2"])
    assert args.resume == "runs/old"
    cfg = config_from_args(args)
    assert cfg.run.epochs == 2 and "resume" not in str(config_to_dict(cfg))


def test_parser_rejects_unknown_preset(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--preset", "gpu"])
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_every_flag() -> None:
    parser = build_parser()
    text = parser.format_help()
    assert parser.prog == "python models/train.py"
    flags = ["--config", "--preset", "--data", "--epochs", "--batch-size", "--lr", "--seed"]
    flags += ["--device", "--run-dir", "--resume", "--deterministic", "--no-amp", "--workers"]
    for flag in [*flags, "--set KEY=VALUE"]:
        assert flag in text


# --------------------------------------------------------------------------- errors


def test_unknown_key_in_yaml_names_path_and_allowed_keys(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"model": {"widht": 0.5}})
    with pytest.raises(ConfigError, match=r"'model\.widht'.*allowed: .*model\.width"):
        load_config(yaml_path=path)
    path = write_yaml(tmp_path, {"modle": {"width": 0.5}}, "section.yaml")
    with pytest.raises(ConfigError, match=r"'modle'.*allowed: data, model, optim"):
        load_config(yaml_path=path)


@pytest.mark.parametrize("item", ["run.epoch=3", "runs.epochs=3", "epochs=3", "run.epochs"])
def test_bad_set_key_is_a_config_error(item: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_cli("--set", item)
    assert item.split("=")[0] in str(err.value)


@pytest.mark.parametrize(
    "item, message",
    [
        ("optim.lr=-1", "optim.lr=-1.0 is invalid; allowed: a number > 0"),
        ("run.device=tpu", "run.device='tpu' is invalid; allowed: auto, cpu, cuda, cuda:N, mps"),
        (
            "run.monitor=acc",
            "run.monitor='acc' is invalid; allowed: val_acc, val_macro_f1, val_loss",
        ),
        ("run.epochs=abc", "run.epochs='abc' is invalid; allowed: an int >= 1"),
        ("run.epochs=0", "run.epochs=0 is invalid; allowed: an int >= 1"),
        ("run.epochs=2.5", "run.epochs=2.5 is invalid; allowed: an int >= 1"),
        ("run.epochs=true", "run.epochs=True is invalid; allowed: an int >= 1"),
        ("run.amp=fp8", "run.amp='fp8' is invalid; allowed: auto, off, fp16, bf16"),
        ("run.progress=tqdm", "run.progress='tqdm' is invalid; allowed: auto, bar, plain, off"),
        ("run.threads=-1", "run.threads=-1 is invalid; allowed: an int >= 0"),
        ("run.tta=flips", "run.tta='flips' is invalid; allowed: none, hflip, d4, auto"),
        ("run.seed=-3", "run.seed=-3 is invalid; allowed: an int in 0..4294967295"),
        ("run.deterministic=1", "run.deterministic=1 is invalid; allowed: true or false"),
        (
            "data.val_fraction=0.6",
            "data.val_fraction=0.6 is invalid; allowed: a number in (0, 0.5)",
        ),
        ("data.val_fraction=0", "data.val_fraction=0.0 is invalid; allowed: a number in (0, 0.5)"),
        ("data.aug_strength=1.5", "data.aug_strength=1.5 is invalid; allowed: a number in [0, 1]"),
        ("data.workers=-2", "data.workers=-2 is invalid; allowed: an int >= -1"),
        ("data.source=", "data.source='' is invalid; allowed: a non-empty string"),
        ("model.width=0", "model.width=0.0 is invalid; allowed: a number > 0"),
        ("model.norm=layer", "model.norm='layer' is invalid; allowed: group, batch"),
        ("model.activation=relu", "model.activation='relu' is invalid; allowed: silu, gelu, mish"),
        ("model.gn_groups=0", "model.gn_groups=0 is invalid; allowed: an int >= 1"),
        ("model.noise_std=-0.1", "model.noise_std=-0.1 is invalid; allowed: a number >= 0"),
        ("model.active_blocks=4", "model.active_blocks=4 is invalid; allowed: 1 | 2 | 3"),
        ("model.dropout=[0.1,0.2]", "model.dropout=[0.1, 0.2] is invalid; allowed: a list of 3"),
        (
            "model.dropout=[0.1,0.2,1.0]",
            "model.dropout=[0.1, 0.2, 1.0] is invalid; allowed: a list",
        ),
        (
            "model.dropout=0.1",
            "model.dropout=0.1 is invalid; allowed: a list of numbers in [0, 1), one per block",
        ),
        (
            "model.block_channels=[32,64]",
            "model.block_channels=[32, 64] is invalid; allowed: [] or a list of 3 ints >= 1",
        ),
        ("model.block_channels=[32,0.5,8]", "model.block_channels=[32, 0.5, 8] is invalid"),
        ("model.block_channels=[32,0,8]", "model.block_channels=[32, 0, 8] is invalid"),
        (
            "model.linear_init=xavier",
            "model.linear_init='xavier' is invalid; allowed: kaiming, torch",
        ),
        ("optim.betas=[0.9,x]", "optim.betas=[0.9, 'x'] is invalid; allowed: a list of 2 numbers"),
        ("optim.lr=.nan", "optim.lr=nan is invalid; allowed: a number > 0"),
        ("optim.weight_decay=-1", "optim.weight_decay=-1.0 is invalid; allowed: a number >= 0"),
        ("optim.focal_gamma=-2", "optim.focal_gamma=-2.0 is invalid; allowed: a number >= 0"),
        ("optim.batch_size=1", "optim.batch_size=1 is invalid; allowed: an int >= 2"),
        ("optim.accumulation=0", "optim.accumulation=0 is invalid; allowed: an int >= 1"),
        ("optim.clip_grad=-1", "optim.clip_grad=-1.0 is invalid; allowed: a number >= 0 (0 = off)"),
        (
            "optim.label_smoothing=1",
            "optim.label_smoothing=1.0 is invalid; allowed: a number in [0, 1)",
        ),
        ("schedule.warmup_epochs=-1", "schedule.warmup_epochs=-1 is invalid; allowed: an int >= 0"),
        (
            "schedule.min_lr=0.1",
            "schedule.min_lr=0.1 is invalid; allowed: a number in [0, optim.lr=0.01]",
        ),
    ],
)
def test_bad_values_name_field_value_and_allowed(item: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[item])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_bad_value_in_yaml_file_is_reported(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"optim": {"batch_size": "big"}})
    with pytest.raises(
        ConfigError, match=r"optim\.batch_size='big' is invalid; allowed: an int >= 2"
    ):
        load_config(yaml_path=path)


def test_ints_are_accepted_for_float_fields() -> None:
    cfg = load_config(overrides=["optim.weight_decay=0", "model.width=2"])
    assert type(cfg.optim.weight_decay) is float and type(cfg.model.width) is float


def test_later_layer_can_fix_an_earlier_bad_value(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"optim": {"lr": -1}})
    assert load_config(yaml_path=path, overrides=["optim.lr=0.1"]).optim.lr == 0.1


def test_shortcut_flag_values_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"run\.epochs=0 is invalid"):
        from_cli("--epochs", "0")


@pytest.mark.parametrize(
    "text, fragment",
    [("- 1\n- 2\n", "must hold a mapping"), ("run: [1\n", "line"), ("run: 3\n", "'run'")],
)
def test_malformed_yaml_file_is_a_config_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=fragment):
        load_config(yaml_path=path)


def test_missing_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(yaml_path=tmp_path / "absent.yaml")


def test_validate_config_catches_hand_edits_and_normalises_types() -> None:
    cfg = TrainConfig()
    cfg.optim.lr = 1
    cfg.model.dropout = (0.1, 0.2, 0.3)
    validate_config(cfg)
    assert type(cfg.optim.lr) is float and cfg.model.dropout == [0.1, 0.2, 0.3]
    cfg.run.device = "cuda:x"
    with pytest.raises(ConfigError, match=r"run\.device='cuda:x'"):
        validate_config(cfg)


# --------------------------------------------------------------------------- unused settings


def test_width_under_the_presets_block_channels_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("cpu", overrides=["model.width=0.125"])
    assert str(info.value) == (
        "model.width=0.125 has no effect while model.block_channels=[32, 64, 128] (the cpu"
        " preset sets it); set model.block_channels=[] to use width, or leave width unset"
    )


def test_width_takes_effect_once_block_channels_is_cleared() -> None:
    cfg = load_config("cpu", overrides=["model.width=0.125", "model.block_channels=[]"])
    narrow = as_model_config(cfg.model, in_channels=3, num_classes=3, input_size=28)
    preset = as_model_config(load_config("cpu").model, in_channels=3, num_classes=3, input_size=28)
    assert narrow.channels() != preset.channels()
    assert preset.channels() == tuple(PRESETS["cpu"]["model"]["block_channels"])


@pytest.mark.parametrize(
    ("preset", "unused", "because"),
    [
        ("cpu", "model.gn_groups=4", "model.norm='batch' (the cpu preset sets it)"),
        ("", "schedule.min_lr=0.001", "schedule.kind='staged' (the default)"),
        ("cpu", "schedule.min_lr=0.001", "schedule.kind='staged' (the default)"),
    ],
)
def test_a_value_a_setting_left_alone_makes_unused_is_refused(
    preset: str, unused: str, because: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(preset, overrides=[unused])
    path = unused.partition("=")[0]
    assert str(info.value).startswith(f"{path}=") and f"has no effect while {because}; " in str(
        info.value
    )


# (the setting the user switches, the field it leaves unused)
UNUSED = [
    ("model.norm=batch", "model.gn_groups=4"),
    ("schedule.kind=cosine", "schedule.floor_lrs=[0.1, 0.01]"),
    ("schedule.kind=cosine", "schedule.plateau_factor=0.5"),
    ("balance.loss_weights=inverse", "balance.beta=0.9"),
    ("balance.penalty=false", "balance.penalty_strength=2.0"),
    ("regularize.mixup=false", "regularize.mixup_alpha=0.2"),
    ("regularize.dynamic_dropout=false", "regularize.dropout_max=0.4"),
    ("safety.rollback=false", "safety.max_rollbacks=5"),
    ("safety.early_stop=false", "safety.patience=4"),
    ("safety.swa=false", "safety.swa_start_epoch=50"),
    ("data.augment=false", "data.aug_strength=0.5"),
    ("unfreeze.enabled=false", "unfreeze.lr_mult=[2.0, 2.0]"),
]


@pytest.mark.parametrize(("switch", "unused"), UNUSED)
def test_a_value_the_users_own_switch_leaves_unused_is_kept_and_noted(
    switch: str, unused: str
) -> None:
    cfg = load_config(overrides=[switch, unused])
    key, _, value = switch.partition("=")
    assert cfg.unused == (
        f"{unused} ({key}={value if value in ('true', 'false') else repr(value)})",
    )
    assert load_config(overrides=[switch]).unused == ()


def test_the_run_announces_the_unused_values_in_one_line() -> None:
    notes: list[str] = []
    args = build_parser().parse_args(
        ["--set", "regularize.mixup=false", "--set", "regularize.mixup_alpha=0.2"]
        + ["--set", "safety.swa=false", "--set", "safety.swa_start_epoch=50"]
    )
    config_from_args(args, cuda_available=lambda: True, announce=notes.append)
    assert notes[-1:] == [
        "not used in this run: regularize.mixup_alpha=0.2 (regularize.mixup=false),"
        " safety.swa_start_epoch=50 (safety.swa=false)"
    ]


def test_an_unused_field_left_at_the_presets_value_is_accepted(tmp_path: Path) -> None:
    # The cpu preset keeps gn_groups=8 beside norm=batch: a resolved config.yaml states both,
    # and given back as --config it must still load.
    cfg = load_config("cpu", overrides=["safety.swa=false"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(yaml_path=tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert load_config("cpu", overrides=["model.gn_groups=8", "model.width=1.0"]).model.norm == (
        "batch"
    )


# --------------------------------------------------------------------------- dicts and files


def custom_config() -> TrainConfig:
    return load_config(
        "cpu",
        overrides=["model.dropout=[0.0,0.15,0.3]", "run.device=cuda:0", "optim.betas=[0.8,0.9]"],
    )


def test_dict_round_trip_is_equal_and_checkpoint_safe(tmp_path: Path) -> None:
    cfg = custom_config()
    d = config_to_dict(cfg)
    assert config_from_dict(d) == cfg
    # The dict goes into checkpoints read with weights_only=True: plain types only.
    torch.save({"config": d}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]
    assert config_from_dict(loaded) == cfg


def test_config_from_dict_keeps_preset_as_label_only() -> None:
    d = config_to_dict(TrainConfig())
    d["preset"] = "cpu"
    cfg = config_from_dict(d)
    assert cfg.preset == "cpu" and cfg.model.norm == "group"  # stored values win, not the preset


def test_config_from_dict_fills_missing_and_rejects_unknown_and_bad() -> None:
    cfg = config_from_dict({"run": {"epochs": 4}})
    assert cfg == replace(TrainConfig(), run=replace(TrainConfig().run, epochs=4))
    with pytest.raises(ConfigError, match=r"'schedule\.shape'"):
        config_from_dict({"schedule": {"shape": "cosine"}})
    with pytest.raises(ConfigError, match=r"optim\.lr=0\.0 is invalid"):
        config_from_dict({"optim": {"lr": 0.0}})


def test_config_from_dict_gives_older_stored_sections_their_legacy_values() -> None:
    d = config_to_dict(TrainConfig())
    assert config_from_dict(d).model.downsample == "maxpool"  # stored values win
    del d["model"]["downsample"]  # a run stored before the option existed
    assert config_from_dict(d).model.downsample == "stride"
    assert config_from_dict({"run": {"epochs": 4}}).model.downsample == "maxpool"
    del d["model"]["block_channels"]
    assert config_from_dict(d).model.block_channels == []
    d["model"]["linear_init"] = "torch"
    assert config_from_dict(d).model.linear_init == "torch"
    del d["model"]["linear_init"]
    assert config_from_dict(d).model.linear_init == "kaiming"


def test_block_layout_settings_reach_the_model_and_older_runs_keep_theirs() -> None:
    section = load_config(
        "cpu",
        overrides=[
            "model.conv_block=basic",
            "model.block_depths=[1, 2, 2]",
            "model.block_strides=[1, 2, 2]",
        ],
    ).model
    mc = as_model_config(section, in_channels=3, num_classes=8, input_size=28)
    assert (mc.conv_block, mc.block_depths, mc.block_strides) == ("basic", (1, 2, 2), (1, 2, 2))
    assert all(type(d) is int for d in section.block_depths)
    # A run stored before these options existed was built with single blocks of depth 2/3/3,
    # each block halving the feature map.
    d = config_to_dict(TrainConfig())
    del d["model"]["conv_block"], d["model"]["block_depths"], d["model"]["block_strides"]
    old = config_from_dict(d).model
    assert (old.conv_block, old.block_depths, old.block_strides) == ("single", [2, 3, 3], [2, 2, 2])
    with pytest.raises(ConfigError, match=r"model\.block_depths=\[2, 3\] is invalid"):
        load_config(overrides=["model.block_depths=[2, 3]"])
    with pytest.raises(ConfigError, match=r"model\.block_strides=\[1, 3, 2\] is invalid"):
        load_config(overrides=["model.block_strides=[1, 3, 2]"])
    with pytest.raises(ConfigError, match=r"model\.conv_block='wide' is invalid"):
        load_config(overrides=["model.conv_block=wide"])


def test_save_config_reads_back_equal(tmp_path: Path) -> None:
    cfg = custom_config()
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(yaml_path=path) == cfg
    assert os.listdir(path.parent) == ["config.yaml"]  # no temp file left behind


def test_save_config_failure_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "config.yaml"
    save_config(TrainConfig(), path)
    before = path.read_text(encoding="utf-8")

    def fail(*_args) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_config(custom_config(), path)
    assert path.read_text(encoding="utf-8") == before
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_format_config_is_readable_yaml_of_the_config() -> None:
    cfg = custom_config()
    text = format_config(cfg)
    assert yaml.safe_load(text) == config_to_dict(cfg)
    lines = text.splitlines()
    assert lines[0] == "data:" and "  dropout: [0.0, 0.15, 0.3]" in lines
    assert "  epochs: 30" in lines and lines[-1] == "preset: cpu"


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["unfreeze.activate_at=[30, 15]"], "unfreeze.activate_at=[30.0, 15.0] is invalid"),
        (
            ["unfreeze.activate_at=[15, 18]", "unfreeze.min_gap=5"],
            "epochs at least unfreeze.min_gap=5 apart",
        ),
        (["schedule.floor_lrs=[0.001]"], "schedule.floor_lrs=[0.001] is invalid; allowed: one"),
        (
            ["schedule.cosine_end_epoch=10", "schedule.onecycle_end_epoch=20"],
            "cosine_end_epoch=10 is invalid; allowed: > onecycle",
        ),
        (["schedule.cosine_end_ratio=0.5"], "cosine_end=0.005 is invalid"),
        (["regularize.underfit_gap=0.2"], "regularize.underfit_gap=0.2 is invalid"),
        (["regularize.dropout_min=0.4", "regularize.dropout_max=0.3"], "dropout_min=0.4"),
        (["balance.loss_weights=sqrt"], "balance.loss_weights='sqrt' is invalid"),
        (["safety.rollback_lr_cut=0"], "safety.rollback_lr_cut=0.0 is invalid"),
        (["safety.swa_start_epoch=30"], "safety.swa_start_epoch=30 is invalid; allowed: an epoch"),
        (
            ["unfreeze.head_blend_epochs=3", "safety.swa_start_epoch=32"],
            "safety.swa_start_epoch=32 is invalid; allowed: an epoch after the last activation"
            " and its head blend (unfreeze.activate_at ends at 30,"
            " unfreeze.head_blend_epochs=3): >= 33",
        ),
    ],
)
def test_regimen_settings_are_checked_across_fields(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=items)


def test_derived_values_make_room_for_the_ones_the_user_sets() -> None:
    # Only one side of each rule set by the user: the preset's side moves instead of refusing.
    cfg = load_config(overrides=["unfreeze.activate_at=[15, 18]"])
    assert cfg.unfreeze.min_gap == 3
    cfg = load_config(overrides=["schedule.cosine_end_epoch=10"])
    assert cfg.schedule.warmup_epochs < cfg.schedule.onecycle_end_epoch < 10


def test_staged_schedule_follows_the_config() -> None:
    with pytest.raises(ConfigError, match="one floor per schedule.floor_epochs entry"):
        load_config(overrides=["schedule.floor_epochs=[40]"])
    cfg = load_config(overrides=["schedule.floor_epochs=[40]", "schedule.floor_lrs=[0.0002]"])
    staged = staged_schedule(cfg)
    assert staged.peak == cfg.optim.lr
    assert staged.onecycle_end == pytest.approx(cfg.optim.lr * cfg.schedule.onecycle_end_ratio)
    assert staged.floors == ((40.0, 0.0002),)


def test_config_changes_lists_what_differs_from_the_preset_only() -> None:
    from training.config.schema import config_changes, format_changes

    assert config_changes(load_config("cpu")) == {}
    assert format_changes(load_config("cpu")) == "configuration: cpu preset, unchanged"
    cfg = load_config("cpu", overrides=["optim.lr=0.001", "run.epochs=6", "run.run_dir=/tmp/x"])
    # The epoch settings that followed run.epochs are the plan's business, the folder the header's.
    assert config_changes(cfg) == {"optim.lr": (0.003, 0.001), "run.epochs": (30, 6)}
    kept = load_config("cpu", overrides=["run.epochs=6", "safety.swa_start_epoch=6"])
    assert config_changes(kept)["safety.swa_start_epoch"] == (24, 6)
    line = format_changes(cfg)
    assert line.startswith("configuration: cpu preset, changed: ") and "\n" not in line
    assert "optim.lr 0.003 -> 0.001" in line
