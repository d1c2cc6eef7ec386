"""New images to classify: find them, read them, and bring them to what a model was trained on.

An input is an image file, a folder (searched recursively for image files), or an ``.npz``
(every array whose key is ``images`` or ends in ``_images``, e.g. MedMNIST's ``test_images``;
``FILE.npz:KEY`` picks one array). Each image becomes one :class:`InputItem`; reading it gives
the ``(H, W, C)`` uint8 array the run's cache would hold:

* the channel count is the model's: colour is turned to grey for a 1-channel model (with a note),
  an alpha channel or a palette is dropped or expanded for a 3-channel one; a greyscale image is
  refused by a colour model, since its colours cannot be recovered;
* the size is the model's input size, resized with PIL's bicubic filter, as the folder reader
  of :mod:`dataset.sources` resizes images of another size (with a note).

An input that gives no image (a missing path, an unsupported format) is kept in its place as an
item with a ``problem``; a file that cannot be read raises :class:`InputError` with a one-line
reason. Either way the caller lists it and goes on with the rest.

Public API:
    IMAGE_SUFFIXES, InputItem, InputError, collect_inputs, read_item, conform.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dataset.sources import IMAGE_EXTENSIONS, high_depth_problem

#: File suffixes read as images (lower case): those the training folder reader takes.
IMAGE_SUFFIXES: tuple[str, ...] = tuple(sorted(IMAGE_EXTENSIONS))

#: 8-bit PIL modes whose pixels are one grey value (a colour model refuses them).
_GREY_MODES = frozenset({"1", "L", "LA", "La"})


class InputError(ValueError):
    """One input that cannot be classified; the message is its reason, on one line."""


@dataclass(frozen=True)
class InputItem:
    """One image to classify.

    Attributes:
        path: the file it comes from.
        key: for an ``.npz``, the array it is in; ``None`` for an image file.
        index: its row in that array (0 for an image file).
        array: that array, loaded once and shared by its rows.
        problem: why this input gives no image (then it is only listed), ``None`` when it may.
    """

    path: Path
    key: str | None = None
    index: int = 0
    array: np.ndarray | None = field(default=None, repr=False, compare=False)
    problem: str | None = None

    @property
    def name(self) -> str:
        """How the output names it: the path, or ``path:key[index]`` for an ``.npz`` row."""
        return str(self.path) if self.key is None else f"{self.path}:{self.key}[{self.index}]"


def collect_inputs(inputs: Iterable[str | Path]) -> list[InputItem]:
    """Expand files, folders and ``.npz`` archives into items, in a stable order: the inputs in
    the order given, a folder's files sorted by path, an archive's rows by array and index.

    An input that gives no image (a missing path, an unsupported format, an ``.npz`` without
    image arrays) is an item with its ``problem``, in its place. A folder's hidden files are
    passed over; its other non-image files are listed that way.
    """
    items: list[InputItem] = []
    for given in inputs:
        text = str(given)
        path, key = _split_npz_key(text)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if not any(part.startswith(".") for part in file.relative_to(path).parts):
                    items.extend(_file_items(file, None))
        elif path.is_file():
            items.extend(_file_items(path, key))
        else:
            items.append(InputItem(Path(text), problem="no such file or folder"))
    return items


def _split_npz_key(text: str) -> tuple[Path, str | None]:
    # FILE.npz:KEY, unless a file of that whole name exists.
    stem, sep, key = text.rpartition(":")
    if sep and stem.lower().endswith(".npz") and not Path(text).exists():
        return Path(stem), key
    return Path(text), None


def _file_items(path: Path, key: str | None) -> list[InputItem]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            return _npz_items(path, key)
        except InputError as error:
            return [InputItem(path, problem=str(error))]
    if suffix in IMAGE_SUFFIXES:
        return [InputItem(path)]
    shown = suffix or "no suffix"
    allowed = " ".join(IMAGE_SUFFIXES)
    return [InputItem(path, problem=f"unsupported format ({shown}); allowed: {allowed} .npz")]


def _npz_keys(archive: np.lib.npyio.NpzFile, key: str | None) -> list[str]:
    if key is not None:
        if key not in archive.files:
            raise InputError(f"has no array {key!r}; it holds {', '.join(archive.files)}")
        return [key]
    keys = [k for k in archive.files if k == "images" or k.endswith("_images")]
    if not keys:
        raise InputError(
            f"holds no image array (keys {', '.join(archive.files) or 'none'}); "
            "expected 'images' or '*_images', or name one as FILE.npz:KEY"
        )
    return keys


def _npz_items(path: Path, key: str | None) -> list[InputItem]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in _npz_keys(archive, key)}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"unreadable .npz: {_first_line(error)}") from None
    items = []
    for k, array in arrays.items():
        shape = array.shape
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
            raise InputError(
                f"array {k!r} has shape {shape}; allowed: (N, H, W) or (N, H, W, C), C 1, 3 or 4"
            )
        if array.dtype != np.uint8:
            raise InputError(f"array {k!r} has dtype {array.dtype}; allowed: uint8 (0-255)")
        items.extend(InputItem(path, k, i, array) for i in range(shape[0]))
    return items


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 160 else text[:157] + "..."


def read_item(item: InputItem) -> Image.Image:
    """The item as a PIL image (an ``.npz`` row as it is stored).

    Raises:
        InputError: the item has a ``problem``, or the file cannot be read as an image.
    """
    if item.problem is not None:
        raise InputError(item.problem)
    if item.array is not None:
        row = item.array[item.index]
        return Image.fromarray(row[..., 0] if row.ndim == 3 and row.shape[2] == 1 else row)
    try:
        with Image.open(item.path) as image:
            image.load()
            return image
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as error:  # a decompression bomb is not an OSError: listed, not fatal
        raise InputError(f"unreadable image: {_first_line(error)}") from None


def conform(image: Image.Image, channels: int, size: int) -> tuple[np.ndarray, list[str]]:
    """The image as the model's input: ``(size, size, channels)`` uint8, and notes on what changed.

    Raises:
        InputError: a greyscale image for a colour model, or a channel count other than 1 or 3.
    """
    notes = []
    mode = image.mode
    if problem := high_depth_problem(mode):
        raise InputError(problem)
    if channels == 1:
        if mode != "L":
            if mode not in _GREY_MODES:
                notes.append(f"converted {mode} to greyscale")
            image = image.convert("L")
    elif channels == 3:
        if mode in _GREY_MODES:
            raise InputError(
                f"greyscale image ({mode}); the model takes colour (RGB) images and its colours "
                "cannot be recovered"
            )
        if mode != "RGB":
            if "A" in mode:
                notes.append(f"dropped the alpha channel of {mode}")
            elif mode != "P":
                notes.append(f"converted {mode} to RGB")
            image = image.convert("RGB")
    else:
        raise InputError(f"the model takes {channels} channels; allowed: 1 or 3")
    if image.size != (size, size):
        notes.append(f"resized {image.size[0]}x{image.size[1]} to {size}x{size}")
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return (array[..., None] if array.ndim == 2 else array), notes
