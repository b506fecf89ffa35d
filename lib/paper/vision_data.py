"""The eight vision tasks of the paper-scale CLIP benchmark, read from their public sources.

METHODS.md §7-8: SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST and DTD, each
evaluated on its canonical test split, the one the merging papers (task vectors, TIES,
AdaMerging, ...) report on. ``data/clip_tasks.yaml`` holds, per task, the class names and prompt
templates, the canonical split sizes, and the two sources a task can be read from:

- ``torchvision``: the ``torchvision.datasets`` class, reading its own on-disk layout (and
  downloading it where torchvision still can);
- ``huggingface``: a ``datasets`` copy on the hub (``tanganke/<task>``, the copies FusionBench's
  published experts were fine-tuned on; ``ufldl-stanford/svhn``, ``ylecun/mnist``).

Each task names its default source in the YAML. It is torchvision where torchvision has the
canonical split (SUN397 via its partition files, SVHN, GTSRB, MNIST, DTD) and the hub copy
where it has not: RESISC45 (not in torchvision), Stanford Cars (torchvision can no longer
download it) and EuroSAT (torchvision has the 27,000 images but no split; a carved test split
would hold images the published experts were trained on). ``source=`` picks the other one.

Where the files are (the same rules as ``lib.data``): with a mirror (``DATA_DIR`` or
``data_dir=``), only the mirror is read, never written:

    <mirror>/vision_paper/torchvision/     a torchvision root (SUN397/, MNIST/raw/, dtd/dtd/, ...)
    <mirror>/vision_paper/huggingface/<task>/   a DatasetDict saved with ``save_to_disk``, or a
                                           snapshot of the hub repository (its parquet files)

Without one, the same folders under ``download_dir()/vision_paper`` are filled once (torchvision's
own download; ``datasets.load_dataset`` then ``save_to_disk``) and read from there afterwards.
A missing file is an error that names the path and the fix.

Splits: train and test are the canonical ones (sizes in the YAML; a read with other sizes says
so in ``notes``). None of them has a validation split, so validation is a seeded,
class-stratified 10% of train (``lib.data.splits.stratified_split``; another seed gives another
validation split, the test split never changes).

Images stay on disk (SUN397 alone is 39,700 photos of varying size) and are decoded when a batch
asks for them; ``clip_transform`` is open_clip's evaluation transform for OpenAI's CLIP (resize
the short side to 224 with bicubic filtering, centre-crop 224, CLIP's mean and std).

Deviations from the task-vectors code: validation is class-stratified and uncapped (theirs is a
plain random 10% capped at 5,000 images); EuroSAT read through torchvision is split with a fixed
seed (test = 10% of each class), not with the task-vectors split files, which are not public
outside the hub copy.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.splits import stratified_split
from .hub import download_to_folder
from ..paths import REPO_ROOT, data_mirror, download_dir
from .task_files import read_task_file

TASKS_FILE = REPO_ROOT / "data" / "clip_tasks.yaml"
PAPER_VISION_TASKS: tuple[str, ...] = (
    "sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"
)
SOURCES = ("torchvision", "huggingface")
MIRROR_FOLDER = "vision_paper"  # under the data mirror, and under download_dir()
IMAGE_COLUMN, LABEL_COLUMN = "image", "label"  # the columns of every hub copy used here
_HUB_SPLITS = ("train", "validation", "test")
TORCHVISION_PINNED = "torchvision==0.29.1 (environment.yml)"


# ----------------------------------------------------------------------------- the task file
@dataclass(frozen=True)
class TaskSpec:
    """One task of ``data/clip_tasks.yaml``."""

    name: str
    title: str
    expert: str  # suffix of the published experts' hub names
    classes: tuple[str, ...]  # prompt names, in label order
    templates: tuple[str, ...]  # with {c} where the class name goes
    canonical: dict  # {"train": n, "test": n}
    validation_fraction: float
    split: str  # where the canonical split comes from
    default_source: str
    sources: dict  # source name -> its settings

    def prompts(self, class_index: int) -> list[str]:
        """Every template filled with the name of class ``class_index``."""
        return [template.format(c=self.classes[class_index]) for template in self.templates]


def clip_tasks(path: str | os.PathLike | None = None) -> dict[str, TaskSpec]:
    """Every task of the task file (default ``data/clip_tasks.yaml``), checked as it is read."""
    return _read_tasks(str(Path(path or TASKS_FILE).resolve()))


def task_spec(name: str, path: str | os.PathLike | None = None) -> TaskSpec:
    tasks = clip_tasks(path)
    if name not in tasks:
        raise ValueError(f"Unknown paper-scale vision task {name!r}; {path or TASKS_FILE} has {', '.join(tasks)}.")
    return tasks[name]


@lru_cache(maxsize=4)
def _read_tasks(path: str) -> dict[str, TaskSpec]:
    raw = read_task_file(path, "the class names and templates of the CLIP tasks")
    return {name: _task_spec(name, entry, path) for name, entry in raw["tasks"].items()}


def _task_spec(name: str, entry: dict, path: str) -> TaskSpec:
    where = f"{path}, task {name!r}"
    required = ("title", "expert", "canonical", "validation", "split", "default_source", "sources", "templates", "classes")
    missing = [k for k in required if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}.")
    classes = tuple(str(c) for c in entry["classes"])
    templates = tuple(str(t) for t in entry["templates"])
    if len(set(classes)) != len(classes):
        raise ValueError(f"{where}: class names repeat; each class needs its own name.")
    bad = [t for t in templates if "{c}" not in t]
    if bad or not templates:
        raise ValueError(f"{where}: every template needs a {{c}} where the class name goes; got {bad or 'none'}.")
    validation = entry["validation"]
    if validation.get("from") != "train" or not 0 < float(validation.get("fraction", 0)) < 1:
        raise ValueError(f"{where}: validation must be {{from: train, fraction: f}} with 0 < f < 1; got {validation}.")
    sources = dict(entry["sources"])
    if entry["default_source"] not in sources or not set(sources) <= set(SOURCES):
        raise ValueError(f"{where}: sources must be among {SOURCES} and include default_source "
                         f"{entry['default_source']!r}; got {sorted(sources)}.")
    return TaskSpec(
        name=name, title=str(entry["title"]), expert=str(entry["expert"]), classes=classes, templates=templates,
        canonical={k: int(v) for k, v in entry["canonical"].items()},
        validation_fraction=float(entry["validation"]["fraction"]), split=" ".join(str(entry["split"]).split()),
        default_source=str(entry["default_source"]), sources=sources,
    )


# ----------------------------------------------------------------------------- images on disk
class _FileImages:
    """Images stored as files (JPEG, PNG, PPM, ...)."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def identity(self) -> bytes:
        return "\n".join(self.paths).encode()

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as image:  # close the file: SUN397 alone opens 39,700
            return image.convert("RGB")


