"""Paper-scale tracks (issue 12; METHODS.md §7-8): the merging papers' own benchmark behind the
same ``Track`` interface as the small-scale tracks, so notebook 01's code runs on it unchanged.

    track = ClipVisionTrack(["mnist", "eurosat"], arch="ViT-B-32", data_dir=..., models_dir=...)
    heads = track.zero_shot_heads()                 # CLIP's zero-shot heads from the text tower
    experts = track.published_experts(heads)        # tanganke/clip-vit-base-patch32_<task>
    track.split("mnist", "test")                    # a PreparedSplit of images kept on disk

What differs from the small vision track, and why:

- θ0 is OpenAI's CLIP image tower (open_clip, ``lib.paper.clip.load_clip``); each task's head is
  its frozen zero-shot head (class names × prompt templates of ``data/clip_tasks.yaml``), as in
  Ilharco et al. and every paper since; heads are never merged.
- The experts are the published ones the field uses today (FusionBench's, ``tanganke/<model>_<task>``,
  converted from transformers' ``CLIPVisionModel`` to open_clip keys), or (``experts="finetune"``)
  fine-tuned here with the papers' recipe, ``CLIP_RECIPE``: AdamW lr 1e-5, weight decay 0.1, batch
  128, cosine schedule after 500 warm-up steps, head frozen, 2,000 steps (about what the task-vectors
  code's per-dataset epochs come to at batch 128), on the track's device under its autocast.
- Images stay on disk and are decoded per batch with CLIP's evaluation transform; the cache
  keys of a task hash the records' identity (file names, or the array, or the hub copy's
  fingerprint, plus rows and labels), not the decoded pixels.
- Inference runs on ``device`` ("auto": CUDA when there is one) under bf16 autocast there
  (``autocast``: "auto", "bf16", "fp16" or "off"); statistics and merges stay in float32.
- There is no BatchNorm (no re-estimation rows) and no multi-task model (the papers quote its
  number; training one on 8 full datasets is out of this project's reach).

The splits are the canonical ones, evaluated in full unless ``max_test`` caps them; validation
is a seeded 10% of train (``lib.paper.vision_data``).

    track = GlueTextTrack(["cola", "stsb"], data_dir=..., models_dir=...)
    experts = track.published_experts(initial_heads(track))   # lu-vae/roberta-glue, their own heads

``GlueTextTrack`` is the text benchmark of DARE and Twin-Merging (``lib.paper.glue``): RoBERTa-base
(θ0 = ``FacebookAI/roberta-base`` without pooler, read at ``<s>``) on eight GLUE tasks. What differs:

- Each task's head is its expert's own two-layer classifier (dense, tanh, out_proj; ``lib.heads``),
  trained with the expert and never merged (the papers exclude ``classifier.*``); STS-B's has one
  output, a regression. ``experts="finetune"`` trains them here from ``glue.initial_head`` with
  DARE's recipe (``GlueFinetuneRecipe``: 10 epochs, lr 1e-5, batch 16, 6% warm-up, the epoch with
  the best official validation score kept; cross-entropy, STS-B mean squared error).
- The test split is GLUE's validation split, its first ``max_test`` examples (Twin-Merging: 1,000);
  validation is DARE's held-out 10% of train.
- A task's score is its official GLUE score (``glue_scores``: the mean of its metrics, e.g. CoLA's
  Matthews correlation, STS-B's Pearson and Spearman of the scalar output); the normalized score
  is that over the expert's, as the papers report. Scores are not means of per-example outcomes,
  so their uncertainties come from a paired bootstrap over test examples
  (``lib.experiments.findings.paired_bootstrap``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from .cache import cached_tensors
from .tracks import PreparedSplit, Track
from .training import Expert, FinetuneConfig
from ..paper import glue
from ..paper.vision_data import check_source

EXPERT_SOURCES = ("published", "finetune")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


# METHODS.md §8: the CLIP fine-tuning recipe (experts="finetune"), with the gradient clipped to
# norm 1 as task_vectors' finetune.py does; max_steps is ours (module docstring); patience as long
# as the run: trained to the end, as the papers do, validation only choosing the best checkpoint.
CLIP_RECIPE = FinetuneConfig(max_steps=2000, batch_size=128, lr=1e-5, weight_decay=0.1, warmup_steps=500,
                             schedule="cosine", eval_every=250, patience=2000, max_grad_norm=1.0)

# Examples per forward/backward when an architecture is fine-tuned with CLIP_RECIPE's batch of 128,
# so that it fits a 24 GB card (the gradients of the parts add up to the batch's: the same steps).
# make bench-gpu-paper measured whole batches at 7.1 (B/32), 18.2 (B/16) and 66.4 GiB (L/14) on
# lib.archs towers with 8 task vectors still alive; make bench-gpu-memory predicts the fine-tuning
# alone on open_clip's towers: whole batches fit 24 GB on B/32 and B/16, not on L/14, where parts
# of 16 fit with room to spare. Predicted, not yet measured on a GPU.
CLIP_MICRO_BATCH = {"ViT-B-32": None, "ViT-B-16": None, "ViT-L-14": 16}

# Examples whose per-example gradients (float32, one encoder's size each) are alive at once in the
# vmap Fisher of notebook 01's statistics, so that it fits a 24 GB card: make bench-gpu-memory
# predicts chunks of 16 over it on L/14 (16 × 1.1 GiB of gradients) and 4 well under it.
CLIP_FISHER_CHUNK = {"ViT-B-32": 16, "ViT-B-16": 16, "ViT-L-14": 4}


def run_device(device: str = "auto") -> torch.device:
    """The device inference runs on: ``"auto"`` is CUDA when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(autocast: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA for ``"auto"`` (about half the memory and time; "off" runs float32), none on CPU."""
    if autocast == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if autocast not in AUTOCAST:
        raise ValueError(f"autocast = {autocast!r}: choose one of auto, {', '.join(AUTOCAST)}.")
    return AUTOCAST[autocast]


def _clip_collate(split: PreparedSplit, idx: np.ndarray, transform, workers: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": split.inputs.pixels(idx, transform, workers)}


@dataclass
class ClipVisionTrack(Track):
    """A CLIP image encoder (ViT-B/32, B/16 or L/14) + the eight vision tasks of the papers."""

    name: str = "vision"
    arch: str = "ViT-B-32"
    source: str | None = None  # "torchvision" or "huggingface" for every task; None: each task's default_source
    models_dir: str | None = None
    experts: str = "published"
    device: str = "auto"
    autocast: str = "auto"
    fisher_chunk: int = 0  # per-example gradients alive at once in a Fisher (0: CLIP_FISHER_CHUNK's for the arch)
    decode_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))  # image-decoding threads
    head_kind: str = "zero_shot"
    max_validation: int | None = 500
    max_test: int | None = None  # the papers report on the full test sets
    has_text_tower: bool = field(default=True, init=False, repr=False)
    scale: str = field(default="paper", init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.head_kind != "zero_shot":
            raise ValueError(f"head_kind = {self.head_kind!r}: the paper-scale vision track uses CLIP's zero-shot "
                             "heads (the papers' protocol); pass 'zero_shot'.")
        if self.experts not in EXPERT_SOURCES:
            raise ValueError(f"experts = {self.experts!r}: choose 'published' (the hub's) or 'finetune' (the papers' "
                             "recipe, here).")
        autocast_dtype(self.autocast, run_device(self.device))  # an unknown setting fails here, not mid-run
        check_source(self.source)
        if self.fisher_chunk < 0:
            raise ValueError(f"fisher_chunk = {self.fisher_chunk}: pass the examples per vmapped chunk, or 0 for "
                             "the architecture's default (CLIP_FISHER_CHUNK).")
        self.fisher_chunk = self.fisher_chunk or CLIP_FISHER_CHUNK.get(self.arch, 16)

    frozen_parameters: tuple[str, ...] = ()
    # per-example gradients by vmap over functional_call (open_clip's attention has no masks)
    fisher_method: str = "vmap"

    def backbone_id(self) -> str:
        return f"open_clip {self.arch} openai"

    def _bundle(self):
        if "bundle" not in self._cache:
            from ..paper.clip import load_clip

            self._cache["bundle"] = load_clip(self.arch, "openai", models_dir=self.models_dir)
        return self._cache["bundle"]

    def _load(self, task):
        from ..paper.vision_data import load_paper_vision_task

        return load_paper_vision_task(task, data_dir=self.data_dir, seed=self.seed, source=self.source)

    def _prepare(self, task, records) -> PreparedSplit:
        from ..paper.vision_data import clip_transform

        if "transform" not in self._cache:
            self._cache["transform"] = clip_transform(self.pretrained_encoder().image_size)
        collate = partial(_clip_collate, transform=self._cache["transform"], workers=self.decode_workers)
        return PreparedSplit(task, records, records.labels, collate)

    def pretrained_encoder(self):
        """θ0 on the CPU (a fresh module each call); ``encode`` runs it on ``run_device``."""
        from ..paper.clip import image_encoder

        encoder = image_encoder(self._bundle().model)
        encoder.run_device = run_device(self.device)
        encoder.autocast_dtype = autocast_dtype(self.autocast, encoder.run_device)
        return encoder

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """Both towers and the logit scale: the zero-shot heads come from the text tower."""
        return self._bundle().model.state_dict()

    def zero_shot_heads(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each task's CLIP zero-shot head (class names × templates of data/clip_tasks.yaml), cached
        under the track's identity (θ0's weights included)."""
        from ..paper.clip import task_zero_shot_head, zero_shot_head
        from ..paper.vision_data import task_spec

        heads = {}
        for task in self.tasks:
            spec = task_spec(task)
            key = {**self.identity(), "track": "vision_paper", "task": task, "kind": "zero_shot",
                   "classes": spec.classes, "templates": spec.templates}
            heads[task] = cached_tensors("heads/vision_paper", key, lambda task=task: task_zero_shot_head(self._bundle(), task),
                                         code=(task_zero_shot_head, zero_shot_head))
        return heads

    @property
    def uses_published_experts(self) -> bool:
        return self.experts == "published"

    def published_experts(self, heads: dict) -> dict[str, Expert]:
        """The published fine-tuned expert of every task, each with its task's (frozen) head."""
        from ..paper.clip import expert_repo, load_expert

        base = self.pretrained_encoder()
        experts = {}
        for task in self.tasks:
            encoder = load_expert(self.arch, task, base, models_dir=self.models_dir)
            state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
            experts[task] = Expert(state, {task: heads[task]}, {"source": expert_repo(self.arch, task)})
        return experts


# METHODS.md §8 and DARE: the GLUE experts' recipe (experts="finetune"); epochs become steps per task
# (GlueTextTrack.expert_config).
GLUE_RECIPE = glue.GlueFinetuneRecipe()
GLUE_MAX_TEST = 1000  # Twin-Merging's test sets: the first 1,000 examples of each GLUE validation split


@dataclass
class GlueTextTrack(Track):
    """RoBERTa-base + the eight GLUE tasks of DARE and Twin-Merging (module docstring)."""

    name: str = "text"
    models_dir: str | None = None
    experts: str = "published"
    device: str = "auto"
    autocast: str = "auto"
    head_kind: str = "joint"  # each expert trains its own head: the GLUE papers' setup
    max_validation: int | None = 500
    max_test: int | None = GLUE_MAX_TEST
    scale: str = field(default="paper", init=False, repr=False)
    task_score: str = field(default="official", init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.head_kind != "joint":
            raise ValueError(f"head_kind = {self.head_kind!r}: the GLUE track's heads are trained with each expert "
                             "(the papers' setup); pass 'joint'.")
        if self.experts not in EXPERT_SOURCES:
            raise ValueError(f"experts = {self.experts!r}: choose 'published' (lu-vae/roberta-glue) or 'finetune' "
                             "(DARE's recipe, here).")
        for task in self.tasks:
            glue.glue_task_spec(task)  # an unknown task fails here, naming the task file
        autocast_dtype(self.autocast, run_device(self.device))

    frozen_parameters: tuple[str, ...] = ()  # DARE fine-tunes the whole model
    # per-example gradients from layer hooks: transformers' attention masks defeat vmap (as MiniLM's)
    fisher_method: str = "hooks"

    def backbone_id(self) -> str:
        return f"{glue.ROBERTA_REPO}@{glue.MAX_LENGTH}"

    def _bundle(self):
        if "bundle" not in self._cache:
            self._cache["bundle"] = glue.load_roberta(self.models_dir)  # (encoder, tokenizer)
        return self._cache["bundle"]

    def _load(self, task):
        return glue.load_glue_task(task, data_dir=self.data_dir, seed=self.seed, max_test=self.max_test)

    def _prepare(self, task, split) -> PreparedSplit:
        tokenizer = self._bundle()[1]
        ids = glue.tokenize(tokenizer, split)
        collate = partial(glue.collate, pad_token_id=tokenizer.pad_token_id)
        return PreparedSplit(task, ids, split.labels, collate, np.array([len(r) for r in ids]))

    @property
    def pad_values(self) -> dict[str, int]:
        """What batches are padded with, per input (``glue.collate``): RoBERTa's pad id, which its
        position ids skip. Code that joins batches of different tasks pads the same way."""
        return {"input_ids": self._bundle()[1].pad_token_id}

    def pretrained_encoder(self):
        """θ0 on the CPU (a fresh module each call); ``encode`` runs it on ``run_device``."""
        import copy

        encoder = copy.deepcopy(self._bundle()[0])
        encoder.run_device = run_device(self.device)
        encoder.autocast_dtype = autocast_dtype(self.autocast, encoder.run_device)
        return encoder

    def joint_heads(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each task's fresh two-layer head, as transformers initialises one (seeded per task)."""
        dim = self._bundle()[0].feature_dim
        return {task: glue.initial_head(dim, self.num_classes(task), seed=self.seed * 1000 + i)
                for i, task in enumerate(self.tasks)}

    @property
    def uses_published_experts(self) -> bool:
        return self.experts == "published"

    def published_experts(self, heads: dict) -> dict[str, Expert]:
        """Every task's published expert with its own head (``heads``, the fresh ones, are unused)."""
        protocol = glue.glue_protocol()
        source = protocol.expert_sources[protocol.default_expert_source]
        base = self._bundle()[0]
        experts = {}
        for task in self.tasks:
            encoder, head = glue.load_glue_expert(task, base, models_dir=self.models_dir)
            state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
            experts[task] = Expert(state, {task: head}, {"source": f"{source['repo']}/{source['folder'].format(task=task)}"})
        return experts

    def expert_config(self, task: str, config) -> FinetuneConfig:
        """DARE's recipe for ``task``'s data: 10 epochs of it, evaluated once an epoch on the whole
        validation split, the best epoch kept. ``config`` is a ``GlueFinetuneRecipe`` (or a
        ready ``FinetuneConfig``, used as it is)."""
        if isinstance(config, FinetuneConfig):
            return config
        n_train, n_validation = len(self.split(task, "train")), len(self.split(task, "validation"))
        return FinetuneConfig(**config.finetune_settings(n_train, n_validation, seed=self.seed))

    def task_results(self, task: str, outputs: np.ndarray, labels: np.ndarray) -> dict:
        """Results of a task from its head's outputs [N, outputs] (``evaluation.evaluate``), in
        points: ``score`` and ``official`` = GLUE's score (the mean of the task's metrics), each
        metric, ``accuracy`` (NaN for STS-B), ``predicted`` and, for a classification, ``correct``."""
        spec = glue.glue_task_spec(task)
        regression = spec.regression is not None
        predicted = glue.predictions(outputs, regression)
        scores = glue.glue_scores(spec, predicted, labels)
        result = {"accuracy": float("nan") if regression else 100 * float(np.mean(predicted == labels)),
                  "official": 100 * scores["score"], "score": 100 * scores["score"], "metric": self.metric(task),
                  **{f"metric: {name}": 100 * v for name, v in scores.items() if name != "score"},
                  "predicted": predicted}
        if not regression:
            result["correct"] = predicted == labels
        return result

    def score(self, task: str, predicted: np.ndarray, labels: np.ndarray) -> float:
        """GLUE's score of ``task`` (points) for these predictions of these examples."""
        key = ("spec", task)  # looked up once: a bootstrap scores thousands of draws
        if key not in self._cache:
            self._cache[key] = glue.glue_task_spec(task)
        return 100 * glue.glue_scores(self._cache[key], predicted, labels)["score"]


__all__ = ["ClipVisionTrack", "GLUE_RECIPE", "GlueTextTrack", "autocast_dtype", "run_device"]
