"""The report's errors and saliency sections: the highest-loss test images and Grad-CAM maps.

Both use the run's final weights (see :mod:`report.predictions`) and one forward pass over the
test split; Grad-CAM then runs only on the images shown, in batches.

Class activation maps come from the ``grad-cam`` package (``pytorch_grad_cam``) on the last
stage the forward pass runs (``model.forward_stages``: all stages of a zoo model, blocks
1..active of ``basic_cnn``). A zoo model's stage is a container that its forward never calls,
so the map is taken at the last of the stage's own modules, which the network does call.
Frozen stages do not stop it: the input is given ``requires_grad``, so the activations get
gradients whatever the parameters' flags.

Public API:
    add_errors_and_saliency, cam_layer, class_activation_maps, stage_features, centre_share,
    CAM_METHODS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from models.staged import StagedModel
from report.page import Figure, Page
from report.predictions import FinalModel, denormalise, load_final, top_loss_indices
from report.run import RunFolder

#: name -> Grad-CAM class of the package.
CAM_METHODS = {"Grad-CAM": GradCAM, "Grad-CAM++": GradCAMPlusPlus}

#: images per Grad-CAM batch: bounds the memory of 224 px inputs.
CAM_BATCH = 32

#: feature-map channels shown per stage (those with the largest mean activation).
CHANNELS_SHOWN = 8

#: display side of one image panel, in inches at the page's 100 dpi: 28 px images are drawn
#: nearest-neighbour at about 140 px, large enough to read.
PANEL_IN = 1.4


# --------------------------------------------------------------------------- computation


def _stage_layer(model: nn.Module, stage: nn.Module) -> nn.Module:
    """The module whose output is ``stage``'s output in the forward pass."""
    own = {id(m) for m in model.modules()}
    if id(stage) in own:
        return stage
    # A zoo stage groups the network's modules without being called itself; its modules are
    # listed in forward order, so the last one the network owns gives the stage's output.
    called = [m for m in stage.children() if id(m) in own]
    if not called:
        raise ValueError(f"stage {type(stage).__name__} holds no module the model calls")
    return called[-1]


def cam_layer(model: StagedModel) -> tuple[str, nn.Module]:
    """(stage name, module) of the deepest stage the forward pass runs: Grad-CAM's target."""
    depth = model.forward_stages
    if depth < 1:
        raise ValueError(f"{model.arch}: the forward pass runs no stage; no map to take")
    return model.stage_names[depth - 1], _stage_layer(model, model.stage_modules()[depth - 1])


def class_activation_maps(
    model: StagedModel,
    images: torch.Tensor,
    classes: Sequence[int],
    method: str = "Grad-CAM",
    layer: nn.Module | None = None,
) -> np.ndarray:
    """Class activation maps of ``images`` for ``classes``, one per image.

    Args:
        model: the network (put in eval mode; it stays there).
        images: ``(B, C, H, W)`` normalised inputs.
        classes: the class to explain per image.
        method: a key of :data:`CAM_METHODS`.
        layer: the target module; default :func:`cam_layer`.

    Returns:
        ``(B, H, W)`` float32 maps at the input's size, each scaled to [0, 1] by the package.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method={method!r} is invalid; allowed: {' | '.join(CAM_METHODS)}")
    if len(classes) != len(images):
        raise ValueError(f"{len(images)} images but {len(classes)} classes")
    target = cam_layer(model)[1] if layer is None else layer
    device = next(model.parameters()).device
    cam = CAM_METHODS[method](model=model, target_layers=[target])
    maps = []
    # Only the activations' gradients are needed: with every parameter's requires_grad off
    # the backward pass skips the weight gradients (about half its cost), and the input's
    # requires_grad carries the gradient through frozen and unfrozen stages alike.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        for start in range(0, len(images), CAM_BATCH):
            # An input that requires grad gives the activations gradients even when every
            # parameter before and in the target stage is frozen.
            batch = images[start : start + CAM_BATCH].to(device).requires_grad_(True)
            targets = [ClassifierOutputTarget(int(c)) for c in classes[start : start + CAM_BATCH]]
            maps.append(cam(input_tensor=batch, targets=targets))
    finally:
        cam.activations_and_grads.release()  # the hooks stay on the model otherwise
        for param, flag in flags:
            param.requires_grad_(flag)
    if not maps:
        return np.zeros((0, *images.shape[-2:]), dtype=np.float32)
    return np.concatenate(maps).astype(np.float32)


@torch.no_grad()
def stage_features(model: StagedModel, image: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(stage name, feature map ``(C, h, w)``) of every stage the forward pass runs, for one
    normalised image ``(C, H, W)``."""
    depth = model.forward_stages
    layers = [_stage_layer(model, s) for s in model.stage_modules()[:depth]]
    recorder = ActivationsAndGradients(model, layers, None)
    try:
        model.eval()
        recorder(image.unsqueeze(0).to(next(model.parameters()).device))
        outputs = list(recorder.activations)
    finally:
        recorder.release()
    # The hooks fire in forward order, which is the stage order.
    return [(n, a[0]) for n, a in zip(model.stage_names[:depth], outputs, strict=True)]


