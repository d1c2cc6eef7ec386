"""The preset a command line gets when it names none: ``full`` on CUDA, ``cpu`` elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from training.config.cli import build_parser, config_from_args
from training.config.schema import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from training.engine.device import PresetChoice, choose_preset, slow_settings_warning


def probe(found: bool):
    """A CUDA probe that answers ``found`` and counts its calls."""

    def cuda_available() -> bool:
        cuda_available.calls += 1
        return found

    cuda_available.calls = 0
    return cuda_available


def resolve(*argv: str, cuda: bool):
    """The config of ``argv`` on a machine with or without CUDA, and the lines announced."""
    lines: list[str] = []
    cfg = config_from_args(
        build_parser().parse_args(list(argv)), cuda_available=probe(cuda), announce=lines.append
    )
    return cfg, lines


def write_yaml(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- choose_preset


@pytest.mark.parametrize(
    "device, cuda, preset",
    [
        ("auto", True, "full"),
        ("auto", False, "cpu"),
        (" AUTO ", False, "cpu"),
        ("cpu", True, "cpu"),
        ("mps", True, "cpu"),
        ("cuda", False, "full"),
        ("cuda:1", False, "full"),
    ],
)
def test_choose_preset_follows_the_device(device: str, cuda: bool, preset: str) -> None:
    cuda_available = probe(cuda)
    assert choose_preset(device, cuda_available).preset == preset
    # A device that is named decides alone; only "auto" looks at the hardware.
    assert cuda_available.calls == (1 if device.strip().lower() == "auto" else 0)


def test_an_invalid_device_counts_as_not_cuda() -> None:
    assert choose_preset("tpu", probe(True)).preset == "cpu"


def test_the_default_probe_is_torch() -> None:
    expected = "full" if torch.cuda.is_available() else "cpu"
    assert choose_preset().preset == expected


@pytest.mark.parametrize(
    "choice, line",
    [
        (
            PresetChoice("cpu", "no CUDA GPU found"),
            "preset: cpu (no CUDA GPU found; --preset full for the long GPU run)",
        ),
        (
            PresetChoice("full", "CUDA GPU found"),
            "preset: full (CUDA GPU found; --preset cpu for a short run)",
        ),
    ],
)
def test_message_is_one_line_naming_the_other_preset(choice: PresetChoice, line: str) -> None:
    assert choice.message() == line


# --------------------------------------------------------------------------- config_from_args


@pytest.mark.parametrize("cuda, preset", [(False, "cpu"), (True, "full")])
def test_no_preset_named_picks_one_from_the_hardware(cuda: bool, preset: str) -> None:
    cfg, lines = resolve(cuda=cuda)
    assert cfg == load_config(preset)  # the whole preset, recorded as chosen
    assert lines == [choose_preset("auto", probe(cuda)).message()]


def test_the_stored_config_records_the_chosen_preset(tmp_path: Path) -> None:
    cfg, _ = resolve(cuda=False)
    save_config(cfg, tmp_path / "config.yaml")
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert stored["preset"] == "cpu"
    assert config_from_dict(stored) == cfg == config_from_dict(config_to_dict(cfg))


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "cpu"],
        ["--set", "run.device=cpu"],
        ["--set", "run.device=cuda", "--device", "cpu"],  # the flag comes last
    ],
)
def test_an_explicit_cpu_device_on_a_gpu_machine_means_cpu(argv: list[str]) -> None:
    cfg, lines = resolve(*argv, cuda=True)
    assert (cfg.preset, cfg.run.device) == ("cpu", "cpu")
    assert lines == ["preset: cpu (run.device is cpu; --preset full for the long GPU run)"]


def test_the_config_file_device_counts_and_the_flag_beats_it(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"run": {"device": "cpu"}})
    assert resolve("--config", path, cuda=True)[0].preset == "cpu"
    cfg, lines = resolve("--config", path, "--device", "cuda:0", cuda=False)
    assert (cfg.preset, cfg.run.device) == ("full", "cuda:0")
    assert lines == ["preset: full (run.device is cuda:0; --preset cpu for a short run)"]


@pytest.mark.parametrize("preset", ["full", "cpu"])
def test_a_named_preset_is_kept_and_nothing_is_probed(preset: str) -> None:
    cuda_available, lines = probe(preset == "cpu"), []
    args = build_parser().parse_args(["--preset", preset])
    cfg = config_from_args(args, cuda_available=cuda_available, announce=lines.append)
    assert cfg == load_config(preset)
    assert (cuda_available.calls, lines) == (0, [])


def test_a_preset_in_the_config_file_is_kept(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"preset": "full", "run": {"epochs": 3}})
    cfg, lines = resolve("--config", path, cuda=False)
    assert (cfg.preset, cfg.model.norm, cfg.run.epochs, lines) == ("full", "group", 3, [])
    # The command line still beats the file.
    assert resolve("--config", path, "--preset", "cpu", cuda=True)[0].preset == "cpu"


def test_nothing_is_announced_when_the_config_is_invalid() -> None:
    lines: list[str] = []
    args = build_parser().parse_args(["--lr", "-1"])
    with pytest.raises(ConfigError, match="optim.lr"):
        config_from_args(args, cuda_available=probe(False), announce=lines.append)
    assert lines == []


def test_the_library_defaults_stay_the_full_run() -> None:
    assert load_config().preset == ""
    assert load_config().run.epochs == load_config("full").run.epochs == 60


# --------------------------------------------------------------------------- slow settings


@pytest.mark.parametrize(
    "device, preset, expected",
    [
        ("cpu", "", "the default (full) settings are made for a CUDA GPU and will be slow on cpu"),
        ("cpu", "full", "the full preset is made for a CUDA GPU"),
        ("mps", "full", "slow on mps"),
        ("cpu", "cpu", None),
        ("cuda", "", None),
        ("cuda", "full", None),
    ],
)
def test_slow_settings_warning(device: str, preset: str, expected: str | None) -> None:
    message = slow_settings_warning(torch.device(device), preset)
    if expected is None:
        assert message is None
    else:
        assert expected in message and "--preset cpu" in message and "\n" not in message
