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

Notation follows METHODS.md: θ0 pretrained, θt fine-tuned on task t, τt = θt − θ0.
"""
from __future__ import annotations

from typing import Callable

import torch

from .averaging import SLERP_COLINEAR_THRESHOLD, slerp, weight_average
from .dare import dare
from .fisher import fisher_merging
from .gradient_matching import gradient_matching
from .regmean import regmean
from .task_arithmetic import TaskVector, task_arithmetic, task_vectors
from .ties import ties_merging, ties_trim_and_elect

__all__ = [
    "MERGE_METHODS",
    "SLERP_COLINEAR_THRESHOLD",
    "TaskVector",
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

# Name → merge function, like mergekit's method registry. Signatures differ (see each
# docstring). ``dare`` is not here: it returns sparsified models for another merge to use.
MERGE_METHODS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties_merging,
    "fisher": fisher_merging,
    "regmean": regmean,
    "gradient_matching": gradient_matching,
    "slerp": slerp,
}
