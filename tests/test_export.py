"""inference.export: safetensors + JSON round trip, ONNX and torch.export parity, and failures."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import predict as predict_script
from inference.classifier import EXPORT_JSON, EXPORT_WEIGHTS, Classifier
from inference.export import EXPORT_ONNX, EXPORT_PT2, export_model
from models.registry import build_model

FILES = (EXPORT_WEIGHTS, EXPORT_JSON, EXPORT_ONNX, EXPORT_PT2)


def _test_images(run):
    return np.load(run.parent / "tiny.npz")["test_images"]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """The trained run's final weights exported once: (classifier, folder, lines returned).

    The tiny run gets every validation image right, so its fitted temperature is 1; a made-up
    one (as if fitted) shows the export carries the temperature through."""
    classifier = Classifier.from_run(trained_run)
    classifier.temperature, classifier.temperature_tta = 1.6, classifier.tta
    folder = tmp_path_factory.mktemp("exported")
    lines = export_model(classifier, folder)
    return classifier, folder, lines


@pytest.fixture(scope="module")
def zoo_export(tmp_path_factory):
    """An untrained resnet18 (1 channel, 32 px, 3 classes) exported; BN statistics gathered on
    random batches first so its logits are of ordinary size, not vanishing or exploding."""
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=1, num_classes=3, input_size=32)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 32, 32))
    folder = tmp_path_factory.mktemp("zoo")
    classifier = Classifier(
        model=model.eval(),
        class_names=["a", "b", "c"],
        mean=[0.4],
        std=[0.2],
        input_size=32,
        channels=1,
        temperature=1.7,
        temperature_tta="none",
        tta="none",
        weights="best",
        source=folder,
        device=torch.device("cpu"),
    )
    lines = export_model(classifier, folder)
    return classifier, folder, lines


def _onnx_logits(folder, batch: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(folder / EXPORT_ONNX), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"image": batch.numpy()})
    return out


def _batches(classifier: Classifier, images) -> dict[int, torch.Tensor]:
    """Normalised batches of 1 and 64 images (the test images repeated to reach 64)."""
    images = np.asarray(images)
    many = np.resize(images, (64, *images.shape[1:]))
    return {1: classifier.normalise(list(images[:1])), 64: classifier.normalise(list(many))}


# ---------------------------------------------------------------- safetensors + model.json


def test_every_file_is_written_and_listed(exported):
    _, folder, lines = exported
    assert [line.split(" (")[0] for line in lines] == [f"wrote {name}" for name in FILES]
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)  # no temp files left


def test_the_export_gives_the_runs_probabilities(trained_run, exported):
    run, folder, _ = exported
    back = Classifier.from_export(folder)
    for name in ("class_names", "mean", "std", "input_size", "channels", "temperature"):
        assert getattr(back, name) == getattr(run, name), name
    for name in ("temperature_tta", "tta", "weights", "card", "config"):
        assert getattr(back, name) == getattr(run, name), name
    assert back.temperature == 1.6 and back.temperature_for(run.tta) == 1.6
    images = list(_test_images(trained_run))
    for tta in ("none", run.tta, "d4"):
        expected = run.probabilities(images, tta)
        torch.testing.assert_close(back.probabilities(images, tta), expected, atol=1e-6, rtol=0)


def test_the_json_is_the_metadata_and_the_weights_are_plain_tensors(trained_run, exported):
    from safetensors.torch import load_file

    run, folder, _ = exported
    assert json.loads((folder / EXPORT_JSON).read_text()) == json.loads(json.dumps(run.metadata()))
    state = load_file(folder / EXPORT_WEIGHTS)
    expected = run.model.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


def _set(field, value):
    def edit(folder):
        meta = json.loads((folder / EXPORT_JSON).read_text())
        meta[field] = value
        (folder / EXPORT_JSON).write_text(json.dumps(meta))

    return edit


def _drop(field):
    def edit(folder):
        meta = json.loads((folder / EXPORT_JSON).read_text())
        del meta[field]
        (folder / EXPORT_JSON).write_text(json.dumps(meta))

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("temperature"), "model.json: field 'temperature' is missing"),
        (_set("channels", 2), "model.json: field 'channels' is 2; allowed: 1 or 3"),
        (_set("class_names", ["only"]), "field 'class_names' is [\"only\"]; allowed: a list of"),
        (_set("class_names", ["a", "b"]), "field 'class_names' has 2 entries; model_record"),
        (_set("mean", [0.5]), "field 'mean' has 1 entries; channels is 3"),
        (_set("input_size", 32), "field 'input_size' is 32; model_record.input_size is 28"),
        (lambda f: (f / EXPORT_JSON).write_text("{not json"), "model.json is not valid JSON"),
        (lambda f: (f / EXPORT_WEIGHTS).unlink(), "model.safetensors does not exist"),
        (lambda f: (f / EXPORT_WEIGHTS).write_bytes(b"junk"), "model.safetensors cannot be read"),
    ],
)
def test_a_bad_export_folder_is_one_line(exported, tmp_path, capsys, edit, message):
    folder = tmp_path / "export"
    shutil.copytree(exported[1], folder)
    edit(folder)
    image = tmp_path / "one.png"
    Image.fromarray(np.full((28, 28, 3), 100, np.uint8)).save(image)
    assert predict_script.main([str(folder), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and message in err and str(folder) in err


# ---------------------------------------------------------------- ONNX


def test_onnx_matches_pytorch_at_batch_1_and_64(trained_run, exported):
    classifier, folder, _ = exported
    session = ort.InferenceSession(str(folder / EXPORT_ONNX), providers=["CPUExecutionProvider"])
    (image,), (logits,) = session.get_inputs(), session.get_outputs()
    assert (image.name, image.type, image.shape[1:]) == ("image", "tensor(float)", [3, 28, 28])
    assert logits.name == "logits" and isinstance(image.shape[0], str)  # a symbolic batch
    for size, batch in _batches(classifier, _test_images(trained_run)).items():
        expected = classifier.logits(batch).numpy()
        got = _onnx_logits(folder, batch)
        assert got.shape == (size, 3)
        assert np.abs(expected).max() > 0.1  # a trained net, not a zero output
        assert np.abs(got - expected).max() < 1e-4, size


def test_onnx_logits_over_the_temperature_give_the_probabilities(trained_run, exported):
    """What the docs tell onnxruntime users: softmax(logits / model.json's temperature)."""
    classifier, folder, _ = exported
    meta = json.loads((folder / EXPORT_JSON).read_text())
    assert meta["temperature"] == 1.6
    images = list(_test_images(trained_run)[:8])
    logits = torch.from_numpy(_onnx_logits(folder, classifier.normalise(images))).double()
    got = (logits / meta["temperature"]).softmax(dim=1)
    torch.testing.assert_close(got, classifier.probabilities(images, "none"), atol=1e-5, rtol=0)


def test_a_zoo_model_exports_and_matches(zoo_export):
    classifier, folder, lines = zoo_export
    assert all(line.startswith("wrote ") for line in lines), lines
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 32, 32, 1), dtype=np.uint8)
    for size, batch in _batches(classifier, images).items():
        expected = classifier.logits(batch).numpy()
        scale = max(1.0, float(np.abs(expected).max()))
        assert expected.std() > 1e-2  # the logits differ between classes and images
        got = _onnx_logits(folder, batch)
        assert np.abs(got - expected).max() / scale < 1e-4, size
    back = Classifier.from_export(folder)
    assert (back.channels, back.input_size, back.temperature) == (1, 32, 1.7)
    expected = classifier.probabilities(list(images))
    torch.testing.assert_close(back.probabilities(list(images)), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- torch.export


@pytest.mark.parametrize("which", ["run", "zoo"])
def test_pt2_matches_pytorch_at_batch_1_and_5(exported, zoo_export, which):
    if which == "run":
        classifier, folder = exported[0], exported[1]
    else:
        classifier, folder = zoo_export[0], zoo_export[1]
    # Our own file in a temp folder: torch.export.load unpickles, fine for a trusted file.
    program = torch.export.load(folder / EXPORT_PT2).module()
    shape = (classifier.channels, classifier.input_size, classifier.input_size)
    torch.manual_seed(2)
    for size in (1, 5):
        batch = torch.randn(size, *shape)
        with torch.no_grad():
            got = program(batch)
        expected = classifier.logits(batch)
        assert got.shape == (size, len(classifier.class_names))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- failures


def _half_onnx(model, args, path, **kwargs):
    with open(path, "wb") as handle:
        handle.write(b"half a graph")
    raise RuntimeError("unsupported operator foo\nwith a long traceback below")


def _half_pt2(program, handle, **kwargs):
    handle.write(b"half an archive")
    raise RuntimeError("unsupported operator foo\nwith a long traceback below")


# torch.export.save, not torch.export.export: the ONNX exporter goes through the latter too.
@pytest.mark.parametrize(
    ("target", "broken", "skipped"),
    [("torch.onnx.export", _half_onnx, EXPORT_ONNX), ("torch.export.save", _half_pt2, EXPORT_PT2)],
)
def test_a_failing_exporter_skips_only_its_file(
    trained_run, tmp_path, monkeypatch, target, broken, skipped
):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / skipped).write_bytes(b"an older export")  # must not survive next to new weights
    monkeypatch.setattr(target, broken)
    lines = export_model(Classifier.from_run(trained_run), folder)
    assert f"skipped {skipped}: RuntimeError: unsupported operator foo; removed the older copy" in (
        lines
    )
    written = [name for name in FILES if name != skipped]
    assert [line.split(" (")[0] for line in lines if line.startswith("wrote")] == [
        f"wrote {name}" for name in written
    ]
    assert sorted(p.name for p in folder.iterdir()) == sorted(written)  # no temp files
    assert (
        Classifier.from_export(folder).class_names == Classifier.from_run(trained_run).class_names
    )


# ---------------------------------------------------------------- the command


def test_predict_exports_then_classifies_with_the_export(trained_run, tmp_path, capsys):
    folder = tmp_path / "exported"
    assert predict_script.main([str(trained_run), "--export", str(folder)]) == 0
    err = capsys.readouterr().err
    assert all(f"wrote {name}" in err for name in FILES), err
    images = _test_images(trained_run)[:4]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    paths = [str(tmp_path / f"{i}.png") for i in range(4)]
    out = tmp_path / "preds.csv"
    assert predict_script.main([str(folder), *paths, "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    run = Classifier.from_run(trained_run)
    expected = run.probabilities(list(images), run.tta).numpy()
    got = np.array([[float(r[f"p_{n}"]) for n in run.class_names] for r in rows])
    assert [r["file"] for r in rows] == paths
    assert np.allclose(got, expected, atol=1e-6)
