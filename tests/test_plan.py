"""The run's plan: epoch settings following ``run.epochs``, the plan's lines and its markers."""

from __future__ import annotations

import io
import re
from dataclasses import replace

import pytest
import yaml
from rich.console import Console

from tests.test_trainer import tiny_config
from training.build import build_trainer
from training.config.cli import build_parser, config_from_args
from training.config.plan import EPOCH_FIELDS, Rescale, plan_lines, plan_markers, scale_plan
from training.config.schema import (
    PRESETS,
    ConfigError,
    config_from_dict,
    config_to_dict,
    earliest_swa_epoch,
    load_config,
    save_config,
)
from training.engine.distributed import World
from training.engine.schedule import Marker

# The cpu preset's epoch settings (a 30-epoch plan), flat, as scale_plan reads them.
CPU = {
    "schedule.warmup_epochs": 1,
    "schedule.onecycle_end_epoch": 12,
    "schedule.cosine_end_epoch": 26,
    "schedule.floor_epochs": [26.0],
    "schedule.plateau_patience": 1,
    "unfreeze.activate_at": [2.0, 4.0],
    "unfreeze.min_gap": 2,
    "unfreeze.plateau_patience": 2,
    "unfreeze.warmup_epochs": 0.25,
    "unfreeze.head_blend_epochs": 1.0,
    "regularize.mixup_end_epoch": 6.0,
    "data.aug_ramp_epochs": 6,
    "safety.swa_start_epoch": 24,
    "safety.patience": 8,
    "unfreeze.enabled": True,
    "schedule.kind": "staged",
}


def scaled(epochs: int, base: int = 30, fixed=(), **changes) -> dict:
    values = {**CPU, **{k.replace("__", "."): v for k, v in changes.items()}}
    return scale_plan({**values, "run.epochs": epochs}, base, fixed)


def epoch_settings(cfg) -> dict:
    return {
        path: getattr(getattr(cfg, path.split(".")[0]), path.split(".")[1]) for path in EPOCH_FIELDS
    }


# --------------------------------------------------------------------------- scale_plan


def test_the_table_matches_the_preset():
    cpu = {**config_to_dict(load_config("cpu"))}
    assert {p: cpu[p.split(".")[0]][p.split(".")[1]] for p in EPOCH_FIELDS} == {
        p: CPU[p] for p in EPOCH_FIELDS
    }


def test_six_epochs_compress_the_cpu_plan():
    out = scaled(6)
    assert {p: out[p] for p in EPOCH_FIELDS} == {
        "schedule.warmup_epochs": 1,  # 0.2 -> a one-epoch warmup stays one epoch
        "schedule.onecycle_end_epoch": 2,  # 2.4
        "schedule.cosine_end_epoch": 5,  # 5.2
        "schedule.floor_epochs": [5],
        "schedule.plateau_patience": 1,
        "unfreeze.activate_at": [1, 2],  # 0.4 and 0.8, then min_gap apart from the start
        "unfreeze.min_gap": 1,  # 0.4, kept >= 1
        "unfreeze.plateau_patience": 1,
        "unfreeze.warmup_epochs": 0.05,  # a float below 1 scales freely
        "unfreeze.head_blend_epochs": 1.0,  # 0.2, a float length >= 1 keeps 1
        "regularize.mixup_end_epoch": 1.2,
        "data.aug_ramp_epochs": 1,
        "safety.swa_start_epoch": 5,  # 4.8
        "safety.patience": 2,  # 1.6
    }
    assert out["run.epochs"] == 6 and out["unfreeze.enabled"] is True


def test_sixty_epochs_stretch_the_cpu_plan():
    out = scaled(60)
    assert out["unfreeze.activate_at"] == [4, 8] and out["unfreeze.min_gap"] == 4
    assert out["safety.swa_start_epoch"] == 48 and out["safety.patience"] == 16
    assert out["schedule.warmup_epochs"] == 2 and out["schedule.onecycle_end_epoch"] == 24
    assert out["schedule.cosine_end_epoch"] == 52 and out["schedule.floor_epochs"] == [52]
    assert out["unfreeze.head_blend_epochs"] == 2.0 and out["unfreeze.warmup_epochs"] == 0.5
    assert out["regularize.mixup_end_epoch"] == 12.0 and out["data.aug_ramp_epochs"] == 12


def test_halves_round_up_and_whole_fields_stay_ints():
    # 45 x 0.1 = 4.5 -> 5 (round() would give 4); 24 x 0.2 = 4.800000000000001 -> 5.
    out = scaled(6, base=60, safety__swa_start_epoch=45)
    assert out["safety.swa_start_epoch"] == 5
    assert all(type(e) is int for e in scaled(6)["unfreeze.activate_at"])


