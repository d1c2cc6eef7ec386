"""A local web page for trying a trained run: ``python demo.py RUN_DIR`` (Gradio).

The page takes one uploaded image (or one of a few samples of the run's test split), and shows
the top-k calibrated class probabilities, a Grad-CAM overlay of the predicted class, what was
done to the image to fit the model, and a short model card. A weights picker switches between
the run's weight sets; each :class:`~inference.classifier.Classifier` is loaded once and kept.

Uploads are only ever read by PIL (through :mod:`inference.inputs`), never unpickled; the
upload size is capped; the server binds 127.0.0.1 unless told otherwise; Gradio's analytics
are off and the page uses local fonts, so nothing reaches the internet.

The classify event has the stable API name ``/classify``: (image file, weight set) ->
(label dict, overlay image, notes markdown), for ``gradio_client``.

Public API:
    build_app, launch, DemoError, card_markdown, sample_images, overlay, API_NAME,
    MAX_FILE_SIZE.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from inference.classifier import Classifier, final_weight_set
from inference.inputs import IMAGE_SUFFIXES, InputError, InputItem, conform, read_item
from training.evaluation.report import WEIGHT_FILES

if TYPE_CHECKING:
    import gradio as gr

#: The classify event's API name (``gradio_client``: ``api_name="/classify"``).
API_NAME = "classify"

#: Largest upload accepted; a medical image at the sizes these models take is far smaller.
MAX_FILE_SIZE = "10mb"

#: Test-split samples offered under the upload box.
SAMPLES = 6

#: Display side of the input and Grad-CAM panels, in pixels (nearest-neighbour upscaling).
DISPLAY_PX = 224

#: Classes shown as bars at most.
TOP_K = 5


class DemoError(RuntimeError):
    """The demo cannot start (a busy port, say); the message is one line."""


def _quiet_environment() -> None:
    """No analytics, version checks or Hugging Face lookups: must be set before gradio is
    imported, which reads them once."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# --------------------------------------------------------------------------- the model side


class _Models:
    """The run's weight sets, each loaded the first time it is asked for and kept."""

    def __init__(self, run_dir: Path, default: str, device: str) -> None:
        self.run_dir = run_dir
        self.device = device
        folder = run_dir / "checkpoints"
        self.names = [n for n in WEIGHT_FILES if (folder / WEIGHT_FILES[n]).is_file()]
        if default not in self.names:
            raise FileNotFoundError(f"{folder / WEIGHT_FILES.get(default, default)} does not exist")
        self.default = default
        self._loaded: dict[str, Classifier] = {}
        # Gradio runs events on worker threads; Grad-CAM flips the parameters' requires_grad
        # flags and hooks the model, so one model is used by one request at a time.
        self.lock = threading.RLock()

    def get(self, name: str | None) -> Classifier:
        name = name or self.default
        if name not in self.names:
            raise InputError(f"weights {name!r} are not in this run; allowed: {self.names}")
        with self.lock:
            if name not in self._loaded:
                self._loaded[name] = Classifier.from_run(self.run_dir, name, self.device)
            return self._loaded[name]


def _read_upload(path: str | None, classifier: Classifier) -> tuple[np.ndarray, list[str]]:
    """The uploaded file as the model's input, or :class:`InputError` with one clear line."""
    if not path:
        raise InputError("no image: upload one or pick a test sample first")
    file = Path(path)
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(
            f"{file.name} is not an image file ({file.suffix or 'no suffix'}); allowed: "
            + " ".join(IMAGE_SUFFIXES)
        )
    try:
        image = read_item(InputItem(file))
    except InputError as error:
        raise InputError(f"{file.name}: {error}") from None
    try:
        return conform(image, classifier.channels, classifier.input_size)
    except InputError as error:
        raise InputError(f"{file.name}: {error}") from None


