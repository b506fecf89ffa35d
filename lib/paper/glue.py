"""RoBERTa-base sequence classifiers on eight GLUE tasks: data, metrics, models and recipe.

The paper-scale text benchmark of DARE (Yu et al. 2024) and Twin-Merging (Lu et al. 2024),
METHODS.md §7-8: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI and RTE, each learnt by its own
fine-tune of ``FacebookAI/roberta-base``. ``data/glue_tasks.yaml`` holds, per task, the columns,
labels, official metrics, splits and canonical sizes; this module reads the data, scores
predictions, and loads the models.

**Data.** The hub copy ``nyu-mll/glue`` (one configuration per task) through Hugging Face
``datasets``, with the rules of ``lib.data``: with a mirror (``DATA_DIR`` or ``data_dir=``) only
the mirror is read, never written,

    <mirror>/text_paper/huggingface/<task>/   a DatasetDict saved with ``save_to_disk``, or the
                                              task's parquet files from a hub snapshot

(a snapshot of the whole repository, ``huggingface-cli download nyu-mll/glue --repo-type
dataset --local-dir <mirror>/text_paper/huggingface``, is exactly this layout: its folders are
the task names). Without a mirror the same folder under ``download_dir()/text_paper`` is filled
once (``datasets.load_dataset`` then ``save_to_disk``) and read from there afterwards.

**Splits.** GLUE's test labels are hidden, so the papers evaluate on the official validation
split (MNLI: validation_matched): that is our *test* split, never used for selection
(``max_test=1000`` keeps its first 1,000 examples, Twin-Merging's evaluation sets). Our
*validation* split is a seeded 10% of train carved by DARE's rule: the last 10% of
``numpy.random.RandomState(seed).permutation(len(train))``. Deviation from the project's
class-stratified carving (``lib.data.splits``), on purpose: the public experts come from DARE's
training script, which holds out exactly that part for choosing its best epoch, so with seed 0
our validation examples are (presumably: the experts' training runs are not published) ones
the experts never trained on, and selecting merge coefficients on them does not reward
memorisation. It also works unchanged for STS-B, whose labels are scores, not classes.

**Inputs.** RoBERTa's byte-level BPE, truncated to 128 tokens (DARE, Twin-Merging); a pair is
encoded ``<s> first </s></s> second </s>``, a single sentence ``<s> sentence </s>``. Batches
are padded on the right with the tokenizer's pad id (1 for RoBERTa, not BERT's 0), so RoBERTa's
position ids, counted over non-pad tokens, are those of the unpadded example.

**Metrics** (GLUE's, as DARE and Twin-Merging compute them with ``evaluate``'s ``glue``): CoLA
Matthews correlation; SST-2, QNLI, RTE, MNLI accuracy; MRPC, QQP F1 of label 1 and accuracy;
STS-B Pearson and Spearman correlation of the predicted and gold scores. A task's *score* is
the mean of its metrics (the papers' "averaged_scores"). All lie in [0, 1] (correlations in
[-1, 1]), like ``lib.metrics``; the papers print them x 100. Deviation: a correlation with a
constant side (undefined, NaN in scipy) is 0 here, the convention ``lib.metrics.matthews``
already follows, so a collapsed merge scores "no association" instead of poisoning an average.

**Models.** ``RobertaForSequenceClassification`` is split the project's way (``lib.models``):

- the **encoder** (merged) is ``RobertaModel`` without pooler, read at the ``<s>`` token:
  ``RobertaEncoder(input_ids, attention_mask) -> [B, hidden]``; its state-dict keys are the
  classifier's own ``roberta.*`` keys, so a published file splits by prefix, nothing renamed;
- the **head** (per task, never merged; DARE and Twin-Merging exclude ``.*classifier.*`` from
  every merge) is the classifier's ``dense -> tanh -> out_proj``, dropout between them in
  training: state ``{dense.weight, dense.bias, out_proj.weight, out_proj.bias}``, computed by
  :class:`SequenceClassificationHead` (``lib.heads``, whose ``head_module`` builds it from that state).

θ0 comes from a local model folder (``<models>/FacebookAI/roberta-base``; ``models_dir``, else
``$MODELS_DIR``, else ``models`` beside ``$DATA_DIR``: ``lib.paths.models_mirror``) or the hub.
Experts come from ``<models>/<repo>/<task>/roberta-base_lr1e-05`` (Twin-Merging's
``lu-vae/roberta-glue`` by default; sources in the YAML) or are downloaded once.

**Recipe.** :class:`GlueFinetuneRecipe` states DARE's fine-tuning settings (AdamW, lr 1e-5,
batch 16, 10 epochs, linear schedule with 6% warm-up, weight decay 0.01, gradient norm clipped
to 1, cross-entropy or STS-B's mean squared error, best epoch by the official validation score)
and converts them to the fields of the project's training loop
(``lib.experiments.training.FinetuneConfig``); it trains nothing itself.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..heads import CLASSIFIER_KEYS, SequenceClassificationHead, classification_head
from ..metrics import accuracy, f1_per_class, matthews
from .hub import download_to_folder, hub_folder_of
from ..paths import REPO_ROOT, data_mirror, download_dir, models_mirror
from .task_files import read_task_file

TASKS_FILE = REPO_ROOT / "data" / "glue_tasks.yaml"
PAPER_TEXT_TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
MIRROR_FOLDER = "text_paper"  # under the data mirror, and under download_dir()
HUB_DATASET = "nyu-mll/glue"
LABEL_COLUMN = "label"
METRICS = ("matthews", "accuracy", "f1", "pearson", "spearman")
ROBERTA_REPO = "FacebookAI/roberta-base"
MAX_LENGTH = 128


# ----------------------------------------------------------------------------- the task file
@dataclass(frozen=True)
class GlueTaskSpec:
    """One task of ``data/glue_tasks.yaml``."""

    name: str
    title: str
    config: str  # the configuration of nyu-mll/glue
    fields: tuple[str, ...]  # one text column, or the two of a pair
    labels: tuple[str, ...]  # one name per output (STS-B: its single score)
    metrics: tuple[str, ...]  # official metrics; the task's score is their mean
    evaluation_split: str  # the hub split the papers report on: our test split
    canonical: dict  # hub split -> size
    regression: tuple[float, float] | None  # STS-B: the range of the gold scores
    twin_merging_expert_score: float | None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        return len(self.fields) == 2


@dataclass(frozen=True)
class GlueProtocol:
    """The settings shared by all tasks: the model, the input length, the validation carve and
    where the published experts are."""

    base_model: str
    max_length: int
    validation_fraction: float
    expert_sources: dict  # source name -> {repo, folder, confirmed}
    default_expert_source: str
    tasks: dict  # task name -> GlueTaskSpec


def glue_protocol(path: str | os.PathLike | None = None) -> GlueProtocol:
    """The whole task file (default ``data/glue_tasks.yaml``), checked as it is read."""
    return _read_protocol(str(Path(path or TASKS_FILE).resolve()))


def glue_tasks(path: str | os.PathLike | None = None) -> dict[str, GlueTaskSpec]:
    return glue_protocol(path).tasks


def glue_task_spec(name: str, path: str | os.PathLike | None = None) -> GlueTaskSpec:
    tasks = glue_tasks(path)
    if name not in tasks:
        raise ValueError(f"Unknown paper-scale GLUE task {name!r}; {path or TASKS_FILE} has {', '.join(tasks)}.")
    return tasks[name]


@lru_cache(maxsize=4)
def _read_protocol(path: str) -> GlueProtocol:
    raw = read_task_file(path, "the GLUE tasks' columns, labels and metrics")
    validation = raw.get("validation") or {}
    if validation.get("from") != "train" or validation.get("rule") != "dare" \
            or not 0 < float(validation.get("fraction", 0)) < 1:
        raise ValueError(f"{path}: validation must be {{from: train, fraction: f, rule: dare}} with 0 < f < 1; "
                         f"got {validation}.")
    experts = raw.get("experts") or {}
    sources = dict(experts.get("sources") or {})
    bad = [s for s, v in sources.items() if not {"repo", "folder"} <= set(v) or "{task}" not in str(v["folder"])]
    if not sources or bad or experts.get("default_source") not in sources:
        raise ValueError(f"{path}: experts needs sources, each with a repo and a folder containing {{task}}, and a "
                         f"default_source among them; check {bad or 'default_source'}.")
    return GlueProtocol(
        base_model=str(raw.get("base_model", ROBERTA_REPO)), max_length=int(raw.get("max_length", MAX_LENGTH)),
        validation_fraction=float(validation["fraction"]), expert_sources=sources,
        default_expert_source=str(experts["default_source"]),
        tasks={name: _task_spec(name, entry, path) for name, entry in raw["tasks"].items()},
    )


def _task_spec(name: str, entry: dict, path: str) -> GlueTaskSpec:
    where = f"{path}, task {name!r}"
    required = ("title", "config", "fields", "num_labels", "labels", "metrics", "evaluation_split", "canonical")
    missing = [k for k in required if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}.")
    fields, labels, metrics = (tuple(str(x) for x in entry[k]) for k in ("fields", "labels", "metrics"))
    if len(fields) not in (1, 2):
        raise ValueError(f"{where}: fields must name one text column or a pair; got {list(fields)}.")
    if len(labels) != int(entry["num_labels"]):
        raise ValueError(f"{where}: num_labels is {entry['num_labels']} but labels names {len(labels)}.")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"{where}: metrics must be among {METRICS}; got {list(metrics) or 'none'}.")
    regression = entry.get("regression")
    if (regression is not None) != (len(labels) == 1):
        raise ValueError(f"{where}: a task with one output is a regression and needs regression: {{min, max}}; "
                         "a classification task has at least two labels and no regression entry.")
    if entry["evaluation_split"] not in entry["canonical"]:
        raise ValueError(f"{where}: evaluation_split {entry['evaluation_split']!r} is not among the canonical splits.")
    score = entry.get("twin_merging_expert_score")
    return GlueTaskSpec(
        name=name, title=str(entry["title"]), config=str(entry["config"]), fields=fields, labels=labels,
        metrics=metrics, evaluation_split=str(entry["evaluation_split"]),
        canonical={k: int(v) for k, v in entry["canonical"].items()},
        regression=None if regression is None else (float(regression["min"]), float(regression["max"])),
        twin_merging_expert_score=None if score is None else float(score),
    )


# ----------------------------------------------------------------------------- splits and tasks
@dataclass(frozen=True, eq=False)
class GlueSplit:
    """One split: the text columns, the labels (int64 classes, float32 scores for STS-B) and
    each example's row in the hub split it came from."""

    first: list[str]
    second: list[str] | None  # None for a single-sentence task
    labels: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        return self.second is not None

    def take(self, indices) -> "GlueSplit":
        """The examples at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        second = None if self.second is None else [self.second[i] for i in indices]
        return GlueSplit([self.first[i] for i in indices], second, self.labels[indices], self.rows[indices])


@dataclass(frozen=True, eq=False)
class PaperTextTask:
    name: str
    title: str
    classes: list[str]  # one name per output; len(classes) is the head's output size
    fields: tuple[str, ...]
    train: GlueSplit
    validation: GlueSplit
    test: GlueSplit
    metrics: tuple[str, ...]
    regression: bool
    notes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def metric(self) -> str:
        """The name of the task's score: its one metric, or ``mean(f1, accuracy)`` and the like."""
        return self.metrics[0] if len(self.metrics) == 1 else f"mean({', '.join(self.metrics)})"