def centre_share(cam: np.ndarray) -> float:
    """Share of a map's total mass inside its centre crop (rows and columns from side // 4 to
    side - side // 4: the central half of each side); NaN for a map with no mass."""
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"map has shape {cam.shape}; allowed: (H, W)")
    total = cam.sum()
    if total <= 0:
        return math.nan
    h, w = cam.shape
    top, left = h // 4, w // 4
    return float(cam[top : h - top, left : w - left].sum() / total)


# --------------------------------------------------------------------------- drawing


def _bare(ax) -> None:
    """No ticks or frame, but room for a title and a y label."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _show(ax, image: np.ndarray, cam: np.ndarray | None = None) -> None:
    """An image ``(H, W, C)`` in [0, 1], nearest-neighbour, with a CAM overlay when given."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    if cam is not None:
        ax.imshow(cam, cmap="jet", vmin=0, vmax=1, alpha=0.45, interpolation="bilinear")
    _bare(ax)


def _short(name: str, limit: int = 16) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _errors_figure(page: Page, final: FinalModel, indices: list[int], cams: np.ndarray) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    pairs_per_row = 4
    rows = math.ceil(len(indices) / pairs_per_row)
    fig = MplFigure(
        figsize=(2 * pairs_per_row * PANEL_IN, rows * (PANEL_IN + 0.45)), layout="constrained"
    )
    axes = fig.subplots(rows, 2 * pairs_per_row, squeeze=False)
    shown = denormalise(final.images(indices), final.mean, final.std)
    probs = final.probabilities
    for ax in axes.flat:
        ax.set_visible(False)
    for k, index in enumerate(indices):
        left, right = axes[
            k // pairs_per_row, 2 * (k % pairs_per_row) : 2 * (k % pairs_per_row) + 2
        ]
        true, pred = int(final.labels[index]), int(final.predictions[index])
        colour = "black" if true == pred else "firebrick"
        for ax in (left, right):
            ax.set_visible(True)
        _show(left, shown[k])
        _show(right, shown[k], cams[k])
        left.set_title(f"#{index} true\n{_short(final.class_names[true])}", fontsize=8)
        right.set_title(
            f"pred {probs[index, pred]:.0%}\n{_short(final.class_names[pred])}",
            fontsize=8,
            color=colour,
        )
    return page.save(
        fig,
        "errors",
        "each test image (left; #index in the test split) and its Grad-CAM for the predicted"
        " class (right); red: misclassified",
    )


