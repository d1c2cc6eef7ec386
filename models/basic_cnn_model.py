"""A small three-block residual CNN built for progressive unfreezing.

The network is ``TrainOnlyNoise -> block1 -> block2 -> block3``, where each block is a stack of
:class:`ConvBlock` layers; for large images block 1 opens with a downsampling :class:`Stem`.
Every block has its own head (global pooling, ``BatchNorm1d`` and an adapter to the width of
block 2), and one classifier is shared by all heads. Training starts with
only block 1 active; :meth:`BasicCNNModel.freeze_blocks_until` switches deeper blocks on, and
:meth:`BasicCNNModel.new_parameters` hands the parameters each step brings to an optimizer.

Public API:
    ModelConfig, BasicCNNModel, ConvBlock, Stem, StageHead, TrainOnlyNoise,
    scaled_channels, min_input_size, auto_stem_stride, init_weights, model_summary,
    format_summary, config_record, complete_record, MIN_FEATURE_SIZE, BLOCKS_INPUT_SIZE,
    MIN_CLASSES.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from models.staged import MIN_CLASSES, InputTooSmall, StagedModel

NUM_BLOCKS = 3
BASE_CHANNELS: tuple[int, int, int] = (64, 512, 256)
ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}
NORMS: tuple[str, ...] = ("group", "batch")
DOWNSAMPLES: tuple[str, ...] = ("maxpool", "stride")
CONV_BLOCKS: tuple[str, ...] = ("single", "basic")
LINEAR_INITS: tuple[str, ...] = ("kaiming", "torch")
#: Side in pixels of the smallest map the last block hands to the heads: the layout's design point
#: (28 px images end at 4 px through the default strides), kept as the floor for any strides.
MIN_FEATURE_SIZE = 4
#: The input side the three blocks are laid out for: 28 px ends at 4 px through the default
#: strides. ``stem_stride: 0`` (auto) shrinks larger images towards it before block 1 (see
#: :func:`auto_stem_stride`).
BLOCKS_INPUT_SIZE = 28
#: Stem strides: 1 is no stem; 0 in a config asks for :func:`auto_stem_stride`.
STEM_STRIDES: tuple[int, ...] = (1, 2, 4, 8, 16)
#: ModelConfig fields that change how a run trains or starts, not what the weights compute: a
#: resumed or rebuilt model may differ in them (other rates, another depth, other initial
#: weights). Every other field is architecture, which a checkpoint must match.
RUNTIME_FIELDS: tuple[str, ...] = ("dropout", "noise_std", "active_blocks", "linear_init")
#: ModelConfig fields added after checkpoints were first stored, with the value those older
#: checkpoints used (their stored config lacks the key), so they are rebuilt as they were trained.
LEGACY_FIELDS: dict[str, Any] = {
    "downsample": "stride",
    "block_channels": [],
    "linear_init": "kaiming",
    "stem_stride": 1,
}

# Number of ConvBlocks per block by default, the stride of each block's last one by default,
# and the dilation of each block's last one.
DEFAULT_DEPTHS: tuple[int, int, int] = (2, 3, 3)
DEFAULT_STRIDES: tuple[int, int, int] = (2, 2, 2)
BLOCK_STRIDES: tuple[int, ...] = (1, 2)
_LAST_DILATION: tuple[int, int, int] = (1, 2, 1)


# --------------------------------------------------------------------------- validation helpers


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but True is never a sensible channel count or depth.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _invalid(field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"ModelConfig.{field}={value!r} is invalid; allowed: {allowed}")


def _check_choice(field: str, value: object, choices: Sequence[object]) -> None:
    # Compare types too, so that 1.0 or True do not pass for the int 1.
    if not any(type(value) is type(c) and value == c for c in choices):
        raise _invalid(field, value, " | ".join(repr(c) for c in choices))


def _check_int_at_least(field: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise _invalid(field, value, f"an int >= {minimum}")


def _check_rate(where: str, value: object) -> None:
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}={value!r} is invalid; allowed: a float p with 0 <= p < 1")


def _check_block_index(where: str, value: object) -> int:
    if not _is_int(value) or not 1 <= value <= NUM_BLOCKS:
        raise ValueError(f"{where}={value!r} is invalid; allowed: an int in 1..{NUM_BLOCKS}")
    return value


# --------------------------------------------------------------------------- configuration


def min_input_size(block_strides: Sequence[int], stem_stride: int = 1) -> int:
    """The smallest square input side whose last feature map is ``MIN_FEATURE_SIZE`` px or more.

    Each downsampling (ceil-mode max-pool or strided conv) takes a side ``h`` to ``ceil(h / s)``,
    and the least ``h`` with ``ceil(h / s) >= m`` is ``(m - 1) * s + 1``; applied from the last
    block back to the stem: 25 px for strides (2, 2, 2), 13 for (1, 2, 2), 49 for (2, 2, 2)
    behind a stem of stride 2.
    """
    side = MIN_FEATURE_SIZE
    for stride in (*reversed(tuple(block_strides)), stem_stride):
        side = (side - 1) * stride + 1
    return side


def auto_stem_stride(input_size: int) -> int:
    """The stem stride ``stem_stride: 0`` picks: the largest of :data:`STEM_STRIDES` that leaves
    block 1 an input of at least :data:`BLOCKS_INPUT_SIZE` px.

    The blocks then see 28-55 px whatever the image size (1 below 56 px, 2 for 56-111 px, 4 for
    112-223 px, 8 for 224-447 px), so their receptive field covers as much of the image as it
    does at 28 px, and a 64 px image costs about what a 32 px one does.
    """
    stride = 1
    while stride * 2 in STEM_STRIDES and input_size >= stride * 2 * BLOCKS_INPUT_SIZE:
        stride *= 2
    return stride


@dataclass
class ModelConfig:
    """Everything that shapes a :class:`BasicCNNModel`.

    Args:
        in_channels: image channels, 1 (grey) or 3 (RGB).
        num_classes: number of output classes, at least :data:`MIN_CLASSES` (2).
        input_size: side of the square input in pixels, at least :attr:`min_input_size` (25 with
            the default strides, see :func:`min_input_size`); used by the summary.
        activation: "silu", "gelu" or "mish".
        width: channel multiplier > 0; a base count c becomes ``max(8, round(c * width / 8) * 8)``.
        norm: "group" (GroupNorm) or "batch" (BatchNorm2d) inside the conv blocks.
        gn_groups: GroupNorm groups; reduced to ``gcd(gn_groups, channels)`` where they don't fit.
        noise_std: std of the Gaussian noise added to the input in training mode, >= 0.
        dropout: Dropout2d rate of blocks 1, 2 and 3, each in [0, 1).
        active_blocks: how many blocks are active when the model is built, 1..3.
        downsample: how the last ConvBlock of each block halves the resolution: "maxpool" (a
            stride-1 conv, then a 2x2 max-pool after the shortcut sum) or "stride" (a stride-2
            conv and a stride-2 1x1 shortcut). Checkpoints saved before this option existed
            were "stride".
        block_channels: output channels of blocks 1, 2 and 3, each >= 1, used as given (``width``
            then plays no part); empty (the default) scales :data:`BASE_CHANNELS` by ``width``.
        linear_init: how the heads' adapters and the classifier start: "kaiming" (Kaiming-normal,
            fan_out, like the convolutions) or "torch" (PyTorch's own ``nn.Linear`` default,
            Kaiming-uniform with a=sqrt(5): std 1/sqrt(3 * fan_in), far smaller).
        conv_block: the layout of every :class:`ConvBlock`: "single" (one 3x3 conv on the
            residual path, no activation after the sum) or "basic" (two 3x3 convs, as in a
            ResNet basic block, with the activation after the sum). "basic" doubles the convs.
        block_depths: how many ConvBlocks blocks 1, 2 and 3 stack, each >= 1.
        block_strides: how much the last ConvBlock of blocks 1, 2 and 3 shrinks the feature map,
            each 1 (keeps it) or 2 (halves it). The default (2, 2, 2) takes 28 px to 4 px; with
            (1, 2, 2) the network keeps the input's full resolution through block 1 and ends at
            7 px, as CIFAR-style ResNets do, for 2-3.5x the compute (blocks 2 and 3 then run
            at four times the pixels).
        stem_stride: how much a :class:`Stem` at the start of block 1 shrinks the input: 1 (no
            stem), 2, 4, 8 or 16; 0 picks :func:`auto_stem_stride` of ``input_size`` (see
            :attr:`stem`), and the model's record keeps the stride it picked. Checkpoints saved
            before this option existed were 1.
    """

    in_channels: int = 3
    num_classes: int = 8
    input_size: int = 28
    activation: str = "silu"
    width: float = 1.0
    norm: str = "group"
    gn_groups: int = 8
    noise_std: float = 0.05
    dropout: tuple[float, float, float] = (0.1, 0.2, 0.3)
    active_blocks: int = 1
    downsample: str = "maxpool"
    block_channels: tuple[int, ...] = ()
    linear_init: str = "kaiming"
    conv_block: str = "single"
    block_depths: tuple[int, int, int] = DEFAULT_DEPTHS
    block_strides: tuple[int, int, int] = DEFAULT_STRIDES
    stem_stride: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.dropout, list):
            self.dropout = tuple(self.dropout)
        if isinstance(self.block_channels, list):
            self.block_channels = tuple(self.block_channels)
        if isinstance(self.block_depths, list):
            self.block_depths = tuple(self.block_depths)
        if isinstance(self.block_strides, list):
            self.block_strides = tuple(self.block_strides)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, the bad value and the allowed values."""
        _check_choice("in_channels", self.in_channels, (1, 3))
        _check_int_at_least("num_classes", self.num_classes, MIN_CLASSES)
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        if not _is_real(self.width) or self.width <= 0:
            raise _invalid("width", self.width, "a finite number > 0")
        _check_choice("norm", self.norm, NORMS)
        _check_int_at_least("gn_groups", self.gn_groups, 1)
        if not _is_real(self.noise_std) or self.noise_std < 0:
            raise _invalid("noise_std", self.noise_std, "a finite number >= 0")
        self._validate_dropout()
        _check_choice("active_blocks", self.active_blocks, tuple(range(1, NUM_BLOCKS + 1)))
        _check_choice("downsample", self.downsample, DOWNSAMPLES)
        self._validate_block_channels()
        _check_choice("linear_init", self.linear_init, LINEAR_INITS)
        _check_choice("conv_block", self.conv_block, CONV_BLOCKS)
        depths = self.block_depths
        if not (
            isinstance(depths, tuple)
            and len(depths) == NUM_BLOCKS
            and all(_is_int(d) and d >= 1 for d in depths)
        ):
            raise _invalid("block_depths", depths, f"a tuple of {NUM_BLOCKS} ints >= 1")
        strides = self.block_strides
        if not (
            isinstance(strides, tuple)
            and len(strides) == NUM_BLOCKS
            and all(_is_int(s) and s in BLOCK_STRIDES for s in strides)
        ):
            raise _invalid("block_strides", strides, f"a tuple of {NUM_BLOCKS} ints, each 1 or 2")
        if not _is_int(self.stem_stride) or self.stem_stride not in (0, *STEM_STRIDES):
            allowed = "0 (auto) or " + ", ".join(map(str, STEM_STRIDES))
            raise _invalid("stem_stride", self.stem_stride, allowed)
        # After the strides: the least input size follows from them.
        if not _is_int(self.input_size):
            raise _invalid("input_size", self.input_size, f"an int >= {self.min_input_size}")
        if self.input_size < self.min_input_size:
            allowed = (
                f"an int >= {self.min_input_size} (stem_stride={self.stem} and"
                f" block_strides={strides} must leave the last block a map of >="
                f" {MIN_FEATURE_SIZE} px)"
            )
            message = str(_invalid("input_size", self.input_size, allowed))
            remedy = "model.block_strides"
            if self.stem > 1:
                remedy = "model.stem_stride or model.block_strides"
            raise InputTooSmall(message, self.min_input_size, remedy)

    @property
    def min_input_size(self) -> int:
        """The smallest input side this layout takes (:func:`min_input_size` of its strides)."""
        return min_input_size(self.block_strides, self.stem)

    @property
    def stem(self) -> int:
        """The stem stride the model is built with: ``stem_stride``, or for 0 (auto) the one
        :func:`auto_stem_stride` picks for ``input_size``."""
        if self.stem_stride == 0 and _is_int(self.input_size):
            return auto_stem_stride(self.input_size)
        return self.stem_stride

    def _validate_dropout(self) -> None:
        if not isinstance(self.dropout, tuple) or len(self.dropout) != NUM_BLOCKS:
            raise _invalid("dropout", self.dropout, f"a tuple of {NUM_BLOCKS} rates in [0, 1)")
        for p in self.dropout:
            _check_rate(f"ModelConfig.dropout={self.dropout!r}: rate", p)

    def _validate_block_channels(self) -> None:
        value = self.block_channels
        ok = isinstance(value, tuple) and (
            value == () or (len(value) == NUM_BLOCKS and all(_is_int(c) and c >= 1 for c in value))
        )
        if not ok:
            raise _invalid("block_channels", value, f"() or a tuple of {NUM_BLOCKS} ints >= 1")

    def channels(self) -> tuple[int, int, int]:
        """Output channels of blocks 1, 2 and 3: ``block_channels``, else scaled by ``width``."""
        if self.block_channels:
            c1, c2, c3 = self.block_channels
        else:
            c1, c2, c3 = (scaled_channels(c, self.width) for c in BASE_CHANNELS)
        return c1, c2, c3