def carve_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """DARE's held-out part of a training set of ``n`` examples: permute ``range(n)`` with
    ``numpy.random.RandomState(seed)``; the first ``int((1 - fraction) n)`` train, the rest
    validate. Returns (train, validation) indices, each sorted (the file's order is kept)."""
    permutation = np.random.RandomState(seed).permutation(n)
    kept = int((1 - fraction) * n)
    return np.sort(permutation[:kept]), np.sort(permutation[kept:])


def load_glue_task(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0,
                   evaluation_split: str | None = None, max_test: int | None = None,
                   tasks_file: str | os.PathLike | None = None) -> PaperTextTask:
    """Read a task's train split and its evaluation split, and carve its validation split.

    ``data_dir`` is a mirror (default ``DATA_DIR``; none: download once into ``download_dir()``);
    ``seed`` chooses the validation examples (seed 0: DARE's); ``evaluation_split`` overrides the
    task file's (e.g. MNLI's ``validation_mismatched``); ``max_test`` keeps the first examples of
    the test split (Twin-Merging: 1000).
    """
    protocol = glue_protocol(tasks_file)
    spec = glue_task_spec(name, tasks_file)
    evaluation_split = evaluation_split or spec.evaluation_split
    if evaluation_split.startswith("test"):
        raise ValueError(f"{evaluation_split!r}: GLUE's test labels are hidden (-1 in the hub copy); the papers "
                         f"evaluate on {spec.evaluation_split!r}.")
    mirror = data_mirror(data_dir)
    folder = _task_folder(spec, mirror)
    splits = _open_task_folder(folder)
    missing = [s for s in ("train", evaluation_split) if s not in splits]
    if missing:
        raise ValueError(f"{folder}: no {' or '.join(missing)} split (found {', '.join(sorted(splits)) or 'none'}). "
                         f"It should hold the {HUB_DATASET} configuration {spec.config!r}.")
    train = _read_split(spec, splits["train"], f"{folder}, train split")
    test = _read_split(spec, splits[evaluation_split], f"{folder}, {evaluation_split} split")
    origin = f"mirror folder {folder}" if mirror is not None else f"{HUB_DATASET} ({spec.config}) cached in {folder}"
    notes = [f"source: {origin}",
             f"test = GLUE's {evaluation_split} split (GLUE's test labels are hidden; the papers report on it)"]
    sizes = {"train": len(train), evaluation_split: len(test)}
    expected = {k: spec.canonical.get(k) for k in sizes}
    if sizes != expected:
        notes.append(f"split sizes {sizes} differ from the canonical {expected}: not the split the papers report on")
    if max_test is not None and max_test < len(test):
        test = test.take(np.arange(max_test))
        notes.append(f"test = the first {max_test:,} examples of {evaluation_split} (Twin-Merging's evaluation set)")
    rest, validation = carve_validation(len(train), protocol.validation_fraction, seed)
    notes.append(f"validation = {protocol.validation_fraction:.0%} of train held out by DARE's rule "
                 f"(RandomState({seed}) permutation, last part)")
    return PaperTextTask(name, spec.title, list(spec.labels), spec.fields, train.take(rest), train.take(validation),
                         test, spec.metrics, spec.regression is not None, tuple(notes))


