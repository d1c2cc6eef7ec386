"""Library networks (torchvision and timm) cut into stages for progressive unfreezing.

Every model here wraps the library's own network, built with random weights (pretrained ones
are loaded afterwards by :mod:`models.weights`), under the attribute ``net``: its state-dict keys
are the library's keys with the prefix ``"net."`` (:attr:`ZooModel.library_prefix`), so a
library checkpoint loads with the prefix added. The library's classifier is replaced by a new one
for ``num_classes`` classes; that classifier, and whatever follows the last stage without
parameters of its own (the final pooling), is the head.

Stages, shallow to deep (see :func:`torchvision_stages` for the exact modules):

- resnet18 / resnet50: ``stem+layer1 | layer2 | layer3 | layer4``;
- densenet121: ``stem+denseblock1 | denseblock2 | denseblock3 | denseblock4`` (each transition
  joins the block after it; ``norm5`` joins the last);
- efficientnet_b0 / mobilenet_v2: ``features`` cut where the resolution drops, 5 stages;
- vgg16_bn: ``features`` cut after each max-pool, 5 stages;
- inception_v3 (built without aux logits): ``stem | mixed_5 | mixed_6 | mixed_7``;
- ``timm/<name>``: timm's own coarse grouping (``model.group_matcher(coarse=True)``), its stem
  group merged into the first block group; timm's last group (the classifier) is the head.

Small inputs. An ImageNet stem (a stride-2 7x7 conv and a max-pool) divides the input by 4 before
the first stage, so a 28 px image reaches the last stage of a ResNet at 1 px. Two options help:

- ``stem``: ``"imagenet"`` keeps the library's stem; ``"cifar"`` makes the first conv a 3x3
  stride-1 conv and drops the stem's max-pool (resnets, densenet121), or sets the first conv's
  stride to 1 (efficientnet_b0, mobilenet_v2); vgg16_bn, inception_v3 and timm models have no
  cifar stem. ``"auto"`` (the default) is ``"cifar"`` when the network would see fewer than
  :data:`AUTO_CIFAR_BELOW` (64) px (the ``resize`` side if set, else ``input_size``) and the arch
  has a cifar stem, else ``"imagenet"``. A record stores the stem it resolved to.
- ``resize``: 0 (off), or a side in px the forward interpolates every input to (bilinear,
  antialias off) before the network sees it.

``min_input_size`` is the smallest square input whose last feature map still has >= 1 px
(found by probe forwards on the meta device, so no real compute); with ``resize`` every input
is resized first, so it is 1, and ``resize`` itself must reach the network's minimum.

Public API:
    CIFAR_STEM_ARCHS, STEMS, AUTO_CIFAR_BELOW, ZooModel, TorchvisionModel, TimmModel,
    build_zoo_model, resolve_stem, torchvision_stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import TIMM_PREFIX, TORCHVISION_ARCHS
from models.staged import MIN_CLASSES, InputTooSmall, StagedModel

#: the archs with a "cifar" stem (see the module docstring).
CIFAR_STEM_ARCHS: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "mobilenet_v2",
)
STEMS: tuple[str, ...] = ("auto", "imagenet", "cifar")
#: with stem "auto", a network that sees fewer px than this gets the cifar stem.
AUTO_CIFAR_BELOW = 64

# efficientnet_b0 / mobilenet_v2: [start, end) ranges of `features` per stage, cut where the
# resolution halves (sides at 224 px in the comments).
_FEATURE_CUTS: dict[str, tuple[tuple[int, int], ...]] = {
    # 0 stem s2 (112), 1 MBConv s1 (112) | 2 (56) | 3 (28) | 4, 5 (14) | 6, 7, 8 conv1x1 (7)
    "efficientnet_b0": ((0, 2), (2, 3), (3, 4), (4, 6), (6, 9)),
    # 0 stem s2, 1 (112) | 2-3 (56) | 4-6 (28) | 7-13 (14) | 14-17, 18 conv1x1 (7)
    "mobilenet_v2": ((0, 2), (2, 4), (4, 7), (7, 14), (14, 19)),
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"model.{name}={value!r} is invalid; allowed: {allowed}")


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


# --------------------------------------------------------------------------- stage groups


class _Group(nn.Module):
    """The modules, and loose parameters, of one stage or of the head.

    The modules are the wrapped network's own (shared, not copied); a group is never registered
    as a submodule of the model, so the state dict keeps one key per tensor. Loose parameters
    are ones a module owns directly while its children belong to other groups (a ViT's
    ``cls_token`` on the root): they are looked up by name on their owner at every call, so
    they follow ``load_state_dict(assign=True)`` and the like. ``train()``/``eval()`` reach the
    modules through the usual child recursion; ``parameters()`` adds the loose ones.
    """

    def __init__(self, modules: Sequence[nn.Module], loose: Sequence[tuple[nn.Module, str]] = ()):
        super().__init__()
        for index, module in enumerate(modules):
            self.add_module(str(index), module)
        # A plain tuple, so the owners are not registered as children of this group.
        self._loose: tuple[tuple[nn.Module, str], ...] = tuple(loose)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().named_parameters(prefix, recurse, remove_duplicate)
        for owner, name in self._loose:
            yield (f"{prefix}.{name}" if prefix else name), owner._parameters[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only meaningful for sequential groups (the torchvision splits); used by the size probe.
        for module in self.children():
            x = module(x)
        return x


@dataclass
class _Layout:
    """A built library network with its stage split and head."""

    net: nn.Module
    stage_names: tuple[str, ...]
    stages: tuple[_Group, ...]
    head: _Group
    notes: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def resolve_stem(arch: str, stem: object, side: int) -> str:
    """The stem ``arch`` gets: ``stem`` itself, or for ``"auto"`` the rule of the module doc.

    ``side`` is what the network sees: the ``resize`` side when set, else ``input_size``.
    """
    if stem not in STEMS:
        raise _invalid("stem", stem, " | ".join(map(repr, STEMS)))
    has_cifar = arch in CIFAR_STEM_ARCHS
    if stem == "auto":
        return "cifar" if has_cifar and side < AUTO_CIFAR_BELOW else "imagenet"
    if stem == "cifar" and not has_cifar:
        raise ValueError(
            f"model.stem='cifar' is not available for {arch}; allowed: 'imagenet' | 'auto'"
            f" (cifar stems exist for {', '.join(CIFAR_STEM_ARCHS)})"
        )
    return str(stem)


def _check_sizes(in_channels: object, num_classes: object, input_size: object, resize: object):
    if not _is_int(in_channels) or in_channels < 1:
        raise _invalid("in_channels", in_channels, "an int >= 1 (1 grey, 3 RGB)")
    if not _is_int(num_classes) or num_classes < MIN_CLASSES:
        raise _invalid("num_classes", num_classes, f"an int >= {MIN_CLASSES}")
    if not _is_int(input_size) or input_size < 1:
        raise _invalid("input_size", input_size, "an int >= 1 (px)")
    if not _is_int(resize) or resize < 0:
        raise _invalid("resize", resize, "0 (off) or an int >= 1 (px)")


# --------------------------------------------------------------------------- size probe

# (source, arch, in_channels, stem, side) -> smallest side; the probe is deterministic.
_MIN_SIZE_CACHE: dict[tuple[Any, ...], int] = {}
#: the largest side the probe tries when looking for the minimum above a side that does not fit.
_PROBE_LIMIT = 4096


def _fits(features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> str | None:
    """None when ``features(x)`` runs and leaves every dimension >= 1, else why not."""
    try:
        with torch.no_grad():
            out = features(x)
    except NotImplementedError:
        raise  # an op the meta device lacks: not a size problem, the caller falls back to CPU
    except (RuntimeError, ValueError, AssertionError, IndexError) as error:
        return _first_line(error)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if any(d < 1 for d in out.shape):
        return f"its last feature map is {tuple(out.shape)}"
    return None


def _smallest_side(
    features: Callable[[torch.Tensor], torch.Tensor],
    in_channels: int,
    side: int,
    device: str,
) -> tuple[int | None, str | None]:
    """``(smallest fitting side, why side itself does not fit or None)``.

    A larger input never yields a smaller feature map in these networks, so a binary search
    finds the least fitting side below ``side`` when it fits; when it does not, sides double
    (on the meta device only, where a probe costs no compute) up to :data:`_PROBE_LIMIT` to
    find one that does, and the search runs above ``side``. The smallest side is None when no
    side fitted.
    """

    def probe(s: int) -> str | None:
        return _fits(features, torch.zeros(1, in_channels, s, s, device=device))

    why = probe(side)
    lo, hi = 1, side
    if why is not None:
        lo, hi = side + 1, side
        while probe(hi) is not None:
            if device != "meta" or hi >= _PROBE_LIMIT:
                return None, why
            hi *= 2
    while lo < hi:  # hi fits; find the least fitting side in [lo, hi]
        mid = (lo + hi) // 2
        if probe(mid) is None:
            hi = mid
        else:
            lo = mid + 1
    return hi, why


# --------------------------------------------------------------------------- the models


class ZooModel(StagedModel):
    """A library network wrapped as a :class:`~models.staged.StagedModel`.

    Subclasses implement :meth:`_layout` (build the network, its stages and its head on the
    current default device) and :meth:`_features` (the network up to its last feature map,
    for the size probe).

    Attributes:
        arch: the registry name (``"resnet18"``, ``"timm/resnet10t"``).
        stem: the stem after resolving ``"auto"``.
        resize: 0 or the side the forward resizes every input to.
        input_size: the side the model was built for.
        min_input_size: the smallest input side :meth:`forward` accepts.
        net_min_size: the smallest side the network itself takes (before any resize).
    """

    library_prefix = "net."
    source = ""

    def __init__(
        self,
        arch: str,
        *,
        in_channels: int,
        num_classes: int,
        input_size: int,
        stem: str = "auto",
        resize: int = 0,
    ) -> None:
        super().__init__()
        _check_sizes(in_channels, num_classes, input_size, resize)
        self.arch = arch
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = input_size
        self.resize = resize
        side = resize or input_size
        self.stem = resolve_stem(arch, stem, side)
        layout = self._layout()
        self.net = layout.net
        self._stage_names = layout.stage_names
        self._stages = layout.stages  # a tuple: not registered, the keys stay the net's own
        self._head = (layout.head,)  # a tuple for the same reason
        self.net_min_size = self._network_min_size(side)  # refuses a side below it
        # With resize any input is interpolated to `resize` px first, so any side will do.
        self.min_input_size = 1 if resize else self.net_min_size
        self.set_trainable(range(1, len(self._stages) + 1))

    # ----------------------------------------------------------------- for subclasses

    def _layout(self) -> _Layout:
        raise NotImplementedError

    def _features(
        self, net: nn.Module, stages: Sequence[nn.Module], x: torch.Tensor
    ) -> torch.Tensor:
        """``net`` (with its ``stages``) from the input to its last feature map."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the size probe

    def _network_min_size(self, side: int) -> int:
        """The smallest side the network takes; refuses ``side`` (the side it will see, from
        ``resize`` or ``input_size``) in one line when it is smaller than that."""
        key = (self.source, self.arch, self.in_channels, self.stem, side)
        if key in _MIN_SIZE_CACHE:
            return _MIN_SIZE_CACHE[key]
        try:
            with torch.device("meta"):
                layout = self._layout()
            layout.net.eval()
            smallest, why = _smallest_side(
                lambda x: self._features(layout.net, layout.stages, x),
                self.in_channels,
                side,
                "meta",
            )
        except NotImplementedError:
            # The network uses an op without a meta kernel: probe the real one on the CPU.
            was_training = self.net.training
            self.net.eval()
            try:
                smallest, why = _smallest_side(
                    lambda x: self._features(self.net, self._stages, x),
                    self.in_channels,
                    side,
                    "cpu",
                )
            finally:
                self.net.train(was_training)
        if why is not None:
            what = f"resize={side}" if self.resize else f"input_size={side}"
            where = f"{self.arch} (stem {self.stem!r})"
            if smallest is None:
                raise ValueError(f"{where} does not take {what} px: {why}{self._size_hint()}")
            fix = (
                f"resize >= {smallest}"
                if self.resize
                else f"input_size >= {smallest}, or resize >= {smallest}"
            )
            raise InputTooSmall(
                f"{where} needs inputs of >= {smallest} px: {what} is too small; allowed: {fix}"
                f"{self._size_hint()}",
                smallest,
                "model.resize" if self.resize else "model.resize (or model.stem)",
            )
        _MIN_SIZE_CACHE[key] = smallest
        return smallest

    def _size_hint(self) -> str:
        return ""

    # ----------------------------------------------------------------- the contract

    def stage_modules(self) -> Sequence[nn.Module]:
        return self._stages

    def head_module(self) -> nn.Module:
        return self._head[0]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return self._stage_names

    def record(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "options": {"stem": self.stem, "resize": self.resize},
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "stages": list(self.stage_names),
        }

    # ----------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, num_classes)``; resized first when ``resize``."""
        self._check_input(x)
        if self.resize and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(
                x,
                size=(self.resize, self.resize),
                mode="bilinear",
                align_corners=False,
                antialias=False,
            )
        return self.net(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            expected = f"(B, {self.in_channels}, H, W)"
            raise ValueError(f"input shape {tuple(x.shape)} is invalid; expected {expected}")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"input shape {tuple(x.shape)} is too small for {self.arch} (stem"
                f" {self.stem!r}); allowed: H, W >= {self.min_input_size} px, or a resize"
            )

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, stem={self.stem!r}, resize={self.resize}"