def _saliency_figure(
    page: Page,
    final: FinalModel,
    chosen: dict[int, list[int]],
    cams: dict[str, dict[int, np.ndarray]],
    per_row: int,
) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    methods = list(CAM_METHODS)
    per_image = 1 + len(methods)
    lines = {c: max(1, math.ceil(len(ix) / per_row)) for c, ix in chosen.items()}
    rows = sum(lines.values())
    cols = per_row * per_image
    fig = MplFigure(
        figsize=(cols * PANEL_IN * 0.9, rows * (PANEL_IN * 0.9 + 0.25) + 0.3), layout="constrained"
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    row = 0
    for cls, indices in chosen.items():
        first = axes[row, 0]
        first.set_visible(True)
        _bare(first)
        first.set_ylabel(_short(final.class_names[cls], 18), fontsize=9)
        shown = denormalise(final.images(indices), final.mean, final.std) if indices else []
        for k, index in enumerate(indices):
            r, c = row + k // per_row, (k % per_row) * per_image
            panels = axes[r, c : c + per_image]
            _show(panels[0], shown[k])
            panels[0].set_ylabel(_short(final.class_names[cls], 18) if c == 0 else "", fontsize=9)
            panels[0].set_title(f"#{index}", fontsize=8)
            for ax, method in zip(panels[1:], methods, strict=True):
                _show(ax, shown[k], cams[method][index])
                ax.set_title(method, fontsize=8)
            for ax in panels:
                ax.set_visible(True)
        if not indices:
            first.set_title("no correct image", fontsize=8)
        row += lines[cls]
    return page.save(
        fig,
        "saliency",
        "correctly classified test images, each with Grad-CAM and Grad-CAM++ for its class",
    )


def _features_figure(
    page: Page, final: FinalModel, index: int, features: list[tuple[str, torch.Tensor]]
) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    cols = 2 + CHANNELS_SHOWN
    fig = MplFigure(figsize=(cols * 1.05, len(features) * 1.3 + 0.3), layout="constrained")
    axes = fig.subplots(len(features), cols, squeeze=False)
    shown = denormalise(final.images([index]), final.mean, final.std)[0]
    for ax in axes.flat:
        _bare(ax)
    _show(axes[0, 0], shown)
    axes[0, 0].set_title(f"input #{index}", fontsize=8)
    for r in range(1, len(features)):
        axes[r, 0].set_visible(False)
    for r, (name, fmap) in enumerate(features):
        fmap = fmap.float().cpu().numpy()
        # The channels most active on average over the map (largest first).
        top = np.argsort(-fmap.mean(axis=(1, 2)), kind="stable")[:CHANNELS_SHOWN].tolist()
        axes[r, 1].imshow(fmap.mean(axis=0), cmap="viridis", interpolation="nearest")
        axes[r, 1].set_title("channel mean", fontsize=8)
        axes[r, 1].set_ylabel(f"{_short(name, 14)}\n{tuple(fmap.shape)}", fontsize=8)
        for c, channel in enumerate(top):
            ax = axes[r, 2 + c]
            ax.imshow(fmap[channel], cmap="viridis", interpolation="nearest")
            ax.set_title(f"ch {channel}", fontsize=8)
        for c in range(len(top), CHANNELS_SHOWN):
            axes[r, 2 + c].set_visible(False)
    return page.save(
        fig,
        "feature_maps",
        f"test image #{index}: each stage's output (channels x height x width), its mean over"
        f" channels and the {CHANNELS_SHOWN} channels with the largest mean activation; each"
        " panel has its own colour scale",
    )


# --------------------------------------------------------------------------- the sections


def _correct_per_class(final: FinalModel, per_class: int) -> dict[int, list[int]]:
    """The first ``per_class`` correctly classified test images of each class, in test order
    (not the most confident ones, which would show only the easiest images)."""
    right = (final.predictions == final.labels).nonzero().flatten().tolist()
    chosen: dict[int, list[int]] = {c: [] for c in range(len(final.class_names))}
    for index in right:
        cls = int(final.labels[index])
        if len(chosen[cls]) < per_class:
            chosen[cls].append(index)
    return chosen


def _errors_section(page: Page, final: FinalModel, errors: int) -> None:
    section = page.section("errors", "Errors")
    wrong = int((final.predictions != final.labels).sum())
    n = len(final.labels)
    scaled = (
        f"of softmax(logits / T), T = {final.temperature:.3f} as in the +T row"
        if final.temperature != 1.0
        else "of the softmax (no temperature was applied)"
    )
    section.text(
        f"{wrong} of {n} test images ({wrong / n:.1%}) are misclassified by the {final.name}"
        f" weights. Below, the {min(errors, n)} test images with the highest loss"
        f" (cross-entropy {scaled}), highest first, with the predicted class's probability."
    )
    indices = top_loss_indices(final.losses, errors)
    if not indices:
        section.note("No image asked for (errors = 0).")
        return
    preds = [int(final.predictions[i]) for i in indices]
    cams = class_activation_maps(final.model, final.images(indices), preds, "Grad-CAM")
    section.figures([_errors_figure(page, final, indices, cams)], page.folder)


def _saliency_section(page: Page, final: FinalModel, per_class: int) -> None:
    section = page.section("saliency", "Saliency")
    stage, _ = cam_layer(final.model)
    section.text(
        f"Grad-CAM and Grad-CAM++ on stage {stage!r}, the deepest stage the {final.name}"
        " weights run, for the true (and predicted) class. Each map is scaled to [0, 1] on its"
        " own."
    )
    if per_class == 0:
        section.note("No image asked for (per_class = 0).")
        return
    chosen = _correct_per_class(final, per_class)
    flat = [i for ix in chosen.values() for i in ix]
    if not flat:
        section.note("No correctly classified test image to explain.")
        return
    features = stage_features(final.model, final.images([flat[0]])[0])
    if tuple(features[-1][1].shape[-2:]) == (1, 1):
        section.note(
            f"Stage {stage!r} outputs 1 x 1 px at this image size, so every map is constant"
            " and shows nothing; a smaller stem stride or model.resize would give it a grid."
        )
    batch = final.images(flat)
    classes = [int(final.labels[i]) for i in flat]
    cams = {
        method: dict(
            zip(flat, class_activation_maps(final.model, batch, classes, method), strict=True)
        )
        for method in CAM_METHODS
    }
    per_row = min(per_class, 3)
    section.figures([_saliency_figure(page, final, chosen, cams, per_row)], page.folder)

    rows = []
    for cls, indices in chosen.items():
        if not indices:
            continue
        shares = [[centre_share(cams[m][i]) for i in indices] for m in CAM_METHODS]
        rows.append(
            [final.class_names[cls], str(len(indices)), *(f"{np.nanmean(s):.2f}" for s in shares)]
        )
    section.heading("CAM mass in the centre crop")
    section.text(
        "Share of each map's total inside the central half of each side (a quarter of the"
        " area), averaged over the images above; a uniform map gives 0.25."
    )
    section.table(["class", "images", *(f"{m} centre share" for m in CAM_METHODS)], rows)

    section.heading("Feature maps")
    section.figures([_features_figure(page, final, flat[0], features)], page.folder)


def add_errors_and_saliency(
    page: Page, run: RunFolder, *, errors: int, per_class: int, device: str
) -> None:
    """Add the "errors" and "saliency" sections: one forward pass of the run's final weights
    over the test split, then Grad-CAM on the images shown.

    Args:
        page: the page under construction.
        run: a tested run (``run.test_report`` is set).
        errors: highest-loss test images in the errors gallery (0 shows none).
        per_class: correctly classified test images per class in the saliency section.
        device: where the model runs ("cpu", "cuda", "cuda:N", "mps").
    """
    if errors < 0 or per_class < 0:
        raise ValueError(f"errors={errors} and per_class={per_class}; allowed: ints >= 0")
    final = load_final(run, device=device)
    _errors_section(page, final, errors)
    _saliency_section(page, final, per_class)
