"""The torchvision and timm networks of models.zoo as staged models: splits, freezing, sizes."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from models import registry
from models.zoo import TORCHVISION_ARCHS, build_zoo_model, resolve_stem

TIMM_ARCH = "timm/mobilenetv3_small_050"
# A ViT: its cls_token and pos_embed are parameters of the root module, outside any block.
TIMM_VIT = "timm/test_vit"

# arch -> (input side, options): small sides keep the forwards cheap on two shared cores.
CASES: dict[str, tuple[int, dict]] = {
    "resnet18": (32, {"stem": "cifar"}),
    "resnet50": (16, {"stem": "cifar"}),
    "densenet121": (8, {"stem": "cifar"}),  # its smallest cifar input
    "efficientnet_b0": (32, {"stem": "cifar"}),
    "vgg16_bn": (32, {}),  # five 2x2 max-pools: 32 px is its smallest input
    "mobilenet_v2": (32, {"stem": "cifar"}),
    "inception_v3": (28, {"resize": 75}),  # 75 px is its smallest input
    TIMM_ARCH: (32, {}),
    TIMM_VIT: (32, {}),
}
ARCHS = list(CASES)
# Slow to run: one forward each (in the frozen-BatchNorm test).
SLOW = {"densenet121", "vgg16_bn", "inception_v3"}

STAGE_NAMES = {
    "resnet18": ("stem+layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("stem+layer1", "layer2", "layer3", "layer4"),
    "densenet121": ("stem+denseblock1", "denseblock2", "denseblock3", "denseblock4"),
    "efficientnet_b0": ("features.0-1", "features.2", "features.3", "features.4-5", "features.6-8"),
    "vgg16_bn": ("block1", "block2", "block3", "block4", "block5"),
    "mobilenet_v2": (
        "features.0-1",
        "features.2-3",
        "features.4-6",
        "features.7-13",
        "features.14-18",
    ),
    "inception_v3": ("stem", "mixed_5", "mixed_6", "mixed_7"),
    TIMM_ARCH: ("conv_stem..blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5"),
    TIMM_VIT: (
        "cls_token..blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3",
        "blocks.4",
        "blocks.5..norm",
    ),
}


def build(arch: str, in_channels: int = 1, num_classes: int = 4):
    size, options = CASES[arch]
    torch.manual_seed(0)
    return build_zoo_model(
        arch, in_channels=in_channels, num_classes=num_classes, input_size=size, **options
    )


@functools.cache
def shared(arch: str):
    """One 1-channel model per arch for the tests that only read it (building takes ~1 s)."""
    return build(arch)


def batch_norms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def first_conv(model) -> nn.Module:
    return next(m for m in model.net.modules() if isinstance(m, nn.Conv2d))


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize("arch", ARCHS)
def test_rgb_build_and_forward(arch):
    model = build(arch, in_channels=3)
    assert model.in_channels == 3 and first_conv(model).in_channels == 3
    if arch in SLOW:
        return  # their one forward is in test_frozen_stages_keep_batchnorm_statistics
    size = CASES[arch][0]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_stage_split(arch):
    model = shared(arch)
    assert model.stage_names == STAGE_NAMES[arch]
    assert model.num_stages == len(STAGE_NAMES[arch])
    assert model.arch == arch and model.in_channels == 1 and model.num_classes == 4
    assert first_conv(model).in_channels == 1
    # The groups are not registered: every tensor has the library network's key, once.
    assert all(key.startswith("net.") for key in model.state_dict())
    # Every parameter in exactly one stage or the head.
    seen: list[int] = []
    for stage in range(1, model.num_stages + 1):
        params = model.stage_parameters(stage)
        assert params, f"stage {stage} has no parameters"
        seen += [id(p) for p in params]
    seen += [id(p) for p in model.head_parameters()]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}
    # The head is a new classifier for 4 classes.
    assert any(
        isinstance(m, nn.Linear) and m.out_features == 4 for m in model.head_module().modules()
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_stages_keep_batchnorm_statistics(arch):
    model = build(arch)
    last = model.num_stages
    model.set_trainable({last})
    model.train()
    frozen, trained = model.stage_modules()[0], model.stage_modules()[last - 1]
    assert all(not p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trained.parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    assert not any(m.training for m in frozen.modules())
    assert all(m.training for m in trained.modules())
    frozen_bn, trained_bn = batch_norms(frozen), batch_norms(trained)
    before = [bn.running_mean.clone() for bn in frozen_bn]
    trained_before = [bn.running_mean.clone() for bn in trained_bn]

    size = CASES[arch][0]
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    out.sum().backward()

    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, frozen_bn, strict=True))
    # The trained stage's statistics do move, so the check above can fail.
    pairs = zip(trained_before, trained_bn, strict=True)
    assert all(not torch.equal(b, bn.running_mean) for b, bn in pairs)
    assert all(p.grad is None for p in frozen.parameters())
    if arch != TIMM_VIT:  # a ViT has LayerNorms only
        assert frozen_bn and trained_bn


@pytest.mark.parametrize("arch", ARCHS)
def test_record_rebuilds_the_same_model(arch):
    model = shared(arch)
    record = model.record()
    assert set(record) == {"arch", "options", "in_channels", "num_classes", "input_size", "stages"}
    assert record["stages"] == list(model.stage_names)
    assert set(record["options"]) == {"stem", "resize"}
    with torch.device("meta"):  # shapes only: no weights to initialise
        rebuilt = registry.build_from_record(record)
    want = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == want
    assert rebuilt.record() == record


def test_registry_builds_zoo_models_with_options():
    model = registry.build_model(
        "resnet18", in_channels=3, num_classes=5, input_size=28, options={"stem": "imagenet"}
    )
    assert model.stem == "imagenet" and model.num_classes == 5
    assert registry.is_registered(TIMM_ARCH)
    assert all(registry.is_registered(arch) for arch in TORCHVISION_ARCHS)


# --------------------------------------------------------------------------- sizes and stems


def layer4_side(model, side: int) -> int:
    x = torch.zeros(1, model.in_channels, side, side)
    model.eval()
    with torch.no_grad():
        for stage in model.stage_modules():
            x = stage(x)
    return x.shape[-1]


def test_auto_stem_picks_cifar_for_small_inputs():
    small = build_zoo_model("resnet18", in_channels=1, num_classes=4, input_size=28)
    assert small.stem == "cifar" and small.record()["options"]["stem"] == "cifar"
    assert small.net.conv1.stride == (1, 1) and isinstance(small.net.maxpool, nn.Identity)
    assert layer4_side(small, 28) == 4  # > 1 px: 28 -> 28 -> 14 -> 7 -> 4
    large = build_zoo_model("resnet18", in_channels=1, num_classes=4, input_size=64)
    assert large.stem == "imagenet" and large.net.conv1.stride == (2, 2)
    assert layer4_side(large, 28) == 1  # what the ImageNet stem would do to 28 px
    # resize decides the side the network sees
    assert resolve_stem("resnet18", "auto", 224) == "imagenet"
    assert resolve_stem("vgg16_bn", "auto", 28) == "imagenet"  # no cifar stem to pick


def test_min_input_size_follows_stem_and_resize():
    assert shared("vgg16_bn").min_input_size == 32
    assert shared("densenet121").min_input_size == 8
    imagenet = build_zoo_model(
        "densenet121", in_channels=1, num_classes=4, input_size=64, stem="imagenet"
    )
    assert imagenet.min_input_size == 29
    resized = shared("inception_v3")
    assert resized.net_min_size == 75 and resized.min_input_size == 1


@pytest.mark.parametrize(
    ("arch", "size", "options", "minimum"),
    [
        ("inception_v3", 64, {}, 75),
        ("vgg16_bn", 28, {}, 32),
        ("inception_v3", 28, {"resize": 60}, 75),
    ],
)
def test_too_small_input_size_is_refused_in_one_line(arch, size, options, minimum):
    with pytest.raises(ValueError) as error:
        build_zoo_model(arch, in_channels=1, num_classes=4, input_size=size, **options)
    message = str(error.value)
    assert "\n" not in message
    assert arch in message and str(options.get("resize", size)) in message
    assert f">= {minimum}" in message


def test_too_small_input_is_refused_at_forward():
    model = shared("vgg16_bn")
    with pytest.raises(ValueError, match=r"too small for vgg16_bn.*>= 32") as error:
        model(torch.zeros(2, 1, 16, 16))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\)"):
        model(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"arch": "vgg16_bn", "stem": "cifar"}, r"stem='cifar' is not available for vgg16_bn"),
        ({"arch": "resnet18", "stem": "tiny"}, r"model.stem='tiny' is invalid; allowed"),
        ({"arch": "resnet18", "resize": -1}, r"model.resize=-1 is invalid"),
        ({"arch": "resnet18", "num_classes": 1}, r"model.num_classes=1 is invalid"),
        ({"arch": "resnet7"}, r"model.arch='resnet7' is not a torchvision arch"),
        ({"arch": "timm/no_such_net"}, r"model.arch='timm/no_such_net' is not a timm model"),
    ],
)
def test_bad_options_are_refused_in_one_line(kwargs, pattern):
    args = {"in_channels": 1, "num_classes": 4, "input_size": 32} | kwargs
    with pytest.raises(ValueError, match=pattern) as error:
        build_zoo_model(args.pop("arch"), **args)
    assert "\n" not in str(error.value)
