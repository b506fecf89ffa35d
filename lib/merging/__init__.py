"""Closed-form model merges over state dicts (METHODS.md, section 1).

Every function here is pure: it takes state dicts (``dict[str, torch.Tensor]``) and
returns new ones, never modifying its inputs and doing no I/O. Conventions shared by all:

- Every floating-point tensor given is merged; the caller chooses the keys (for example,
  drops the task heads from every dict before calling). Non-floating tensors (BatchNorm's
  ``num_batches_tracked`` and the like) are copied unchanged from the first or pretrained
  model.
- All models must have the same keys, and per key the same shape and dtype; otherwise a
  ``ValueError`` names the key and the models.
- Arithmetic runs in the input dtype, except that float16/bfloat16 inputs are computed
  (and accumulated) in float32; results are returned in the input dtype.

Buffers (BatchNorm running statistics) are averaged by every merge, never trimmed,
sign-elected or rescaled (``lib.merging._common`` states the rule; ``buffers=`` names them).
Each family's module states its formula, paper, defaults and its deviations from other
public implementations. ``REGISTRY`` (``lib.merging.registry``) calls every method the same
way, with its statistics and hyper-parameter grid; ``MERGE_METHODS`` is the older name →
function map.

Notation follows METHODS.md: θ0 pretrained, θt fine-tuned on task t, τt = θt − θ0.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._common import BUFFER_SUFFIXES, averaged_buffers, buffer_keys
from .averaging import SLERP_COLINEAR_THRESHOLD, slerp, weight_average
from .dare import dare
from .fisher import fisher_merging
from .gradient_matching import gradient_matching
from .regmean import regmean
from .registry import LAMBDA_GRID, REGISTRY, MergeMethod
from .task_arithmetic import TaskVector, task_arithmetic, task_vectors
from .ties import ties_merging, ties_trim_and_elect

__all__ = [
    "BUFFER_SUFFIXES",
    "LAMBDA_GRID",
    "MERGE_METHODS",
    "MergeMethod",
    "REGISTRY",
    "SLERP_COLINEAR_THRESHOLD",
    "TaskVector",
    "averaged_buffers",
    "buffer_keys",
    "dare",
    "fisher_merging",
    "gradient_matching",
    "regmean",
    "slerp",
    "task_arithmetic",
    "task_vectors",
    "ties_merging",
    "ties_trim_and_elect",
    "weight_average",
]

# ------------------------------------------------------------------------------ registry

# Name → merge function, kept for older callers; signatures differ (see each docstring).
# ``REGISTRY`` is the uniform interface. ``dare`` is not here: it returns sparsified models
# for another merge to use.
MERGE_METHODS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties_merging,
    "fisher": fisher_merging,
    "regmean": regmean,
    "gradient_matching": gradient_matching,
    "slerp": slerp,
}
