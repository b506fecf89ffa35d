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

EXPERT_SOURCES = ("published", "finetune")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


# METHODS.md §8: the CLIP fine-tuning recipe (experts="finetune"); max_steps is ours (module
# docstring); patience as long as the run: trained to the end, as the papers do, validation only
# choosing the best checkpoint.
CLIP_RECIPE = FinetuneConfig(max_steps=2000, batch_size=128, lr=1e-5, weight_decay=0.1, warmup_steps=500,
                             schedule="cosine", eval_every=250, patience=2000)


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
    models_dir: str | None = None
    experts: str = "published"
    device: str = "auto"
    autocast: str = "auto"
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

        return load_paper_vision_task(task, data_dir=self.data_dir, seed=self.seed)

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

    def zero_shot_heads(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each task's CLIP zero-shot head (class names × templates of data/clip_tasks.yaml), cached."""
        from ..paper.clip import task_zero_shot_head, zero_shot_head
        from ..paper.vision_data import task_spec

        heads = {}
        for task in self.tasks:
            spec = task_spec(task)
            key = {"track": "vision_paper", "backbone": self.backbone_id(), "task": task, "kind": "zero_shot",
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


__all__ = ["ClipVisionTrack", "autocast_dtype", "run_device"]