def overlay(image: np.ndarray, cam: np.ndarray | None, side: int = DISPLAY_PX) -> np.ndarray:
    """The input and its Grad-CAM overlay side by side, ``(side, 2 * side + gap, 3)`` uint8.

    Args:
        image: ``(H, W, C)`` uint8, the model's input.
        cam: ``(H, W)`` in [0, 1], or ``None`` for no map (the right panel is the image).
        side: display side of each panel; the image is upscaled nearest-neighbour, so each
            input pixel stays visible, the map bilinearly, as it is a smooth field.
    """
    from matplotlib import colormaps

    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    big = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.NEAREST))
    shown = big.astype(np.float32) / 255.0
    if cam is not None:
        field = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F")
        field = np.clip(np.asarray(field.resize((side, side), Image.Resampling.BILINEAR)), 0, 1)
        heat = colormaps["jet"](field)[..., :3]
        shown = 0.55 * shown + 0.45 * heat  # the report's alpha, so the two look alike
    gap = np.full((side, side // 28 + 4, 3), 255, np.uint8)
    return np.concatenate([big, gap, (shown * 255).round().astype(np.uint8)], axis=1)


def _grad_cam(classifier: Classifier, image: np.ndarray, cls: int) -> tuple[np.ndarray | None, str]:
    """The Grad-CAM map of ``cls`` for one conformed image, and a line saying where it came
    from (or why there is none)."""
    from report.saliency import cam_layer, class_activation_maps

    try:
        stage, _ = cam_layer(classifier.model)
        cams = class_activation_maps(classifier.model, classifier.normalise([image]), [cls])
    except ValueError as error:
        return None, f"no Grad-CAM: {error}"
    return cams[0], f"Grad-CAM of the predicted class on stage `{stage}`"


def _classify(models: _Models, path: str | None, weights: str | None):
    """(label dict, overlay image, notes markdown) for one upload; InputError when unusable."""
    classifier = models.get(weights)
    image, notes = _read_upload(path, classifier)
    tta = classifier.tta  # predict.py's default, so both give the same numbers
    with models.lock:
        probs = classifier.probabilities([image], tta)[0].tolist()
        top = int(np.argmax(probs))
        cam, cam_line = _grad_cam(classifier, image, top)
    labels = {name: float(p) for name, p in zip(classifier.class_names, probs, strict=True)}
    lines = [
        "### This image",
        f"**{classifier.class_names[top]}** with probability {probs[top]:.1%}"
        f" ({classifier.weights} weights, temperature {classifier.temperature_for(tta):.3f},"
        f" TTA {tta})",
        "Input: " + ("; ".join(notes) if notes else "used as it is")
        + f" (the model takes {_shape(classifier)})",
        "Left: what the model sees; right: " + cam_line + ".",
    ]  # fmt: skip
    return labels, overlay(image, cam), "\n\n".join(lines)


def _shape(classifier: Classifier) -> str:
    kind = "greyscale" if classifier.channels == 1 else "RGB"
    return f"{classifier.input_size}x{classifier.input_size} {kind}"


def card_markdown(classifier: Classifier) -> str:
    """The model card: what the model is and how it scored on the run's test split."""
    card = classifier.card
    rows = [
        ("dataset", card.get("dataset", "unknown")),
        ("architecture", card.get("arch", "unknown")),
        # The temperature that applies under the run's TTA mode (1 under another).
        (
            "weights",
            f"{classifier.weights} (temperature {classifier.temperature_for(classifier.tta):.3f})",
        ),
        ("input", _shape(classifier)),
        ("classes", ", ".join(classifier.class_names)),
    ]
    if "test_accuracy" in card:
        images = card.get("test_images")
        on = f" of {images} images" if images else ""
        rows.append(("test accuracy", f"{card['test_accuracy']:.1%}{on}"))
        if "test_ece" in card:
            rows.append(("test ECE", f"{card['test_ece']:.3f}"))
        rows.append(("tested", str(card.get("tested", "unknown"))))
    else:
        rows.append(("test accuracy", "not tested yet: run python test.py"))
    rows.append(("trained", str(card.get("trained", "unknown"))))
    # A list rather than a table: a narrow column would break the field names mid-word.
    lines = "\n".join(f"- **{key}**: {value}" for key, value in rows)
    notes = "".join(f"\n\n{line}" for line in classifier.notes)
    return f"### Model card\n{lines}{notes}"


def sample_images(run_dir: Path, weights: str, folder: Path) -> list[tuple[Path, str]]:
    """Up to :data:`SAMPLES` test-split images of the run, spread over its classes, written
    as PNGs to ``folder``: ``(path, caption)`` pairs; none when the run's cache is gone.

    The images come from the run's data cache exactly as the test split holds them (uint8).
    A missing cache is not rebuilt: that could mean a download, and the demo works without.
    """
    from dataset.cache import load_cache
    from dataset.errors import DataError
    from training.evaluation.report import load_weight_set, test_loader

    ckpt = load_weight_set(run_dir, weights)
    cache_dir = Path((ckpt.get("data") or {}).get("cache", ""))
    try:
        load_cache(cache_dir)
        dataset = test_loader(ckpt, None, batch_size=1, workers=0)[0].dataset
    except (DataError, OSError, KeyError, ValueError):
        return []
    labels = np.asarray(dataset.labels)
    names = [str(n) for n in ckpt["class_names"]]
    per_class = max(1, SAMPLES // len(names))
    chosen = []
    for cls in range(len(names)):
        chosen += [int(i) for i in np.flatnonzero(labels == cls)[:per_class]]
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in sorted(chosen, key=lambda i: (chosen.index(i) % per_class, i))[:SAMPLES]:
        row = index if dataset.rows is None else int(dataset.rows[index])
        pixels = np.array(dataset.images[row])
        path = folder / f"test{index}_{names[labels[index]]}.png"
        Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(path)
        samples.append((path, f"{names[labels[index]]} (test #{index})"))
    return samples


# --------------------------------------------------------------------------- the page


#: Local font stacks only: Gradio's default theme would fetch Google fonts.
_FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"]
_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "monospace"]

CSS = """
#image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#notes p { margin: 0.2em 0; }
#card li { margin: 0.15em 0; }
"""


def _theme():
    import gradio as gr

    return gr.themes.Default(font=_FONTS, font_mono=_MONO)


def _upload_box(gr, **kwargs):
    """A ``gr.Image`` whose upload reaches the handler as the saved file's path, unread.

    ``gr.Image`` opens every upload with PIL before the handler runs and turns a failure into
    an unexplained server error; this one hands the path over so that :func:`_read_upload`
    reads it once and names the problem. The method is replaced on the instance: a subclass
    would make Gradio write a ``.pyi`` stub beside this module.
    """
    box = gr.Image(**kwargs)
    original = box.preprocess

    def preprocess(payload):
        if payload is None or (payload.url or "").startswith("data:") or not payload.path:
            return original(payload)
        return str(payload.path)

    box.preprocess = preprocess
    return box


def build_app(
    run_dir: str | Path,
    weights: str | None = None,
    device: str = "auto",
    samples_dir: Path | None = None,
) -> gr.Blocks:
    """The demo page of the run in ``run_dir``.

    Args:
        run_dir: a trained run folder.
        weights: the weight set selected first; default :func:`final_weight_set`.
        device: where the models run ("auto", "cpu", "cuda", "cuda:N", "mps").
        samples_dir: where the test-split samples are written; default a temporary folder
            removed at exit.

    Raises:
        FileNotFoundError: no such run or weight set.
        CheckpointError: a checkpoint cannot be read.
    """
    _quiet_environment()
    import gradio as gr

    run_dir = Path(run_dir)
    models = _Models(run_dir, weights or final_weight_set(run_dir), device)
    first = models.get(None)
    if samples_dir is None:
        samples_dir = Path(tempfile.mkdtemp(prefix="demo-samples-"))
        atexit.register(shutil.rmtree, samples_dir, ignore_errors=True)
    samples = sample_images(run_dir, models.default, samples_dir)
    top_k = min(TOP_K, len(first.class_names))

    def classify(path, weights_name):
        try:
            return _classify(models, path, weights_name)
        except InputError as error:
            raise gr.Error(" ".join(str(error).split()), print_exception=False) from None

    def card(weights_name):
        return card_markdown(models.get(weights_name))

    title = f"{first.card.get('dataset', 'model')}: {run_dir.name}"
    with gr.Blocks(title=f"Demo — {title}") as app:
        gr.Markdown(
            f"## {title}\nUpload an image (or pick a test sample) and press **Classify**. "
            f"It is brought to {_shape(first)} as in training; the bars are calibrated "
            "probabilities. A demonstration of a research model, not a diagnosis."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=280):
                image = _upload_box(
                    gr,
                    sources=["upload"],
                    type="filepath",
                    image_mode=None,
                    label="image",
                    height=260,
                    elem_id="image",
                )
                picker = gr.Radio(
                    models.names,
                    value=models.default,
                    label="weights",
                    info=f"{final_weight_set(run_dir)}: the run's final weights",
                    elem_id="weights",
                )
                button = gr.Button("Classify", variant="primary", elem_id="classify")
                if samples:
                    gr.Examples(
                        examples=[[str(path)] for path, _ in samples],
                        inputs=[image],
                        label="test samples: " + ", ".join(c.split(" (")[0] for _, c in samples),
                        examples_per_page=SAMPLES,
                    )
            with gr.Column(scale=4, min_width=280):
                label = gr.Label(num_top_classes=top_k, label="prediction", elem_id="label")
                cam = gr.Image(
                    label="input as the model sees it | Grad-CAM",
                    format="png",
                    interactive=False,
                    height=230,
                    elem_id="overlay",
                )
            # The card and this image's notes share a column: each is short, and together
            # they are about as tall as the other two columns.
            with gr.Column(scale=3, min_width=240):
                model_card = gr.Markdown(card_markdown(first), elem_id="card")
                notes = gr.Markdown(elem_id="notes")
        button.click(classify, [image, picker], [label, cam, notes], api_name=API_NAME)
        picker.change(card, [picker], [model_card], api_name=False)
    return app


# --------------------------------------------------------------------------- serving


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_port(host: str, port: int) -> None:
    """Raise :class:`DemoError` when ``port`` cannot be bound on ``host``, before Gradio tries
    (its own message speaks of a port range)."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            raise DemoError(
                f"port {port} on {host} is busy or not allowed ({error.strerror}); "
                "pick another with --port N, or --port 0 for any free port"
            ) from None


def launch(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    weights: str | None = None,
    device: str = "auto",
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> tuple[gr.Blocks, str]:
    """Build the page and serve it on ``host:port`` (0: any free port).

    Returns:
        ``(app, url)``; with ``prevent_thread_lock`` this returns while the server runs (call
        ``app.close()``), else only once it stops.

    Raises:
        DemoError: the port is busy.
    """
    if not 0 <= port <= 65535:
        raise DemoError(f"--port {port} is invalid; allowed: 0..65535")
    port = _free_port(host) if port == 0 else port
    _check_port(host, port)
    app = build_app(run_dir, weights, device)
    url = f"http://{host}:{port}/"
    if not quiet:
        print(f"demo of {run_dir} at {url} (Ctrl+C stops it)", flush=True)
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=MAX_FILE_SIZE,
        prevent_thread_lock=prevent_thread_lock,
        quiet=True,
        ssr_mode=False,
        inbrowser=False,
        share=False,
        theme=_theme(),
        css=CSS,
    )
    return app, url
