"""The MedMNIST v3 2D datasets: official download URLs, MD5s and label names, by flag and size.

Values are those of the official ``medmnist`` package, version 3.0.2 (``medmnist/info.py`` in
github.com/MedMNIST/MedMNIST), whose files live in Zenodo record 10519652. Each flag comes in
four image sizes, 28 (the original MedMNIST file, ``{flag}.npz``) and 64/128/224
(``{flag}_{size}.npz``).

``fetch`` downloads one file into ``root/_downloads/`` with :func:`dataset.download.download`.
A mirror (or a local folder, as a ``file://`` URL) can stand in for Zenodo through the
``base_url`` argument or the ``MEDMNIST_BASE_URL`` environment variable; the file name and
the MD5 check stay the official ones.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dataset.download import download
from dataset.errors import DataError

__all__ = [
    "BASE_URL_ENV",
    "MEDMNIST",
    "MULTI_LABEL_TASK",
    "OFFICIAL_BASE_URL",
    "SIZES",
    "MedMNISTInfo",
    "fetch",
    "parse_name",
    "require_single_label",
]

SIZES = (28, 64, 128, 224)
OFFICIAL_BASE_URL = "https://zenodo.org/records/10519652/files"
BASE_URL_ENV = "MEDMNIST_BASE_URL"
# The task string the official table uses for ChestMNIST; the training code does not handle it.
MULTI_LABEL_TASK = "multi-label, binary-class"


@dataclass(frozen=True)
class MedMNISTInfo:
    """One MedMNIST 2D dataset.

    Args:
        flag: the lower-case name, e.g. ``"bloodmnist"``.
        class_names: one name per label index (for ChestMNIST: one per binary label).
        n_channels: 1 (gray) or 3 (RGB).
        task: the official task string: ``"multi-class"``, ``"binary-class"``,
            ``"ordinal-regression"`` or ``"multi-label, binary-class"``.
        urls: image size -> official download URL.
        md5: image size -> official MD5 of that file.
        n_samples: split name -> number of images (the same for every size).
    """

    flag: str
    class_names: tuple[str, ...]
    n_channels: int
    task: str
    urls: dict[int, str]
    md5: dict[int, str]
    n_samples: dict[str, int] = field(default_factory=dict)

    @property
    def multi_label(self) -> bool:
        """True when one image carries several binary labels (ChestMNIST)."""
        return self.task.startswith("multi-label")

    def filename(self, size: int) -> str:
        """The official file name for ``size``: ``bloodmnist.npz``, ``bloodmnist_64.npz``."""
        _check_size(self.flag, size)
        return self.urls[size].split("?", 1)[0].rsplit("/", 1)[-1]


def _entry(
    flag: str,
    class_names: tuple[str, ...],
    n_channels: int,
    task: str,
    md5: tuple[str, str, str, str],
    n_samples: tuple[int, int, int],
) -> MedMNISTInfo:
    """Build one table row; ``md5`` is given in the order of ``SIZES``."""
    urls = {
        size: f"{OFFICIAL_BASE_URL}/{flag}{'' if size == 28 else f'_{size}'}.npz?download=1"
        for size in SIZES
    }
    return MedMNISTInfo(
        flag=flag,
        class_names=class_names,
        n_channels=n_channels,
        task=task,
        urls=urls,
        md5=dict(zip(SIZES, md5, strict=True)),
        n_samples=dict(zip(("train", "val", "test"), n_samples, strict=True)),
    )


_ORGAN_CLASSES = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

# md5 columns: 28, 64, 128, 224.
_TABLE = (
    _entry(
        "pathmnist",
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
        3,
        "multi-class",
        (
            "a8b06965200029087d5bd730944a56c1",
            "55aa9c1e0525abe5a6b9d8343a507616",
            "ac42d08fb904d92c244187169d1fd1d9",
            "2c51a510bcdc9cf8ddb2af93af1eadec",
        ),
        (89996, 10004, 7180),
    ),
    _entry(
        "chestmnist",
        (
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ),
        1,
        MULTI_LABEL_TASK,
        (
            "02c8a6516a18b556561a56cbdd36c4a8",
            "9de6cd0b934ebb5b7426cfba5efbae16",
            "db107e5590b27930b62dbaf558aebee3",
            "45bd33e6f06c3e8cdb481c74a89152aa",
        ),
        (78468, 11219, 22433),
    ),
    _entry(
        "dermamnist",
        (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
        3,
        "multi-class",
        (
            "0744692d530f8e62ec473284d019b0c7",
            "b70a2f5635c6199aeaa28c31d7202e1f",
            "2defd784463fa5243564e855ed717de1",
            "8974907d8e169bef5f5b96bc506ae45d",
        ),
        (7007, 1003, 2005),
    ),
    _entry(
        "octmnist",
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        1,
        "multi-class",
        (
            "c68d92d5b585d8d81f7112f81e2d0842",
            "e229e9440236b774d9f0dfef9d07bdaf",
            "0a97e76651ace45c5d943ee3f65b63ae",
            "abc493b6d529d5de7569faaef2773ba3",
        ),
        (97477, 10832, 1000),
    ),
    _entry(
        "pneumoniamnist",
        ("normal", "pneumonia"),
        1,
        "binary-class",
        (
            "28209eda62fecd6e6a2d98b1501bb15f",
            "8f4eceb4ccffa70c672198ea285246c6",
            "05b46931834c231683c68f40c47b2971",
            "d6a3c71de1b945ea11211b03746c1fe1",
        ),
        (4708, 524, 624),
    ),
    _entry(
        "retinamnist",
        ("0", "1", "2", "3", "4"),
        3,
        "ordinal-regression",
        (
            "bd4c0672f1bba3e3a89f0e4e876791e4",
            "afda852cc34dcda56f86ad2b2457dbcc",
            "e48e916a24454daf90583d4e6efb1a18",
            "eae7e3b6f3fcbda4ae613ebdcbe35348",
        ),
        (1080, 120, 400),
    ),
    _entry(
        "breastmnist",
        ("malignant", "normal, benign"),
        1,
        "binary-class",
        (
            "750601b1f35ba3300ea97c75c52ff8f6",
            "742edef2a1fd1524b2efff4bd7ba9364",
            "363e4b3f8d712e9b5de15470a2aaadf1",
            "b56378a6eefa9fed602bb16d192d4c8b",
        ),
        (546, 78, 156),
    ),
    _entry(
        "bloodmnist",
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
        3,
        "multi-class",
        (
            "7053d0359d879ad8a5505303e11de1dc",
            "2b94928a2ae4916078ca51e05b6b800b",
            "adace1e0ed228fccda1f39692059dd4c",
            "b718ff6835fcbdb22ba9eacccd7b2601",
        ),
        (11959, 1712, 3421),
    ),
    _entry(
        "tissuemnist",
        (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
        1,
        "multi-class",
        (
            "ebe78ee8b05294063de985d821c1c34b",
            "123ece2eba09d0aa5d698fda57103344",
            "61b955355d7425a89687b06cca3ce0c2",
            "b077128c4a949f0a4eb01517f9037b9c",
        ),
        (165466, 23640, 47280),
    ),
    _entry(
        "organamnist",
        _ORGAN_CLASSES,
        1,
        "multi-class",
        (
            "68e3f8846a6bd62f0c9bf841c0d9eacc",
            "2dcccc29b88e6da5a01161ef20cda288",
            "eeae80d0a227a8d099027e1b3cfd3b60",
            "50747347e05c87dd3aaf92c49f9f3170",
        ),
        (34561, 6491, 17778),
    ),
    _entry(
        "organcmnist",
        _ORGAN_CLASSES,
        1,
        "multi-class",
        (
            "b9ceb9546e10131b32923c5bbeaea2b1",
            "3ce34a8724ea6f548e6db4744d03b6a9",
            "773c1f009daa3fe5d9a2a201b2a7ed94",
            "050f5e875dc056f6768abf94ec9995d1",
        ),
        (12975, 2392, 8216),
    ),
    _entry(
        "organsmnist",
        _ORGAN_CLASSES,
        1,
        "multi-class",
        (
            "9ab87b696fb54e2a387ebe992d6ed5f1",
            "53a6d115339d874c25e309a994ff46d3",
            "ded0c5fa01a95dc4978b956f613e9b8e",
            "b354719e553fbbb2513d5533f52a4cb1",
        ),
        (13932, 2452, 8827),
    ),
)

MEDMNIST: dict[str, MedMNISTInfo] = {info.flag: info for info in _TABLE}

_NAME_RE = re.compile(r"([a-z]+mnist)(?:[_-]?(\d+))?")
_SIZES_TEXT = ", ".join(str(s) for s in SIZES)


def _check_size(flag: str, size: int) -> None:
    if size not in SIZES:
        raise DataError(flag, f"MedMNIST has no image size {size}; choose one of {_SIZES_TEXT}")


def _info(flag: str) -> MedMNISTInfo:
    info = MEDMNIST.get(flag.lower())
    if info is None:
        raise DataError(flag, f"not a MedMNIST 2D flag; known flags: {', '.join(MEDMNIST)}")
    return info


def parse_name(name: str) -> tuple[str, int] | None:
    """Read a MedMNIST dataset name such as ``bloodmnist``, ``bloodmnist_64``, ``BloodMNIST64``.

    Returns:
        ``(flag, size)`` with size 28 when none is given, or ``None`` when ``name`` is not a
        MedMNIST 2D flag (so the caller can try other kinds of source).

    Raises:
        DataError: a known flag with a size other than 28, 64, 128 or 224.
    """
    match = _NAME_RE.fullmatch(name.strip().lower())
    if match is None or match.group(1) not in MEDMNIST:
        return None
    flag = match.group(1)
    size = int(match.group(2)) if match.group(2) else 28
    _check_size(name, size)
    return flag, size


def require_single_label(flag: str) -> MedMNISTInfo:
    """The table entry for ``flag``; a DataError when it is a multi-label dataset (ChestMNIST)."""
    info = _info(flag)
    if info.multi_label:
        raise DataError(
            info.flag,
            f"is a multi-label dataset ({info.task}, {len(info.class_names)} labels per image); "
            "only single-label datasets are supported for now",
        )
    return info


def fetch(
    flag: str,
    size: int,
    root: Path,
    *,
    progress: bool = True,
    base_url: str | None = None,
) -> Path:
    """Download the official ``.npz`` of ``flag`` at ``size`` into ``root/_downloads/``.

    Args:
        flag: a key of :data:`MEDMNIST` (case-insensitive).
        size: 28, 64, 128 or 224.
        root: the data folder; the file goes to ``root/_downloads/<official file name>``.
        progress: show a progress bar.
        base_url: a mirror that replaces ``https://zenodo.org/records/10519652/files``: an
            ``http(s)://`` or ``file://`` URL of a folder holding the official file names.
            Defaults to the ``MEDMNIST_BASE_URL`` environment variable, then to Zenodo.

    Returns:
        The path of the verified file; an already downloaded file with the right MD5 is reused.
    """
    info = _info(flag)
    _check_size(info.flag, size)
    name = info.filename(size)
    mirror = base_url or os.environ.get(BASE_URL_ENV) or None
    url = info.urls[size] if mirror is None else f"{mirror.rstrip('/')}/{name}"
    return download(url, Path(root) / "_downloads" / name, info.md5[size], progress=progress)