def test_off_stays_off_and_patiences_keep_one_epoch():
    out = scaled(3, unfreeze__plateau_patience=0, data__aug_ramp_epochs=0)
    assert out["unfreeze.plateau_patience"] == 0 and out["data.aug_ramp_epochs"] == 0
    assert out["schedule.plateau_patience"] == 1 and out["safety.patience"] == 1


def test_values_the_user_set_are_kept():
    fixed = {"safety.swa_start_epoch", "safety.patience", "regularize.mixup_end_epoch"}
    out = scaled(6, fixed=fixed)
    assert out["safety.swa_start_epoch"] == 24 and out["safety.patience"] == 8
    assert out["regularize.mixup_end_epoch"] == 6.0
    assert out["schedule.cosine_end_epoch"] == 5  # the others still follow


def test_a_run_too_short_for_the_staged_phases_drops_the_warmup_first():
    out = scaled(2)
    assert [out[p] for p in ("schedule.warmup_epochs", "schedule.onecycle_end_epoch")] == [0, 1]
    assert out["schedule.cosine_end_epoch"] == 2
    one = scaled(1)  # warmup 0 < one-cycle end 1 < cosine end 2: beyond the run, still ordered
    assert [one[p] for p in ("schedule.onecycle_end_epoch", "schedule.cosine_end_epoch")] == [1, 2]


def test_derived_boundaries_move_around_the_users_ones():
    out = scaled(6, fixed={"schedule.warmup_epochs"}, schedule__warmup_epochs=4)
    assert out["schedule.onecycle_end_epoch"] == 5 and out["schedule.cosine_end_epoch"] == 6
    out = scaled(6, fixed={"schedule.cosine_end_epoch"}, schedule__cosine_end_epoch=3)
    assert out["schedule.onecycle_end_epoch"] == 2 and out["schedule.warmup_epochs"] == 1


def test_a_cosine_schedule_keeps_its_warmup_where_it_fits():
    out = scaled(3, schedule__kind="cosine")
    assert out["schedule.warmup_epochs"] == 1  # the staged chain would have dropped it
    assert scaled(1, schedule__kind="cosine")["schedule.warmup_epochs"] == 0


def test_floors_stay_increasing():
    out = scaled(6, base=60, schedule__floor_epochs=[40.0, 42.0])
    assert out["schedule.floor_epochs"] == [4, 5]


def test_a_derived_min_gap_fits_the_users_activations():
    fixed = {"unfreeze.activate_at"}
    out = scaled(60, fixed=fixed, unfreeze__activate_at=[1.0, 2.0])
    assert out["unfreeze.activate_at"] == [1.0, 2.0] and out["unfreeze.min_gap"] == 1


def test_swa_waits_for_the_last_activation_and_its_blend():
    fixed = {"unfreeze.activate_at"}
    out = scaled(8, fixed=fixed, unfreeze__activate_at=[2.0, 6.0])
    assert out["safety.swa_start_epoch"] == 7  # scaled: 6.4 -> 6, before block 3's blend ends
    off = scaled(8, fixed=fixed, unfreeze__activate_at=[2.0, 6.0], unfreeze__enabled=False)
    assert off["safety.swa_start_epoch"] == 6


def test_base_epochs_is_checked():
    with pytest.raises(ValueError, match=r"base_epochs=0 is invalid; allowed: an int >= 1"):
        scaled(6, base=0)


@pytest.mark.parametrize("preset", ["full", "cpu"])
def test_every_length_resolves_to_a_valid_config(preset):
    for epochs in range(1, 121):
        cfg = load_config(preset, overrides=[f"run.epochs={epochs}"])  # validates
        s, u = cfg.schedule, cfg.unfreeze
        assert s.warmup_epochs < s.onecycle_end_epoch < s.cosine_end_epoch
        assert s.cosine_end_epoch <= max(epochs, 2)
        assert cfg.safety.swa_start_epoch >= earliest_swa_epoch(u)


# --------------------------------------------------------------------------- resolving


def test_load_config_gives_the_six_epoch_plan():
    cfg = load_config("cpu", overrides=["run.epochs=6"])
    assert cfg.unfreeze.activate_at == [1, 2] and cfg.safety.swa_start_epoch == 5
    assert cfg.schedule.cosine_end_epoch == 5 and cfg.schedule.floor_epochs == [5]
    assert cfg.scaling == Rescale(30, 6, "cpu preset's", ())
    assert cfg.scaling.factor == pytest.approx(0.2)


