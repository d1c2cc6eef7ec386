"""predict.py and the inference package: inputs, conversion, calibrated probabilities, output."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import predict as predict_script
from inference.batch import classify
from inference.classifier import Classifier, final_weight_set
from inference.inputs import InputError, collect_inputs, conform, read_item
from report.predictions import load_final
from report.run import load_run


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(value=120, size=28):
    return np.full((size, size, 3), value, np.uint8)


# ---------------------------------------------------------------- inputs


def test_a_folder_is_searched_recursively_and_odd_files_are_listed(tmp_path):
    _png(tmp_path / "a.png", _rgb())
    _png(tmp_path / "sub" / "deeper" / "b.jpg", _rgb())
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    items = collect_inputs([tmp_path, tmp_path / "missing.png"])
    # In place: the folder's files sorted by path, then the next input.
    assert [i.path.name for i in items] == ["a.png", "notes.txt", "b.jpg", "missing.png"]
    assert [i.problem is None for i in items] == [True, False, True, False]
    assert "unsupported format (.txt)" in items[1].problem
    assert items[3].problem == "no such file or folder"
    with pytest.raises(InputError, match="no such file or folder"):
        read_item(items[3])


def test_an_npz_gives_one_item_per_row_of_its_image_arrays(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(
        path, train_images=np.zeros((3, 8, 8), np.uint8), test_images=_rgb()[None].repeat(2, 0)
    )
    np.savez(tmp_path / "labels.npz", labels=np.zeros(3))
    items = collect_inputs([path, f"{path}:test_images", tmp_path / "labels.npz"])
    assert [i.name for i in items[:5]] == [f"{path}:train_images[{i}]" for i in range(3)] + [
        f"{path}:test_images[{i}]" for i in range(2)
    ]
    assert len(items) == 8  # the two test rows again, picked by key, and the labels file
    assert "holds no image array (keys labels)" in items[7].problem
    assert read_item(items[0]).size == (8, 8)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 8, 8), np.float32), "dtype float32; allowed: uint8"),
        (np.zeros((2, 8, 8, 2), np.uint8), "shape (2, 8, 8, 2); allowed"),
    ],
)
def test_an_npz_array_of_the_wrong_kind_is_listed(tmp_path, array, message):
    np.savez(tmp_path / "d.npz", images=array)
    (item,) = collect_inputs([tmp_path / "d.npz"])
    assert message in item.problem


def test_an_unreadable_image_fails_alone(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    items = collect_inputs([tmp_path / "broken.png"])
    with pytest.raises(InputError, match="unreadable image"):
        read_item(items[0])


def test_a_decompression_bomb_is_one_input_not_the_end_of_the_batch(tmp_path, monkeypatch):
    _png(tmp_path / "huge.png", _rgb(size=64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 is then over twice the limit
    (item,) = collect_inputs([tmp_path / "huge.png"])
    with pytest.raises(InputError, match="unreadable image: Image size"):
        read_item(item)


@pytest.mark.parametrize(
    ("mode", "channels", "note"),
    [
        ("RGB", 1, "converted RGB to greyscale"),
        ("RGBA", 3, "dropped the alpha channel of RGBA"),
        ("L", 1, None),
        ("RGB", 3, None),
        ("P", 3, None),  # a palette expands to RGB losslessly
    ],
)
def test_conversion_to_the_models_channels_is_noted(mode, channels, note):
    image = Image.new("RGB", (28, 28), (200, 10, 10)).convert(mode)
    array, notes = conform(image, channels, 28)
    assert array.shape == (28, 28, channels) and array.dtype == np.uint8
    assert notes == ([note] if note else [])


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_image_is_refused_not_saturated(channels):
    scan = Image.fromarray((np.arange(784).reshape(28, 28) * 80).astype(np.uint16))
    with pytest.raises(InputError, match=r"I;16 image \(more than 8 bits per pixel\)"):
        conform(scan, channels, 28)


def test_grey_for_a_colour_model_is_refused_in_one_line():
    with pytest.raises(InputError, match=r"greyscale image \(L\); the model takes colour"):
        conform(Image.new("L", (28, 28)), 3, 28)


def test_another_size_is_resized_bicubic_like_the_folder_reader():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    array, notes = conform(image, 3, 28)
    assert notes == ["resized 30x40 to 28x28"]
    expected = np.asarray(image.resize((28, 28), Image.Resampling.BICUBIC))
    assert np.array_equal(array, expected)


# ---------------------------------------------------------------- the classifier


def _test_images(run):
    return np.load(run.parent / "tiny.npz")["test_images"]


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    """A tiny trained and tested run of a timm model."""
    from tests.conftest import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("zoo"), arch="timm/resnet10t")


@pytest.mark.parametrize("run_fixture", ["trained_run", "zoo_run"])
def test_probabilities_equal_the_test_reports_calibrated_ones(request, run_fixture):
    """The same images through predict's path and through test.py's give the same calibrated
    probabilities, for the weight set the run ends with: basic_cnn and a timm model."""
    trained_run = request.getfixturevalue(run_fixture)
    final = load_final(load_run(trained_run))
    classifier = Classifier.from_run(trained_run)
    assert classifier.weights == final.name == final_weight_set(trained_run) == "swa"
    assert classifier.temperature == pytest.approx(final.temperature)
    got = classifier.probabilities(list(_test_images(trained_run)), classifier.tta)
    torch.testing.assert_close(got, final.probabilities, atol=1e-6, rtol=0)


def test_a_temperature_applies_only_to_the_tta_mode_it_was_fitted_under(trained_run):
    classifier = Classifier.from_run(trained_run, "best")
    classifier.temperature, classifier.temperature_tta = 2.5, "hflip"
    assert classifier.temperature_for("hflip") == 2.5
    assert classifier.temperature_for("none") == classifier.temperature_for("d4") == 1.0
    images = list(_test_images(trained_run)[:3])
    logits = classifier.logits(classifier.normalise(images), "hflip")
    expected = (logits.double() / 2.5).softmax(dim=1)
    torch.testing.assert_close(classifier.probabilities(images, "hflip"), expected)


def test_bad_files_do_not_stop_the_batch_and_order_is_kept(trained_run, tmp_path):
    images = _test_images(trained_run)[:5]
    for i, image in enumerate(images):
        _png(tmp_path / f"{i}.png", image)
    (tmp_path / "2.png").write_bytes(b"broken")
    items = collect_inputs([tmp_path])
    classifier = Classifier.from_run(trained_run)
    small = classify(classifier, items, batch_size=2)
    whole = classify(classifier, items, batch_size=64)
    assert [r.file for r in small] == [str(tmp_path / f"{i}.png") for i in range(5)]
    assert small[2].error.startswith("unreadable image") and small[2].probabilities == []
    for a, b in zip(small, whole, strict=True):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
    expected = classifier.probabilities(list(images[[0, 1, 3, 4]]))
    got = [r.probabilities for r in small if r.error is None]
    assert np.allclose(got, expected.numpy(), atol=1e-6)


def test_a_grey_model_converts_colour_with_a_note(trained_grey_run, tmp_path):
    _png(tmp_path / "colour.png", _rgb(90, size=32))
    classifier = Classifier.from_run(trained_grey_run)
    assert (classifier.channels, classifier.input_size) == (1, 64)
    (row,) = classify(classifier, collect_inputs([tmp_path]))
    assert row.error is None
    assert row.notes == ["converted RGB to greyscale", "resized 32x32 to 64x64"]
    assert sum(row.probabilities) == pytest.approx(1.0)


# ---------------------------------------------------------------- the command


def test_the_command_writes_csv_and_lists_what_it_skipped(trained_run, tmp_path, capsys):
    images = _test_images(trained_run)
    npz = tmp_path / "new.npz"
    np.savez(npz, images=images[:6])
    (tmp_path / "bad.jpg").write_bytes(b"x")
    out = tmp_path / "preds.csv"
    code = predict_script.main(
        [str(trained_run), str(tmp_path / "bad.jpg"), str(npz), "--out", str(out)]
    )
    assert code == 1  # some input was skipped
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 7
    classifier = Classifier.from_run(trained_run)
    names = classifier.class_names
    expected = classifier.probabilities(list(images[:6]), classifier.tta).numpy()
    done = [r for r in rows if not r["error"]]
    assert [r["prediction"] for r in done] == [names[i] for i in expected.argmax(1)]
    got = np.array([[float(r[f"p_{n}"]) for n in names] for r in done])
    assert np.allclose(got, expected, atol=1e-6)
    assert rows[0]["file"].endswith("bad.jpg") and rows[0]["prediction"] == ""  # in input order
    assert rows[0]["error"].startswith("unreadable image")
    err = capsys.readouterr().err
    assert "classified 6, skipped 1" in err and "bad.jpg: unreadable image" in err


def test_json_output_flags_low_confidence(trained_run, tmp_path):
    npz = tmp_path / "new.npz"
    np.savez(npz, images=_test_images(trained_run)[:4])
    out = tmp_path / "preds.json"
    args = [str(trained_run), str(npz), "--out", str(out), "--weights", "best", "--tta", "none"]
    assert predict_script.main([*args, "--min-confidence", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["weights"] == "best" and result["skipped"] == []
    assert len(result["predictions"]) == 4
    assert all(p["low_confidence"] for p in result["predictions"])  # nothing reaches 1.0
    first = result["predictions"][0]
    assert first["prediction"] == max(first["probabilities"], key=first["probabilities"].get)


def test_csv_goes_to_stdout_without_out(trained_run, tmp_path, capsys):
    _png(tmp_path / "one.png", _test_images(trained_run)[0])
    assert predict_script.main([str(trained_run), str(tmp_path / "one.png")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("file,prediction,confidence,low_confidence,p_")
    assert len(out.splitlines()) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to do: give INPUT files or folders, or --export DIR"),
        (["x.png", "--out", "p.txt"], "--out p.txt: unknown format; allowed: .csv .json"),
        (["x.png", "--weights", "last"], "checkpoints/last.pt does not exist; this run has:"),
        (["x.png", "--out", "no/such/p.csv"], "--out no/such/p.csv: folder no/such does not exist"),
    ],
)
def test_bad_arguments_are_one_line(trained_run, tmp_path, capsys, args, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "checkpoints" / "last.pt").unlink(missing_ok=True)
    assert predict_script.main([str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