# --------------------------------------------------------------------------- torchvision


def _replace_conv(conv: nn.Conv2d, **changes: Any) -> nn.Conv2d:
    """A new Conv2d like ``conv`` with some settings changed (fresh random weights)."""
    settings = dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    settings.update(changes)
    new = nn.Conv2d(**settings)
    if conv.weight.device.type != "meta":  # keep the library's init scheme for the new conv
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    return new


def _first_conv_path(arch: str) -> tuple[str, ...]:
    """The attribute path of the input conv in each torchvision network."""
    if arch.startswith("resnet"):
        return ("conv1",)
    if arch == "densenet121":
        return ("features", "conv0")
    if arch in ("efficientnet_b0", "mobilenet_v2"):
        return ("features", "0", "0")
    if arch == "vgg16_bn":
        return ("features", "0")
    return ("Conv2d_1a_3x3", "conv")  # inception_v3


def _set_path(root: nn.Module, path: Sequence[str], module: nn.Module) -> None:
    parent = root.get_submodule(".".join(path[:-1])) if len(path) > 1 else root
    setattr(parent, path[-1], module)


def _build_torchvision(arch: str, in_channels: int, num_classes: int, stem: str) -> nn.Module:
    from torchvision import models as tvm

    if arch == "inception_v3":
        # transform_input re-normalises ImageNet-normalised RGB to the [-1, 1] range the
        # torchvision ImageNet weights were trained on; a no-op in effect for random weights,
        # and meaningless (it indexes 3 channels) for other channel counts.
        net = tvm.inception_v3(
            weights=None,
            num_classes=num_classes,
            aux_logits=False,
            init_weights=True,
            transform_input=in_channels == 3,
        )
    else:
        net = tvm.get_model(arch, weights=None, num_classes=num_classes)
    path = _first_conv_path(arch)
    conv = net.get_submodule(".".join(path))
    if stem == "cifar":
        changes: dict[str, Any] = {"stride": 1}
        if arch.startswith("resnet") or arch == "densenet121":
            changes.update(kernel_size=3, padding=1)
            # the stem max-pool goes too: the network keeps full resolution into stage 1
            pool = ("maxpool",) if arch.startswith("resnet") else ("features", "pool0")
            _set_path(net, pool, nn.Identity())
        conv = _replace_conv(conv, in_channels=in_channels, **changes)
        _set_path(net, path, conv)
    elif in_channels != conv.in_channels:
        _set_path(net, path, _replace_conv(conv, in_channels=in_channels))
    return net


