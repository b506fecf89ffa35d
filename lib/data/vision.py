"""Image classification tasks: eight standard datasets and a user's folder of images.

``load_vision_task(name)`` returns a ``VisionTask`` of uint8 ``[N, H, W, C]`` arrays as
stored. The standard datasets are read from ``<mirror>/vision/<name>.npz`` (keys
``x_train, y_train, x_test, y_test, classes``) or, without a mirror, downloaded once into
``download_dir()/vision`` (with torchvision; MNIST-M from its PNG distribution on GitHub)
and converted to an ``.npz`` in the same format, which later runs read directly.
``prepare_images`` turns the arrays into normalised float tensors for a network.

A standard dataset's ``.npz`` is checked as it is read: an archive that is truncated or damaged
(zip CRC errors, data that is not an ``.npz``), images that are not uint8 ``[N, H, W, C]``,
labels that are not integers (float labels would be truncated) or outside the classes, are
errors naming the file and how to repair it (re-copy the mirror, or download anew).

A user's folder is read strictly: an empty class folder or an unreadable image is an error
naming it; hidden and non-image files are listed in the notes; class folders are in natural
order (``2`` before ``10``) or in the order a ``task.yaml`` gives.
"""
from __future__ import annotations

import difflib
import os
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..paths import data_mirror, download_dir
from .splits import carve, carving_note, check_classes, per_class_note, seed_note, stratified_split
from .task_description import find_task_description, ignored_note, is_description
from .text import download_first

