"""Evaluate encoders (merged or not) with each task's own head."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .cache import cached_tensors, code_hash, content_hash
from ..metrics import accuracy, official_metric
from .tracks import Track, scored_officially
from .training import encode, head_module


@torch.no_grad()
def predict(encoder: nn.Module, head_state: dict, split) -> np.ndarray:
    return head_module(head_state)(encode(encoder, split)).argmax(1).numpy()


@torch.no_grad()
def head_outputs(encoder: nn.Module, head_state: dict, split) -> torch.Tensor:
    """The head's raw outputs [N, outputs] (logits, or a regression's score), float32 on the CPU."""
    return head_module(head_state)(encode(encoder, split)).float()


def evaluate(track: Track, encoder: nn.Module, encoder_state: dict[str, torch.Tensor], heads: dict,
             tasks: list[str] | None = None, split: str = "test", max_examples: int | None = None) -> dict[str, dict]:
    """Per-task accuracy and official metric of ``encoder_state`` loaded into ``encoder``
    (a reusable module of the track's architecture), each task through its own head.

    Predictions are cached under a content hash of the encoder state and head, so re-running
    a notebook re-evaluates only models that actually changed. ``correct`` is the per-example
    outcome (for standard errors, :mod:`lib.experiments.findings`).

    A track scored by official metrics (``track.task_score == "official"``: GLUE) caches the
    heads' outputs instead and turns them into its results (``track.task_results``): ``score``
    (the official score, what selection and normalized scores use) and ``predicted`` (each
    example's prediction, what a bootstrap resamples) among them."""
    official = scored_officially(track)
    state_hash, loaded = content_hash(encoder_state), False
    results = {}
    for task in tasks or track.tasks:
        data = track.split(task, split).subset(max_examples, track.seed)
        key = {**track.identity([task]), "task": task, "split": split, "max_examples": max_examples,
               "encoder": state_hash, "head": content_hash(heads[task]),
               "code": code_hash(head_outputs, encode) if official else code_hash(predict, encode)}

        def compute(data=data, task=task):
            nonlocal loaded
            if not loaded:
                encoder.load_state_dict(encoder_state)
                loaded = True
            if official:
                return {"outputs": head_outputs(encoder, heads[task], data)}
            return {"pred": torch.as_tensor(predict(encoder, heads[task], data))}

        cached = cached_tensors("predictions", key, compute)
        if official:
            results[task] = track.task_results(task, cached["outputs"].numpy(), data.labels)
            continue
        pred = cached["pred"].numpy()
        n_classes = track.num_classes(task)
        results[task] = {"accuracy": 100 * accuracy(data.labels, pred), "correct": pred == data.labels,
                         "official": 100 * official_metric(track.metric(task), data.labels, pred, n_classes),
                         "metric": track.metric(task)}
    return results
