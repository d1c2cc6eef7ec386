"""Tests for report.saliency and report.predictions: the errors and saliency sections."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.registry import build_model
from report.page import Page
from report.predictions import denormalise, load_final, top_loss_indices
from report.run import ReportError, final_set, load_run
from report.saliency import (
    add_errors_and_saliency,
    cam_layer,
    centre_share,
    class_activation_maps,
    stage_features,
)
from training.engine.checkpoint import load_checkpoint, save_checkpoint


def test_top_loss_indices_pick_the_largest_losses_largest_first():
    losses = torch.tensor([0.1, 2.0, 0.5, 3.0, 2.0, 0.0])
    assert top_loss_indices(losses, 3) == [3, 1, 4]  # the tie 1/4 keeps test order
    assert top_loss_indices(losses.numpy(), 1) == [3]
    assert top_loss_indices(losses, 10) == [3, 1, 4, 2, 0, 5]
    assert top_loss_indices(losses, 0) == []
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        top_loss_indices(torch.zeros(2, 3), 1)


def test_centre_share_on_constructed_maps():
    centre = np.zeros((28, 28))
    centre[7:21, 7:21] = 1.0  # exactly the central half of each side
    assert centre_share(centre) == pytest.approx(1.0)
    corner = np.zeros((28, 28))
    corner[:7, :7] = 1.0
    assert centre_share(corner) == 0.0
    assert centre_share(np.ones((64, 64))) == pytest.approx(0.25)
    spot = np.zeros((8, 8))
    spot[3, 3], spot[0, 7] = 3.0, 1.0  # three quarters of the mass inside
    assert centre_share(spot) == pytest.approx(0.75)
    assert math.isnan(centre_share(np.zeros((4, 4))))


def test_denormalise_undoes_the_normalisation():
    pixels = torch.rand(2, 3, 5, 5)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.1]
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    shown = denormalise(normalised, mean, std)
    assert shown.shape == (2, 5, 5, 3)
    np.testing.assert_allclose(shown, pixels.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_final_set():
    assert (
        final_set({"weights": {"best": {}, "best+T": {"scaled_from": "best"}, "swa": {}}}) == "swa"
    )
    assert final_set({"weights": {"best": {}}}) == "best"
    assert final_set({"weights": {"last": {}}}) == "last"
    with pytest.raises(ReportError, match="no weight set"):
        final_set({"weights": {}})


def _blobs(side: int, channels: int) -> torch.Tensor:
    """Two images with a bright square off-centre: something for a map to find."""
    x = torch.zeros(2, channels, side, side)
    x[0, :, 2:8, 2:8] = 2.0
    x[1, :, side - 9 : side - 3, 4:10] = 2.0
    return x


def test_grad_cam_on_basic_cnn_at_depth_2():
    torch.manual_seed(0)
    model = build_model("basic_cnn", in_channels=1, num_classes=3, input_size=28).eval()
    model.set_trainable({1, 2})  # block 3 does not run
    name, layer = cam_layer(model)
    assert name == "block2" and layer is model.blocks[1]
    x = _blobs(28, 1)
    for method in ("Grad-CAM", "Grad-CAM++"):
        maps = class_activation_maps(model, x, [0, 2], method)
        assert maps.shape == (2, 28, 28)
        assert all(m.max() > 0 for m in maps)
    features = stage_features(model, x[0])
    assert [n for n, _ in features] == ["block1", "block2"]
    assert features[1][1].shape[0] == model.config.channels()[1]


def _fit(model: torch.nn.Module, x: torch.Tensor, labels: list[int], steps: int = 8) -> None:
    """A few optimiser steps on ``x``: a random zoo network (timm zero-initialises each residual
    block's last norm) has no class evidence yet, so every ReLU-ed map would be 0."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor(labels)).backward()
        optimiser.step()
    model.eval()


# resnet10t divides by 32 (96 px: a 3x3 last stage); resnet18 takes a cifar stem at 32 px.
@pytest.mark.parametrize(("arch", "side"), [("timm/resnet10t", 96), ("resnet18", 32)])
def test_grad_cam_on_a_zoo_model_with_frozen_stages(arch, side):
    torch.manual_seed(0)
    model = build_model(arch, in_channels=3, num_classes=4, input_size=side).eval()
    name, layer = cam_layer(model)
    assert name == model.stage_names[-1]
    x = _blobs(side, 3)
    _fit(model, x, [1, 3])
    trainable = class_activation_maps(model, x, [1, 3])
    # Nothing trainable but the head: the target stage's parameters are frozen, yet its
    # activations still get gradients, and the maps do not change.
    model.set_trainable([])
    flags = [p.requires_grad for p in model.parameters()]
    frozen = class_activation_maps(model, x, [1, 3])
    assert frozen.shape == (2, side, side) and all(m.max() > 0 for m in frozen)
    np.testing.assert_allclose(frozen, trainable, atol=1e-4)
    assert [p.requires_grad for p in model.parameters()] == flags  # put back as they were
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())
    features = stage_features(model, x[0])
    assert [n for n, _ in features] == list(model.stage_names)
    sides = [f.shape[-1] for _, f in features]
    assert sides == sorted(sides, reverse=True) and all(f.ndim == 3 for _, f in features)