VISION_TASKS: tuple[str, ...] = (
    "mnist", "fashion_mnist", "usps", "gtsrb", "cifar10", "eurosat", "kmnist", "mnist_m"
)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Class names, the same whether the data comes from the mirror or from the public source.
_CLASSES: dict[str, list[str]] = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
    ],
    "usps": [str(d) for d in range(10)],
    "gtsrb": [str(c) for c in range(43)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    # torchvision's EuroSAT is an ImageFolder: the class folders in sorted order.
    "eurosat": [
        "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
        "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
    ],
    # Kuzushiji-MNIST: the romanised hiragana お き す つ な は ま や れ を.
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
    "mnist_m": [str(d) for d in range(10)],
}
# torchvision class name per task, the image size a download is resized to (None: keep) and
# the filter. MNIST-M is not in torchvision (see _mnist_m_arrays).
_TORCHVISION: dict[str, tuple[str, int | None, str]] = {
    "mnist": ("MNIST", None, "bilinear"),
    "fashion_mnist": ("FashionMNIST", None, "bilinear"),
    "usps": ("USPS", None, "bilinear"),
    "gtsrb": ("GTSRB", 32, "bilinear"),  # photos of varying size; the mirror stores them at 32x32
    "cifar10": ("CIFAR10", None, "bilinear"),
    "eurosat": ("EuroSAT", 32, "lanczos"),  # 64x64 RGB, resized as the mirror's copy was
    "kmnist": ("KMNIST", None, "bilinear"),
}
# EuroSAT has no official split: a seeded, class-stratified 80/20 split of all 27,000 images.
EUROSAT_TEST_FRACTION, EUROSAT_SPLIT_SEED = 0.2, 0
# MNIST-M (Ganin & Lempitsky 2015) as PNGs: mnist_m/mnist_m_{train,test}/<file>.png with
# mnist_m/mnist_m_{train,test}_labels.txt lines "<file> <label>". The repository's archive is
# one download instead of 68,002 files; its default branch is tried under both usual names.
MNIST_M_REPOSITORY = "ShichengChen/Domain-Adversarial-Training-of-Neural-Networks"
MNIST_M_URLS = tuple(
    f"https://github.com/{MNIST_M_REPOSITORY}/archive/refs/heads/{branch}.zip" for branch in ("master", "main")
)
# Where the data of a download comes from, for the notes.
_DOWNLOAD_SOURCE = {name: f"torchvision.datasets.{spec[0]}" for name, spec in _TORCHVISION.items()}
_DOWNLOAD_SOURCE["mnist_m"] = f"the MNIST-M PNGs of github.com/{MNIST_M_REPOSITORY}"
_DOWNLOAD_NOTES = {
    "eurosat": f"no official split: seeded (seed {EUROSAT_SPLIT_SEED}) class-stratified 80/20 split of all "
    "27,000 images, resized from 64x64 to 32x32 with PIL Lanczos",
}
# What the mirror's files are, where they are not the full dataset.
_MIRROR_SUBSETS = {
    "cifar10": "mirror cifar10.npz is a class-balanced seeded subset of CIFAR-10 (full: 50,000 / 10,000) "
    "with pixels decoded from a JPEG copy (slightly lossy): label results as subset numbers",
    "gtsrb": "mirror gtsrb.npz is a class-stratified seeded subset of GTSRB (full: 26,640 / 12,630), "
    "resized to 32x32: label results as subset numbers",
    "eurosat": "mirror eurosat.npz is a class-stratified seeded subset (12,000 / 3,000) of a seeded "
    "class-stratified 80/20 split of all 27,000 EuroSAT RGB images (full split: 21,600 / 5,400), resized "
    "from 64x64 to 32x32 with PIL Lanczos: label results as subset numbers",
    "kmnist": "mirror kmnist.npz is KMNIST's official 10,000-image TEST set only, re-split seeded and "
    "class-stratified 80/20 (8,000 / 2,000); the official 60,000-image training set is not in it: label "
    "results as a re-split of the KMNIST test set, not comparable with published KMNIST numbers",
    "mnist_m": "mirror mnist_m.npz is a class-stratified seeded subset of MNIST-M (6,000 / 1,500 of its "
    "59,001 / 9,001 split): label results as subset numbers",
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass(frozen=True, eq=False)
class ImageSplit:
    images: np.ndarray  # uint8 [N, H, W, C] as stored
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices) -> "ImageSplit":
        """The examples at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSplit(self.images[indices], self.labels[indices])


@dataclass(frozen=True, eq=False)
class VisionTask:
    name: str
    classes: list[str]
    train: ImageSplit
    validation: ImageSplit
    test: ImageSplit
    notes: tuple[str, ...]
    metric: str = "accuracy"  # a name understood by lib.metrics.official_metric

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_vision_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
) -> VisionTask:
    """Load an image task by name (see ``VISION_TASKS``) or from a folder of class folders.

    The validation split is a seeded, class-stratified 10% of the training data (another
    seed gives another split). A folder is ``<dir>/<class>/*.png|jpg`` (split 80/10/10) or
    ``<dir>/train/<class>/...`` plus optionally ``<dir>/validation/`` (or ``val/``) and
    ``<dir>/test/`` laid out the same; a ``task.yaml`` in it may give the name, the class
    order, the metric and the carved fractions (``lib.data.task_description``). Class folders
    are in natural order (``2`` before ``10``) unless ``classes`` says otherwise. Its images
    are resized to ``image_size`` (default: the first image's size). ``image_size`` is ignored
    for the standard datasets, which are returned as stored.
    """
    key = str(name).lower()
    if key in VISION_TASKS:
        path, source, from_mirror = _npz_file(key, data_dir)
        x_train, y_train, x_test, y_test, classes = _read_npz(path, _npz_repair(key, data_dir))
        notes = [f"source: {source}"]
        if not from_mirror:
            notes.append(
                "full dataset from the public source: the offline mirror holds subsets of CIFAR-10, GTSRB, "
                "EuroSAT, KMNIST and MNIST-M, so numbers differ from runs on the mirror"
            )
            if key in _DOWNLOAD_NOTES:
                notes.append(_DOWNLOAD_NOTES[key])
        elif key in _MIRROR_SUBSETS:
            notes.append(_MIRROR_SUBSETS[key])
        train, test = ImageSplit(x_train, y_train), ImageSplit(x_test, y_test)
        return _with_validation(key, classes, train, test, seed, notes)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_image_folder(path, seed, image_size)
    if path.exists():
        raise ValueError(f"{path} is a file; an image task is a folder of class folders of images (<dir>/<class>/*.png).")
    if "/" in str(name) or os.sep in str(name):
        raise FileNotFoundError(f"{path}: no such folder (it looks like a path to your own images).")
    close = difflib.get_close_matches(key, VISION_TASKS, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Unknown vision task {name!r}.{hint} Known tasks: {', '.join(VISION_TASKS)}. "
        "A path to a folder of class sub-folders of images also works."
    )


def _with_validation(name, classes, train: ImageSplit, test: ImageSplit, seed: int, notes: list) -> VisionTask:
    """A task whose validation split is a seeded, class-stratified 10% of ``train``."""
    rest, validation = stratified_split(train.labels, (0.1,), seed)
    notes.append(f"validation = seeded class-stratified 10% of train {seed_note(seed)}")
    return VisionTask(name, list(classes), train.take(rest), train.take(validation), test, tuple(notes))


# --- the standard datasets: mirror .npz or torchvision download --------------------------


def _npz_file(name: str, data_dir) -> tuple[Path, str, bool]:
    """The ``.npz`` of a standard dataset, a note on its source, and whether it is the mirror's."""
    mirror = data_mirror(data_dir)
    if mirror is not None:
        path = mirror / "vision" / f"{name}.npz"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing from the data mirror {mirror}. Expected layout: "
                "<mirror>/vision/<name>.npz with keys x_train, y_train, x_test, y_test, classes "
                f"for each of {', '.join(VISION_TASKS)}. Fix the mirror (or DATA_DIR), or unset "
                "DATA_DIR to download from the public source."
            )
        return path, f"mirror {path}", True
    path = download_dir() / "vision" / f"{name}.npz"
    if path.is_file():
        return path, f"download from {_DOWNLOAD_SOURCE[name]} converted earlier to {path}", False
    _download_npz(name, path)
    return path, f"downloaded from {_DOWNLOAD_SOURCE[name]} and saved as {path}", False


def _npz_repair(name: str, data_dir) -> str:
    """How to get a good copy of a standard dataset's ``.npz`` back, for an error message."""
    if data_mirror(data_dir) is not None:  # _npz_file reads only the mirror when there is one
        return (f"Copy {name}.npz again into the mirror (see the data README for its source), or unset "
                "DATA_DIR to download it from the public source.")
    return "Delete it and run again: it is downloaded and converted anew."


# What np.load raises for an archive that is truncated or damaged: BadZipFile (also for a bad
# CRC), zlib.error (damaged compressed data), EOFError (an empty file), and ValueError/OSError
# when the bytes are not a zip at all, so numpy falls back to reading a pickle and refuses.
_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


def _read_npz(path: Path, repair: str = "Replace it with a good copy."):
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            # read every array here, inside the try: a damaged member fails only when it is decompressed
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes") if k in names}
    except _NPZ_ERRORS as err:
        if "allow_pickle" in str(err) and zipfile.is_zipfile(path):  # an intact archive with an object array
            raise ValueError(f"{path} stores an array as Python objects (a pickle), which is not loaded, for "
                             "safety. Save every array as numbers or strings, e.g. classes=np.array(names, "
                             "dtype=str).") from None
        raise ValueError(f"{path} is truncated, damaged or not an .npz archive ({type(err).__name__}: {err}). "
                         f"{repair}") from None
    missing = {"x_train", "y_train", "x_test", "y_test", "classes"} - set(arrays)
    if missing:
        expected = "x_train, y_train, x_test, y_test, classes"
        raise ValueError(f"{path}: missing keys {sorted(missing)}; expected {expected}. {repair}")
    x_train, y_train, x_test, y_test = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    classes = [str(c) for c in arrays["classes"]]
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{path}: x_{split} must be uint8 [N,H,W,C] and y_{split} [N]; "
                f"got {x.dtype} {x.shape} and {y.dtype} {y.shape}. {repair}"
            )
        if not np.issubdtype(y.dtype, np.integer):  # float labels would be truncated to integers
            raise ValueError(f"{path}: y_{split} holds {y.dtype} labels; class labels are integers 0..C-1. "
                             f"{repair}")
        if len(y) == 0:
            raise ValueError(f"{path}: x_{split} and y_{split} are empty. {repair}")
        if y.min() < 0 or y.max() >= len(classes):
            raise ValueError(f"{path}: y_{split} has labels outside 0..{len(classes) - 1}. {repair}")
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), classes


def _to_uint8_hwc(image, size: int | None, resample: str = "bilinear") -> np.ndarray:
    """One PIL image, as torchvision returns it with no transform -> uint8 [H, W, C]."""
    from PIL import Image

    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), getattr(Image.Resampling, resample.upper()))
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _dataset_arrays(dataset, size: int | None, resample: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    # Indexing the dataset (rather than reading its private arrays) works for all the
    # classes alike: with no transform each item is (PIL image, integer label).
    images, labels = [], []
    for i in range(len(dataset)):
        image, label = dataset[i]
        images.append(_to_uint8_hwc(image, size, resample))
        labels.append(int(label))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _torchvision_arrays(name: str, root: Path) -> tuple[np.ndarray, ...]:
    """``x_train, y_train, x_test, y_test`` of a torchvision dataset, downloaded into ``root``."""
    import torchvision.datasets

    class_name, size, resample = _TORCHVISION[name]
    dataset_class = getattr(torchvision.datasets, class_name)
    if class_name == "EuroSAT":
        # One set of 27,000 images and no official split: split it as the mirror's copy was.
        x, y = _dataset_arrays(dataset_class(root, download=True), size, resample)
        train, test = stratified_split(y, (EUROSAT_TEST_FRACTION,), EUROSAT_SPLIT_SEED)
        return x[train], y[train], x[test], y[test]
    if class_name == "GTSRB":
        train, test = (dataset_class(root, split=s, download=True) for s in ("train", "test"))
    else:
        train, test = (dataset_class(root, train=t, download=True) for t in (True, False))
    return (*_dataset_arrays(train, size, resample), *_dataset_arrays(test, size, resample))


def _mnist_m_arrays(root: Path) -> tuple[np.ndarray, ...]:
    """MNIST-M's own train/test split, from the PNGs in a GitHub repository's archive.

    The archive (one zip of the whole repository) is kept in ``root``; images are read from
    it without unpacking. Its images are 32x32 RGB; any other size is resized to 32x32.
    """
    import io
    import zipfile

    from PIL import Image

    archive = root / "mnist_m.zip"
    if not archive.is_file():
        download_first(MNIST_M_URLS, archive)
    arrays = []
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        for split in ("train", "test"):
            # The archive's top folder is "<repository>-<branch>/"; find the labels file under it.
            suffix = f"mnist_m/mnist_m_{split}_labels.txt"
            found = [n for n in names if n.endswith(suffix)]
            if len(found) != 1:
                raise ValueError(f"{archive}: expected one {suffix} in the archive, found {len(found)}. "
                                 f"Delete it to download again; the layout of {MNIST_M_REPOSITORY} may have changed.")
            folder = found[0][: -len("_labels.txt")] + "/"  # .../mnist_m/mnist_m_train/
            images, labels = [], []
            for number, line in enumerate(zf.read(found[0]).decode("utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2 or not fields[1].isdigit() or folder + fields[0] not in names:
                    raise ValueError(f"{archive}: {found[0]}, line {number}: expected '<file>.png <label>' "
                                     f"naming a file of {folder}; got {line!r}. Delete the archive to download again.")
                with Image.open(io.BytesIO(zf.read(folder + fields[0]))) as image:
                    images.append(_to_uint8_hwc(image.convert("RGB"), 32))
                labels.append(int(fields[1]))
            arrays += [np.stack(images), np.asarray(labels, dtype=np.int64)]
    return tuple(arrays)


def _download_npz(name: str, dest: Path) -> None:
    """Download ``name`` and save it as ``dest`` in the mirror's format."""
    root = dest.parent / ("mnist_m" if name == "mnist_m" else "torchvision")
    root.mkdir(parents=True, exist_ok=True)
    arrays = _mnist_m_arrays(root) if name == "mnist_m" else _torchvision_arrays(name, root)
    x_train, y_train, x_test, y_test = arrays
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(
                f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.array(_CLASSES[name])
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- a user's folder of images -----------------------------------------------------------


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: "2" before "10", "img9" before "img10"."""
    parts = re.split(r"([0-9]+)", name)  # odd positions hold the digit runs
    return [int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)], name


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in _IMAGE_SUFFIXES


def _class_folders(folder: Path, root: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """One split's class folders and their images, plus the entries ignored (relative to ``root``).

    Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) and files that are not images are
    ignored but listed, never silently. An empty class folder is an error: it would still
    take a label and shift the labels of every class after it.
    """
    classes, ignored = {}, []
    for entry in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if not entry.is_dir() or entry.name.startswith("."):
            if not (folder == root and is_description(entry)):
                ignored.append(entry.relative_to(root).as_posix())
            continue
        images = []
        for file in sorted(entry.iterdir(), key=lambda p: natural_key(p.name)):
            if _is_image(file):
                images.append(file)
            else:
                ignored.append(file.relative_to(root).as_posix())
        if not images:
            raise ValueError(
                f"{entry}: empty class folder (no {'/'.join(_IMAGE_SUFFIXES)} images). It would still take a "
                "label and shift the labels of the classes after it: add images to it or remove it."
            )
        classes[entry.name] = images
    return classes, ignored


def _split_folders(folder: Path) -> dict[str, Path]:
    """The split folders of ``folder``: ``{"train": folder}`` when it holds class folders directly."""
    if not (folder / "train").is_dir():
        return {"train": folder}
    found = {"train": folder / "train"}
    for split, aliases in (("validation", ("validation", "val")), ("test", ("test",))):
        present = [folder / a for a in aliases if (folder / a).is_dir()]
        if len(present) > 1:
            raise ValueError(f"{folder}: several {split} folders ({', '.join(p.name for p in present)}); keep one.")
        if present:
            found[split] = present[0]
    return found


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(
        f"{path}: cannot read this image ({type(err).__name__}: {err}). It is damaged, truncated or not "
        "an image: re-save or download it again, or delete it."
    )


# PIL reports a bad file as OSError (UnidentifiedImageError is one), SyntaxError or ValueError.
_PIL_ERRORS = (OSError, SyntaxError, ValueError)


def _peek(path: Path) -> tuple[str, tuple[int, int]]:
    """An image's mode and (height, width), from its header only (cheap: no pixels decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode, (image.height, image.width)
    except _PIL_ERRORS as err:
        raise _unreadable(path, err) from None


def _read_image(path: Path, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """One image decoded completely, as uint8 [H, W] (grayscale) or [H, W, 3] at ``size`` (H, W)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if grayscale else "RGB")  # decodes: a truncated file fails here
    except _PIL_ERRORS as err:
        raise _unreadable(path, err) from None
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _class_order(parts: dict, split_dirs: dict, description) -> tuple[list[str], str]:
    """The classes in label order, and a note saying where that order comes from.

    The natural order of the training folders, or the task description's ``classes``. A
    class folder that is not among them (in any split) is an error: it has no label.
    """
    if description.classes:
        classes = list(description.classes)
        note = f"class order from {description.path}: {', '.join(classes[:20])}"
    else:
        classes = sorted(parts["train"], key=natural_key)
        note = f"class order: folder names in natural order (2 before 10): {', '.join(classes[:20])}"
    note += f" ... ({len(classes)} classes)" if len(classes) > 20 else ""
    for split, part in parts.items():
        for name in part:
            if name not in classes:
                where = f"listed in {description.path}" if description.classes else f"a folder in {split_dirs['train']}"
                fix = "add it to classes" if description.classes else "add training images of it"
                raise ValueError(f"{split_dirs[split] / name}: class folder {name!r} is not {where}. Every class "
                                 f"needs training images and one name: rename or remove the folder, or {fix}.")
    return classes, note


def _load_image_folder(folder: Path, seed: int, image_size) -> VisionTask:
    description = find_task_description(folder)
    split_dirs = _split_folders(folder)
    parts, ignored = {}, []
    for split, directory in split_dirs.items():
        parts[split], skipped = _class_folders(directory, folder)
        ignored += skipped
    if len(split_dirs) > 1:  # a train/ layout: anything else at the top is ignored too
        ignored += [p.name for p in folder.iterdir() if p not in split_dirs.values() and not is_description(p)]
    if not parts["train"]:
        raise FileNotFoundError(
            f"{split_dirs['train']}: no class folders. Expected <dir>/<class>/*.png|jpg or "
            "<dir>/train/<class>/... (plus optionally validation/ and test/ laid out the same)."
        )
    classes, order_note = _class_order(parts, split_dirs, description)

    # Check the labels, and carve the missing splits, before decoding any pixels.
    files = {s: [p for c in classes for p in part.get(c, [])] for s, part in parts.items()}
    labels = {s: np.asarray([i for i, c in enumerate(classes) for _ in part.get(c, [])], dtype=np.int64)
              for s, part in parts.items()}
    elsewhere = {split_dirs[s].name: y for s, y in labels.items() if s != "train"}
    # (Without a description every class is a non-empty training folder: only "one class" can fail.)
    fix = f"Add a folder {split_dirs['train']}/<class> of its images, or remove it from classes in {description.path}."
    check_classes(labels["train"], classes, str(split_dirs["train"]), fix, elsewhere)
    description.check_metric_fits(len(classes))
    fractions = {s: description.fraction(s) for s in ("validation", "test") if s not in parts}
    carved = carve(labels["train"], fractions, seed, classes, str(split_dirs["train"])) if fractions else None

    # One size and one mode for all: the headers say both without decoding any pixels.
    headers = {p: _peek(p) for paths in files.values() for p in paths}
    if image_size is None:
        size = headers[files["train"][0]][1]  # the first training image's
    else:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    # Keep one channel only when every image is grayscale; otherwise convert all to RGB.
    grayscale = all(mode in _GRAY_MODES for mode, _ in headers.values())
    splits = {}
    for split, paths in files.items():
        images = np.stack([_read_image(p, size, grayscale) for p in paths])
        splits[split] = ImageSplit(images[..., None] if grayscale else images, labels[split])
    if carved is not None:
        splits.update({s: splits["train"].take(idx) for s, idx in carved.items()})

    name = description.name or folder.resolve().name
    kind = "grayscale" if grayscale else "RGB"
    notes = [f"source: image folder {folder}; {len(headers):,} images resized to {size[0]}x{size[1]}, {kind}"]
    notes.append("layout: " + ("split folders " + ", ".join(d.name for d in split_dirs.values())
                               if len(split_dirs) > 1 else "class folders directly in the folder"))
    notes.append(order_note)
    notes += description.notes(folder, name)
    if ignored:
        notes.append(ignored_note(sorted(ignored, key=natural_key), "hidden, not an image, or not a class folder"))
    if fractions:
        notes.append(carving_note(fractions, seed))
    notes += [f"{s}_fraction unused: the folder {split_dirs[s].name}/ is given" for s in ("validation", "test")
              if s in split_dirs and getattr(description, f"{s}_fraction") is not None]
    notes.append(per_class_note(splits["train"].labels, classes, "images"))
    ordered = (splits["train"], splits["validation"], splits["test"])
    return VisionTask(name, classes, *ordered, tuple(notes), description.effective_metric)


# --- arrays to network input -------------------------------------------------------------


def prepare_images(
    images: np.ndarray,
    size: int = 32,
    channels: int = 3,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` (or ``[N, H, W]``) images -> float32 ``[N, channels, size, size]``.

    Pixels are scaled to [0, 1], grayscale is repeated to three channels (or RGB reduced
    to luminance when ``channels=1``), images are resized with antialiased bilinear
    interpolation, then normalised per channel with ``mean``/``std`` (CIFAR-10's by
    default, as the CIFAR ResNets expect). Call it on batches for large datasets: the
    result takes 4 bytes per value.
    """
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images [N,H,W,C]; got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != channels:
        raise ValueError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean_t) / std_t).contiguous()