def torchvision_stages(arch: str, net: nn.Module) -> tuple[list[tuple[str, list]], list]:
    """``([(stage name, modules)], head modules)`` of a torchvision network, shallow to deep.

    Each stage's modules run in sequence reproduce the network up to the end of that stage
    (the size probe relies on it); the head takes what follows.
    """
    if arch.startswith("resnet"):
        stages = [("stem+layer1", [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1])]
        stages += [(f"layer{i}", [getattr(net, f"layer{i}")]) for i in (2, 3, 4)]
        return stages, [net.avgpool, net.fc]
    if arch == "densenet121":
        f = net.features
        stages = [("stem+denseblock1", [f.conv0, f.norm0, f.relu0, f.pool0, f.denseblock1])]
        for i in (2, 3):
            transition, block = getattr(f, f"transition{i - 1}"), getattr(f, f"denseblock{i}")
            stages.append((f"denseblock{i}", [transition, block]))
        stages.append(("denseblock4", [f.transition3, f.denseblock4, f.norm5]))
        return stages, [net.classifier]
    if arch in _FEATURE_CUTS:
        stages = []
        for start, end in _FEATURE_CUTS[arch]:
            name = f"features.{start}" if end == start + 1 else f"features.{start}-{end - 1}"
            stages.append((name, list(net.features[start:end])))
        head = [net.avgpool, net.classifier] if hasattr(net, "avgpool") else [net.classifier]
        return stages, head
    if arch == "vgg16_bn":
        stages, current = [], []
        for module in net.features:
            current.append(module)
            if isinstance(module, nn.MaxPool2d):
                stages.append((f"block{len(stages) + 1}", current))
                current = []
        return stages, [net.avgpool, net.classifier]
    if arch == "inception_v3":
        stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1"]
        stem += ["Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2"]
        groups = {
            "stem": stem,
            "mixed_5": ["Mixed_5b", "Mixed_5c", "Mixed_5d"],
            "mixed_6": ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
            "mixed_7": ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
        }
        stages = [(name, [getattr(net, n) for n in names]) for name, names in groups.items()]
        return stages, [net.avgpool, net.dropout, net.fc]
    raise ValueError(f"model.arch={arch!r} is not a torchvision arch; allowed: {TORCHVISION_ARCHS}")