def test_grad_cam_explains_the_class_it_is_given():
    torch.manual_seed(0)
    model = build_model("basic_cnn", in_channels=3, num_classes=3, input_size=28).eval()
    x = _blobs(28, 3)[:1].repeat(2, 1, 1, 1)
    maps = class_activation_maps(model, x, [0, 1])
    assert not np.allclose(maps[0], maps[1])
    with pytest.raises(ValueError, match="2 images but 1 classes"):
        class_activation_maps(model, x, [0])


def test_load_final_matches_the_test_report(trained_run):
    run = load_run(trained_run)
    final = load_final(run)
    report = run.test_report
    assert final.name == "swa" and final.temperature == 1.0  # the tiny run's T is kept at 1
    assert len(final.labels) == report["n_test"]
    # The report's NLL is the mean of the same per-image losses.
    assert final.losses.mean().item() == pytest.approx(report["weights"]["swa"]["nll"], rel=1e-5)
    assert (final.predictions == final.labels).float().mean().item() == pytest.approx(
        report["weights"]["swa"]["accuracy"]
    )


def test_swa_weights_without_metadata_borrow_it(trained_run, tmp_path):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    swa_path = run_dir / "checkpoints" / "swa.pt"
    before = load_final(load_run(run_dir)).logits
    ckpt = load_checkpoint(swa_path)
    kept = {k: ckpt[k] for k in ("format", "model", "trainable_stages")}  # no class names, data
    save_checkpoint(kept, swa_path)
    final = load_final(load_run(run_dir))
    assert final.name == "swa"
    torch.testing.assert_close(final.logits, before)


def test_a_missing_final_checkpoint_is_named(trained_run, tmp_path):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    (run_dir / "checkpoints" / "swa.pt").unlink()
    with pytest.raises(ReportError, match="no file for the 'swa' weights"):
        load_final(load_run(run_dir))


def _sections(page: Page) -> dict[str, str]:
    return {s.key: "".join(s.blocks) for s in page.sections}


def test_sections_on_a_trained_run(trained_run, tmp_path):
    run = load_run(trained_run)
    page = Page(tmp_path / "page", "t")
    add_errors_and_saliency(page, run, errors=5, per_class=2, device="cpu")
    assert [(s.key, s.title) for s in page.sections] == [
        ("errors", "Errors"),
        ("saliency", "Saliency"),
    ]
    html = _sections(page)
    assert "the 5 test images with the highest loss" in html["errors"]
    assert "block3" in html["saliency"]  # the tiny run ends with all three blocks active
    errors = Image.open(page.figure_path("errors"))
    assert errors.size[0] >= 8 * 112  # four image pairs a row, each panel >= 112 px
    for name in ("saliency", "feature_maps"):
        assert page.figure_path(name).is_file()
    # The centre-share table: one row per class, shares in [0, 1].
    rows = [
        re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", html["saliency"])
    ]
    rows = [r for r in rows if r]  # the header row has no <td>
    assert [r[0] for r in rows] == run.test_report["class_names"]
    assert all(r[1] == "2" and 0.0 <= float(r[2]) <= 1.0 for r in rows)


def test_a_one_channel_64px_run_renders(trained_grey_run, tmp_path):
    run = load_run(trained_grey_run)
    page = Page(tmp_path / "page", "t")
    add_errors_and_saliency(page, run, errors=4, per_class=1, device="cpu")
    final = load_final(run)
    assert final.images([0]).shape == (1, 1, 64, 64)
    assert set(_sections(page)) == {"errors", "saliency"}
    # Panels of >= 112 px: 4 image pairs a row of errors, one image and two maps of saliency.
    widths = {"errors": 8 * 112, "saliency": 3 * 112, "feature_maps": 500}
    for name, width in widths.items():
        assert Image.open(page.figure_path(name)).size[0] >= width
    report = json.loads((run.path / "test_report.json").read_text())
    assert final.name == final_set(report)


def test_zero_images_asked_for(trained_run, tmp_path):
    page = Page(tmp_path / "page", "t")
    add_errors_and_saliency(page, load_run(trained_run), errors=0, per_class=0, device="cpu")
    html = _sections(page)
    assert "errors = 0" in html["errors"] and "per_class = 0" in html["saliency"]
    assert not list(page.folder.glob("*.png"))
