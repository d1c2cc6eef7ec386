"""Readers for the sources users bring: a MedMNIST-layout ``.npz`` and an image-folder tree.

Each reader validates what it reads and returns a :class:`RawSplits`: uint8 NHWC images and
int64 labels per split. Problems raise :class:`~dataset.errors.DataError` with a one-line message
that names the file (or folder) and what is wrong.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dataset.errors import DataError

SPLITS = ("train", "val", "test")
#: the ``origin`` :func:`check_classes` gets when nothing names the classes.
FROM_HIGHEST_LABEL = "the highest train label + 1"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
#: PIL modes of more than 8 bits per pixel (16-bit PNG/TIFF scans, 32-bit int or float): their
#: range (12-bit data in 16 bits, say) is not known, and PIL's conversion to 8 bits clips at 255,
#: so such an image is refused rather than silently saturated.
HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def high_depth_problem(mode: str) -> str | None:
    """Why an image of PIL ``mode`` is refused (one line), or ``None`` for an 8-bit mode."""
    if mode not in HIGH_DEPTH_MODES:
        return None
    return (
        f"{mode} image (more than 8 bits per pixel): its value range is unknown, and cutting it "
        "to 8 bits would saturate it; convert it to 8-bit first"
    )


# Folder names that mark a split, lower-cased; anything else under the root is a class folder.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class RawSplits:
    """Validated arrays of one source, before the cache is written.

    Args:
        images: split name -> uint8 array ``(N, H, W, C)``; ``val`` may be missing.
        labels: split name -> int64 array ``(N,)`` with values in ``0..C-1``.
        class_names: one name per class, index = label.
        files: split name -> the original file of each image, where the source knows it.
        notes: things the reader changed or noticed (resized images, say), for the report.
    """

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: list[str]
    files: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- npz


def read_npz(path: str | Path, class_names: list[str] | None = None) -> RawSplits:
    """Read and validate a MedMNIST-layout ``.npz``.

    Args:
        path: the file. Keys ``train_images``, ``train_labels``, ``test_images``,
            ``test_labels`` are required; ``val_images``/``val_labels`` are optional (an empty
            val split counts as absent); ``class_names`` and ``{split}_files`` are used if there.
        class_names: names to use when the file carries none (a MedMNIST flag knows its own).

    The class count ``C`` is the number of names (the ``class_names`` key, then the
    ``class_names`` argument, then the folders of ``train_files``), or else the highest train
    label + 1; it must be at least 2, labels must lie in ``0..C-1`` and every class must occur
    in train (:func:`check_classes`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except PermissionError as exc:
        raise DataError(path, f"cannot read the file: {exc.strerror}") from exc
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(
            path, f"not a readable .npz archive (truncated or corrupt?): {exc}"
        ) from exc
    with archive:
        keys = set(archive.files)
        required = ["train_images", "train_labels", "test_images", "test_labels"]
        if "val_images" in keys or "val_labels" in keys:
            required += ["val_images", "val_labels"]
        missing = [k for k in required if k not in keys]
        if missing:
            raise DataError(
                path, f"missing key {missing[0]!r} (keys present: {', '.join(sorted(keys))})"
            )
        arrays = {k: _read_member(archive, path, k) for k in required}
        names = _read_member(archive, path, "class_names") if "class_names" in keys else None
        files = {
            s: [str(f) for f in _read_member(archive, path, f"{s}_files")]
            for s in SPLITS
            if f"{s}_files" in keys
        }

    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for split in SPLITS:
        if f"{split}_images" not in arrays:
            continue
        img = _check_images(arrays[f"{split}_images"], path, f"{split}_images")
        lab = _check_labels(arrays[f"{split}_labels"], path, f"{split}_labels", len(img))
        if len(img) == 0:
            if split == "val":
                continue  # an empty val split is carved from train later
            raise DataError(path, f"split {split!r} is empty ({split}_images has 0 images)")
        images[split], labels[split] = img, lab
    _check_same_shape(images, path)

    if names is not None:
        class_names, origin = [str(n) for n in names], "the class_names key"
    elif class_names is not None:
        origin = "the dataset's class list"
    elif (from_files := _names_from_files(files, labels)) is not None:
        class_names, origin = from_files, "the folders of train_files"
    else:
        class_names, origin = _names_from_labels(labels), FROM_HIGHEST_LABEL
    check_classes(labels, list(class_names), path, origin)
    files = {s: f for s, f in files.items() if s in images and len(f) == len(images[s])}
    return RawSplits(images=images, labels=labels, class_names=list(class_names), files=files)


def _read_member(archive, path: Path, key: str) -> np.ndarray:
    # Members are decompressed lazily, so a damaged member only shows up here.
    try:
        return archive[key]
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as exc:
        raise DataError(path, f"key {key!r} cannot be read (truncated or corrupt?): {exc}") from exc


def _check_images(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise DataError(path, f"{key} has dtype {arr.dtype}, expected uint8")
    if arr.ndim == 3:
        arr = arr[..., None]  # (N, H, W) -> (N, H, W, 1)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(
            path,
            f"{key} has shape {tuple(arr.shape)}, expected (N, H, W) or (N, H, W, C) with C 1 or 3",
        )
    if min(arr.shape[1:3]) < 1:
        # Zero-pixel images would give NaN channel statistics and no input for a model.
        raise DataError(
            path,
            f"{key} has shape {tuple(arr.shape)}: images of {arr.shape[1]}x{arr.shape[2]} "
            "pixels, allowed: at least 1x1",
        )
    return arr


def _check_labels(arr: np.ndarray, path: Path, key: str, n_images: int) -> np.ndarray:
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]  # MedMNIST stores (N, 1)
    if arr.ndim != 1:
        raise DataError(
            path,
            f"{key} has shape {tuple(arr.shape)}, expected (N,) or (N, 1) "
            "(multi-label data is not supported)",
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(path, f"{key} has dtype {arr.dtype}, expected an integer type")
    if len(arr) != n_images:
        raise DataError(path, f"{key} has {len(arr)} labels for {n_images} images")
    return arr.astype(np.int64)


def _check_same_shape(images: dict[str, np.ndarray], path: Path) -> None:
    shapes = {s: tuple(a.shape[1:]) for s, a in images.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{s} {shape}" for s, shape in shapes.items())
        raise DataError(path, f"image shapes differ between splits: {desc}")


def check_classes(
    labels: dict[str, np.ndarray], class_names: list[str], source: Path, origin: str
) -> None:
    """Refuse labels outside ``0..C-1`` and classes with no image in train.

    ``C`` is ``len(class_names)``; ``origin`` says where that count came from (the
    ``class_names`` key, folder names, or the highest train label + 1), for the message. A
    class absent from train cannot be learnt, and a stray high label (99 among 0..7) would
    otherwise make dozens of empty classes.
    """
    n = len(class_names)
    if n < 2:
        raise DataError(
            source, f"found {n} class(es) (from {origin}), need at least 2 for a classifier"
        )
    _check_label_range(labels, n, source)
    missing = np.flatnonzero(np.bincount(labels["train"], minlength=n) == 0)
    if len(missing) and origin == FROM_HIGHEST_LABEL and missing[0] > 0 and missing[-1] == n - 2:
        # The count came from the highest label, and the labels just below it are absent: that
        # label (99 among 0..7) stands apart and is the likely typo, not 92 empty classes.
        stray = [int(y) for y in np.unique(labels["train"]) if y > missing[0]]
        absent = (
            f"label {missing[0]} has" if len(missing) == 1 else f"labels {_spans(missing)} have"
        )
        raise DataError(
            source,
            f"the highest train label is {n - 1} while {absent} no image: "
            f"labels must be 0..C-1 with every class in train, so {_listed(stray)} "
            f"{'looks like a stray label' if len(stray) == 1 else 'look like stray labels'} "
            f"(as read, {n} classes with {len(missing)} of them empty)",
        )
    if len(missing):
        y = int(missing[0])
        name = "" if class_names[y] == str(y) else f" ({class_names[y]!r})"
        raise DataError(
            source,
            f"split 'train' has no image of label {y}{name}; labels must be 0..{n - 1} "
            f"({n} classes, from {origin}) with every class in train "
            f"({len(missing)} of {n} classes missing)",
        )


def _check_label_range(labels: dict[str, np.ndarray], n_classes: int, path: Path) -> None:
    for split, lab in labels.items():
        bad = lab[(lab < 0) | (lab >= n_classes)]
        if len(bad):
            raise DataError(
                path,
                f"{split}_labels has value {int(bad[0])} outside 0..{n_classes - 1} "
                f"({len(bad)} such labels, {n_classes} classes)",
            )


def _spans(values: np.ndarray, most: int = 4) -> str:
    """Sorted integers as ranges: ``[3, 4, 5, 9]`` -> ``"3..5, 9"``; past ``most`` ranges, "..."."""
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    runs = np.split(values, breaks)
    text = [f"{r[0]}" if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs[:most]]
    return ", ".join(text) + (", ..." if len(runs) > most else "")


def _listed(values: list[int], most: int = 4) -> str:
    return ", ".join(map(str, values[:most])) + (", ..." if len(values) > most else "")


def _names_from_labels(labels: dict[str, np.ndarray]) -> list[str]:
    n = int(labels["train"].max()) + 1 if len(labels["train"]) else 0
    return [str(i) for i in range(n)]


def _names_from_files(
    files: dict[str, list[str]], labels: dict[str, np.ndarray]
) -> list[str] | None:
    """Class names from ``class/filename`` entries, when every label maps to one folder."""
    if "train" not in files or len(files["train"]) != len(labels["train"]):
        return None
    folder_of: dict[int, set[str]] = {}
    for f, y in zip(files["train"], labels["train"].tolist(), strict=True):
        if "/" not in f:
            return None
        folder_of.setdefault(y, set()).add(f.split("/", 1)[0])
    n = max(folder_of) + 1
    if any(len(folder_of.get(y, ())) != 1 for y in range(n)):
        return None
    return [next(iter(folder_of[y])) for y in range(n)]


# ------------------------------------------------------------------------ folder


def read_folder(
    root: str | Path,
    *,
    image_size: int | None = None,
    strict_size: bool = False,
) -> tuple[RawSplits, bool]:
    """Read an image-folder tree with one sub-folder per class.

    Either ``root/<split>/<class>/*`` with split folders named train/val/test (or
    Training/Testing, case-insensitive), or ``root/<class>/*`` without them.

    Args:
        root: the top folder.
        image_size: resize every image to this square size; ``None`` keeps the most common
            size and resizes the others to it (reported in ``notes``).
        strict_size: refuse mismatched sizes instead of resizing (the error names a file).

    Returns:
        The splits found, and whether the tree had split folders (if not, all images are in
        ``train`` and the caller carves val and test).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "folder not found")
    split_dirs = {
        SPLIT_FOLDERS[d.name.lower()]: d for d in _subdirs(root) if d.name.lower() in SPLIT_FOLDERS
    }
    has_splits = bool(split_dirs)
    if not has_splits:
        split_dirs = {"train": root}
    if "train" not in split_dirs:
        found = ", ".join(d.name for d in split_dirs.values())
        raise DataError(root, f"split folders {found} but no train folder (train or Training)")
    listing = {split: _list_classes(d) for split, d in split_dirs.items()}
    class_names = sorted({c for classes in listing.values() for c in classes})
    if len(class_names) < 2:
        raise DataError(root, f"found {len(class_names)} class folder(s), need at least 2")
    # Checked on the listing, before any image is decoded.
    listed_labels = {
        split: np.repeat(
            np.arange(len(class_names)), [len(classes.get(c, [])) for c in class_names]
        )
        for split, classes in listing.items()
    }
    check_classes(listed_labels, class_names, split_dirs["train"], "the class folder names")

    headers = {
        split: [(p, _image_header(p)) for c in class_names for p in classes.get(c, [])]
        for split, classes in listing.items()
    }
    for path, (m, _) in (item for hs in headers.values() for item in hs):
        if problem := high_depth_problem(m):
            raise DataError(path, problem)
    mode = (
        "L" if all(m in ("L", "1", "LA") for hs in headers.values() for _, (m, _) in hs) else "RGB"
    )
    sizes = Counter(size for hs in headers.values() for _, (_, size) in hs)
    target = (image_size, image_size) if image_size else sizes.most_common(1)[0][0]
    odd = [(p, s) for hs in headers.values() for p, (_, s) in hs if s != target]
    if strict_size and odd:
        (path, (w, h)) = odd[0]
        raise DataError(
            path,
            f"image size {w}x{h} differs from {target[0]}x{target[1]} "
            f"({len(odd)} such images; drop --strict-size to resize them)",
        )

    images, labels, files, resized = {}, {}, {}, 0
    for split, classes in listing.items():
        arrs, labs, names = [], [], []
        for y, c in enumerate(class_names):
            for p in classes.get(c, []):
                arr, changed = _load_image(p, mode, target)
                resized += changed
                arrs.append(arr)
                labs.append(y)
                names.append(f"{c}/{p.name}")
        if not arrs:
            raise DataError(split_dirs[split], f"split {split!r} has no images")
        images[split] = np.stack(arrs)
        labels[split] = np.asarray(labs, dtype=np.int64)
        files[split] = names
    notes = []
    if resized:
        notes.append(
            f"resized {resized} image(s) of other sizes to {target[0]}x{target[1]} (width x height)"
        )
    return RawSplits(images, labels, class_names, files, notes), has_splits


def _subdirs(folder: Path) -> list[Path]:
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise DataError(folder, f"cannot list the folder: {exc.strerror or exc}") from exc
    return sorted(d for d in entries if d.is_dir() and not d.name.startswith("."))


def _files_under(folder: Path) -> list[Path]:
    """Every file below ``folder``; a sub-folder that cannot be listed is an error.

    ``Path.rglob`` skips unreadable folders silently, which would make a class folder the
    user cannot read look empty.
    """

    def refuse(exc: OSError) -> None:
        where = exc.filename or folder
        raise DataError(where, f"cannot list the folder: {exc.strerror or exc}") from exc

    return [Path(top) / name for top, _, names in os.walk(folder, onerror=refuse) for name in names]


def _list_classes(split_dir: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in _subdirs(split_dir):
        found = sorted(
            p for p in _files_under(d) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not found:
            raise DataError(
                d,
                "class folder has no images (looked for "
                + ", ".join(sorted(IMAGE_EXTENSIONS))
                + ")",
            )
        classes[d.name] = found
    if not classes:
        raise DataError(split_dir, "no class folders found (expected one sub-folder per class)")
    return classes


def _image_header(path: Path) -> tuple[str, tuple[int, int]]:
    # Image.open reads the header only: cheap, and enough to pick a common size and mode.
    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(path, f"unreadable image: {exc}") from exc


def _load_image(path: Path, mode: str, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            changed = im.size != size
            if changed:
                im = im.resize(size, Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"unreadable image: {exc}") from exc
    return (arr[..., None] if arr.ndim == 2 else arr), changed


# ---------------------------------------------------------------------- embedded


@dataclass(frozen=True)
class EmbeddedSample:
    """A small dataset shipped inside the package (``dataset/default/``), usable by name.

    Args:
        name: the short name that stands for it as a source, e.g. ``"bloodcells_mini"``.
        filename: its MedMNIST-layout ``.npz`` in ``dataset/default/``.
        description: what it holds, in a few words, for start-up messages.
    """

    name: str
    filename: str
    description: str

    @property
    def path(self) -> Path:
        return EMBEDDED_DIR / self.filename


# Beside this module, so an installed package finds it whatever the working directory.
EMBEDDED_DIR = Path(__file__).resolve().parent / "default"
EMBEDDED: dict[str, EmbeddedSample] = {
    sample.name: sample
    for sample in (
        EmbeddedSample(
            "bloodcells_mini",
            "bloodcells_mini.npz",
            "3,000 of the 17,092 PBC blood-cell images, 28x28, 8 classes, CC BY 4.0",
        ),
    )
}


def embedded_sample(source: str | Path) -> EmbeddedSample | None:
    """The embedded sample that ``source`` names, or ``None``.

    A file or folder of that name in the working directory wins over the sample, as it does
    over a MedMNIST name.
    """
    sample = EMBEDDED.get(str(source).strip().lower())
    if sample is None or Path(source).exists():
        return None
    if not sample.path.is_file():
        raise DataError(
            sample.path, f"the embedded sample {sample.name!r} is missing from the package"
        )
    return sample