def _task_folder(spec: GlueTaskSpec, mirror: Path | None) -> Path:
    """The task's folder: the mirror's (it must exist), or the download folder, filled once."""
    return hub_folder_of(mirror, Path(MIRROR_FOLDER) / "huggingface" / spec.name,
                         lambda folder: f"{spec.title} is read from there. Put the {HUB_DATASET} configuration "
                         f"{spec.config!r} in it (DatasetDict.save_to_disk, or its parquet files: `huggingface-cli "
                         f"download {HUB_DATASET} --repo-type dataset --local-dir {folder.parent}` fetches every task), "
                         "or unset DATA_DIR to download.",
                         lambda folder: _download(spec, folder))


def _open_task_folder(folder: Path, source: str = f"the {HUB_DATASET} configuration") -> dict:
    """The splits of a saved DatasetDict, or of a hub snapshot's parquet files. ``source`` names
    what the folder should hold, for the error (``lib.paper.sentiment`` reads its folders here too)."""
    import datasets

    if (folder / "dataset_dict.json").is_file():
        return dict(datasets.load_from_disk(str(folder)))
    files: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.parquet")):
        # hub layout: <config>/train-00000-of-00001.parquet, mnli/validation_matched-00000-of-00001.parquet
        split = re.sub(r"-\d+(-of-\d+)?$", "", path.stem)
        files.setdefault(split, []).append(str(path))
    if not files:
        raise FileNotFoundError(f"{folder} holds neither a saved DatasetDict (dataset_dict.json) nor parquet files. "
                                f"Save {source} there with DatasetDict.save_to_disk, or copy its parquet files.")
    cache = download_dir() / MIRROR_FOLDER / "parquet_cache"  # the arrow files datasets builds from parquet
    return dict(datasets.load_dataset("parquet", data_files=files, cache_dir=str(cache)))


