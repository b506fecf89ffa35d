"""The sentiment datasets and fine-tuning recipe of gradient matching at paper scale (notebook 04).

Daheim, Möllenhoff, Ponti, Gurevych & Khan, *Model Merging by Uncertainty-Based Gradient
Matching*, ICLR 2024 (METHODS.md §1, §6), and the settings of their public code
(UKPLab/iclr2024-model-merging: scripts/finetune_roberta_imdb.json, fisher_roberta_imdb.json,
uncertainty_based_gradient_matching.sh): θ0 is ``FacebookAI/roberta-base`` fine-tuned on IMDB, the
task models are fine-tuned from θ0 on Yelp polarity, Rotten Tomatoes, SST-2 and Amazon polarity;
everything (encoder and the shared two-class head) is merged. ``data/sentiment_tasks.yaml`` holds
each dataset's hub copy, columns, splits, canonical sizes and number of training examples.

**Data.** Hugging Face ``datasets`` copies, read with ``lib.paper.glue``'s conventions: with a
mirror (``DATA_DIR`` or ``data_dir=``) only the mirror is read, never written,

    <mirror>/text_paper/huggingface/<name>/   a DatasetDict saved with ``save_to_disk``, or the
                                              parquet files of a hub snapshot

(``python -c "from lib.paper.sentiment import mirror_layout; print(mirror_layout())"`` lists the
folders and the command that fills each). SST-2 is GLUE's configuration and shares its folder
with the GLUE track. Without a mirror the same folder under ``download_dir()/text_paper`` is
filled once from the hub (``datasets.load_dataset`` then ``save_to_disk``).

**Splits** (all seeded by ``seed``; every subset is class-stratified):

- *train*: ``train_examples`` examples drawn from the training pool, by default the public
  script's N (IMDB 25,000, Yelp 112,000, RT 8,530, SST-2 67,349, Amazon 180,000). Yelp's and
  Amazon's are subsets of their training sets (20% and 5%). The pool is the train split less the
  held-out validation examples, so IMDB and SST-2, which have no validation split, train on 90%
  of theirs (22,500 and 60,614): the N of H = N·F̂ is the number the model was trained on.
- *validation*: the hub's validation split (RT), else a seeded 10% of train, held out first.
- *test*: the hub's test split; SST-2's test labels are hidden (-1), so SST-2 is tested on its
  validation split (872 examples), as the papers do. ``max_test`` caps each test split.

Caps are applied here, before any text is materialised, so Amazon's 3.6M reviews are never
all read into memory. **Inputs**: Amazon's text is ``title + " " + content`` (the public code's
join); every input is RoBERTa's ``<s> text </s>``, truncated to 384 tokens (``max_length``).

**Recipe** (:class:`SentimentRecipe`): the public fine-tuning script's settings (AdamW, lr 1e-5,
batch 16, 1 epoch, 100 warm-up steps, dropout 0, max grad norm 1.0); trains nothing itself.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..paths import REPO_ROOT, data_mirror
from .glue import MIRROR_FOLDER, GlueSplit, PaperTextTask, _open_task_folder
from .hub import download_to_folder, hub_folder_of
from .task_files import read_task_file

TASKS_FILE = REPO_ROOT / "data" / "sentiment_tasks.yaml"
PAPER_SENTIMENT_BASE = "imdb"
PAPER_SENTIMENT_TASKS: tuple[str, ...] = ("yelp", "rt", "sst2", "amazon")
LABEL_COLUMN = "label"


# ----------------------------------------------------------------------------- the task file
@dataclass(frozen=True)
class SentimentTaskSpec:
    """One dataset of ``data/sentiment_tasks.yaml``."""

    name: str
    title: str
    hub: str
    config: str | None
    fields: tuple[str, ...]
    join: str
    train_split: str
    validation_split: str | None
    test_split: str
    canonical: dict
    train_examples: int


@dataclass(frozen=True)
class SentimentProtocol:
    base_model: str
    max_length: int
    validation_fraction: float
    classes: tuple[str, ...]
    tasks: dict  # name -> SentimentTaskSpec


def sentiment_protocol(path: str | os.PathLike | None = None) -> SentimentProtocol:
    """The whole task file (default ``data/sentiment_tasks.yaml``), checked as it is read."""
    return _read_protocol(str(Path(path or TASKS_FILE).resolve()))


def sentiment_task_spec(name: str, path: str | os.PathLike | None = None) -> SentimentTaskSpec:
    tasks = sentiment_protocol(path).tasks
    if name not in tasks:
        raise ValueError(f"Unknown paper-scale sentiment dataset {name!r}; {path or TASKS_FILE} has "
                         f"{', '.join(tasks)}.")
    return tasks[name]


@lru_cache(maxsize=4)
def _read_protocol(path: str) -> SentimentProtocol:
    raw = read_task_file(path, "the sentiment datasets' hub copies, columns and splits")
    validation = raw.get("validation") or {}
    if validation.get("from") != "train" or not 0 < float(validation.get("fraction", 0)) < 1:
        raise ValueError(f"{path}: validation must be {{from: train, fraction: f}} with 0 < f < 1; got {validation}.")
    classes = tuple(str(c) for c in raw.get("classes") or ())
    if len(classes) != 2:
        raise ValueError(f"{path}: classes must name the two classes (label 0, label 1); got {list(classes)}.")
    tasks = {}
    for name, entry in raw["tasks"].items():
        where = f"{path}, dataset {name!r}"
        required = ("title", "hub", "fields", "train_split", "test_split", "canonical", "train_examples")
        missing = [k for k in required if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}.")
        if int(entry["train_examples"]) < 1:
            raise ValueError(f"{where}: train_examples must be a positive number of examples.")
        tasks[name] = SentimentTaskSpec(
            name=name, title=str(entry["title"]), hub=str(entry["hub"]),
            config=None if entry.get("config") is None else str(entry["config"]),
            fields=tuple(str(f) for f in entry["fields"]), join=str(entry.get("join", " ")),
            train_split=str(entry["train_split"]),
            validation_split=None if entry.get("validation_split") is None else str(entry["validation_split"]),
            test_split=str(entry["test_split"]), canonical={k: int(v) for k, v in entry["canonical"].items()},
            train_examples=int(entry["train_examples"]))
    return SentimentProtocol(base_model=str(raw.get("base_model", "FacebookAI/roberta-base")),
                             max_length=int(raw.get("max_length", 384)),
                             validation_fraction=float(validation["fraction"]), classes=classes, tasks=tasks)


def default_train_examples(path: str | os.PathLike | None = None) -> dict[str, int]:
    """Each dataset's number of training examples from the task file (the public script's N)."""
    return {name: spec.train_examples for name, spec in sentiment_protocol(path).tasks.items()}


# ----------------------------------------------------------------------------- subsets
def stratified_sample(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified sample of at most ``n`` of ``labels`` (all of
    them when ``n`` is None or at least their number); each class in proportion to its frequency."""
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    for c in np.argsort(-counts)[: n - quota.sum()]:  # the remainder to the largest classes
        quota[c] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def held_out(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, validation) indices of a training split: a seeded, class-stratified ``fraction``
    held out for validation, the rest the pool training examples are drawn from; each sorted."""
    validation = stratified_sample(labels, int(round(fraction * len(labels))), seed)
    pool = np.setdiff1d(np.arange(len(labels)), validation)
    return pool, validation


# ----------------------------------------------------------------------------- reading
def load_sentiment_task(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0,
                        train_examples: int | None = None, max_validation: int | None = None,
                        max_test: int | None = None, tasks_file: str | os.PathLike | None = None) -> PaperTextTask:
    """Read one dataset: its training examples, validation and test splits (module docstring).

    ``data_dir`` is a mirror (default ``DATA_DIR``; none: download once into ``download_dir()``);
    ``train_examples`` overrides the task file's number of training examples; ``max_validation``
    and ``max_test`` cap those splits (seeded, class-stratified). Texts are read only for the
    examples kept. Returns a ``lib.paper.glue.PaperTextTask`` (single-sentence splits, accuracy).
    """
    protocol = sentiment_protocol(tasks_file)
    spec = sentiment_task_spec(name, tasks_file)
    wanted = spec.train_examples if train_examples is None else int(train_examples)
    if wanted < 1:
        raise ValueError(f"train_examples = {wanted} for {name!r}: pass a positive number of examples.")
    mirror = data_mirror(data_dir)
    folder = _task_folder(spec, mirror)
    splits = _open_task_folder(folder, _source(spec))
    needed = [spec.train_split, spec.test_split] + ([spec.validation_split] if spec.validation_split else [])
    missing = [s for s in needed if s not in splits]
    if missing:
        raise ValueError(f"{folder}: no {' or '.join(missing)} split (found {', '.join(sorted(splits)) or 'none'}). "
                         f"It should hold {_source(spec)}.")
    train_set = splits[spec.train_split]
    train_labels = _labels(spec, train_set, f"{folder}, {spec.train_split} split")
    notes = [f"source: {'mirror folder ' + str(folder) if mirror is not None else _source(spec) + ' cached in ' + str(folder)}"]
    if spec.validation_split:
        validation_set = splits[spec.validation_split]
        validation_labels = _labels(spec, validation_set, f"{folder}, {spec.validation_split} split")
        pool, validation_rows = np.arange(len(train_labels)), np.arange(len(validation_labels))
        notes.append(f"validation = the hub's {spec.validation_split} split")
    else:
        validation_set, (pool, validation_rows) = train_set, held_out(train_labels, protocol.validation_fraction, seed)
        validation_labels = train_labels
        notes.append(f"validation = a seeded, class-stratified {protocol.validation_fraction:.0%} of train, held out "
                     "before the training examples are drawn")
    chosen = pool[stratified_sample(train_labels[pool], wanted, seed)]
    notes.append(f"train = {len(chosen):,} examples (seeded, class-stratified) of a pool of {len(pool):,}"
                 + (f"; {wanted:,} were asked for (the public script's N), the pool has fewer" if wanted > len(pool)
                    else ""))
    validation_rows = validation_rows[stratified_sample(validation_labels[validation_rows], max_validation, seed)]
    test_set = splits[spec.test_split]
    test_labels = _labels(spec, test_set, f"{folder}, {spec.test_split} split")
    test_rows = stratified_sample(test_labels, max_test, seed)
    notes.append(f"test = the hub's {spec.test_split} split" + (" (SST-2's test labels are hidden)"
                                                               if spec.test_split != "test" else "")
                 + (f", a seeded class-stratified {len(test_rows):,} of its {len(test_labels):,}"
                    if len(test_rows) < len(test_labels) else ""))
    sizes = {spec.train_split: len(train_labels), spec.test_split: len(test_labels)}
    expected = {k: spec.canonical.get(k) for k in sizes}
    if sizes != expected:
        notes.append(f"split sizes {sizes} differ from the canonical {expected}: not the dataset the paper used")
    train = _split(spec, train_set, train_labels, chosen)
    validation = _split(spec, validation_set, validation_labels, validation_rows)
    test = _split(spec, test_set, test_labels, test_rows)
    return PaperTextTask(name, spec.title, list(protocol.classes), (spec.fields[0],) if len(spec.fields) == 1
                         else ("+".join(spec.fields),), train, validation, test, ("accuracy",), False, tuple(notes))


def _source(spec: SentimentTaskSpec) -> str:
    return f"the hub dataset {spec.hub}" + (f" (configuration {spec.config!r})" if spec.config else "")


def _labels(spec: SentimentTaskSpec, dataset, where: str) -> np.ndarray:
    columns = set(dataset.column_names)
    missing = [c for c in (*spec.fields, LABEL_COLUMN) if c not in columns]
    if missing:
        raise ValueError(f"{where}: no column {', '.join(map(repr, missing))} (found {sorted(columns)}). {spec.title} "
                         f"needs {', '.join(spec.fields)} and {LABEL_COLUMN}: is this {_source(spec)}?")
    raw = np.asarray(dataset.with_format("numpy")[LABEL_COLUMN])
    labels = raw.astype(np.int64)
    bad = (labels < 0) | (labels > 1) | (raw != labels)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: row {first} has label {raw[first].item()!r}; {spec.title} has labels 0 and 1 "
                         f"({int(bad.sum())} rows outside). A split with hidden labels (-1) cannot be read.")
    return labels


def _split(spec: SentimentTaskSpec, dataset, labels: np.ndarray, rows: np.ndarray) -> GlueSplit:
    """The texts of ``rows`` only (Amazon's columns joined), their labels and rows."""
    rows = np.asarray(rows, dtype=np.int64)
    part = dataset.select(rows.tolist()) if len(rows) < len(dataset) else dataset
    columns = [[str(t) for t in part[field]] for field in spec.fields]
    texts = [spec.join.join(parts) for parts in zip(*columns)] if len(columns) > 1 else columns[0]
    return GlueSplit(texts, None, labels[rows], rows)


def _task_folder(spec: SentimentTaskSpec, mirror: Path | None) -> Path:
    """The dataset's folder: the mirror's (it must exist), or the download folder, filled once."""
    return hub_folder_of(mirror, Path(MIRROR_FOLDER) / "huggingface" / spec.name,
                         lambda folder: f"{spec.title} is read from there. Put {_source(spec)} in it "
                         f"(DatasetDict.save_to_disk, or its parquet files: {_download_command(spec, folder)}), or "
                         "unset DATA_DIR to download.",
                         lambda folder: download_to_folder(
                             spec.hub, spec.config, folder, f"Offline, put it in <mirror>/{MIRROR_FOLDER}/huggingface/"
                             f"{spec.name} (save_to_disk or its parquet files) and set DATA_DIR to <mirror>."))


def _download_command(spec: SentimentTaskSpec, folder: Path) -> str:
    if spec.config:  # a configuration of a multi-configuration repository (GLUE): its subfolder
        return (f"`huggingface-cli download {spec.hub} --repo-type dataset --include '{spec.config}/*' "
                f"--local-dir {folder}`")
    return f"`huggingface-cli download {spec.hub} --repo-type dataset --local-dir {folder}`"


def mirror_layout() -> str:
    """Where each dataset's files go in a mirror, one line per dataset."""
    return "\n".join(f"{name:7s} {MIRROR_FOLDER}/huggingface/{name}/  ({_source(spec)})"
                     for name, spec in sentiment_protocol().tasks.items())


# ----------------------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class SentimentRecipe:
    """The public fine-tuning script's settings (scripts/finetune_roberta_imdb.json; transformers'
    defaults for what it leaves out): θ0 and every task model are trained by it."""

    optimizer: str = "AdamW"
    lr: float = 1e-5
    weight_decay: float = 0.0          # not set by the script: transformers' default
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    batch_size: int = 16
    epochs: int = 1
    warmup_steps: int = 100            # linear warm-up, then linear decay to 0 (transformers' default schedule)
    dropout: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 384
    fisher_batch_size: int = 1         # the Fisher script: squared gradients one example at a time

    def steps(self, n_train: int) -> int:
        """Optimizer steps of the recipe on ``n_train`` examples (the last batch may be smaller)."""
        return self.epochs * math.ceil(n_train / self.batch_size)


# The public script's δ and scaling factor (scripts/uncertainty_based_gradient_matching.sh).
PAPER_DELTA = 1e-12
PAPER_ALPHA = 1.0

__all__ = [
    "PAPER_ALPHA", "PAPER_DELTA", "PAPER_SENTIMENT_BASE", "PAPER_SENTIMENT_TASKS", "TASKS_FILE", "SentimentProtocol",
    "SentimentRecipe", "SentimentTaskSpec", "default_train_examples", "held_out", "load_sentiment_task",
    "mirror_layout", "sentiment_protocol", "sentiment_task_spec", "stratified_sample",
]
