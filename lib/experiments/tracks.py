"""A *track* is one small-scale benchmark: a pretrained backbone, its tasks, and their data
prepared for that backbone (token ids for text, normalised 32x32 images for vision).

Both tracks expose the same interface, so training, statistics, merging and evaluation are
written once:

    track = TextTrack(["sst2", "trec"], data_dir="../shared/data")
    encoder = track.pretrained_encoder()         # θ0, a fresh module each call
    split = track.split("sst2", "validation")    # a PreparedSplit
    for batch in split.batches(64): model(**batch_inputs(batch))
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import data as datasets
from ..models import load_cifar_resnet, load_text_encoder, minilm_path
from ..paths import REPO_ROOT, download_dir, models_mirror
from .cache import content_hash

HEAD_KINDS = ("probe", "few_shot", "joint", "zero_shot")
CIFAR_RESNETS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
CIFAR_RESNET_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{file}"


@dataclass
class PreparedSplit:
    """One split of one task, ready to batch. ``inputs`` is a list of token-id lists (text)
    or a uint8 image array (vision); ``collate`` turns a list of indices into model inputs."""

    task: str
    inputs: object
    labels: np.ndarray
    collate: object  # Callable[[PreparedSplit, np.ndarray], dict[str, torch.Tensor]]
    lengths: np.ndarray | None = None  # text: token counts, used to batch similar lengths

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        batch = self.collate(self, np.asarray(indices))
        labels = np.asarray(self.labels[indices])
        # class ids; a regression's scores (STS-B) stay floats
        batch["labels"] = torch.as_tensor(labels, dtype=torch.float32 if labels.dtype.kind == "f" else torch.long)
        return batch

    def eval_order(self) -> np.ndarray:
        """An order that minimises padding (sorted by length) for inference."""
        return np.argsort(self.lengths, kind="stable") if self.lengths is not None else np.arange(len(self))

    def batches(self, batch_size: int, with_index: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in :meth:`eval_order`; ``with_index`` adds ``index``, the rows each holds."""
        order = self.eval_order()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.batch(idx)
            if with_index:
                batch["index"] = torch.as_tensor(idx)
            yield batch

    def rows(self, indices) -> "PreparedSplit":
        """The examples at ``indices``, in that order."""
        idx = np.asarray(indices)
        inputs = [self.inputs[i] for i in idx] if isinstance(self.inputs, list) else self.inputs[idx]
        lengths = None if self.lengths is None else self.lengths[idx]
        return PreparedSplit(self.task, inputs, self.labels[idx], self.collate, lengths)

    def subset(self, n: int | None, seed: int = 0) -> "PreparedSplit":
        """A seeded, class-stratified subset of at most n examples (all of them if n is None)."""
        if n is None or n >= len(self):
            return self
        return self.rows(stratified_indices(self.labels, n, seed))


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices drawn without replacement, each class in proportion to its frequency."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    # hand the remainder to the largest classes so the total is exactly n
    for c in np.argsort(-counts)[: n - quota.sum()]:
        quota[c] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything in a batch that the encoder takes (drops labels and bookkeeping)."""
    return {k: v for k, v in batch.items() if k not in ("labels", "index")}



def scored_officially(track) -> bool:
    """Whether a track's tasks are scored by official metrics that are not means of per-example
    outcomes (GLUE: Matthews, F1, correlations), rather than by accuracy. Duck-typed tracks
    (without ``task_score``) score accuracy."""
    return getattr(track, "task_score", "accuracy") == "official"

@dataclass
class Track:
    """Common part of both tracks: task list, data location, split caps, seed."""

    tasks: list[str]
    data_dir: str | None = None
    seed: int = 0
    max_train: int | None = None
    max_validation: int | None = 500
    max_test: int | None = 1000
    # What each task's head is (lib.experiments.training.initial_heads): "probe" (a linear probe
    # on θ0's features), "few_shot" (a probe on head_shots examples per class), "joint" (trained
    # with each expert) or "zero_shot" (text: built from class descriptions, as CLIP's).
    head_kind: str = "probe"
    head_shots: int = 16
    # training examples per task that re-estimate a merged encoder's BatchNorm statistics
    batchnorm_examples: int = 1024
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.head_kind not in HEAD_KINDS:
            raise ValueError(f"head_kind = {self.head_kind!r}: choose one of {', '.join(HEAD_KINDS)}.")
        if self.head_kind == "zero_shot" and not self.has_text_tower:
            raise ValueError(f"head_kind = 'zero_shot' needs class descriptions embedded by a text model; the "
                             f"{self.name} track has none. Use 'few_shot' (its analogue), 'joint' or 'probe'.")
        if self.head_shots < 1:
            raise ValueError(f"head_shots = {self.head_shots}: pass a positive number of examples per class.")
        if self.batchnorm_examples < 1:
            raise ValueError(f"batchnorm_examples = {self.batchnorm_examples}: pass a positive number of "
                             "training examples per task.")

    has_text_tower: bool = field(default=False, init=False, repr=False)
    scale: str = field(default="small", init=False, repr=False)  # "paper": the papers' models and tasks
    uses_published_experts = False  # True: the experts are read (paper scale), not trained
    # a track whose encoder has BatchNorm also scores every merge with its statistics re-estimated
    has_batchnorm: bool = field(default=False, init=False, repr=False)
    # What a task's score is: "accuracy" (a mean of per-example outcomes, so its standard error is
    # analytic), or "official" (GLUE's official metrics of the predictions, lib.paper.glue: the
    # track turns head outputs into results itself, and uncertainties come from a bootstrap).
    task_score: str = field(default="accuracy", init=False, repr=False)
    # Examples whose per-example gradients exist at once when a Fisher is computed
    # (lib.statistics' chunk_size): memory grows with it times the model's size.
    fisher_chunk = 16

    def expert_config(self, task: str, config):
        """The training settings of ``task``'s expert: ``config`` itself, unless the track's
        recipe depends on the task (the GLUE recipe counts epochs of each task's data)."""
        return config

    def split(self, task: str, split: str) -> PreparedSplit:
        key = (task, split)
        if key not in self._cache:
            raw = self._raw_task(task)
            cap = {"train": self.max_train, "validation": self.max_validation, "test": self.max_test}[split]
            self._cache[key] = self._prepare(task, getattr(raw, split)).subset(cap, self.seed)
        return self._cache[key]

    def raw(self, task: str):
        return self._raw_task(task)

    def num_classes(self, task: str) -> int:
        return len(self._raw_task(task).classes)

    def metric(self, task: str) -> str:
        return getattr(self._raw_task(task), "metric", "accuracy")

    def _raw_task(self, task: str):
        key = ("raw", task)
        if key not in self._cache:
            self._cache[key] = self._load(task)
        return self._cache[key]

    def display_name(self, task: str) -> str:
        """How tables name ``task``: the loader's name (a user task's folder or file stem, or the
        name its task description gives), unless two tasks of the track would share it."""
        if "display_names" not in self._cache:
            names = {t: getattr(self._raw_task(t), "name", t) for t in self.tasks}
            self._cache["display_names"] = {t: n if list(names.values()).count(n) == 1 else t for t, n in names.items()}
        return self._cache["display_names"].get(task, task)

    def fingerprint(self, task: str) -> str:
        """A hash of the contents (inputs and labels) of the task's three prepared splits: a
        mirror whose data or labels changed under the same task name gets new cache keys."""
        key = ("fingerprint", task)
        if key not in self._cache:
            digest = hashlib.sha256()
            for which in ("train", "validation", "test"):
                split = self.split(task, which)
                digest.update(f"{which}:{len(split)}|".encode())
                kind = np.float64 if split.labels.dtype.kind == "f" else np.int64  # a regression's scores
                digest.update(np.ascontiguousarray(split.labels, dtype=kind).tobytes())
                if hasattr(split.inputs, "digest"):  # images kept on disk (paper scale): their identity
                    digest.update(split.inputs.digest().encode())
                elif isinstance(split.inputs, np.ndarray):
                    digest.update(np.ascontiguousarray(split.inputs).tobytes())
                else:  # token-id lists
                    for row in split.inputs:
                        digest.update(np.asarray(row, dtype=np.int64).tobytes() + b"|")
            self._cache[key] = digest.hexdigest()[:16]
        return self._cache[key]

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The weights that make θ0 what it is (a track with a text tower adds the tower that
        builds its zero-shot heads)."""
        return self.pretrained_encoder().state_dict()

    def backbone_weights(self) -> str:
        """A content hash of ``backbone_state``, once per track. Cache keys name θ0 by its weights
        as well as its name: two checkpoints under one name (a re-download, a local copy, the
        rehearsal's random stand-ins) are two backbones, and must not share cached results."""
        if "backbone_weights" not in self._cache:
            self._cache["backbone_weights"] = content_hash(self.backbone_state())
        return self._cache["backbone_weights"]

    def identity(self, tasks=()) -> dict:
        """What identifies this track's backbone and, for ``tasks``, their data in cache keys."""
        identity = {
            "track": self.name, "backbone": self.backbone_id(), "backbone_weights": self.backbone_weights(),
            "seed": self.seed, "caps": [self.max_train, self.max_validation, self.max_test],
        }
        if tasks:
            identity["data"] = {t: self.fingerprint(t) for t in tasks}
        return identity


# ----------------------------------------------------------------------------- text
def _text_collate(split: PreparedSplit, idx: np.ndarray) -> dict[str, torch.Tensor]:
    rows = [split.inputs[i] for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # 0 is BERT's [PAD]
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class TextTrack(Track):
    """MiniLM-L6 + SentEval/TweetEval tasks."""

    name: str = "text"
    model_name_or_path: str | None = None
    max_length: int = 64

    def backbone_id(self) -> str:
        return f"{Path(self.model_name_or_path or minilm_path()).name}@{self.max_length}"

    def _load(self, task):
        return datasets.load_text_task(task, data_dir=self.data_dir, seed=self.seed)

    def _tokenizer(self):
        if "tokenizer" not in self._cache:
            self._cache["encoder0"], self._cache["tokenizer"] = load_text_encoder(self.model_name_or_path)
        return self._cache["tokenizer"]

    def _prepare(self, task, split) -> PreparedSplit:
        return self.prepare_texts(split.texts, split.labels, task)

    def prepare_texts(self, texts, labels=None, task: str = "") -> PreparedSplit:
        """Any sentences (e.g. class descriptions) tokenized like the track's data."""
        ids = self._tokenizer()(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        labels = np.zeros(len(ids), dtype=np.int64) if labels is None else np.asarray(labels)
        return PreparedSplit(task, ids, labels, _text_collate, np.array([len(r) for r in ids]))

    def pretrained_encoder(self):
        import copy

        self._tokenizer()
        return copy.deepcopy(self._cache["encoder0"])

    # Token embeddings are frozen while fine-tuning: a task touches only the rows of the tokens
    # it contains, and updating (and AdamW-stepping) all 30522 rows doubles the step's cost on CPU.
    frozen_parameters: tuple[str, ...] = ("transformer.embeddings.word_embeddings.weight",)
    has_text_tower: bool = field(default=True, init=False, repr=False)
    # Per-example squared gradients from layer hooks (exact; HF attention masks defeat vmap).
    fisher_method: str = "hooks"


# ----------------------------------------------------------------------------- vision
def _image_collate(split: PreparedSplit, idx: np.ndarray) -> dict[str, torch.Tensor]:
    return {"pixel_values": datasets.prepare_images(split.inputs[idx], size=32, channels=3)}


def cifar_resnet_checkpoint(backbone: str = "resnet20", models_dir: str | None = None) -> Path:
    """A CIFAR ResNet checkpoint: from the local model folder (see :func:`models_mirror`), else
    downloaded once from akamaster/pytorch_resnet_cifar10."""
    if backbone not in CIFAR_RESNETS:
        raise ValueError(f"backbone = {backbone!r}: choose one of {', '.join(CIFAR_RESNETS)}.")
    file = CIFAR_RESNETS[backbone]
    mirror = models_mirror(models_dir)
    if mirror is not None:
        path = mirror / "cifar_resnet" / file
        if not path.exists():
            raise FileNotFoundError(f"{path} not found. Put {file} (from {CIFAR_RESNET_URL.format(file=file)}) in "
                                    f"{mirror / 'cifar_resnet'}, or point models_dir / MODELS_DIR at a folder that has it.")
        return path
    path = download_dir() / "models" / file
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        try:
            urllib.request.urlretrieve(CIFAR_RESNET_URL.format(file=file), tmp)
        except OSError as err:
            raise RuntimeError(f"Could not download {file} ({err}). Offline, put it in <models>/cifar_resnet/ and "
                               "set models_dir (or MODELS_DIR) to <models>, e.g. ../shared/models.") from err
        os.replace(tmp, path)
    return path


def resnet20_checkpoint(models_dir: str | None = None) -> Path:
    return cifar_resnet_checkpoint("resnet20", models_dir)


@dataclass
class VisionTrack(Track):
    """A CIFAR-10 ResNet (20 or 56 layers) + image tasks (MNIST, Fashion-MNIST, USPS, GTSRB, ...)."""

    name: str = "vision"
    models_dir: str | None = None
    backbone: str = "resnet20"
    max_train: int | None = 20000

    def backbone_id(self) -> str:
        path = cifar_resnet_checkpoint(self.backbone, self.models_dir)
        return f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"

    def _load(self, task):
        return datasets.load_vision_task(task, data_dir=self.data_dir, seed=self.seed)

    def _prepare(self, task, split) -> PreparedSplit:
        return PreparedSplit(task, np.asarray(split.images), np.asarray(split.labels), _image_collate)

    def pretrained_encoder(self):
        encoder, _ = load_cifar_resnet(cifar_resnet_checkpoint(self.backbone, self.models_dir))
        return encoder

    frozen_parameters: tuple[str, ...] = ()
    has_batchnorm: bool = field(default=True, init=False, repr=False)
    fisher_method: str = "vmap"  # convolutions and BatchNorm: vmap over functional_call
