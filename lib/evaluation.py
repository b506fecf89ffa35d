"""Evaluate encoders (merged or not) with each task's own head."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .metrics import accuracy, official_metric
from .tracks import Track
from .training import encode, head_module


@torch.no_grad()
def predict(encoder: nn.Module, head_state: dict, split) -> np.ndarray:
    return head_module(head_state)(encode(encoder, split)).argmax(1).numpy()


def evaluate(track: Track, encoder: nn.Module, encoder_state: dict[str, torch.Tensor], heads: dict,
             tasks: list[str] | None = None, split: str = "test", max_examples: int | None = None) -> dict[str, dict]:
    """Per-task accuracy and official metric of ``encoder_state`` loaded into ``encoder``
    (a reusable module of the track's architecture), each task through its own head."""
    encoder.load_state_dict(encoder_state)
    results = {}
    for task in tasks or track.tasks:
        data = track.split(task, split).subset(max_examples, track.seed)
        pred = predict(encoder, heads[task], data)
        n_classes = track.num_classes(task)
        results[task] = {"accuracy": 100 * accuracy(data.labels, pred),
                         "official": 100 * official_metric(track.metric(task), data.labels, pred, n_classes),
                         "metric": track.metric(task)}
    return results
