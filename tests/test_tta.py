"""Test-time augmentation: the views of each mode, the averaged logits, and `predict` with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.engine.inference import predict
from training.evaluation.tta import (
    TTA_MODES,
    resolve_tta,
    resolve_tta_for_images,
    tta_logits,
    tta_views,
)


def _image(channels: int = 3, size: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))


class _Flatten(nn.Module):
    """A linear map of the raw pixels: it sees every flip and rotation as a different input."""

    def __init__(self, channels: int = 3, size: int = 5, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(channels * size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(("channels", "mode"), [(3, "d4"), (1, "hflip")])
def test_auto_picks_the_views_training_augments_with(channels, mode):
    assert resolve_tta("auto", channels) == mode
    assert len(tta_views(_image(channels), "auto")) == {"d4": 8, "hflip": 2}[mode]


def test_explicit_modes_pass_through_and_unknown_ones_are_refused():
    for mode in ("none", "hflip", "d4"):
        assert resolve_tta(mode, 1) == mode == resolve_tta(mode, 3)
    with pytest.raises(ValueError, match=r"tta='rot' is invalid; allowed: none \| hflip"):
        resolve_tta("rot", 3)
    with pytest.raises(ValueError, match="1- or 3-channel images; these have 2"):
        resolve_tta("auto", 2)
    assert set(TTA_MODES) == {"none", "hflip", "d4", "auto"}


def test_d4_views_are_the_eight_distinct_symmetries_of_the_square():
    x = _image()
    views = tta_views(x, "d4")
    assert len(views) == 8 and torch.equal(views[0], x)
    for i, a in enumerate(views):
        assert a.shape == x.shape
        assert all(not torch.equal(a, b) for b in views[i + 1 :])  # a random image has no symmetry
        # The set is a group: a quarter turn or a mirror of any view is again one of the views.
        for moved in (torch.rot90(a, 1, dims=(2, 3)), a.flip(2), a.flip(3)):
            assert any(torch.equal(moved, b) for b in views)


def test_hflip_and_none_views():
    x = _image(1)
    assert len(tta_views(x, "none")) == 1 and tta_views(x, "none")[0] is x
    first, mirrored = tta_views(x, "hflip")
    assert torch.equal(first, x) and torch.equal(mirrored, x.flip(3))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"input shape \(3, 5, 5\) is invalid"):
        tta_views(torch.zeros(3, 5, 5), "hflip")
    with pytest.raises(ValueError, match="needs square images; these are 4x6"):
        tta_views(torch.zeros(1, 3, 4, 6), "d4")
    assert len(tta_views(torch.zeros(1, 3, 4, 6), "hflip")) == 2  # a mirror keeps the shape


def test_logits_are_the_mean_over_the_views():
    model, x = _Flatten(), _image()
    assert torch.equal(tta_logits(model, x, "none"), model(x))
    for mode in ("hflip", "d4"):
        expected = torch.stack([model(v) for v in tta_views(x, mode)]).mean(0)
        got = tta_logits(model, x, mode)
        assert got.shape == (2, 4)
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, model(x))  # the views really changed the answer


def test_an_invariant_model_is_unchanged_by_averaging():
    torch.manual_seed(1)
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    x = _image()
    torch.testing.assert_close(tta_logits(pooled, x, "d4"), pooled(x))


def test_predict_averages_every_batch_over_the_views():
    model, images = _Flatten(), torch.randn(7, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    loader = DataLoader(TensorDataset(images, torch.arange(7) % 4), batch_size=3)
    logits, labels = predict(model, loader, "cpu", tta="d4")
    assert logits.shape == (7, 4) and labels.tolist() == [0, 1, 2, 3, 0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(logits, tta_logits(model, images, "d4"))
    single, _ = predict(model, loader, "cpu")
    assert not torch.allclose(single, logits)


def test_image_check_refuses_d4_on_non_square_images_only():
    assert resolve_tta_for_images("auto", (28, 28, 3)) == "d4"
    assert resolve_tta_for_images("auto", (28, 32, 1)) == "hflip"
    assert resolve_tta_for_images("hflip", (28, 32, 3)) == "hflip"
    with pytest.raises(ValueError, match=r"tta=auto \(d4 for 3-channel images\) needs square"):
        resolve_tta_for_images("auto", (28, 32, 3))
    with pytest.raises(ValueError, match="tta=d4 needs square images; these are 30x28; use hflip"):
        resolve_tta_for_images("d4", (30, 28, 1))


def test_a_run_with_d4_on_non_square_images_fails_before_training(folder_factory, tmp_path):
    from training.build import build_trainer
    from training.config.schema import ConfigError, load_config

    root = folder_factory({"a": 12, "b": 12}, size=(32, 28))  # 32 wide, 28 high
    cfg = load_config(
        preset="cpu",
        overrides=[f"data.source={root}", f"data.root={tmp_path / 'cache'}", "run.tta=auto"],
    )
    with pytest.raises(ConfigError, match=r"^run.tta=auto \(d4 for 3-channel images\) needs"):
        build_trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