def scaled_channels(base: int, width: float) -> int:
    """Scale a channel count by ``width``, rounded to a multiple of 8 and at least 8."""
    return max(8, round(base * width / 8) * 8)


# --------------------------------------------------------------------------- building blocks


def make_norm(kind: str, channels: int, gn_groups: int = 8) -> nn.Module:
    """A 2-d normalisation layer: GroupNorm (groups fitted to ``channels``) or BatchNorm2d."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # gcd keeps the group count a divisor of the channel count (8 groups, 12 channels -> 4).
        return nn.GroupNorm(math.gcd(gn_groups, channels), channels)
    raise ValueError(f"norm={kind!r} is invalid; allowed: {' | '.join(map(repr, NORMS))}")


def make_activation(name: str) -> nn.Module:
    """An activation module by name: "silu", "gelu" or "mish"."""
    if name not in ACTIVATIONS:
        allowed = " | ".join(map(repr, ACTIVATIONS))
        raise ValueError(f"activation={name!r} is invalid; allowed: {allowed}")
    return ACTIVATIONS[name]()


class TrainOnlyNoise(nn.Module):
    """Add Gaussian noise N(0, std^2) to the input in training mode only.

    Args:
        std: standard deviation of the noise, >= 0; with 0 the module does nothing.
    """

    def __init__(self, std: float = 0.05) -> None:
        super().__init__()
        if not _is_real(std) or std < 0:
            raise ValueError(f"TrainOnlyNoise std={std!r} is invalid; allowed: a number >= 0")
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.std == 0:
            return x
        return x + torch.randn_like(x) * self.std

    def extra_repr(self) -> str:
        return f"std={self.std}"


class ConvBlock(nn.Module):
    """A residual block: a conv path plus a shortcut added to its result.

    With ``style="single"`` the path is conv 3x3 -> norm -> activation -> Dropout2d and the sum
    is passed on as it is. With ``style="basic"`` (a ResNet basic block) it is conv 3x3 -> norm
    -> activation -> Dropout2d -> conv 3x3 -> norm, and the activation follows the sum.

    The shortcut is the identity, or a 1x1 convolution with the same stride followed by a norm
    when the channel count or the stride changes. With ``downsample="maxpool"`` and
    ``stride > 1`` both paths run at stride 1 and the sum is max-pooled by ``stride`` instead
    (ceil mode, so the output size is the same as with a strided conv).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first 3x3 convolution (and of the projection shortcut).
        dilation: dilation of the first 3x3 convolution; padding equals it, so only stride
            changes size.
        dropout: Dropout2d rate; kept as ``self.dropout`` so it can be changed at run time.
        activation: "silu", "gelu" or "mish".
        norm: "group" or "batch".
        gn_groups: GroupNorm groups (fitted to the channel count).
        downsample: "maxpool" or "stride"; how ``stride > 1`` is carried out.
        style: "single" or "basic", the conv path described above.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        dropout: float = 0.0,
        activation: str = "silu",
        norm: str = "group",
        gn_groups: int = 8,
        downsample: str = "maxpool",
        style: str = "single",
    ) -> None:
        super().__init__()
        if downsample not in DOWNSAMPLES:
            allowed = " | ".join(map(repr, DOWNSAMPLES))
            raise ValueError(f"downsample={downsample!r} is invalid; allowed: {allowed}")
        if style not in CONV_BLOCKS:
            allowed = " | ".join(map(repr, CONV_BLOCKS))
            raise ValueError(f"style={style!r} is invalid; allowed: {allowed}")
        self.style = style
        pool = downsample == "maxpool" and stride > 1
        conv_stride = 1 if pool else stride
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            3,
            stride=conv_stride,
            padding=dilation,
            dilation=dilation,
            bias=False,
        )
        self.norm = make_norm(norm, out_channels, gn_groups)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout2d(dropout)
        # The second conv of a basic block, and the activation after the sum.
        self.conv2: nn.Module = nn.Identity()
        self.norm2: nn.Module = nn.Identity()
        self.out_act: nn.Module = nn.Identity()
        if style == "basic":
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
            self.norm2 = make_norm(norm, out_channels, gn_groups)
            self.out_act = make_activation(activation)
        self.shortcut = self._make_shortcut(in_channels, out_channels, conv_stride, norm, gn_groups)
        self.pool: nn.Module = nn.MaxPool2d(stride, ceil_mode=True) if pool else nn.Identity()

    @staticmethod
    def _make_shortcut(
        in_channels: int, out_channels: int, stride: int, norm: str, gn_groups: int
    ) -> nn.Module:
        if in_channels == out_channels and stride == 1:
            return nn.Identity()
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            make_norm(norm, out_channels, gn_groups),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H', W') with H' = (H - 1) // stride + 1 either way.
        out = self.dropout(self.act(self.norm(self.conv(x))))
        out = self.norm2(self.conv2(out))  # identities in a "single" block
        return self.pool(self.out_act(out + self.shortcut(x)))

    def extra_repr(self) -> str:
        return f"style={self.style!r}"