def test_epochs_flag_scales_and_explicit_values_stay():
    args = build_parser().parse_args(
        ["--preset", "cpu", "--epochs", "8", "--set", "safety.swa_start_epoch=7"]
    )
    cfg = config_from_args(args)
    assert cfg.safety.swa_start_epoch == 7 and cfg.schedule.cosine_end_epoch == 7
    assert cfg.scaling.kept == ("safety.swa_start_epoch",)


def test_the_preset_length_changes_nothing():
    cfg = load_config("cpu", overrides=["run.epochs=30"])
    assert cfg.scaling is None and epoch_settings(cfg) == epoch_settings(load_config("cpu"))
    assert load_config().scaling is None


def test_defaults_scale_from_sixty():
    cfg = load_config(overrides=["run.epochs=12"])
    assert cfg.scaling.base_epochs == 60 and cfg.scaling.origin == "default"
    assert cfg.unfreeze.activate_at == [3, 6] and cfg.safety.swa_start_epoch == 9


def test_a_yaml_file_is_explicit_only_for_its_keys(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text(
        yaml.safe_dump({"preset": "cpu", "run": {"epochs": 6}, "safety": {"patience": 4}})
    )
    cfg = load_config(yaml_path=path)
    assert cfg.unfreeze.activate_at == [1, 2] and cfg.safety.patience == 4


def test_a_saved_config_fed_back_is_not_scaled(tmp_path):
    eight = load_config("cpu", overrides=["run.epochs=8"])
    save_config(eight, tmp_path / "config.yaml")
    cfg = load_config(yaml_path=tmp_path / "config.yaml", overrides=["run.epochs=16"])
    assert epoch_settings(cfg) == epoch_settings(eight)
    assert cfg.scaling is not None and not cfg.scaling.scaled


def test_stored_configs_are_never_rescaled():
    stored = config_to_dict(load_config("cpu"))
    stored["run"]["epochs"] = 8
    cfg = config_from_dict(stored)
    assert cfg.scaling is None and epoch_settings(cfg) == epoch_settings(load_config("cpu"))
    assert "scaling" not in config_to_dict(load_config("cpu", overrides=["run.epochs=8"]))


def test_an_explicit_swa_start_after_the_run_is_refused():
    message = (
        "safety.swa_start_epoch=24 is invalid; allowed: an epoch <= run.epochs=8 "
        "(SWA would never start), or set safety.swa=false"
    )
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config("cpu", overrides=["run.epochs=8", "safety.swa_start_epoch=24"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="SWA would never start"):
        load_config("cpu", overrides=["safety.swa_start_epoch=31"])
    off = load_config(
        "cpu", overrides=["run.epochs=8", "safety.swa_start_epoch=24", "safety.swa=false"]
    )
    assert off.safety.swa_start_epoch == 24


def test_a_short_runs_own_config_loads_back_with_its_unreached_swa(tmp_path):
    """A 2-epoch cpu run derives an SWA start after its end (the plan says "not reached");
    its config.yaml must still load back as that run."""
    short = load_config("cpu", overrides=["run.epochs=2"])
    assert short.safety.swa and short.safety.swa_start_epoch > 2
    stored = tmp_path / "config.yaml"
    save_config(short, stored)
    again = load_config("", yaml_path=stored)
    assert config_to_dict(again) == config_to_dict(short)
    with pytest.raises(ConfigError, match="SWA would never start"):  # typed: still refused
        load_config("", yaml_path=stored, overrides=["safety.swa_start_epoch=3"])


def test_an_explicit_swa_start_before_the_scaled_activations_is_refused():
    # Derived activations are not bent to fit: the message names where the last one ended up.
    with pytest.raises(ConfigError, match=r"safety.swa_start_epoch=8 is invalid.* >= 10"):
        load_config("cpu", overrides=["run.epochs=60", "safety.swa_start_epoch=8"])


def test_a_derived_phase_that_does_not_fit_is_not_refused():
    cfg = load_config("cpu", overrides=["run.epochs=2"])
    assert cfg.safety.swa_start_epoch == 3
    assert re.search(r"^  SWA +not reached: needs >= 3 epochs$", "\n".join(plan_lines(cfg)), re.M)


# --------------------------------------------------------------------------- the plan's lines


def test_plan_lines_one_per_phase():
    cfg = load_config("cpu", overrides=["run.epochs=6"])
    lines = plan_lines(cfg, stop_not_before=5)
    assert lines[0] == "plan: 6 epochs (cpu preset's 30-epoch plan scaled x0.2)"
    rows = {line.split("  ")[1]: line.split()[2:] for line in lines[1:]}
    assert list(rows) == [
        "warmup",
        "one-cycle",
        "cosine",
        "plateau",
        "floor",
        "block2",
        "block3",
        "Mixup",
        "augmentation",
        "SWA",
        "early stop",
    ]
    text = "\n".join(lines)
    for expected in (
        r"cosine +epochs 3-5 +-> 1\.5e-04",
        r"plateau +epoch 6 +lr x0\.1 after 1 epoch without gain",
        r"floor +epoch 6 +lr >= 3\.0e-05",
        r"block2 +joins after epoch 1 +trains from epoch 2",
        r"block3 +joins after epoch 2 +trains from epoch 3",
        r"Mixup +epochs 1-2 +alpha 0\.2 -> 0 at epoch 1\.2",
        r"SWA +epochs 5-6 +2 epochs averaged",
        r"early stop +epoch 6 +may stop after 2 epochs without gain",
    ):
        assert re.search(expected, text), expected


def test_plan_headline_says_where_the_plan_comes_from():
    kept = load_config("cpu", overrides=["run.epochs=8", "safety.patience=3"])
    assert plan_lines(kept)[0] == (
        "plan: 8 epochs (cpu preset's 30-epoch plan scaled x0.27; as given: safety.patience)"
    )
    assert plan_lines(load_config("cpu"))[0] == "plan: 30 epochs (cpu preset's plan)"
    stored = replace(load_config("cpu"), run=replace(load_config("cpu").run, epochs=40))
    assert plan_lines(stored, resumed=True)[0] == (
        "plan: 40 epochs (the resumed run's stored plan, not rescaled)"
    )


def test_plan_lines_for_switched_off_features():
    cfg = load_config(
        "cpu",
        overrides=[
            "unfreeze.enabled=false",
            "regularize.mixup=false",
            "data.augment=false",
            "safety.swa=false",
            "safety.early_stop=false",
            "schedule.kind=cosine",
        ],
    )
    text = "\n".join(plan_lines(cfg))
    for name in ("Mixup", "augmentation", "SWA", "early stop"):
        assert re.search(rf"^  {name} +off$", text, re.M), name
    assert re.search(r"stages +1 of 3 trainable throughout +unfreezing off", text)
    assert re.search(r"cosine +epochs 2-30 +-> 1\.0e-05", text) and "one-cycle" not in text


def test_plan_markers():
    marks = plan_markers(load_config("cpu", overrides=["run.epochs=6"]))
    assert marks[:2] == [Marker("block2 joins", 1.0), Marker("block3 joins", 2.0)]
    spans = {m.label: (m.start, m.end) for m in marks[2:]}
    # The cpu preset's strength stays at 0.01: no ramp to draw.
    assert spans == {"SWA": (4.0, 6.0), "Mixup": (0.0, 1.2)}
    short = plan_markers(load_config("cpu", overrides=["run.epochs=2"]))
    assert [m.label for m in short] == ["block2 joins", "Mixup"]  # no SWA
    ramp = plan_markers(load_config(overrides=["run.epochs=30"]))
    assert ("aug. ramp", 0.0, 5.0) in [(m.label, m.start, m.end) for m in ramp]


def test_presets_are_not_changed_by_scaling():
    before = yaml.safe_dump(PRESETS)
    load_config("cpu", overrides=["run.epochs=7"])
    assert yaml.safe_dump(PRESETS) == before


@pytest.mark.parametrize(("rank", "printed"), [(0, True), (1, False)])
def test_the_run_prints_its_plan_from_the_main_process_only(
    tiny_npz, tmp_path, monkeypatch, rank, printed
):
    # Rank 0 or 1 of two processes, built without joining a process group.
    monkeypatch.setattr("training.build.start", lambda world, device, timeout: device)
    out = io.StringIO()
    cfg = tiny_config(tiny_npz, tmp_path, "run", "run.epochs=6")
    world = World(rank=rank, size=2, local_rank=rank)
    build_trainer(cfg, tmp_path / "run", console=Console(file=out, width=200), world=world)
    assert ("plan: 6 epochs (cpu preset's 30-epoch plan scaled x0.2)" in out.getvalue()) is printed
    assert (tmp_path / "run" / "lr_schedule.png").is_file() is printed


def test_at_the_presets_own_length_derived_values_make_room_for_the_users():
    # Activations moved late: the derived SWA start follows them instead of refusing the run.
    cfg = load_config("cpu", overrides=["unfreeze.activate_at=[20, 28]"])
    assert cfg.run.epochs == 30 and cfg.scaling is None
    assert cfg.safety.swa_start_epoch == 29 and cfg.unfreeze.activate_at == [20, 28]
    # Untouched presets are their own plan at their own length.
    assert load_config("cpu") == load_config("cpu", overrides=["run.epochs=30"])
