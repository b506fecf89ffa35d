"""Closed-form model merges over state dicts (METHODS.md, section 1), one family per file.

    from lib import merging
    merging.task_arithmetic(θ0, experts, scale=0.3)          # the plain functions, or
    merging.REGISTRY["ties"](θ0, experts, stats, scale=0.3)    # every method called one way

Every merge is a pure function: state dicts in, a new state dict out, inputs untouched, no I/O.
The conventions all of them share (key checks, dtypes, the buffer rule) are in ``_common.py``;
each family's file opens with its formula, paper, defaults and deviations.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._common import BUFFER_SUFFIXES, averaged_buffers, buffer_keys
from .averaging import SLERP_COLINEAR_THRESHOLD, slerp, weight_average
from .dare import dare
from .fisher import fisher_merging
from .gradient_matching import (DELTA, gradient_matching, gradient_mismatch, objective_gradient_norm, perturb_hessians,
                                relative_change, relative_damping, removal_amplification, remove_plain,
                                remove_uncertainty_weighted)
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
    "DELTA",
    "gradient_matching",
    "gradient_mismatch",
    "objective_gradient_norm",
    "perturb_hessians",
    "relative_change",
    "relative_damping",
    "removal_amplification",
    "remove_plain",
    "remove_uncertainty_weighted",
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