class Stem(nn.Module):
    """Shrink the input by ``stride`` before block 1: a 3x3 stride-2 conv -> norm -> activation
    to block 1's width, then a ceil-mode max-pool by ``stride / 2`` when the stride is larger
    (a ResNet's stem at 3x3).

    Args:
        in_channels: image channels.
        out_channels: block 1's channels.
        stride: 2, 4, 8 or 16.
        activation: "silu", "gelu" or "mish".
        norm: "group" or "batch".
        gn_groups: GroupNorm groups (fitted to the channel count).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        activation: str = "silu",
        norm: str = "group",
        gn_groups: int = 8,
    ) -> None:
        super().__init__()
        if stride not in STEM_STRIDES[1:]:
            allowed = ", ".join(map(str, STEM_STRIDES[1:]))
            raise ValueError(f"Stem stride={stride!r} is invalid; allowed: {allowed}")
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm = make_norm(norm, out_channels, gn_groups)
        self.act = make_activation(activation)
        rest = stride // 2
        self.pool: nn.Module = nn.MaxPool2d(rest, ceil_mode=True) if rest > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))
        return self.pool(self.act(self.norm(self.conv(x))))


class StageHead(nn.Module):
    """Pool a block's feature map into a vector of the classifier's input width.

    AdaptiveAvgPool2d(1) -> flatten -> BatchNorm1d(in_features) -> adapter, where the adapter is a
    Linear layer, or the identity when ``in_features == out_features``.

    Args:
        in_features: channels of the block this head reads.
        out_features: input width of the shared classifier.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.BatchNorm1d(in_features)
        same = in_features == out_features
        self.adapter: nn.Module = nn.Identity() if same else nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x).flatten(1)  # (B, C, H, W) -> (B, C)
        return self.adapter(self.norm(x))  # (B, out_features)


