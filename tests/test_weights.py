"""models.weights: loading saved and library weights into zoo models, and the offline failure."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.weights import WeightsError, load_weights, pretrained_imagenet
from models.zoo import build_zoo_model

ARCH = "mobilenet_v2"  # small (2.2 M parameters) and a torchvision arch with a known URL
FIRST_CONV = "net.features.0.0.weight"
HEAD = ["net.classifier.1.weight", "net.classifier.1.bias"]


def make(seed: int, in_channels: int = 3, num_classes: int = 4):
    torch.manual_seed(seed)
    return build_zoo_model(
        ARCH, in_channels=in_channels, num_classes=num_classes, input_size=32, stem="imagenet"
    )


@pytest.fixture(scope="module")
def saved():
    """A model with seed 0 and its state dict (cloned: later loads must not alias it)."""
    model = make(0)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def write(tmp_path, state, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_same_model_loads_every_tensor(tmp_path, saved, name, capsys):
    model, state = saved
    path = write(tmp_path, state, name)
    fresh = make(1)
    assert not torch.equal(fresh.state_dict()[FIRST_CONV], state[FIRST_CONV])
    report = load_weights(fresh, path)
    assert sorted(report.matched) == sorted(state) and report.loaded == report.total
    assert not (report.missing or report.unexpected or report.shape_mismatches)
    assert not (report.adapted or report.classifier_replaced)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    printed = capsys.readouterr().out.splitlines()
    assert printed == report.lines() and 3 <= len(printed) <= 5
    assert f"loaded {len(state)} of {len(state)}" in printed[0]


def test_library_keys_prefixes_and_checkpoint_dicts_are_accepted(tmp_path, saved):
    model, _ = saved
    bare = model.net.state_dict()  # the library network's own keys: features.0.0.weight
    wrapped = {"model": {f"module.{k}": v for k, v in bare.items()}, "epoch": 3}
    report = load_weights(make(1), write(tmp_path, wrapped, "ckpt.pt"), report=False)
    assert len(report.matched) == len(bare) and not report.unexpected and not report.missing


def test_other_class_count_keeps_the_new_classifier(tmp_path, saved):
    _, state = saved
    model = make(1, num_classes=7)
    head_before = model.net.classifier[1].weight.clone()
    report = load_weights(model, write(tmp_path, state, "w.pth"), report=False)
    assert sorted(report.classifier_replaced) == sorted(HEAD)
    assert not (report.shape_mismatches or report.missing or report.unexpected)
    assert len(report.matched) == len(state) - 2
    assert torch.equal(model.net.classifier[1].weight, head_before)
    assert torch.equal(model.state_dict()[FIRST_CONV], state[FIRST_CONV])
    assert any("classifier replaced" in line for line in report.lines())


def test_rgb_input_conv_is_summed_into_a_grey_model(tmp_path, saved):
    rgb_model, state = saved
    grey = make(1, in_channels=1)
    report = load_weights(grey, write(tmp_path, state, "w.pth"), report=False)
    assert report.adapted == [FIRST_CONV] and not report.shape_mismatches
    assert torch.equal(grey.state_dict()[FIRST_CONV], state[FIRST_CONV].sum(1, keepdim=True))
    # What the sum means: a grey image gives the RGB conv's response to (x, x, x).
    x = torch.randn(2, 1, 16, 16)
    grey_out = grey.net.features[0][0](x)
    rgb_out = rgb_model.net.features[0][0](x.expand(-1, 3, -1, -1))
    assert torch.allclose(grey_out, rgb_out, atol=1e-5)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickle_that_imports_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "x": _RunsCode()}, path)
    with pytest.raises(WeightsError, match=r"would import \w+\.system") as error:
        load_weights(make(1), path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("absent.pth", None, "does not exist"),
        ("w.bin", b"", "unknown suffix '.bin'"),
        ("junk.pth", b"not a torch file", "not a readable weights file"),
        ("other.pth", {"fc.weight": torch.zeros(3, 3)}, "do not fit"),
    ],
)
def test_bad_weight_files_are_refused_in_one_line(tmp_path, name, content, pattern):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=pattern) as error:
        load_weights(make(1), path)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- ImageNet weights


def _offline(*args, **kwargs):
    raise urllib.error.URLError("no network")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub and no network: nothing can come from outside this test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    monkeypatch.setattr(torch.hub, "urlopen", _offline)  # torch.hub holds its own reference
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_offline_imagenet_failure_names_file_and_folder(torch_home):
    with pytest.raises(WeightsError) as error:
        pretrained_imagenet("resnet18")
    message = str(error.value)
    assert "\n" not in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"into {torch_home}/" in message
    assert not torch_home.exists() or not list(torch_home.iterdir())  # no partial file left


def test_cached_imagenet_weights_load_without_network(torch_home):
    from torchvision.models import get_model_weights, mobilenet_v2

    imagenet_like = mobilenet_v2().state_dict()  # 1000 classes, RGB: the published layout
    name = get_model_weights(ARCH).DEFAULT.url.rsplit("/", 1)[-1]
    torch_home.mkdir(parents=True)
    torch.save(imagenet_like, torch_home / name)
    state = pretrained_imagenet(ARCH)
    model = make(1, in_channels=1)
    report = load_weights(model, state, report=False)
    assert report.adapted == [FIRST_CONV]
    assert sorted(report.classifier_replaced) == sorted(HEAD)
    assert not (report.missing or report.unexpected or report.shape_mismatches)


def test_timm_offline_failure_names_the_hub_repo(monkeypatch):
    import timm

    def offline(name, pretrained=False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError) as error:
        pretrained_imagenet("timm/mobilenetv3_small_050")
    message = str(error.value)
    assert "\n" not in message and "timm/mobilenetv3_small_050.lamb_in1k" in message
    from huggingface_hub.constants import HF_HUB_CACHE

    assert HF_HUB_CACHE in message


def test_unknown_arch_has_no_imagenet_weights():
    with pytest.raises(WeightsError, match="model.arch='basic_cnn' has no ImageNet weights"):
        pretrained_imagenet("basic_cnn")


def test_plain_modules_load_too():
    source, target = nn.Linear(3, 2), nn.Linear(3, 2)
    report = load_weights(target, source.state_dict(), report=False)
    assert report.matched == ["weight", "bias"] and torch.equal(target.weight, source.weight)