def _read_split(spec: GlueTaskSpec, dataset, where: str) -> GlueSplit:
    """Texts and labels of one hub split, checked against the task file."""
    columns = set(dataset.column_names)
    missing = [c for c in (*spec.fields, LABEL_COLUMN) if c not in columns]
    if missing:
        raise ValueError(f"{where}: no column {', '.join(map(repr, missing))} (found {sorted(columns)}). {spec.title} "
                         f"needs {', '.join(spec.fields)} and {LABEL_COLUMN}: is this the {spec.config!r} configuration?")
    feature = dataset.features[LABEL_COLUMN]
    if spec.regression is None and hasattr(feature, "names") and list(feature.names) != list(spec.labels):
        raise ValueError(f"{where}: the labels are named {list(feature.names)} but data/glue_tasks.yaml says "
                         f"{list(spec.labels)} (in that order). Is this {spec.title}?")
    raw = np.asarray(dataset.with_format("numpy")[LABEL_COLUMN])
    labels = _checked_labels(spec, raw, where)
    texts = [[str(t) for t in dataset[field]] for field in spec.fields]
    return GlueSplit(texts[0], texts[1] if spec.is_pair else None, labels, np.arange(len(labels)))


def _checked_labels(spec: GlueTaskSpec, raw: np.ndarray, where: str) -> np.ndarray:
    if spec.regression is not None:
        low, high = spec.regression
        labels = raw.astype(np.float32)
        bad = ~((labels >= low) & (labels <= high))
    else:
        labels = raw.astype(np.int64)
        bad = (labels < 0) | (labels >= spec.num_labels) | (raw != labels)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        allowed = f"scores in [{low}, {high}]" if spec.regression is not None else f"labels 0..{spec.num_labels - 1}"
        raise ValueError(f"{where}: row {first} has label {raw[first].item()!r}; {spec.title} has {allowed} "
                         f"({int(bad.sum())} rows outside). A test split's hidden labels are -1: read validation.")
    return labels