def init_weights(module: nn.Module, linear_init: str = "kaiming") -> None:
    """Kaiming-normal (fan_out, relu) conv weights, zero biases, unit norms.

    ``linear_init`` picks the Linear weights: "kaiming" treats them like the convolutions,
    "torch" gives them PyTorch's ``nn.Linear`` default (Kaiming-uniform, a=sqrt(5)).
    """
    _check_choice("linear_init", linear_init, LINEAR_INITS)
    for m in module.modules():
        if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and linear_init == "kaiming"):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- the model


class BasicCNNModel(StagedModel):
    """Three-block residual CNN with per-block heads and a shared classifier.

    Only blocks ``1..active_blocks`` run in ``forward``; the head of the deepest active block
    feeds the classifier (blended with the previous head while ``head_mix`` < 1). Use
    :meth:`freeze_blocks_until` to change the depth.

    As a :class:`~models.staged.StagedModel` its stages are the three blocks (each bringing its
    own head), its head is the shared classifier, and it declares all three capabilities:
    ``partial_depth`` (it grows from block 1), ``head_blend`` and ``dropout``.

    Args:
        config: a :class:`ModelConfig`; ``None`` uses the defaults.
        **overrides: ModelConfig fields that replace the ones in ``config``.

    Input ``(B, in_channels, H, W)``, output logits ``(B, num_classes)``. In training mode the
    batch must hold at least 2 samples because of the heads' BatchNorm1d.
    """

    arch = "basic_cnn"
    capabilities = frozenset({"partial_depth", "head_blend", "dropout"})

    def __init__(self, config: ModelConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = _resolve_config(config, overrides)
        cfg = self.config
        channels = cfg.channels()
        self.noise = TrainOnlyNoise(cfg.noise_std)
        self.blocks = nn.ModuleList(_make_blocks(cfg, channels))
        # Every head ends at block 2's width so one classifier serves all depths.
        self.heads = nn.ModuleList(StageHead(c, channels[1]) for c in channels)
        self.classifier = nn.Linear(channels[1], cfg.num_classes)
        init_weights(self, cfg.linear_init)
        self._active_blocks = cfg.active_blocks
        self._head_mix = 1.0
        self.freeze_blocks_until(cfg.active_blocks)

    @property
    def min_input_size(self) -> int:
        """The smallest square input side in pixels this model's layout takes."""
        return self.config.min_input_size

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    # ----------------------------------------------------------------- the staged-model contract

    def stage_modules(self) -> nn.ModuleList:
        return self.blocks

    def head_module(self) -> nn.Module:
        return self.classifier

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(f"block{k}" for k in range(1, NUM_BLOCKS + 1))

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """Block ``stage``'s parameters and its head's (:meth:`new_parameters`)."""
        return self.new_parameters(stage)

    def set_trainable(self, stages: Iterable[int]) -> None:
        """Make blocks ``1..k`` active (see :meth:`freeze_blocks_until`); ``stages`` must be
        ``{1..k}``: this network grows from block 1."""
        chosen = sorted(set(stages))
        if not chosen or chosen != list(range(1, len(chosen) + 1)):
            raise ValueError(
                f"BasicCNNModel grows from block 1: trainable stages {chosen} are invalid;"
                f" allowed: 1..k with k in 1..{NUM_BLOCKS}"
            )
        self.freeze_blocks_until(len(chosen))

    def record(self) -> dict[str, Any]:
        """The arch, its options (architecture) and settings (see :func:`config_record`)."""
        return config_record({f.name: getattr(self.config, f.name) for f in fields(ModelConfig)})

    @property
    def active_blocks(self) -> int:
        """How many blocks run in forward (1..3)."""
        return self._active_blocks

    @property
    def head_mix(self) -> float:
        """Weight of the deepest head's features, 0..1; the previous head has ``1 - head_mix``."""
        return self._head_mix

    def set_head_mix(self, mix: float) -> None:
        """Blend the features of head ``k`` (weight ``mix``) and head ``k - 1`` (``1 - mix``).

        With ``mix < 1`` the classifier sees what it was trained on before block ``k`` joined,
        fading to the new head as ``mix`` rises; 1 (the default) uses head ``k`` alone.

        Raises:
            ValueError: when ``mix`` is not in [0, 1], or is below 1 with one block active.
        """
        if not _is_real(mix) or not 0.0 <= mix <= 1.0:
            raise ValueError(f"set_head_mix: mix={mix!r} is invalid; allowed: a number in [0, 1]")
        if mix < 1.0 and self._active_blocks == 1:
            raise ValueError(
                f"set_head_mix: mix={mix!r} needs 2 or more active blocks; 1 is active"
            )
        self._head_mix = float(mix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        k, mix = self._active_blocks, self._head_mix
        x = self.noise(x)  # (B, C_in, H, W)
        previous = x
        for block in self.blocks[:k]:
            previous, x = x, block(x)  # (B, C_k, H_k, W_k)
        features = self.heads[k - 1](x)  # (B, C2)
        if mix < 1.0:
            old = self.heads[k - 2](previous)  # (B, C2), from block k-1's output
            features = mix * features + (1.0 - mix) * old
        return self.classifier(features)  # (B, num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            expected = f"(B, {self.config.in_channels}, H, W)"
            raise ValueError(f"input shape {tuple(x.shape)} is invalid; expected {expected}")

    # ----------------------------------------------------------------- progressive unfreezing

    def freeze_blocks_until(self, k: int) -> None:
        """Activate and unfreeze blocks 1..k; freeze and skip the rest; use only head k.

        The head mix returns to 1 (see :meth:`set_head_mix`).

        Raises:
            ValueError: when ``k`` is not an int in 1..3.
        """
        k = _check_block_index("freeze_blocks_until: k", k)
        self._active_blocks = k
        self._head_mix = 1.0
        for index, (block, head) in enumerate(zip(self.blocks, self.heads, strict=True), start=1):
            block.requires_grad_(index <= k)
            head.requires_grad_(index == k)
        self.classifier.requires_grad_(True)
        self._trainable = frozenset(range(1, k + 1))
        self.train(self.training)  # blocks past k rest in eval mode (they do not run)

    def new_parameters(self, k: int) -> list[nn.Parameter]:
        """Parameters that activating block ``k`` brings: block k's and head k's."""
        k = _check_block_index("new_parameters: k", k)
        return [*self.blocks[k - 1].parameters(), *self.heads[k - 1].parameters()]

    def initial_parameters(self) -> list[nn.Parameter]:
        """Parameters for the optimizer at depth 1: block 1, head 1 and the classifier."""
        return [*self.new_parameters(1), *self.classifier.parameters()]

    # ----------------------------------------------------------------- dropout control

    def _dropouts(self, block: int) -> list[nn.Dropout2d]:
        modules = self.blocks[block - 1].modules()
        return [m for m in modules if isinstance(m, nn.Dropout2d)]

    def set_dropout(self, block: int, p: float) -> None:
        """Set the rate of every Dropout2d in ``block`` (1..3) to ``p`` (0 <= p < 1)."""
        block = _check_block_index("set_dropout: block", block)
        _check_rate("set_dropout: p", p)
        for dropout in self._dropouts(block):
            dropout.p = float(p)

    def dropout_rates(self) -> list[float]:
        """Current Dropout2d rate of blocks 1, 2 and 3."""
        return [self._dropouts(k)[0].p for k in range(1, NUM_BLOCKS + 1)]


def config_record(values: Mapping[str, Any]) -> dict[str, Any]:
    """The model record (see :meth:`~models.staged.StagedModel.record`) of ModelConfig fields.

    Fields an older checkpoint lacks take their :data:`LEGACY_FIELDS` value and a ``stem_stride``
    of 0 (auto) the stride it picks; the image shape goes to the top level,
    :data:`RUNTIME_FIELDS` to ``settings`` and the rest, the architecture, to ``options``.
    """
    values = {**LEGACY_FIELDS, **values}
    if values["stem_stride"] == 0 and "input_size" in values:
        # The stride auto picked, so a later change of the rule cannot change a stored model.
        values["stem_stride"] = auto_stem_stride(values["input_size"])
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    shape = {k: values.pop(k) for k in ("in_channels", "num_classes", "input_size") if k in values}
    settings = {k: values.pop(k) for k in RUNTIME_FIELDS if k in values}
    stages = [f"block{k}" for k in range(1, NUM_BLOCKS + 1)]
    return {"arch": "basic_cnn", **shape, "options": values, "settings": settings, "stages": stages}


def complete_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored basic_cnn record with the architecture options it predates filled in from
    :data:`LEGACY_FIELDS`, so it rebuilds and compares as the model it was trained as."""
    legacy = {k: v for k, v in LEGACY_FIELDS.items() if k not in RUNTIME_FIELDS}
    return {**record, "options": {**legacy, **record.get("options", {})}}


def _resolve_config(config: ModelConfig | None, overrides: Mapping[str, Any]) -> ModelConfig:
    if config is None:
        config = ModelConfig()
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig or None, got {type(config).__name__}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown ModelConfig field(s) {unknown}; allowed: {sorted(known)}")
    # replace() builds a new config, so __post_init__ validates the merged values.
    return replace(config, **overrides)


def _make_blocks(cfg: ModelConfig, channels: Sequence[int]) -> list[nn.Sequential]:
    blocks = []
    in_channels = cfg.in_channels
    for index, (depth, stride, dilation, out_channels, p) in enumerate(
        zip(cfg.block_depths, cfg.block_strides, _LAST_DILATION, channels, cfg.dropout, strict=True)
    ):
        layers: list[nn.Module] = []
        if index == 0 and cfg.stem > 1:
            # Part of block 1, so it trains from the first epoch and adds no stage.
            layers.append(
                Stem(
                    in_channels,
                    out_channels,
                    cfg.stem,
                    cfg.activation,
                    cfg.norm,
                    cfg.gn_groups,
                )
            )
            in_channels = out_channels
        for i in range(depth):
            last = i == depth - 1
            layers.append(
                ConvBlock(
                    in_channels if i == 0 else out_channels,  # only the first changes channels
                    out_channels,
                    stride=stride if last else 1,
                    dilation=dilation if last else 1,
                    dropout=p,
                    activation=cfg.activation,
                    norm=cfg.norm,
                    gn_groups=cfg.gn_groups,
                    downsample=cfg.downsample,
                    style=cfg.conv_block,
                )
            )
        blocks.append(nn.Sequential(*layers))
        in_channels = out_channels
    return blocks


# --------------------------------------------------------------------------- summary


def _parts(model: BasicCNNModel) -> Iterator[tuple[str, nn.Module, bool]]:
    """(name, module, active) for every part; the noise counts as active when std > 0."""
    k = model.active_blocks
    yield "noise", model.noise, model.noise.std > 0
    for i, block in enumerate(model.blocks, start=1):
        yield f"block{i}", block, i <= k
    for i, head in enumerate(model.heads, start=1):
        yield f"head{i}", head, i == k
    yield "classifier", model.classifier, True


@torch.no_grad()
def _output_shapes(model: BasicCNNModel, input_size: int) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every part for a square input, all blocks included."""
    ref = next(model.parameters())
    x = ref.new_zeros(1, model.config.in_channels, input_size, input_size)
    was_training = model.training
    model.eval()  # no noise, no dropout, no BatchNorm statistics updates
    try:
        shapes = {"noise": tuple(model.noise(x).shape[1:])}
        for i, (block, head) in enumerate(zip(model.blocks, model.heads, strict=True), start=1):
            x = block(x)
            features = head(x)
            shapes[f"block{i}"] = tuple(x.shape[1:])
            shapes[f"head{i}"] = tuple(features.shape[1:])
        shapes["classifier"] = tuple(model.classifier(features).shape[1:])
    finally:
        model.train(was_training)
    return shapes


def model_summary(model: BasicCNNModel, input_size: int | None = None) -> list[dict[str, Any]]:
    """One row per part: name, params, trainable, active and output_shape.

    Args:
        model: the model to describe.
        input_size: square input side for ``output_shape`` (per sample, batch dimension left
            out); ``None`` uses ``model.config.input_size``, 0 skips the shapes (``None``).
    """
    size = model.config.input_size if input_size is None else input_size
    shapes = _output_shapes(model, size) if size else {}
    rows = []
    for name, module, active in _parts(model):
        params = list(module.parameters())
        rows.append(
            {
                "name": name,
                "params": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "active": active,
                "output_shape": shapes.get(name),
            }
        )
    return rows


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("part", "<"),
    ("params", ">"),
    ("trainable", ">"),
    ("active", "<"),
    ("output shape", "<"),
)


def _cells(row: Mapping[str, Any]) -> list[str]:
    shape = row.get("output_shape")
    shape_text = "x".join(str(d) for d in shape) if shape else "-"
    active = "yes" if row["active"] else "no"
    return [str(row["name"]), f"{row['params']:,}", f"{row['trainable']:,}", active, shape_text]


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render summary rows as a plain-text table with a totals line (safe for logs)."""
    header = [title for title, _ in _COLUMNS]
    body = [_cells(row) for row in rows]
    total = sum(int(row["params"]) for row in rows)
    trainable = sum(int(row["trainable"]) for row in rows)
    footer = ["total", f"{total:,}", f"{trainable:,}", "", ""]
    table = [header, *body, footer]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]

    def render(line: Sequence[str]) -> str:
        cells = (f"{c:{align}{w}}" for c, (_, align), w in zip(line, _COLUMNS, widths, strict=True))
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *map(render, body), rule, render(footer)])
