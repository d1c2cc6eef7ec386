"""Tests for models.basic_cnn_model: shapes, unfreezing, init, noise, summary and validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.basic_cnn_model import (
    BLOCKS_INPUT_SIZE,
    MIN_FEATURE_SIZE,
    BasicCNNModel,
    ConvBlock,
    ModelConfig,
    Stem,
    TrainOnlyNoise,
    auto_stem_stride,
    format_summary,
    init_weights,
    model_summary,
    scaled_channels,
)

TINY = 0.125  # channels 8 / 64 / 32: fast on CPU
PART_NAMES = ["noise", "block1", "block2", "block3", "head1", "head2", "head3", "classifier"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_model(**overrides) -> BasicCNNModel:
    overrides.setdefault("width", TINY)
    return BasicCNNModel(**overrides)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def batch(model: BasicCNNModel, size: int = 28, n: int = 2) -> torch.Tensor:
    return torch.randn(n, model.config.in_channels, size, size)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("norm", ["group", "batch"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape(in_channels: int, size: int, depth: int, norm: str) -> None:
    model = tiny_model(in_channels=in_channels, num_classes=5, norm=norm, active_blocks=depth)
    assert model.active_blocks == depth
    out = model(batch(model, size))
    assert out.shape == (2, 5)
    model.eval()
    assert model(batch(model, size, n=1)).shape == (1, 5)


@pytest.mark.parametrize("activation", ["silu", "gelu", "mish"])
def test_activations_build_and_run(activation: str) -> None:
    model = tiny_model(activation=activation, active_blocks=3)
    assert model(batch(model)).shape == (2, model.config.num_classes)


def test_conv_block_shortcut_kinds() -> None:
    assert isinstance(ConvBlock(8, 8).shortcut, nn.Identity)
    projected = ConvBlock(8, 16, stride=2, dilation=2, downsample="stride")
    assert isinstance(projected.shortcut, nn.Sequential)
    assert projected(torch.randn(2, 8, 15, 15)).shape == (2, 16, 8, 8)
    assert isinstance(ConvBlock(8, 8, stride=2, downsample="stride").shortcut, nn.Sequential)
    assert isinstance(ConvBlock(8, 16, stride=2).shortcut, nn.Sequential)  # channels change


@pytest.mark.parametrize("size", [7, 8, 15, 28])
def test_maxpool_downsample_matches_the_strided_output_size(size: int) -> None:
    x = torch.randn(2, 8, size, size)
    strided = ConvBlock(8, 16, stride=2, dilation=2, downsample="stride")
    pooled = ConvBlock(8, 16, stride=2, dilation=2, downsample="maxpool")
    assert pooled(x).shape == strided(x).shape == (2, 16, (size + 1) // 2, (size + 1) // 2)


def test_maxpool_downsample_pools_the_sum_of_stride_1_paths() -> None:
    block = ConvBlock(8, 8, stride=2, downsample="maxpool").eval()
    assert block.conv.stride == (1, 1) and isinstance(block.shortcut, nn.Identity)
    x = torch.randn(1, 8, 6, 6)
    full = block.act(block.norm(block.conv(x))) + x  # (1, 8, 6, 6), no dropout in eval
    assert torch.allclose(block(x), nn.functional.max_pool2d(full, 2))
    # A block that keeps the resolution is the same with either setting.
    assert isinstance(ConvBlock(8, 8, downsample="maxpool").pool, nn.Identity)


def test_block_channels_replace_the_width_scaled_channels() -> None:
    model = tiny_model(block_channels=[8, 16, 24], active_blocks=3, width=3.0)
    assert model.config.block_channels == (8, 16, 24)  # a list becomes a tuple
    assert model.config.channels() == (8, 16, 24)  # width plays no part
    outs = [block[-1].conv.out_channels for block in model.blocks]
    assert outs == [8, 16, 24]
    # Every head feeds the shared classifier at block 2's width.
    assert model.classifier.in_features == 16
    assert model(batch(model)).shape == (2, model.config.num_classes)
    assert tiny_model().config.channels() == tuple(scaled_channels(c, TINY) for c in (64, 512, 256))


def test_model_downsample_setting_reaches_every_strided_block() -> None:
    pooled = tiny_model(active_blocks=3)
    assert pooled.config.downsample == "maxpool"  # the default
    strided = tiny_model(active_blocks=3, downsample="stride")
    pools = [
        b
        for b in pooled.modules()
        if isinstance(b, ConvBlock) and not isinstance(b.pool, nn.Identity)
    ]
    strides = [b for b in strided.modules() if isinstance(b, ConvBlock) and b.conv.stride == (2, 2)]
    assert len(pools) == len(strides) == 3  # the last ConvBlock of each block
    # A pooled block that keeps its channel count needs no 1x1 projection on its shortcut.
    assert all(
        isinstance(b.shortcut, nn.Identity)
        for b in pools
        if b.conv.in_channels == b.conv.out_channels
    )
    assert "blocks.0.1.shortcut.0.weight" in strided.state_dict()
    assert "blocks.0.1.shortcut.0.weight" not in pooled.state_dict()
    assert pooled(batch(pooled)).shape == strided(batch(strided)).shape


def test_conv_block_rejects_an_unknown_downsample() -> None:
    with pytest.raises(
        ValueError, match=r"downsample='avg' is invalid; allowed: 'maxpool' \| 'stride'"
    ):
        ConvBlock(8, 8, stride=2, downsample="avg")


def test_basic_conv_block_is_two_convs_with_the_activation_after_the_sum() -> None:
    block = ConvBlock(8, 8, stride=2, style="basic", norm="batch").eval()
    x = torch.randn(2, 8, 6, 6)
    inner = block.norm2(block.conv2(block.act(block.norm(block.conv(x)))))  # no dropout in eval
    assert torch.allclose(block(x), nn.functional.max_pool2d(block.act(inner + x), 2))
    assert block.conv2.stride == (1, 1) and block.conv2.in_channels == 8
    # The single block has no second conv and passes the sum on unchanged, negatives included.
    single = ConvBlock(8, 8, style="single").eval()
    assert isinstance(single.conv2, nn.Identity) and isinstance(single.out_act, nn.Identity)
    assert (single(x) < 0).any() and not (block(x) < -0.5).any()  # SiLU's minimum is -0.28
    with pytest.raises(ValueError, match=r"style='wide' is invalid; allowed: 'single' \| 'basic'"):
        ConvBlock(8, 8, style="wide")


def test_conv_block_and_block_depths_shape_every_block() -> None:
    single = tiny_model(active_blocks=3)
    assert [len(b) for b in single.blocks] == [2, 3, 3]  # the default depths
    model = tiny_model(active_blocks=3, conv_block="basic", block_depths=[1, 2, 4])
    assert model.config.block_depths == (1, 2, 4)  # a list becomes a tuple
    assert [len(b) for b in model.blocks] == [1, 2, 4]
    convs = [
        m for m in model.blocks.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(convs) == 2 * (1 + 2 + 4)
    assert all(b.style == "basic" for b in model.modules() if isinstance(b, ConvBlock))
    # Only the last ConvBlock of each block downsamples, whatever the depth.
    pooled = [
        b for b in model.modules() if isinstance(b, ConvBlock) and b.pool.__class__ is nn.MaxPool2d
    ]
    assert [b is blk[-1] for b, blk in zip(pooled, model.blocks, strict=True)] == [True] * 3
    assert model(batch(model)).shape == (2, model.config.num_classes)
    model.set_dropout(3, 0.25)
    assert model.dropout_rates()[2] == 0.25
    # A single-block model keeps the parameter names checkpoints were saved with.
    assert not any("conv2" in k or "norm2" in k for k in single.state_dict())


@pytest.mark.parametrize(
    ("strides", "sizes"),
    [((2, 2, 2), [14, 7, 4]), ((1, 2, 2), [28, 14, 7]), ((2, 1, 2), [14, 14, 7])],
)
def test_block_strides_set_where_the_feature_map_shrinks(strides, sizes) -> None:
    model = tiny_model(active_blocks=3, block_strides=list(strides))
    assert model.config.block_strides == strides  # a list becomes a tuple
    shapes = {r["name"]: r["output_shape"] for r in model_summary(model, 28)}
    assert [shapes[f"block{k}"][1:] for k in (1, 2, 3)] == [(s, s) for s in sizes]
    # Only a block that halves the resolution ends in a max-pool.
    for block, stride in zip(model.blocks, strides, strict=True):
        assert isinstance(block[-1].pool, nn.MaxPool2d) == (stride == 2)
    assert model(batch(model)).shape == (2, model.config.num_classes)


def test_channels_follow_width_and_groups_fit() -> None:
    assert [scaled_channels(c, 1.0) for c in (64, 512, 256)] == [64, 512, 256]
    assert [scaled_channels(c, TINY) for c in (64, 512, 256)] == [8, 64, 32]
    assert scaled_channels(64, 0.01) == 8
    model = tiny_model(width=0.1875, gn_groups=16)  # 64 * 0.1875 = 12 channels
    norm = model.blocks[0][0].norm
    assert isinstance(norm, nn.GroupNorm) and norm.num_channels == 16
    assert norm.num_groups == math.gcd(16, 16)
    model = BasicCNNModel(width=0.375, gn_groups=16)  # block 1: 24 channels -> gcd 8
    assert model.blocks[0][0].norm.num_groups == 8


def test_wrong_input_channels_rejected() -> None:
    model = tiny_model(in_channels=1)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(2, 3, 28, 28))


# --------------------------------------------------------------------------- unfreezing


def _count_calls(model: BasicCNNModel) -> dict[str, int]:
    calls: dict[str, int] = {}
    modules = {f"block{i}": b for i, b in enumerate(model.blocks, 1)}
    modules |= {f"head{i}": h for i, h in enumerate(model.heads, 1)}
    for name, module in modules.items():
        calls[name] = 0

        def hook(_module, _inputs, _output, name: str = name) -> None:
            calls[name] += 1

        module.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_inactive_blocks_skipped_and_get_no_grad(depth: int) -> None:
    model = tiny_model(active_blocks=depth)
    calls = _count_calls(model)
    model(batch(model)).sum().backward()
    for k in range(1, 4):
        assert calls[f"block{k}"] == (1 if k <= depth else 0)
        assert calls[f"head{k}"] == (1 if k == depth else 0)
        block_grads = [p.grad for p in model.blocks[k - 1].parameters()]
        head_grads = [p.grad for p in model.heads[k - 1].parameters()]
        if k <= depth:
            assert all(g is not None for g in block_grads)
        else:
            assert all(g is None for g in block_grads)
            assert all(not p.requires_grad for p in model.blocks[k - 1].parameters())
        assert all((g is not None) == (k == depth) for g in head_grads)
    assert all(p.grad is not None for p in model.classifier.parameters())


def test_freeze_blocks_until_sets_requires_grad() -> None:
    model = tiny_model()
    for k in (2, 3, 1, 3):
        model.freeze_blocks_until(k)
        assert model.active_blocks == k
        for i in range(1, 4):
            assert all(p.requires_grad == (i <= k) for p in model.blocks[i - 1].parameters())
            assert all(p.requires_grad == (i == k) for p in model.heads[i - 1].parameters())
        assert all(p.requires_grad for p in model.classifier.parameters())


def test_parameter_groups_are_disjoint_and_cover_the_model() -> None:
    model = tiny_model()
    groups = [model.initial_parameters(), model.new_parameters(2), model.new_parameters(3)]
    group_ids = [ids(g) for g in groups]
    assert all(
        len(g) == len(s) for g, s in zip(groups, group_ids, strict=True)
    )  # no duplicates inside
    assert not group_ids[0] & group_ids[1]
    assert not group_ids[0] & group_ids[2]
    assert not group_ids[1] & group_ids[2]
    assert set().union(*group_ids) == ids(model.parameters())
    expected_new = ids(model.blocks[1].parameters()) | ids(model.heads[1].parameters())
    assert group_ids[1] == expected_new


def test_trainable_parameters_lie_in_activated_groups() -> None:
    model = tiny_model()
    activated = ids(model.initial_parameters())
    assert ids(p for p in model.parameters() if p.requires_grad) <= activated
    for k in (2, 3):
        model.freeze_blocks_until(k)
        activated |= ids(model.new_parameters(k))
        trainable = ids(p for p in model.parameters() if p.requires_grad)
        assert trainable <= activated
        assert ids(model.new_parameters(k)) & trainable == ids(model.new_parameters(k))


def test_optimizer_growth_ends_with_the_trainable_parameters() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.initial_parameters(), lr=0.1)
    for k in (2, 3):
        model.freeze_blocks_until(k)
        optimizer.add_param_group({"params": model.new_parameters(k), "lr": 0.01})
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len(ids(in_optimizer))
    assert ids(in_optimizer) == ids(model.parameters())
    trainable = ids(p for p in model.parameters() if p.requires_grad)
    assert ids(p for p in in_optimizer if p.requires_grad) == trainable
    # One step at full depth runs and moves only trainable weights.
    frozen_head = model.heads[0].norm.weight.detach().clone()
    model(batch(model)).sum().backward()
    optimizer.step()
    assert torch.equal(model.heads[0].norm.weight, frozen_head)


@pytest.mark.parametrize("bad", [0, 4, -1, 1.5, "2", True, None])
def test_freeze_blocks_until_rejects_bad_k(bad) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"1\.\.3") as info:
        model.freeze_blocks_until(bad)
    assert repr(bad) in str(info.value)
    assert model.active_blocks == 1
    with pytest.raises(ValueError, match=r"1\.\.3"):
        model.new_parameters(bad)


# --------------------------------------------------------------------------- noise, determinism


def test_train_only_noise_inert_in_eval_and_active_in_train() -> None:
    noise = TrainOnlyNoise(0.5)
    x = torch.randn(4, 3, 8, 8)
    noise.eval()
    assert torch.equal(noise(x), x)
    noise.train()
    noisy = noise(x)
    assert not torch.equal(noisy, x)
    assert 0.3 < (noisy - x).std().item() < 0.7
    assert torch.equal(TrainOnlyNoise(0.0).train()(x), x)
    with pytest.raises(ValueError, match="std"):
        TrainOnlyNoise(-1.0)


def test_eval_outputs_are_deterministic() -> None:
    model = tiny_model(active_blocks=3, noise_std=0.5).eval()
    x = batch(model, n=3)
    assert torch.equal(model(x), model(x))


def test_model_applies_noise_first_in_training() -> None:
    model = tiny_model(noise_std=0.5)
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = batch(model)
    model.train()(x)
    model.eval()(x)
    assert not torch.equal(seen[0], x)
    assert torch.equal(seen[1], x)


# --------------------------------------------------------------------------- initialisation


def test_kaiming_init_of_a_wide_conv() -> None:
    model = BasicCNNModel(width=0.5, in_channels=1)
    conv = model.blocks[1][1].conv  # 256 -> 256, 3x3
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    expected = math.sqrt(2.0 / fan_out)
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.15)
    assert abs(conv.weight.mean().item()) < 0.1 * expected


def test_torch_linear_init_gives_the_heads_and_classifier_pytorchs_default() -> None:
    torch.manual_seed(0)
    kaiming = BasicCNNModel(width=0.5, norm="batch", active_blocks=3)
    torch.manual_seed(0)
    default = BasicCNNModel(width=0.5, norm="batch", active_blocks=3, linear_init="torch")
    assert default.config.linear_init == "torch" and kaiming.config.linear_init == "kaiming"
    adapter = default.heads[2].adapter  # 128 -> 256
    fan_in = adapter.in_features
    # kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in).
    assert adapter.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
    assert adapter.weight.abs().max().item() <= 1 / math.sqrt(fan_in)
    assert 0 < adapter.bias.abs().max().item() <= 1 / math.sqrt(fan_in)
    classifier = default.classifier
    assert classifier.weight.std() < 0.2 * kaiming.classifier.weight.std()
    for k, d in zip(kaiming.modules(), default.modules(), strict=True):  # the rest as before
        if isinstance(k, (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)):
            assert torch.equal(k.weight, d.weight)


def test_init_weights_rejects_an_unknown_linear_init() -> None:
    with pytest.raises(ValueError, match=r"linear_init='xavier' is invalid; allowed: 'kaiming'"):
        init_weights(nn.Linear(4, 2), "xavier")


def test_linear_biases_zero_and_norms_unit() -> None:
    model = tiny_model(norm="batch")
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Conv2d):
            assert m.bias is None


# --------------------------------------------------------------------------- summary


def test_summary_counts_and_trainable_change() -> None:
    model = tiny_model()
    rows = model_summary(model)
    assert [r["name"] for r in rows] == PART_NAMES
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())
    trainable_1 = sum(r["trainable"] for r in rows)
    assert trainable_1 == sum(p.numel() for p in model.parameters() if p.requires_grad)
    by_name = {r["name"]: r for r in rows}
    assert by_name["block2"]["trainable"] == 0 and not by_name["block2"]["active"]
    assert by_name["head1"]["active"] and by_name["classifier"]["active"]

    model.freeze_blocks_until(2)
    after = {r["name"]: r for r in model_summary(model)}
    assert sum(r["trainable"] for r in after.values()) != trainable_1
    assert after["block2"]["trainable"] == after["block2"]["params"] > 0
    assert after["head1"]["trainable"] == 0 and not after["head1"]["active"]
    assert after["head2"]["active"] and not after["block3"]["active"]


def test_summary_output_shapes() -> None:
    model = tiny_model(in_channels=1, num_classes=4)
    shapes = {r["name"]: r["output_shape"] for r in model_summary(model, input_size=28)}
    assert shapes["noise"] == (1, 28, 28)
    assert shapes["block1"] == (8, 14, 14)
    assert shapes["block2"] == (64, 7, 7)
    assert shapes["block3"] == (32, 4, 4)
    assert shapes["head1"] == shapes["head3"] == (64,)
    assert shapes["classifier"] == (4,)
    assert model.training  # the summary restores the mode
    assert all(r["output_shape"] is None for r in model_summary(model, input_size=0))


def test_format_summary_lists_every_part_and_totals() -> None:
    model = tiny_model()
    rows = model_summary(model)
    text = format_summary(rows)
    for name in PART_NAMES:
        assert name in text
    total = sum(p.numel() for p in model.parameters())
    assert "total" in text and f"{total:,}" in text


# --------------------------------------------------------------------------- config, dropout


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("in_channels", 2),
        ("in_channels", 3.0),
        ("num_classes", 1),
        ("input_size", 24),
        ("activation", "relu"),
        ("width", 0),
        ("width", -0.5),
        ("width", float("nan")),
        ("norm", "layer"),
        ("gn_groups", 0),
        ("noise_std", -0.1),
        ("dropout", (0.1, 0.2)),
        ("dropout", (0.1, 0.2, 1.0)),
        ("active_blocks", 4),
        ("active_blocks", 0),
        ("downsample", "avg"),
        ("block_channels", (32, 64)),
        ("block_channels", (32, 0, 128)),
        ("block_channels", (32, 64.0, 128)),
        ("block_channels", 64),
        ("linear_init", "zeros"),
        ("conv_block", "wide"),
        ("block_depths", (2, 3)),
        ("block_depths", (2, 0, 3)),
        ("block_depths", (2, 3.0, 3)),
        ("block_strides", (2, 2)),
        ("block_strides", (2, 3, 2)),
        ("block_strides", (1, 2.0, 2)),
    ],
)
def test_config_validation_names_field_and_value(field: str, value) -> None:
    with pytest.raises(ValueError, match=field) as info:
        BasicCNNModel(**{field: value})
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_config_messages_list_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"'silu' \| 'gelu' \| 'mish'"):
        BasicCNNModel(activation="tanh")
    with pytest.raises(ValueError, match=r"1 \| 3"):
        BasicCNNModel(in_channels=4)


def test_config_and_overrides_combine() -> None:
    config = ModelConfig(in_channels=1, num_classes=3, width=TINY)
    model = BasicCNNModel(config, num_classes=6, dropout=[0.0, 0.1, 0.2])
    assert model.config.in_channels == 1 and model.config.num_classes == 6
    assert config.num_classes == 3  # the caller's config is left alone
    assert model.dropout_rates() == pytest.approx([0.0, 0.1, 0.2])
    with pytest.raises(TypeError, match="colour"):
        BasicCNNModel(colour=3)


def test_default_dropout_rates() -> None:
    assert tiny_model().dropout_rates() == pytest.approx([0.1, 0.2, 0.3])


def test_set_dropout_changes_every_dropout_of_the_block() -> None:
    model = tiny_model()
    model.set_dropout(2, 0.5)
    rates = [[m.p for m in b.modules() if isinstance(m, nn.Dropout2d)] for b in model.blocks]
    assert rates[1] == [0.5, 0.5, 0.5]
    assert rates[0] == [0.1, 0.1] and rates[2] == [0.3, 0.3, 0.3]
    assert model.dropout_rates() == pytest.approx([0.1, 0.5, 0.3])
    with pytest.raises(ValueError, match="p"):
        model.set_dropout(1, 1.0)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        model.set_dropout(4, 0.1)


@pytest.mark.parametrize("downsample", ["maxpool", "stride"])
@pytest.mark.parametrize("strides", [(2, 2, 2), (1, 2, 2), (2, 1, 2), (1, 1, 1)])
def test_min_input_size_is_the_least_side_leaving_the_last_block_its_minimum_map(
    strides: tuple[int, int, int], downsample: str
) -> None:
    model = tiny_model(block_strides=strides, downsample=downsample, active_blocks=3)
    side = model.min_input_size

    def last_map(size: int) -> int:  # the side of block 3's output, from a real forward pass
        rows = {r["name"]: r["output_shape"] for r in model_summary(model, input_size=size)}
        return rows["block3"][-1]

    assert last_map(side) >= MIN_FEATURE_SIZE > last_map(side - 1)


def test_config_refuses_an_input_below_its_layouts_minimum() -> None:
    least = ModelConfig().min_input_size
    with pytest.raises(ValueError, match=rf"input_size=16 is invalid; allowed: an int >= {least}"):
        ModelConfig(input_size=16)
    # A layout that keeps block 1's resolution takes smaller images, and trains on them.
    model = tiny_model(input_size=16, block_strides=(1, 2, 2), active_blocks=3)
    assert model.min_input_size <= 16 < least
    model(batch(model, 16)).sum().backward()


# --------------------------------------------------------------------------- head blending


def test_head_mix_zero_reproduces_the_previous_depth() -> None:
    model = tiny_model(noise_std=0.0).eval()
    x = batch(model, n=4)
    shallow = model(x)
    model.freeze_blocks_until(2)
    deep = model(x)
    model.set_head_mix(0.0)
    assert torch.allclose(model(x), shallow, atol=1e-6)
    model.set_head_mix(0.25)
    # The classifier is linear, so the logits move linearly between the two heads.
    assert torch.allclose(model(x), 0.75 * shallow + 0.25 * deep, atol=1e-5)


def test_freezing_again_resets_the_head_mix_and_old_head_stays_frozen() -> None:
    model = tiny_model()
    model.freeze_blocks_until(3)
    model.set_head_mix(0.5)
    assert not any(p.requires_grad for p in model.heads[1].parameters())
    model(batch(model)).sum().backward()
    assert all(p.grad is None for p in model.heads[1].parameters())
    assert all(p.grad is not None for p in model.heads[2].parameters())
    model.freeze_blocks_until(3)
    assert model.head_mix == 1.0


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, "0.5", True])
def test_set_head_mix_rejects_values_outside_0_1(bad) -> None:
    model = tiny_model(active_blocks=2)
    with pytest.raises(ValueError, match=r"set_head_mix: mix=.* allowed: a number in \[0, 1\]"):
        model.set_head_mix(bad)


def test_set_head_mix_needs_a_previous_head() -> None:
    model = tiny_model(active_blocks=1)
    with pytest.raises(ValueError, match="needs 2 or more active blocks"):
        model.set_head_mix(0.0)
    model.set_head_mix(1.0)  # the plain single-head case stays allowed


# --------------------------------------------------------------------------- stem


@pytest.mark.parametrize(
    ("size", "stride"), [(25, 1), (28, 1), (55, 1), (56, 2), (64, 2), (111, 2), (128, 4), (224, 8)]
)
def test_auto_stem_stride_leaves_block_one_28_to_55_px(size: int, stride: int) -> None:
    assert auto_stem_stride(size) == stride
    model = tiny_model(input_size=size, active_blocks=3)  # stem_stride 0: auto
    assert model.config.stem == stride  # the resolved stride is what the record keeps
    assert model.record()["options"]["stem_stride"] == stride
    rows = {r["name"]: r["output_shape"] for r in model_summary(model)}
    assert stride == 1 or size // stride >= BLOCKS_INPUT_SIZE
    assert MIN_FEATURE_SIZE <= rows["block3"][-1] <= 7  # 28-55 px end at 4-7 px


def test_a_stem_is_part_of_block_one_and_shrinks_the_input_by_its_stride() -> None:
    plain = tiny_model(input_size=64, stem_stride=1, active_blocks=3)
    stemmed = tiny_model(input_size=64, stem_stride=4, block_strides=(1, 1, 2), active_blocks=3)
    assert not any(isinstance(m, Stem) for m in plain.modules())
    assert isinstance(stemmed.blocks[0][0], Stem)
    shapes = {r["name"]: r["output_shape"] for r in model_summary(stemmed)}
    assert shapes["block1"][-1] == 16 and shapes["block3"][-1] == 8  # 64 / 4, then / 2
    # Block 1's parameters (the stem's with them) join with stage 1; no stage is added.
    assert ids(stemmed.blocks[0][0].parameters()) <= ids(stemmed.stage_parameters(1))
    assert stemmed.num_stages == plain.num_stages == 3
    stemmed(batch(stemmed, 64)).sum().backward()
    assert stemmed.blocks[0][0].conv.weight.grad is not None


def test_a_stem_costs_less_than_the_blocks_at_full_resolution() -> None:
    def macs(model: BasicCNNModel) -> int:
        total = 0

        def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            nonlocal total
            k = module.weight[0].numel()  # in/groups x kh x kw
            total += output.numel() * k

        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        hooks = [m.register_forward_hook(count) for m in convs]
        model.eval()(batch(model, 64, n=1))
        for h in hooks:
            h.remove()
        return total

    full = macs(tiny_model(input_size=64, stem_stride=1, active_blocks=3))
    auto = macs(tiny_model(input_size=64, active_blocks=3))
    assert auto < full / 2


@pytest.mark.parametrize("bad", [3, -1, 32, 2.0, "2", True])
def test_a_stem_stride_outside_the_allowed_set_is_refused(bad) -> None:
    with pytest.raises(ValueError, match=r"stem_stride=.* is invalid; allowed: 0 \(auto\) or 1, 2"):
        ModelConfig(input_size=64, stem_stride=bad)


def test_an_explicit_stem_raises_the_least_input_size_and_says_what_to_change() -> None:
    config = ModelConfig(input_size=64, stem_stride=2)
    assert config.min_input_size == 49  # (25 - 1) x 2 + 1
    with pytest.raises(ValueError, match=r"input_size=48 is invalid; allowed: an int >= 49") as e:
        ModelConfig(input_size=48, stem_stride=2)
    assert (e.value.minimum, e.value.remedy) == (49, "model.stem_stride or model.block_strides")