def _download(spec: GlueTaskSpec, folder: Path) -> None:
    """``datasets.load_dataset`` from the hub, saved to ``folder`` (atomically) for later runs."""
    download_to_folder(HUB_DATASET, spec.config, folder,
                       f"Offline, put it in <mirror>/{MIRROR_FOLDER}/huggingface/{spec.name} (save_to_disk or its "
                       "parquet files) and set DATA_DIR to <mirror>.")


def mirror_layout() -> str:
    """Where each task's files go in a mirror, one line per task."""
    return "\n".join(f"{name:5s} {MIRROR_FOLDER}/huggingface/{name}/  ({HUB_DATASET}, configuration {spec.config})"
                     for name, spec in glue_tasks().items())


# ----------------------------------------------------------------------------- tokens
def tokenize(tokenizer, split: GlueSplit, max_length: int = MAX_LENGTH, chunk: int = 10_000) -> list[list[int]]:
    """Token ids of every example: ``<s> a </s>``, or ``<s> a </s></s> b </s>`` for a pair
    (RoBERTa's tokenizer adds the markers), truncated to ``max_length`` tokens in all, longest
    part first. Tokenized in chunks, so QQP's 364k pairs never sit in one batch encoding."""
    ids: list[list[int]] = []
    for start in range(0, len(split), chunk):
        first = split.first[start: start + chunk]
        second = None if split.second is None else split.second[start: start + chunk]
        ids += tokenizer(first, second, truncation=True, max_length=max_length)["input_ids"]
    return ids


