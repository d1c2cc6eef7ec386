"""demo.py and inference.demo: the Gradio page serves predict.py's numbers, refuses bad uploads
with one clear line, shows the model card, and works in a real browser without the internet."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo as demo_script
from inference.classifier import Classifier, final_weight_set
from inference.demo import DemoError, card_markdown, launch, overlay, sample_images
from inference.inputs import InputItem, conform, read_item

#: Keeps Gradio and gradio_client from looking anything up on the internet.
OFFLINE = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


@pytest.fixture(scope="module")
def served(trained_run):
    """The demo of the tiny 3-channel run on a free port, and a client talking to it."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        from gradio_client import Client

        start = time.perf_counter()
        app, url = launch(trained_run, port=0, device="cpu", prevent_thread_lock=True, quiet=True)
        started = time.perf_counter() - start
        try:
            yield app, url, Client(url, verbose=False), started
        finally:
            app.close()


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _expected(run, weights: str, path: Path) -> np.ndarray:
    """predict.py's probabilities for one file: the same classifier, inputs and TTA."""
    classifier = Classifier.from_run(run, weights, "cpu")
    image, _ = conform(read_item(InputItem(path)), classifier.channels, classifier.input_size)
    return classifier.probabilities([image], classifier.tta)[0].numpy()


def _other_weights(run) -> str:
    final = final_weight_set(run)
    return next(n for n in ("best", "last", "swa") if n != final)