class _ArrayImages:
    """Images held in a uint8 array [N, H, W] or [N, H, W, C] (MNIST, SVHN)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)

    def __len__(self) -> int:
        return len(self.array)

    def identity(self) -> bytes:
        return np.ascontiguousarray(self.array).tobytes()

    def __getitem__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.array[i]).convert("RGB")


class _HubImages:
    """The image column of a Hugging Face ``datasets`` split (decoded row by row)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def identity(self) -> bytes:
        # datasets' own content fingerprint of the split (set when it is built, loaded or saved)
        return str(getattr(self.dataset, "_fingerprint", len(self.dataset))).encode()

    def __getitem__(self, i: int):
        return self.dataset[int(i)][IMAGE_COLUMN].convert("RGB")


@dataclass(frozen=True, eq=False)
class ImageRecords:
    """One split: labels in memory, images decoded (as RGB PIL images) when asked for."""

    images: object  # _FileImages | _ArrayImages | _HubImages
    rows: np.ndarray  # which of ``images`` belong to this split, in order
    labels: np.ndarray  # int64, one per row

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int):
        return self.images[int(self.rows[i])]

    def take(self, indices) -> "ImageRecords":
        """The examples at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageRecords(self.images, self.rows[indices], self.labels[indices])

    __getitem__ = take  # records[indices], as a PreparedSplit subsets its inputs

    def digest(self) -> str:
        """A hash of what these records are (the image source, the rows, the labels) without
        decoding a single image: what cache keys of a paper-scale task hold."""
        import hashlib

        digest = hashlib.sha256(self.images.identity())
        digest.update(np.ascontiguousarray(self.rows, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    def pixels(self, indices, transform: Callable, workers: int = 1) -> torch.Tensor:
        """The images at ``indices`` through ``transform`` (e.g. :func:`clip_transform`), stacked.
        ``workers`` > 1 decodes in that many threads (PIL releases the GIL while it decodes and
        resizes): on a GPU machine decoding, not the model, otherwise bounds evaluation."""
        indices = np.asarray(indices, dtype=np.int64)
        if workers <= 1:
            return torch.stack([transform(self.image(i)) for i in indices])
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            return torch.stack(list(pool.map(lambda i: transform(self.image(i)), indices)))


def _records(images, labels) -> ImageRecords:
    labels = np.asarray(labels, dtype=np.int64)
    return ImageRecords(images, np.arange(len(labels)), labels)


@dataclass(frozen=True, eq=False)
class PaperVisionTask:
    name: str
    title: str
    classes: list[str]  # prompt names (data/clip_tasks.yaml), in label order
    templates: list[str]
    train: ImageRecords
    validation: ImageRecords
    test: ImageRecords
    source: str  # "torchvision" or "huggingface"
    notes: tuple[str, ...]
    metric: str = "accuracy"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def clip_transform(image_size: int = 224):
    """open_clip's evaluation transform for OpenAI CLIP: bicubic resize of the short side,
    centre crop, RGB, CLIP's mean and std. ``image_size`` is the model's input size."""
    import open_clip

    return open_clip.image_transform(image_size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                     std=open_clip.OPENAI_DATASET_STD, resize_mode="shortest",
                                     interpolation="bicubic")


# ----------------------------------------------------------------------------- loading
def check_source(source: str | None, name: str = "source") -> None:
    """``source`` must be one of SOURCES, or None (each task's ``default_source``)."""
    if source not in (None, *SOURCES):
        raise ValueError(f"{name} = {source!r}: choose {' or '.join(map(repr, SOURCES))} (every task from there), "
                         "or leave it unset for each task's default_source (data/clip_tasks.yaml).")


def load_paper_vision_task(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0,
                           source: str | None = None, tasks_file: str | os.PathLike | None = None
                           ) -> PaperVisionTask:
    """Read a task's canonical train and test splits and carve its validation split.

    ``source`` is ``"torchvision"`` or ``"huggingface"`` (default: the task's ``default_source``);
    ``data_dir`` a mirror (default ``DATA_DIR``; none: download once into ``download_dir()``);
    ``seed`` chooses the validation examples.
    """
    spec = task_spec(name, tasks_file)
    source = source or spec.default_source
    if source not in spec.sources:
        raise ValueError(f"{name} cannot be read from {source!r}; data/clip_tasks.yaml lists {', '.join(spec.sources)} "
                         f"for it.")
    mirror = data_mirror(data_dir)
    reader = _read_torchvision if source == "torchvision" else _read_hub
    train, test, source_classes, notes = reader(spec, mirror)
    where = f"{name} ({source}{f', mirror {mirror}' if mirror else ''})"
    _check_class_names(spec, source, source_classes, where)
    for split_name, split in (("train", train), ("test", test)):
        _check_labels(split.labels, len(spec.classes), f"{where}, {split_name} split")
    sizes = {"train": len(train), "test": len(test)}
    if sizes != spec.canonical:
        notes.append(f"split sizes train {sizes['train']:,} / test {sizes['test']:,} differ from the canonical "
                     f"{spec.canonical['train']:,} / {spec.canonical['test']:,}: not the split the papers report on")
    rest, validation = stratified_split(train.labels, (spec.validation_fraction,), seed)
    notes.append(f"validation = seeded (seed {seed}) class-stratified {spec.validation_fraction:.0%} of train")
    return PaperVisionTask(name, spec.title, list(spec.classes), list(spec.templates), train.take(rest),
                           train.take(validation), test, source, tuple(notes))


def normalized_class_name(name: str) -> str:
    """How class names are compared: lower case, ``_`` and ``/`` as spaces, single spaces."""
    return " ".join(re.sub(r"[_/]", " ", str(name)).lower().split())


def _check_class_names(spec: TaskSpec, source: str, found: Sequence[str] | None, where: str) -> None:
    """Refuse a source whose class order differs from the task file's.

    A wrong order would not fail anywhere else: it would silently pair images with another
    class's prompt embedding. A source may name classes by their label number instead.
    """
    policy = spec.sources[source].get("class_names", "same")
    if found is None or policy == "none":
        return
    found = [str(c) for c in found]
    expected = [str(c) for c in policy] if isinstance(policy, list) else list(spec.classes)
    if len(found) != len(expected):
        raise ValueError(f"{where}: the source has {len(found)} classes, data/clip_tasks.yaml {len(expected)} for "
                         f"{spec.name}. Check that the files are {spec.title}'s.")
    if isinstance(policy, list):
        differ = [i for i, (a, b) in enumerate(zip(found, expected)) if a != b]
    else:
        numbered = found == [str(i) for i in range(len(found))]
        differ = [] if numbered else [i for i, (a, b) in enumerate(zip(found, expected))
                                      if normalized_class_name(a) != normalized_class_name(b)]
    if differ:
        i = differ[0]
        raise ValueError(
            f"{where}: label {i} is {found[i]!r} in the source but {expected[i]!r} in data/clip_tasks.yaml "
            f"({len(differ)} labels differ). Zero-shot heads follow the file's order, so the labels would be "
            f"paired with other classes' prompts. Fix the order in data/clip_tasks.yaml (sources.{source}.class_names"
            f" for a source that only spells them differently), or read the task from the other source."
        )


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if len(labels) == 0:
        raise ValueError(f"{where}: no examples. The files are incomplete: copy them again.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{where}: labels outside 0..{num_classes - 1}. The files are not this task's.")


def _source_folder(kind: str, mirror: Path | None, task: str | None = None) -> Path:
    root = (mirror if mirror is not None else download_dir()) / MIRROR_FOLDER / kind
    return root / task if task else root


# ----------------------------------------------------------------------------- torchvision
def _read_torchvision(spec: TaskSpec, mirror: Path | None):
    """Train and test records of a task read with its ``torchvision.datasets`` class."""
    settings = spec.sources["torchvision"]
    root = _source_folder("torchvision", mirror)
    expected = root / settings["path"]
    download = mirror is None and settings.get("download", True)
    if not expected.exists() and not download:
        fixes = [f"put torchvision's {settings['dataset']} files under {root} (the layout "
                 f"torchvision.datasets.{settings['dataset']} reads)"]
        if "huggingface" in spec.sources:
            fixes.append(f"read the hub copy {spec.sources['huggingface']['repo']} instead (source='huggingface')")
        if mirror is not None:
            fixes.append("unset DATA_DIR to download")
        raise FileNotFoundError(f"{expected} not found: {spec.title} is read from there. Fix: {'; or '.join(fixes)}.")
    if mirror is None:  # a download fills the folder; a mirror is only read
        root.mkdir(parents=True, exist_ok=True)
    readers = {"SUN397": _sun397, "StanfordCars": _stanford_cars, "EuroSAT": _eurosat, "SVHN": _svhn,
               "GTSRB": _gtsrb, "MNIST": _mnist, "DTD": _dtd}
    try:
        train, test, classes = readers[settings["dataset"]](root, settings, download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted" names no file
        raise FileNotFoundError(f"torchvision.datasets.{settings['dataset']} could not read {root} ({err}). "
                                f"Check the files under {expected.parent}, or delete them to download again.") from err
    return train, test, classes, [f"source: torchvision.datasets.{settings['dataset']} under {root}",
                                  f"split: {spec.split}"]


def _private(dataset, attribute: str):
    """An internal attribute of a torchvision dataset (where its parsed file list lives)."""
    if not hasattr(dataset, attribute):  # not a RuntimeError: that is torchvision's "files missing"
        raise AttributeError(f"torchvision.datasets.{type(dataset).__name__} has no {attribute!r}: this reader was "
                           f"written for {TORCHVISION_PINNED}; install that version.")
    return getattr(dataset, attribute)


def _sun397(root: Path, settings: dict, download: bool):
    """SUN397's images with its partition files: Training_NN.txt / Testing_NN.txt list
    ``/a/abbey/sun_....jpg`` paths, 50 of each class."""
    from torchvision.datasets import SUN397
    from torchvision.datasets.utils import download_and_extract_archive

    dataset = SUN397(root, download=download)
    data = root / "SUN397"
    number = int(settings.get("partition", 1))
    names = {split: f"{'Training' if split == 'train' else 'Testing'}_{number:02d}.txt" for split in ("train", "test")}
    folder = next((f for f in (data, data / "Partitions") if (f / names["train"]).is_file()), None)
    if folder is None and download:
        download_and_extract_archive(settings["partitions_url"], download_root=str(data))
        folder = next((f for f in (data, data / "Partitions") if (f / names["train"]).is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"{data / names['train']} not found: SUN397's partition files (from "
                                f"{settings['partitions_url']}) go in {data}, beside ClassName.txt.")
    splits = []
    for split in ("train", "test"):
        listed = [line.strip() for line in (folder / names[split]).read_text().splitlines() if line.strip()]
        paths, labels = [], []
        for line in listed:
            relative = Path(*line.strip("/").split("/"))  # a/abbey/sun_x.jpg; the class is a/abbey minus the letter
            class_name = "/".join(relative.parts[1:-1])
            if class_name not in dataset.class_to_idx or not (data / relative).is_file():
                raise FileNotFoundError(f"{folder / names[split]}: {line!r} names no image of {data} (class "
                                        f"{class_name!r}). The images and the partition files do not match.")
            paths.append(data / relative)
            labels.append(dataset.class_to_idx[class_name])
        splits.append(_records(_FileImages(paths), labels))
    return splits[0], splits[1], list(dataset.classes)


def _stanford_cars(root: Path, settings: dict, download: bool):
    from torchvision.datasets import StanfordCars

    splits = []
    for split in ("train", "test"):
        dataset = StanfordCars(root, split=split, download=False)  # torchvision cannot download it any more
        samples = _private(dataset, "_samples")
        splits.append(_records(_FileImages([p for p, _ in samples]), [y for _, y in samples]))
    return splits[0], splits[1], list(dataset.classes)


def _eurosat(root: Path, settings: dict, download: bool):
    """All 27,000 images; test = a fixed-seed, class-stratified share of each class."""
    from torchvision.datasets import EuroSAT

    dataset = EuroSAT(root, download=download)
    records = _records(_FileImages([p for p, _ in dataset.samples]), dataset.targets)
    train, test = stratified_split(records.labels, (float(settings["test_fraction"]),), int(settings["split_seed"]))
    return records.take(train), records.take(test), list(dataset.classes)


def _svhn(root: Path, settings: dict, download: bool):
    from torchvision.datasets import SVHN

    splits = []
    for split in ("train", "test"):
        dataset = SVHN(root, split=split, download=download)
        splits.append(_records(_ArrayImages(dataset.data.transpose(0, 2, 3, 1)), dataset.labels))  # CHW -> HWC
    return splits[0], splits[1], None


def _gtsrb(root: Path, settings: dict, download: bool):
    from torchvision.datasets import GTSRB

    splits = []
    for split in ("train", "test"):
        samples = _private(GTSRB(root, split=split, download=download), "_samples")
        splits.append(_records(_FileImages([p for p, _ in samples]), [y for _, y in samples]))
    return splits[0], splits[1], None


def _mnist(root: Path, settings: dict, download: bool):
    from torchvision.datasets import MNIST

    splits = []
    for train in (True, False):
        dataset = MNIST(root, train=train, download=download)
        splits.append(_records(_ArrayImages(dataset.data.numpy()), dataset.targets.numpy()))
    return splits[0], splits[1], list(dataset.classes)


def _dtd(root: Path, settings: dict, download: bool):
    """Partition ``partition``: train = its train and val lists, test = its test list."""
    from torchvision.datasets import DTD

    number = int(settings.get("partition", 1))
    parts = {split: DTD(root, split=split, partition=number, download=download) for split in ("train", "val", "test")}
    classes = [list(d.classes) for d in parts.values()]
    if any(c != classes[0] for c in classes):  # torchvision numbers the classes each list contains
        raise ValueError(f"{root / 'dtd' / 'dtd' / 'labels'}: the train{number}/val{number}/test{number} lists do "
                         "not all contain the same classes, so their labels would not agree. Copy the files again.")

    def records(*datasets):
        paths = [p for d in datasets for p in _private(d, "_image_files")]
        return _records(_FileImages(paths), [y for d in datasets for y in _private(d, "_labels")])

    return records(parts["train"], parts["val"]), records(parts["test"]), classes[0]


# ----------------------------------------------------------------------------- Hugging Face
def _read_hub(spec: TaskSpec, mirror: Path | None):
    """Train and test records from a hub copy: the mirror's folder, or one downloaded once."""
    settings = spec.sources["huggingface"]
    folder = _source_folder("huggingface", mirror, spec.name)
    repo = settings["repo"] + (f" ({settings['config']})" if settings.get("config") else "")
    if mirror is not None and not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} not found: {spec.title} is read from there. Put the hub copy {repo} in it (a DatasetDict "
            f"saved with save_to_disk, or the repository's parquet files), read it with source='torchvision' where "
            f"data/clip_tasks.yaml lists one, or unset DATA_DIR to download."
        )
    if mirror is None and not folder.is_dir():
        _download_hub_copy(settings, folder)
    splits = _open_hub_folder(folder)
    missing = [s for s in ("train", "test") if s not in splits]
    if missing:
        raise ValueError(f"{folder}: no {' or '.join(missing)} split (found {', '.join(sorted(splits)) or 'none'}). "
                         f"It should hold {repo}'s train and test splits.")
    records, classes = [], None
    for split in ("train", "test"):
        dataset = splits[split]
        columns = set(dataset.column_names)
        if not {IMAGE_COLUMN, LABEL_COLUMN} <= columns:
            raise ValueError(f"{folder}, {split} split: expected columns {IMAGE_COLUMN!r} and {LABEL_COLUMN!r}; "
                             f"found {sorted(columns)}.")
        labels = np.asarray(dataset.with_format("numpy")[LABEL_COLUMN], dtype=np.int64)
        records.append(_records(_HubImages(dataset), labels))
        feature = dataset.features[LABEL_COLUMN]
        classes = list(feature.names) if hasattr(feature, "names") else classes
    origin = f"mirror folder {folder}" if mirror is not None else f"{repo} downloaded once into {folder}"
    return records[0], records[1], classes, [f"source: Hugging Face {origin}", f"split: {spec.split}"]


def _open_hub_folder(folder: Path) -> dict:
    """The splits of a saved DatasetDict, or of a hub snapshot's parquet files."""
    import datasets

    if (folder / "dataset_dict.json").is_file():
        return dict(datasets.load_from_disk(str(folder)))
    files: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.parquet")):
        # hub layouts: data/train-00000-of-00004.parquet, <config>/test-....parquet, or train/*.parquet.
        # Other splits (e.g. RESISC45's corrupted copies "contrast", "gaussian_noise") are not read.
        match = re.match(r"([A-Za-z_]+?)(-\d+-of-\d+|-\d+)?$", path.stem)
        split = match.group(1) if match else None
        split = split if split in _HUB_SPLITS else path.parent.name if path.parent.name in _HUB_SPLITS else None
        if split is not None:
            files.setdefault(split, []).append(str(path))
    if not files:
        raise FileNotFoundError(f"{folder} holds neither a saved DatasetDict (dataset_dict.json) nor parquet files. "
                                "Save the hub copy there with DatasetDict.save_to_disk, or copy the repository's files.")
    cache = download_dir() / MIRROR_FOLDER / "parquet_cache"  # arrow files datasets builds from the parquet
    return dict(datasets.load_dataset("parquet", data_files=files, cache_dir=str(cache)))


def _download_hub_copy(settings: dict, folder: Path) -> None:
    """``datasets.load_dataset`` from the hub, saved to ``folder`` (atomically) for later runs."""
    download_to_folder(settings["repo"], settings.get("config"), folder,
                       f"Offline, save the dataset with DatasetDict.save_to_disk into <mirror>/{MIRROR_FOLDER}/"
                       f"huggingface/{folder.name} and set DATA_DIR to <mirror>.")


def mirror_layout() -> str:
    """Where each task's files go in a mirror, one line per task and source (for error messages
    and documentation)."""
    lines = []
    for name, spec in clip_tasks().items():
        for source, settings in spec.sources.items():
            path = (f"{MIRROR_FOLDER}/torchvision/{settings['path']}" if source == "torchvision"
                    else f"{MIRROR_FOLDER}/huggingface/{name}/  ({settings['repo']})")
            lines.append(f"{name:14s} {source:12s} {path}")
    return "\n".join(lines)


__all__ = [
    "PAPER_VISION_TASKS", "TASKS_FILE", "ImageRecords", "PaperVisionTask", "TaskSpec", "clip_tasks", "clip_transform",
    "load_paper_vision_task", "mirror_layout", "normalized_class_name", "task_spec",
]
