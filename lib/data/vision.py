"""Image classification tasks: five standard datasets and a user's folder of images.

``load_vision_task(name)`` returns a ``VisionTask`` of uint8 ``[N, H, W, C]`` arrays as
stored. The standard datasets are read from ``<mirror>/vision/<name>.npz`` (keys
``x_train, y_train, x_test, y_test, classes``) or, without a mirror, downloaded once with
torchvision into ``download_dir()/vision`` and converted to an ``.npz`` in the same format,
which later runs read directly. ``prepare_images`` turns the arrays into normalised float
tensors for a network.
"""
from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..paths import data_mirror, download_dir
from .splits import stratified_split

VISION_TASKS: tuple[str, ...] = ("mnist", "fashion_mnist", "usps", "gtsrb", "cifar10")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Class names, the same whether the data comes from the mirror or from torchvision.
_CLASSES: dict[str, list[str]] = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
    ],
    "usps": [str(d) for d in range(10)],
    "gtsrb": [str(c) for c in range(43)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
# torchvision class name per task, and the image size a download is resized to (None: keep).
_TORCHVISION: dict[str, tuple[str, int | None]] = {
    "mnist": ("MNIST", None),
    "fashion_mnist": ("FashionMNIST", None),
    "usps": ("USPS", None),
    "gtsrb": ("GTSRB", 32),  # photos of varying size; the mirror stores them at 32x32
    "cifar10": ("CIFAR10", None),
}
# What the mirror's files are, where they are not the full dataset.
_MIRROR_SUBSETS = {
    "cifar10": "mirror cifar10.npz is a class-balanced seeded subset of CIFAR-10 (full: 50,000 / 10,000) "
    "with pixels decoded from a JPEG copy (slightly lossy): label results as subset numbers",
    "gtsrb": "mirror gtsrb.npz is a class-stratified seeded subset of GTSRB (full: 26,640 / 12,630), "
    "resized to 32x32: label results as subset numbers",
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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
    ``<dir>/train/<class>/...`` plus ``<dir>/test/<class>/...``; its images are resized to
    ``image_size`` (default: the first image's size). ``image_size`` is ignored for the
    standard datasets, which are returned as stored.
    """
    key = str(name).lower()
    if key in VISION_TASKS:
        path, source, from_mirror = _npz_file(key, data_dir)
        x_train, y_train, x_test, y_test, classes = _read_npz(path)
        notes = [f"source: {source}"]
        if not from_mirror:
            notes.append(
                "full torchvision dataset: the offline mirror holds subsets of CIFAR-10 and GTSRB, "
                "so numbers differ from runs on the mirror"
            )
        elif key in _MIRROR_SUBSETS:
            notes.append(_MIRROR_SUBSETS[key])
        train, test = ImageSplit(x_train, y_train), ImageSplit(x_test, y_test)
        return _with_validation(key, classes, train, test, seed, notes)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_image_folder(path, seed, image_size)
    close = difflib.get_close_matches(key, VISION_TASKS, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Unknown vision task {name!r}.{hint} Known tasks: {', '.join(VISION_TASKS)}. "
        "A path to a folder of class sub-folders of images also works."
    )


def _with_validation(name, classes, train: ImageSplit, test: ImageSplit, seed: int, notes: list) -> VisionTask:
    """A task whose validation split is a seeded, class-stratified 10% of ``train``."""
    rest, validation = stratified_split(train.labels, (0.1,), seed)
    notes.append(f"validation = seeded class-stratified 10% of train {_seed_note(seed)}")
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
        return path, f"torchvision download converted earlier to {path}", False
    _download_npz(name, path)
    return path, f"downloaded with torchvision.datasets.{_TORCHVISION[name][0]} and saved as {path}", False


def _read_npz(path: Path):
    with np.load(path, allow_pickle=False) as f:
        missing = {"x_train", "y_train", "x_test", "y_test", "classes"} - set(f.files)
        if missing:
            expected = "x_train, y_train, x_test, y_test, classes"
            raise ValueError(f"{path}: missing keys {sorted(missing)}; expected {expected}.")
        x_train, y_train, x_test, y_test = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        classes = [str(c) for c in f["classes"]]
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{path}: x_{split} must be uint8 [N,H,W,C] and y_{split} [N]; "
                f"got {x.dtype} {x.shape} and {y.dtype} {y.shape}."
            )
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"{path}: y_{split} has labels outside 0..{len(classes) - 1}.")
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), classes


def _to_uint8_hwc(image, size: int | None) -> np.ndarray:
    """One PIL image, as torchvision returns it with no transform -> uint8 [H, W, C]."""
    from PIL import Image

    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _dataset_arrays(dataset, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    # Indexing the dataset (rather than reading its private arrays) works for all five
    # classes alike: with no transform each item is (PIL image, integer label).
    images, labels = [], []
    for i in range(len(dataset)):
        image, label = dataset[i]
        images.append(_to_uint8_hwc(image, size))
        labels.append(int(label))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _download_npz(name: str, dest: Path) -> None:
    """Download ``name`` with torchvision and save it as ``dest`` in the mirror's format."""
    import torchvision.datasets

    class_name, size = _TORCHVISION[name]
    dataset_class = getattr(torchvision.datasets, class_name)
    root = dest.parent / "torchvision"
    if class_name == "GTSRB":
        train, test = (dataset_class(root, split=s, download=True) for s in ("train", "test"))
    else:
        train, test = (dataset_class(root, train=t, download=True) for t in (True, False))
    x_train, y_train = _dataset_arrays(train, size)
    x_test, y_test = _dataset_arrays(test, size)
    dest.parent.mkdir(parents=True, exist_ok=True)
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


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    return {
        d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        for d in sorted(folder.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }


def _read_images(files: list[Path], size: tuple[int, int], grayscale: bool) -> np.ndarray:
    from PIL import Image

    arrays = []
    for path in files:
        with Image.open(path) as image:
            image = image.convert("L" if grayscale else "RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(image, dtype=np.uint8))
    stacked = np.stack(arrays)
    return stacked[..., None] if grayscale else stacked


def _load_image_folder(folder: Path, seed: int, image_size) -> VisionTask:
    from PIL import Image

    has_splits = (folder / "train").is_dir()
    parts = {"train": _class_folders(folder / "train")} if has_splits else {"all": _class_folders(folder)}
    if has_splits:
        for split, alias in (("validation", ("validation", "val")), ("test", ("test",))):
            for a in alias:
                if (folder / a).is_dir():
                    parts[split] = _class_folders(folder / a)
                    break
    first = next(iter(parts.values()))
    classes = sorted(first)
    files = [p for part in parts.values() for ps in part.values() for p in ps]
    if not files:
        raise FileNotFoundError(
            f"{folder}: no images found. Expected <dir>/<class>/*.png|jpg or "
            "<dir>/train/<class>/... plus <dir>/test/<class>/..."
        )
    for split, part in parts.items():
        unknown = sorted(set(part) - set(classes))
        if unknown:
            raise ValueError(f"{folder}/{split}: class folders {unknown} do not exist in {folder}/train.")
    with Image.open(files[0]) as image:
        if image_size is None:
            size = (image.height, image.width)
        else:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    # Keep one channel only when every image is grayscale; otherwise convert all to RGB.
    grayscale = all(_is_gray(p) for p in files)
    splits = {}
    for split, part in parts.items():
        paths = [p for c in classes for p in part.get(c, [])]
        labels = np.asarray([i for i, c in enumerate(classes) for _ in part.get(c, [])], dtype=np.int64)
        splits[split] = ImageSplit(_read_images(paths, size, grayscale), labels)
    kind = "grayscale" if grayscale else "RGB"
    notes = [f"source: image folder {folder}; {len(files):,} images resized to {size[0]}x{size[1]}, {kind}"]
    if not has_splits:
        everything = splits["all"]
        train, validation, test = (everything.take(i) for i in stratified_split(everything.labels, (0.1, 0.1), seed))
        notes.append(f"no split folders: seeded class-stratified 80/10/10 {_seed_note(seed)}")
        return VisionTask(folder.name, classes, train, validation, test, tuple(notes))
    if "test" not in splits:
        raise FileNotFoundError(f"{folder} has a train/ folder but no test/ folder next to it.")
    if "validation" in splits:
        notes.append("train/validation/test from the folders")
        ordered = (splits["train"], splits["validation"], splits["test"])
        return VisionTask(folder.name, classes, *ordered, tuple(notes))
    return _with_validation(folder.name, classes, splits["train"], splits["test"], seed, notes)


def _seed_note(seed: int) -> str:
    return f"(seed={seed}; another seed gives another split)"


def _is_gray(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        return image.mode in ("1", "L", "LA", "I", "I;16", "F")


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