def pad_batch(rows: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` (with ``pad_token_id``: 1 for RoBERTa) and ``attention_mask``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def collate(split, indices, pad_token_id: int = 1) -> dict[str, torch.Tensor]:
    """A batch of a prepared split whose ``inputs`` are token-id lists (the signature of
    ``PreparedSplit.collate``; bind the pad id with ``functools.partial``)."""
    return pad_batch([split.inputs[i] for i in indices], pad_token_id)


# ----------------------------------------------------------------------------- metrics
def pearson(x, y) -> float:
    """Pearson's correlation; 0 when either side is constant (see the module doc)."""
    x, y = _paired(x, y)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else 0.0


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n of ``x``; tied values share the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64).ravel()
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def spearman(x, y) -> float:
    """Spearman's correlation: Pearson's of the average ranks."""
    x, y = _paired(x, y)
    return pearson(average_ranks(x), average_ranks(y))


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"correlation needs two equally long, non-empty vectors; got {len(x)} and {len(y)}.")
    return x, y


def predictions(outputs: torch.Tensor | np.ndarray, regression: bool) -> np.ndarray:
    """What a head's outputs [N, num_labels] predict: the argmax class, or STS-B's score."""
    outputs = np.asarray(outputs.detach().float().cpu() if isinstance(outputs, torch.Tensor) else outputs)
    if regression:
        if outputs.ndim == 2 and outputs.shape[1] != 1:
            raise ValueError(f"a regression head has one output; got {outputs.shape[1]}.")
        return outputs.reshape(-1).astype(np.float64)
    return outputs.argmax(axis=1)


def glue_scores(task: str | GlueTaskSpec, predicted, gold) -> dict[str, float]:
    """Each official metric of ``task`` and ``score``, their mean. ``predicted`` is class ids
    (or STS-B's scores); :func:`predictions` turns a head's outputs into them."""
    spec = task if isinstance(task, GlueTaskSpec) else glue_task_spec(task)
    if spec.regression is None:
        classes = spec.num_labels
        metric = {"accuracy": lambda y, p: accuracy(y, p),
                  "matthews": lambda y, p: matthews(y, p, classes),
                  "f1": lambda y, p: float(f1_per_class(y, p, classes)[1])}  # GLUE's F1: the positive class
    else:
        metric = {"pearson": pearson, "spearman": spearman}
    scores = {name: metric[name](gold, predicted) for name in spec.metrics}
    scores["score"] = float(np.mean(list(scores.values())))
    return scores


# ----------------------------------------------------------------------------- models
class RobertaEncoder(nn.Module):
    """RoBERTa without pooler, read at the ``<s>`` token: the merged part of a GLUE expert.

    ``encoder(input_ids=..., attention_mask=...)`` gives [B, hidden]. The module's own
    attribute is named ``roberta``, so its state-dict keys are ``RobertaForSequenceClassification``'s
    (``roberta.embeddings...``, ``roberta.encoder.layer.N...``).
    """

    def __init__(self, roberta: nn.Module):
        super().__init__()
        self.roberta = roberta
        self.feature_dim = int(roberta.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]


# The head's module lives with the project's other heads (lib.heads), so training, statistics and
# evaluation build it from its state like any head; these names keep this module's interface.
HEAD_KEYS = CLASSIFIER_KEYS


def classification_head_module(state: dict[str, torch.Tensor], dropout: float = 0.1) -> SequenceClassificationHead:
    """The head whose state is ``state`` (keys ``HEAD_KEYS``), in eval mode; train it by
    calling ``.train()`` (its parameters keep their gradients)."""
    return classification_head(state, dropout)


def initial_head(hidden_size: int, num_labels: int, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A fresh head as transformers initialises one (weights N(0, std²) with RoBERTa's
    ``initializer_range`` 0.02, biases 0), from its own seeded generator: the head an expert
    is fine-tuned with."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"dense.weight": (hidden_size, hidden_size), "out_proj.weight": (num_labels, hidden_size)}
    state = {k: torch.randn(shape, generator=generator) * std for k, shape in shapes.items()}
    return {**state, "dense.bias": torch.zeros(hidden_size), "out_proj.bias": torch.zeros(num_labels)}


def load_roberta(models_dir: str | os.PathLike | None = None, *, config=None, attn_implementation: str = "eager"):
    """θ0 and its tokenizer: ``(RobertaEncoder, tokenizer)``.

    ``config`` (a ``RobertaConfig``) builds a randomly initialised encoder of that shape instead
    and returns no tokenizer (tests, and the paper path exercised with tiny models). Otherwise
    the weights come from ``<models>/FacebookAI/roberta-base`` when a model folder is set, else
    from the hub (downloaded once into ``download_dir()/models``). Eager attention by default,
    as ``lib.models.load_text_encoder``: torch.func and the per-example statistics need it;
    pass ``"sdpa"`` for faster fine-tuning on a GPU.
    """
    from transformers import AutoTokenizer, RobertaModel

    if config is not None:
        config._attn_implementation = attn_implementation
        return RobertaEncoder(RobertaModel(config, add_pooling_layer=False).eval()), None
    folder = _roberta_folder(models_dir)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # roberta-base's lm_head and pooler weights are unused here, as expected
    try:
        model = RobertaModel.from_pretrained(str(folder), add_pooling_layer=False,
                                             attn_implementation=attn_implementation)
    finally:
        hf_logging.set_verbosity(verbosity)
    return RobertaEncoder(model.eval()), AutoTokenizer.from_pretrained(str(folder))


def _roberta_folder(models_dir) -> Path:
    """``<models>/FacebookAI/roberta-base`` (it must be there), or the hub copy downloaded once:
    ``lib.paper.clip.hub_folder``'s rule, shared with the CLIP models."""
    from .clip import hub_folder

    return hub_folder(ROBERTA_REPO, models_dir, patterns=("*.json", "*.txt", "*.safetensors"))


def _snapshot(repo: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, cache_dir=str(download_dir() / "models" / "hub"), allow_patterns=patterns))
    except Exception as err:  # offline, or no such repository: say where the files can go instead
        raise RuntimeError(f"Could not download {repo} ({type(err).__name__}: {err}). Offline, put its files in "
                           f"<models>/{repo} and set models_dir (or MODELS_DIR) to <models>.") from err


# Keys a sequence-classifier file may hold that are no weights of the encoder or the head:
# buffers older transformers saved, and a pooler RobertaForSequenceClassification never uses.
_NOT_WEIGHTS = re.compile(r"^roberta\.(embeddings\.position_ids|embeddings\.token_type_ids|pooler\..*)$")


def split_sequence_classifier(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A ``RobertaForSequenceClassification`` state dict as ``(encoder state, head state)``:
    ``roberta.*`` kept as it is (:class:`RobertaEncoder`'s keys), ``classifier.*`` without the
    prefix. Any other key is an error, not silently dropped."""
    encoder, head, unknown = {}, {}, []
    for key, value in state.items():
        if _NOT_WEIGHTS.match(key):
            continue
        if key.startswith("roberta."):
            encoder[key] = value
        elif key.startswith("classifier."):
            head[key.removeprefix("classifier.")] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"keys that are neither roberta.* nor classifier.*: {sorted(unknown)[:8]}. Is this a "
                       "RobertaForSequenceClassification file?")
    if set(head) != set(HEAD_KEYS):
        raise KeyError(f"the classifier has keys {sorted(head)}, not {', '.join(HEAD_KEYS)}: not a RoBERTa "
                       "classification head.")
    return encoder, head


def load_expert_folder(folder: str | os.PathLike, base: RobertaEncoder, num_labels: int | None = None
                       ) -> tuple[RobertaEncoder, dict[str, torch.Tensor]]:
    """An expert's encoder and head from a transformers ``RobertaForSequenceClassification``
    folder (``model.safetensors``, its shards, or ``pytorch_model.bin``). ``base`` (θ0) gives the
    architecture and is not changed; ``num_labels``, when given, must be the head's."""
    import copy

    from .clip import read_hf_state_dict

    folder = Path(folder)
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin")):
        raise FileNotFoundError(f"{folder} holds no model.safetensors, model.safetensors.index.json or "
                                "pytorch_model.bin: it should be a RobertaForSequenceClassification folder (e.g. "
                                "lu-vae/roberta-glue's cola/roberta-base_lr1e-05).")
    encoder_state, head = split_sequence_classifier(read_hf_state_dict(folder))
    outputs = int(head["out_proj.weight"].shape[0])
    if num_labels is not None and outputs != num_labels:
        raise ValueError(f"{folder}: the classifier has {outputs} outputs but the task has {num_labels}. Is this the "
                         "expert of another task?")
    encoder = copy.deepcopy(base)
    try:
        encoder.load_state_dict(encoder_state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{folder}: the weights do not fit the pretrained encoder ({err}). Load experts of the same "
                         "architecture as θ0 (RoBERTa-base).") from err
    return encoder, head


def expert_folder(task: str, models_dir: str | os.PathLike | None = None, source: str | None = None,
                  tasks_file: str | os.PathLike | None = None) -> Path:
    """The folder of ``task``'s published expert: ``<models>/<repo>/<task>/roberta-base_lr1e-05``
    when a model folder is set (it must be there), else downloaded once from the hub."""
    protocol = glue_protocol(tasks_file)
    spec = glue_task_spec(task, tasks_file)
    source = source or protocol.default_expert_source
    if source not in protocol.expert_sources:
        raise ValueError(f"expert source {source!r}: data/glue_tasks.yaml lists {', '.join(protocol.expert_sources)}.")
    repo = protocol.expert_sources[source]["repo"]
    inner = protocol.expert_sources[source]["folder"].format(task=spec.name)
    mirror = models_mirror(models_dir)
    if mirror is not None:
        folder = mirror / repo / inner
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found. Put the hub repository {repo} in {mirror / repo} "
                                    f"(huggingface-cli download {repo} --local-dir {mirror / repo}), or unset "
                                    "models_dir / MODELS_DIR to download.")
        return folder
    folder = _snapshot(repo, [f"{inner}/*.json", f"{inner}/*.safetensors"]) / inner
    if not any(folder.glob("*.safetensors")):  # an older upload: the weights as pytorch_model.bin
        folder = _snapshot(repo, [f"{inner}/*.json", f"{inner}/pytorch_model.bin"]) / inner
    return folder


def load_glue_expert(task: str, base: RobertaEncoder, models_dir: str | os.PathLike | None = None,
                     source: str | None = None, tasks_file: str | os.PathLike | None = None
                     ) -> tuple[RobertaEncoder, dict[str, torch.Tensor]]:
    """The published expert of ``task``: its encoder and its head state."""
    folder = expert_folder(task, models_dir, source, tasks_file)
    return load_expert_folder(folder, base, glue_task_spec(task, tasks_file).num_labels)


# ----------------------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class GlueFinetuneRecipe:
    """DARE's fine-tuning recipe for the RoBERTa-base GLUE experts (its train_plms_glue.py:
    transformers' Trainer with these arguments and its defaults): the whole model and a fresh
    head are trained, and the epoch with the best validation score is kept."""

    optimizer: str = "AdamW"
    lr: float = 1e-5
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Trainer defaults
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 16
    epochs: int = 10
    warmup_ratio: float = 0.06  # of all steps; then linear decay to 0 (Trainer's "linear" schedule)
    max_length: int = MAX_LENGTH
    dropout: float = 0.1  # RoBERTa's hidden and classifier dropout
    loss: str = "cross-entropy; mean squared error for STS-B"
    selection: str = "the epoch with the best validation score (mean of the task's metrics)"

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch_size)

    def total_steps(self, n_train: int) -> int:
        return self.steps_per_epoch(n_train) * self.epochs

    def warmup_steps(self, n_train: int) -> int:
        """Trainer's rule: ``ceil(warmup_ratio x total steps)``."""
        return math.ceil(self.warmup_ratio * self.total_steps(n_train))

    def finetune_settings(self, n_train: int, n_validation: int, seed: int = 0) -> dict:
        """The recipe as the fields of ``lib.experiments.training.FinetuneConfig``: evaluate once
        an epoch on the whole validation split, never stop early (patience = epochs), keep the best."""
        return {"max_steps": self.total_steps(n_train), "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "warmup_steps": self.warmup_steps(n_train),
                "eval_every": self.steps_per_epoch(n_train), "patience": self.epochs,
                "max_eval_examples": n_validation, "seed": seed, "max_grad_norm": self.max_grad_norm}


__all__ = [
    "HEAD_KEYS", "MAX_LENGTH", "PAPER_TEXT_TASKS", "ROBERTA_REPO", "TASKS_FILE", "GlueFinetuneRecipe", "GlueProtocol",
    "GlueSplit", "GlueTaskSpec", "PaperTextTask", "RobertaEncoder", "SequenceClassificationHead", "average_ranks",
    "carve_validation", "classification_head_module", "collate", "expert_folder", "glue_protocol", "glue_scores",
    "glue_task_spec", "glue_tasks", "initial_head", "load_expert_folder", "load_glue_expert", "load_glue_task",
    "load_roberta", "mirror_layout", "pad_batch", "pearson", "predictions", "spearman", "split_sequence_classifier",
    "tokenize",
]