@pytest.mark.parametrize("which", ["default", "other"])
def test_the_page_gives_predict_pys_probabilities(served, trained_run, tmp_path, which):
    from gradio_client import handle_file

    _, _, client, _ = served
    weights = final_weight_set(trained_run) if which == "default" else _other_weights(trained_run)
    rng = np.random.default_rng(3)
    path = _png(tmp_path / "upload.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    start = time.perf_counter()
    label, image, notes = client.predict(handle_file(str(path)), weights, api_name="/classify")
    print(f"classify call {time.perf_counter() - start:.2f}s")  # shown with pytest -s
    expected = _expected(trained_run, weights, path)
    names = Classifier.from_run(trained_run, weights, "cpu").class_names
    assert label["label"] == names[int(expected.argmax())]
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(got) == set(names)  # 3 classes: all of them are shown
    for i, name in enumerate(names):
        assert got[name] == pytest.approx(float(expected[i]), abs=1e-4)
    assert f"{weights} weights" in notes and "resized 50x40 to 28x28" in notes
    shown = np.asarray(Image.open(image))
    assert shown.shape[0] == 224 and shown.shape[1] > 2 * 224 and shown.shape[2] == 3


def test_bad_uploads_get_one_clear_line(served, tmp_path):
    from gradio_client import handle_file

    _, _, client, _ = served
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is no png")
    grey = _png(tmp_path / "grey.png", np.full((28, 28), 90, np.uint8))
    cases = [
        (text, "notes.txt is not an image file (.txt); allowed: .bmp"),
        (fake, "fake.png: unreadable image"),
        (grey, "grey.png: greyscale image (L); the model takes colour (RGB) images"),
    ]
    for path, message in cases:
        with pytest.raises(Exception) as caught:
            client.predict(handle_file(str(path)), None, api_name="/classify")
        assert message in str(caught.value)
        assert "\n" not in str(caught.value).strip()


def test_an_uploaded_pickle_is_never_loaded(served, tmp_path):
    """A pickle named .png is refused by PIL; unpickling it would have created the marker."""
    import pickle

    from gradio_client import handle_file

    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(pickle.dumps(Boom()))
    _, _, client, _ = served
    with pytest.raises(Exception) as caught:
        client.predict(handle_file(str(bomb)), None, api_name="/classify")
    assert "unreadable image" in str(caught.value)
    assert not marker.exists()


def test_the_card_shows_the_test_accuracy(trained_run, tmp_path):
    weights = final_weight_set(trained_run)
    report = json.loads((trained_run / "test_report.json").read_text())
    row = report["weights"].get(weights + "+T") or report["weights"][weights]
    card = card_markdown(Classifier.from_run(trained_run, weights, "cpu"))
    assert f"- **test accuracy**: {row['accuracy']:.1%} of {report['n_test']} images" in card
    assert f"- **test ECE**: {row['ece']:.3f}" in card
    assert f"- **weights**: {weights} (temperature" in card

    untested = tmp_path / "run"
    shutil.copytree(trained_run, untested, ignore=shutil.ignore_patterns("test_report.json"))
    card = card_markdown(Classifier.from_run(untested, weights, "cpu"))
    assert "- **test accuracy**: not tested yet: run python test.py" in card


def test_samples_are_the_runs_test_images_spread_over_classes(trained_run, tmp_path):
    from dataset.cache import load_cache
    from training.evaluation.report import load_weight_set

    weights = final_weight_set(trained_run)
    samples = sample_images(trained_run, weights, tmp_path)
    cache = load_cache(load_weight_set(trained_run, weights)["data"]["cache"])
    images, labels = cache.images("test"), cache.labels("test")
    assert len(samples) == 6  # 3 classes, two each
    classes = []
    for path, caption in samples:
        index = int(caption.split("#")[1].rstrip(")"))
        assert np.array_equal(np.asarray(Image.open(path)), images[index])
        classes.append(int(labels[index]))
    assert sorted(classes) == [0, 0, 1, 1, 2, 2]


def test_the_overlay_upscales_the_input_nearest_neighbour():
    image = np.zeros((4, 4, 1), np.uint8)
    image[0, 0, 0] = 255
    shown = overlay(image, None, side=8)
    assert shown.shape[:2] == (8, 8 + 8 // 28 + 4 + 8)
    assert (shown[:2, :2] == 255).all() and (shown[2:, 2:8] == 0).all()  # one pixel -> 2x2
    heated = overlay(image, np.ones((4, 4), np.float32), side=8)
    assert not np.array_equal(heated[:, -8:], shown[:, -8:])  # the map tints the right panel


def test_a_busy_port_is_one_line(trained_run, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(DemoError, match=f"port {port} on 127.0.0.1 is busy"):
            launch(trained_run, port=port, quiet=True)
        assert demo_script.main([str(trained_run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: port {port} on 127.0.0.1 is busy") and err.count("\n") == 1


def test_a_missing_run_is_one_line(tmp_path, capsys):
    assert demo_script.main([str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1


def browser_check(
    url: str, upload: Path, screenshot: Path, width: int = 1200, other_weights: str | None = None
) -> dict:
    """Load the page in headless Chromium, upload ``upload``, press Classify, wait for the
    prediction, and save a full-page screenshot; then pick ``other_weights`` if given. Returns
    what the page showed and logged."""
    from playwright.sync_api import sync_playwright

    external, errors = [], []
    local = (url.rstrip("/"), "data:", "blob:")
    with sync_playwright() as play:
        browser = play.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.on("request", lambda r: r.url.startswith(local) or external.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="networkidle", timeout=60_000)
            page.locator("#image input[type=file]").set_input_files(str(upload))
            page.locator("#image img").first.wait_for(timeout=30_000)
            page.locator("#classify").click()
            heading = page.locator("#label [data-testid=label-output-value]")
            heading.wait_for(timeout=60_000)
            page.locator("#overlay img").first.wait_for(timeout=30_000)
            page.wait_for_load_state("networkidle")
            result = {
                "label": heading.inner_text().strip(),
                "card": page.locator("#card").inner_text(),
                "notes": page.locator("#notes").inner_text(),
            }
            page.screenshot(path=str(screenshot), full_page=True)
            if other_weights:  # the card follows the weights picker
                page.locator("#weights label", has_text=other_weights).click()
                page.locator("#card", has_text=f"{other_weights} (temperature").wait_for(
                    timeout=30_000
                )
                result["card_after"] = page.locator("#card").inner_text()
        finally:
            browser.close()
    return {**result, "external": external, "errors": errors}


def test_the_page_works_in_a_browser(served, trained_run, tmp_path):
    pytest.importorskip("playwright", reason="playwright is not installed (requirements-dev.txt)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set $CHROMIUM)")
    _, url, _, _ = served
    upload = _png(tmp_path / "up.png", np.full((28, 28, 3), (200, 200, 200), np.uint8))
    weights = final_weight_set(trained_run)
    other = _other_weights(trained_run)
    seen = browser_check(url, upload, tmp_path / "page.png", other_weights=other)
    expected = _expected(trained_run, weights, upload)
    names = Classifier.from_run(trained_run, weights, "cpu").class_names
    assert seen["label"] == names[int(expected.argmax())]
    assert seen["external"] == [] and seen["errors"] == []
    report = json.loads((trained_run / "test_report.json").read_text())
    row = report["weights"].get(weights + "+T") or report["weights"][weights]
    assert f"{row['accuracy']:.1%}" in seen["card"]
    assert "used as it is" in seen["notes"]
    assert f"weights: {weights} (temperature" in seen["card"]
    assert f"weights: {other} (temperature" in seen["card_after"]
    assert Image.open(tmp_path / "page.png").size[0] == 1200