class TorchvisionModel(ZooModel):
    """A torchvision network (:data:`TORCHVISION_ARCHS`) with random weights, staged."""

    source = "torchvision"

    def __init__(self, arch: str, **kwargs: Any) -> None:
        if arch not in TORCHVISION_ARCHS:
            allowed = ", ".join(TORCHVISION_ARCHS)
            raise ValueError(f"model.arch={arch!r} is not a torchvision arch; allowed: {allowed}")
        super().__init__(arch, **kwargs)

    def _layout(self) -> _Layout:
        net = _build_torchvision(self.arch, self.in_channels, self.num_classes, self.stem)
        stages, head = torchvision_stages(self.arch, net)
        return _Layout(
            net=net,
            stage_names=tuple(name for name, _ in stages),
            stages=tuple(_Group(modules) for _, modules in stages),
            head=_Group(head),
        )

    def _features(
        self, net: nn.Module, stages: Sequence[nn.Module], x: torch.Tensor
    ) -> torch.Tensor:
        for stage in stages:  # each torchvision stage is sequential (see torchvision_stages)
            x = stage(x)
        return x


# --------------------------------------------------------------------------- timm


def _timm_groups(net: nn.Module, arch: str) -> tuple[dict[str, int], int]:
    """timm's coarse grouping of ``net``'s parameters: ``({param name: group}, head group)``.

    The stem group (timm's first) joins the first block group; the last group must hold the
    classifier, and becomes the head.
    """
    from timm.models import group_parameters

    try:
        matcher = net.group_matcher(coarse=True)
    except (NotImplementedError, AttributeError) as error:
        raise ValueError(
            f"model.arch={arch!r}: timm gives no parameter grouping for it ({_first_line(error)})"
        ) from error
    group_of: dict[str, int] = group_parameters(net, matcher, reverse=True)
    ids = sorted(set(group_of.values()))
    head = ids[-1]
    classifier = net.get_classifier()
    classifier_params = {id(p) for p in classifier.parameters()}
    outside = [n for n, p in net.named_parameters() if id(p) in classifier_params]
    outside = [n for n in outside if group_of[n] != head]
    if len(ids) < 2 or outside:
        raise ValueError(
            f"model.arch={arch!r}: timm's grouping does not end with the classifier"
            f" ({len(ids)} groups); it cannot be staged"
        )
    body = ids[:-1]
    merge = {body[0]: body[1]} if len(body) >= 2 else {}
    return {n: merge.get(g, g) for n, g in group_of.items()}, head


def _cover(
    module: nn.Module,
    prefix: str,
    group_of: dict[str, int],
    out: dict[int, tuple[list[nn.Module], list[tuple[nn.Module, str]], list[str]]],
    root: bool = False,
) -> None:
    """Assign each parameter's group the largest modules whose parameters all share it."""
    groups = {group_of[prefix + name] for name, _ in module.named_parameters()}
    if not groups:
        return  # no parameters: follows its parent (pooling, activations)
    if len(groups) == 1 and not root:
        modules, _, names = out[groups.pop()]
        modules.append(module)
        names.append(prefix.rstrip("."))
        return
    for name, _ in module.named_parameters(recurse=False):
        _, loose, names = out[group_of[prefix + name]]
        loose.append((module, name))
        names.append(prefix + name)
    for child_name, child in module.named_children():
        _cover(child, f"{prefix}{child_name}.", group_of, out)


class TimmModel(ZooModel):
    """Any timm model (``timm/<name>``) with random weights, staged by timm's own grouping."""

    source = "timm"

    def __init__(self, arch: str, **kwargs: Any) -> None:
        import timm

        name = arch[len(TIMM_PREFIX) :] if arch.startswith(TIMM_PREFIX) else ""
        if not name or not timm.is_model(name):
            raise ValueError(
                f"model.arch={arch!r} is not a timm model; allowed: 'timm/<name>' with a name"
                " from timm.list_models()"
            )
        self.timm_name = name
        super().__init__(arch, **kwargs)

    def _layout(self) -> _Layout:
        import timm

        net = timm.create_model(
            self.timm_name,
            pretrained=False,
            num_classes=self.num_classes,
            in_chans=self.in_channels,
        )
        group_of, head_id = _timm_groups(net, self.arch)
        out: dict[int, tuple[list, list, list]] = {g: ([], [], []) for g in set(group_of.values())}
        _cover(net, "", group_of, out, root=True)
        stages, names = [], []
        for gid in sorted(out):
            if gid == head_id:
                continue
            modules, loose, covered = out[gid]
            stages.append(_Group(modules, loose))
            names.append(covered[0] if len(covered) == 1 else f"{covered[0]}..{covered[-1]}")
        head_modules, head_loose, _ = out[head_id]
        return _Layout(
            net=net,
            stage_names=tuple(names),
            stages=tuple(stages),
            head=_Group(head_modules, head_loose),
        )

    def _features(
        self, net: nn.Module, stages: Sequence[nn.Module], x: torch.Tensor
    ) -> torch.Tensor:
        return net.forward_features(x)

    def _size_hint(self) -> str:
        size = getattr(self.net, "pretrained_cfg", {}).get("input_size")
        return f" (its pretrained size is {size[-1]} px)" if size else ""


# --------------------------------------------------------------------------- entry point


def build_zoo_model(
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    input_size: int,
    stem: str = "auto",
    resize: int = 0,
) -> ZooModel:
    """A new staged library network (random weights); see the module docstring for options.

    Raises:
        ValueError: in one line, for an unknown arch, a bad option, or an input (or resize)
            smaller than the network takes.
    """
    kwargs = dict(
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        stem=stem,
        resize=resize,
    )
    if isinstance(arch, str) and arch.startswith(TIMM_PREFIX):
        return TimmModel(arch, **kwargs)
    return TorchvisionModel(arch, **kwargs)
